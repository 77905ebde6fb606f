"""What the image-text and speech-text systems share: two towers aligned by a loss from the one loss library,
a learnable temperature, and retrieval evaluation with the one retrieval metric.

A subclass builds its towers and implements `embed(batch)`, returning both sides' (unnormalised) embeddings
with their keys and groups; this class normalises them, computes the loss and the metric, and logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.losses import build_loss
from lightning_modules.components.retrieval import RetrievalRecall
from lightning_modules.optim import Schedule, build_optimizer
from lightning_modules.rng import rng_state, set_rng_state


@dataclass
class PairEmbeddings:
    """Both sides of a batch. Row i of `a` pairs with row `pair_index[i]` of `b` for the loss.

    Training batches are 1:1 (`pair_index` = arange). Evaluation batches may hold one image and all its
    captions; then `b` has more rows and `pair_index` picks one caption per image for the loss.
    `groups` mark positives: equal group ids are the same image / the same transcript.
    """

    a: Tensor
    b: Tensor
    a_keys: Tensor
    a_groups: Tensor
    b_keys: Tensor
    b_groups: Tensor
    pair_index: Tensor | None = None


class ContrastiveModule(L.LightningModule):
    def __init__(
        self,
        loss: str = "infonce",
        loss_kwargs: dict | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        prefixes: tuple[str, str] = ("a2b", "b2a"),
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int | float = 0.05,
        schedule: Schedule = "cosine",
    ) -> None:
        super().__init__()
        self.loss_fn = build_loss(loss, **(loss_kwargs or {}))
        # the temperature is learned in log space: τ⁻¹ = exp(log_scale), clamped at max_logit_scale
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_logit_scale)))
        self.logit_bias = (
            nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        )
        self.max_log_scale = math.log(max_logit_scale)
        self.prefixes = prefixes
        self.retrieval = nn.ModuleDict(
            {
                stage: RetrievalRecall(prefix_a2b=prefixes[0], prefix_b2a=prefixes[1])
                for stage in ("val", "test")
            }
        )
        self._optim = dict(
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            schedule=schedule,
        )

    # to implement -----------------------------------------------------------------------------
    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        raise NotImplementedError

    # shared -----------------------------------------------------------------------------------
    @property
    def logit_scale(self) -> Tensor:
        return self.log_scale.clamp(max=self.max_log_scale).exp()

    def pair_loss(self, e: PairEmbeddings) -> Tensor:
        a = F.normalize(e.a.float(), dim=-1)
        b = F.normalize(e.b.float(), dim=-1)
        if e.pair_index is not None:
            b = b[e.pair_index]
        return self.loss_fn(a, b, self.logit_scale, self.logit_bias, ids=e.a_groups)

    def _log_skipped(self, batch: dict, stage: str) -> None:
        if "skipped" in batch:
            self.log(
                f"{stage}/skipped_items",
                float(batch["skipped"]),
                reduce_fx="sum",
                on_step=False,
                on_epoch=True,
            )

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        e = self.embed(batch, "train")
        loss = self.pair_loss(e)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(e.a))
        self.log("train/logit_scale", self.logit_scale.detach(), batch_size=len(e.a))
        self._log_skipped(batch, "train")
        return loss

    def _eval_step(self, batch: dict, stage: str) -> None:
        e = self.embed(batch, stage)
        self.log(f"{stage}/loss", self.pair_loss(e), sync_dist=True, batch_size=len(e.a))
        self._log_skipped(batch, stage)
        a = F.normalize(e.a.float(), dim=-1)
        b = F.normalize(e.b.float(), dim=-1)
        self.retrieval[stage].update(a, e.a_keys, e.a_groups, b, e.b_keys, e.b_groups)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_retrieval(self, stage: str) -> None:
        metric = self.retrieval[stage]
        if not metric.update_called:
            return
        values = {f"{stage}/{k}": v for k, v in metric.compute().items()}
        self.log_dict(values, prog_bar=stage == "val")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rng_state"] = rng_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        if "rng_state" in checkpoint:
            set_rng_state(checkpoint["rng_state"])

    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches))
        o = self._optim
        return build_optimizer(
            self,
            o["lr"],
            o["weight_decay"],
            o["betas"],
            o["eps"],
            o["warmup_steps"],
            total,
            o["schedule"],
            no_decay_names=("log_scale", "logit_bias", "position", "cls_token", "class_token"),
            fused=not self.trainer.gradient_clip_val,
        )
