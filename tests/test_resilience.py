"""Surviving long runs: non-finite losses skipped and counted, SIGTERM writes a last checkpoint that resumes
exactly, a kill in the middle of a checkpoint write leaves the previous one loadable, torch.compile, FSDP set-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset

from datamodules.loading import ResumableDataLoader, ResumableSampler
from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule
from lightning_modules.resilience import (
    AtomicCheckpointIO,
    AtomicCheckpoints,
    NonFiniteLossError,
    PreemptionCheckpoint,
)
from tests.helpers import quiet_trainer

REPO = Path(__file__).resolve().parents[1]
VOCAB, LENGTH = 64, 16


class RandomMLMBatches(Dataset):
    """Fixed random token sequences with 15% of positions to predict: enough for a model to take steps."""

    def __init__(self, n: int = 48, seed: int = 0, nsp: bool = False) -> None:
        self.nsp = nsp
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
        self.chosen = torch.rand(n, LENGTH, generator=g) < 0.15
        self.chosen[:, 1] = True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = torch.where(self.chosen[i], self.ids[i], IGNORE_INDEX)
        nsp = {"nsp_labels": torch.tensor(i % 2)} if self.nsp else {}
        return nsp | {
            "input_ids": torch.where(self.chosen[i], 4, self.ids[i]),
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "token_type_ids": torch.zeros(LENGTH, dtype=torch.long),
            "labels": labels,
            "index": i,
        }


def tiny_mlm(cls: type = MLMPretrainingModule, **kwargs) -> MLMPretrainingModule:
    defaults = dict(
        size="tiny",
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
        lr=1e-3,
        warmup_steps=0,
        schedule="constant",
    )
    return cls(**{**defaults, **kwargs})


def loader(dataset: Dataset, batch_size: int = 4) -> ResumableDataLoader:
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size)


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(devices=1, default_root_dir=root, limit_val_batches=0, deterministic=True)
    return quiet_trainer(**{**defaults, **kwargs})


# non-finite losses ---------------------------------------------------------------------------------


class NaNAtCalls(MLMPretrainingModule):
    """Turns the loss of chosen training calls (counted from 0) into NaN, as a bad batch would."""

    def __init__(self, nan_calls: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.nan_calls = nan_calls

    def model_step(self, batch, stage):
        loss = super().model_step(batch, stage)
        if stage == "train":
            self.calls = getattr(self, "calls", -1) + 1
            if self.calls in self.nan_calls:
                loss = loss * float("nan")
        return loss


class Subset(Dataset):
    def __init__(self, batches: list[dict]) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict:
        return self.batches[i]


def _collated_batches(n: int) -> list[dict]:
    data = RandomMLMBatches(n * 4)
    return [torch.utils.data.default_collate([data[4 * k + j] for j in range(4)]) for k in range(n)]


def test_nan_loss_skips_the_step_and_is_counted(tmp_path: Path) -> None:
    """A run whose batches 2 and 3 give NaN ends with exactly the weights of a run that never saw them."""
    torch.manual_seed(0)
    batches = _collated_batches(6)
    flaky = tiny_mlm(NaNAtCalls, nan_calls={2, 3}, dropout=0.0, attention_dropout=0.0)
    clean = tiny_mlm(dropout=0.0, attention_dropout=0.0)
    clean.load_state_dict(flaky.state_dict())

    t = trainer(tmp_path / "a", max_epochs=1)
    # batch_size=None: the dataset already yields whole batches, in order
    t.fit(flaky, torch.utils.data.DataLoader(Subset(batches), batch_size=None))
    # Lightning counts 6 loop steps; the optimizer updated the weights 4 times (no gradient, no update)
    p = next(flaky.parameters())
    assert t.optimizers[0].state[p]["step"].item() == 4
    assert t.callback_metrics["train/nonfinite_skipped"].item() == 2
    kept = [b for k, b in enumerate(batches) if k not in (2, 3)]
    trainer(tmp_path / "b", max_epochs=1).fit(
        clean, torch.utils.data.DataLoader(Subset(kept), batch_size=None)
    )
    for (name, a), b in zip(flaky.state_dict().items(), clean.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
        assert torch.isfinite(a).all(), name


def test_nan_losses_in_a_row_stop_the_run_with_a_message(tmp_path: Path) -> None:
    model = tiny_mlm(NaNAtCalls, nan_calls={1, 2, 3, 4, 5}, max_nonfinite_in_row=3)
    with pytest.raises(NonFiniteLossError, match="NaN or Inf 3 steps in a row"):
        trainer(tmp_path, max_steps=10).fit(model, loader(RandomMLMBatches()))


class NaNOnRankOne(MLMPretrainingModule):
    """Rank 1's second training call gives NaN; rank 0's losses stay finite."""

    def model_step(self, batch, stage):
        loss = super().model_step(batch, stage)
        if stage == "train":
            self.calls = getattr(self, "calls", -1) + 1
            if self.global_rank == 1 and self.calls == 1:
                loss = loss * float("nan")
        return loss


def test_nan_on_one_rank_skips_the_step_on_every_rank(tmp_path: Path) -> None:
    """Under DDP the decision is all-reduced: rank 0 skips too (a rank skipping alone would leave the other in the
    gradient all-reduce for ever), and training goes on."""
    torch.manual_seed(0)
    model = tiny_mlm(NaNOnRankOne)
    initial = {name: p.clone() for name, p in model.state_dict().items()}
    t = trainer(tmp_path, max_steps=4, strategy="ddp_spawn", devices=2)
    # NSP labels: DDP wants a gradient for every parameter, the NSP head's included
    t.fit(model, torch.utils.data.DataLoader(RandomMLMBatches(32, nsp=True), batch_size=4))
    # callback_metrics come back from rank 0, whose own losses were all finite
    assert t.callback_metrics["train/nonfinite_skipped"].item() == 1
    # the weights come back from rank 0: finite, and trained by the three other steps
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert any(not torch.equal(p, initial[name]) for name, p in model.state_dict().items())


# preemption ----------------------------------------------------------------------------------------


class SigtermAt(L.Callback):
    """Sends SIGTERM to this process at the start of one training step, as SLURM does on preemption."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordIndices(L.Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(batch["index"].tolist())


