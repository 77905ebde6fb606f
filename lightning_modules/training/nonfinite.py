"""Training that survives NaN/Inf losses: `SkipNonFiniteSteps` carries every scalar a step needs from all ranks
in one all-reduce (the system's own sums, whether the loss is non-finite on some rank, and the step flags of the
callbacks that implement `StepFlags`), skips the optimizer step on the device where the loss was non-finite on any
rank, counts the skips and stops a diverging run. Also the two strategy-specific pieces of that decision:
DeepSpeed's engine made to skip such steps itself (`deepspeed_skips_nonfinite`) and FSDP1's clipping by the
norm over every rank's shards (`clip_fsdp_root`)."""

from __future__ import annotations

import numbers
from collections.abc import Callable
from importlib.metadata import version as installed_version
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from packaging.version import Version
from torch import Tensor


class NonFiniteLossError(RuntimeError):
    pass


def device_scalar(value: Tensor | float, device: torch.device) -> Tensor:
    """`value` as a float32 scalar on `device`. A Python number is filled in on the device: `torch.tensor(x,
    device="cuda")` copies it from the host and waits for every kernel queued so far, once per step here."""
    if isinstance(value, Tensor):
        return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


@runtime_checkable
class StepFlags(Protocol):
    """A callback whose per-step flags ride in the training step's one all-reduce (`reduce_step`), so a decision
    every rank must take together costs no collective of its own (`PreemptionCheckpoint`'s SIGTERM and requeue
    flags). Each source gives exactly two flags."""

    def local_step_flags(self, trainer: L.Trainer, device: torch.device) -> list[Tensor]:
        """This rank's two flags (float scalars on `device`, 0 or 1), added to the step's all-reduce."""
        ...

    def receive_step_flags(self, flags: Tensor) -> None:
        """The two flags summed over ranks (a device tensor of shape (2,)), the same on every rank."""
        ...


def _flag_sources(trainer: L.Trainer | None) -> list[StepFlags]:
    """The callbacks whose per-step flags ride in the step's all-reduce."""
    return [c for c in (trainer.callbacks if trainer is not None else []) if isinstance(c, StepFlags)]


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
        """Lightning's `log`, with a Python number filled in on the device (`device_scalar`): Lightning would make
        it a tensor by a copy from the host, which on a GPU waits for the whole step, at every step that logs a
        count, a flag or a learning rate."""
        if isinstance(value, numbers.Number):
            value = device_scalar(value, self.device)
        super().log(name, value, *args, **kwargs)

    def reduce_step(self, finite_of: Tensor, **sums: Tensor | float) -> dict[str, Tensor]:
        """`sums` (scalars) summed over ranks, and `nonfinite`: how many ranks' `finite_of` is NaN or Inf, in one
        all-reduce that also carries the preemption flags. The returned tensors stay on the device."""
        device = finite_of.device
        parts = [device_scalar(v, device) for v in sums.values()]
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
