"""A synthetic COCO-captions set of coloured shapes, for the CPU quickstart and the tests.

Each image holds one or two shapes (circle, square, triangle, diamond, star, cross) in one of eight colours,
small or large, at a named position, with five captions in varied wordings ("a small red circle on the left",
"a blue star to the right of a yellow square"); a small model learns retrieval on it in minutes on a CPU. The
files follow the official COCO layout, so `CocoCaptionsDataModule` reads them like the real thing:

    root/annotations/captions_train2017.json, root/annotations/captions_val2017.json
    root/train2017/<id>.jpg, root/val2017/<id>.jpg

Each image entry also records its shapes under "objects", which the tests use to check captions against
pixels."""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from datamodules.generated import claim_folder, root_advice, written_whole

log = logging.getLogger(__name__)

GENERATOR = "datamodules.synthetic.shapes.generate_shapes_coco"

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 175, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 220, 40),
    "purple": (150, 60, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES = ("circle", "square", "triangle", "diamond", "star", "cross")
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
# Where a lone shape sits, as a fraction of the image side, and how captions name the place.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5),
    "right": (0.75, 0.5),
    "top": (0.5, 0.25),
    "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
PLACE_PHRASES = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
    "center": ("in the middle", "in the center"),
}
SPLITS = ("train2017", "val2017")
SUPERSAMPLE = 4  # draw at 4x and downsample, so edges are anti-aliased like a photo's


def _annotation_file(root: Path, split: str) -> Path:
    return root / "annotations" / f"captions_{split}.json"


def _is_complete(root: Path) -> bool:
    # The annotations folder is moved into place last, so its files mark a finished set.
    return all(_annotation_file(root, split).is_file() for split in SPLITS)


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, centroid at the centre
        angles, radii = [-90, 30, 150], [r, r, r]
    elif shape == "diamond":
        angles, radii = [-90, 0, 90, 180], [r] * 4
    else:  # five-pointed star: alternate outer and inner radius
        angles, radii = [-90 + 36 * i for i in range(10)], [r if i % 2 == 0 else 0.45 * r for i in range(10)]
    return [
        (cx + rad * math.cos(math.radians(a)), cy + rad * math.sin(math.radians(a)))
        for a, rad in zip(angles, radii)
    ]


