"""Curation throughput: pairs scored per second, and how the near-duplicate search grows with the pool.

    python benchmarks/curation.py                      # CPU: a tiny teacher, searches of 1e5 and 1e6 embeddings
    python benchmarks/curation.py --device cuda --teacher open_clip:ViT-B-32:/weights/vit_b32.pt --pairs 20000

Scoring: `curate score` over a generated pool of `--pairs` shapes pairs on one device. The search: random unit
vectors with planted copies through `similar_pairs` in blocks of `--block`; its time grows as N^2, so a size
that would exceed `--budget` seconds is timed on a few tiles and extrapolated (every tile costs the same),
marked `extrapolated`."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.image.near_duplicates import _on, similar_pairs  # noqa: E402


def tiny_teacher():
    """A random open_clip model of width 64 (1 layer per tower), 32 px images: the pipeline's cost, not a model's."""
    import open_clip

    from datamodules.image.clip_tokenizer import ClipTokenizer
    from lightning_modules.components.clip_import import OpenClipText, OpenClipVision
    from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
    from lightning_modules.curation import Teacher

    model = open_clip.CLIP(
        embed_dim=64,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=64, patch_size=8, image_size=32, head_width=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=32, vocab_size=49408, width=64, heads=2, layers=1),
    )
    image = ImageTower(ImageTowerConfig(image_size=32), None, backbone=OpenClipVision(model.visual))
    return Teacher(image, OpenClipText(model), ClipTokenizer("open_clip:ViT-B-32"), 32, "pil", 32, "tiny")


def bench_scoring(pairs: int, teacher_spec: str | None, device: str, batch_size: int, workers: int) -> float:
    from datamodules.image.coco import load_coco_captions
    from datamodules.image.shards.write import write_shards
    from datamodules.synthetic.shapes import generate_shapes_coco
    from lightning_modules.curation import score

    with tempfile.TemporaryDirectory() as tmp:
        root = generate_shapes_coco(Path(tmp) / "shapes", n_train=pairs, n_val=1, image_size=32)
        images = load_coco_captions(root / "annotations" / "captions_train2017.json", root / "train2017")
        write_shards(images, Path(tmp) / "pool", max_samples_per_shard=1000)
        teacher = teacher_spec or tiny_teacher()
        start = time.perf_counter()
        score(
            [str(Path(tmp) / "pool")],
            Path(tmp) / "scores",
            teacher,
            batch_size=batch_size,
            num_workers=workers,
            accelerator="gpu" if device.startswith("cuda") else "cpu",
            devices=1,
        )
        return pairs / (time.perf_counter() - start)


def _unit_rows(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_search(n: int, dim: int, block: int, device: str, budget: float) -> tuple[float, bool, int]:
    """(seconds, extrapolated, pairs found) of the duplicate search over n embeddings."""
    rng = np.random.default_rng(0)
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    blocks = len(range(0, n, block))
    tiles = blocks * (blocks + 1) // 2
    # tiles cost the same whatever their place: time a few, and run the whole search only if it fits the budget
    a, b = (_on(_unit_rows(rng, min(block, n), dim), torch.device(device), dtype) for _ in range(2))
    (a @ b.T > 0.9).nonzero()  # warm-up
    sync()
    start, timed = time.perf_counter(), 0
    while timed < 3 or (time.perf_counter() - start < budget / 10 and timed < tiles):
        (a @ b.T > 0.9).nonzero()
        timed += 1
    sync()
    tile = (time.perf_counter() - start) / timed
    if tile * tiles > budget:
        return tile * tiles, True, -1
    emb = _unit_rows(rng, n, dim)
    emb[1::1000] = emb[0::1000][: len(emb[1::1000])]  # planted copies: n / 1000 pairs
    start = time.perf_counter()
    found = similar_pairs(emb, 0.9, block, device, dtype)
    sync()
    return time.perf_counter() - start, False, len(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pairs", type=int, default=2000, help="pairs of the scored pool")
    parser.add_argument(
        "--teacher", default=None, help="a teacher setting (default: a tiny random open_clip)"
    )
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=512, help="embedding width (CLIP ViT-B: 512)")
    parser.add_argument("--block", type=int, default=8192)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--budget", type=float, default=60.0, help="seconds a search may take before extrapolating"
    )
    args = parser.parse_args()
    rate = bench_scoring(args.pairs, args.teacher, args.device, args.batch_size, args.workers)
    print(
        f"scoring: {rate:.0f} pairs/s ({args.pairs} pairs, {args.teacher or 'tiny random open_clip'}, {args.device})"
    )
    previous = None
    for n in args.sizes:
        seconds, extrapolated, found = bench_search(n, args.dim, args.block, args.device, args.budget)
        growth = f", x{seconds / previous[1]:.1f} for x{n / previous[0]:.0f} embeddings" if previous else ""
        how = "extrapolated from timed tiles" if extrapolated else f"measured, {found} pairs found"
        print(
            f"duplicate search: {n} x {args.dim} embeddings in {seconds:.1f} s ({how}{growth}) on {args.device}"
        )
        previous = (n, seconds)


if __name__ == "__main__":
    main()
