"""The LightningModule over one contrastive pair (components/contrastive.py): image-text and speech-text are
thin subclasses that build their `ContrastivePair` and check their DataModule. Hooks, logging, the optimiser
and gradient caching live here once.

Gradient caching (`grad_cache_chunks` > 1; Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under
Memory Limited Setup") trains on contrastive batches larger than the activations that fit in memory: the loss
still sees every pair of the batch, while the towers hold the activations of one chunk of rows at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from datamodules.sections import flat_hparams
from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
    plain_sections,
)
from lightning_modules.components.retrieval import mean_recall
from lightning_modules.components.text_tower import TextTowerConfig, build_text_tower
from lightning_modules.components.towers import TowerTraining, apply_lock
from lightning_modules.training.checkpoint_io import CheckpointExtras
from lightning_modules.training.checkpoints import CheckpointError
from lightning_modules.training.ema import EMAConfig
from lightning_modules.training.nonfinite import SkipNonFiniteSteps
from lightning_modules.training.optim import OptimizerConfig
from lightning_modules.training.rng import rng_state, set_rng_state
from lightning_modules.training.strategies import shard_units

log = logging.getLogger(__name__)

# parameters, besides biases and norms, that AdamW does not decay in the contrastive systems: the temperature,
# SigLIP's bias, position tables and the ViT class token
NO_DECAY_NAMES = ("log_scale", "logit_bias", "position", "cls_token", "class_token")


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


def log_empty(module: SkipNonFiniteSteps, batch: dict, rows: int, stage: str, task: str = "") -> None:
    """Count empty batches (`{stage}/{task}empty_batches`) and undecodable items, each summed over ranks. Logged on
    every rank at every step, 0 or not, so the epoch-end sum finds the key on each."""
    if not rows and stage == "train":
        log.warning("training batch is empty (all %s items undecodable)", batch.get("skipped", "its"))
    module.log(
        f"{stage}/{task}empty_batches",
        float(rows == 0),
        reduce_fx="sum",
        on_step=False,
        on_epoch=True,
        sync_dist=True,
        add_dataloader_idx=False,
    )
    if "skipped" in batch:
        module.log(
            f"{stage}/{task}skipped_items",
            float(batch["skipped"]),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,  # on_epoch only: one all-reduce at the epoch's end, none per step
            add_dataloader_idx=False,
        )


_LOSS, _OPTIMIZER = ContrastiveLossConfig(), OptimizerConfig()


class AlignmentModule(SkipNonFiniteSteps, CheckpointExtras):
    """What every alignment system takes besides its towers; a system adds its towers' sections and passes the
    rest on as `**kwargs`, so these arguments and their documentation exist once."""

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 512,
        loss: ContrastiveLossConfig = _LOSS,
        optimizer: OptimizerConfig = _OPTIMIZER,
        max_nonfinite_in_row: int = 20,
        compile: bool = False,
        ema: EMAConfig | None = None,
    ) -> None:
        """
        Args:
            vocab_size: text vocabulary (linked from the DataModule's tokenizer by the CLI).
            embed_dim: width of the joint embedding space.
            loss: the contrastive loss and the learnable temperature it starts from (one per task).
            optimizer: AdamW and its learning-rate schedule.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            compile: torch.compile every tower's blocks, in place (parameter names, checkpoints and exports
                unchanged), after FSDP2 has sharded them when it is the strategy.
            ema: an exponential moving average of the weights (lightning_modules/training/ema.py); None: none.
        """
        super().__init__()
        self.save_hyperparameters()  # the subclasses' arguments too: this frame's callers are their __init__s
        plain_sections(self.hparams)
        self.vocab_size, self.embed_dim = vocab_size, embed_dim
        self.loss_config = as_config(ContrastiveLossConfig, loss)
        self.optimizer_config = as_config(OptimizerConfig, optimizer)
        if self.optimizer_config.layer_decay is not None:
            raise ValueError(
                "model.optimizer.layer_decay applies to the one BERT encoder of MLM pretraining and fine-tuning; "
                "an alignment system sets each tower's learning rate with model.<tower>.lr_mult"
            )
        self.max_nonfinite_in_row = max_nonfinite_in_row
        self.compile_blocks = compile

    def configure_model(self) -> None:
        super().configure_model()  # FSDP2's sharding first: compiled blocks then hold sharded parameters
        if self.compile_blocks:
            # block by block: one small graph per block type, reused by every block of a tower
            for block in shard_units(self):
                block.compile()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        # AdamW's moments of a temperature or bias saved as a scalar, for its one-element vector (the weights
        # themselves are reshaped by the pair's load hook): these systems hold no scalar parameter
        for optimizer in checkpoint.get("optimizer_states", []):
            for state in optimizer.get("state", {}).values():
                for key, value in state.items():
                    if key != "step" and isinstance(value, torch.Tensor) and value.ndim == 0:
                        state[key] = value.reshape(1)

    def towers(self) -> dict[str, tuple[nn.Module, TowerTraining]]:
        """Each tower (by its section's name) with its config; the subclass says where its towers are."""
        return {name: (getattr(self.pair, name), cfg) for name, cfg in self.tower_configs.items()}

    def lock_towers(self) -> None:
        """Apply every tower's `lock` / `unlocked_layers`, once its towers are built."""
        for name, (module, cfg) in self.towers().items():
            apply_lock(module, cfg, name)

    def configure_optimizers(self) -> dict:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return self.optimizer_config.build(
            self,
            total,
            fused=self.fused_adamw_allowed(),
            towers=self.towers(),
            no_decay_names=NO_DECAY_NAMES,
        )


class ContrastiveModule(AlignmentModule):
    """Training, evaluation and the optimiser of one `ContrastivePair` (`self.pair`, built by the subclass)."""

    pair: ContrastivePair

    def __init__(self, grad_cache_chunks: int = 1, **kwargs: Any) -> None:
        """
        Args:
            grad_cache_chunks: gradient caching: embed each training batch in this many chunks and backpropagate
                the whole batch's loss chunk by chunk, so the loss sees the whole batch while activations are held
                for one chunk; same gradients (BatchNorm aside: it normalises per chunk) for about one more
                forward pass of compute. 1 = off. Optimises manually (the trainer's gradient_clip_val still
                applies); accumulate_grad_batches must be 1.
            kwargs: `AlignmentModule`'s arguments.
        """
        super().__init__(**kwargs)
        if grad_cache_chunks < 1:
            raise ValueError(f"model.grad_cache_chunks must be at least 1, got {grad_cache_chunks}")
        self.grad_cache_chunks = grad_cache_chunks
        self.tower_configs: dict[str, Any] = {}

    def build_pair(self, pair: type[ContrastivePair], tower: nn.Module, text: TextTowerConfig) -> None:
        """`self.pair`: the subclass's tower against the text tower of `text`."""
        text_tower = build_text_tower(text, self.vocab_size, self.embed_dim)
        self.pair = pair(tower, text_tower, self.embed_dim, self.loss_config)
        self.lock_towers()

    def data_hparams(self) -> dict:
        """The DataModule's hyperparameters, its sections' fields at the top level (`flat_hparams`)."""
        dm = self.trainer.datamodule if self._trainer is not None else None
        return flat_hparams(getattr(dm, "hparams", {}))

    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        return self.pair.embed(batch, stage)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return F.normalize(self.pair.text(input_ids, attention_mask), dim=-1)

    @property
    def logit_scale(self) -> Tensor:
        return self.pair.logit_scale

    @property
    def prefixes(self) -> tuple[str, str]:
        """The retrieval directions, e.g. ("i2t", "t2i"), as the metric's keys and the W&B examples name them."""
        return self.pair.prefixes

    def _log_train(self, batch: dict, loss: Tensor, rows: int) -> None:
        # the rank-weighted loss, averaged over ranks: the loss of every rank's rows together, in the step's one
        # all-reduce (no sync_dist: that would be an all-reduce of its own every step)
        mean = self.rank_means(loss, loss=loss)["loss"]
        self.log("train/loss", mean, batch_size=rows)
        self.log("train/logit_scale", self.logit_scale.detach(), batch_size=rows)
        log_empty(self, batch, rows, "train")

    def training_step(self, batch: dict, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:  # gradient caching
            return self._grad_cache_step(batch)
        loss, rows = self.pair.training_loss(batch)
        self._log_train(batch, loss, rows)
        return self.skip_if_nonfinite(loss)

    # gradient caching -------------------------------------------------------------------------
    def cached_backward(self, batch: dict) -> Tensor:
        """Accumulate in `.grad` the gradient of the whole batch's loss, holding the activations of one chunk of
        rows at a time, and return the loss (detached).

        Pass 1 embeds every chunk without a graph, recording the random state before each. The loss over all
        embeddings, as leaves, gives d loss / d embedding and the temperature's gradient. Pass 2 embeds each
        chunk again from its recorded random state, so dropout and SpecAugment draw the same masks as in pass 1,
        and backpropagates sum(embedding * d loss / d embedding): by the chain rule, exactly this chunk's share
        of d loss / d parameters. The temperature's gradient joins the last chunk's backward, counted once.

        A loss that is NaN or Inf runs both passes too: whether to skip is decided on the device, after this
        (`_grad_cache_step`), so its gradients are NaN and the optimizer step leaves the weights as they were
        (BatchNorm's running statistics take the batch, as in automatic optimisation).
        """
        pair = self.pair
        rows = pair.rows(batch)
        if rows == 0:  # nothing to chunk: the empty batch's connected zero, through the same collectives
            loss = pair.training_loss(batch)[0]
            self._backward(loss, sync=True)
            return loss.detach()
        chunks = pair.split_batch(batch, self.grad_cache_chunks)
        states, parts = [], []
        with torch.no_grad(), _running_stats_kept(self):  # pass 2 updates BatchNorm statistics, once
            for chunk in chunks:
                states.append(rng_state())
                parts.append(pair.embed(chunk, "train"))
        e = PairEmbeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in _ROW_FIELDS))
        a = e.a.detach().float().requires_grad_()
        b = e.b.detach().float().requires_grad_()
        sizes = pair.row_counts(rows)  # the step's one gather of the row counts, for the loss and the weight
        loss = pair.loss(replace(e, a=a, b=b), sizes) * pair.rank_weight(rows, sizes)

        temperature = [p for p in (pair.log_scale, pair.logit_bias) if p is not None]
        grad_a, grad_b, *grad_t = torch.autograd.grad(loss, [a, b, *temperature], allow_unused=True)
        # losses on raw cosines (triplet, N-pair, circle) leave the temperature without a gradient, as usual
        temperature_term = sum((p * g).sum() for p, g in zip(temperature, grad_t) if g is not None)
        start = 0
        for i, (chunk, state) in enumerate(zip(chunks, states)):
            set_rng_state(state)
            part = pair.embed(chunk, "train")
            rows_of_chunk = slice(start, start + len(part.a))
            start = rows_of_chunk.stop
            surrogate = (part.a.float() * grad_a[rows_of_chunk]).sum() + (
                part.b.float() * grad_b[rows_of_chunk]
            ).sum()
            last = i == len(chunks) - 1
            self._backward(surrogate + temperature_term if last else surrogate, sync=last)
        return loss.detach()

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
        """The step automatic optimisation would take, by hand: the non-finite flag travels in the step's one
        all-reduce with the logged loss (`_log_train`), the skip is counted on the device (`skip_if_nonfinite`)
        and taken there by fused AdamW (`step_unless_nonfinite`). The LR schedule advances on every batch,
        skipped or not, as Lightning's automatic loop does. An optimizer without a device-side skip reads the flag
        on the host; its skipped step does not count as a global step, so the row of skips is checked right there,
        not left to a logging step that might not come."""
        optimizer = self.optimizers()
        optimizer.zero_grad()
        loss = self.cached_backward(batch)
        self._log_train(batch, loss, self.pair.rows(batch))
        self.skip_if_nonfinite(loss)
        # gradients are clipped in `on_before_optimizer_step`, inside the step, after AMP unscaling
        if not self.step_unless_nonfinite(optimizer, optimizer.step):
            self.check_nonfinite_skips()  # the flag has just been read on the host: no sync of its own
        self.lr_schedulers().step()  # Lightning leaves the per-step schedule to the module in manual optimisation
        return loss

    def setup(self, stage: str) -> None:
        data = self.data_hparams()
        for config in self.tower_configs.values():  # the DataModule's texts, images, audio fit the towers
            config.check_data(data, "data")
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
            # the trainer's gradient_clip_val and algorithm (none when unset), through the hook that also clips
            # fused AdamW under bf16-mixed (`SkipNonFiniteSteps.configure_gradient_clipping`)
            trainer = self.trainer
            self.configure_gradient_clipping(
                optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
            )

    # evaluation -------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, stage: str) -> None:
        rows = self.pair.rows(batch)
        loss, _ = self.pair.evaluate(batch, stage)
        self.log(f"{stage}/loss", loss, sync_dist=True, batch_size=rows)
        log_empty(self, batch, rows, stage)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _log_retrieval(self, stage: str) -> None:
        metric = self.pair.retrieval[stage]
        if not metric.update_called:
            return
        recalls = metric.compute()
        # the items scored, each once over every process (EvaluationReport writes them into results.json)
        counts, (a, b) = metric.counts(), self.pair.sides
        self.counted = {a: counts["a"], b: counts["b"]}
        values = {f"{stage}/{k}": v for k, v in recalls.items()}
        values[f"{stage}/R@mean"] = mean_recall(recalls)  # what the configs' best checkpoint monitors
        self.log_dict(values, prog_bar=stage == "val")
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_retrieval("val")

    def on_test_epoch_end(self) -> None:
        self._log_retrieval("test")


def trained_text_section(text: dict | None) -> dict:
    """A saved `text` section whose start is an MLM checkpoint of this framework (init.source ours, or
    init_ckpt) made a scratch start: the architecture is the section's own either way, and the trained weights
    that follow replace the start's, so the MLM file is not read again (nor needed)."""
    text = dict(text or {})
    init = dict(text.get("init") or {})
    if init.get("source") == "ours":
        text["init"] = {**init, "source": "scratch", "path": None}
    text["init_ckpt"] = None
    return text


def load_pair_weights(
    pair: ContrastivePair, ckpt: dict, path: str | os.PathLike, what: str
) -> ContrastivePair:
    """`pair` (a system's contrastive core, built from the checkpoint's sections) with the checkpoint's trained
    weights, in eval mode; weights outside `pair.` (another model's) are refused naming the file."""
    state = ckpt["state_dict"]
    others = sorted(k for k in state if not k.startswith("pair."))
    if others:
        raise CheckpointError(f"{path}: weights outside the {what} model ({', '.join(others[:3])}, ...)")
    pair.load_state_dict({k.removeprefix("pair."): v for k, v in state.items()})
    return pair.eval()
