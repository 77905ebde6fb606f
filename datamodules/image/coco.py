"""COCO captions, read: the records of the official and the Karpathy JSON files, image decoding, the CLIP
train/eval transforms (uint8 in, uint8 out: the image tower normalises on the device), the map-style dataset and
its collate function. The DataModule (coco_datamodule.py) and the WebDataset shard reader (shards/)
both build on this file and do not import each other."""

from __future__ import annotations

import io
import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.io import ImageReadMode, decode_image, read_file
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


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


def train_transform(image_size: int, min_scale: float = 0.5) -> v2.Compose:
    """Random resized crop of a decoded (3, H, W) uint8 image to (3, image_size, image_size) uint8: the image tower
    scales and normalises on the device (`ImageTower.forward`), so workers send a quarter of float32's bytes."""
    # No horizontal flip: captions say "left" and "right".
    return v2.Compose(
        [
            v2.RandomResizedCrop(
                image_size, scale=(min_scale, 1.0), interpolation=v2.InterpolationMode.BICUBIC, antialias=True
            ),
        ]
    )


Resize = Literal["tensor", "pil", "torchvision"]
"""How evaluation images are resized and centre-cropped, each mode the reference pipeline of one source:

    tensor       Hugging Face CLIPImageProcessor (transformers' torchvision backend): shorter side to the crop size
                 with torchvision's antialiased bicubic on the uint8 tensor, crop offset rounded down. Its Pillow
                 backend (CLIPImageProcessorPil) crops there too but resamples with Pillow: approximated.
    pil          open_clip's preprocessing (resize_mode shortest, bicubic, what `create_model_and_transforms`
                 gives a checkpoint file): shorter side to the crop size with Pillow's bicubic, crop offset rounded
                 half to even (torchvision's CenterCrop). Models whose pretrained config squashes or letterboxes
                 (resize_mode squash / longest) are approximated.
    torchvision  torchvision's ImageClassification preset with its defaults (the IMAGENET1K_V1 weights) on decoded
                 tensors: shorter side to 256/224 of the crop size with antialiased bilinear, torchvision's
                 CenterCrop. Weights whose preset resizes otherwise (232 for IMAGENET1K_V2, bicubic SWAG), or the
                 preset run on PIL images (Pillow's bilinear), are approximated.

Every mode decodes with torchvision (`decode_rgb`), whose JPEG and PNG pixels are Pillow's.
"""


class FloorCenterCrop:
    """Centre crop whose offset is rounded down, where transformers' image processors place it; torchvision's
    CenterCrop rounds half a pixel to even: one pixel apart when the margin is odd and its half rounds up."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, image: Tensor) -> Tensor:
        height, width = image.shape[-2:]
        top, left = (height - self.size) // 2, (width - self.size) // 2
        return v2.functional.crop(image, top, left, self.size, self.size)


def eval_transform(image_size: int, resize: Resize = "tensor") -> v2.Compose:
    """A decoded (3, H, W) uint8 image to the (3, image_size, image_size) uint8 crop of the `resize` mode's
    reference pipeline (see `Resize`); the image tower scales and normalises on the device."""
    if resize not in ("tensor", "pil", "torchvision"):
        raise ValueError(f"data.images.resize {resize!r} is not one of tensor, pil, torchvision")
    bicubic, bilinear = v2.InterpolationMode.BICUBIC, v2.InterpolationMode.BILINEAR
    if resize == "tensor":
        return v2.Compose(
            [v2.Resize(image_size, interpolation=bicubic, antialias=True), FloorCenterCrop(image_size)]
        )
    if resize == "pil":
        steps = [v2.ToPILImage(), v2.Resize(image_size, interpolation=bicubic), v2.PILToTensor()]
    else:
        # the preset's own (v1) resize: it resamples uint8 in float and rounds, where v2's uint8 kernel differs
        # by a grey level here and there
        steps = [transforms.Resize(image_size * 256 // 224, interpolation=bilinear, antialias=True)]
    return v2.Compose([*steps, v2.CenterCrop(image_size)])


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
            images = torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
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
