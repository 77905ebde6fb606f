"""AdamW and the warmup-then-decay schedule shared by every task, and `OptimizerConfig`, the `model.optimizer`
section of every system (each system gives it its own defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from lightning_modules.components.towers import TowerTraining, tower_param_groups

Schedule = Literal["linear", "cosine", "constant"]


def param_groups(model: nn.Module, weight_decay: float, no_decay_names: tuple[str, ...] = ()) -> list[dict]:
    """Decay matrices only: biases, LayerNorm/BatchNorm parameters and named scalars (e.g. the logit scale)
    get no weight decay, as in BERT and CLIP."""
    decay, no_decay, seen = [], [], set()
    norm_types = (nn.LayerNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.GroupNorm)
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:  # tied weights appear twice
                continue
            seen.add(id(p))
            full = f"{module_name}.{name}" if module_name else name
            if p.ndim < 2 or isinstance(module, norm_types) or any(n in full for n in no_decay_names):
                no_decay.append(p)
            else:
                decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_decay(
    step: int, warmup_steps: int, total_steps: int, schedule: Schedule, min_ratio: float = 0.0
) -> float:
    """LR multiplier: linear warmup from 0 to 1 over `warmup_steps`, then linear or cosine decay to `min_ratio`."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * decay


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    warmup_steps: int | float,
    total_steps: int,
    schedule: Schedule,
    no_decay_names: tuple[str, ...] = (),
    fused: bool = True,
    groups: list[dict] | None = None,
) -> dict:
    """Lightning's `configure_optimizers` answer. A float `warmup_steps` < 1 is a fraction of `total_steps`.

    `fused` asks for the fused AdamW kernel; the systems pass `SkipNonFiniteSteps.fused_adamw_allowed()`."""
    if isinstance(warmup_steps, float) and warmup_steps < 1:
        warmup_steps = int(warmup_steps * total_steps)
    # groups may carry their own lr (layer-wise decay); LambdaLR scales each group's initial lr alike
    groups = groups if groups is not None else param_groups(model, weight_decay, no_decay_names)
    # the fused kernel (CPU and CUDA) updates all parameters in one pass instead of a loop of small ops
    fused = fused and all(
        p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for g in groups for p in g["params"]
    )
    opt = torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: warmup_decay(s, int(warmup_steps), total_steps, schedule)
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}


@dataclass
class OptimizerConfig:
    """AdamW with linear warmup, then a decay of the learning rate to zero. The defaults here are CLIP's (the
    alignment systems'); MLM pretraining and fine-tuning default to BERT's."""

    lr: float = 5e-4
    """Peak learning rate."""
    weight_decay: float = 0.2
    """Decoupled decay of the matrices (not of biases, norms, the temperature, position tables)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """Adam's moment decay rates (CLIP's)."""
    eps: float = 1e-6
    """Adam's epsilon."""
    warmup_steps: int | float = 0.05
    """Linear warmup steps, or a fraction of all steps when < 1."""
    schedule: Schedule = "cosine"
    """Decay after warmup: linear, cosine or constant."""
    layer_decay: float | None = None
    """Layer-wise learning-rate decay d of a BERT encoder (MLM pretraining, fine-tuning; see llrd.py): block l
    of L gets lr * d^(L - l), the embeddings lr * d^(L + 1), the heads lr. None: one rate. The alignment systems
    have several towers and refuse it: their towers' rates are set by model.<tower>.lr_mult."""

    def build(
        self,
        model: nn.Module,
        total_steps: int,
        fused: bool = True,
        towers: dict[str, tuple[nn.Module, TowerTraining]] | None = None,
        no_decay_names: tuple[str, ...] = (),
        groups: list[dict] | None = None,
    ) -> dict:
        """Lightning's `configure_optimizers` answer for `model`. `towers` (name: module, config) get their own
        learning rate, the optimiser's times their `lr_mult`; `groups` (e.g. layer-wise ones) replace the
        default decay / no-decay split."""
        # only when a tower asks for its own rate: otherwise the plain two groups, so the optimiser state of
        # checkpoints without per-tower groups still loads on resume
        if groups is None and towers and any(cfg.lr_mult != 1.0 for _, cfg in towers.values()):
            groups = tower_param_groups(
                towers, model, self.lr, lambda m: param_groups(m, self.weight_decay, no_decay_names)
            )
        return build_optimizer(
            model,
            self.lr,
            self.weight_decay,
            tuple(self.betas),
            self.eps,
            self.warmup_steps,
            total_steps,
            self.schedule,
            no_decay_names=no_decay_names,
            fused=fused,
            groups=groups,
        )
