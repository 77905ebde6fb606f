"""Layer-wise learning-rate decay (LLRD) for fine-tuning BERT: lower layers change less.

With L encoder blocks numbered l = 0 (bottom) .. L-1 (top) and decay d:
    lr(block l)    = lr * d^(L - l)
    lr(embeddings) = lr * d^(L + 1)
    lr(the rest)   = lr            (pooler and task head)
"""

from __future__ import annotations

from torch import nn

from lightning_modules.components.bert import BertModel
from lightning_modules.training.optim import OptimizerConfig, param_groups


def layer_scales(model: nn.Module, bert: BertModel, layer_decay: float | None) -> dict[int, float]:
    """LR multiplier per parameter (by id) of `model`; `bert` is its encoder. None: 1 everywhere."""
    scales = {id(p): 1.0 for p in model.parameters()}
    if layer_decay is None:
        return scales
    n = len(bert.encoder.blocks)
    for p in bert.embeddings.parameters():
        scales[id(p)] = layer_decay ** (n + 1)
    for layer, block in enumerate(bert.encoder.blocks):
        for p in block.parameters():
            scales[id(p)] = layer_decay ** (n - layer)
    if bert.encoder.final_norm is not None:  # pre-LN: the norm closing the top block goes with it
        for p in bert.encoder.final_norm.parameters():
            scales[id(p)] = layer_decay
    return scales


def llrd_param_groups(
    model: nn.Module, bert: BertModel, lr: float, layer_decay: float | None, weight_decay: float
) -> list[dict]:
    """AdamW groups: the weight-decay split of `param_groups`, each further split by layer, with its own lr."""
    scales = layer_scales(model, bert, layer_decay)
    groups = []
    for base in param_groups(model, weight_decay):
        by_scale: dict[float, list[nn.Parameter]] = {}
        for p in base["params"]:
            by_scale.setdefault(scales[id(p)], []).append(p)
        for scale, params in sorted(by_scale.items()):
            groups.append({"params": params, "weight_decay": base["weight_decay"], "lr": lr * scale})
    return groups


def build_llrd_optimizer(
    model: nn.Module, bert: BertModel, cfg: OptimizerConfig, total_steps: int, fused: bool = True
) -> dict:
    """`OptimizerConfig.build` with per-layer learning rates (`cfg.layer_decay`; one rate when None); the
    schedule scales every group alike."""
    groups = llrd_param_groups(model, bert, cfg.lr, cfg.layer_decay, cfg.weight_decay)
    return cfg.build(model, total_steps, fused=fused, groups=groups)
