"""Surviving long runs: non-finite losses skipped and counted, SIGTERM writes a last checkpoint that resumes
exactly, a kill in the middle of a checkpoint write leaves the previous one loadable, torch.compile, FSDP set-up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import Dataset

from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule
from lightning_modules.training import preemption
from lightning_modules.training.checkpoint_io import (
    AtomicCheckpointIO,
    AtomicCheckpoints,
    remove_stale_temporaries,
)
from lightning_modules.training.nonfinite import NonFiniteLossError
from lightning_modules.training.preemption import PreemptionCheckpoint, signal_named, slurm_requeue_target
from tests.builders.mlm import NaNAtCalls, NaNOutputs, RandomMLMBatches, loader, tiny_mlm
from tests.helpers import REPO, free_port, quiet_trainer


def trainer(root: Path, **kwargs) -> L.Trainer:
    defaults = dict(devices=1, default_root_dir=root, limit_val_batches=0, deterministic=True)
    return quiet_trainer(**{**defaults, **kwargs})


# non-finite losses ---------------------------------------------------------------------------------


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
        trainer(tmp_path, max_steps=10, log_every_n_steps=1).fit(model, loader(RandomMLMBatches()))


class NaNOnRankOne(MLMPretrainingModule):
    """Rank 1's second training call gives NaN; rank 0's losses stay finite."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.model.pretraining_outputs = NaNOutputs(self, {1}, rank=1)


@pytest.mark.slow  # about 8 s; test_rank_decisions checks the shared decision with fake collectives in the default run
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


class SignalAt(L.Callback):
    """Sends a signal to this process at the start of one training step, as SLURM does on preemption (SIGTERM) or
    before the time limit (the sbatch --signal)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


class RecordIndices(L.Callback):
    def __init__(self) -> None:
        self.seen: list[list[int]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.seen.append(batch["index"].tolist())


@pytest.fixture
def scontrol(monkeypatch) -> list[list[str]]:
    """A SLURM job's environment, and the commands PreemptionCheckpoint runs instead of running them."""
    for name in ("SLURM_ARRAY_JOB_ID", "SLURM_ARRAY_TASK_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(list(cmd))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(preemption.subprocess, "run", run)
    return calls


def _checkpointing(root: Path, *extra: L.Callback) -> list[L.Callback]:
    ckpt = ModelCheckpoint(dirpath=root / "checkpoints", save_last=True, every_n_train_steps=100)
    return [ckpt, AtomicCheckpoints(), *extra]


def test_sigterm_writes_last_checkpoint_and_resume_is_exact(tmp_path: Path, scontrol) -> None:
    data = RandomMLMBatches()  # 48 samples, 12 batches an epoch: the signal comes mid-epoch
    steps = 8

    torch.manual_seed(0)
    reference = RecordIndices()
    unbroken = tiny_mlm()
    trainer(tmp_path / "u", max_steps=steps, callbacks=_checkpointing(tmp_path / "u", reference)).fit(
        unbroken, loader(data)
    )

    torch.manual_seed(0)
    first, preempted = RecordIndices(), PreemptionCheckpoint()
    t = trainer(
        tmp_path / "p",
        max_steps=steps,
        callbacks=_checkpointing(tmp_path / "p", first, preempted, SignalAt(3)),
    )
    with pytest.raises(SIGTERMException):
        t.fit(tiny_mlm(), loader(data))
    last = tmp_path / "p/checkpoints/last.ckpt"
    assert preempted.saved_path == last
    # the step under way when the signal came was finished, then saved, and the run stopped there
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 4
    assert len(first.seen) == 4
    # SIGTERM is scancel (or a preemption SLURM handles itself): no requeue
    assert scontrol == [] and preempted.requeued_job is None

    second = RecordIndices()
    resumed = tiny_mlm()
    trainer(tmp_path / "p", max_steps=steps, callbacks=_checkpointing(tmp_path / "p", second)).fit(
        resumed, loader(data), ckpt_path="last"
    )
    assert first.seen + second.seen == reference.seen  # no batch replayed, none skipped
    for name, a in unbroken.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], a, msg=name)


