"""Scoring a web pool for curation: every image-text pair embedded by a teacher, scores written per unit.

`python cli.py curate score` embeds each sample of a pool (datamodules/image/curation_data.py) and of
evaluation image folders with a teacher (a checkpoint of this framework, an open_clip model or a Hugging Face
CLIP folder). It runs as a Lightning prediction, so each rank embeds its share of the units under any
strategy. Each whole unit's rows go to `<out>/parts/<unit>.parquet`, written under a temporary name and
renamed, so a run started again with the same `--out` skips the units already there. `python cli.py curate
filter` (datamodules/image/curation_filters.py) reads them; see `docs/curation.md`."""

from __future__ import annotations

import argparse
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.nn.functional as F
from lightning.pytorch.callbacks import BasePredictionWriter
from torch import Tensor, nn

from datamodules.image import curation_filters
from datamodules.image.clip_tokenizer import ClipTokenizer
from datamodules.image.coco import eval_transform
from datamodules.image.curation_data import CurationCollate, CurationDataModule, Unit, pool_units
from datamodules.sections import LoaderConfig
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.clip_import import load_clip
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import image_text_from_checkpoint

log = logging.getLogger(__name__)

PARTS = "parts"
RUN_FILE = "run.json"


class Teacher(nn.Module):
    """An image tower and a text tower in one joint space, with the tokenizer and preprocessing they expect."""

    def __init__(
        self,
        image: nn.Module,
        text: nn.Module,
        tokenizer: Any,
        image_size: int,
        resize: str = "tensor",
        context_length: int = 77,
        source: str = "",
    ) -> None:
        super().__init__()
        self.image, self.text, self.tokenizer = image, text, tokenizer
        self.image_size, self.resize, self.context_length, self.source = (
            image_size,
            resize,
            context_length,
            source,
        )

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Unit image and caption embeddings of a batch of uint8 images and their tokenized captions."""
        return F.normalize(self.image(images), dim=-1), F.normalize(
            self.text(input_ids, attention_mask), dim=-1
        )


def load_teacher(spec: str) -> Teacher:
    """The teacher a setting names: a checkpoint of this framework's image-text system (`runs/x/last.ckpt`),
    `open_clip:NAME:CHECKPOINT` (`open_clip:ViT-B-32:/weights/vit_b32.pt`) or `hf:FOLDER` (a CLIPModel folder)."""
    if spec.startswith(("open_clip:", "hf:")):
        source, _, rest = spec.partition(":")
        name, path = rest.split(":", 1) if source == "open_clip" and ":" in rest else (None, rest)
        if source == "open_clip" and name is None:
            raise ValueError(
                f"--teacher {spec}: write open_clip:NAME:CHECKPOINT (open_clip:ViT-B-32:/w/b32.pt)"
            )
        parts = load_clip(TowerInit(source=source, path=path, name=name))
        image = ImageTower(ImageTowerConfig(image_size=parts.image_size), None, backbone=parts.image)
        tokenizer = ClipTokenizer(f"open_clip:{name}" if source == "open_clip" else path)
        resize = parts.image.reference_resize
        return Teacher(image, parts.text, tokenizer, parts.image_size, resize, parts.context_length, spec)
    if not os.path.isfile(spec):
        raise FileNotFoundError(
            f"--teacher {spec}: no such checkpoint (or use open_clip:NAME:CHECKPOINT, hf:DIR)"
        )
    pair, ckpt = image_text_from_checkpoint(spec, "curate")
    data = ckpt.get("datamodule_hyper_parameters") or {}
    saved = str(data.get("tokenizer") or "")
    tokenizer = (
        ClipTokenizer(saved) if saved.startswith("open_clip:") else TextTokenizer.from_checkpoint(spec)
    )
    image_size = pair.image.cfg.image_size
    resize = pair.image.reference_resize or data.get("resize", "tensor")
    context = int(data.get("context_length", 64))
    return Teacher(pair.image, pair.text, tokenizer, image_size, resize, context, spec)


class CurationScorer(L.LightningModule):
    """Embeds a batch's images and captions with the teacher; returns per row the cosine and the image embedding."""

    def __init__(self, teacher: Teacher) -> None:
        super().__init__()
        self.teacher = teacher.eval()

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        cosine = image = None
        if len(batch["rows"]):
            image, text = self.teacher(batch["images"], batch["input_ids"], batch["attention_mask"])
            cosine = (image * text).sum(-1).float().cpu()
            image = image.float().cpu()
        return {
            "rows": batch["rows"],
            "bad": batch["bad"],
            "ends": batch["ends"],
            "cosine": cosine,
            "image": image,
        }


