"""CLIP-style image-text alignment (COCO Captions): an image tower and a BERT text tower in one joint space.

a = images, b = captions. Two captions of the same image are positives of each other: in training they share
the image id as their group, so a batch that holds one image twice never treats its captions as negatives; in
evaluation every image is embedded once against all its captions and Recall@K counts any of them as a hit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.sections import flat_hparams
from lightning_modules.components.clip_import import ClipParts, load_clip
from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
)
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTower, TextTowerConfig, build_text_tower
from lightning_modules.components.towers import TowerInit
from lightning_modules.contrastive_module import ContrastiveModule, load_pair_weights, trained_text_section
from lightning_modules.training.checkpoints import CheckpointError, check_system, read_checkpoint
from lightning_modules.training.prediction import embedding_prediction

log = logging.getLogger(__name__)

_IMAGE, _TEXT = ImageTowerConfig(), TextTowerConfig()


class ImageTextPair(ContrastivePair):
    """Images (a) against captions (b); logs `i2t` (image -> text) and `t2i` retrieval."""

    rows_key = "image_ids"
    sides = ("images", "captions")
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

    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (or float ones already normalised) -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)


def build_image_text_pair(
    image: ImageTowerConfig,
    text: TextTowerConfig,
    init_clip: TowerInit | dict | None,
    vocab_size: int,
    embed_dim: int,
    loss: ContrastiveLossConfig,
) -> tuple[ImageTextPair, dict | None]:
    """The contrastive core of `ImageTextModule`'s sections (towers unlocked), and the preprocessing of its CLIP
    source ({image_size, mean, std, resize}; None for towers started one by one)."""
    clip = as_config(TowerInit, init_clip or {})  # None: a scratch start
    if clip.source == "scratch":
        image_tower = ImageTower(image, embed_dim)  # first: a seed gives the weights it always gave
        text_tower = build_text_tower(text, vocab_size, embed_dim)
        return ImageTextPair(image_tower, text_tower, embed_dim, loss), None
    parts = load_clip(clip)
    for what, ours, theirs in (
        ("model.embed_dim", embed_dim, parts.embed_dim),
        ("model.image.image_size", image.image_size, parts.image_size),
        ("model.vocab_size (the DataModule's tokenizer)", vocab_size, parts.vocab_size),
    ):
        if ours != theirs:
            raise ValueError(
                f"{what} is {ours} but the CLIP checkpoint's is {theirs}: set it to {theirs} "
                "(data.tokenizer.path: the same checkpoint gives its tokenizer)"
            )
    return clip_image_text_pair(parts, image, loss), clip_preprocessing(parts)


def clip_image_text_pair(
    parts: ClipParts, image: ImageTowerConfig, loss: ContrastiveLossConfig
) -> ImageTextPair:
    """The contrastive core of a whole CLIP's parts: its towers and its temperature."""
    pair = ImageTextPair(ImageTower(image, None, backbone=parts.image), parts.text, parts.embed_dim, loss)
    with torch.no_grad():
        pair.log_scale.fill_(parts.log_scale)
    return pair


def clip_preprocessing(parts: ClipParts) -> dict:
    """How a whole CLIP's source preprocesses images: {image_size, mean, std, resize}."""
    return {
        "image_size": parts.image_size,
        "mean": parts.mean,
        "std": parts.std,
        "resize": parts.image.reference_resize,
    }


