"""A classification set of coloured shapes in ImageFolder layout, drawn like the shapes quickstart's images.

One shape per image; its class is colour and shape ("red circle"), its size and place vary as in the captioned
set (`datamodules/synthetic/shapes.py`, whose drawing code this reuses), so an image-text model trained on the
quickstart can be tested zero-shot on it:

    root/<split>/<colour>_<shape>/<n>.jpg        split in train, val, test

`ClassificationDataModule` reads it (`dataset: imagefolder`); folder names become the class names
"red circle", "blue square", ...
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Sequence
from pathlib import Path

from datamodules.generated import claim_folder, generated_by, is_complete, root_advice, written_whole
from datamodules.synthetic.shapes import COLOURS, POSITIONS, SHAPES, _random_object, _render

log = logging.getLogger(__name__)

GENERATOR = "datamodules.synthetic.shapes_folder.generate_shapes_imagefolder"


def generate_shapes_imagefolder(
    root: str | os.PathLike,
    colours: Sequence[str] = tuple(COLOURS),
    shapes: Sequence[str] = SHAPES,
    per_class: dict[str, int] | None = None,
    image_size: int = 64,
    seed: int = 0,
    setting: str = "data.root",
) -> Path:
    """Write root/<split>/<colour>_<shape>/*.jpg unless a finished set is there already; returns `root`.

    Args:
        root: folder to write into (created).
        colours: colour names of `synthetic_shapes.COLOURS`.
        shapes: shape names of `synthetic_shapes.SHAPES`.
        per_class: images per class and split; default {"train": 20, "val": 10, "test": 20}.
        image_size: image side in pixels (the quickstart's is 64).
        seed: random draws of place, size, background and colour jitter; one stream per split, so changing
            one split's size leaves the others unchanged.
        setting: the setting that points at `root`, named in the error when `root` holds other data: a folder
            that exists, is not empty and carries no marker of this generator is never written into.
    """
    root = Path(root)
    per_class = per_class or {"train": 20, "val": 10, "test": 20}
    unknown = [c for c in colours if c not in COLOURS] + [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown colour or shape {unknown}; known: {list(COLOURS)}, {list(SHAPES)}")
    params = {
        "colours": list(colours),
        "shapes": list(shapes),
        "per_class": per_class,
        "image_size": image_size,
        "seed": seed,
    }
    marker = generated_by(root)
    if is_complete(root, GENERATOR):
        if marker["params"] != params:
            log.warning(
                "%s already holds a shapes set made with other settings; delete it to regenerate", root
            )
        return root
    claim_folder(root, GENERATOR, params, root_advice(setting))
    with written_whole(root, GENERATOR, params, list(per_class), lambda: is_complete(root, GENERATOR)) as tmp:
        for split, n in per_class.items():
            rng = random.Random(f"{seed}:{split}")  # a string seed hashes the same in every process
            for colour in colours:
                for shape in shapes:
                    folder = tmp / split / f"{colour}_{shape}"
                    folder.mkdir(parents=True)
                    for i in range(n):
                        place = rng.choice(list(POSITIONS))
                        obj = {
                            **_random_object(rng, image_size, POSITIONS[place]),
                            "shape": shape,
                            "colour": colour,
                        }
                        _render([obj], image_size, rng).save(folder / f"{i:05d}.jpg", "JPEG", quality=90)
    log.info("wrote %d shape classes x %s images to %s", len(colours) * len(shapes), per_class, root)
    return root
