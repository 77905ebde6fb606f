"""COCO Captions for CLIP-style image-text training and retrieval evaluation.

Where the data is read from:

    official layout   root/annotations/captions_<split>.json, images in root/<split>/<file_name>
                      (file_name comes from the JSON, so 2014 names like COCO_val2014_000000042.jpg work too)
    karpathy_json     dataset_coco.json decides the splits (train + restval / val / test), images in
                      root/<filepath>/<filename>

Batches, the contract with the image-text LightningModule:

    train  images (B, 3, H, W) float, input_ids (B, L) long, attention_mask (B, L) bool, image_ids (B,) long,
           caption_ids (B,) long annotation ids, skipped: int = images of this batch that failed to decode.
           One caption per image, drawn afresh each epoch, seeded by (seed, epoch, image id).
    eval   the same keys, but input_ids, attention_mask and caption_ids have one row per caption of every image
           in the batch (N >= B rows), and caption_image_ids (N,) long holds each caption's image id, so the
           retrieval metric sees every image once and every caption.

A file that cannot be decoded never ends a run: its item comes back as None, the collate function drops it
together with its captions and counts it in `skipped`. Missing files are found and dropped up front in `setup`.

Training reads either the folder layout above, through a seeded sampler whose position is saved in checkpoints
(a run resumed mid-epoch continues with the next unseen batch), or WebDataset tar shards (`train_shards`, see
datamodules/image/webdataset_shards.py), streamed and split by rank and worker. Evaluation always reads the folder
layout: retrieval ranks every caption against every image of the split.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from datamodules.generated import default_cache_dir
from datamodules.loading import ResumableDataLoader, ResumableSampler
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.tokenizer import TextTokenizer, build_tokenizer

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
_STAGE_ROLES = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}  # what each stage reads


@dataclass(frozen=True)
class CaptionedImage:
    """One image and all its captions (5 to 7 in COCO), in annotation-file order."""

    image_id: int
    path: str
    captions: tuple[str, ...]
    caption_ids: tuple[int, ...]


def clean_caption(text: str) -> str:
    """Strip and collapse runs of whitespace, line breaks included, to one space."""
    return " ".join(text.split())


def _captioned_images(
    entries: Iterable[tuple[int, Path, list[tuple[int, str | None]]]], source: Path
) -> list[CaptionedImage]:
    out, empty, uncaptioned = [], 0, 0
    for image_id, path, pairs in entries:
        pairs = [(cid, clean_caption(str(text or ""))) for cid, text in pairs]
        empty += sum(1 for _, text in pairs if not text)
        pairs = [(cid, text) for cid, text in pairs if text]
        if not pairs:
            uncaptioned += 1
            continue
        out.append(
            CaptionedImage(image_id, str(path), tuple(t for _, t in pairs), tuple(c for c, _ in pairs))
        )
    if empty:
        log.warning("%s: %d empty captions dropped", source, empty)
    if uncaptioned:
        log.info("%s: %d images without captions left out", source, uncaptioned)
    return out


class CaptionsFileError(ValueError):
    """A captions file that cannot be read as COCO or Karpathy JSON, with the file and the place named."""


def _read_json(path: Path, required: tuple[str, ...]) -> dict[str, Any]:
    # json's own messages name neither the file nor, for a missing key, what the key is for
    try:
        with path.open(encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        # a JSON object that does not end with "}" is what an interrupted download or copy leaves
        truncated = not err.doc.rstrip().endswith("}")
        hint = " (it does not end with '}': an interrupted download or copy?)" if truncated else ""
        raise CaptionsFileError(f"{path} is not valid JSON: {err}{hint}") from None
    except UnicodeDecodeError as err:
        raise CaptionsFileError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
    if not isinstance(data, dict):
        raise CaptionsFileError(f"{path}: the top level is a JSON {type(data).__name__}, not an object")
    for key in required:
        if not isinstance(data.get(key), list):
            problem = "has no" if key not in data else "has a non-list"
            raise CaptionsFileError(
                f"{path} {problem} {key!r} list: a captions file holds {' and '.join(map(repr, required))}"
            )
    return data


def _entry_error(path: Path, where: str, err: Exception) -> CaptionsFileError:
    reason = f"lacks the key {err}" if isinstance(err, KeyError) else f"is malformed ({err})"
    return CaptionsFileError(f"{path}: {where} {reason}")


def load_coco_captions(
    annotation_file: str | os.PathLike, image_dir: str | os.PathLike
) -> list[CaptionedImage]:
    """Read an official `captions_<split>.json`; captions that name an unknown image id are reported and dropped."""
    annotation_file, image_dir = Path(annotation_file), Path(image_dir)
    if not annotation_file.is_file():
        raise FileNotFoundError(
            f"COCO captions file {annotation_file} not found: expected the official layout "
            f"<root>/annotations/captions_<split>.json with images in <root>/<split>/ "
            "(or set generate_if_missing=true for the synthetic quickstart set)"
        )
    data = _read_json(annotation_file, ("images", "annotations"))
    file_names: dict[int, str] = {}
    for k, im in enumerate(data["images"]):
        try:
            file_names[int(im["id"])] = im["file_name"]
        except (KeyError, TypeError, ValueError) as err:
            raise _entry_error(annotation_file, f"images[{k}]", err) from None
    captions: dict[int, list[tuple[int, str | None]]] = {image_id: [] for image_id in file_names}
    unknown: list[int] = []
    for k, ann in enumerate(data["annotations"]):
        try:
            image_id, caption = int(ann["image_id"]), (int(ann["id"]), ann.get("caption"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _entry_error(annotation_file, f"annotations[{k}]", err) from None
        if image_id in captions:
            captions[image_id].append(caption)
        else:
            unknown.append(image_id)
    if unknown:
        examples = ", ".join(str(i) for i in sorted(set(unknown))[:5])
        log.warning(
            "%s: %d captions name image ids missing from its image list (e.g. %s); dropped",
            annotation_file,
            len(unknown),
            examples,
        )
    entries = ((i, image_dir / file_names[i], captions[i]) for i in file_names)
    return _captioned_images(entries, annotation_file)


def load_karpathy_splits(
    karpathy_json: str | os.PathLike, root: str | os.PathLike
) -> dict[str, list[CaptionedImage]]:
    """Read Karpathy's `dataset_coco.json` into {"train": train + restval, "val": ..., "test": ...}."""
    karpathy_json, root = Path(karpathy_json), Path(root)
    if not karpathy_json.is_file():
        raise FileNotFoundError(
            f"Karpathy split file {karpathy_json} not found: expected dataset_coco.json with images "
            f"under {root}/<filepath>/<filename>"
        )
    data = _read_json(karpathy_json, ("images",))
    entries: dict[str, list[tuple[int, Path, list[tuple[int, str]]]]] = defaultdict(list)
    for k, im in enumerate(data["images"]):
        try:
            split = KARPATHY_SPLITS.get(im.get("split", ""))
            if split is None:
                continue
            pairs = [
                (int(s["sentid"]), s.get("raw") or " ".join(s.get("tokens", []))) for s in im["sentences"]
            ]
            image_id = int(im.get("cocoid", im.get("imgid")))
            entries[split].append((image_id, root / im.get("filepath", "") / im["filename"], pairs))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise _entry_error(karpathy_json, f"images[{k}]", err) from None
    return {split: _captioned_images(entries[split], karpathy_json) for split in ("train", "val", "test")}


