"""What the GPU path needs from the training loop, checked on CPU: compiled blocks stay compiled after the
`Throughput` callback counted its FLOPs; MFU scales with the work of each batch and is named HFU under activation
checkpointing; no host sync from checkpoint triggers, unpadding or the sparse MLM head when the collate gives the
shapes."""

from __future__ import annotations

import traceback
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch.utils._python_dispatch import TorchDispatchMode

from datamodules.masking import MLMCollator
from lightning_modules.components.bert import SparseLayout
from lightning_modules.training.callbacks import LossTQDMProgressBar
from lightning_modules.training.preemption import PreemptionCheckpoint
from lightning_modules.training.throughput import Throughput, peak_tflops_of
from tests.builders.mlm import RandomMLMBatches, loader, tiny_mlm
from tests.helpers import REPO, quiet_trainer


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts compilations and graph calls."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)

        return run


class GraphCallsPerBatch(L.Callback):
    """The backend's graph calls so far, after every training batch."""

    def __init__(self, backend: CountingBackend) -> None:
        self.backend = backend
        self.calls: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append(self.backend.calls)


def _cpu_trainer_stub(log_every: int = 1) -> SimpleNamespace:
    """What `Throughput` reads of a trainer, for driving its hooks without a training loop."""
    return SimpleNamespace(
        global_step=0,
        log_every_n_steps=log_every,
        loggers=[object()],
        world_size=1,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        datamodule=None,
    )


def test_compiled_module_runs_compiled_after_the_flop_count() -> None:
    """The callback's hooks around three MLM steps whose embeddings are compiled: the counted step runs them
    eagerly (no compilation, no graph call), the next two run the compiled graph."""
    torch._dynamo.reset()
    backend = CountingBackend()
    model = tiny_mlm()
    model.model.bert.embeddings.compile(backend=backend)  # user code: Dynamo skips torch.nn modules as frames
    callback, trainer, calls = Throughput(peak_tflops=1.0), _cpu_trainer_stub(log_every=100), []
    callback.on_train_start(trainer, model)
    batch = next(iter(loader(RandomMLMBatches(4))))
    try:
        for i in range(3):
            callback.on_train_batch_start(trainer, model, batch, i)
            _mlm_loss(model, batch).backward()
            trainer.global_step += 1
            callback.on_train_batch_end(trainer, model, None, batch, i)
            calls.append(backend.calls)
    finally:
        torch._dynamo.reset()
    assert callback.flops_per_batch
    assert calls[0] == 0 and backend.compiled >= 1, calls  # the counted step ran eagerly
    assert calls[0] < calls[1] < calls[2], calls  # then the compiled graph ran in each step


@pytest.mark.slow  # a full Trainer run; test_compiled_module_runs_compiled_after_the_flop_count is the short one
def test_compiled_module_is_used_after_the_flop_count(tmp_path: Path) -> None:
    """The first batch is counted with the compiled embeddings forced eager (no graph call, no compilation); every
    later batch runs the compiled graph."""
    torch._dynamo.reset()
    backend = CountingBackend()
    model = tiny_mlm()
    model.model.bert.embeddings.compile(backend=backend)  # user code: Dynamo skips torch.nn modules as frames
    callback, graph_calls = Throughput(peak_tflops=1.0), GraphCallsPerBatch(backend)
    t = quiet_trainer(
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback, graph_calls],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    try:
        t.fit(model, loader(RandomMLMBatches()))
    finally:
        torch._dynamo.reset()
    assert callback.flops_per_batch and "train/mfu" in t.callback_metrics
    calls = graph_calls.calls
    assert calls[0] == 0 and backend.compiled >= 1, calls  # the counted batch ran eagerly
    # the compiled graph ran in each later batch
    assert all(after > before for before, after in zip(calls, calls[1:])), calls


