"""What the GPU path needs from the training loop, checked on CPU: compiled blocks stay compiled after the
`Throughput` callback counted its FLOPs; MFU scales with the work of each batch and is named HFU under activation
checkpointing; no host sync from checkpoint triggers, unpadding or the sparse MLM head when the collate gives the
shapes."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_modules.throughput import Throughput, peak_tflops_of
from tests.helpers import quiet_trainer
from tests.test_resilience import RandomMLMBatches, loader, tiny_mlm

REPO = Path(__file__).resolve().parents[1]


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
    trainer = SimpleNamespace(
        global_step=0,
        log_every_n_steps=2,
        loggers=[object()],
        world_size=1,
        strategy=SimpleNamespace(root_device=torch.device("cpu")),
        datamodule=None,
    )
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
    configs = sorted((REPO / "configs").glob("*/*.yaml"))
    checkpoints = [
        (path.name, c.get("init_args") or {})
        for path in configs
        for c in (yaml.safe_load(path.read_text()).get("trainer") or {}).get("callbacks") or []
        if c["class_path"] == "lightning.pytorch.callbacks.ModelCheckpoint"
    ]
    assert len(checkpoints) >= 20
    assert not [name for name, args in checkpoints if "train_time_interval" in args]
    periodic = [name for name, args in checkpoints if args.get("save_last")]
    assert {"bert_base.yaml", "librispeech_base.yaml", "coco_vit_b16.yaml"} <= set(periodic)
    assert all(args.get("every_n_train_steps") for name, args in checkpoints if args.get("save_last"))
