"""Writers of fixture files in the layouts the data modules read: WebDataset shards, COCO images and
captions, CIFAR batches, Karpathy splits, BookCorpus-style books, spoken captions of the shapes set."""

from __future__ import annotations

import io
import json
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from datamodules.image.coco import (
    eval_transform,
)
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.trimodal_datamodule import generate_spoken_captions


def write_cifar(root: Path, n_test: int = 12, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """CIFAR-10 in torchvision's layout: cifar-10-batches-py/ with 5 training batches, test_batch and
    batches.meta, pickled dicts as distributed. Returns the test images (N, 3, 32, 32) and labels."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def batch(n: int, label: str) -> tuple[np.ndarray, list[int]]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, n)]
        entry = {
            "batch_label": label,
            "labels": labels,
            "data": data,
            "filenames": [f"{i}.png" for i in range(n)],
        }
        return entry, data, labels

    for i in range(1, 6):
        entry, _, _ = batch(4, f"training batch {i} of 5")
        (folder / f"data_batch_{i}").write_bytes(pickle.dumps(entry))
    entry, data, labels = batch(n_test, "testing batch 1 of 1")
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    meta = {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return data.reshape(-1, 3, 32, 32), labels


def write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int] = (40, 32)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format="PNG")


def write_karpathy(root: Path, kind: str, n_test: int = 4, n_train: int = 2) -> Path:
    """A Karpathy split file in its exact layout (dataset_coco.json: filepath and cocoid; dataset_flickr30k.json:
    filename and imgid only) with its images; test images have 5 captions, one has 6."""
    images, sentid = [], 0
    for i in range(n_test + n_train):
        split = "test" if i < n_test else "train"
        count = 6 if i == 1 else 5
        sentences = []
        for j in range(count):
            raw = f"A photo number {i} with caption {j}."
            sentences.append(
                {"tokens": raw.lower().strip(".").split(), "raw": raw, "imgid": i, "sentid": sentid}
            )
            sentid += 1
        entry = {
            "sentids": [s["sentid"] for s in sentences],
            "imgid": i,
            "sentences": sentences,
            "split": split,
        }
        if kind == "coco":
            folder = "val2014" if split == "test" else "train2014"
            entry |= {"filepath": folder, "filename": f"COCO_{folder}_{i:012d}.jpg", "cocoid": 1000 + i}
            write_jpeg(root / folder / entry["filename"], np.random.default_rng(100 + i))
        else:
            entry |= {"filename": f"{1000000 + i}.jpg"}
            write_jpeg(root / entry["filename"], np.random.default_rng(100 + i))
        images.append(entry)
    path = root / f"dataset_{kind}.json"
    path.write_text(json.dumps({"images": images, "dataset": kind}))
    return path


LOGGER = "datamodules.image.shards"
TRANSFORM = eval_transform(16)


def png(k: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (40 * k % 256, 0, 0)).save(buffer, "PNG")
    return buffer.getvalue()


def write_tar(path: Path, samples: list[dict[str, bytes]], mode: str = "w") -> Path:
    """A shard of `samples` ({"__key__": key, ext: bytes, ...}) written with tarfile; mode "w:gz" compresses."""
    with tarfile.open(path, mode) as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext != "__key__":
                    info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return path


def captioned(n: int, first: int = 0) -> list[dict[str, bytes]]:
    return [
        {"__key__": f"{k:06d}", "png": png(k), "txt": f"photo {k}".encode()} for k in range(first, first + n)
    ]


RED = (200, 30, 30)
# Fixture ids: 1-8 plain RGB JPEGs, then one of each awkward case.
GOOD_RGB = list(range(1, 9))
GRAY, CMYK, PNG_AS_JPG, PALETTE_PNG, CORRUPT, TRUNCATED, MISSING = range(9, 16)
READABLE = [*GOOD_RGB, GRAY, CMYK, PNG_AS_JPG, PALETTE_PNG]


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _image_bytes(image_id: int, rng: np.random.Generator) -> bytes | None:
    # Left half red, right half noise: colour conversions show in the left half.
    pixels = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    pixels[:, :20] = RED
    image = Image.fromarray(pixels)
    if image_id == GRAY:
        return _encode(image.convert("L"), "JPEG")
    if image_id == CMYK:
        return _encode(image.convert("CMYK"), "JPEG", quality=95)
    if image_id in (PNG_AS_JPG, PALETTE_PNG):
        return _encode(
            image.convert("P", palette=Image.Palette.ADAPTIVE) if image_id == PALETTE_PNG else image, "PNG"
        )
    if image_id == CORRUPT:
        return b"\xff\xd8\xff\xe0" + rng.integers(0, 256, 600, dtype=np.uint8).tobytes()
    if image_id == TRUNCATED:
        data = _encode(image, "JPEG", quality=95)
        return data[: len(data) // 2]
    if image_id == MISSING:
        return None
    return _encode(image, "JPEG", quality=95)


def write_fixture(root: Path, split: str = "val2017") -> dict[int, int]:
    """A COCO-format split in which every caption names its image ("photo 7 shows ..."), with 5 to 7 captions
    per image, the awkward files above and one caption for an image id that does not exist.

    Returns caption id -> image id.
    """
    rng = np.random.default_rng(0)
    (root / split).mkdir(parents=True)
    images, annotations, owner = [], [], {}
    for image_id in range(1, 16):
        file_name = f"{image_id:012d}.png" if image_id == PALETTE_PNG else f"{image_id:012d}.jpg"
        data = _image_bytes(image_id, rng)
        if data is not None:
            (root / split / file_name).write_bytes(data)
        images.append({"id": image_id, "file_name": file_name, "width": 40, "height": 30})
        for k in range(5 + image_id % 3):
            caption_id = 100 * image_id + k
            # Ragged whitespace, as in the real files, which cleaning must collapse.
            annotations.append(
                {"id": caption_id, "image_id": image_id, "caption": f" photo {image_id}\n shows  thing {k} "}
            )
            owner[caption_id] = image_id
    annotations.append({"id": 99999, "image_id": 999, "caption": "a caption for no image"})
    data = {"info": {}, "licenses": [], "images": images, "annotations": annotations}
    (root / "annotations").mkdir()
    (root / "annotations" / f"captions_{split}.json").write_text(json.dumps(data))
    return owner


WORDS = [
    "the",
    "a",
    "river",
    "castle",
    "market",
    "forest",
    "harbour",
    "valley",
    "old",
    "new",
    "green",
    "slow",
    "bright",
    "loud",
    "calm",
]


def sentences(rng: random.Random, n: int) -> list[str]:
    return [" ".join(rng.choices(WORDS, k=rng.randint(3, 8))) for _ in range(n)]


def write_books(path: Path, n_docs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = ["\n".join(s + " ." for s in sentences(rng, rng.randint(4, 8))) for _ in range(n_docs)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")


def shapes_with_speech(root: Path, n_train: int, n_val: int, per_image: tuple[int, int] = (2, 1)) -> None:
    generate_shapes_coco(root / "shapes", n_train=n_train, n_val=n_val, image_size=32)
    generate_spoken_captions(root / "shapes", root / "speech", per_image)
