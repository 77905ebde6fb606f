"""The GPU path, as far as a CPU can check it: collectives per step (2-process gloo), the throughput and MFU
callback, FSDP2's wrapping decisions, consolidation of a sharded checkpoint. The CUDA-only checks skip here with a
reason that says so."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins.precision import FSDPPrecision, MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torchvision.models.vision_transformer import EncoderBlock as ViTBlock
from torchvision.models.vision_transformer import VisionTransformer

from cli import CheckpointError, consolidate, read_checkpoint
from lightning_modules.components.encoder import EncoderBlock
from lightning_modules.training.callbacks import LossTQDMProgressBar
from lightning_modules.training.nonfinite import SkipNonFiniteSteps
from lightning_modules.training.preemption import PreemptionCheckpoint
from lightning_modules.training.strategies import shard_units
from lightning_modules.training.throughput import Throughput, batch_counts, peak_tflops_of
from tests.builders.callbacks import CountCollectives
from tests.builders.mlm import LENGTH, NaNAtCalls, RandomMLMBatches, loader, tiny_mlm
from tests.helpers import REPO, cli_args, quiet_trainer


@pytest.mark.slow  # about 15 s; test_rank_decisions checks the per-step decisions with fake collectives in the default run
def test_one_small_all_reduce_per_step_in_two_process_ddp(tmp_path: Path) -> None:
    """The masked-token count, the logged losses, the non-finite check and the SIGTERM/requeue flags travel in one
    all-reduce of a few scalars per step (gloo, 2 processes), and nothing else is collective besides DDP's
    gradient buckets."""
    torch.manual_seed(0)
    counter = CountCollectives(tmp_path)
    callbacks = [PreemptionCheckpoint(requeue=False), counter]
    t = quiet_trainer(
        max_steps=4,
        strategy="ddp_spawn",
        devices=2,
        accelerator="cpu",
        default_root_dir=tmp_path,
        limit_val_batches=0,
        log_every_n_steps=2,
        callbacks=callbacks,
        enable_checkpointing=False,
    )
    t.fit(tiny_mlm(), torch.utils.data.DataLoader(RandomMLMBatches(32, nsp=True), batch_size=4))
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(steps) == 5 and steps[-1] == []  # 4 steps, then the window after the last one
        for calls in steps[:-1]:
            # count, MLM loss sum, NSP loss, non-finite flag, SIGTERM, requeue; Lightning's own SIGTERM broadcast
            # before every step is off while PreemptionCheckpoint carries the flag in this all-reduce
            assert calls == [["all_reduce", 6]], calls


def test_throughput_logs_rates_and_mfu_with_an_explicit_peak(tmp_path: Path) -> None:
    callback = Throughput(peak_tflops=2.0)
    t = quiet_trainer(
        max_steps=5,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path),
        callbacks=[callback],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    t.fit(tiny_mlm(), loader(RandomMLMBatches()))
    m = t.callback_metrics
    assert not t.progress_bar_metrics  # no metric is read to the host after every batch (LossTQDMProgressBar)
    # every sequence is LENGTH tokens long, none padded
    assert m["train/tokens_per_sec"].item() == pytest.approx(
        LENGTH * m["train/samples_per_sec"].item(), rel=1e-5
    )
    assert m["train/mfu"].item() == pytest.approx(m["train/tflops_per_device"].item() / 2.0, rel=1e-5)
    assert 0 < m["train/mfu"].item() < 1
    # FLOPs of forward + backward of the tiny BERT's 2 blocks: at least 6 x the blocks' matrix weights per token
    model = t.lightning_module.model
    # (the first block sees every token; the last only the masked ones and [CLS])
    first = model.bert.encoder.blocks[0]
    weights = sum(p.numel() for p in first.parameters() if p.ndim == 2)
    assert callback.flops_per_batch >= 6 * weights * 4 * LENGTH


def test_throughput_counts_nothing_on_cpu_without_a_peak(tmp_path: Path) -> None:
    callback = Throughput()
    t = quiet_trainer(
        max_steps=3,
        log_every_n_steps=1,
        callbacks=[callback],
        limit_val_batches=0,
        logger=CSVLogger(tmp_path),
        default_root_dir=tmp_path,
    )
    t.fit(tiny_mlm(), loader(RandomMLMBatches()))
    assert callback.flops_per_batch is None  # the FLOP counter slows its batch: only where MFU can be told
    assert "train/mfu" not in t.callback_metrics
    assert t.callback_metrics["train/samples_per_sec"].item() > 0


def test_batch_counts_of_speech_text_and_nested_batches() -> None:
    speech = {"waveforms": torch.zeros(3, 32000), "wave_lengths": torch.tensor([16000, 32000, 8000])}
    counts = batch_counts(speech, sample_rate=16000)
    assert counts["samples"] == 3
    assert counts["audio_sec"].item() == pytest.approx(3.5)
    text = {"input_ids": torch.ones(2, 5), "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])}
    nested = batch_counts({"image_text": {**text, "images": torch.zeros(2, 3, 8, 8)}, "speech_text": speech})
    assert nested["samples"] == 5
    assert nested["tokens"].item() == 8


def test_peak_flops_by_gpu_name(monkeypatch) -> None:
    cuda = torch.device("cuda", 0)
    for name, tflops in [
        ("NVIDIA H200", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L4", 121.0),
        ("Some Future GPU", None),
    ]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, _n=name: _n)
        assert peak_tflops_of(cuda) == tflops, name
    assert peak_tflops_of(torch.device("cpu")) is None


def test_shard_units_are_the_blocks_of_every_tower() -> None:
    mlm = tiny_mlm()
    units = shard_units(mlm)
    assert units == list(mlm.model.bert.encoder.blocks)
    assert all(isinstance(u, EncoderBlock) for u in units)
    vit = VisionTransformer(
        image_size=32, patch_size=16, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32
    )
    assert [type(u) for u in shard_units(vit)] == [ViTBlock] * 3

    class Tower(torch.nn.Module):  # a pretrained tower names its repeated layers `blocks`
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Linear(4, 4)
            self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4)) for _ in range(2))

    tower = Tower()
    assert shard_units(tower) == list(tower.blocks)  # not the stem, not the Linear inside a block


def test_fsdp2_shards_a_channels_last_tower(tmp_path: Path) -> None:
    """fully_shard refuses non-contiguous parameters; the channels-last convolutions of a ResNet tower are given
    to it contiguous (one process, gloo, a mesh of one)."""
    from torch.distributed.device_mesh import init_device_mesh

    from lightning_modules.training.strategies import apply_fsdp2

    tower = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 4, 3), torch.nn.Flatten())
    tower.to(memory_format=torch.channels_last)
    assert not tower[0].weight.is_contiguous()
    images = torch.randn(2, 3, 8, 8).contiguous(memory_format=torch.channels_last)
    expected = tower(images)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        apply_fsdp2(tower, init_device_mesh("cpu", (1,)), param_dtype=None, reduce_dtype=None)
        # contiguous weights take another convolution kernel than channels-last ones: fp32 reassociation
        torch.testing.assert_close(tower(images), expected, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def _dcp_folder(folder: Path, state_dict: dict, meta: dict, **optimizers: dict) -> None:
    """A sharded checkpoint as ModelParallelStrategy writes one: torch.distributed.checkpoint files (the model's
    `state_dict` and `optimizer_0`, ...) + meta.pt."""
    from torch.distributed.checkpoint import FileSystemWriter, save

    save({"state_dict": state_dict, **optimizers}, storage_writer=FileSystemWriter(folder), no_dist=True)
    torch.save(meta, folder / "meta.pt")


class Tripwire:
    """Counts its unpickling: torch.distributed.checkpoint stores a value that is no tensor pickled."""

    loaded = 0

    def __reduce__(self):
        return (_trip, ())


def _trip() -> str:
    Tripwire.loaded += 1
    return "tripped"


def test_consolidate_writes_one_checkpoint_file_from_a_sharded_folder(tmp_path: Path) -> None:
    module = tiny_mlm()
    folder = tmp_path / "last.ckpt"
    # an optimizer state as big as the model, and a value in it that runs code when unpickled
    adam = {
        "state": {k: {"exp_avg": torch.ones_like(v)} for k, v in module.state_dict().items()},
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99), "tripwire": Tripwire()}],
    }
    meta = {"hyper_parameters": dict(module.hparams), "global_step": 7}
    _dcp_folder(folder, module.state_dict(), meta, optimizer_0=adam)
    with pytest.raises(CheckpointError, match="is a folder .* cli.py consolidate --ckpt_path"):
        read_checkpoint(folder)
    out = consolidate(["--ckpt_path", str(folder), "--out", str(tmp_path / "one.ckpt")])
    ckpt = read_checkpoint(out)
    # the optimizer state is neither written nor read (nothing of it was unpickled)
    assert Tripwire.loaded == 0 and "optimizer_0" not in ckpt and "optimizer_states" not in ckpt
    assert ckpt["global_step"] == 7
    restored = type(module)(**ckpt["hyper_parameters"])
    restored.load_state_dict(ckpt["state_dict"])
    for key, value in module.state_dict().items():
        assert torch.equal(restored.state_dict()[key], value), key


def test_consolidate_refuses_what_it_cannot_or_must_not_write(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(CheckpointError, match="no .metadata file"):
        consolidate(["--ckpt_path", str(plain), "--out", str(tmp_path / "x.ckpt")])
    folder = tmp_path / "sharded"
    _dcp_folder(folder, {"w": torch.ones(2)}, {})
    mine = tmp_path / "mine.ckpt"
    mine.write_bytes(b"the user's file")
    with pytest.raises(CheckpointError, match="exists: consolidate writes a new file and never replaces one"):
        consolidate(["--ckpt_path", str(folder), "--out", str(mine)])
    assert mine.read_bytes() == b"the user's file"


class LinearSystem(SkipNonFiniteSteps):
    """The per-step bookkeeping of every system (`reduce_step`, logging, the non-finite skip, fused AdamW) around
    a model without dynamic shapes: the MLM's sparse prediction (`nonzero` of the masked positions) and the
    encoder's padding check read the device by design, which is not what this test is about."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(8, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.log("train/loss", self.rank_means(loss, loss=loss)["loss"])
        self.log("train/rows", float(len(x)))  # a host number, as the systems log counts and flags
        return self.skip_if_nonfinite(loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3, fused=True)


