"""Readers of the image classification sets the papers evaluate on, in the layouts they are distributed in.

    any ImageFolder   root/<split>/<class>/<image>          e.g. root/test/red_circle/00001.jpg
    ImageNet-1k       root/<split>/<wnid>/<image>           the train and val folders, one folder per WordNet id
                      root/<split>/<image> + labels file    the flat val folder (ILSVRC2012_val_00000001.JPEG, ...)
    CIFAR-10/100      root/cifar-10-batches-py/, root/cifar-100-python/: the pickled batches torchvision reads

Labels follow the sorted folder names (torchvision's rule) for an ImageFolder and the 1,000 sorted WordNet
ids for ImageNet, whatever subset a folder holds. Class names are the folder names (underscores read as
spaces), the CLIP paper's for ImageNet (bundled under metadata/, each file naming its source) and CIFAR's own.

Items are {"image": (3, S, S) uint8, "label": int, "index": int}, or None for an image that does not decode
(warned once per file and process); `LabelledImageCollate` drops and counts it.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import pickle
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from datamodules.image.coco import read_rgb

log = logging.getLogger(__name__)

METADATA = Path(__file__).parent / "metadata"
TEMPLATE_SETS = {"imagenet": "imagenet_templates.txt", "cifar": "cifar_templates.txt"}
"""Prompt template sets bundled under metadata/, by the name configs give them."""


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def listing_sha256(root: Path, files: list[Path]) -> str:
    """sha256 of the sorted (relative path, size) of `files`: which images a folder held, read in one pass of
    stat calls (hashing the bytes of 50,000 images would take longer than evaluating them)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(f"{path.relative_to(root)}\t{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def read_metadata_lines(path: str | Path) -> list[str]:
    """The lines of a metadata file, without its `#` comment lines (which cite the source) and blank lines."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#")]


def prompt_templates(name_or_path: str) -> list[str]:
    """A bundled template set ("imagenet": the CLIP paper's 80, "cifar": its 18) or a text file of templates, one
    per line with `{}` for the class name."""
    path = METADATA / TEMPLATE_SETS[name_or_path] if name_or_path in TEMPLATE_SETS else Path(name_or_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"prompt templates {name_or_path!r}: neither a bundled set ({', '.join(TEMPLATE_SETS)}) nor a file"
        )
    templates = read_metadata_lines(path)
    bad = [t for t in templates if t.count("{}") != 1]
    if bad or not templates:
        raise ValueError(f"{path}: every template needs exactly one {{}} for the class name, e.g. {bad[:1]}")
    return templates


@cache
def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The 1,000 ImageNet WordNet ids in label order (sorted) and the CLIP paper's class name of each."""
    rows = [line.split("\t") for line in read_metadata_lines(METADATA / "imagenet_classes.tsv")]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def class_name(folder: str) -> str:
    """The readable class name of a class folder: underscores are spaces ("red_circle" -> "red circle")."""
    return " ".join(folder.replace("_", " ").split())


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMG_EXTENSIONS


class _Images(Dataset):
    """Image files with labels, decoded and transformed on access."""

    def __init__(self, samples: list[tuple[Path, int]], transform: Callable[[Tensor], Tensor]) -> None:
        self.samples = samples
        self.transform = transform
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, label = self.samples[index]
        try:
            pixels = read_rgb(str(path))
        except Exception as err:  # any failure of one file must not end the run
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return {"image": self.transform(pixels), "label": label, "index": index}


class ImageFolderDataset(_Images):
    """root/<class>/<image> files with integer labels in sorted-folder order (see the module doc)."""

    def __init__(self, root: str | Path, transform: Callable[[Tensor], Tensor]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)"
            )
        self.folders, class_to_idx = find_classes(self.root)
        samples = make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)
        super().__init__([(Path(path), label) for path, label in samples], transform)

    @property
    def class_names(self) -> list[str]:
        return [class_name(f) for f in self.folders]