_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),  # pool or eval
        ("source", pa.string()),  # the shard, manifest or evaluation folder
        ("index", pa.int64()),  # position in the shard or manifest
        ("caption", pa.string()),
        ("cosine", pa.float32()),  # image-text cosine; NaN for evaluation images and unreadable samples
        ("error", pa.string()),  # why a sample was not scored; null when it was
        ("embedding", pa.list_(pa.float16())),  # the unit image embedding; null when unreadable
    ]
)


class ScoreWriter(BasePredictionWriter):
    """Keeps each unit's rows until its end mark, then writes them to `<out>/parts/<unit>.parquet` (atomically)."""

    def __init__(self, out: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.parts = Path(out) / PARTS
        self._open: dict[str, list[dict[str, Any]]] = {}

    def write_on_batch_end(
        self,
        trainer,
        pl_module,
        prediction: dict,
        batch_indices,
        batch,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        rows = prediction["rows"]
        if rows:
            cosine, image = prediction["cosine"].numpy(), prediction["image"].numpy().astype(np.float16)
            for k, row in enumerate(rows):
                self._open.setdefault(row["unit"], []).append(
                    {
                        **row,
                        "cosine": float(cosine[k]) if row["kind"] == "pool" else float("nan"),
                        "embedding": image[k],
                    }
                )
        for row in prediction["bad"]:
            self._open.setdefault(row["unit"], []).append({**row, "cosine": float("nan"), "embedding": None})
        for unit, count in prediction["ends"]:
            self._store(unit, self._open.pop(unit, []), count)

    def _store(self, unit: str, rows: list[dict[str, Any]], count: int) -> None:
        if len(rows) != count:  # the end mark follows its unit's rows in one worker's order
            raise RuntimeError(f"unit {unit}: {len(rows)} rows scored of its {count}")
        rows.sort(key=lambda r: r["index"])
        columns = {name: [r.get(name) for r in rows] for name in _SCHEMA.names if name != "embedding"}
        vectors = [r["embedding"] for r in rows]
        width = next((len(v) for v in vectors if v is not None), 0)
        flat = np.concatenate([v for v in vectors if v is not None] or [np.zeros(0, np.float16)])
        lengths = np.array([0 if v is None else width for v in vectors], dtype=np.int32)
        offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
        missing = pa.array([v is None for v in vectors])
        columns["embedding"] = pa.ListArray.from_arrays(offsets, pa.array(flat), mask=missing)
        table = pa.Table.from_pydict(columns, schema=_SCHEMA)
        self.parts.mkdir(parents=True, exist_ok=True)
        tmp = self.parts / f".{unit}.parquet.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.parts / f"{unit}.parquet")

    def on_predict_end(self, trainer, pl_module) -> None:
        if self._open:  # a unit whose end mark never came (cut short): not stored, scored again on resume
            log.warning("%d units left unstored: %s", len(self._open), ", ".join(sorted(self._open)))


def stored(out: str | os.PathLike) -> set[str]:
    """Names of the units whose scores are stored under `out`."""
    return {p.name[: -len(".parquet")] for p in (Path(out) / PARTS).glob("*.parquet")}


class _Done:
    """Whether a unit is stored (picklable, for DataLoader workers)."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def __call__(self, unit: Unit) -> bool:
        return (self.out / PARTS / f"{unit.name}.parquet").is_file()


def score(
    pool: Sequence[str],
    out: str | os.PathLike,
    teacher: Teacher | str,
    eval_folders: Sequence[str] = (),
    batch_size: int = 256,
    num_workers: int = 4,
    caption_key: str = "txt",
    trainer: L.Trainer | None = None,
    **trainer_kwargs: Any,
) -> Path:
    """Score every unit of `pool` and `eval_folders` not yet stored under `out` (see the module docstring); returns
    `out`. `trainer_kwargs` (accelerator, devices, strategy, precision) build the Trainer when none is given."""
    out = Path(out)
    units = pool_units(pool, eval_folders)
    teacher = load_teacher(teacher) if isinstance(teacher, str) else teacher
    run = {"pool": list(pool), "eval": list(eval_folders), "teacher": teacher.source, "units": len(units)}
    recorded = out / RUN_FILE
    if recorded.is_file():
        before = json.loads(recorded.read_text())
        if before != run:
            raise ValueError(f"{out} holds the scores of another run ({before}): give another --out")
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{RUN_FILE}.{os.getpid()}"  # every rank writes the same record
        tmp.write_text(json.dumps(run, indent=1))
        os.replace(tmp, recorded)
    left = len(units) - sum(_Done(out)(u) for u in units)
    log.info("%d of %d units to score (%d stored)", left, len(units), len(units) - left)
    collate = CurationCollate(teacher.tokenizer, teacher.context_length, teacher.image_size)
    transform = eval_transform(teacher.image_size, teacher.resize)
    dm = CurationDataModule(
        units,
        transform,
        collate,
        _Done(out),
        LoaderConfig(batch_size=batch_size, num_workers=num_workers),
        caption_key,
    )
    writer = ScoreWriter(out)
    if trainer is None:
        trainer_kwargs.setdefault("logger", False)
        trainer_kwargs.setdefault("enable_progress_bar", False)
        trainer = L.Trainer(callbacks=[writer], **trainer_kwargs)
    else:
        trainer.callbacks.append(writer)
    trainer.predict(CurationScorer(teacher), datamodule=dm, return_predictions=False)
    return out


# command line ---------------------------------------------------------------------------------------------------
def curate_parser(prog: str = "python cli.py") -> argparse.ArgumentParser:
    """The parser of `curate score ...` and `curate filter ...`."""

    parser = argparse.ArgumentParser(prog=f"{prog} curate", description="Curate an image-text pool.")
    sub = parser.add_subparsers(dest="step", required=True)
    s = sub.add_parser("score", help="embed every pair with a teacher; scores per unit to OUT/parts/")
    s.add_argument(
        "--pool",
        action="append",
        required=True,
        help="shards (brace pattern, glob, folder) or a CSV/JSONL manifest; repeatable",
    )
    s.add_argument(
        "--eval-images",
        action="append",
        default=[],
        help="a folder of evaluation images (test split, ImageFolder); repeatable",
    )
    s.add_argument(
        "--teacher", required=True, help="a .ckpt of this framework, open_clip:NAME:CHECKPOINT or hf:DIR"
    )
    s.add_argument("--out", required=True, help="folder of the scores; a run started again with it resumes")
    s.add_argument("--batch-size", type=int, default=256)
    s.add_argument("--workers", type=int, default=4, help="DataLoader workers per device")
    s.add_argument("--caption-key", default="txt", help="where a shard sample's caption is (txt, json:FIELD)")
    s.add_argument("--accelerator", default="auto")
    s.add_argument("--devices", default="auto")
    s.add_argument("--strategy", default="auto")
    s.add_argument("--precision", default="32-true")
    f = sub.add_parser("filter", help="filter scored pairs; write scores.parquet, kept.parquet and a report")
    curation_filters.add_arguments(f)
    return parser


def curate(argv: list[str], prog: str = "python cli.py") -> Any:
    """`curate score ...` and `curate filter ...`: see `--help` of each."""

    args = curate_parser(prog).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.step == "filter":
        return curation_filters.run(args)
    devices = int(args.devices) if str(args.devices).isdigit() else args.devices
    return score(
        args.pool,
        args.out,
        args.teacher,
        args.eval_images,
        args.batch_size,
        args.workers,
        args.caption_key,
        accelerator=args.accelerator,
        devices=devices,
        strategy=args.strategy,
        precision=args.precision,
    )