class Logged(torch.nn.Module):
    """Stands in for a LightningModule: records what the callback logs."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.block = torch.nn.Linear(4, 4)
        self.block.gradient_checkpointing = checkpointing
        self.logged: list[dict[str, float]] = []

    def log(self, key: str, value: float, **kwargs) -> None:
        if not self.logged or key in self.logged[-1]:
            self.logged.append({})
        self.logged[-1][key] = value


def _text_batch(tokens: int, rows: int = 2, length: int = 32) -> dict[str, torch.Tensor]:
    mask = (torch.arange(rows * length) < tokens).reshape(rows, length)
    return {"input_ids": torch.zeros(rows, length, dtype=torch.long), "attention_mask": mask}


def _drive(callback: Throughput, module: Logged, batches: list, accumulate: int) -> None:
    """Runs the callback's hooks as Lightning's loop calls them: `accumulate` micro-batches per optimizer step;
    the first batch does a (32 x 64) @ (64 x 16) matmul under the counter: 65,536 FLOPs."""
    trainer = _cpu_trainer_stub(log_every=2)
    callback.on_train_start(trainer, module)
    for i, batch in enumerate(batches):
        callback.on_train_batch_start(trainer, module, batch, i)
        if i == 0:
            torch.randn(32, 64) @ torch.randn(64, 16)
        if (i + 1) % accumulate == 0:
            trainer.global_step += 1
        callback.on_train_batch_end(trainer, module, None, batch, i)


@pytest.mark.parametrize("accumulate", [1, 3])
def test_flops_scale_with_the_tokens_of_each_batch_and_log_once_per_step(accumulate: int) -> None:
    """FLOPs are counted on the first batch (10 tokens) per token; an interval's FLOPs are that times its tokens,
    whatever their number per batch; with gradient accumulation the rates are logged once per logging step."""
    callback, module = Throughput(peak_tflops=1.0), Logged()
    tokens = [10] + [10] * (2 * accumulate - 1) + [5, 40, 25] * (2 * accumulate) + [5] * (2 * accumulate)
    _drive(callback, module, [_text_batch(n) for n in tokens], accumulate)
    assert callback.flops_per_batch == 2 * 32 * 64 * 16 and callback.unit == "tokens"
    assert callback.flops_per_unit == pytest.approx(2 * 32 * 64 * 16 / 10)
    steps = len(tokens) // accumulate
    # once per even step whose last micro-batch comes after the two untimed batches
    assert len(module.logged) == sum(1 for s in range(2, steps + 1, 2) if s * accumulate > 2)
    for logged in module.logged:
        # FLOP/s over tokens/s = FLOPs per token, however many tokens each batch had
        per_token = logged["train/tflops_per_device"] * 1e12 / logged["train/tokens_per_sec"]
        assert per_token == pytest.approx(callback.flops_per_unit, rel=1e-9)
        assert logged["train/mfu"] == pytest.approx(logged["train/tflops_per_device"], rel=1e-9)


def test_flops_of_speech_scale_with_audio_seconds_and_checkpointing_logs_hfu() -> None:
    """Speech batches: FLOPs per second of audio; with activation checkpointing on, the counted FLOPs include the
    recomputation, and the ratio is logged as hardware-FLOPs utilisation."""
    callback, module = Throughput(peak_tflops=1.0), Logged(checkpointing=True)

    def speech(*seconds: float) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([int(s * 16000) for s in seconds])
        return {"waveforms": torch.zeros(len(seconds), int(lengths.max())), "wave_lengths": lengths}

    _drive(callback, module, [speech(1.0, 1.0), speech(1.0), speech(3.0, 7.0), speech(0.5, 9.5)], 1)
    assert callback.unit == "audio_sec" and callback.flops_per_unit == pytest.approx(2 * 32 * 64 * 16 / 2.0)
    (logged,) = module.logged
    assert "train/mfu" not in logged
    assert logged["train/hfu"] == pytest.approx(logged["train/tflops_per_device"], rel=1e-9)
    per_second = logged["train/tflops_per_device"] * 1e12 / logged["train/audio_sec_per_sec"]
    assert per_second == pytest.approx(callback.flops_per_unit, rel=1e-9)


def test_peaks_of_h200_nvl_h800_and_a_mig_slice(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    sms = {"value": 132}
    monkeypatch.setattr(
        torch.cuda,
        "get_device_properties",
        lambda device=None: SimpleNamespace(multi_processor_count=sms["value"]),
    )
    for name, count, tflops in [
        ("NVIDIA H200 NVL", 132, 835.0),
        ("NVIDIA H800", 132, 989.0),
        ("NVIDIA H800 PCIe", 114, 756.0),
        ("NVIDIA H100 80GB HBM3 MIG 3g.40gb", 60, 989.0 * 60 / 132),  # 3 of 7 slices: 60 of 132 SMs
        ("NVIDIA A100-SXM4-80GB MIG 1g.10gb", 14, 312.0 * 14 / 108),
        ("NVIDIA A100-SXM4-80GB", 108, 312.0),
    ]:
        sms["value"] = count
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert peak_tflops_of(cuda) == pytest.approx(tflops, rel=1e-12), name


def test_full_size_configs_checkpoint_by_steps_not_by_time() -> None:
    """`ModelCheckpoint(train_time_interval=...)` broadcasts rank 0's decision after every batch (a collective and
    a host read); step triggers are decided by every rank alone."""
    from cli import WRITERS

    # the CLI's last.ckpt writer, the one every config has, triggers by steps; a config can only change how many
    assert WRITERS["last_checkpoint"].save_last and WRITERS["last_checkpoint"].every_n_train_steps
    configs = sorted((REPO / "configs").glob("*/*.yaml"))
    loaded = [(path.name, yaml.safe_load(path.read_text())) for path in configs]
    assert not [
        name
        for name, config in loaded
        if "every_n_train_steps" in (config.get("last_checkpoint") or {})
        and not config["last_checkpoint"]["every_n_train_steps"]
    ]
    # a ModelCheckpoint a config adds itself does not trigger by time either
    added = [
        (name, c.get("init_args") or {})
        for name, config in loaded
        for c in (config.get("trainer") or {}).get("callbacks") or []
        if c["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    ]
    assert not [name for name, args in added if "train_time_interval" in args]


class HostReads(TorchDispatchMode):
    """Records the operators that make the host wait for a device: a scalar read (`.item()`, `int()`,
    `bool()`), and ops whose output size depends on the data (`nonzero`, boolean indexing, `masked_select`,
    `bincount`, `unique`). On CPU they are cheap; on a GPU each one is a sync."""

    SIZED_BY_DATA = {
        torch.ops.aten.nonzero.default,
        torch.ops.aten.masked_select.default,
        torch.ops.aten.bincount.default,
        torch.ops.aten._unique2.default,
        torch.ops.aten.unique_consecutive.default,
        torch.ops.aten.repeat_interleave.Tensor,
    }

    def __init__(self, host_tensors: tuple[str, ...] = ()) -> None:
        """`host_tensors`: `file:function` of this repository whose reads are of tensors that live on the host
        on a GPU too (not recorded)."""
        super().__init__()
        self.host_tensors = host_tensors
        self.reads: list[str] = []

    def _record(self, what: str) -> None:
        frames = traceback.extract_stack()
        caller = next(
            (f for f in reversed(frames) if f.filename.startswith(str(REPO)) and f.filename != __file__), None
        )
        where = f"{Path(caller.filename).name}:{caller.name}" if caller else "?"
        if where not in self.host_tensors:
            self.reads.append(f"{what} in {where}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default or func in self.SIZED_BY_DATA:
            self._record(str(func))
        elif func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default) and any(
            i is not None and i.dtype in (torch.bool, torch.uint8) for i in args[1]
        ):
            self._record(f"{func} with a boolean index")
        return func(*args, **kwargs)


class WatchQuietSteps(L.Callback):
    """Watches every step but the first and the logging ones, from batch start to batch end (the callbacks before
    it in the list included), for host reads."""

    def __init__(self) -> None:
        self.mode: HostReads | None = None
        self.reads: dict[int, list[str]] = {}
        self.watched: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        if step >= 1 and (step + 1) % trainer.log_every_n_steps != 0:
            # PreemptionCheckpoint reads its flags from a pinned host copy whose event has landed (on CUDA)
            self.mode = HostReads(host_tensors=("preemption.py:on_train_batch_end",))
            self.mode.__enter__()
            self.watched.append(step)

    def on_train_batch_end(self, trainer, pl_module, *args) -> None:
        if self.mode is not None:
            self.mode.__exit__(None, None, None)
            self.reads[trainer.global_step] = self.mode.reads
            self.mode = None


def _mlm_samples(n: int, seed: int = 0) -> list[dict]:
    """NSP-shaped token sequences of random lengths, for `MLMCollator`: padded batches."""
    g = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        length = int(g.integers(6, 16))
        ids = np.r_[CLS, g.integers(5, VOCAB, length - 2), SEP]
        samples.append({"input_ids": ids, "index": i, "epoch": 0, "nsp_label": i % 2})
    return samples


CLS, SEP, MASK, VOCAB = 2, 3, 4, 64


def _mlm_collator() -> MLMCollator:
    return MLMCollator(vocab_size=VOCAB, pad_id=0, mask_id=MASK, special_ids=[0, 1, CLS, SEP, MASK])


def _mlm_loss(module, batch: dict) -> torch.Tensor:
    """The MLM system's training loss on one process (`model_step` without the trainer's all-reduce)."""
    out = module.model.pretraining_outputs(
        batch["input_ids"],
        batch["attention_mask"],
        batch.get("token_type_ids"),
        batch["labels"],
        -100,
        SparseLayout.of_batch(batch),
    )
    loss = out.mlm_loss_sum / out.mlm_targets.numel()
    if "nsp_labels" in batch:
        loss = loss + torch.nn.functional.cross_entropy(out.nsp_logits, batch["nsp_labels"])
    return loss


def test_mlm_step_reads_nothing_from_the_device() -> None:
    """Forward, backward and a fused AdamW step of the MLM system on a padded batch of its collate: no operator
    reads a value or a data-sized shape from the device. Without the collate's layout, the same step does."""
    model = tiny_mlm(vocab_size=VOCAB)
    opt = torch.optim.AdamW(model.parameters(), fused=True)
    batch = _mlm_collator()(_mlm_samples(4))
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded
    _mlm_loss(model, batch).backward()
    opt.step()  # the lazy state
    with HostReads() as mode:
        _mlm_loss(model, batch).backward()
        opt.step()
        opt.zero_grad()
    assert mode.reads == []
    plain = {k: v for k, v in batch.items() if k not in SparseLayout._fields}
    with HostReads() as mode:
        _mlm_loss(model, plain)
    reads = " ".join(mode.reads)
    assert "nonzero.default in encoder.py" in reads and "_local_scalar_dense.default in encoder.py" in reads
    assert "index.Tensor with a boolean index in bert.py" in reads