class SyncDebug(L.Callback):
    """Records, per training step, where CUDA's sync debug mode saw the host wait for the device (file, line),
    from the step's batch start to the next one's, so every callback's batch-end work counts too; for every step
    but the first two (lazy optimizer state, the FLOP count and the compiling batch), the logging steps, which
    read values on purpose, and the last (the end of training logs)."""

    def __init__(self) -> None:
        self.syncs: dict[int, list[tuple[str, int]]] = {}
        self._caught = None
        self._records: list = []
        self._step = 0

    def _close(self) -> None:
        if self._caught is None:
            return
        torch.cuda.set_sync_debug_mode("default")
        self._caught.__exit__(None, None, None)
        self._caught = None
        self.syncs[self._step] = [
            (Path(w.filename).name, w.lineno) for w in self._records if "synchronizing" in str(w.message)
        ]

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._close()
        step = trainer.global_step
        last = step + 1 == trainer.max_steps
        if step > 1 and (step + 1) % trainer.log_every_n_steps != 0 and not last:
            self._step = step + 1
            self._caught = warnings.catch_warnings(record=True)
            self._records = self._caught.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()


# what each quickstart system may still read between logging steps (README, "On GPUs"): MLM nothing (its collate
# gives the unpadding and the sparse head their shapes); the alignment systems one `nonzero` per text or speech
# tower call, the real-token count their encoder's unpadding needs
ALLOWED_SYNCS = {"mlm": ({}, 0), "speech": ({"encoder.py"}, 2), "clip": ({"encoder.py"}, 1)}


