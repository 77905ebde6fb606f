"""Predictions to disk: one `BasePredictionWriter` for every system.

Each rank appends what its `predict_step` returns to part files under `<output_dir>/rank-<r>/`; at the end
rank 0 merges them, drops the rows the distributed sampler repeated, and writes `metadata.json`. The keys
`predict_step` returns pick the output:

    {"embeddings": {kind: (ids, (N, D))}, "unreadable": [paths]}      -> embeddings.parquet
    {"index", "prediction"}   (GLUE)                                  -> <TASK>.tsv
    {"index", "tags"}         (CoNLL)                                 -> predictions.conll
    {"index", "text", "top_ids", "top_scores", "masks"}   (MLM)       -> fill_mask.jsonl

The files' columns are in `docs/predictions.md`."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import pyarrow as pa
import pyarrow.parquet as pq
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor

log = logging.getLogger(__name__)

METADATA = "metadata.json"
EMBEDDINGS = "embeddings.parquet"
FILL_MASK = "fill_mask.jsonl"
CONLL = "predictions.conll"
# the file names the GLUE server expects in a submission zip
GLUE_FILES = {
    "cola": "CoLA.tsv",
    "sst2": "SST-2.tsv",
    "mrpc": "MRPC.tsv",
    "qqp": "QQP.tsv",
    "qnli": "QNLI.tsv",
    "rte": "RTE.tsv",
    "wnli": "WNLI.tsv",
    "mnli": "MNLI-m.tsv",
}
_PART_FILES = {EMBEDDINGS, "records.jsonl", "unreadable.json"}
_RANK_DIR = re.compile(r"rank-\d+")
_KIND_ORDER = ("image", "caption", "utterance", "transcript")


def embedding_prediction(
    batch: dict[str, Any],
    image: Callable[[Tensor], Tensor] | None = None,
    speech: Callable[[Tensor, Tensor], Tensor] | None = None,
    text: Callable[[Tensor, Tensor], Tensor] | None = None,
    text_kind: str = "caption",
) -> dict[str, Any]:
    """What an alignment system's `predict_step` returns: the batch's images, utterances and texts that the
    system has an encoder for (its L2-normalising `encode_*`), per kind their ids and embeddings, and the inputs
    of the batch that could not be read (listed in the metadata). `text_kind`: caption or transcript."""
    rows: dict[str, tuple[list[str], Tensor]] = {}
    if image is not None and batch.get("image_keys"):
        rows["image"] = (batch["image_keys"], image(batch["images"]))
    if speech is not None and batch.get("audio_keys"):
        rows["utterance"] = (batch["audio_keys"], speech(batch["waveforms"], batch["wave_lengths"]))
    if text is not None and batch.get("text_keys"):
        rows[text_kind] = (batch["text_keys"], text(batch["input_ids"], batch["attention_mask"]))
    return {
        "embeddings": {kind: (list(ids), emb) for kind, (ids, emb) in rows.items()},
        "unreadable": list(batch.get("unreadable", [])),
    }


def _remove_parts(folder: Path) -> None:
    """Delete a rank's part folder, refusing one that holds anything but this writer's part files."""
    if not folder.exists():
        return
    foreign = sorted(p.name for p in folder.iterdir() if p.name not in _PART_FILES)
    if foreign:
        raise FileExistsError(f"{folder} holds files the prediction writer did not write (e.g. {foreign[0]})")
    for part in folder.iterdir():
        part.unlink()
    folder.rmdir()


def _written_by_us(metadata: Path) -> bool:
    try:
        return {"system", "output", "files"} <= set(json.loads(metadata.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return False


def _id_order(value: str) -> tuple[int, int | str]:
    # numeric ids (COCO, line numbers) in numeric order, names (files, LibriSpeech ids) in text order
    return (0, int(value)) if value.isdigit() else (1, value)


class PredictionWriter(BasePredictionWriter):
    """Writes `predict` outputs of any system of this framework to `output_dir` (see the module docstring).

    Use: `python cli.py predict --config <experiment>.yaml --config configs/predict/<kind>.yaml --ckpt_path ...`.
    """

    def __init__(self, output_dir: str = "predictions", keep_parts: bool = False) -> None:
        """
        Args:
            output_dir: folder of the merged files and metadata.json; new, empty, or written by an earlier
                prediction run (whose files are replaced). A folder holding other files is refused.
            keep_parts: keep the per-rank part files (`rank-<r>/`) after merging them.
        """
        super().__init__("batch")
        self.output_dir = Path(output_dir)
        self.keep_parts = keep_parts
        self._parquet: pq.ParquetWriter | None = None
        self._records: Any = None
        self._unreadable: list[str] = []
        self._kind: str | None = None

    # paths ------------------------------------------------------------------------------------
    def _rank_dir(self, rank: int) -> Path:
        return self.output_dir / f"rank-{rank}"

    def _check_output_dir(self) -> None:
        """Refuse a folder holding files this writer did not write: users' files are never replaced."""
        if not self.output_dir.exists():
            return
        if not self.output_dir.is_dir():
            raise FileExistsError(f"prediction output {self.output_dir} is a file, not a folder")
        if _written_by_us(self.output_dir / METADATA):
            return  # an earlier prediction run's folder: its files are ours to replace
        # rank-<r> folders are the parts of an interrupted run of this writer
        present = sorted(p.name for p in self.output_dir.iterdir() if not _RANK_DIR.fullmatch(p.name))
        if present:
            raise FileExistsError(
                f"prediction output folder {self.output_dir} already holds files the prediction writer did not "
                f"write (e.g. {present[0]}): choose a new or empty folder (output_dir of the PredictionWriter)"
            )

    # Lightning hooks --------------------------------------------------------------------------
    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank checks (they see one folder), so a refusal stops all of them instead of leaving the others
        # waiting at the barrier
        self._check_output_dir()
        trainer.strategy.barrier()  # no rank writes parts before every rank has accepted the folder
        rank_dir = self._rank_dir(trainer.global_rank)
        _remove_parts(rank_dir)  # of an earlier, interrupted run
        rank_dir.mkdir(parents=True)
        self._parquet, self._records, self._unreadable, self._kind = None, None, [], None

    def write_on_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if not isinstance(prediction, dict):
            raise TypeError(
                f"{type(pl_module).__name__}.predict_step returned {type(prediction).__name__}; the prediction "
                "writer needs a dict (embeddings, classes, tags or fill-mask: see lightning_modules/training/prediction.py)"
            )
        rank_dir = self._rank_dir(trainer.global_rank)
        if "embeddings" in prediction:
            self._kind = "embeddings"
            self._unreadable += prediction.get("unreadable", [])
            self._write_embeddings(rank_dir, prediction["embeddings"])
            return
        if "prediction" in prediction:
            self._kind = "classes"
            rows = [
                {"index": int(i), "prediction": int(p)}
                for i, p in zip(prediction["index"].tolist(), prediction["prediction"].tolist())
            ]
        elif "tags" in prediction:
            self._kind = "tags"
            rows = [
                {"index": int(i), "tags": t} for i, t in zip(prediction["index"].tolist(), prediction["tags"])
            ]
        elif "top_ids" in prediction:
            self._kind = "fill-mask"
            rows = self._fill_rows(prediction)
        else:
            raise ValueError(
                f"{type(pl_module).__name__}.predict_step returned the keys {sorted(prediction)}, none the "
                "prediction writer knows (embeddings, prediction, tags, top_ids)"
            )
        if self._records is None:
            self._records = (rank_dir / "records.jsonl").open("w", encoding="utf-8")
        self._records.writelines(json.dumps(r) + "\n" for r in rows)

    def _write_embeddings(self, rank_dir: Path, rows: dict[str, tuple[list[str], Tensor]]) -> None:
        for kind, (ids, emb) in rows.items():
            emb = emb.detach().float().cpu()
            flat = pa.array(emb.reshape(-1).numpy(), type=pa.float32())
            table = pa.table(
                {
                    "id": pa.array([str(i) for i in ids], pa.string()),
                    "kind": pa.array([kind] * len(ids), pa.string()),
                    "embedding": pa.FixedSizeListArray.from_arrays(flat, emb.shape[1]),
                }
            )
            if self._parquet is None:
                self._parquet = pq.ParquetWriter(rank_dir / EMBEDDINGS, table.schema)
            self._parquet.write_table(table)

    @staticmethod
    def _fill_rows(prediction: dict[str, Any]) -> list[dict[str, Any]]:
        ids, scores = prediction["top_ids"].tolist(), prediction["top_scores"].tolist()
        rows, at = [], 0
        for index, text, masks in zip(prediction["index"].tolist(), prediction["text"], prediction["masks"]):
            rows.append(
                {
                    "index": int(index),
                    "text": text,
                    "top_ids": ids[at : at + masks],
                    "scores": scores[at : at + masks],
                }
            )
            at += masks
        return rows

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._parquet is not None:
            self._parquet.close()
        if self._records is not None:
            self._records.close()
        rank_dir = self._rank_dir(trainer.global_rank)
        (rank_dir / "unreadable.json").write_text(
            json.dumps({"kind": self._kind, "unreadable": self._unreadable})
        )
        trainer.strategy.barrier()  # every rank's parts are on disk
        if trainer.is_global_zero:
            self._merge(trainer, pl_module)
        trainer.strategy.barrier()  # the merged files exist before any rank returns
        if trainer.is_global_zero and not self.keep_parts:
            for rank in range(trainer.world_size):
                _remove_parts(self._rank_dir(rank))

    # merge (rank 0) ---------------------------------------------------------------------------
    def _merge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        ranks = [self._rank_dir(r) for r in range(trainer.world_size)]
        states = [json.loads((r / "unreadable.json").read_text()) for r in ranks]
        kind = next((s["kind"] for s in states if s["kind"]), None)
        unreadable = sorted({p for s in states for p in s["unreadable"]})
        dm = trainer.datamodule
        files: list[str] = []
        counts: dict[str, int] = {}
        if kind == "embeddings":
            counts = self._merge_embeddings(ranks)
            files.append(EMBEDDINGS)
        elif kind is not None:
            records: dict[int, dict] = {}
            for r in ranks:
                path = r / "records.jsonl"
                if path.is_file():
                    for line in path.read_text(encoding="utf-8").splitlines():
                        row = json.loads(line)
                        records.setdefault(row["index"], row)  # the sampler's padding repeats rows
            ordered = [records[i] for i in sorted(records)]
            counts = {"rows": len(ordered)}
            files.append(self._write_records(kind, ordered, dm))
        if unreadable:
            log.warning(
                "prediction skipped %d unreadable input(s), listed in %s: %s",
                len(unreadable),
                self.output_dir / METADATA,
                ", ".join(unreadable[:3]),
            )
        metadata = {
            "system": type(pl_module).__name__,
            "data": type(dm).__name__ if dm is not None else None,
            "checkpoint": str(trainer.ckpt_path) if trainer.ckpt_path else None,
            "world_size": trainer.world_size,
            "output": kind,
            "files": files,
            "counts": counts,
            "unreadable": unreadable,
            "skipped": len(unreadable),
        }
        (self.output_dir / METADATA).write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")

    def _merge_embeddings(self, ranks: list[Path]) -> dict[str, int]:
        tables = [pq.read_table(r / EMBEDDINGS) for r in ranks if (r / EMBEDDINGS).is_file()]
        if (
            not tables
        ):  # every input was unreadable: an empty file (width unknown), the inputs in the metadata
            schema = pa.schema(
                [("id", pa.string()), ("kind", pa.string()), ("embedding", pa.list_(pa.float32()))]
            )
            pq.write_table(schema.empty_table(), self.output_dir / EMBEDDINGS)
            return {}
        table = pa.concat_tables(tables)
        ids, kinds = table.column("id").to_pylist(), table.column("kind").to_pylist()
        first: dict[tuple[str, str], int] = {}
        for row, key in enumerate(zip(kinds, ids)):
            first.setdefault(key, row)  # the distributed sampler's padding repeats a few inputs
        order = sorted(
            first,
            key=lambda k: (
                _KIND_ORDER.index(k[0]) if k[0] in _KIND_ORDER else len(_KIND_ORDER),
                k[0],
                _id_order(k[1]),
            ),
        )
        table = table.take(pa.array([first[k] for k in order], pa.int64()))
        pq.write_table(table, self.output_dir / EMBEDDINGS)
        counts: dict[str, int] = {}
        for k, _ in order:
            counts[k] = counts.get(k, 0) + 1
        return counts

    def _write_records(self, kind: str, rows: list[dict], dm: Any) -> str:
        if kind == "classes":
            labels = list(getattr(dm, "labels", None) or [])
            task = getattr(getattr(dm, "hparams", {}), "get", lambda *_: None)("task")
            name = GLUE_FILES.get(str(task), "predictions.tsv")
            lines = ["index\tprediction"]
            lines += [f"{r['index']}\t{labels[r['prediction']] if labels else r['prediction']}" for r in rows]
            (self.output_dir / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
            return name
        if kind == "tags":
            source = dm.predict_file()
            sentences = dm.predict_sentences()
            by_line = {}
            for r in rows:
                s = sentences[r["index"]]
                for offset, tag in enumerate(r["tags"]):
                    by_line[s.line + offset] = tag
            out = []
            for n, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
                out.append(f"{line} {by_line[n]}" if n in by_line else line)
            (self.output_dir / CONLL).write_text("\n".join(out) + "\n", encoding="utf-8")
            return CONLL
        tokenizer = dm.tokenizer.tokenizer
        with (self.output_dir / FILL_MASK).open("w", encoding="utf-8") as f:
            for r in rows:
                masks = [
                    [
                        {"token": tokenizer.id_to_token(t), "id": t, "score": round(s, 6)}
                        for t, s in zip(ids, scores)
                    ]
                    for ids, scores in zip(r["top_ids"], r["scores"])
                ]
                f.write(json.dumps({"line": r["index"], "text": r["text"], "masks": masks}) + "\n")
        return FILL_MASK