class ImageTextModule(ContrastiveModule):
    """Aligns images with captions; logs `val/i2t_R@K` (image -> text), `val/t2i_R@K` and `val/loss`."""

    def __init__(
        self,
        image: ImageTowerConfig = _IMAGE,
        text: TextTowerConfig = _TEXT,
        init_clip: TowerInit | None = None,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            image: the image tower (model.image.arch, .image_size, ...; .init for pretrained weights).
            text: the text tower (model.text.size, .max_len, ...).
            init_clip: start from a whole CLIP model: image tower, text tower, projections and temperature from
                one open_clip checkpoint ({source: open_clip, name: ViT-B-32, path: FILE}) or one Hugging Face
                CLIPModel folder ({source: hf, path: DIR}). The towers' sizes and init sections are then ignored
                (their lock, unlocked_layers and lr_mult apply); embed_dim, image_size, vocab_size and the
                DataModule's tokenizer (data.tokenizer: the same checkpoint) must be the checkpoint's.
            kwargs: vocab_size, embed_dim, loss, optimizer, max_nonfinite_in_row and grad_cache_chunks, the
                arguments every contrastive system takes (`ContrastiveModule`, `AlignmentModule`).
        """
        super().__init__(**kwargs)
        image, text = as_config(ImageTowerConfig, image), as_config(TextTowerConfig, text)
        self.tower_configs = {"image": image, "text": text}
        self.pair, self.clip_preprocess = build_image_text_pair(
            image, text, init_clip, self.vocab_size, self.embed_dim, self.loss_config
        )
        self.lock_towers()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        data = checkpoint.get("datamodule_hyper_parameters") or {}
        adopt_recorded_statistics(self.pair.image, self.hparams["image"], data)

    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = self.data_hparams()
        self.pair.image.check_data(data, "data")
        want = self.pair.image.reference_resize  # None for a scratch tower: any mode
        if data and want and data.get("resize", "tensor") != want:
            message = (
                f"data.images.resize ({data.get('resize', 'tensor')}) is not {want}, the mode that reproduces the "
                "preprocessing of the image tower's source"
            )
            if self.clip_preprocess:  # a whole CLIP is evaluated on exactly its library's pixels
                raise ValueError(f"{message}: set data.images.resize {want}")
            log.warning(
                "%s: its evaluation crops differ from the reference's by resampling or a pixel", message
            )

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (or float ones already normalised) -> (B, embed_dim) unit vectors."""
        return self.pair.encode_image(images)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Unit embeddings of the batch's images and captions, with their ids (`PredictionWriter`)."""
        return embedding_prediction(batch, image=self.encode_image, text=self.encode_text)


def recorded_statistics(image: Mapping[str, Any], data: Mapping[str, Any]) -> dict[str, tuple[float, ...]]:
    """The mean and std a run's DataModule named (its hyperparameters `data`) where the image section `image`
    leaves them unset: the tower was trained on pixels normalised with them, and normalises with the same.
    `data` may be nested (`images.mean`) or flat (`mean`)."""
    data = flat_hparams(data)
    return {
        key: tuple(float(v) for v in data[key])
        for key in ("mean", "std")
        if image.get(key) is None and data.get(key) is not None
    }


def adopt_recorded_statistics(tower: ImageTower, image: dict[str, Any], data: Mapping[str, Any]) -> None:
    """On resuming a run (`on_load_checkpoint`): where the checkpoint's DataModule named a mean and std
    (`recorded_statistics`) other than the tower's own, the tower takes them, its section `image` (the saved
    hyperparameters) records them for the next checkpoints, and one warning line says so."""
    adopted = recorded_statistics(image, data)
    own = {key: [float(v) for v in getattr(tower, f"pixel_{key}").flatten()] for key in adopted}
    # 1e-6: the configs' 8-digit numbers against their float32 copies
    if all(abs(a - b) <= 1e-6 for key in adopted for a, b in zip(adopted[key], own[key], strict=True)):
        return
    for key, value in adopted.items():
        with torch.no_grad():
            getattr(tower, f"pixel_{key}").copy_(torch.tensor(value).view(1, 3, 1, 1))
        image[key] = value
        setattr(tower.cfg, key, value)
    log.warning(
        "the checkpoint's DataModule normalised the images with %s: the image tower takes them in place of "
        "%s (its source's; set model.image.mean / model.image.std to choose)",
        ", ".join(f"{key} {list(value)}" for key, value in adopted.items()),
        ", ".join(f"{key} {[float(f'{v:.7g}') for v in own[key]]}" for key in adopted),  # float32's digits
    )


def image_text_from_checkpoint(path: str | os.PathLike, asked_by: str) -> tuple[ImageTextPair, dict]:
    """The contrastive core (`ImageTextPair`, eval mode) of an `ImageTextModule` checkpoint, and the checkpoint.

    Read through `read_checkpoint` (weights_only, memory-mapped). The towers are built from the saved
    hyperparameters by `build_image_text_pair`, as the system builds them, and the trained weights follow; a text
    tower's MLM start is not read again, other pretrained starts (init_clip, Hugging Face folders) are, for their
    architecture. `asked_by` names the caller in the error raised for a checkpoint of another system ("export",
    "zero-shot").
    """
    ckpt = read_checkpoint(path, needs=("state_dict", "hyper_parameters"))
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    if "image_arch" in hparams or "max_text_len" in hparams:
        raise CheckpointError(
            f"{path} was written before the towers became config sections (model.image, model.text): "
            "this version cannot rebuild its model; train it again with the current configs"
        )
    check_system(path, ckpt, ImageTextModule, asked_by)
    image = dict(hparams.get("image") or {})
    image.update(recorded_statistics(image, ckpt.get("datamodule_hyper_parameters") or {}))
    pair, _ = build_image_text_pair(
        as_config(ImageTowerConfig, image),
        as_config(TextTowerConfig, trained_text_section(hparams.get("text"))),
        hparams.get("init_clip"),
        hparams["vocab_size"],
        hparams["embed_dim"],
        as_config(ContrastiveLossConfig, hparams["loss"]),
    )
    return load_pair_weights(pair, ckpt, path, "image-text"), ckpt
