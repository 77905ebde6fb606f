"""Config sections every DataModule shares: how batches are loaded and which tokenizer turns text into ids.

A DataModule takes them as `loader: LoaderConfig` and `tokenizer: TokenizerConfig`, so the same setting has one
spelling in every config (`--data.loader.batch_size 64`, `--data.tokenizer.path vocab.txt`); image DataModules
also take `images: ImagesConfig`, and those that stream WebDataset tars `shards: ShardsConfig`.

A DataModule saves its sections as plain dicts (`plain_sections`), so a checkpoint loads with
`torch.load(weights_only=True)`. Code that reads a DataModule's saved hyperparameters reads them through
`data_setting` or `flat_hparams`, which also read the flat spelling (`tokenizer: vocab.txt`, `image_size: 224`)
of hyperparameters saved by DataModules that took no sections.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import asdict, dataclass, is_dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import torch

if TYPE_CHECKING:
    from datamodules.tokenizer import TextTokenizer

S = TypeVar("S")

# the reference pipelines evaluation images are resized and cropped with (datamodules/image/coco.py)
Resize = Literal["tensor", "pil", "torchvision"]


@dataclass
class LoaderConfig:
    """Batching and worker settings of a DataModule's loaders."""

    batch_size: int = 32
    """Training examples per batch and device."""
    eval_batch_size: int | None = None
    """Examples per validation, test and predict batch; None: `batch_size`."""
    num_workers: int = 4
    """DataLoader worker processes per device."""
    seed: int = 0
    """Seed of the shuffling and of random augmentations (each epoch and rank derive their own)."""
    pin_memory: bool | None = None
    """Page-lock batches for faster host-to-GPU copies; None: exactly when CUDA is available."""

    @property
    def eval_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory


@dataclass
class TokenizerConfig:
    """The WordPiece tokenizer of a DataModule: loaded from `path`, or trained on the training text once and cached."""

    path: str | None = None
    """A vocab.txt, tokenizer.json or a folder holding one; None trains one on the training text."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer."""
    lowercase: bool = True
    """Lowercase text before WordPiece (uncased models)."""
    strip_accents: bool | None = None
    """Remove accents; None: exactly when lowercasing (BERT-uncased's rule)."""
    cache_dir: str | None = "data_cache"
    """Folder the trained vocabulary is cached in, with what else the DataModule derives from its data (prepared
    instances, audio indexes); None: `$XDG_CACHE_HOME/mmpretrain`. The framework owns what it writes there."""

    @property
    def cache(self) -> str:
        """`cache_dir`, or the per-user cache folder when it is None."""
        from datamodules.generated import default_cache_dir

        return os.fspath(self.cache_dir) if self.cache_dir else os.fspath(default_cache_dir())

    def build(
        self, texts: Iterable[str] | Callable[[], Iterable[str]] | None, key: str | None = None
    ) -> TextTokenizer:
        """The tokenizer: `path` when given, else one trained on `texts` (see `build_tokenizer`)."""
        from datamodules.tokenizer import build_tokenizer

        return build_tokenizer(
            self.path,
            texts,
            self.cache,
            self.vocab_size,
            self.lowercase,
            key=key,
            strip_accents=self.strip_accents,
        )


@dataclass
class ImagesConfig:
    """How images become the uint8 crops of a batch (the image tower scales and normalises them on the device)."""

    image_size: int = 224
    """Side of the square crops fed to the image encoder: the model's model.image.image_size."""
    mean: tuple[float, float, float] | None = None
    """Per-channel normalisation mean; None: the image tower's. A value given must be the tower's (the system
    checks), so configs that name the normalisation keep reading."""
    std: tuple[float, float, float] | None = None
    """Per-channel normalisation standard deviation; None: the image tower's (see `mean`)."""
    resize: Resize = "tensor"
    """The reference pipeline evaluation images are resized and centre-cropped with (datamodules/image/coco.py
    `Resize`): tensor (Hugging Face's CLIPImageProcessor), pil (open_clip's preprocessing) or torchvision (its
    ImageClassification preset)."""
    min_scale: float = 0.5
    """Smallest crop area, as a fraction of the image, of the training RandomResizedCrop (training sets only)."""


