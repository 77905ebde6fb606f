"""Curation of a web pool: scoring with a teacher, the three filters, resume, the sample list, the search.

Two generated pools, each with its own teacher, since no small teacher sees both kinds of fault:

* captions: shapes images with their own captions and, planted, captions of an image of another shape and
  colour. The teacher is the suite's tiny CLIP (tests/conftest.py `tiny_clip`: 300 steps on 1000 shapes images,
  shared with the zero-shot and probe tests), which has learnt colours and shapes, so a wrong caption scores
  lower. It can fail where a wrong caption still fits its image (shapes sets repeat descriptions) or the
  teacher misreads a colour; the bar is 0.9, not 1. Its image embeddings are not used for duplicates: it maps
  all images of one description together (distinct shapes images reach a cosine of 0.99).
* images: smooth random colour fields (distinct images, as photos are) with, planted, re-encoded (JPEG, quality
  75) and resized copies of pool images and of evaluation images. The teacher is a randomly initialised tiny
  open_clip ViT, read through the wrappers `init_clip` uses; its embeddings less the pool's mean (`centre`)
  keep pixel-level likeness: copies measured at cosines of 0.97 and above, distinct images at 0.93 and below.
  It can fail where a JPEG copy loses more than that margin, or two random fields happen to look alike.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import open_clip
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from datamodules.image.clip_tokenizer import ClipTokenizer
from datamodules.image.coco import CaptionedImage, eval_transform, load_coco_captions
from datamodules.image.curation_data import CurationStream, pool_units, read_manifest
from datamodules.image.curation_filters import apply_filters, load_scores, write_outputs
from datamodules.image.near_duplicates import clusters, nearest_in, similar_pairs
from datamodules.image.shards.listing import shard_selection
from datamodules.image.shards.stream import ShardStream
from datamodules.image.shards.write import write_shards
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.clip_import import OpenClipText, OpenClipVision
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.curation import RUN_FILE, Teacher, load_teacher, score, stored
from tests.helpers import REPO

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)
N_BASE, N_PLANTED = 48, 8
THRESHOLDS = {"dup_threshold": 0.95, "leak_threshold": 0.95, "centre": True}


def _copy(path: str, new_id: int, size: int, folder: Path) -> CaptionedImage:
    """A re-encoded (JPEG, quality 75) and resized copy of an image."""
    image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
    image.save(folder / f"{new_id}.jpg", quality=75)
    return CaptionedImage(new_id, str(folder / f"{new_id}.jpg"), ("a picture",), (new_id,))


@pytest.fixture(scope="module")
def captions_pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Shapes images in shards of 16, `N_PLANTED` of them with the caption of an image of other shapes and colours."""
    tmp = tmp_path_factory.mktemp("captions")
    root = generate_shapes_coco(tmp / "shapes", n_train=N_BASE, n_val=1, image_size=32, seed=7)
    train = load_coco_captions(root / "annotations" / "captions_train2017.json", root / "train2017")
    entries = json.loads((root / "annotations" / "captions_train2017.json").read_text())["images"]
    objects = {e["id"]: {(o["shape"], o["colour"]) for o in e["objects"]} for e in entries}
    rng, records, mismatched = random.Random(0), list(train), set()
    for i in range(N_PLANTED):
        target = records[i]
        donor = next(
            r for r in rng.sample(train, len(train)) if not objects[r.image_id] & objects[target.image_id]
        )
        records[i] = CaptionedImage(target.image_id, target.path, donor.captions[:1], donor.caption_ids[:1])
        mismatched.add(f"{target.image_id:012d}")
    write_shards(records, tmp / "shards", max_samples_per_shard=16, seed=0)
    return {"shards": tmp / "shards", "mismatched": mismatched, "tmp": tmp}