def decode_rgb(data: Tensor | bytes) -> Tensor:
    """Decode encoded image bytes to a (3, H, W) uint8 tensor, whatever their colour mode or true format.

    torchvision's decoders (libjpeg-turbo, libpng, ...) sniff the format from the bytes, so a PNG named .jpg
    decodes, and convert grayscale, CMYK and palette images to RGB. EXIF orientation is not applied: COCO
    annotations refer to the stored pixels. Raises on corrupt or truncated data.
    """
    if isinstance(data, bytes):
        data = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    try:
        return decode_image(data, mode=ImageReadMode.RGB)
    except RuntimeError:
        # Formats torchvision has no decoder for (BMP, TIFF, ...) still open with Pillow.
        with Image.open(io.BytesIO(data.numpy().tobytes())) as image:
            return pil_to_tensor(image.convert("RGB"))


def read_rgb(path: str) -> Tensor:
    """`decode_rgb` of a file's bytes; raises on a corrupt, truncated or missing file."""
    return decode_rgb(read_file(path))


def train_transform(
    image_size: int, mean: Sequence[float], std: Sequence[float], min_scale: float = 0.5
) -> v2.Compose:
    # No horizontal flip: captions say "left" and "right".
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(image_size: int, mean: Sequence[float], std: Sequence[float]) -> v2.Compose:
    return v2.Compose(
        [
            v2.Resize(image_size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def caption_item(record: CaptionedImage, image: Tensor, train: bool, seed: int, epoch: int) -> dict[str, Any]:
    """The item of one decoded, transformed image: in training with one caption, in evaluation with all.

    The training caption is drawn with a generator seeded by (seed, epoch, image id): reproducible, and the same
    whatever the worker count, the shuffle order or the storage (image folder or tar shards).
    """
    item: dict[str, Any] = {"image": image, "image_id": record.image_id}
    if train:
        k = int(np.random.default_rng([seed, epoch, record.image_id]).integers(len(record.captions)))
        item["captions"], item["caption_ids"] = record.captions[k : k + 1], record.caption_ids[k : k + 1]
    else:
        item["captions"], item["caption_ids"] = record.captions, record.caption_ids
    return item


class CocoCaptionsDataset(Dataset):
    """One item per image: in training with one caption drawn per epoch, in evaluation with all its captions.

    An image that cannot be decoded gives None (warned once per file and process); `CaptionCollate` drops it.
    """

    def __init__(
        self,
        images: Sequence[CaptionedImage],
        transform: Callable[[Tensor], Tensor],
        train: bool,
        seed: int = 0,
    ) -> None:
        self.images = list(images)
        self.transform = transform
        self.train = train
        self.seed = seed
        # Shared memory: persistent workers keep their own copy of the dataset but see this tensor change.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._warned: set[str] = set()

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        record = self.images[index]
        try:
            pixels = read_rgb(record.path)
        except Exception as err:  # any failure of one file, whatever library raised it, must not end the run
            if record.path not in self._warned:
                self._warned.add(record.path)
                log.warning(
                    "skipping unreadable image %s (image id %d): %s", record.path, record.image_id, err
                )
            return None
        return caption_item(record, self.transform(pixels), self.train, self.seed, int(self._epoch))


class CaptionCollate:
    """Drops undecodable items (their captions go with them), stacks images and tokenizes the captions."""

    def __init__(self, tokenizer: TextTokenizer, context_length: int, image_size: int, train: bool) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.image_size = image_size
        self.train = train

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Tensor | int]:
        kept = [item for item in items if item is not None]
        captions = [c for item in kept for c in item["captions"]]
        caption_image_ids = [item["image_id"] for item in kept for _ in item["captions"]]
        if kept:
            images = torch.stack([item["image"] for item in kept])
            tokens = self.tokenizer(captions, self.context_length)
        else:  # every image of the batch failed: an empty batch the module can detect by its size
            images = torch.empty(0, 3, self.image_size, self.image_size)
            tokens = {
                "input_ids": torch.empty(0, 0, dtype=torch.long),
                "attention_mask": torch.empty(0, 0, dtype=torch.bool),
            }
        batch: dict[str, Tensor | int] = {
            "images": images,
            "input_ids": tokens["input_ids"],
            "attention_mask": tokens["attention_mask"],
            "image_ids": torch.tensor([item["image_id"] for item in kept], dtype=torch.long),
            "caption_ids": torch.tensor([c for item in kept for c in item["caption_ids"]], dtype=torch.long),
            "skipped": len(items) - len(kept),
        }
        if not self.train:
            batch["caption_image_ids"] = torch.tensor(caption_image_ids, dtype=torch.long)
        return batch


class EpochDataLoader(ResumableDataLoader):
    """The training loader of the folder layout: resumable mid-epoch, and it tells its dataset the epoch.

    Lightning calls `set_epoch` on samplers only, and workers start fetching as soon as the underlying iterator
    is made, so the epoch (for the shuffle and the caption draw) is set on the sampler here first; the base class
    gives the dataset the sampler's epoch. `epoch_fn` gives the
    trainer's epoch (right after a resume too); without one, or when it returns None, the loader counts its own
    passes. The position in the epoch is checkpointed by `ResumableDataLoader`.
    """

    def __init__(
        self,
        dataset: CocoCaptionsDataset,
        sampler: ResumableSampler,
        batch_size: int,
        epoch_fn: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler, batch_size, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self._passes if epoch is None else epoch
        self._passes += 1
        self.sampler.set_epoch(epoch)  # `ResumableDataLoader` passes it on to the dataset
        yield from super().__iter__()

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._passes = state["epoch"]  # without a trainer, the resumed pass is the saved epoch


class CocoCaptionsDataModule(LightningDataModule):
    """COCO Captions (or any set in its format) for contrastive image-text training and retrieval evaluation.

    Args:
        root: dataset folder: annotations/captions_<split>.json and one image folder per split.
        train_split: split trained on (official layout).
        val_split: split validated on (official layout).
        test_split: split tested on; None tests on `val_split`, since COCO's test2017 has no public captions.
        karpathy_json: Karpathy's dataset_coco.json; when given it decides membership (train + restval / val /
            test), the three split arguments are ignored and images are read from root/<filepath>/<filename>.
        image_size: side of the square crops fed to the image encoder.
        mean: per-channel normalisation mean (CLIP's by default).
        std: per-channel normalisation standard deviation (CLIP's by default).
        batch_size: training images per batch and device.
        eval_batch_size: images per evaluation batch; None means batch_size.
        num_workers: DataLoader worker processes per device.
        tokenizer: a vocab.txt / tokenizer.json (or a folder with one) or a checkpoint (.ckpt) of this framework;
            None trains a WordPiece vocabulary on the training captions once and caches it under cache_dir. The
            CLI's validate and test set it to --ckpt_path, so only that stage's split needs to be on the machine.
        tokenizer_vocab_size: size of the WordPiece vocabulary to train (ignored when `tokenizer` is given); the
            `vocab_size` property gives the size actually trained.
        lowercase: lowercase text before tokenizing.
        context_length: longest token sequence, [CLS] and [SEP] included; longer captions are truncated.
        cache_dir: where the trained vocabulary is cached; None means `$XDG_CACHE_HOME/mmpretrain`, never root.
        seed: seeds the per-epoch caption draw.
        generate_if_missing: write the synthetic shapes set into root when a split it reads has no annotations
            (quickstart); only into a root that is new, empty or a generated set, any other is refused.
        min_scale: smallest crop area, as a fraction of the image, of the training RandomResizedCrop.
        train_shards: WebDataset tar shards to train on instead of the training split's folder: a brace pattern
            (`/data/coco_shards/train/coco-{000000..000023}.tar`), a glob or a folder of .tar files, as written by
            `python -m datamodules.image.webdataset_shards`. They are streamed, split by rank and DataLoader worker;
            validation and test still read the folder layout. Without `tokenizer`, the vocabulary is trained
            on the training split's annotations when they exist, else on the captions stored in the shards.
        shuffle_buffer: samples (still encoded) each worker holds to shuffle the shard stream; memory grows by
            about this times the mean image file size per worker.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        karpathy_json: str | None = None,
        image_size: int = 224,
        mean: tuple[float, float, float] = CLIP_MEAN,
        std: tuple[float, float, float] = CLIP_STD,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        tokenizer: str | None = None,
        tokenizer_vocab_size: int = 8192,
        lowercase: bool = True,
        context_length: int = 64,
        cache_dir: str | None = None,
        seed: int = 0,
        generate_if_missing: bool = False,
        min_scale: float = 0.5,
        train_shards: str | None = None,
        shuffle_buffer: int = 1000,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.karpathy_json = karpathy_json
        self.image_size = image_size
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.tokenizer_path = tokenizer
        self.target_vocab_size = tokenizer_vocab_size
        self.lowercase = lowercase
        self.context_length = context_length
        # not root/.cache: the data root is the user's, the cache folder ours
        self.cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
        self.seed = seed
        self.generate_if_missing = generate_if_missing
        self.min_scale = min_scale
        self.train_shards = train_shards
        self.shuffle_buffer = shuffle_buffer

        self._tokenizer: TextTokenizer | None = None
        self._loaded: dict[str, list[CaptionedImage]] = {}  # by split name, or by role in Karpathy mode
        # by role: "train", "val", "test"; training from shards is a ShardStream (an IterableDataset)
        self.datasets: dict[str, CocoCaptionsDataset | IterableDataset] = {}
        self.missing_images: dict[str, int] = {}  # by role: files listed but absent, found in setup()
        self.skipped_images = 0  # undecodable images met in batches on this process (counted from `skipped`)

    # data on disk --------------------------------------------------------------------------------------------
    def _annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{split}.json"

    def _ensure_data(self, split: str) -> None:
        # Only a split that is read and missing asks for the synthetic set, so a genuine root without training
        # annotations (an evaluation machine) is tested as it is; generate_shapes_coco itself refuses any
        # folder that holds data it did not write.
        if self.generate_if_missing and not self.karpathy_json and not self._annotation_file(split).exists():
            log.info("no %s annotations under %s: writing the synthetic shapes set there", split, self.root)
            generate_shapes_coco(self.root)

    def _split_name(self, role: str) -> str:
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split or self.val_split}[
            role
        ]

    def records(self, role: str) -> list[CaptionedImage]:
        """All images listed for `role` ("train", "val" or "test"), parsed once and kept."""
        if self.karpathy_json:
            if not self._loaded:
                self._loaded = load_karpathy_splits(self.karpathy_json, self.root)
            return self._loaded[role]
        split = self._split_name(role)
        if split not in self._loaded:
            self._ensure_data(split)
            self._loaded[split] = load_coco_captions(self._annotation_file(split), self.root / split)
        return self._loaded[split]

    def _existing(self, images: list[CaptionedImage], role: str) -> list[CaptionedImage]:
        # One directory listing per folder instead of a stat per file: cheap even for 118k files on a network disk.
        listings: dict[str, set[str]] = {}
        present, missing = [], []
        for record in images:
            folder, name = os.path.split(record.path)
            if folder not in listings:
                listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            (present if name in listings[folder] else missing).append(record)
        self.missing_images[role] = len(missing)
        if missing:
            log.warning(
                "%s: %d of %d image files are missing and left out with their captions (e.g. %s)",
                role,
                len(missing),
                len(images),
                ", ".join(r.path for r in missing[:3]),
            )
        return present

    # tokenizer -------------------------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> TextTokenizer:
        """The text tokenizer, loaded or trained (and cached) on first use, so it works before setup()."""
        if self._tokenizer is None:
            texts = None
            key = ""
            if not self.tokenizer_path:
                try:
                    texts = self._training_captions()
                except FileNotFoundError as err:
                    raise FileNotFoundError(
                        f"{err}. The vocabulary is trained on the training captions: to evaluate without them, "
                        "pass --ckpt_path (validate and test use the checkpoint's tokenizer) or --data.tokenizer"
                    ) from None
                # The corpus itself is the cache key: other captions or splits train a new vocabulary.
                key = hashlib.sha256("\n".join(texts).encode()).hexdigest()
            self._tokenizer = build_tokenizer(
                self.tokenizer_path, texts, self.cache_dir, self.target_vocab_size, self.lowercase, key
            )
        return self._tokenizer

    def _training_captions(self) -> list[str]:
        # Annotations first, so shards and folder train the same vocabulary; shards alone when there are none.
        annotated = self.karpathy_json or self._annotation_file(self.train_split).is_file()
        if self.train_shards and not annotated:
            from datamodules.image.webdataset_shards import expand_shards, shard_captions

            log.info(
                "no training annotations under %s: training the vocabulary on the shards' captions", self.root
            )
            return list(shard_captions(expand_shards(self.train_shards)))
        return [c for r in self.records("train") for c in r.captions]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    # LightningDataModule hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # the splits this run reads: a test run on a genuine validation split needs no training split
        stage = self.trainer.state.fn if self.trainer is not None else None
        for role in _STAGE_ROLES.get(str(stage.value) if stage else "", ("train", "val", "test")):
            self._ensure_data(self._split_name(role))
        _ = self.tokenizer  # trains and caches the vocabulary once, on the first process

    def setup(self, stage: str | None = None) -> None:
        roles = _STAGE_ROLES.get(stage or "", ("train", "val", "test"))
        if stage == "test" and not (self.test_split or self.karpathy_json):
            log.info("no test_split given: testing on %s", self.val_split)
        for role in roles:
            if role in self.datasets:
                continue
            train = role == "train"
            transform = (
                train_transform(self.image_size, self.mean, self.std, self.min_scale)
                if train
                else eval_transform(self.image_size, self.mean, self.std)
            )
            if train and self.train_shards:
                self.datasets[role] = self._shard_stream(transform)
                continue
            images = self._existing(self.records(role), role)
            self.datasets[role] = CocoCaptionsDataset(images, transform, train=train, seed=self.seed)

    def _shard_stream(self, transform: Callable[[Tensor], Tensor]) -> IterableDataset:
        # Imported here: webdataset_shards builds on this module.
        from datamodules.image.webdataset_shards import ShardStream, expand_shards

        rank, world = self._topology()
        return ShardStream(
            expand_shards(self.train_shards),
            transform,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            rank=rank,
            world_size=world,
        )

    def _topology(self) -> tuple[int | None, int | None]:
        # The trainer's rank and world size; None lets the shard stream ask torch.distributed itself.
        if self.trainer is None:
            return None, None
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _loader(self, role: str) -> DataLoader:
        if role not in self.datasets:
            self.setup({"train": "fit", "val": "validate", "test": "test"}[role])
        train = role == "train"
        dataset = self.datasets[role]
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size if train else self.eval_batch_size,
            "drop_last": train,
            "num_workers": self.num_workers,
            "persistent_workers": self.num_workers > 0,
            "pin_memory": torch.cuda.is_available(),  # pinning without a GPU only warns
            "collate_fn": CaptionCollate(self.tokenizer, self.context_length, self.image_size, train),
        }
        if not train:
            return DataLoader(dataset, **kwargs)
        if isinstance(dataset, IterableDataset):
            from datamodules.image.webdataset_shards import ShardLoader

            return ShardLoader(dataset, epoch_fn=self._current_epoch, **kwargs)
        rank, world = self._topology()
        # An explicit seeded sampler: the order of epoch e depends on (seed, e) only, on one device or many, and
        # its position is checkpointed. Being a DistributedSampler, Lightning keeps it under DDP.
        sampler = ResumableSampler(
            dataset, num_replicas=world or 1, rank=rank or 0, shuffle=True, seed=self.seed, drop_last=True
        )
        return EpochDataLoader(dataset, sampler, epoch_fn=self._current_epoch, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Workers cannot share a counter cheaply; the batches they send can.
        self.skipped_images += int(batch["skipped"])
        return batch
