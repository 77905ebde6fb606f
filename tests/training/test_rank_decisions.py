"""Decisions every rank must take alike on the multi-GPU path, checked on CPU with the CUDA-only parts stood in for:
the preemption checkpoint on the same all-reduced flags at the same step whatever each rank's CUDA event answers,
FSDP1's clipping by norm through its root, and DeepSpeed's own skip of non-finite steps (or a one-line refusal).
"""

from __future__ import annotations

import os
import signal
import sys
import types
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.plugins.precision import FSDPPrecision
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from torch.distributed.fsdp import FullyShardedDataParallel

from lightning_modules.training import nonfinite, preemption
from lightning_modules.training.nonfinite import SkipNonFiniteSteps, deepspeed_skips_nonfinite
from lightning_modules.training.preemption import PreemptionCheckpoint
from lightning_modules.training.strategies import BlockFSDPStrategy
from tests.helpers import REPO, free_port, quiet_trainer


class TinySystem(SkipNonFiniteSteps):
    """The per-step bookkeeping of every system (`reduce_step`, the flags, the non-finite skip, fused AdamW)
    around one linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.model(x), y)
        self.log("train/loss", self.rank_means(loss, loss=loss)["loss"])
        return self.skip_if_nonfinite(loss)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-2, fused=True)


def _data(n: int = 32) -> torch.utils.data.DataLoader:
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g))
    return torch.utils.data.DataLoader(data, batch_size=4)


# preemption: the same decision on every rank --------------------------------------------------------


class FakeEvent:
    """Stands in for the CUDA event of a flags copy: `query()` answers what this rank's timing would say (the
    answers of `landed`, in turn), `synchronize()` is counted."""

    def __init__(self, landed: list[bool]) -> None:
        self.landed, self.queries, self.synchronized = landed, 0, 0

    def query(self) -> bool:
        self.queries += 1
        return self.landed[(self.queries - 1) % len(self.landed)]

    def synchronize(self) -> None:
        self.synchronized += 1


class FakeCopies:
    """`copy_to_host` as on a GPU: every step's flags come with an event that answers `landed`."""

    def __init__(self, landed: list[bool]) -> None:
        self.landed = landed
        self.events: list[FakeEvent] = []

    def __call__(self, flags: torch.Tensor) -> tuple[torch.Tensor, FakeEvent]:
        self.events.append(FakeEvent(self.landed))
        return flags.clone(), self.events[-1]


def _rank_trainer(root: Path, rank: int) -> SimpleNamespace:
    """What `PreemptionCheckpoint.on_train_batch_end` reads of a trainer, and a save that records its step."""
    t = SimpleNamespace(
        checkpoint_callback=None,
        default_root_dir=str(root),
        global_step=0,
        global_rank=rank,
        is_global_zero=rank == 0,
        world_size=2,
        received_sigterm=False,
        saved=[],
    )
    t.save_checkpoint = lambda path: t.saved.append((t.global_step, Path(path)))
    return t


# each rank's events: landed on one rank only, never (the host runs ahead), every other query
TIMINGS = {
    "rank0-landed": ([True], [False]),
    "rank1-landed": ([False], [True]),
    "host-ahead": ([False], [False]),
    "flickering": ([True, False], [False, True]),
}


