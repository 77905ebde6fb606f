"""What long runs need to survive: non-finite losses skipped and counted, checkpoints written atomically (and the
leftovers of killed writes removed), a last checkpoint on SIGTERM or on SLURM's requeue signal before the job exits,
and a requeue only when the job asked for one."""

from __future__ import annotations

import logging
import numbers
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Collection, Mapping
from importlib.metadata import version as installed_version
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from packaging.version import Version
from torch import Tensor
from torch.distributed.fsdp import FSDPModule

from lightning_modules.atomic_files import fsync_folder, pid_is_alive, temporary_name
from lightning_modules.checkpoints import SYSTEM_CLASS_KEY
from lightning_modules.ema import ema_callbacks, load_ema, save_ema
from lightning_modules.rng import restore_rng_state, rng_states_of_all_ranks
from lightning_modules.strategies import configure_parallelism

log = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    pass


class CheckpointExtras(L.LightningModule):
    """What every system's checkpoint carries besides weights and loop state: every rank's RNG state, so a resumed
    run draws the dropout masks an unbroken one would, the DataModule's tokenizer (`tokenizer_json`), so
    zero-shot, fine-tuning and the HF export need no data cache, and the system's class path
    (`system_class_path`), so a checkpoint given to the wrong config is refused by name; with `model.ema`, the
    average of the weights (lightning_modules/ema.py)."""

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_states"] = rng_states_of_all_ranks()
        # the system's own class: FSDP2's root is an instance of a subclass `fully_shard` made
        cls = next(c for c in type(self).__mro__ if not issubclass(c, FSDPModule))
        checkpoint[SYSTEM_CLASS_KEY] = f"{cls.__module__}.{cls.__qualname__}"
        dm = getattr(self._trainer, "datamodule", None) if self._trainer else None
        # CLIP's tokenizer (a whole-CLIP start) is not stored: the DataModule's settings name its source
        inner = getattr(getattr(dm, "tokenizer", None), "tokenizer", None)
        if inner is not None:
            checkpoint["tokenizer_json"] = inner.to_str()
        save_ema(self, checkpoint)

    def configure_model(self) -> None:
        # FSDP2 shards here, on the strategy's device mesh (one function for every system); other strategies
        # leave the model as built
        configure_parallelism(self)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        restore_rng_state(checkpoint, self.global_rank, self.trainer.world_size if self._trainer else 1)
        load_ema(self, checkpoint)

    def configure_callbacks(self) -> list[L.Callback]:
        # the system's `ema` section, when set: the average's updates and evaluation (lightning_modules/ema.py)
        return ema_callbacks(self)


def _device_scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """`value` as a float32 scalar on `device`. A Python number is filled in on the device: `torch.tensor(x,
    device="cuda")` copies it from the host and waits for every kernel queued so far, once per step here."""
    if isinstance(value, Tensor):
        return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def _flag_sources(trainer: L.Trainer | None) -> list[Any]:
    """The callbacks whose per-step flags ride in the step's all-reduce (`PreemptionCheckpoint`)."""
    return [c for c in (trainer.callbacks if trainer is not None else []) if hasattr(c, "receive_step_flags")]


