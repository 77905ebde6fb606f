"""Curation of a web pool: scoring with a teacher, the three filters, resume, the sample list, the search.

The pool is generated: shapes images (another seed than the teacher's training set) with their own captions,
and planted among them mismatched captions (a caption of an image of another shape and colour), re-encoded and
resized copies of pool images, and re-encoded and resized copies of evaluation images (the set's val split).

The teacher is the suite's tiny CLIP (tests/conftest.py `tiny_clip`: 300 steps on 1000 shapes images, shared
with the zero-shot and probe tests): it has learnt colours and shapes, so a caption naming another shape or
colour scores lower than the image's own, and a copy's image embedding is closer to its original than to any
other image. Where the tests can fail: a mismatched caption that happens to describe its image well (shapes
sets repeat descriptions), or two distinct images of the same shape, colour, size and place, whose embeddings
are as close as a copy's; at 56 base images either is rare, and the bar is 0.9, not 1.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datamodules.image.coco import CaptionedImage, eval_transform, load_coco_captions
from datamodules.image.curation_data import CurationStream, pool_units, read_manifest
from datamodules.image.curation_filters import apply_filters, load_scores, write_outputs
from datamodules.image.near_duplicates import clusters, nearest_in, similar_pairs
from datamodules.image.webdataset_shards import ShardStream, shard_selection, write_shards
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.curation import RUN_FILE, score, stored

ROOT = Path(__file__).resolve().parents[1]
N_BASE, N_PLANTED = 56, 8
THRESHOLDS = {"dup_threshold": 0.95, "leak_threshold": 0.95}


def _copy(record: CaptionedImage, new_id: int, size: int, folder: Path) -> CaptionedImage:
    """A re-encoded (JPEG, quality 75) and resized copy of a record's image, with its captions."""
    image = Image.open(record.path).convert("RGB").resize((size, size), Image.BICUBIC)
    path = folder / f"{new_id}.jpg"
    image.save(path, quality=75)
    return CaptionedImage(new_id, str(path), record.captions, record.caption_ids)