@dataclass
class ShardsConfig:
    """WebDataset tar shards to train on, streamed and split by rank and DataLoader worker."""

    urls: str | None = None
    """The shards: a brace pattern (`/data/coco_shards/train/coco-{000000..000023}.tar`), a glob or a folder of
    .tar files (plain, or gzip-compressed as .tar.gz / .tgz), as `python -m datamodules.image.shards.write`
    writes them; or remote: URLs (`https://host/coco-{000000..000023}.tar`, `s3://`, `gs://` through fsspec) or
    `pipe:COMMAND` writing a shard to its output; or a sample list (`.parquet`, as `curate filter` writes it) to
    train on its samples only. None: train on the folder layout."""
    shuffle_buffer: int = 1000
    """Samples (still encoded) each worker holds to shuffle the stream; memory grows by about this times the mean
    image file size per worker."""
    num_samples: int | None = None
    """Samples in all the shards, for shards without the converter's `sizes.json` beside them (spread evenly over
    them); ignored when sizes files count every shard. Remote shards need one of the two."""
    retries: int = 2
    """Times a shard that fails to open or is cut short mid-stream is opened again (continuing after the samples
    it gave) before it is skipped, logged by name and counted."""
    caption_key: str = "txt"
    """Where a sample's caption is: `txt` (the member `KEY.txt`, as img2dataset writes it), another member's
    extension, or `json:FIELD` for a field of the json member (a string or a list of strings). Shards whose first
    samples have no caption there stop before training; a later sample without one is a logged skip."""
    resampled: bool = False
    """Draw shards with replacement, each rank and worker its own seeded stream, for an epoch of `num_samples`
    samples (else as many as the shards hold), as open_clip's `--dataset-resampled` does."""


def as_section(cls: type[S], value: S | Mapping[str, Any] | None) -> S:
    """A config section as its dataclass, a copy of its own: given as one, as the plain dict a checkpoint
    stores, or None for the class's defaults."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return replace(value)
    return cls(**dict(value))


def plain_sections(hparams: MutableMapping[str, Any]) -> None:
    """Config sections among saved hyperparameters become plain dicts, in place: a checkpoint then loads with
    `torch.load(weights_only=True)` and its hparams.yaml reads back without this code."""
    for key, value in hparams.items():
        if is_dataclass(value) and not isinstance(value, type):
            hparams[key] = asdict(value)


# the sections of the DataModules, whose fields `flat_hparams` lifts to the top level
SECTIONS = ("loader", "tokenizer", "images", "shards", "predict", "examples", "masking", "batching")
# (section, field) -> its name among flat hyperparameters, where that is not the field's own (predict's fields
# are `predict_<name>`)
FLAT_NAMES = {
    ("tokenizer", "path"): "tokenizer",
    ("tokenizer", "vocab_size"): "tokenizer_vocab_size",
    ("shards", "urls"): "train_shards",
    ("shards", "num_samples"): "train_num_samples",
    ("shards", "retries"): "shard_retries",
    ("masking", "whole_word"): "whole_word_masking",
}


def _flat_name(section: str, name: str) -> str:
    return FLAT_NAMES.get((section, name), f"predict_{name}" if section == "predict" else name)


def _as_dict(value: Any) -> Mapping[str, Any] | None:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value if isinstance(value, Mapping) else None


def data_setting(hparams: Mapping[str, Any], section: str, name: str, default: Any = None) -> Any:
    """The setting `section.name` of a DataModule's saved hyperparameters, nested (`{"images": {"mean": ...}}`)
    or flat (`{"mean": ...}`, `{"tokenizer": "vocab.txt"}`: `FLAT_NAMES`)."""
    nested = _as_dict(hparams.get(section))
    if nested is not None:
        return nested.get(name, default)
    return hparams.get(_flat_name(section, name), default)


def flat_hparams(hparams: Mapping[str, Any]) -> dict[str, Any]:
    """A DataModule's saved hyperparameters with the fields of its sections lifted to the top level under their
    flat names (`images.mean` -> `mean`, `tokenizer.path` -> `tokenizer`); flat ones come back as they are."""
    flat = dict(hparams)
    for section in SECTIONS:
        nested = _as_dict(hparams.get(section))
        if nested is None:
            continue
        del flat[section]
        for name, value in nested.items():
            flat[_flat_name(section, name)] = value
    return flat