class SkipNonFiniteSteps(L.LightningModule):
    """Automatic optimisation that survives NaN/Inf losses, also under DDP, without a host sync per step.

    Every scalar a training step needs from all ranks travels in one all-reduce (`reduce_step`): the system's own
    sums (the MLM's masked-token count, the losses it logs), whether the loss is non-finite on some rank, and the
    SIGTERM and requeue flags of `PreemptionCheckpoint`. The decision stays on the device: a step whose loss is
    non-finite on any rank runs its backward (NaN gradients) and the fused AdamW kernel skips the update on every
    rank (`found_inf`: no parameter, moment or step-count change, no weight decay). Optimizers without a
    device-side skip read the flag on the host at the optimizer step instead; under DeepSpeed its engine skips
    the step itself (`deepspeed_skips_nonfinite`). Skips are counted on the device, logged as
    `train/nonfinite_skipped`, and checked against `max_nonfinite_in_row` at logging steps, when the logger syncs
    anyway. A subclass returns `self.skip_if_nonfinite(loss)` from `training_step`; one that optimises manually
    calls it too, then steps through `step_unless_nonfinite`.

    Fused AdamW stays on when the trainer clips gradients, except under a GradScaler (`fused_adamw_allowed`).
    """

    max_nonfinite_in_row: int = 20
    _step_bad: Tensor | None = None  # this step's all-reduced non-finite flag, from `reduce_step`
    _bad_pending: Tensor | None = None  # OR over the micro-batches since the last optimizer step
    _skip_counts: Tensor | None = None  # (skipped in all, in a row now, longest row since the last check)
    _skips_seen: int = 0

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        """Lightning's `log`, with a Python number filled in on the device (`_device_scalar`): Lightning would make
        it a tensor by a copy from the host, which on a GPU waits for the whole step, at every step that logs a
        count, a flag or a learning rate."""
        if isinstance(value, numbers.Number):
            value = _device_scalar(value, self.device)
        super().log(name, value, *args, **kwargs)

    def reduce_step(self, finite_of: Tensor, **sums: Tensor | float) -> dict[str, Tensor]:
        """`sums` (scalars) summed over ranks, and `nonfinite`: how many ranks' `finite_of` is NaN or Inf, in one
        all-reduce that also carries the preemption flags. The returned tensors stay on the device."""
        device = finite_of.device
        parts = [_device_scalar(v, device) for v in sums.values()]
        parts.append((~torch.isfinite(finite_of.detach())).any().float())
        sources = _flag_sources(self._trainer)
        for source in sources:
            parts.extend(source.local_step_flags(self.trainer, device))
        vector = torch.stack(parts)
        if self._trainer is not None and self.trainer.world_size > 1:
            # torch's all-reduce itself: Lightning's strategy.reduce puts a barrier (one more collective) before it
            torch.distributed.all_reduce(vector, op=torch.distributed.ReduceOp.SUM)
        n = len(sums)
        for i, source in enumerate(sources):
            source.receive_step_flags(vector[n + 1 + 2 * i : n + 3 + 2 * i])
        self._step_bad = vector[n] > 0
        return dict(zip([*sums, "nonfinite"], vector[: n + 1].unbind()))

    def rank_means(self, finite_of: Tensor, **values: Tensor) -> dict[str, Tensor]:
        """`values` (scalars) averaged over ranks, for logging, in the step's one all-reduce (`reduce_step`)."""
        world = self.trainer.world_size if self._trainer is not None else 1
        sums = self.reduce_step(finite_of, **{k: v.detach() for k, v in values.items()})
        return {k: sums[k] / world for k in values}

    def skip_if_nonfinite(self, loss: Tensor) -> Tensor:
        bad = self._step_bad if self._step_bad is not None else self.reduce_step(loss)["nonfinite"] > 0
        self._step_bad = None
        # sticky over accumulated micro-batches until the optimizer step
        self._bad_pending = bad if self._bad_pending is None else self._bad_pending | bad
        counts = self._skip_counts
        if counts is None or counts.device != bad.device:
            counts = torch.zeros(3, device=bad.device)
        b = bad.float()
        total, in_row = counts[0] + b, (counts[1] + 1) * b
        self._skip_counts = torch.stack([total, in_row, torch.maximum(counts[2], in_row)])
        if self._trainer is not None:
            self.log("train/nonfinite_skipped", total, on_step=True, on_epoch=False)
            if (self.trainer.global_step + 1) % self.trainer.log_every_n_steps == 0:
                self.check_nonfinite_skips()
        return loss

    def check_nonfinite_skips(self) -> None:
        """Warn about the steps skipped since the last check, and stop the run after `max_nonfinite_in_row` in a
        row. Reads three numbers from the device: call it where a sync happens anyway."""
        if self._skip_counts is None:
            return
        total, _, longest = (int(v) for v in self._skip_counts.tolist())
        self._skip_counts[2] = self._skip_counts[1]  # the next check looks at rows from here on
        if total > self._skips_seen:
            rank_zero_warn(
                f"non-finite loss: {total - self._skips_seen} step(s) skipped before step {self.global_step + 1} "
                f"({total} in all)"
            )
            self._skips_seen = total
        if longest >= self.max_nonfinite_in_row > 0:
            raise NonFiniteLossError(
                f"the loss was NaN or Inf {longest} steps in a row (by step {self.global_step + 1}; "
                f"max_nonfinite_in_row={self.max_nonfinite_in_row}): the run is diverging. Lower the learning "
                "rate, add warmup or gradient clipping (--trainer.gradient_clip_val 1.0), or resume from an "
                "earlier checkpoint"
            )

    def on_train_end(self) -> None:
        self.check_nonfinite_skips()

    def configure_model(self) -> None:
        """Under DeepSpeed, before the strategy builds its engine from its config: make the engine skip non-finite
        steps, or refuse the run (`deepspeed_skips_nonfinite`). Then the system's own set-up."""
        trainer = self._trainer
        if (
            trainer is not None
            and trainer.state.fn == TrainerFn.FITTING
            and isinstance(trainer.strategy, DeepSpeedStrategy)
        ):
            deepspeed_skips_nonfinite(
                trainer.strategy.config, trainer.precision_plugin.precision, installed_version("deepspeed")
            )
        super().configure_model()

    def fused_adamw_allowed(self) -> bool:
        """Whether `configure_optimizers` may build fused AdamW: yes, unless the trainer clips gradients under a
        GradScaler (fp16-mixed), where the gradients must be unscaled before clipping and the fused kernel unscales
        only inside its step. bf16-mixed, 32-true and bf16-true have no scaler and clip fused AdamW's gradients
        like any others (`configure_gradient_clipping`)."""
        trainer = self._trainer
        clips = trainer is not None and bool(trainer.gradient_clip_val)
        return not (clips and getattr(trainer.precision_plugin, "scaler", None) is not None)

    def configure_gradient_clipping(
        self,
        optimizer: Any,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, except that plain AMP without a GradScaler (bf16-mixed) clips fused AdamW too:
        its `MixedPrecision.clip_gradients` refuses every optimizer that unscales inside its step, which matters
        only when a scaler has scaled the gradients. Then the base `Precision` clips (torch's clip_grad_norm_ or
        clip_grad_value_ over the optimizer's parameters, on the device). Under FSDP1 (`BlockFSDPStrategy`), whose
        `FSDPPrecision` refuses to clip by norm, the FSDP root clips by the norm over every rank's shards
        (`clip_fsdp_root`). Other plugins (DeepSpeed, fp16's scaler) keep Lightning's own path."""
        plugin = self.trainer.precision_plugin
        algorithm = GradClipAlgorithmType(gradient_clip_algorithm or GradClipAlgorithmType.NORM)
        if isinstance(self.trainer.strategy, FSDPStrategy) and algorithm == GradClipAlgorithmType.NORM:
            clip_fsdp_root(self.trainer.strategy, gradient_clip_val)
            return
        if type(plugin) is MixedPrecision and plugin.scaler is None:
            Precision.clip_gradients(plugin, optimizer, gradient_clip_val or 0.0, algorithm)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def optimizer_step(
        self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None
    ) -> None:
        if optimizer_closure is None:
            return super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        loss = optimizer_closure()  # training_step and backward, as Lightning's own step would run them
        self.step_unless_nonfinite(optimizer, lambda: optimizer.step(closure=lambda: loss))

    def step_unless_nonfinite(self, optimizer: Any, step: Callable[[], Any]) -> bool:
        """Run `step`, the step of `optimizer`, unless a loss `skip_if_nonfinite` saw since the last optimizer
        step was NaN or Inf on some rank. Fused Adam/AdamW get the all-reduced flag as `found_inf` and skip on the
        device (`step` runs); other optimizers read the flag on the host and `step` does not run. Returns False
        only then, a skip decided on the host. Under DeepSpeed `step` (the engine's) always runs and the engine
        skips the step itself (`deepspeed_skips_nonfinite`), which keeps its micro-step count. Automatic
        optimisation (`optimizer_step`) and gradient caching's manual step both step through here."""
        bad, self._bad_pending = self._bad_pending, None
        inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper around the torch optimizer
        if bad is None or isinstance(getattr(self._trainer, "strategy", None), DeepSpeedStrategy):
            step()
        elif _skips_on_device(inner):
            inner.found_inf = bad.float()
            try:
                step()
            finally:  # AMP's GradScaler sets and deletes its own found_inf on this attribute
                if hasattr(inner, "found_inf"):
                    del inner.found_inf
        elif bool(bad):  # a host read: this optimizer cannot skip on the device
            return False
        else:
            step()
        return True


# the first DeepSpeed whose ZeRO stage 1-2 can check bf16 gradients for NaN/Inf (`bf16.check_grad_overflow`)
DEEPSPEED_BF16_SKIPS = Version("0.17.1")


def deepspeed_skips_nonfinite(config: dict[str, Any], precision: str, deepspeed_version: str) -> None:
    """Make the DeepSpeed engine of `config` skip the optimizer steps whose gradients are NaN or Inf on some rank,
    or refuse the run in one line where DeepSpeed cannot: `SkipNonFiniteSteps` leaves the skip to the engine,
    whose own step keeps its micro-step count. fp16 skips at every ZeRO stage (its loss scaler); bf16 only under
    ZeRO stage 1 or 2 with `check_grad_overflow`, set here unless the config turned it off; 32-bit never.
    Sections the config lacks are those Lightning adds for `precision`."""
    fp16 = config["fp16"].get("enabled", False) if "fp16" in config else precision in ("16-mixed", "16-true")
    if fp16:
        return
    bf16 = (
        config["bf16"].get("enabled", False) if "bf16" in config else precision in ("bf16-mixed", "bf16-true")
    )
    stage = int((config.get("zero_optimization") or {}).get("stage", 0))
    if bf16 and stage in (1, 2) and Version(deepspeed_version) >= DEEPSPEED_BF16_SKIPS:
        section = config.setdefault("bf16", {"enabled": True})
        if section.setdefault("check_grad_overflow", True):
            return
    raise MisconfigurationException(
        f"DeepSpeed (ZeRO stage {stage}, precision {precision}, deepspeed {deepspeed_version}) would apply an "
        "optimizer step whose gradients are NaN or Inf: it skips one only under 16-mixed, or bf16 with ZeRO stage 1 "
        f"or 2 (deepspeed >= {DEEPSPEED_BF16_SKIPS}, bf16.check_grad_overflow not false); use --trainer.precision "
        "16-mixed or bf16-mixed with stage 2, or another strategy (configs/strategy/fsdp2.yaml)"
    )


def clip_fsdp_root(strategy: FSDPStrategy, max_norm: float | None) -> None:
    """Clip the gradients of an FSDP1 model to `max_norm` by their norm over all ranks, with the FSDP root's own
    `clip_grad_norm_` (an all-reduce of the shards' norms: torch's `clip_grad_norm_` would see only this rank's
    shards). Every rank calls it, as Lightning's clipping hook does."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    if not max_norm:
        return
    root = strategy.model
    if not isinstance(root, FullyShardedDataParallel):
        raise MisconfigurationException(
            f"{type(strategy).__name__}: clipping by norm needs the model wrapped in one FSDP root, found "
            f"{type(root).__name__}; clip by value (--trainer.gradient_clip_algorithm value) or let the strategy "
            "wrap the whole model"
        )
    root.clip_grad_norm_(max_norm)


def _skips_on_device(optimizer: Any) -> bool:
    """Fused Adam/AdamW take `found_inf` and leave everything untouched where it is 1."""
    return isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW) and bool(
        optimizer.defaults.get("fused")
    )


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint files in `folder` that a writer of this host left when it was killed.

    Only names of the form `.<name>.tmp-<this host>-<pid>` are looked at (the framework's own), and only those whose
    process no longer exists are removed: another host's files (a shared file system) and a live writer's are kept.
    Returns the removed paths."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    own = re.compile(rf"^\..+\.tmp-{re.escape(socket.gethostname())}-(\d+)$")
    removed = []
    for path in folder.iterdir():
        match = own.match(path.name)
        if match is None or path.is_symlink() or not path.is_file():
            continue
        if pid_is_alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)  # missing_ok: another rank of this host may have removed it first
        removed.append(path)
    return removed


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint straight into `.<name>.tmp-<host>-<pid>` beside the target, fsyncs it, renames it
    over the target and fsyncs the folder. A process killed in the middle of a write leaves the previous checkpoint
    whole and loadable; the next start removes its temporary file (`remove_stale_temporaries`).

    Lightning's own writer serialises into memory and then goes through fsspec's transaction, a temporary file in
    `$TMPDIR` moved over the target: every checkpoint written twice, and a move across file systems that is a copy,
    not an atomic rename."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):  # object stores have no rename; their uploads are all-or-nothing anyway
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint got storage_options={storage_options!r}, which only "
                "object-store paths take; remove them or write to an s3:// or gs:// path"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(target)
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)  # atomic on POSIX: readers see the old file or the new one, never half
            fsync_folder(target.parent)
        finally:
            tmp.unlink(missing_ok=True)  # after an error only: a renamed file is gone from this name


class AtomicCheckpoints(L.Callback):
    """Makes the strategy write checkpoints with `AtomicCheckpointIO` when it uses plain torch.save files (DDP,
    single device), and at the start of `fit` removes the temporary files that writers killed during an earlier
    run of this host left in the checkpoint folders. FSDP's sharded and DeepSpeed's checkpoints are folders written
    by their own code: left as is."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.local_rank != 0:  # one process per host looks; each host removes only its own files
            return
        folders = {Path(trainer.default_root_dir) / "checkpoints"}
        folders |= {Path(c.dirpath) for c in trainer.checkpoint_callbacks if getattr(c, "dirpath", None)}
        for folder in sorted(folders):
            if "://" in str(folder):
                continue
            for path in remove_stale_temporaries(folder):
                log.warning("removed %s, the temporary file of a checkpoint write that was killed", path)


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


def _no_sigterm_broadcast() -> None:
    """Stands in for Lightning's per-step SIGTERM broadcast while `PreemptionCheckpoint` owns the signal."""


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


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (`scancel`, preemption, Kubernetes eviction, `kill`) or on the SLURM requeue signal (`#SBATCH
    --signal=USR1@120`: the time limit is near), finish the current step, write `last.ckpt` and stop; after the
    requeue signal, and only then, also requeue the SLURM job. Resume with `fit ... --ckpt_path last`.

    Every rank takes the decision together, on the same all-reduced flags at the same step (a rank saving alone
    would wait forever in the collective save), and every rank stops by raising Lightning's `SIGTERMException`.
    On a GPU the flags of step k are read at the end of step k+1, when their copy to the host has long landed, so
    the device never waits for the host; on a CPU at the end of step k.

    The requeue signal is that of Lightning's `SLURMEnvironment` when the strategy has one (`--trainer.plugins
    SLURMEnvironment` with `requeue_signal` and `auto_requeue`; Lightning detects SLURM on its own under `srun`),
    else `requeue_signal` here. This callback's handler for that signal replaces Lightning's, so Lightning does not
    also write its `hpc_ckpt_*.ckpt` from inside the signal handler, in the middle of a step.

    While training, this callback also owns SIGTERM. Lightning's own handling would stop a run without the
    checkpoint whenever the signal lands after the step's flags were taken (its loop raises at the end of that
    very batch), and it costs a broadcast and a device-to-host read before every step, plus a broadcast from inside
    rank 0's signal handler. Here the handler only records the signal (and passes it on to the processes Lightning
    launched, as Lightning does); the flag travels in the step's one all-reduce, and Lightning's per-step broadcast
    is switched off for the run. A signal received during validation is acted on at the next training step.
    """

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
        # connector puts back the handlers of before the run when the run ends, also when it ends with an exception
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
        trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = _no_sigterm_broadcast

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
        vars(trainer.fit_loop.epoch_loop).pop("_broadcast_sigterm_tensor", None)
        self._previous_handler = self._previous_sigterm_handler = self._trainer = None

    def _received(self, trainer: L.Trainer) -> tuple[bool, bool]:
        """This rank's (SIGTERM, requeue signal) so far; Lightning's SIGTERM flag where its handler stayed."""
        return self._sigterm_received or trainer.received_sigterm, self._requeue_received

    def local_step_flags(self, trainer: L.Trainer, device: torch.device) -> list[Tensor]:
        """This rank's (SIGTERM, requeue) flags, for the training step's all-reduce (`reduce_step`)."""
        return [_device_scalar(float(on), device) for on in self._received(trainer)]

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