@pytest.mark.slow  # a full Trainer run; test_mlm_step_reads_nothing_from_the_device is the short one
def test_mlm_training_steps_read_nothing_from_the_device(tmp_path: Path) -> None:
    """The MLM system on padded batches of its collate, with the CLI's per-step callbacks (throughput, preemption
    flags, the progress bar's loss) and fused AdamW: between logging steps no operator reads a value or a
    data-dependent size from the device; the collate's layout gives the unpadding and the sparse head their
    shapes."""
    watch = WatchQuietSteps()
    data = torch.utils.data.DataLoader(_mlm_samples(24), batch_size=4, collate_fn=_mlm_collator())
    t = quiet_trainer(
        max_steps=6,
        log_every_n_steps=3,
        logger=CSVLogger(tmp_path),
        callbacks=[Throughput(), PreemptionCheckpoint(requeue=False), LossTQDMProgressBar(), watch],
        enable_progress_bar=True,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    t.fit(tiny_mlm(vocab_size=VOCAB), data)
    assert watch.watched == [1, 3, 4]
    assert watch.reads == {2: [], 4: [], 5: []}
    # the detector sees what the step reads without the collate's layout
    batch = _mlm_collator()(_mlm_samples(4))
    with HostReads() as mode:
        t.lightning_module.model.pretraining_outputs(
            batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], batch["labels"]
        )
    reads = " ".join(mode.reads)
    assert "nonzero.default in encoder.py" in reads and "_local_scalar_dense.default in encoder.py" in reads
    assert "index.Tensor with a boolean index in bert.py" in reads