def _quickstart_on_cuda(name: str, tmp_path: Path, *extra: str):
    from cli import main
    from datamodules.synthetic.shapes import generate_shapes_coco
    from datamodules.synthetic.tones import generate_tone_librispeech

    data = [
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.loader.num_workers=0",
    ]
    if name == "mlm":
        data.append("--data.init_args.num_proc=1")
    elif name == "speech":
        generate_tone_librispeech(tmp_path / "tones", n_train_utts=48, n_val_utts=6)
        data.append(f"--data.init_args.root={tmp_path / 'tones'}")
    else:
        generate_shapes_coco(tmp_path / "shapes", n_train=64, n_val=8, image_size=32)
        data += [f"--data.init_args.root={tmp_path / 'shapes'}", "--data.init_args.loader.batch_size=8"]
    return main(
        cli_args(
            "fit",
            "--trainer.accelerator=cuda",
            "--trainer.enable_progress_bar=true",  # the CLI's loss progress bar is among the callbacks watched
            "--trainer.devices=1",
            "--trainer.max_steps=9",
            "--trainer.log_every_n_steps=5",
            "--trainer.limit_val_batches=0",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.callbacks+=tests.training.test_gpu_path.SyncDebug",
            *data,
            *extra,
            config=f"{name}/quickstart.yaml",
            root=tmp_path / "run",
        )
    )


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA: torch.cuda.set_sync_debug_mode is CUDA-only"
)
@pytest.mark.parametrize("name", ["mlm", "speech", "clip"])
@pytest.mark.parametrize(
    "settings",
    [[], ["--trainer.precision=bf16-mixed", "--trainer.gradient_clip_val=1.0"]],
    ids=["32-true", "bf16-mixed-clipped"],
)
def test_no_host_sync_in_training_steps_on_cuda(tmp_path: Path, name: str, settings: list[str]) -> None:
    """The quickstart systems, from their configs with the CLI's default callbacks (throughput and MFU,
    preemption flags, atomic checkpoints, the progress bar's loss, step-based last.ckpt), their DataModules and
    fused AdamW, also clipped under bf16-mixed: between logging steps the host waits for the device only where
    the README says it does."""
    cli = _quickstart_on_cuda(name, tmp_path, *settings)
    assert cli.trainer.global_step == 9
    (debug,) = [c for c in cli.trainer.callbacks if isinstance(c, SyncDebug)]
    files, most = ALLOWED_SYNCS[name]
    assert sorted(debug.syncs) == [3, 4, 6, 7, 8]  # the steps that were watched (global step after each)
    for step, syncs in debug.syncs.items():
        assert {file for file, _ in syncs} <= files and len(syncs) <= most, (step, syncs)