def test_sigterm_writes_last_checkpoint_and_resume_is_exact(tmp_path: Path) -> None:
    data = RandomMLMBatches()  # 48 samples, 12 batches an epoch: the signal comes mid-epoch
    steps = 8

    def callbacks(root: Path, *extra: L.Callback) -> list[L.Callback]:
        ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=100)
        return [ckpt, AtomicCheckpoints(), *extra]

    torch.manual_seed(0)
    reference = RecordIndices()
    unbroken = tiny_mlm()
    trainer(tmp_path / "u", max_steps=steps, callbacks=callbacks(tmp_path / "u", reference)).fit(
        unbroken, loader(data)
    )

    torch.manual_seed(0)
    first, preempted = RecordIndices(), PreemptionCheckpoint()
    t = trainer(
        tmp_path / "p", max_steps=steps, callbacks=callbacks(tmp_path / "p", first, preempted, SigtermAt(3))
    )
    with pytest.raises(SIGTERMException):
        t.fit(tiny_mlm(), loader(data))
    last = tmp_path / "p/checkpoints/last.ckpt"
    assert preempted.saved_path == last
    # the step under way when the signal came was finished, then saved, and the run stopped there
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert len(first.seen) == 4

    second = RecordIndices()
    resumed = tiny_mlm()
    trainer(tmp_path / "p", max_steps=steps, callbacks=callbacks(tmp_path / "p", second)).fit(
        resumed, loader(data), ckpt_path="last"
    )
    assert first.seen + second.seen == reference.seen  # no batch replayed, none skipped
    for name, a in unbroken.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], a, msg=name)


# atomic checkpoints --------------------------------------------------------------------------------

KILL_DURING_WRITE = """
import os, signal, sys
import torch
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_modules.resilience import AtomicCheckpointIO

path, atomic = sys.argv[1], sys.argv[2] == "atomic"
io = AtomicCheckpointIO() if atomic else TorchCheckpointIO()
io.save_checkpoint({"step": torch.tensor(1), "weights": torch.ones(1000)}, path)

def write_half_then_die(checkpoint, filepath):
    # torch.save into memory, half of it onto the target, then the process is killed as by the OOM killer
    import io as _io
    buffer = _io.BytesIO()
    torch.save(checkpoint, buffer)
    with open(filepath, "wb") as f:
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

torch_io._atomic_save = write_half_then_die
io.save_checkpoint({"step": torch.tensor(2), "weights": torch.zeros(1000)}, path)
"""