class LabelledImageCollate:
    """Drops undecodable items and stacks the rest; `skipped` counts the dropped."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Tensor | int]:
        kept = [item for item in items if item is not None]
        images = (
            torch.stack([item["image"] for item in kept])
            if kept
            else torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        )
        return {
            "images": images,
            "labels": torch.tensor([item["label"] for item in kept], dtype=torch.long),
            "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
            "skipped": len(items) - len(kept),
        }


def read_imagenet_labels(labels_file: Path) -> dict[str, int]:
    """Image file name -> label of a flat ImageNet folder's labels file, in one of the usual forms:

    LOC_val_solution.csv (Kaggle)   ImageId,PredictionString   ILSVRC2012_val_00000001,n01751748 ...
    a text file of two columns      ILSVRC2012_val_00000001.JPEG n01751748   (a WordNet id, or a label index
                                    0..999 in the sorted-wnid order, as Caffe's val.txt)
    """
    wnids, _ = imagenet_classes()
    index = {w: i for i, w in enumerate(wnids)}
    if not labels_file.is_file():
        raise FileNotFoundError(f"ImageNet labels file {labels_file} does not exist")

    def label(value: str, where: str) -> int:
        if value in index:
            return index[value]
        if value.isdigit() and int(value) < len(wnids):
            return int(value)
        raise ValueError(f"{where}: {value!r} is neither an ImageNet WordNet id nor a label index 0..999")

    out: dict[str, int] = {}
    with labels_file.open(newline="", encoding="utf-8") as f:
        if labels_file.suffix.lower() == ".csv":
            reader = csv.DictReader(f)
            if not {"ImageId", "PredictionString"} <= set(reader.fieldnames or ()):
                raise ValueError(
                    f"{labels_file}: a CSV labels file needs the columns ImageId,PredictionString"
                )
            for row in reader:
                where = f"{labels_file}:{reader.line_num}"
                out[row["ImageId"]] = label((row["PredictionString"].split() or [""])[0], where)
            return out
        for n, line in enumerate(f, 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) != 2:
                raise ValueError(
                    f"{labels_file}:{n}: expected `<image file> <wnid or label>`, got {line.strip()!r}"
                )
            out[fields[0]] = label(fields[1], f"{labels_file}:{n}")
    return out


def imagenet_samples(folder: Path, labels_file: Path | None) -> list[tuple[Path, int]]:
    """(image, label) of an ImageNet split folder: wnid sub-folders, or flat images named in `labels_file`."""
    if not folder.is_dir():
        raise FileNotFoundError(
            f"ImageNet folder {folder} does not exist (expected {folder}/<wnid>/<image>, or flat images with a "
            "labels file)"
        )
    wnids, _ = imagenet_classes()
    index = {w: i for i, w in enumerate(wnids)}
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    if subfolders:
        unknown = [p.name for p in subfolders if p.name not in index]
        if unknown:
            raise ValueError(f"{folder}: sub-folders that are no ImageNet-1k WordNet id: {unknown[:5]}")
        return [(f, index[d.name]) for d in subfolders for f in sorted(d.iterdir()) if _is_image(f)]
    if labels_file is None:
        raise ValueError(
            f"{folder} holds no wnid folders: a flat ImageNet folder needs its labels file (data.labels_file)"
        )
    labels = read_imagenet_labels(labels_file)
    samples, unlabelled = [], 0
    for f in sorted(folder.iterdir()):
        if not _is_image(f):
            continue
        key = f.name if f.name in labels else f.stem
        if key in labels:
            samples.append((f, labels[key]))
        else:
            unlabelled += 1
    if unlabelled:
        log.warning("%s: %d images have no label in %s and are left out", folder, unlabelled, labels_file)
    return samples


class ImageNetDataset(_Images):
    """An ImageNet-1k split (see the module doc); `class_names` are all 1,000, in label order."""

    def __init__(
        self, folder: str | Path, transform: Callable[[Tensor], Tensor], labels_file: str | Path | None = None
    ) -> None:
        self.root = Path(folder)
        self.labels_file = Path(labels_file) if labels_file else None
        super().__init__(imagenet_samples(self.root, self.labels_file), transform)
        if not self.samples:
            raise ValueError(f"{self.root}: no labelled images")

    @property
    def class_names(self) -> list[str]:
        return list(imagenet_classes()[1])

    @property
    def folders(self) -> list[str]:
        return list(imagenet_classes()[0])

    def files(self) -> list[Path]:
        return [path for path, _ in self.samples] + ([self.labels_file] if self.labels_file else [])


_CIFAR = {
    # folder, training files, test file, meta file, label key, class-name key
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        "test_batch",
        "batches.meta",
        "labels",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta", "fine_labels", "fine_label_names"),
}


def _unpickle(path: Path) -> dict[str, Any]:
    """One of CIFAR's pickled dicts (the distributed format; read as torchvision reads it)."""
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR file {path} does not exist")
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except Exception as err:
        raise ValueError(f"{path}: not a CIFAR pickled batch ({type(err).__name__}: {err})") from None


class CifarDataset(Dataset):
    """CIFAR-10 or CIFAR-100 (fine labels) from torchvision's on-disk layout: `root` is the folder that holds
    cifar-10-batches-py/ (or cifar-100-python/), or that folder itself."""

    def __init__(
        self, root: str | Path, name: str, split: str, transform: Callable[[Tensor], Tensor]
    ) -> None:
        if name not in _CIFAR:
            raise ValueError(f"unknown CIFAR set {name!r}: cifar10 or cifar100")
        folder_name, train_files, test_file, meta_file, label_key, names_key = _CIFAR[name]
        root = Path(root)
        self.root = root if root.name == folder_name else root / folder_name
        names = train_files if split == "train" else [test_file] if split == "test" else None
        if names is None:
            raise ValueError(f"CIFAR has the splits train and test, not {split!r}")
        self.paths = [self.root / n for n in names] + [self.root / meta_file]
        pixels, labels = [], []
        for path in self.paths[:-1]:
            batch = _unpickle(path)
            try:
                data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
                labels.extend(int(y) for y in batch[label_key])
            except (KeyError, ValueError) as err:
                raise ValueError(f"{path}: not a {name} batch ({err})") from None
            if len(data) != len(batch[label_key]):
                raise ValueError(f"{path}: {len(data)} images but {len(batch[label_key])} labels")
            pixels.append(data)
        meta = _unpickle(self.paths[-1])
        if names_key not in meta:
            raise ValueError(f"{self.paths[-1]}: no {names_key} (not the {name} meta file)")
        self.class_names = [class_name(n) for n in meta[names_key]]
        self.folders = list(meta[names_key])
        self.images = torch.from_numpy(np.concatenate(pixels))
        self.labels = labels
        if max(labels, default=0) >= len(self.class_names):
            raise ValueError(
                f"{self.root}: a label is beyond the {len(self.class_names)} classes of the meta file"
            )
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {"image": self.transform(self.images[index]), "label": self.labels[index], "index": index}

    def files(self) -> list[Path]:
        return list(self.paths)