def _draw(
    draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, ...]
) -> None:
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.85 * r  # about the circle's area, so size words mean the same for every shape
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "cross":
        t = 0.33 * r
        draw.rectangle((cx - r, cy - t, cx + r, cy + t), fill=fill)
        draw.rectangle((cx - t, cy - r, cx + t, cy + r), fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def _random_object(rng: random.Random, size_px: int, centre: tuple[float, float]) -> dict[str, Any]:
    size = rng.choice(("small", "large"))
    # Large radius and jitter are capped so two shapes in opposite halves never touch.
    radius = size_px * (0.11 if size == "small" else 0.18) * rng.uniform(0.9, 1.1)
    jitter = 0.03 * size_px
    return {
        "shape": rng.choice(SHAPES),
        "colour": rng.choice(list(COLOURS)),
        "size": size,
        "center": [round(c * size_px + rng.uniform(-jitter, jitter), 2) for c in centre],
        "radius": round(radius, 2),
    }


def _describe(rng: random.Random, obj: dict[str, Any], with_size: bool | None = None) -> str:
    """ "small red circle", "red circle" or "little red circle"; the size word is optional."""
    if with_size is None:
        with_size = rng.random() < 0.5
    words = [rng.choice(SIZE_WORDS[obj["size"]])] if with_size else []
    return " ".join([*words, obj["colour"], obj["shape"]])


def _one_object_captions(rng: random.Random, obj: dict[str, Any], place: str) -> list[str]:
    def d(with_size: bool | None = None) -> str:  # a fresh wording each call
        return _article(_describe(rng, obj, with_size))

    p = rng.choice(PLACE_PHRASES[place])
    templates = [
        lambda: f"{d(True)} {p}",
        lambda: f"{d()} {p} of the image",
        lambda: f"there is {d()} {p}",
        lambda: f"{p}, {d(True)}",
        lambda: f"a picture of {d(True)}",
        lambda: f"{d(False)} on a gray background",
        lambda: f"a single {obj['colour']} {obj['shape']} {p}",
        lambda: f"{_article(rng.choice(SIZE_WORDS[obj['size']]))} {obj['shape']} colored {obj['colour']}",
    ]
    return [t() for t in rng.sample(templates, 5)]


def _two_object_captions(
    rng: random.Random, a: dict[str, Any], b: dict[str, Any], horizontal: bool
) -> list[str]:
    def d(obj: dict[str, Any]) -> str:
        return _article(_describe(rng, obj))

    before, after = ("to the left of", "to the right of") if horizontal else ("above", "below")
    place_a, place_b = ("on the left", "on the right") if horizontal else ("at the top", "at the bottom")
    templates = [
        lambda: f"{d(a)} {before} {d(b)}",
        lambda: f"{d(b)} {after} {d(a)}",
        lambda: f"{d(a)} and {d(b)}",
        lambda: f"{d(b)} and {d(a)}",
        lambda: f"{d(a)} next to {d(b)}" if horizontal else f"{d(a)} over {d(b)}",
        lambda: f"two shapes: {d(a)} and {d(b)}",
        lambda: f"{d(a)} {place_a} and {d(b)} {place_b}",
        lambda: f"{d(b)} {place_b}, {d(a)} {place_a}",
    ]
    return [t() for t in rng.sample(templates, 5)]


def _render(objects: list[dict[str, Any]], size_px: int, rng: random.Random) -> Image.Image:
    grey = rng.randint(95, 165)  # neutral background so colour words stay unambiguous
    background = tuple(max(0, min(255, grey + rng.randint(-8, 8))) for _ in range(3))
    big = size_px * SUPERSAMPLE
    image = Image.new("RGB", (big, big), background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        fill = tuple(max(0, min(255, c + rng.randint(-15, 15))) for c in COLOURS[obj["colour"]])
        cx, cy = (v * SUPERSAMPLE for v in obj["center"])
        _draw(draw, obj["shape"], cx, cy, obj["radius"] * SUPERSAMPLE, fill)
    return image.resize((size_px, size_px), Image.Resampling.BOX)


def _sample_image(rng: random.Random, size_px: int) -> tuple[list[dict[str, Any]], list[str]]:
    if rng.random() < 0.5:
        place = rng.choice(list(POSITIONS))
        obj = _random_object(rng, size_px, POSITIONS[place])
        return [obj], _one_object_captions(rng, obj, place)
    horizontal = rng.random() < 0.5
    first, second = (
        (POSITIONS["left"], POSITIONS["right"]) if horizontal else (POSITIONS["top"], POSITIONS["bottom"])
    )
    a = _random_object(rng, size_px, first)
    b = _random_object(rng, size_px, second)
    while (b["shape"], b["colour"]) == (
        a["shape"],
        a["colour"],
    ):  # "a red circle and a red circle" says little
        b = _random_object(rng, size_px, second)
    return [a, b], _two_object_captions(rng, a, b, horizontal)


def _write_split(
    folder: Path,
    split: str,
    n: int,
    size_px: int,
    seed: int,
    first_image_id: int,
    first_caption_id: int,
    params: dict,
) -> None:
    rng = random.Random(f"{seed}:{split}")  # a string seed is hashed the same way in every process
    (folder / split).mkdir(parents=True)
    images, annotations = [], []
    caption_id = first_caption_id
    for image_id in range(first_image_id, first_image_id + n):
        objects, captions = _sample_image(rng, size_px)
        file_name = f"{image_id:012d}.jpg"
        _render(objects, size_px, rng).save(folder / split / file_name, "JPEG", quality=90)
        images.append(
            {
                "id": image_id,
                "file_name": file_name,
                "width": size_px,
                "height": size_px,
                "license": 1,
                "objects": objects,
            }
        )
        for caption in captions:
            annotations.append({"id": caption_id, "image_id": image_id, "caption": caption})
            caption_id += 1
    data = {
        "info": {"description": "synthetic coloured shapes in COCO captions format", "generator": params},
        "licenses": [{"id": 1, "name": "generated, public domain", "url": ""}],
        "images": images,
        "annotations": annotations,
    }
    (folder / "annotations").mkdir(exist_ok=True)
    _annotation_file(folder, split).write_text(json.dumps(data), encoding="utf-8")


def generate_shapes_coco(
    root: str | Path,
    n_train: int = 1200,
    n_val: int = 200,
    image_size: int = 64,
    seed: int = 0,
    setting: str = "data.root",
) -> Path:
    """Write the synthetic set into `root` unless it is already complete; returns `root`.

    Deterministic: the same arguments give byte-identical files, and train and val use different random draws.
    Writes only into a folder that does not exist, is empty or carries this generator's marker
    (`datamodules/generated.py`); any other folder raises `ForeignDataError` naming `setting`, the setting
    that points at it. The set is written to a temporary folder inside `root` and moved into place with the
    annotations last, so an interrupted run never leaves something that looks complete.
    """
    root = Path(root)
    params = {"n_train": n_train, "n_val": n_val, "image_size": image_size, "seed": seed}
    if _is_complete(root):  # ours or anyone's: read as it is, never rewritten
        info = json.loads(_annotation_file(root, "val2017").read_text(encoding="utf-8")).get("info", {})
        if info.get("generator", params) != params:
            log.warning(
                "%s already holds a synthetic set made with %s; delete it to regenerate",
                root,
                info["generator"],
            )
        return root
    claim_folder(root, GENERATOR, params, root_advice(setting))
    entries = (*SPLITS, "annotations")  # the annotations last: their files mark a finished set
    with written_whole(root, GENERATOR, params, entries, lambda: _is_complete(root)) as tmp:
        _write_split(tmp, "train2017", n_train, image_size, seed, 1, 1, params)
        _write_split(tmp, "val2017", n_val, image_size, seed, n_train + 1, 5 * n_train + 1, params)
    log.info("wrote %d + %d synthetic shape images to %s", n_train, n_val, root)
    return root