@pytest.mark.parametrize("timing", TIMINGS)
def test_every_rank_saves_at_the_same_step_whatever_its_events_answer(
    tmp_path: Path, monkeypatch, timing: str
) -> None:
    """Two ranks get the same all-reduced flags each step (SIGTERM on some rank from step 3 on) with events that
    answer differently per rank and per call: both write the checkpoint at the end of step 4, on step 3's
    values, and stop; neither asks its event."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    copies = [FakeCopies(landed) for landed in TIMINGS[timing]]
    callbacks, trainers = [PreemptionCheckpoint(), PreemptionCheckpoint()], []
    for rank in (0, 1):
        trainers.append(_rank_trainer(tmp_path, rank))
    stopped: dict[int, int] = {}
    for step in range(8):
        flags = torch.tensor([float(step >= 3), 0.0])  # the all-reduced (SIGTERM, requeue) of this step
        for rank in (0, 1):
            if rank in stopped:
                continue
            monkeypatch.setattr(preemption, "copy_to_host", copies[rank])
            callbacks[rank].receive_step_flags(flags)
            try:
                callbacks[rank].on_train_batch_end(trainers[rank], None)
            except SIGTERMException:
                stopped[rank] = step
            trainers[rank].global_step += 1
    assert stopped == {0: 4, 1: 4}
    last = tmp_path / "checkpoints/last.ckpt"
    assert trainers[0].saved == trainers[1].saved == [(4, last)]
    for rank in (0, 1):
        events = copies[rank].events
        assert sum(e.queries for e in events) == 0
        # each batch end waits on the step before's copy: steps 0..3 were waited on, step 4's never read
        assert [e.synchronized for e in events] == [1, 1, 1, 1, 0]


class SignalAt(L.Callback):
    """SIGTERM to this process at the start of one training step, as a preemption sends it."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_gpu_flags_are_acted_on_one_step_later_even_when_the_host_runs_ahead(
    tmp_path: Path, monkeypatch
) -> None:
    """A training run whose flags take the GPU path (copies whose events never say landed, as for a host that
    keeps running ahead of the device): SIGTERM at step 2 is saved at the end of step 3, on step 2's flags."""
    copies = FakeCopies([False])
    monkeypatch.setattr(preemption, "copy_to_host", copies)
    preempted = PreemptionCheckpoint(requeue=False)
    t = quiet_trainer(
        max_steps=8,
        default_root_dir=tmp_path,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[preempted, SignalAt(2)],
    )
    with pytest.raises(SIGTERMException):
        t.fit(TinySystem(), _data())
    assert preempted.saved_path == tmp_path / "checkpoints/last.ckpt"
    assert torch.load(preempted.saved_path, weights_only=True)["global_step"] == 4
    assert [e.synchronized for e in copies.events] == [1, 1, 1, 0]
    assert sum(e.queries for e in copies.events) == 0