@pytest.fixture(scope="module")
def images_pool(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_images_pool(tmp_path_factory.mktemp("images"))


def make_images_pool(tmp: Path) -> dict:
    """`N_BASE` random colour fields (64 px), copies of `N_PLANTED` of them (80 px) and of the `N_PLANTED`
    evaluation images (96 px), in shards of 16; the evaluation images in a folder."""
    rng = np.random.default_rng(0)
    for folder in ("base", "eval", "copies"):
        (tmp / folder).mkdir()

    def field(path: Path) -> str:
        grid = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        Image.fromarray(grid).resize((64, 64), Image.BICUBIC).save(path)
        return str(path)

    base = [
        CaptionedImage(i, field(tmp / "base" / f"{i}.png"), ("a picture",), (i,))
        for i in range(1, N_BASE + 1)
    ]
    evals = [field(tmp / "eval" / f"{k}.png") for k in range(N_PLANTED)]
    duplicates = [_copy(base[k].path, 100000 + k, 80, tmp / "copies") for k in range(N_PLANTED)]
    leaks = [_copy(evals[k], 200000 + k, 96, tmp / "copies") for k in range(N_PLANTED)]
    write_shards(base + duplicates + leaks, tmp / "shards", max_samples_per_shard=16, seed=0)
    return {
        "shards": tmp / "shards",
        "eval": tmp / "eval",
        "pairs": [(f"{b.image_id:012d}", f"{d.image_id:012d}") for b, d in zip(base, duplicates)],
        "leaks": {f"{d.image_id:012d}": f"{k}.png" for k, d in enumerate(leaks)},
        "tmp": tmp,
    }


def random_teacher() -> Teacher:
    """A randomly initialised open_clip CLIP of width 64, one layer per tower, 32 px images in 4 px patches."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=4, image_size=32, head_width=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=16, vocab_size=49408, width=32, heads=2, layers=1),
    )
    image = ImageTower(ImageTowerConfig(image_size=32), None, backbone=OpenClipVision(model.visual))
    return Teacher(image, OpenClipText(model), ClipTokenizer("open_clip:ViT-B-32"), 32, "pil", 16, "random")


def score_images(pool: dict, out: Path) -> Path:
    score([str(pool["shards"])], out, random_teacher(), [str(pool["eval"])], 32, 0, accelerator="cpu")
    return out


@pytest.fixture(scope="module")
def images_scores(images_pool: dict, one_thread_module: None) -> Path:
    return score_images(images_pool, images_pool["tmp"] / "scores")


def precision_recall(flagged: set[str], planted: set[str]) -> tuple[float, float]:
    hits = len(flagged & planted)
    return hits / max(len(flagged), 1), hits / len(planted)


def flagged(result: dict, flag: str) -> set[str]:
    return {k for k, f in zip(result["pool"]["key"].to_pylist(), result["flags"]) if flag in f}


def test_clip_score_filter_drops_planted_mismatched_captions(captions_pool: dict, tiny_clip: dict) -> None:
    out = score(
        [str(captions_pool["shards"])],
        captions_pool["tmp"] / "scores",
        str(tiny_clip["ckpt"]),
        [],
        32,
        0,
        accelerator="cpu",
    )
    table = load_scores(out)
    assert table.num_rows == N_BASE and table.column("error").null_count == N_BASE  # each once, all scored
    # DataComp's rule: keep the best-scored fraction (here the share of true pairs), no other filter
    result = apply_filters(
        table, top_fraction=1 - N_PLANTED / N_BASE, dup_threshold=None, leak_threshold=None
    )
    p, r = precision_recall(flagged(result, "low_score"), captions_pool["mismatched"])
    assert p >= 0.9 and r >= 0.9, (p, r)


def test_duplicate_and_eval_copy_filters_and_the_sample_list(
    images_pool: dict, images_scores: Path, tmp_path: Path
) -> None:
    table = load_scores(images_scores)
    n_pool = N_BASE + 2 * N_PLANTED
    assert table.num_rows == n_pool + N_PLANTED  # the pool and the evaluation images, each once
    result = apply_filters(table, **THRESHOLDS)
    keys = result["pool"]["key"].to_pylist()

    p, r = precision_recall(flagged(result, "eval_duplicate"), set(images_pool["leaks"]))
    assert p >= 0.9 and r >= 0.9, (p, r)
    matches = dict(zip(keys, result["leak_match"]))
    assert sum(matches[k].endswith(f"/{name}") for k, name in images_pool["leaks"].items()) >= 0.9 * N_PLANTED
    # one of each planted pair is dropped (either may be), and every dropped duplicate belongs to a planted pair
    duplicates = flagged(result, "duplicate")
    in_pairs = {k for pair in images_pool["pairs"] for k in pair}
    found = sum(len(duplicates & set(pair)) == 1 for pair in images_pool["pairs"])
    precision = len(duplicates & in_pairs) / max(len(duplicates), 1)
    assert precision >= 0.9 and found / N_PLANTED >= 0.9, (precision, found)
    cluster = dict(zip(keys, result["cluster"].tolist()))
    assert sum(cluster[a] == cluster[b] for a, b in images_pool["pairs"]) >= 0.9 * N_PLANTED
    assert not result["kept"][[k in images_pool["leaks"] for k in keys]].any()

    report = write_outputs(result, tmp_path / "curated", THRESHOLDS)
    assert report["pool"] == n_pool and report["kept"] == int(result["kept"].sum()) == n_pool - 16
    assert report["dropped_by"] == {"unreadable": 0, "eval_duplicate": 8, "duplicate": 8, "low_score": 0}
    assert (tmp_path / "curated" / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## dropped: duplicate" in (tmp_path / "curated" / "report.md").read_text()
    # the sample list: the shard reader gives the kept samples and no other
    shards, selection = shard_selection(str(tmp_path / "curated" / "kept.parquet"))
    stream = ShardStream(shards, eval_transform(16), batch_size=1, selection=selection)
    seen = sorted(f"{item['image_id']:012d}" for item in stream)
    assert seen == sorted(k for k, kept in zip(keys, result["kept"]) if kept)


def test_cli_filter_writes_the_outputs_and_refuses_a_bad_fraction(
    images_scores: Path, tmp_path: Path
) -> None:
    from cli import main

    out = tmp_path / "curated"
    main(
        [
            "curate",
            "filter",
            "--scores",
            str(images_scores),
            "--out",
            str(out),
            "--centre",
            "--min-score",
            "-1",
        ]
    )
    report = json.loads((out / "report.json").read_text())
    assert (
        report["kept"] == N_BASE
        and report["dropped_by"]["duplicate"] == report["dropped_by"]["eval_duplicate"] == 8
    )
    assert report["settings"]["centre"] is True
    kept = pq.read_table(out / "kept.parquet")
    assert kept.column_names == ["shard", "index", "key"] and kept.num_rows == N_BASE
    with pytest.raises(ValueError, match=r"--top-fraction 1.5: a fraction in \(0, 1\]"):
        main(["curate", "filter", "--scores", str(images_scores), "--out", str(out), "--top-fraction", "1.5"])


def test_open_clip_teacher_loads_as_init_clip_does(tmp_path: Path) -> None:
    # a tiny architecture registered under a name of its own, with the random teacher's weights in a file
    config = {
        "embed_dim": 64,
        "vision_cfg": {"layers": 1, "width": 64, "patch_size": 4, "image_size": 32, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / "tiny-curation-test.json").write_text(json.dumps(config))
    open_clip.add_model_config(tmp_path / "tiny-curation-test.json")
    direct = random_teacher()
    weights = {f"visual.{k}": v for k, v in direct.image.backbone.visual.state_dict().items()}
    weights.update(direct.text.model.state_dict())
    weights["logit_scale"] = torch.tensor(2.0)  # kept out of the towers by the wrappers; any value
    torch.save(weights, tmp_path / "tiny.pt")
    loaded = load_teacher(f"open_clip:tiny-curation-test:{tmp_path / 'tiny.pt'}")
    assert (loaded.image_size, loaded.resize, loaded.context_length) == (32, "pil", 16)
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    tokens = loaded.tokenizer(["a red circle", "a blue star"], loaded.context_length)
    with torch.no_grad():
        a, b = direct.eval()(images, **tokens), loaded.eval()(images, **tokens)
    for x, y in zip(a, b):  # the same weights and kernels: equal up to float32 rounding
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-5)


def test_a_resumed_run_scores_only_the_missing_units_and_equals_an_unbroken_one(
    images_pool: dict, images_scores: Path, tmp_path: Path
) -> None:
    scored = images_scores
    parts = sorted((scored / "parts").glob("*.parquet"))
    assert len(parts) == len(pool_units([str(images_pool["shards"])], [str(images_pool["eval"])])) == 5
    out = tmp_path / "resumed"
    (out / "parts").mkdir(parents=True)
    for part in parts[1:]:  # as if stopped after all but the first unit
        (out / "parts" / part.name).write_bytes(part.read_bytes())
    (out / RUN_FILE).write_text((scored / RUN_FILE).read_text())
    before = {p.name: p.stat().st_mtime_ns for p in (out / "parts").glob("*.parquet")}
    score_images(images_pool, out)
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
        score([str(images_pool["shards"])], out, random_teacher(), [], 32, 0, accelerator="cpu")


def test_ranks_split_the_units_and_manifests_flag_unreadable_rows(images_pool: dict, tmp_path: Path) -> None:
    units = pool_units([str(images_pool["shards"])], [str(images_pool["eval"])])
    shares = [CurationStream(units, eval_transform(16), rank=r, world_size=2).mine() for r in range(2)]
    assert sorted(shares[0] + shares[1], key=units.index) == units and not set(shares[0]) & set(shares[1])
    (tmp_path / "broken.png").write_bytes(b"not an image")
    image = next(images_pool["eval"].iterdir())
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
    queries = emb[:10] + 0.01
    best, where = nearest_in(queries / np.linalg.norm(queries, axis=1, keepdims=True), emb, block=7)
    assert where.tolist() == list(range(10)) and (best > 0.99).all()


@pytest.mark.slow
def test_two_processes_write_the_scores_of_one(captions_pool: dict, tiny_clip: dict, tmp_path: Path) -> None:
    """`python cli.py curate score` on 2 CPU ranks (DDP over gloo) writes the scores that one process writes."""
    one = load_scores(
        score(
            [str(captions_pool["shards"])],
            tmp_path / "one",
            str(tiny_clip["ckpt"]),
            [],
            32,
            0,
            accelerator="cpu",
        )
    )
    command = [
        sys.executable, "cli.py", "curate", "score", "--pool", str(captions_pool["shards"]),
        "--teacher", str(tiny_clip["ckpt"]), "--out", str(tmp_path / "two"), "--batch-size", "32",
        "--workers", "0", "--accelerator", "cpu", "--devices", "2", "--strategy", "ddp",
    ]  # fmt: skip
    subprocess.run(command, cwd=REPO, check=True, timeout=600)
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").glob("*.parquet"))
    assert parts == sorted(p.name for p in (tmp_path / "one" / "parts").glob("*.parquet")) and len(parts) == 3
    two = load_scores(tmp_path / "two")
    assert two.column("key").to_pylist() == one.column("key").to_pylist()
    # other batch compositions and thread counts: float32 sums in another order (1e-5); float16 embeddings (1e-3)
    np.testing.assert_allclose(two.column("cosine").to_numpy(), one.column("cosine").to_numpy(), atol=1e-5)
    e1, e2 = (np.array(t.column("embedding").to_pylist(), dtype=np.float32) for t in (one, two))
    np.testing.assert_allclose(e2, e1, atol=1e-3)
