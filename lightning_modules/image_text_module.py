"""CLIP-style image-text alignment (COCO Captions): an image tower and a BERT text tower in one joint space.

a = images, b = captions. Two captions of the same image are positives of each other: in training they share
the image id as their group, so a batch that holds one image twice never treats its captions as negatives; in
evaluation every image is embedded once against all its captions and Recall@K counts any of them as a hit.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
    plain_sections,
)
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTower, TextTowerConfig, build_text_tower
from lightning_modules.contrastive_module import ContrastiveModule, OptimizerConfig

_IMAGE, _TEXT, _LOSS, _OPTIMIZER = (
    ImageTowerConfig(),
    TextTowerConfig(),
    ContrastiveLossConfig(),
    OptimizerConfig(),
)


class ImageTextPair(ContrastivePair):
    """Images (a) against captions (b); logs `i2t` (image -> text) and `t2i` retrieval."""

    rows_key = "image_ids"
    row_keys = ("images", "input_ids", "attention_mask", "image_ids", "caption_ids")

    def __init__(
        self, image: ImageTower, text: TextTower, embed_dim: int, loss: ContrastiveLossConfig
    ) -> None:
        super().__init__(embed_dim, loss, prefixes=("i2t", "t2i"))
        self.image = image
        self.text = text

    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        image_ids = batch["image_ids"]
        images = self.image(batch["images"])
        captions = self.text(batch["input_ids"], batch["attention_mask"])
        if stage == "train":  # one caption per image row
            return PairEmbeddings(images, captions, image_ids, image_ids, batch["caption_ids"], image_ids)
        # each image once, all its captions; the loss pairs every image with its first caption
        caption_image_ids = batch["caption_image_ids"]
        first = (caption_image_ids[None, :] == image_ids[:, None]).float().argmax(1)
        return PairEmbeddings(
            images, captions, image_ids, image_ids, batch["caption_ids"], caption_image_ids, first
        )


class ImageTextModule(ContrastiveModule):
    """Aligns images with captions; logs `val/i2t_R@K` (image -> text), `val/t2i_R@K` and `val/loss`."""

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 512,
        image: ImageTowerConfig = _IMAGE,
        text: TextTowerConfig = _TEXT,
        loss: ContrastiveLossConfig = _LOSS,
        optimizer: OptimizerConfig = _OPTIMIZER,
        max_nonfinite_in_row: int = 20,
        grad_cache_chunks: int = 1,
    ) -> None:
        """
        Args:
            vocab_size: text vocabulary (linked from the DataModule's tokenizer by the CLI).
            embed_dim: width of the joint embedding space.
            image: the image tower (model.image.arch, .image_size, ...).
            text: the text tower (model.text.size, .max_len, ...).
            loss: the contrastive loss and its learnable temperature.
            optimizer: AdamW and its learning-rate schedule.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            grad_cache_chunks: gradient caching: embed each training batch in this many chunks and backpropagate
                the whole batch's loss chunk by chunk, so the loss sees the whole batch while activations are held
                for one chunk; same gradients (BatchNorm aside: it normalises per chunk) for about one more
                forward pass of compute. 1 = off. Optimises manually (the trainer's gradient_clip_val still
                applies); accumulate_grad_batches must be 1.
        """
        super().__init__(loss, optimizer, max_nonfinite_in_row, grad_cache_chunks)
        self.save_hyperparameters()
        plain_sections(self.hparams)
        image, text = as_config(ImageTowerConfig, image), as_config(TextTowerConfig, text)
        self.image_config, self.text_config = image, text
        self.pair = ImageTextPair(
            ImageTower(image, embed_dim),
            build_text_tower(text, vocab_size, embed_dim),
            embed_dim,
            self.loss_config,
        )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        check_text_length(getattr(dm, "hparams", {}), self.text_config, "data")
        check_image_size(getattr(dm, "hparams", {}), self.image_config, "data")

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) unit vectors."""
        return F.normalize(self.pair.image(images), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return F.normalize(self.pair.text(input_ids, attention_mask), dim=-1)


def check_text_length(data: dict, text: TextTowerConfig, where: str) -> None:
    """The DataModule's captions/transcripts must fit the text tower's position table."""
    if data.get("context_length", 0) > text.max_len:
        raise ValueError(
            f"{where}.context_length ({data['context_length']}) exceeds model.text.max_len ({text.max_len}), "
            "the text tower's position table"
        )


def check_image_size(data: dict, image: ImageTowerConfig, where: str) -> None:
    """A ViT's position table is made for one image size: the DataModule's."""
    if image.arch != "resnet50" and data.get("image_size", image.image_size) != image.image_size:
        raise ValueError(
            f"{where}.image_size ({data['image_size']}) differs from model.image.image_size ({image.image_size}), "
            "the size the ViT's position table is made for"
        )