@pytest.mark.parametrize("atomic", [True, False])
def test_kill_during_checkpoint_write(tmp_path: Path, atomic: bool) -> None:
    path = tmp_path / "last.ckpt"
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(KILL_DURING_WRITE))
    mode = "atomic" if atomic else "plain"
    result = subprocess.run(
        [sys.executable, str(script), str(path), mode],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        capture_output=True,
        timeout=120,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr.decode()[-2000:]
    if atomic:
        # the previous checkpoint is whole; the half-written temporary file is beside it, never over it
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["step"].item() == 1 and state["weights"].sum().item() == 1000
    else:  # what Lightning's plain writer leaves: the test above would catch it
        with pytest.raises(RuntimeError):
            torch.load(path, map_location="cpu", weights_only=True)


def test_atomic_checkpoints_replace_only_plain_torch_io(tmp_path: Path) -> None:
    t = trainer(tmp_path, max_steps=1, callbacks=[AtomicCheckpoints()])
    t.fit(tiny_mlm(), loader(RandomMLMBatches(8)))
    assert isinstance(t.strategy.checkpoint_io, AtomicCheckpointIO)
    t.save_checkpoint(tmp_path / "x.ckpt")
    assert torch.load(tmp_path / "x.ckpt", weights_only=True)["global_step"] == 1
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


# torch.compile -------------------------------------------------------------------------------------


def test_compiled_mlm_matches_eager_and_trains(tmp_path: Path) -> None:
    torch.manual_seed(0)
    eager = tiny_mlm(dropout=0.0, attention_dropout=0.0)
    compiled = tiny_mlm(dropout=0.0, attention_dropout=0.0, compile=True)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.state_dict().keys() == eager.state_dict().keys()  # checkpoints and HF export unchanged
    batch = torch.utils.data.default_collate([RandomMLMBatches()[i] for i in range(4)])
    for m in (eager, compiled):
        m.model_step(batch, "val")
    loss_e = eager.model_step(batch, "val")
    loss_c = compiled.model_step(batch, "val")
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-4, atol=1e-5)
    loss_e.backward()
    loss_c.backward()
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        if a.grad is None:  # the NSP pooler gets no gradient from a batch without NSP labels
            assert b.grad is None or not b.grad.any(), name
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-3, atol=1e-5, msg=name)
    t = trainer(tmp_path, max_steps=3)
    t.fit(compiled, loader(RandomMLMBatches(16)))
    assert t.global_step == 3


# FSDP ----------------------------------------------------------------------------------------------


def test_fsdp_strategy_wraps_and_checkpoints_each_block() -> None:
    """FSDP itself needs an accelerator (it refuses CPU), so the wrap policy and the activation checkpointing
    it applies are checked on the module tree here."""
    from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from lightning_modules.components.encoder import EncoderBlock
    from lightning_modules.strategies import BlockFSDPStrategy

    strategy = BlockFSDPStrategy(activation_checkpointing=True)
    model = tiny_mlm(num_layers=3, dropout=0.0, attention_dropout=0.0).model
    wrapped = strategy.kwargs["auto_wrap_policy"]._run_policy(model, set(), {})
    blocks = [m for m in wrapped if m is not model]
    assert len(blocks) == 3 and all(isinstance(m, EncoderBlock) for m in blocks)

    batch = torch.utils.data.default_collate([RandomMLMBatches()[i] for i in range(2)])
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["token_type_ids"],
        batch["labels"] != IGNORE_INDEX,
    )
    before = model(*args)[0]
    _setup_activation_checkpointing(model, strategy._activation_checkpointing_kwargs)
    checkpointed = [m for m in model.modules() if isinstance(m, CheckpointWrapper)]
    assert len(checkpointed) == 3
    assert all(isinstance(m._checkpoint_wrapped_module, EncoderBlock) for m in checkpointed)
    torch.testing.assert_close(model(*args)[0], before)
