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
from lightning_modules.components.text_tower import TextTower, TextTowerConfig
from lightning_modules.contrastive_module import ContrastiveModule
from lightning_modules.prediction import embedding_prediction

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
            kwargs: vocab_size, embed_dim, loss, optimizer, max_nonfinite_in_row and grad_cache_chunks, the
                arguments every contrastive system takes (`ContrastiveModule`, `AlignmentModule`).
        """
        super().__init__(**kwargs)
        image, text = as_config(ImageTowerConfig, image), as_config(TextTowerConfig, text)
        self.tower_configs = {"image": image, "text": text}
        self.build_pair(ImageTextPair, ImageTower(image, self.embed_dim), text)

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) unit vectors."""
        return F.normalize(self.pair.image(images), dim=-1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Unit embeddings of the batch's images and captions, with their ids (`PredictionWriter`)."""
        rows = {}
        if batch.get("image_keys"):
            rows["image"] = (batch["image_keys"], self.encode_image(batch["images"]))
        if batch.get("text_keys"):
            rows["caption"] = (
                batch["text_keys"],
                self.encode_text(batch["input_ids"], batch["attention_mask"]),
            )
        return embedding_prediction(rows, batch)