def test_collate_layout_gives_the_same_loss_and_gradients() -> None:
    """The sparse MLM step with the collate's host-side layout and with the layout found on the device: the same
    operators on the same rows, so the same numbers (no tolerance needed)."""
    torch.manual_seed(0)
    model = tiny_mlm(vocab_size=VOCAB, dropout=0.0, attention_dropout=0.0).model
    batch = _mlm_collator()(_mlm_samples(6, seed=1))
    assert batch["attention_mask"].sum() < batch["attention_mask"].numel()  # padded
    results = []
    for layout in (SparseLayout.of_batch(batch), None):
        model.zero_grad()
        out = model.pretraining_outputs(
            batch["input_ids"],
            batch["attention_mask"],
            batch["token_type_ids"],
            batch["labels"],
            -100,
            layout,
        )
        (out.mlm_loss_sum + out.nsp_logits.sum()).backward()
        results.append((out, [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (with_layout, grads), (found, found_grads) = results
    for a, b in zip(with_layout, found):
        assert torch.equal(a, b)
    assert len(grads) == len(found_grads) and all(torch.equal(a, b) for a, b in zip(grads, found_grads))


def test_activation_checkpointing_is_found_in_every_form() -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    from lightning_modules.training.throughput import recomputes_activations

    model = tiny_mlm()
    assert not recomputes_activations(model)
    model.model.bert.encoder.gradient_checkpointing = True
    assert recomputes_activations(model)
    wrapped = torch.nn.Sequential(
        checkpoint_wrapper(torch.nn.Linear(2, 2))
    )  # as the FSDP strategies wrap blocks
    assert recomputes_activations(wrapped)