class SignalAfterFlags(L.Callback):
    """Sends a signal to this process (on one rank) at one step, after the training step took its flags, at the
    optimizer step: on a GPU the signal nearly always lands there, as the host runs ahead of the device."""

    def __init__(self, step: int, rank: int = 0) -> None:
        self.step, self.rank = step, rank

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_after_the_steps_flags_is_saved_at_the_next_step(tmp_path: Path) -> None:
    """Lightning's own handling stopped this run at the end of the batch, without the checkpoint."""
    before = signal.getsignal(signal.SIGTERM)
    preempted = PreemptionCheckpoint()
    t = trainer(tmp_path, max_steps=8, callbacks=_checkpointing(tmp_path, preempted, SignalAfterFlags(3)))
    with pytest.raises(SIGTERMException):
        t.fit(tiny_mlm(), loader(RandomMLMBatches()))
    assert preempted.saved_path == tmp_path / "checkpoints/last.ckpt"
    assert torch.load(preempted.saved_path, weights_only=True)["global_step"] == 5
    assert signal.getsignal(signal.SIGTERM) == before
    assert "_broadcast_sigterm_tensor" not in vars(t.fit_loop.epoch_loop)  # Lightning's own is back


def _sigterm_rank(rank: int, root: str, port: int) -> None:
    """One rank of a 2-process DDP run (strategy ddp, the processes started here as torchrun would)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2")
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), NODE_RANK="0")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    folder = Path(root)
    t = trainer(
        folder,
        max_steps=8,
        strategy="ddp",
        devices=2,
        accelerator="cpu",
        callbacks=_checkpointing(folder, PreemptionCheckpoint(), SignalAfterFlags(1, rank=1)),
    )
    try:
        t.fit(tiny_mlm(), torch.utils.data.DataLoader(RandomMLMBatches(32, nsp=True), batch_size=4))
    except SIGTERMException:
        (folder / f"stopped{rank}").write_text(str(t.global_step))


@pytest.mark.slow  # two fresh processes: 20 s here; the single-process case above stays in the default run
def test_sigterm_on_one_rank_stops_every_rank_with_one_checkpoint(tmp_path: Path) -> None:
    """Under DDP only rank 1 receives the signal, after its step's flags were taken: both ranks save together at
    the next step (a collective save) and stop. Lightning's handler would broadcast from inside the signal
    handler, and its per-step broadcast reads only rank 0's flag."""
    torch.multiprocessing.spawn(_sigterm_rank, args=(str(tmp_path), free_port()), nprocs=2, join=True)
    assert [(tmp_path / f"stopped{r}").read_text() for r in (0, 1)] == ["3", "3"]
    assert torch.load(tmp_path / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 3


def test_requeue_signal_writes_last_checkpoint_and_requeues(tmp_path: Path, scontrol) -> None:
    before = signal.getsignal(signal.SIGUSR2)
    preempted = PreemptionCheckpoint(requeue_signal="USR2")  # as sbatch --signal=USR2@120 spells it
    t = trainer(
        tmp_path, max_steps=8, callbacks=_checkpointing(tmp_path, preempted, SignalAt(2, signal.SIGUSR2))
    )
    with pytest.raises(SIGTERMException):
        t.fit(tiny_mlm(), loader(RandomMLMBatches()))
    assert torch.load(preempted.saved_path, weights_only=True)["global_step"] == 3
    assert preempted.saved_path == tmp_path / "checkpoints/last.ckpt"
    assert scontrol == [["scontrol", "requeue", "4242"]] and preempted.requeued_job == "4242"
    # a run that ends normally gives the signal back to whoever had it
    t = trainer(tmp_path / "b", max_steps=1, callbacks=[PreemptionCheckpoint(requeue_signal="SIGUSR2")])
    t.fit(tiny_mlm(), loader(RandomMLMBatches(8)))
    assert signal.getsignal(signal.SIGUSR2) == before


def test_requeue_decision() -> None:
    usr1, term = signal.SIGUSR1, signal.SIGTERM
    job = {"SLURM_JOB_ID": "17"}
    assert slurm_requeue_target({usr1}, usr1, job) == "17"
    array = {**job, "SLURM_ARRAY_JOB_ID": "16", "SLURM_ARRAY_TASK_ID": "3"}
    assert slurm_requeue_target({usr1}, usr1, array) == "16_3"  # scontrol wants the array task, not its id
    assert slurm_requeue_target({term}, usr1, job) is None  # scancel, or a preemption without --signal
    assert slurm_requeue_target({usr1, term}, usr1, job) is None  # cancelled after the warning: no requeue
    assert slurm_requeue_target({signal.SIGUSR2}, usr1, job) is None  # not the signal the job asked for
    assert slurm_requeue_target({usr1}, None, job) is None  # requeue switched off
    assert slurm_requeue_target({usr1}, usr1, {}) is None  # not a SLURM job
    assert signal_named("usr1") == signal_named("SIGUSR1") == usr1
    # the signal comes from Lightning's SLURMEnvironment when the strategy has one, else from the callback
    callback = PreemptionCheckpoint(requeue_signal="USR1")
    single = SimpleNamespace(strategy=SimpleNamespace())
    assert callback.requeue_signal_for(single) == usr1
    slurm = SLURMEnvironment(requeue_signal=signal.SIGUSR2)
    assert (
        callback.requeue_signal_for(SimpleNamespace(strategy=SimpleNamespace(cluster_environment=slurm)))
        == signal.SIGUSR2
    )
    slurm = SLURMEnvironment(auto_requeue=False)
    assert (
        callback.requeue_signal_for(SimpleNamespace(strategy=SimpleNamespace(cluster_environment=slurm)))
        is None
    )
    assert PreemptionCheckpoint(requeue=False).requeue_signal_for(single) is None
    with pytest.raises(ValueError, match="'USR9' is no signal of this system; use the name of sbatch's"):
        PreemptionCheckpoint(requeue_signal="USR9")


# atomic checkpoints --------------------------------------------------------------------------------

KILL_DURING_WRITE = """
import io, os, signal, sys
import torch
from lightning.fabric.plugins.io import torch_io
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO

path, atomic = sys.argv[1], sys.argv[2] == "atomic"
writer = AtomicCheckpointIO() if atomic else TorchCheckpointIO()
writer.save_checkpoint({"step": torch.tensor(1), "weights": torch.ones(1000)}, path)

def half_then_die(checkpoint, f):
    # half of the serialised checkpoint reaches the file, then the process is killed as by the OOM killer
    buffer = io.BytesIO()
    real_save(checkpoint, buffer)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def plain_half_then_die(checkpoint, filepath):
    with open(filepath, "wb") as f:
        half_then_die(checkpoint, f)

real_save = torch.save
if atomic:
    torch.save = half_then_die  # AtomicCheckpointIO serialises straight into its open temporary file
else:
    torch_io._atomic_save = plain_half_then_die
writer.save_checkpoint({"step": torch.tensor(2), "weights": torch.zeros(1000)}, path)
"""


@pytest.mark.parametrize("atomic", [True, False])
def test_kill_during_checkpoint_write(tmp_path: Path, atomic: bool) -> None:
    path = tmp_path / "last.ckpt"
    script = tmp_path / "write.py"
    script.write_text(textwrap.dedent(KILL_DURING_WRITE))
    mode = "atomic" if atomic else "plain"
    child = subprocess.Popen(
        [sys.executable, str(script), str(path), mode],
        cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        stderr=subprocess.PIPE,
    )
    _, err = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, err.decode()[-2000:]
    if atomic:
        # the previous checkpoint is whole; the half-written temporary file is beside it, never over it
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert state["step"].item() == 1 and state["weights"].sum().item() == 1000
        leftover = tmp_path / f".last.ckpt.tmp-{socket.gethostname()}-{child.pid}"
        assert sorted(p.name for p in tmp_path.glob(".*")) == [leftover.name]
        # the writer is dead (and reaped): the next start removes its leftover, and nothing else
        assert remove_stale_temporaries(tmp_path) == [leftover]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt", "write.py"]
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


def _dead_pid() -> int:
    """The pid of a child that has exited and been reaped: no process has it (until the system reuses it)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_start_removes_only_dead_writers_temporaries_of_this_host(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    host = socket.gethostname()
    dead = folder / f".last.ckpt.tmp-{host}-{_dead_pid()}"
    live = folder / f".latest-step=4.ckpt.tmp-{host}-{os.getpid()}"  # a writer of this run at work
    other_host = folder / f".last.ckpt.tmp-{host}x-{_dead_pid()}"  # its pids are not ours to look up
    users = [folder / "notes.tmp-1", folder / f"last.ckpt.tmp-{host}-{_dead_pid()}", folder / "mine.ckpt"]
    for path in (dead, live, other_host, *users):
        path.write_bytes(b"x" * 100)
    a_folder = folder / f".dir.tmp-{host}-{_dead_pid()}"  # the pattern, but a folder: not a file we wrote
    a_folder.mkdir()

    t = trainer(
        tmp_path,
        max_steps=1,
        callbacks=[ModelCheckpoint(dirpath=folder, save_top_k=0, save_last=True), AtomicCheckpoints()],
    )
    t.fit(tiny_mlm(), loader(RandomMLMBatches(8)))
    assert not dead.exists()
    assert all(p.is_file() for p in (live, other_host, *users)) and a_folder.is_dir()
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 1  # then written as usual


def test_checkpoint_is_written_in_its_folder_not_in_tmpdir(tmp_path: Path, monkeypatch) -> None:
    """Lightning's own writer goes through a temporary file of `$TMPDIR` (fsspec's transaction): the spy
    sees it. The atomic writer creates nothing there."""
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmpdir))
    monkeypatch.setattr(tempfile, "tempdir", None)  # gettempdir() reads TMPDIR again
    made: list[str] = []
    real_mkstemp = tempfile.mkstemp

    def spy(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        made.append(name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    checkpoint = {"step": torch.tensor(7), "weights": torch.arange(10.0)}
    TorchCheckpointIO().save_checkpoint(checkpoint, tmp_path / "plain.ckpt")
    assert made and all(Path(name).parent == tmpdir for name in made)  # the spy works
    made.clear()

    t = trainer(
        tmp_path / "run",
        max_steps=2,
        callbacks=[
            ModelCheckpoint(dirpath=tmp_path / "run/checkpoints", save_last=True, every_n_train_steps=1),
            AtomicCheckpoints(),
        ],
    )
    t.fit(tiny_mlm(), loader(RandomMLMBatches(8)))
    assert made == [] and list(tmpdir.iterdir()) == []
    state = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert state["global_step"] == 2
    assert not list((tmp_path / "run/checkpoints").glob(".*"))  # no temporary file left behind


# torch.compile -------------------------------------------------------------------------------------


# aot_eager traces with dynamo and AOT autograd as inductor does, without generating and compiling C++: the
# default run checks graph capture, gradients and training in seconds; inductor's codegen (minutes on 2 cold
# cores) runs with the slow tests
@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_mlm_matches_eager_and_trains(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str
) -> None:
    if backend != "inductor":
        compile_module = torch.nn.Module.compile
        monkeypatch.setattr(
            torch.nn.Module,
            "compile",
            lambda self, *a, **kw: compile_module(self, *a, **{**kw, "backend": backend}),
        )
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
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # dynamo captured the encoder
    # inductor fuses and reorders the float ops: compiled and eager differ by reassociation
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
    from lightning_modules.training.strategies import BlockFSDPStrategy

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
