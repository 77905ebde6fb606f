"""The image-text pairs' duplicate groups are found once, in prepare_data, and cached under the framework's cache
folder: setup on every rank reads them without opening an image, a changed manifest or image file changes the
cache key, and a bad cache file is rebuilt with a warning."""

from __future__ import annotations

import csv
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from lightning.pytorch.trainer.states import TrainerFn
from PIL import Image

from datamodules.image.pair_duplicates import cache_key, cache_path, duplicate_groups
from datamodules.image.pairs import PairTable
from datamodules.image.pairs_datamodule import ImageTextPairsDataModule
from datamodules.sections import ImagesConfig, LoaderConfig, TokenizerConfig

# rows 0 and 2 share a caption up to case and punctuation; row 5's image is a byte copy of row 1's
CAPTIONS = ["a red square", "a blue circle", "A red square!", "a green triangle", "a yellow star"]
GROUPS = [0, 1, 0, 3, 4, 1]


def _noise_png(path: Path, side: int, seed: int) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def manifest(tmp_path: Path) -> Path:
    """A CSV of six pairs with image paths relative to it, in a data folder of its own."""
    data = tmp_path / "data"
    data.mkdir()
    rows = []
    for k, caption in enumerate(CAPTIONS):
        _noise_png(data / f"{k}.png", 32, seed=k)
        rows.append((f"{k}.png", caption))
    shutil.copy(data / "1.png", data / "copy.png")
    rows.append(("copy.png", "another caption"))
    with (data / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("filepath", "title"), *rows])
    return data / "pairs.csv"


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """The rows whose image file is read or decoded, one entry per read."""
    calls: list[str] = []
    digest, read = PairTable.digest, PairTable.read

    def counting_digest(self: PairTable, i: int) -> str:
        calls.append(self.where[i])
        return digest(self, i)

    def counting_read(self: PairTable, i: int):
        calls.append(self.where[i])
        return read(self, i)

    monkeypatch.setattr(PairTable, "digest", counting_digest)
    monkeypatch.setattr(PairTable, "read", counting_read)
    return calls


def _dm(manifest: Path) -> ImageTextPairsDataModule:
    return ImageTextPairsDataModule(
        train=str(manifest),
        images=ImagesConfig(image_size=32, min_scale=1.0),
        context_length=16,
        loader=LoaderConfig(batch_size=2, num_workers=0),
        tokenizer=TokenizerConfig(vocab_size=100, cache_dir=str(manifest.parents[1] / "cache")),
    )


def _cached(manifest: Path) -> list[Path]:
    return sorted((manifest.parents[1] / "cache" / "pair-duplicates").glob("*"))


def test_prepare_data_caches_the_groups_every_setup_reads(manifest: Path, opened: list[str]) -> None:
    """prepare_data reads each image once; setup in the same process and in a fresh one without prepare_data (a
    rank other than 0) read the groups from the cache; they equal the uncached computation."""
    data_files = sorted(manifest.parent.iterdir())
    first = _dm(manifest)
    first.prepare_data()
    assert len(opened) == len(GROUPS)
    key = cache_key([str(manifest)], first.tables("train"))
    assert _cached(manifest) == [cache_path(manifest.parents[1] / "cache", key)]
    assert sorted(manifest.parent.iterdir()) == data_files  # nothing written beside the user's data

    first.setup("fit")
    other_rank = _dm(manifest)
    other_rank.setup("fit")
    assert len(opened) == len(GROUPS)  # neither setup opened an image
    for dm in (first, other_rank):
        assert dm.datasets["train"].groups.tolist() == GROUPS
        assert dm.duplicates == {"image": 1, "caption": 1}
    uncached, counts = duplicate_groups(first.tables("train"))
    assert uncached.tolist() == GROUPS and counts == first.duplicates


def test_evaluation_runs_prepare_no_groups(manifest: Path, opened: list[str]) -> None:
    """prepare_data of a validate run leaves the training images alone: only fitting uses the groups."""
    dm = _dm(manifest)
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    dm.prepare_data()
    assert opened == [] and _cached(manifest) == []


def test_changed_source_files_change_the_key(manifest: Path, opened: list[str]) -> None:
    """A manifest touched, or an image rewritten under the same name, keys a new cache: the groups are computed
    again, from the new bytes."""
    _dm(manifest).setup("fit")  # no prepare_data: setup builds a missing cache itself
    key = cache_key([str(manifest)], _dm(manifest).tables("train"))

    st = manifest.stat()  # rewritten a second later, same content
    os.utime(manifest, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    touched = cache_key([str(manifest)], _dm(manifest).tables("train"))
    assert touched != key

    _noise_png(manifest.parent / "copy.png", 40, seed=99)  # no longer a copy of 1.png
    opened.clear()
    dm = _dm(manifest)
    dm.setup("fit")
    assert cache_key([str(manifest)], dm.tables("train")) not in (key, touched)
    assert len(opened) == len(GROUPS)
    assert dm.datasets["train"].groups.tolist() == [0, 1, 0, 3, 4, 5]
    assert dm.duplicates == {"image": 0, "caption": 1}
    assert len(_cached(manifest)) == 2  # the first and the last; touching alone built none


@pytest.mark.parametrize("damage", ["garbage", "other rows"])
def test_bad_cache_is_rebuilt_and_logged(manifest: Path, opened: list[str], caplog, damage: str) -> None:
    """A cache file that is not an .npz, or holds groups for another number of rows, is rebuilt with a warning."""
    _dm(manifest).setup("fit")
    (path,) = _cached(manifest)
    if damage == "garbage":
        path.write_bytes(b"not a numpy archive")
    else:
        np.savez(path, groups=np.arange(3), counts=np.zeros(2, dtype=np.int64))
    opened.clear()
    dm = _dm(manifest)
    with caplog.at_level(logging.WARNING, logger="datamodules.image.pair_duplicates"):
        dm.setup("fit")
    assert f"duplicate-group cache {path} is unreadable" in caplog.text
    assert len(opened) == len(GROUPS)
    assert dm.datasets["train"].groups.tolist() == GROUPS

    opened.clear()
    _dm(manifest).setup("fit")  # the rebuilt file reads back
    assert opened == []