def _what(record_objects: list[dict]) -> set[tuple[str, str]]:
    return {(o["shape"], o["colour"]) for o in record_objects}


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The generated pool in shards of 16, the evaluation folder, and the keys of what was planted."""
    tmp = tmp_path_factory.mktemp("pool")
    root = generate_shapes_coco(tmp / "shapes", n_train=N_BASE, n_val=N_PLANTED, image_size=32, seed=7)
    train = load_coco_captions(root / "annotations" / "captions_train2017.json", root / "train2017")
    val = load_coco_captions(root / "annotations" / "captions_val2017.json", root / "val2017")
    objects = {
        e["id"]: _what(e["objects"])
        for e in json.loads((root / "annotations" / "captions_train2017.json").read_text())["images"]
    }
    rng = random.Random(0)
    records = list(train)
    # captions of an image sharing no (shape, colour) with the image they are put on
    mismatched = set()
    for i in range(N_PLANTED):
        target = records[i]
        donor = next(
            r for r in rng.sample(train, len(train)) if not objects[r.image_id] & objects[target.image_id]
        )
        records[i] = CaptionedImage(target.image_id, target.path, donor.captions[:1], donor.caption_ids[:1])
        mismatched.add(f"{target.image_id:012d}")
    copies = tmp / "copies"
    copies.mkdir()
    originals = records[N_PLANTED : 2 * N_PLANTED]  # correct captions; their copies are planted duplicates
    duplicates = [_copy(r, 100000 + k, 40, copies) for k, r in enumerate(originals)]
    leaks = [_copy(r, 200000 + k, 48, copies) for k, r in enumerate(val)]
    write_shards(records + duplicates + leaks, tmp / "shards", max_samples_per_shard=16, seed=0)
    return {
        "shards": tmp / "shards",
        "eval": root / "val2017",
        "mismatched": mismatched,
        "pairs": [(f"{o.image_id:012d}", f"{d.image_id:012d}") for o, d in zip(originals, duplicates)],
        "leaks": {f"{d.image_id:012d}": Path(v.path).name for d, v in zip(leaks, val)},
        "tmp": tmp,
    }


@pytest.fixture(scope="module")
def scored(pool: dict, tiny_clip: dict) -> Path:
    out = pool["tmp"] / "scores"
    with torch.inference_mode():
        score(
            [str(pool["shards"])], out, str(tiny_clip["ckpt"]), [str(pool["eval"])], 32, 0, accelerator="cpu"
        )
    return out


def precision_recall(flagged: set[str], planted: set[str]) -> tuple[float, float]:
    hits = len(flagged & planted)
    return hits / max(len(flagged), 1), hits / len(planted)


def test_filters_find_planted_mismatches_duplicates_and_eval_copies(
    pool: dict, scored: Path, tmp_path: Path
) -> None:
    table = load_scores(scored)
    n_pool = N_BASE + 2 * N_PLANTED
    assert table.num_rows == n_pool + N_PLANTED  # the pool and the evaluation images, each once
    result = apply_filters(table, top_fraction=1 - N_PLANTED / n_pool, **THRESHOLDS)
    keys = result["pool"]["key"].to_pylist()
    flagged = {
        flag: {k for k, f in zip(keys, result["flags"]) if flag in f}
        for flag in ("low_score", "duplicate", "eval_duplicate")
    }

    p, r = precision_recall(flagged["low_score"], pool["mismatched"])
    assert p >= 0.9 and r >= 0.9, (p, r)
    p, r = precision_recall(flagged["eval_duplicate"], set(pool["leaks"]))
    assert p >= 0.9 and r >= 0.9, (p, r)
    matches = dict(zip(keys, result["leak_match"]))
    assert sum(matches[k].endswith(name) for k, name in pool["leaks"].items()) >= 0.9 * N_PLANTED
    # one of each planted pair is dropped (either), and a dropped duplicate belongs to a planted pair
    in_pairs = {k for pair in pool["pairs"] for k in pair}
    found = sum(len(flagged["duplicate"] & set(pair)) == 1 for pair in pool["pairs"])
    precision = len(flagged["duplicate"] & in_pairs) / max(len(flagged["duplicate"]), 1)
    assert precision >= 0.9 and found / N_PLANTED >= 0.9, (precision, found)
    cluster = dict(zip(keys, result["cluster"].tolist()))
    assert sum(cluster[a] == cluster[b] for a, b in pool["pairs"]) >= 0.9 * N_PLANTED

    report = write_outputs(result, tmp_path, {"top_fraction": 1 - N_PLANTED / n_pool, **THRESHOLDS})
    assert report["pool"] == n_pool and report["kept"] == int(result["kept"].sum())
    assert (tmp_path / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## dropped: duplicate" in (tmp_path / "report.md").read_text()
    # the sample list trains on the kept samples only, through the shard reader
    shards, selection = shard_selection(str(tmp_path / "kept.parquet"))
    stream = ShardStream(shards, eval_transform(16), batch_size=1, selection=selection)
    seen = sorted(f"{item['image_id']:012d}" for item in stream)
    assert seen == sorted(k for k, kept in zip(keys, result["kept"]) if kept)


def test_a_resumed_run_scores_only_the_missing_units_and_equals_an_unbroken_one(
    pool: dict, scored: Path, tiny_clip: dict, tmp_path: Path
) -> None:
    parts = sorted((scored / "parts").glob("*.parquet"))
    assert len(parts) == len(pool_units([str(pool["shards"])], [str(pool["eval"])]))  # 5 shards, 1 eval unit
    out = tmp_path / "scores"
    (out / "parts").mkdir(parents=True)
    for part in parts[1:]:  # as if stopped after all but the first unit
        (out / "parts" / part.name).write_bytes(part.read_bytes())
    (out / RUN_FILE).write_text((scored / RUN_FILE).read_text())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    score([str(pool["shards"])], out, str(tiny_clip["ckpt"]), [str(pool["eval"])], 32, 0, accelerator="cpu")
    assert {
        p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet") if p.name in before
    } == before
    assert stored(out) == stored(scored)
    again, first = pq.read_table(out / "parts" / parts[0].name), pq.read_table(parts[0])
    assert again.column("key").to_pylist() == first.column("key").to_pylist()
    # other batch compositions (a unit alone, not beside the next one): float32 sums in another order
    np.testing.assert_allclose(
        again.column("cosine").to_numpy(), first.column("cosine").to_numpy(), atol=1e-5
    )
    with pytest.raises(ValueError, match="holds the scores of another run"):
        score([str(pool["shards"])], out, str(tiny_clip["ckpt"]), [], 32, 0, accelerator="cpu")


def test_ranks_split_the_units_and_manifests_flag_unreadable_rows(pool: dict, tmp_path: Path) -> None:
    units = pool_units([str(pool["shards"])], [str(pool["eval"])])
    shares = [CurationStream(units, eval_transform(16), rank=r, world_size=2).mine() for r in range(2)]
    assert sorted(shares[0] + shares[1], key=units.index) == units and not set(shares[0]) & set(shares[1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    image = next(pool["eval"].iterdir())
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(f"path,caption\n{image},a shape\nbroken.png,a broken one\nmissing.jpg,gone\n")
    assert read_manifest(manifest)[1] == (str(tmp_path / "broken.png"), "a broken one")
    rows = [i for i in CurationStream(pool_units([str(manifest)]), eval_transform(16)) if "end" not in i]
    assert [r["image"] is not None for r in rows] == [True, False, False]
    assert rows[1]["error"].startswith("unreadable image") and rows[2]["error"].startswith("missing")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.jpg"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: a manifest row needs an image .* and a caption"):
        read_manifest(tmp_path / "bad.jsonl")


def test_blocked_search_equals_the_full_matrix_and_clusters_join_transitively() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((50, 8)).astype(np.float32)
    emb[7], emb[30], emb[31] = emb[3] + 0.05, emb[3] - 0.05, emb[12] + 0.05  # 3~7~30, 12~31
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    full = emb @ emb.T
    expected = {(i, j) for i in range(50) for j in range(i + 1, 50) if full[i, j] > 0.99}
    assert expected >= {(3, 7), (3, 30), (7, 30), (12, 31)}
    for block in (7, 50, 64):  # blocks that cut the matrix unevenly, one block, a block larger than it
        assert set(map(tuple, similar_pairs(emb, 0.99, block).tolist())) == expected
    ids = clusters(50, np.array([(7, 30), (3, 7), (12, 31)]))
    assert ids[30] == ids[7] == ids[3] == 3 and ids[31] == 12 and ids[0] == 0
    best, where = nearest_in(emb[:10] + 0.01, emb, block=7)
    assert where.tolist() == list(range(10)) and (best > 0.99).all()


@pytest.mark.slow
def test_two_processes_write_the_scores_of_one(
    pool: dict, scored: Path, tiny_clip: dict, tmp_path: Path
) -> None:
    out = tmp_path / "ddp"
    command = [
        sys.executable, "cli.py", "curate", "score", "--pool", str(pool["shards"]), "--eval-images", str(pool["eval"]),
        "--teacher", str(tiny_clip["ckpt"]), "--out", str(out), "--batch-size", "32", "--workers", "0",
        "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, timeout=600)
    one, two = load_scores(scored), load_scores(out)
    assert two.column("key").to_pylist() == one.column("key").to_pylist()
    # other batch compositions: float32 sums in another order (1e-5), float16 embeddings (1e-3)
    np.testing.assert_allclose(two.column("cosine").to_numpy(), one.column("cosine").to_numpy(), atol=1e-5)
    e1 = np.stack([np.array(e, dtype=np.float32) for e in one.column("embedding").to_pylist()])
    e2 = np.stack([np.array(e, dtype=np.float32) for e in two.column("embedding").to_pylist()])
    np.testing.assert_allclose(e2, e1, atol=1e-3)
