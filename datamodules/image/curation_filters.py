"""Filters over a scored pool (`python cli.py curate filter`), and what they write: the scores of `curate score`
(lightning_modules/curation.py) go through a CLIP-score filter, near-duplicate clustering and a test-set leakage
check (`apply_filters`), and the kept samples are written as a sample list, a manifest and a report
(`write_outputs`)."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from datamodules.image.curation_data import MANIFEST_SUFFIXES
from datamodules.image.near_duplicates import clusters, nearest_in, similar_pairs

log = logging.getLogger(__name__)

FLAGS = ("unreadable", "eval_duplicate", "duplicate", "low_score")
EXAMPLES = 5  # examples per filter in report.md


def load_scores(scores: str | os.PathLike) -> pa.Table:
    """Every stored unit of a scoring run (`<scores>/parts/*.parquet`) in one table, in unit-name order."""
    parts = sorted((Path(scores) / "parts").glob("*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{scores}/parts holds no scores: run `curate score --out {scores}` first")
    return pa.concat_tables(pq.read_table(p) for p in parts)


def embedding_matrix(column: pa.ChunkedArray) -> np.ndarray:
    """(N, D) float16 array of a column of equal-length embedding lists without nulls."""
    flat = pc.list_flatten(column).to_numpy()
    return flat.reshape(len(column), -1) if len(column) else np.zeros((0, 0), dtype=np.float16)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def apply_filters(
    table: pa.Table,
    min_score: float | None = None,
    top_fraction: float | None = None,
    dup_threshold: float | None = 0.95,
    leak_threshold: float | None = 0.95,
    centre: bool = False,
    device: str = "cpu",
    block: int = 8192,
) -> dict[str, Any]:
    """Per pool sample of `table` (scores of `curate score`): its flags, cluster id, nearest evaluation image and
    whether it is kept. A None setting turns its filter off. Returns columns as lists and numpy arrays.

    The scores (one Parquet part per unit) go through three filters, each of which flags the pool samples it drops:

        low_score       image-text cosine below `min_score`, or outside the best `top_fraction` of the readable pool
                        (DataComp's CLIP-score filter)
        duplicate       the image is a near-duplicate of another pool image (image-embedding cosine above
                        `dup_threshold`, joined transitively into clusters): one per cluster is kept, the best scored
        eval_duplicate  the image is a near-duplicate of an evaluation image (cosine above `leak_threshold`): test-set
                        leakage
        unreadable      the sample could not be scored (no image, no caption, an undecodable image)

    `centre`: compare images by the cosine of their embeddings less the pool's mean embedding, which removes the
    direction all of them share: it dominates the cosines of a teacher that has not learnt images like the
    pool's (a randomly initialised one puts every image above 0.99)."""
    pool = table.filter(pc.equal(table["kind"], "pool"))
    evals = table.filter(pc.and_(pc.equal(table["kind"], "eval"), pc.is_valid(table["embedding"])))
    n = pool.num_rows
    flags: list[list[str]] = [[] for _ in range(n)]
    readable = np.asarray(pool["error"].is_null().to_numpy(zero_copy_only=False), dtype=bool)
    cosine = np.asarray(pool["cosine"].to_numpy(zero_copy_only=False), dtype=np.float32)
    idx = np.flatnonzero(readable)
    emb = embedding_matrix(pool["embedding"].take(pa.array(idx, type=pa.int64())))
    eval_emb = embedding_matrix(evals["embedding"])
    if centre and len(idx):
        mean = emb.astype(np.float32).mean(0)
        emb, eval_emb = (
            _unit(e.astype(np.float32) - mean) for e in (emb, eval_emb.reshape(-1, emb.shape[1]))
        )
    for i in np.flatnonzero(~readable):
        flags[i].append("unreadable")

    leak_cos = np.full(n, np.nan, dtype=np.float32)
    leak_key: list[str | None] = [None] * n
    if leak_threshold is not None and evals.num_rows and len(idx):
        best, where = nearest_in(emb, eval_emb, block, device)
        eval_names = [f"{s}/{k}" for s, k in zip(evals["source"].to_pylist(), evals["key"].to_pylist())]
        for k, i in enumerate(idx):
            leak_cos[i], leak_key[i] = best[k], eval_names[where[k]]
            if best[k] > leak_threshold:
                flags[i].append("eval_duplicate")

    low = np.zeros(n, dtype=bool)
    if min_score is not None:
        low[idx] |= cosine[idx] < min_score
    if top_fraction is not None and len(idx):
        keep_n = int(round(top_fraction * len(idx)))
        order = idx[np.argsort(-cosine[idx], kind="stable")]
        low[order[keep_n:]] = True

    cluster = np.arange(n, dtype=np.int64)
    if dup_threshold is not None and len(idx):
        local = clusters(len(idx), similar_pairs(emb, dup_threshold, block, device))
        cluster[idx] = idx[local]
        # one per cluster: the best scored (the first by position on ties)
        best_of: dict[int, int] = {}
        for i in idx[np.argsort(-cosine[idx], kind="stable")]:
            best_of.setdefault(int(cluster[i]), int(i))
        for i in idx:
            if best_of[int(cluster[i])] != i:
                flags[i].append("duplicate")
    for i in np.flatnonzero(low):
        flags[i].append("low_score")
    kept = np.array([not f for f in flags], dtype=bool)
    return {
        "pool": pool,
        "flags": flags,
        "cluster": cluster,
        "leak_cosine": leak_cos,
        "leak_match": leak_key,
        "kept": kept,
        "cosine": cosine,
    }


def write_outputs(result: dict[str, Any], out: str | os.PathLike, settings: dict[str, Any]) -> dict[str, Any]:
    """scores.parquet, kept.parquet, kept.csv, report.json, histogram.png and report.md under `out`; returns the
    report.

    `scores.parquet` (per pool sample: key, source shard or manifest, index, caption, cosine, cluster id, nearest
    evaluation image and its cosine, flags, kept), `kept.parquet` (the sample list of the kept shard samples, which
    `data.shards.urls` reads directly), `kept.csv` (the kept manifest rows: path,caption), `report.json` (counts per
    filter and the settings), `histogram.png` (the cosine histogram of kept and dropped samples) and `report.md`
    (the counts and a few kept and dropped examples of each filter).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pool, kept, flags = result["pool"], result["kept"], result["flags"]
    scores = pa.table(
        {
            "key": pool["key"],
            "source": pool["source"],
            "index": pool["index"],
            "caption": pool["caption"],
            "cosine": pool["cosine"],
            "cluster": pa.array(result["cluster"]),
            "eval_match": pa.array(result["leak_match"], type=pa.string()),
            "eval_cosine": pa.array(result["leak_cosine"]),
            "flags": pa.array(flags, type=pa.list_(pa.string())),
            "kept": pa.array(kept),
            "error": pool["error"],
        }
    )
    pq.write_table(scores, out / "scores.parquet")
    kept_rows = scores.filter(pa.array(kept))
    from_manifest = np.array(
        [s.endswith(MANIFEST_SUFFIXES) for s in kept_rows["source"].to_pylist()], dtype=bool
    )
    shard_rows = kept_rows.filter(pa.array(~from_manifest))
    pq.write_table(
        pa.table({"shard": shard_rows["source"], "index": shard_rows["index"], "key": shard_rows["key"]}),
        out / "kept.parquet",
    )
    with open(out / "kept.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        for row in kept_rows.filter(pa.array(from_manifest)).to_pylist():
            writer.writerow([row["key"], row["caption"]])
    counts = {flag: sum(flag in f for f in flags) for flag in FLAGS}
    report = {
        "pool": pool.num_rows,
        "kept": int(kept.sum()),
        "dropped_by": counts,  # a sample may be dropped by several filters
        "settings": settings,
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _histogram(result["cosine"], kept, settings, out / "histogram.png")
    _markdown(scores, report, out / "report.md")
    return report


def _histogram(cosine: np.ndarray, kept: np.ndarray, settings: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display
    import matplotlib.pyplot as plt

    finite = np.isfinite(cosine)
    bins = np.linspace(float(cosine[finite].min(initial=-1)), float(cosine[finite].max(initial=1)), 41)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.hist(
        [cosine[finite & kept], cosine[finite & ~kept]], bins=bins, stacked=True, label=["kept", "dropped"]
    )
    if settings.get("min_score") is not None:
        ax.axvline(settings["min_score"], color="k", linestyle="--", label="min_score")
    ax.set_xlabel("image-text cosine (teacher)")
    ax.set_ylabel("samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(scores: pa.Table, report: dict[str, Any], path: Path) -> None:
    lines = [
        f"# Curation: {report['kept']} of {report['pool']} pool samples kept",
        "",
        "| filter | dropped |",
        "| --- | --- |",
    ]
    lines += [f"| {flag} | {n} |" for flag, n in report["dropped_by"].items()]
    rows = scores.to_pylist()
    for title, chosen in [("kept", [r for r in rows if r["kept"]])] + [
        (f"dropped: {flag}", [r for r in rows if flag in r["flags"]]) for flag in FLAGS
    ]:
        if not chosen:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            "| key | source | cosine | caption | note |",
            "| --- | --- | --- | --- | --- |",
        ]
        for r in chosen[:EXAMPLES]:
            note = r["error"] or (
                f"like {r['eval_match']} ({r['eval_cosine']:.3f})"
                if "eval_duplicate" in r["flags"]
                else f"cluster {r['cluster']}"
            )
            caption = (r["caption"] or "").replace("|", "/")[:80]
            lines.append(
                f"| {r['key']} | {os.path.basename(r['source'])} | {r['cosine']:.3f} | {caption} | {note} |"
            )
    path.write_text("\n".join(lines) + "\n")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--scores", required=True, help="the --out folder of `curate score`")
    parser.add_argument("--out", required=True, help="folder for scores.parquet, kept.parquet, the report")
    parser.add_argument("--min-score", type=float, default=None, help="drop pairs whose cosine is below this")
    parser.add_argument(
        "--top-fraction", type=float, default=None, help="keep this best-scored fraction (0-1)"
    )
    parser.add_argument(
        "--dup-threshold", type=float, default=0.95, help="image cosine of pool near-duplicates; -1: off"
    )
    parser.add_argument(
        "--leak-threshold", type=float, default=0.95, help="image cosine to an evaluation image; -1: off"
    )
    parser.add_argument(
        "--centre",
        action="store_true",
        help="compare images less the pool's mean embedding (see apply_filters)",
    )
    parser.add_argument("--device", default="cpu", help="device of the duplicate search (cuda for millions)")
    parser.add_argument(
        "--block", type=int, default=8192, help="embeddings per block of the duplicate search"
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """`curate filter`: filter the scores of `args.scores` and write the outputs to `args.out`."""
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        raise ValueError(f"--top-fraction {args.top_fraction}: a fraction in (0, 1]")
    settings = {
        "min_score": args.min_score,
        "top_fraction": args.top_fraction,
        "dup_threshold": None if args.dup_threshold < 0 else args.dup_threshold,
        "leak_threshold": None if args.leak_threshold < 0 else args.leak_threshold,
    }
    settings["centre"] = args.centre
    result = apply_filters(load_scores(args.scores), **settings, device=args.device, block=args.block)
    report = write_outputs(result, args.out, settings)
    print(
        f"kept {report['kept']} of {report['pool']}; dropped by {report['dropped_by']}; outputs in {args.out}"
    )
    return report
