"""CLIP-style image-text alignment (COCO Captions): an image tower and a BERT text tower in one joint space.

a = images, b = captions. Two captions of the same image are positives of each other: in training they share
the image id as their group, so a batch that holds one image twice never treats its captions as negatives; in
evaluation every image is embedded once against all its captions and Recall@K counts any of them as a hit.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from datamodules.sections import flat_hparams
from lightning_modules.checkpoints import CheckpointError, check_system, read_checkpoint
from lightning_modules.components.clip_import import load_clip
from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
)
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTower, TextTowerConfig
from lightning_modules.components.towers import TowerInit
from lightning_modules.contrastive_module import ContrastiveModule
from lightning_modules.prediction import embedding_prediction

log = logging.getLogger(__name__)

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
        clip = as_config(TowerInit, init_clip or {})  # None: a scratch start
        if clip.source == "scratch":
            self.clip_preprocess = None
            self.build_pair(ImageTextPair, ImageTower(image, self.embed_dim), text)
            return
        parts = load_clip(clip)
        for what, ours, theirs in (
            ("model.embed_dim", self.embed_dim, parts.embed_dim),
            ("model.image.image_size", image.image_size, parts.image_size),
            ("model.vocab_size (the DataModule's tokenizer)", self.vocab_size, parts.vocab_size),
        ):
            if ours != theirs:
                raise ValueError(
                    f"{what} is {ours} but the CLIP checkpoint's is {theirs}: set it to {theirs} "
                    "(data.tokenizer.path: the same checkpoint gives its tokenizer)"
                )
        self.clip_preprocess = {
            "image_size": parts.image_size,
            "mean": parts.mean,
            "std": parts.std,
            "resize": parts.image.reference_resize,
        }
        self.pair = ImageTextPair(
            ImageTower(image, None, backbone=parts.image), parts.text, self.embed_dim, self.loss_config
        )
        with torch.no_grad():
            self.pair.log_scale.fill_(parts.log_scale)
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
        return F.normalize(self.pair.image(images), dim=-1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Unit embeddings of the batch's images and captions, with their ids (`PredictionWriter`)."""
        return embedding_prediction(batch, image=self.encode_image, text=self.encode_text)


def _trained_text_section(text: dict | None) -> dict:
    """A saved `text` section whose start is an MLM checkpoint of this framework (init.source ours, or the older
    init_ckpt) made a scratch start: the architecture is the section's own either way, and the trained weights
    that follow replace the start's, so the MLM file is not read again (nor needed)."""
    text = dict(text or {})
    init = dict(text.get("init") or {})
    if init.get("source") == "ours":
        text["init"] = {**init, "source": "scratch", "path": None}
    text["init_ckpt"] = None
    return text


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


def image_text_from_checkpoint(path: str | os.PathLike, asked_by: str) -> tuple[ImageTextModule, dict]:
    """The `ImageTextModule` of a checkpoint file (eval mode), and the checkpoint's contents.

    Read through `read_checkpoint` (weights_only, memory-mapped). The architecture comes from the saved
    hyperparameters and the trained weights follow; a text tower's MLM start is not read again, other pretrained
    starts (init_clip, Hugging Face folders) are, for their architecture. `asked_by` names the caller in the error
    raised for a checkpoint of another system ("export", "zero-shot").
    """
    ckpt = read_checkpoint(path, needs=("state_dict", "hyper_parameters"))
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_")}
    if "image_arch" in hparams or "max_text_len" in hparams:
        raise CheckpointError(
            f"{path} was written before the towers became config sections (model.image, model.text): "
            "this version cannot rebuild its model; train it again with the current configs"
        )
    check_system(path, ckpt, ImageTextModule, asked_by)
    hparams["text"] = _trained_text_section(hparams.get("text"))
    image = dict(hparams.get("image") or {})
    image.update(recorded_statistics(image, ckpt.get("datamodule_hyper_parameters") or {}))
    hparams["image"] = image
    # In a fresh context: LightningCLI hands the hyperparameters of the module it instantiates (the caller's, such
    # as a ZeroShotClassifier) to every `save_hyperparameters` through a context variable, which would give them
    # to this model.
    model = contextvars.Context().run(ImageTextModule, **hparams)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval(), ckpt
