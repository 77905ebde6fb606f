"""A last checkpoint before the job exits: `PreemptionCheckpoint` turns SIGTERM (`scancel`, preemption, eviction)
or SLURM's requeue signal into `last.ckpt` written by every rank at the same step, then stops the run and, after
the requeue signal only, requeues the SLURM job (`slurm_requeue_target`). The signal flags travel in the training
step's one all-reduce (`StepFlags`, lightning_modules/training/nonfinite.py) and reach the host without the device waiting
(`copy_to_host`)."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from lightning_modules.training.lightning_private import restore_sigterm_broadcast, silence_sigterm_broadcast
from lightning_modules.training.nonfinite import StepFlags, device_scalar

log = logging.getLogger(__name__)


def slurm_requeue_target(
    received: Collection[int], requeue_signal: int | None, env: Mapping[str, str]
) -> str | None:
    """The SLURM job id to requeue after the signals in `received`, or None.

    Only the signal the job asked for (`#SBATCH --signal=USR1@120` and `requeue_signal` SIGUSR1) requeues. A plain
    SIGTERM is `scancel`, or a preemption that SLURM itself requeues or cancels, so it never does, not even when it
    comes together with the requeue signal: cancelling wins."""
    job = env.get("SLURM_JOB_ID")
    if requeue_signal is None or not job or requeue_signal not in received or signal.SIGTERM in received:
        return None
    array_job, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    return f"{array_job}_{task}" if array_job and task else job


def copy_to_host(flags: Tensor) -> tuple[Tensor, Any]:
    """`flags` on their way to the host and the CUDA event that marks their arrival: a pinned copy made without
    waiting for the device. A CPU tensor is on the host already: itself, and no event."""
    if flags.device.type != "cuda":
        return flags, None
    host = torch.empty(flags.shape, dtype=flags.dtype, pin_memory=True)
    host.copy_(flags, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def signal_named(name: str) -> signal.Signals:
    """`SIGUSR1`, `USR1` (as sbatch --signal spells it) or `usr1` -> signal.SIGUSR1."""
    key = name.strip().upper()
    key = key if key.startswith("SIG") else f"SIG{key}"
    try:
        return signal.Signals[key]
    except KeyError:
        raise ValueError(
            f"PreemptionCheckpoint: requeue_signal {name!r} is no signal of this system; use the name of sbatch's "
            "--signal, e.g. USR1 or SIGUSR2"
        ) from None


class PreemptionCheckpoint(L.Callback, StepFlags):
    """On SIGTERM (`scancel`, preemption, Kubernetes eviction, `kill`) or on the SLURM requeue signal
    (`#SBATCH --signal=USR1@120`: the time limit is near), finish the current step, write `last.ckpt` and
    stop; after the requeue signal, and only then, also requeue the SLURM job. Resume with `fit ...
    --ckpt_path last`.

    Every rank takes the decision together, on the same all-reduced flags at the same step (a rank saving
    alone would wait forever in the collective save), and every rank stops by raising Lightning's
    `SIGTERMException`. On a GPU the flags of step k are read at the end of step k+1, when their copy to the
    host has long landed, so the device never waits for the host; on a CPU at the end of step k.

    The requeue signal is that of Lightning's `SLURMEnvironment` when the strategy has one, else
    `requeue_signal` here. This callback's handlers replace Lightning's for that signal and, while training,
    for SIGTERM: they only record the signal (and pass it on to the processes Lightning launched), the flag
    travels in the step's one all-reduce, and Lightning's per-step SIGTERM broadcast is switched off.
    Lightning's own handling would write `hpc_ckpt_*.ckpt` from inside the handler, mid-step, or stop without
    a checkpoint. A signal received during validation is acted on at the next training step
    (`docs/long-runs.md`)."""

    def __init__(
        self, requeue: bool = True, requeue_signal: str | None = "SIGUSR1", filename: str = "last.ckpt"
    ) -> None:
        """
        Args:
            requeue: under SLURM, run `scontrol requeue <job>` after the requeue signal, once `last.ckpt` is written.
            requeue_signal: the signal that asks for a requeue (the `--signal` of sbatch), when the strategy has no
                SLURMEnvironment to say it; None: no requeue signal.
            filename: checkpoint file name, in the first ModelCheckpoint's folder.
        """
        self.requeue = requeue
        self.requeue_signal = None if requeue_signal is None else signal_named(requeue_signal)
        self.filename = filename
        self.saved_path: Path | None = None
        self.requeued_job: str | None = None
        self._signum: int | None = None  # the requeue signal this run listens to
        self._requeue_received = False
        self._sigterm_received = False
        self._previous_handler: Any = None
        self._previous_sigterm_handler: Any = None
        self._trainer: L.Trainer | None = None
        self._step_flags: tuple[Tensor, Any] | None = None  # this step's, from its all-reduce (`reduce_step`)
        self._in_flight: tuple[Tensor, Any] | None = None  # the last step's, from the GPU

    def checkpoint_path(self, trainer: L.Trainer) -> Path:
        callback = trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) if callback is not None else None
        return Path(folder or Path(trainer.default_root_dir) / "checkpoints") / self.filename

    def requeue_signal_for(self, trainer: L.Trainer) -> int | None:
        """The signal that requeues the job: the SLURMEnvironment's when the strategy has one (multi-device
        strategies do), else this callback's `requeue_signal`; None when requeueing is off."""
        environment = getattr(trainer.strategy, "cluster_environment", None)
        if isinstance(environment, SLURMEnvironment):
            return environment.requeue_signal if self.requeue and environment.auto_requeue else None
        return self.requeue_signal if self.requeue else None

    def _on_requeue_signal(self, signum: int, frame: Any) -> None:
        self._requeue_received = True  # acted on after the step under way, never inside the handler

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # no collective and no Lightning flag here: Lightning's loops would stop this rank alone at the batch end
        launcher = getattr(self._trainer.strategy, "launcher", None) if self._trainer is not None else None
        if not self._sigterm_received and launcher is not None:
            launcher.kill(signum)  # the processes Lightning started get it too, as with Lightning's handler
        self._sigterm_received = True
        if signum == self._signum:
            self._requeue_received = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # after Lightning registered its handlers, so ours replace its SLURM and SIGTERM ones, and its signal
        # connector restores the handlers it found when the run ends, also when it ends with an exception
        self._requeue_received = self._sigterm_received = False
        self.saved_path = self.requeued_job = None
        self._step_flags = self._in_flight = None
        self._signum = self.requeue_signal_for(trainer)
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread: Lightning's stay
        self._trainer = trainer
        if self._signum is not None:
            self._previous_handler = signal.signal(self._signum, self._on_requeue_signal)
        self._previous_sigterm_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        # the flag rides in the step's all-reduce: Lightning's broadcast before every step is not needed
        silence_sigterm_broadcast(trainer)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self._restore(trainer)  # a run stopped by an exception (ours: SIGTERMException) has no teardown hook

    def _restore(self, trainer: L.Trainer) -> None:
        if threading.current_thread() is threading.main_thread():  # put back what Lightning has not put back
            if self._signum is not None and signal.getsignal(self._signum) == self._on_requeue_signal:
                signal.signal(self._signum, self._previous_handler)
            if signal.getsignal(signal.SIGTERM) == self._on_sigterm:
                signal.signal(signal.SIGTERM, self._previous_sigterm_handler)
        restore_sigterm_broadcast(trainer)
        self._previous_handler = self._previous_sigterm_handler = self._trainer = None

    def _received(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """This rank's (SIGTERM, requeue signal) so far; Lightning's SIGTERM flag where its handler stayed."""
        return self._sigterm_received or trainer.received_sigterm, self._requeue_received

    def local_step_flags(self, trainer: L.Trainer, device: torch.device) -> list[Tensor]:
        """This rank's (SIGTERM, requeue) flags, for the training step's all-reduce (`reduce_step`)."""
        return [device_scalar(float(on), device) for on in self._received(trainer)]

    def receive_step_flags(self, flags: Tensor) -> None:
        """The flags summed over ranks, still on the device: on a GPU copied to the host without waiting."""
        self._step_flags = copy_to_host(flags)

    def _flags(self, trainer: L.Trainer) -> Tensor | None:
        """The all-reduced flags this batch end acts on, the same on every rank at the same step, or None.

        A GPU step's flags are read at the next batch end, whatever their copy's event says now: every rank then
        waits on that copy, which has nearly always landed (a whole step was queued after it; a host further ahead
        waits while the device still has that step to run), and reads the same values. Asking the event whether
        the copy has landed would give each rank its own answer, and a rank that decides alone waits for ever in
        the collective checkpoint save."""
        step, self._step_flags = self._step_flags, None
        if step is None:  # a system without `reduce_step`: an all-reduce of its own, of every signal so far
            self._in_flight = None
            flags = torch.tensor([float(on) for on in self._received(trainer)])
            if trainer.world_size > 1:
                flags = trainer.strategy.reduce(flags.to(trainer.strategy.root_device), reduce_op="max").cpu()
            return flags
        host, event = step
        if event is None:  # on the host already (a CPU run)
            return host
        previous, self._in_flight = self._in_flight, step
        if previous is None:
            return None
        host, event = previous
        event.synchronize()
        return host

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        flags = self._flags(trainer)
        if flags is None:
            return
        sigterm, requeue = bool(flags[0]), bool(flags[1])
        if not (sigterm or requeue) or self.saved_path is not None:
            return
        path = self.checkpoint_path(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        received = {
            s for s, on in ((signal.SIGTERM, sigterm), (self._signum, requeue)) if on and s is not None
        }
        name = " and ".join(signal.Signals(s).name for s in sorted(received))
        log.warning("%s: wrote %s at step %d; resume with --ckpt_path last", name, path, trainer.global_step)
        job = slurm_requeue_target(received, self._signum, os.environ)
        if job and trainer.is_global_zero:
            try:
                result = subprocess.run(["scontrol", "requeue", job], check=False)
                log.warning("scontrol requeue %s: exit status %d", job, result.returncode)
                self.requeued_job = job if result.returncode == 0 else None
            except FileNotFoundError:  # no SLURM client here: the checkpoint is written, resubmit by hand
                log.warning("scontrol not found: job %s not requeued; resubmit it with --ckpt_path last", job)
        # every rank stops here together, also those that did not receive the signal themselves
        raise SIGTERMException
