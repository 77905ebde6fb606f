"""CLIP-style image-text alignment (COCO Captions): an image tower and a BERT text tower in one joint space.

a = images, b = captions. Two captions of the same image are positives of each other: in training they share
the image id as their group, so a batch that holds one image twice never treats its captions as negatives; in
evaluation every image is embedded once against all its captions and Recall@K counts any of them as a hit.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor

from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
)
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTower, TextTowerConfig, build_text_tower
from lightning_modules.contrastive_module import ContrastiveModule

_IMAGE, _TEXT = ImageTowerConfig(), TextTowerConfig()


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
        self, image: ImageTowerConfig = _IMAGE, text: TextTowerConfig = _TEXT, **kwargs: Any
    ) -> None:
        """
        Args:
            image: the image tower (model.image.arch, .image_size, ...).
            text: the text tower (model.text.size, .max_len, ...).
            kwargs: `ContrastiveModule`'s and `AlignmentModule`'s arguments: vocab_size, embed_dim, loss, optimizer,
                max_nonfinite_in_row, grad_cache_chunks.
        """
        super().__init__(**kwargs)
        image, text = as_config(ImageTowerConfig, image), as_config(TextTowerConfig, text)
        self.image_config, self.text_config = image, text
        self.pair = ImageTextPair(
            ImageTower(image, self.embed_dim),
            build_text_tower(text, self.vocab_size, self.embed_dim),
            self.embed_dim,
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
