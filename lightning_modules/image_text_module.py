"""CLIP-style image-text alignment (COCO Captions): an image tower and a BERT text tower in one joint space.

a = images, b = captions. Two captions of the same image are positives of each other: in training they share
the image id as their group, so a batch that holds one image twice never treats its captions as negatives; in
evaluation every image is embedded once against all its captions and Recall@K counts any of them as a hit.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from lightning_modules.components.bert import BertConfig
from lightning_modules.components.encoder import SizeName
from lightning_modules.components.image_tower import ImageArch, ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTower, load_mlm_encoder
from lightning_modules.contrastive_module import ContrastiveModule, PairEmbeddings
from lightning_modules.optim import Schedule
from lightning_modules.resilience import zero_loss

log = logging.getLogger(__name__)

BLANK_ID = -1  # key and group of the stand-in rows of an empty batch; COCO ids are never negative


class ImageTextModule(ContrastiveModule):
    """Aligns images with captions; logs `val/i2t_R@K` (image -> text) and `val/t2i_R@K`."""

    row_keys = ("images", "input_ids", "attention_mask", "image_ids", "caption_ids")

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 512,
        image_arch: ImageArch = "vit_b_16",
        image_size: int = 224,
        vit_patch_size: int | None = None,
        vit_layers: int | None = None,
        vit_width: int | None = None,
        vit_heads: int | None = None,
        vit_mlp_dim: int | None = None,
        image_dropout: float = 0.0,
        text_size: SizeName = "base",
        text_layers: int | None = None,
        text_hidden: int | None = None,
        text_heads: int | None = None,
        text_dropout: float = 0.0,
        text_pooling: Literal["cls", "first", "mean"] = "first",
        max_text_len: int = 77,
        text_init_ckpt: str | None = None,
        gradient_checkpointing: bool = False,
        loss: Literal["infonce", "siglip", "triplet", "npair", "circle"] = "infonce",
        loss_kwargs: dict | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int | float = 0.05,
        schedule: Schedule = "cosine",
        max_nonfinite_in_row: int = 20,
        grad_cache_chunks: int = 1,
    ) -> None:
        """
        Args:
            vocab_size: text vocabulary (linked from the DataModule's tokenizer by the CLI).
            embed_dim: width of the joint embedding space.
            image_arch: vit_b_16, vit_b_32, vit_tiny (CPU), vit_custom (patch 32, 4 x 256 unless overridden)
                or resnet50.
            image_size: input side in pixels; must equal the DataModule's image_size for the ViTs.
            vit_patch_size: override the ViT preset's patch side.
            vit_layers: override the ViT preset's layer count.
            vit_width: override the ViT preset's width (heads default to width / 64).
            vit_heads: override the ViT preset's head count.
            vit_mlp_dim: ViT feed-forward width (default 4 x width).
            image_dropout: dropout in the ViT (also attention dropout); CLIP uses none.
            text_size: BERT preset of the text tower; the three below override it.
            text_layers: override the text preset's layer count.
            text_hidden: override the text preset's width (heads default to width / 64).
            text_heads: override the text preset's head count.
            text_dropout: dropout in the text tower (also attention dropout); CLIP uses none.
            text_pooling: 'first' ([CLS] state), 'cls' (BERT's tanh pooler) or 'mean'.
            max_text_len: the text tower's position table; at least the DataModule's context_length, and equal
                to the MLM checkpoint's max_position_embeddings when one is loaded.
            text_init_ckpt: an `MLMPretrainingModule` checkpoint of this framework to start the text tower
                from (sizes and tokenizer must be the checkpoint's: pass its vocab as --data.tokenizer).
            gradient_checkpointing: recompute the text tower's Transformer blocks in backward to save memory.
            loss: contrastive loss of the shared loss library.
            loss_kwargs: extra arguments of the loss (e.g. {"gather": false}, {"margin": 0.2}).
            init_logit_scale: initial inverse temperature (CLIP: 1 / 0.07).
            max_logit_scale: clamp of the inverse temperature (CLIP: 100).
            init_logit_bias: initial logit bias (SigLIP: -10); None for no bias.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW decay on matrices.
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: linear warmup steps, or a fraction of all steps when < 1.
            schedule: decay after warmup: linear, cosine or constant.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            grad_cache_chunks: gradient caching: embed each training batch in this many chunks and backpropagate
                the whole batch's loss chunk by chunk, so the loss sees the whole batch while activations are held
                for one chunk; same gradients (BatchNorm aside: it normalises per chunk) for about one more
                forward pass of compute. 1 = off. Optimises manually (the trainer's gradient_clip_val still
                applies); accumulate_grad_batches must be 1.
        """
        super().__init__(
            loss=loss,
            loss_kwargs=loss_kwargs,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            init_logit_bias=init_logit_bias,
            prefixes=("i2t", "t2i"),
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            schedule=schedule,
            max_nonfinite_in_row=max_nonfinite_in_row,
            grad_cache_chunks=grad_cache_chunks,
        )
        self.save_hyperparameters()
        image_cfg = ImageTowerConfig(
            arch=image_arch,
            image_size=image_size,
            patch_size=vit_patch_size,
            layers=vit_layers,
            width=vit_width,
            heads=vit_heads,
            mlp_dim=vit_mlp_dim,
            dropout=image_dropout,
            attention_dropout=image_dropout,
        )
        self.image = ImageTower(image_cfg, embed_dim)
        text_cfg = BertConfig.from_size(
            text_size,
            num_layers=text_layers,
            hidden_size=text_hidden,
            num_heads=text_heads or (text_hidden // 64 if text_hidden else None),
            dropout=text_dropout,
            attention_dropout=text_dropout,
            vocab_size=vocab_size,
            max_position_embeddings=max_text_len,
        )
        self.text = TextTower(text_cfg, embed_dim, text_pooling)
        if text_init_ckpt:
            load_mlm_encoder(self.text, text_init_ckpt)
        self.text.bert.encoder.gradient_checkpointing = gradient_checkpointing

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        hp = getattr(dm, "hparams", {})
        if hp.get("context_length", 0) > self.hparams.max_text_len:
            raise ValueError(
                f"data.context_length ({hp['context_length']}) exceeds model.max_text_len "
                f"({self.hparams.max_text_len}), the text tower's position table"
            )
        if self.hparams.image_arch != "resnet50" and hp.get("image_size", self.hparams.image_size) != (
            self.hparams.image_size
        ):
            raise ValueError(
                f"data.image_size ({hp['image_size']}) differs from model.image_size ({self.hparams.image_size}), "
                "the size the ViT's position table is made for"
            )

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    # ContrastiveModule ------------------------------------------------------------------------
    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        image_ids = batch["image_ids"]
        if len(image_ids) == 0:
            return self._blank(batch)
        images = self.image(batch["images"])
        captions = self.text(batch["input_ids"], batch["attention_mask"])
        if stage == "train":  # one caption per image row
            e = PairEmbeddings(images, captions, image_ids, image_ids, batch["caption_ids"], image_ids)
        else:  # each image once, all its captions; the loss pairs every image with its first caption
            caption_image_ids = batch["caption_image_ids"]
            first = (caption_image_ids[None, :] == image_ids[:, None]).float().argmax(1)
            e = PairEmbeddings(
                images, captions, image_ids, image_ids, batch["caption_ids"], caption_image_ids, first
            )
        return e

    # Empty batches (every image in it failed to decode) --------------------------------------
    # Training returns a zero loss connected to every parameter, never None: under DDP every rank must join
    # the gradient all-reduce of every step, and a rank that returned None would hang the others. Batches
    # that only lost some images need nothing: the loss gathers uneven per-rank batches. But when it gathers,
    # an empty rank must still join its all_gather, and a loss over zero rows is NaN: such a rank embeds one
    # blank image and one empty caption in place of its batch (the other ranks see one extra negative) and
    # multiplies its own loss by zero.
    def _gathering(self) -> bool:
        gather = bool(getattr(self.loss_fn, "gather", False))
        return gather and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1

    def _blank(self, batch: dict) -> PairEmbeddings:
        images = batch["images"].new_zeros(1, *batch["images"].shape[1:])
        ids = batch["input_ids"].new_zeros(1, 1)  # a lone [PAD] token, attended to
        a = self.image(images)
        b = self.text(ids, torch.ones_like(ids, dtype=torch.bool))
        blank = torch.tensor([BLANK_ID], device=a.device)
        return PairEmbeddings(a, b, blank, blank, blank, blank)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if len(batch["image_ids"]):
            return super().training_step(batch, batch_idx)
        log.warning("training batch %d is empty (all %d images undecodable)", batch_idx, batch["skipped"])
        self._log_skipped(batch, "train")
        if self._gathering():
            loss = self.pair_loss(self.embed(batch, "train")) * 0.0
        else:
            loss = zero_loss(self)
        return self._manual_zero_loss_step(loss)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_or_skip(batch, batch_idx, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_or_skip(batch, batch_idx, "test")

    def _eval_or_skip(self, batch: dict, batch_idx: int, stage: str) -> None:
        if len(batch["image_ids"]):
            self._eval_step(batch, stage)
            return
        self._log_skipped(batch, stage)
        if self._gathering():  # join the other ranks' all_gather; the blank row is not scored
            self.pair_loss(self.embed(batch, stage))
