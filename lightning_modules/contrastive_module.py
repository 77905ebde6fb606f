"""What the image-text and speech-text systems share: two towers aligned by a loss from the one loss library,
a learnable temperature, and retrieval evaluation with the one retrieval metric.

A subclass builds its towers and implements `embed(batch)`, returning both sides' (unnormalised) embeddings
with their keys and groups; this class normalises them, computes the loss and the metric, and logs.

Gradient caching (`grad_cache_chunks` > 1; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup") trains on contrastive batches larger than the activations that fit in memory: the loss
still sees every pair of the batch, while the towers hold the activations of one chunk of rows at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.losses import build_loss
from lightning_modules.components.retrieval import RetrievalRecall, mean_recall
from lightning_modules.optim import Schedule, build_optimizer
from lightning_modules.resilience import CheckpointExtras, SkipNonFiniteSteps, finite_or_skip
from lightning_modules.rng import rng_state, set_rng_state

# parameters, besides biases and norms, that AdamW does not decay in the contrastive systems: the temperature,
# SigLIP's bias, position tables and the ViT class token
NO_DECAY_NAMES = ("log_scale", "logit_bias", "position", "cls_token", "class_token")


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


_ROW_FIELDS = ("a", "b", "a_keys", "a_groups", "b_keys", "b_groups")  # of a training batch (no pair_index)


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Undo the BatchNorm running-statistics updates (ResNet, Conformer) made inside the block."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(buf, buf.clone()) for m in norms for buf in m.buffers(recurse=False)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, value in saved:
                buf.copy_(value)


class ContrastiveModule(SkipNonFiniteSteps, CheckpointExtras):
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
        max_nonfinite_in_row: int = 20,
        grad_cache_chunks: int = 1,
    ) -> None:
        super().__init__()
        if grad_cache_chunks < 1:
            raise ValueError(f"grad_cache_chunks must be at least 1, got {grad_cache_chunks}")
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.grad_cache_chunks = grad_cache_chunks
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
    row_keys: tuple[str, ...] = ()
    """Entries of a training batch with one item per row (pair), which `split_batch` cuts into chunks."""

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

    def _log_train(self, batch: dict, loss: Tensor, rows: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=rows)
        self.log("train/logit_scale", self.logit_scale.detach(), batch_size=rows)
        self._log_skipped(batch, "train")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:  # gradient caching
            return self._grad_cache_step(batch)
        e = self.embed(batch, "train")
        loss = self.pair_loss(e)
        self._log_train(batch, loss, len(e.a))
        return self.skip_if_nonfinite(loss)

    # gradient caching -------------------------------------------------------------------------
    def split_batch(self, batch: dict, chunks: int) -> list[dict]:
        """Up to `chunks` consecutive, non-empty, near-equal row ranges of a training batch; entries not in
        `row_keys` (e.g. the count of skipped items) are shared by all chunks."""
        rows = len(batch[self.row_keys[0]])
        bounds = [i * rows // chunks for i in range(chunks + 1)]
        return [
            {k: v[lo:hi] if k in self.row_keys else v for k, v in batch.items()}
            for lo, hi in zip(bounds, bounds[1:])
            if hi > lo
        ]

    def cached_backward(self, batch: dict) -> tuple[Tensor, bool]:
        """Accumulate in `.grad` the gradient of the whole batch's loss, holding the activations of one chunk of
        rows at a time. Returns the loss (detached) and whether gradients were accumulated: not when the loss
        is NaN or Inf on some rank (`finite_or_skip`, every rank then skips together).

        Pass 1 embeds every chunk without a graph, recording the random state before each. The loss over all
        embeddings, as leaves, gives d loss / d embedding and the temperature's gradient. Pass 2 embeds each
        chunk again from its recorded random state, so dropout and SpecAugment draw the same masks as in pass 1,
        and backpropagates sum(embedding * d loss / d embedding): by the chain rule, exactly this chunk's share
        of d loss / d parameters. The temperature's gradient joins the last chunk's backward, counted once.
        """
        chunks = self.split_batch(batch, self.grad_cache_chunks)
        states, parts = [], []
        with torch.no_grad(), _running_stats_kept(self):  # pass 2 updates BatchNorm statistics, once
            for chunk in chunks:
                states.append(rng_state())
                parts.append(self.embed(chunk, "train"))
        e = PairEmbeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in _ROW_FIELDS))
        a = e.a.detach().float().requires_grad_()
        b = e.b.detach().float().requires_grad_()
        loss = self.pair_loss(replace(e, a=a, b=b))
        if finite_or_skip(self, loss, self.max_nonfinite_in_row) is None:
            return loss.detach(), False

        temperature = [p for p in (self.log_scale, self.logit_bias) if p is not None]
        grad_a, grad_b, *grad_t = torch.autograd.grad(loss, [a, b, *temperature], allow_unused=True)
        # losses on raw cosines (triplet, N-pair, circle) leave the temperature without a gradient, as usual
        temperature_term = sum((p * g).sum() for p, g in zip(temperature, grad_t) if g is not None)
        start = 0
        for i, (chunk, state) in enumerate(zip(chunks, states)):
            set_rng_state(state)
            part = self.embed(chunk, "train")
            rows = slice(start, start + len(part.a))
            start = rows.stop
            surrogate = (part.a.float() * grad_a[rows]).sum() + (part.b.float() * grad_b[rows]).sum()
            last = i == len(chunks) - 1
            self._backward(surrogate + temperature_term if last else surrogate, sync=last)
        return loss.detach(), True

    def _backward(self, loss: Tensor, sync: bool) -> None:
        """Backward through Lightning (precision scaling, DDP) when trained by a Trainer. Under DDP only the last
        chunk's backward all-reduces, the gradient summed over all chunks; the others accumulate locally."""
        if self._trainer is None:
            loss.backward()
            return
        strategy = self.trainer.strategy
        no_sync = getattr(strategy, "block_backward_sync", None)
        with nullcontext() if sync or no_sync is None else no_sync():
            self.manual_backward(loss)

    def _grad_cache_step(self, batch: dict) -> Tensor:
        self.optimizers().zero_grad()
        loss, finite = self.cached_backward(batch)
        self._log_train(batch, loss, len(batch[self.row_keys[0]]))
        if finite:
            self._optimizer_step()
        return loss

    def _optimizer_step(self) -> None:
        """The optimizer and the per-step LR schedule, which Lightning leaves to the module in manual
        optimisation. Gradients are clipped in `on_before_optimizer_step`, after AMP unscaling."""
        self.optimizers().step()
        self.lr_schedulers().step()

    def _manual_zero_loss_step(self, loss: Tensor) -> Tensor:
        """An empty batch's zero loss (see the subclasses): Lightning backpropagates it in automatic
        optimisation; with gradient caching this rank steps here, joining the other ranks' all-reduce."""
        if not self.automatic_optimization:
            self.optimizers().zero_grad()
            self.manual_backward(loss)
            self._optimizer_step()
            return loss.detach()
        return loss

    def setup(self, stage: str) -> None:
        # Gradient caching runs several backward passes per step, so it optimises manually. The switch happens
        # here, after Lightning's configuration check, which rejects Trainer(gradient_clip_val) with manual
        # optimisation: the trainer's clipping is applied by `on_before_optimizer_step` instead.
        if stage != "fit" or self.grad_cache_chunks == 1:
            return
        if self.trainer.accumulate_grad_batches != 1:
            raise ValueError(
                f"model.grad_cache_chunks ({self.grad_cache_chunks}) cannot be combined with "
                f"trainer.accumulate_grad_batches ({self.trainer.accumulate_grad_batches}): gradient caching "
                "already gives the loss a larger batch; raise the batch size with it instead"
            )
        self.automatic_optimization = False

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if not self.automatic_optimization:  # Lightning clips only in automatic optimisation
            self.clip_gradients(optimizer)  # the trainer's gradient_clip_val and algorithm; none when unset

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
        recalls = metric.compute()
        values = {f"{stage}/{k}": v for k, v in recalls.items()}
        values[f"{stage}/R@mean"] = mean_recall(recalls)  # what the configs' best checkpoint monitors
        self.log_dict(values, prog_bar=stage == "val")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")

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
            no_decay_names=NO_DECAY_NAMES,
            fused=not self.trainer.gradient_clip_val,
        )