def test_progress_bar_reads_the_loss_at_logging_steps_only(tmp_path: Path) -> None:
    """No progress-bar metric is read to the host after every batch; the bar shows the loss of the last logging
    step, and a logged Python number keeps its value."""
    bar = LossTQDMProgressBar()
    data = torch.utils.data.TensorDataset(torch.randn(16, 8), torch.randn(16, 1))
    t = quiet_trainer(
        max_steps=4,
        log_every_n_steps=2,
        callbacks=[bar],
        enable_progress_bar=True,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    t.fit(LinearSystem(), torch.utils.data.DataLoader(data, batch_size=4))
    assert "train/loss" not in t.progress_bar_metrics
    assert bar.get_metrics(t, t.lightning_module)["train/loss"] == t.callback_metrics["train/loss"].item()
    assert t.callback_metrics["train/rows"].item() == 4.0


def test_linear_system_skips_a_nonfinite_step_on_cpu(tmp_path: Path) -> None:
    """The same system on CPU: a NaN batch leaves the weights as they were (fused AdamW's found_inf)."""
    system = LinearSystem()
    x = torch.randn(8, 8)
    x[4:] = float("nan")  # the second batch of 4
    data = torch.utils.data.TensorDataset(x, torch.randn(8, 1))
    t = quiet_trainer(max_steps=2, limit_val_batches=0, default_root_dir=tmp_path, log_every_n_steps=1)
    t.fit(system, torch.utils.data.DataLoader(data, batch_size=4))
    assert t.optimizers[0].state[system.model.weight]["step"].item() == 1
    assert torch.isfinite(system.model.weight).all()
    assert t.callback_metrics["train/nonfinite_skipped"].item() == 1


def _grad_norm(module: torch.nn.Module) -> float:
    return torch.cat([p.grad.flatten() for p in module.parameters()]).norm().item()


class ClippedLinear(LinearSystem):
    """`LinearSystem` with the systems' rule for fused AdamW; records each step's gradient norm before the
    trainer's clipping (`before`), and the norm and weight after every `optimizer.step` call (`seen`, `weights`)."""

    def __init__(self) -> None:
        super().__init__()
        self.before: list[float] = []
        self.seen: list[float] = []
        self.weights: list[torch.Tensor] = []

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:  # before the clipping
        self.before.append(_grad_norm(self))

    def _after_step(self, *_) -> None:
        self.seen.append(_grad_norm(self))
        self.weights.append(self.model.weight.detach().clone())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        opt = torch.optim.AdamW(self.parameters(), lr=1e-2, fused=self.fused_adamw_allowed())
        opt.register_step_post_hook(self._after_step)
        return opt


def _fit_clipped(x: torch.Tensor, root: Path) -> tuple[ClippedLinear, L.Trainer]:
    torch.manual_seed(0)
    system = ClippedLinear()
    data = torch.utils.data.TensorDataset(x, 10 * torch.randn(len(x), 1))  # gradient norms far above 0.1
    t = quiet_trainer(
        max_steps=2,
        precision="bf16-mixed",
        gradient_clip_val=0.1,
        limit_val_batches=0,
        default_root_dir=root,
        log_every_n_steps=1,
    )
    t.fit(system, torch.utils.data.DataLoader(data, batch_size=4))
    return system, t


def test_bf16_mixed_clips_the_gradients_of_fused_adamw(tmp_path: Path) -> None:
    """bf16-mixed has no GradScaler: the trainer's clipping keeps fused AdamW, and the step sees clipped
    gradients."""
    system, t = _fit_clipped(torch.randn(8, 8), tmp_path)
    assert t.optimizers[0].defaults["fused"] is True
    assert len(system.before) == 2 and min(system.before) > 1.0
    assert system.seen == pytest.approx([0.1, 0.1], rel=1e-4)


def test_nan_step_under_bf16_and_clipping_is_skipped_on_the_device(tmp_path: Path) -> None:
    """A NaN batch with fused AdamW and clipping: the step runs with NaN gradients and `found_inf` leaves the
    weights as they were (no host read decided it), and the skip is counted."""
    x = torch.randn(8, 8)
    x[4:] = float("nan")  # the second batch of 4
    system, t = _fit_clipped(x, tmp_path)
    opt = t.optimizers[0]
    assert opt.defaults["fused"] is True
    assert len(system.seen) == 2 and system.seen[1] != system.seen[1]  # the fused step ran on NaN gradients
    assert torch.equal(system.weights[1], system.weights[0]) and torch.isfinite(system.weights[1]).all()
    assert opt.state[system.model.weight]["step"].item() == 1
    assert t.callback_metrics["train/nonfinite_skipped"].item() == 1


@pytest.mark.parametrize(
    "plugin, clip, fused",
    [
        ("bf16-mixed", 1.0, True),
        ("32-true", 1.0, True),
        ("bf16-true", 1.0, True),
        (MixedPrecision("16-mixed", "cpu"), 1.0, False),  # a GradScaler: Trainer(precision) is bf16 on CPU
        (MixedPrecision("16-mixed", "cpu"), None, True),
    ],
    ids=["bf16-mixed", "32-true", "bf16-true", "16-mixed", "16-mixed-no-clip"],
)
def test_fused_adamw_is_off_only_where_a_grad_scaler_meets_clipping(
    plugin: str | MixedPrecision, clip: float | None, fused: bool
) -> None:
    precision = {"plugins": [plugin]} if isinstance(plugin, MixedPrecision) else {"precision": plugin}
    system = ClippedLinear()
    system.trainer = quiet_trainer(gradient_clip_val=clip, **precision)
    assert system.fused_adamw_allowed() is fused
    if fused:
        return
    # fp16's scaler (and FSDP's plugin) keep Lightning's clipping, which refuses a fused optimizer or the norm
    opt = torch.optim.AdamW(system.parameters(), fused=True)
    with pytest.raises(RuntimeError, match="performs unscaling of gradients internally"):
        system.configure_gradient_clipping(opt, 1.0, "norm")
    system.trainer.strategy.precision_plugin = FSDPPrecision("bf16-mixed")
    with pytest.raises(MisconfigurationException, match="not supported for `FSDPPrecision`"):
        system.configure_gradient_clipping(opt, 1.0, "norm")


def _system(name: str) -> SkipNonFiniteSteps:
    from lightning_modules.components.image_tower import ImageTowerConfig
    from lightning_modules.components.text_tower import TextTowerConfig
    from lightning_modules.finetune_module import SequenceClassificationModule
    from lightning_modules.image_text_module import ImageTextModule

    if name == "mlm":
        return tiny_mlm()
    if name == "finetune":
        return SequenceClassificationModule(vocab_size=100, encoder={"size": "tiny", "layers": 1})
    image = ImageTowerConfig("vit_custom", 16, patch_size=8, layers=1, width=16, heads=2, mlp_dim=32)
    return ImageTextModule(vocab_size=100, embed_dim=8, image=image, text=TextTowerConfig("tiny", layers=1))


@pytest.mark.parametrize("name", ["mlm", "finetune", "image_text"])
def test_every_system_keeps_fused_adamw_with_clipping_but_not_under_a_grad_scaler(name: str) -> None:
    system = _system(name)
    for plugin, fused in (
        (MixedPrecision("bf16-mixed", "cpu"), True),
        (MixedPrecision("16-mixed", "cpu"), False),
    ):
        # the little of a trainer configure_optimizers reads
        system._trainer = SimpleNamespace(
            estimated_stepping_batches=10, gradient_clip_val=1.0, precision_plugin=plugin
        )
        assert bool(system.configure_optimizers()["optimizer"].defaults["fused"]) is fused, plugin.precision


def _benchmark(*extra: str) -> str:
    result = subprocess.run(
        [sys.executable, "benchmarks/gpu_throughput.py", "--smoke", *extra],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # about 9 s; the benchmark's pieces have their own default-run tests
def test_gpu_benchmark_smoke_eager_bert_on_cpu() -> None:
    """Smoke test: the benchmark's BERT comparison runs with tiny sizes and prints its ratio, and beside it what
    each side computes."""
    out = _benchmark("--model", "bert", "--modes", "eager")
    assert out.count("ratio:") == 1 and "BERT-tiny seq 16 eager: ours" in out
    assert "masked rows + [CLS] only, a real saving" in out
    assert "head and last block on all 16 positions" in out


@pytest.mark.slow
def test_gpu_benchmark_smoke_all_rows_on_cpu() -> None:
    """Smoke test: both comparisons, eager and compiled (the "eager" compile backend on CPU)."""
    assert _benchmark().count("ratio:") == 4


def test_compile_switch_of_the_contrastive_systems_compiles_every_block_in_place() -> None:
    from lightning_modules.components.image_tower import ImageTowerConfig
    from lightning_modules.components.text_tower import TextTowerConfig
    from lightning_modules.image_text_module import ImageTextModule

    def build(compile: bool) -> ImageTextModule:
        image = ImageTowerConfig("vit_custom", 32, patch_size=16, layers=2, width=32, heads=2, mlp_dim=64)
        return ImageTextModule(
            vocab_size=100, embed_dim=16, image=image, text=TextTowerConfig("tiny"), compile=compile
        )

    compiled, eager = build(True), build(False)
    compiled.configure_model()
    eager.configure_model()
    blocks = shard_units(compiled)
    assert len(blocks) == 4  # two ViT blocks, two text blocks
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert all(b._compiled_call_impl is None for b in shard_units(eager))
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and exports unchanged


def test_nonfinite_rows_are_read_at_logging_steps_and_at_the_end(tmp_path: Path) -> None:
    """Between logging steps the skips are only counted on the device; the run stops at the next read, here the
    end of training, naming the longest row, and no NaN step updated the weights."""
    from lightning_modules.training.nonfinite import NonFiniteLossError

    model = tiny_mlm(NaNAtCalls, nan_calls=set(range(1, 10)), max_nonfinite_in_row=3)
    t = quiet_trainer(max_steps=10, log_every_n_steps=50, limit_val_batches=0, default_root_dir=tmp_path)
    with pytest.raises(NonFiniteLossError, match="NaN or Inf 9 steps in a row"):
        t.fit(model, loader(RandomMLMBatches()))
    p = next(model.parameters())
    assert t.optimizers[0].state[p]["step"].item() == 1  # the first, finite step only
    assert all(torch.isfinite(q).all() for q in model.parameters())