def _rank_with_events(rank: int, root: str, port: int) -> None:
    """One rank of a 2-process gloo run whose flags take the GPU path: rank 0's events always say landed, rank
    1's never; only rank 1 receives SIGTERM."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    os.environ.pop("SLURM_JOB_ID", None)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    preemption.copy_to_host = FakeCopies([rank == 0])

    class SignalRankOne(SignalAt):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if trainer.global_rank == 1:
                super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    folder = Path(root)
    t = quiet_trainer(
        max_steps=8,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        default_root_dir=folder,
        limit_val_batches=0,
        enable_checkpointing=False,
        callbacks=[PreemptionCheckpoint(), SignalRankOne(1)],
    )
    try:
        t.fit(TinySystem(), _data(64))
    except SIGTERMException:
        (folder / f"stopped{rank}").write_text(str(t.global_step))


@pytest.mark.slow  # two fresh processes; the two-rank decision is checked in the default run without them
def test_two_ranks_with_different_event_timings_save_together(tmp_path: Path) -> None:
    """Two DDP ranks (gloo) whose events answer oppositely: both save at the same step, one checkpoint, and
    stop; a rank that saved alone would wait in the collective save until the test's timeout."""
    torch.multiprocessing.spawn(_rank_with_events, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    assert [(tmp_path / f"stopped{r}").read_text() for r in (0, 1)] == ["3", "3"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


# FSDP1 clipping by norm ----------------------------------------------------------------------------


def _composed(*configs: str) -> dict:
    """The trainer sections of config files merged in order, as `--config a --config b` composes them."""
    trainer: dict = {}
    for name in configs:
        trainer.update(yaml.safe_load((REPO / name).read_text())["trainer"])
    return trainer


def _attached(system: L.LightningModule, strategy, precision, clip_val: float, algorithm: str) -> None:
    """What the clipping hook reads of a trainer, on a system that has taken a backward step."""
    system._trainer = SimpleNamespace(
        strategy=strategy,
        precision_plugin=precision,
        gradient_clip_val=clip_val,
        gradient_clip_algorithm=GradClipAlgorithmType(algorithm),
    )
    torch.manual_seed(0)
    x = torch.randn(8, 4)
    (system.model(x).pow(2).sum() * 100).backward()  # gradients far above norm 1 and value 1


def test_fsdp1_with_bert_bases_clipping_clips_through_the_fsdp_root() -> None:
    """configs/strategy/fsdp.yaml composed with configs/mlm/bert_base.yaml (clips at 1.0 by norm): the system's
    clipping hook calls the FSDP root's `clip_grad_norm_` (the norm over every rank's shards), and no
    rank-local clipping besides. FSDP1 itself refuses CPU: its root is a mock of FullyShardedDataParallel."""
    trainer = _composed("configs/mlm/bert_base.yaml", "configs/strategy/fsdp.yaml")
    spec = trainer["strategy"]
    assert spec["class_path"] == "lightning_modules.training.strategies.BlockFSDPStrategy"
    strategy = BlockFSDPStrategy(**spec["init_args"])
    system = TinySystem()
    strategy.model = root = mock.Mock(spec=FullyShardedDataParallel)
    clip_val = trainer["gradient_clip_val"]
    assert clip_val == 1.0
    _attached(system, strategy, FSDPPrecision(trainer["precision"]), clip_val, "norm")
    before = [p.grad.clone() for p in system.parameters()]
    optimizer = system.configure_optimizers()
    system.configure_gradient_clipping(optimizer, clip_val, GradClipAlgorithmType.NORM)
    root.clip_grad_norm_.assert_called_once_with(1.0)
    for p, g in zip(system.parameters(), before):
        assert torch.equal(p.grad, g)  # the root clips; nothing else touched the gradients


def test_fsdp1_clipping_by_value_stays_with_lightning_and_a_rootless_model_is_refused() -> None:
    """Clipping by value is elementwise, right on shards: Lightning's own path clips each gradient to +-0.5.
    Clipping by norm without one FSDP root is refused in one line."""
    strategy = BlockFSDPStrategy()
    system = TinySystem()
    strategy.model = root = mock.Mock(spec=FullyShardedDataParallel)
    _attached(system, strategy, FSDPPrecision("bf16-mixed"), 0.5, "value")
    system.configure_gradient_clipping(system.configure_optimizers(), 0.5, GradClipAlgorithmType.VALUE)
    root.clip_grad_norm_.assert_not_called()
    grads = torch.cat([p.grad.flatten() for p in system.parameters()])
    assert grads.abs().max() == 0.5  # the largest gradients were far above 0.5

    strategy.model = torch.nn.Linear(4, 1)  # wrapped by hand elsewhere, or not at all
    _attached(system, strategy, FSDPPrecision("bf16-mixed"), 1.0, "norm")
    with pytest.raises(MisconfigurationException, match="needs the model wrapped in one FSDP root") as err:
        system.configure_gradient_clipping(system.configure_optimizers(), 1.0, GradClipAlgorithmType.NORM)
    assert "\n" not in str(err.value)


# DeepSpeed: its own skip of non-finite steps -------------------------------------------------------


@pytest.fixture
def deepspeed_strategy(monkeypatch):
    """Lightning's DeepSpeedStrategy built from configs/strategy/deepspeed.yaml, without DeepSpeed installed:
    its availability flags are set, and the one module attribute its constructor touches is stood in for."""
    import lightning.pytorch.strategies.deepspeed as lightning_deepspeed

    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_AVAILABLE", True)
    monkeypatch.setattr(lightning_deepspeed, "_DEEPSPEED_GREATER_EQUAL_0_16", True)
    stub = types.ModuleType("deepspeed")
    stub.utils = SimpleNamespace(logging=SimpleNamespace(logger=mock.Mock()))
    monkeypatch.setitem(sys.modules, "deepspeed", stub)
    spec = _composed("configs/strategy/deepspeed.yaml")["strategy"]
    return lambda **overrides: DeepSpeedStrategy(**{**spec["init_args"], **overrides})


@pytest.mark.parametrize(
    ("precision", "stage", "version", "bf16_section"),
    [
        ("16-mixed", 2, "0.16.0", None),  # fp16's loss scaler skips at every stage
        ("16-mixed", 3, "0.19.8", None),
        ("bf16-mixed", 2, "0.19.8", {"enabled": True, "check_grad_overflow": True}),
        ("bf16-mixed", 1, "0.17.1", {"enabled": True, "check_grad_overflow": True}),
    ],
)
def test_deepspeed_configs_whose_engine_skips_nonfinite_steps(
    deepspeed_strategy, precision: str, stage: int, version: str, bf16_section: dict | None
) -> None:
    strategy = deepspeed_strategy(stage=stage)
    config = strategy.config
    deepspeed_skips_nonfinite(config, precision, version)
    assert config.get("bf16") == bf16_section
    assert "fp16" not in config  # Lightning adds it itself for 16-mixed


@pytest.mark.parametrize(
    ("precision", "stage", "version", "bf16"),
    [
        ("32-true", 2, "0.19.8", None),  # no overflow check in fp32
        ("bf16-mixed", 3, "0.19.8", None),  # stage 3 checks fp16 only
        ("bf16-mixed", 0, "0.19.8", None),  # the BF16 optimizer does not skip
        ("bf16-mixed", 2, "0.16.9", None),  # no bf16.check_grad_overflow yet
        ("bf16-mixed", 2, "0.19.8", {"enabled": True, "check_grad_overflow": False}),  # turned off
    ],
)
def test_deepspeed_configs_that_would_apply_a_nonfinite_step_are_refused_in_one_line(
    deepspeed_strategy, precision: str, stage: int, version: str, bf16: dict | None
) -> None:
    strategy = deepspeed_strategy(stage=stage)
    if bf16 is not None:
        strategy.config["bf16"] = bf16
    with pytest.raises(
        MisconfigurationException, match="would apply an optimizer step whose gradients"
    ) as err:
        deepspeed_skips_nonfinite(strategy.config, precision, version)
    assert "\n" not in str(err.value) and f"ZeRO stage {stage}" in str(err.value)


def test_deepspeed_check_runs_when_the_system_is_configured_for_fit(deepspeed_strategy, monkeypatch) -> None:
    """`configure_model` (before Lightning builds the engine from the config) sets or refuses, for `fit` only."""
    monkeypatch.setattr(nonfinite, "installed_version", lambda name: "0.19.8")
    system = TinySystem()
    for precision, fn in (("32-true", TrainerFn.VALIDATING), ("bf16-mixed", TrainerFn.FITTING)):
        strategy = deepspeed_strategy()
        system._trainer = SimpleNamespace(
            strategy=strategy,
            precision_plugin=SimpleNamespace(precision=precision),
            state=SimpleNamespace(fn=fn),
        )
        system.configure_model()
    assert strategy.config["bf16"] == {"enabled": True, "check_grad_overflow": True}
    system._trainer.strategy = deepspeed_strategy()
    system._trainer.precision_plugin.precision = "32-true"
    with pytest.raises(MisconfigurationException, match="precision 32-true"):
        system.configure_model()


class NoHostRead(torch.Tensor):
    """A device flag that fails the test when read on the host."""

    def __bool__(self) -> bool:
        raise AssertionError("the non-finite flag was read on the host")


def test_deepspeed_engine_steps_every_step_and_the_flag_stays_on_the_device(deepspeed_strategy) -> None:
    """A step flagged non-finite under DeepSpeed still runs the engine's step (its own overflow check skips the
    update and keeps its micro-step count), and the flag is never read on the host."""
    system = TinySystem()
    system._trainer = SimpleNamespace(strategy=deepspeed_strategy())
    engine_step = mock.Mock()
    zero_optimizer = SimpleNamespace(optimizer=object())  # Lightning's wrapper around DeepSpeed's optimizer
    for bad in (True, False):
        system._bad_pending = torch.tensor(bad).as_subclass(NoHostRead)
        assert system.step_unless_nonfinite(zero_optimizer, engine_step) is True
    assert engine_step.call_count == 2
