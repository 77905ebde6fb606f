"""Results that describe themselves: `EvaluationReport` writes `results.json` at the end of `test` (and
`validate`) with the metrics and the protocol that produced them, and prints one summary line per task.

The protocol: dataset, split, file fingerprints and counts (images, captions, classes, utterances) from the
DataModule; the model's source and its sha256, prompt templates and the image tower's normalisation from the
model; image size, resize mode and centre crop; the trainer's precision and process count. Where open_clip's
tables publish a figure for the same checkpoint and protocol (`PUBLISHED`), it is printed beside ours with the
difference.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch

from datamodules.image.classification_sets import file_sha256
from datamodules.sections import flat_hparams
from lightning_modules.zero_shot import path_sha256

log = logging.getLogger(__name__)

# Zero-shot top-1 and retrieval recall published by open_clip for common checkpoints (name/pretrained tag), from
# its docs/openclip_classification_results.csv (ImageNet 1k, CIFAR-10, CIFAR-100) and
# docs/openclip_retrieval_results.csv (Flickr30k 1k and MSCOCO 5k Karpathy test sets: "image retr." is text to
# image, our t2i; "text retr." is image to text, our i2t), evaluated with CLIP_benchmark.
PUBLISHED: dict[str, dict[str, float]] = {
    "ViT-B-32/openai": {
        "imagenet/zero_shot_acc": 0.6332,
        "cifar10/zero_shot_acc": 0.8983,
        "cifar100/zero_shot_acc": 0.6423,
        "flickr30k/t2i_R@1": 0.5878,
        "flickr30k/t2i_R@5": 0.8356,
        "flickr30k/t2i_R@10": 0.9002,
        "flickr30k/i2t_R@1": 0.7890,
        "flickr30k/i2t_R@5": 0.9490,
        "flickr30k/i2t_R@10": 0.9820,
        "coco/t2i_R@1": 0.3044,
        "coco/t2i_R@5": 0.5594,
        "coco/t2i_R@10": 0.6687,
        "coco/i2t_R@1": 0.5012,
        "coco/i2t_R@5": 0.7500,
        "coco/i2t_R@10": 0.8352,
    },
    "ViT-B-16/openai": {
        "imagenet/zero_shot_acc": 0.6834,
        "cifar10/zero_shot_acc": 0.9077,
        "cifar100/zero_shot_acc": 0.6695,
        "flickr30k/t2i_R@1": 0.6216,
        "flickr30k/i2t_R@1": 0.8220,
        "coco/t2i_R@1": 0.3309,
        "coco/i2t_R@1": 0.5242,
    },
    "ViT-L-14/openai": {
        "imagenet/zero_shot_acc": 0.7554,
        "cifar10/zero_shot_acc": 0.9559,
        "cifar100/zero_shot_acc": 0.7582,
        "flickr30k/t2i_R@1": 0.6496,
        "flickr30k/i2t_R@1": 0.8520,
        "coco/t2i_R@1": 0.3651,
        "coco/i2t_R@1": 0.5634,
    },
    "ViT-B-32/laion2b_s34b_b79k": {
        "imagenet/zero_shot_acc": 0.6656,
        "cifar10/zero_shot_acc": 0.9358,
        "cifar100/zero_shot_acc": 0.7555,
        "flickr30k/t2i_R@1": 0.6678,
        "flickr30k/i2t_R@1": 0.8410,
        "coco/t2i_R@1": 0.3934,
        "coco/i2t_R@1": 0.5632,
    },
    "ViT-B-16/laion2b_s34b_b88k": {
        "imagenet/zero_shot_acc": 0.7023,
        "cifar10/zero_shot_acc": 0.9494,
        "cifar100/zero_shot_acc": 0.7684,
        "flickr30k/t2i_R@1": 0.6984,
        "flickr30k/i2t_R@1": 0.8630,
        "coco/t2i_R@1": 0.4231,
        "coco/i2t_R@1": 0.5944,
    },
}


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def caption_set_protocol(dm: Any, role: str = "test") -> dict[str, Any]:
    """Set, split, counts and file fingerprints of an image-caption DataModule (`CocoCaptionsDataModule`): every
    image of the split and every caption of each."""
    records = dm.records(role) if hasattr(dm, "records") else []
    karpathy = getattr(dm, "karpathy_json", None)
    out: dict[str, Any] = {
        "dataset": Path(karpathy).stem.removeprefix("dataset_") if karpathy else "coco",
        "split": f"karpathy {role}" if karpathy else dm._split_name(role),
        "root": str(getattr(dm, "root", "")),
        "images_listed": len(records),
        "images_missing": int(getattr(dm, "missing_images", {}).get(role, 0)),
        "captions_listed": sum(len(r.captions) for r in records),
    }
    if karpathy:
        out["files_sha256"] = {Path(karpathy).name: file_sha256(karpathy)}
    return out


def speech_set_protocol(dm: Any, role: str = "test") -> dict[str, Any]:
    """Subsets and counts of a LibriSpeech-style DataModule's split."""
    dataset = getattr(dm, "datasets", {}).get(role)
    utterances = getattr(dataset, "utterances", None) or []
    return {
        "dataset": "librispeech",
        "split": role,
        "subsets": list(getattr(dm, "subsets", {}).get(role, [])),
        "root": str(getattr(dm, "root", "")),
        "utterances": len(utterances),
        "transcripts": len({u.transcript for u in utterances}),
        "problems": getattr(dm, "problems", {}).get(role, {}),
    }


def data_protocol(dm: Any, role: str) -> dict[str, Any]:
    if dm is None:
        return {}
    if hasattr(dm, "protocol"):
        return dm.protocol(role)
    if hasattr(dm, "records"):
        return caption_set_protocol(dm, role)
    if hasattr(dm, "subsets"):
        return speech_set_protocol(dm, role)
    return {"dataset": type(dm).__name__}


def model_protocol(trainer: L.Trainer, module: L.LightningModule) -> dict[str, Any]:
    """The model's own description (`protocol()`, the zero-shot classifier's), else what a system's hyperparameters
    and the evaluated checkpoint say."""
    if hasattr(module, "protocol"):
        return module.protocol()
    hparams = dict(module.hparams)
    out: dict[str, Any] = {"system": type(module).__name__}
    ckpt = trainer.ckpt_path
    init = hparams.get("init_clip") or {}
    if ckpt:
        out["model"] = {"kind": "checkpoint", "path": str(ckpt)}
        if Path(str(ckpt)).is_file():
            out["model"]["sha256"] = file_sha256(ckpt)
    elif init and init.get("source", "scratch") != "scratch":
        out["model"] = {k: init.get(k) for k in ("source", "name", "path")}
        if init.get("path") and Path(init["path"]).exists():
            out["model"]["sha256"] = path_sha256(init["path"])
    else:
        out["model"] = {
            "kind": "as configured (towers' own starts)",
            "sections": _plain({k: hparams.get(k) for k in ("image", "speech", "text") if k in hparams}),
        }
    tower = getattr(getattr(module, "pair", None), "image", None)
    if tower is not None and hasattr(tower, "pixel_mean"):
        out["normalisation"] = {
            "mean": [round(float(v), 8) for v in tower.pixel_mean.flatten()],
            "std": [round(float(v), 8) for v in tower.pixel_std.flatten()],
        }
    return out


def preprocessing(dm: Any) -> dict[str, Any]:
    data = flat_hparams(getattr(dm, "hparams", {}) or {})
    if "image_size" not in data:
        return {}
    return {
        "image_size": data["image_size"],
        "resize": data.get("resize", "tensor"),
        "resize_to": "shorter side"
        if data.get("resize", "tensor") != "torchvision"
        else "shorter side x 256/224",
        "crop": "centre",
    }


def published_task(protocol: dict[str, Any]) -> str | None:
    """The key of `PUBLISHED`'s tables for a data protocol: imagenet, cifar10, cifar100, coco, flickr30k."""
    name = str(protocol.get("dataset", ""))
    if name in ("imagenet", "cifar10", "cifar100"):
        return name
    if name.startswith("coco") and protocol.get("split") == "karpathy test":
        return "coco"
    if name.startswith("flickr30k") and protocol.get("split") == "karpathy test":
        return "flickr30k"
    return None


class EvaluationReport(L.Callback):
    """Writes `results.json` (metrics and protocol) where the run logs, and prints a summary line per task."""

    def __init__(self, published_as: str | None = None, filename: str = "results.json") -> None:
        """
        Args:
            published_as: the published checkpoint this model is, as open_clip names it ("ViT-B-32/openai"): its
                published figures for the same task are printed beside ours. None: none are compared.
            filename: the results file, written in the trainer's log_dir (default_root_dir without a logger).
        """
        if published_as is not None and published_as not in PUBLISHED:
            raise ValueError(
                f"published_as {published_as!r}: no published figures; known: {', '.join(sorted(PUBLISHED))}"
            )
        self.published_as = published_as
        self.filename = filename
        self.results: dict[str, Any] = {}

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")

    def _report(self, trainer: L.Trainer, module: L.LightningModule, stage: str) -> None:
        metrics = {
            k: _plain(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{stage}/")
        }
        data = data_protocol(trainer.datamodule, stage)
        for what, n in (getattr(module, "counted", None) or {}).items():
            data[f"{what}_counted"] = n  # scored, each once, over every process
        results = {
            "metrics": metrics,
            "protocol": {
                "data": data,
                "preprocessing": preprocessing(trainer.datamodule),
                **model_protocol(trainer, module),
                "precision": str(trainer.precision),
                "processes": trainer.world_size,
            },
        }
        task = published_task(data)
        if self.published_as and task:
            table = PUBLISHED[self.published_as]
            results["published"] = {
                "checkpoint": self.published_as,
                "source": "open_clip docs/openclip_classification_results.csv, openclip_retrieval_results.csv",
                "figures": {
                    key: {
                        "published": table[f"{task}/{key.split('/', 1)[1]}"],
                        "ours": metrics[key],
                        "difference": metrics[key] - table[f"{task}/{key.split('/', 1)[1]}"],
                    }
                    for key in metrics
                    if f"{task}/{key.split('/', 1)[1]}" in table
                },
            }
        self.results = results
        # every process asks: under DDP `log_dir` is a broadcast from rank 0, which the others must join
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / self.filename
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
            print(summary_line(results), flush=True)
            log.info("wrote %s", path)


def summary_line(results: dict[str, Any]) -> str:
    """One line: the task and its headline numbers, with the published ones and the difference where known."""
    data = results["protocol"]["data"]
    task = f"{data.get('dataset', '?')} {data.get('split', '')}".strip()
    compared = results.get("published", {}).get("figures", {})
    parts = []
    for key, value in results["metrics"].items():
        name = key.split("/", 1)[1]
        if (
            "/" in name
            or not isinstance(value, float)
            or name.endswith(("skipped_items", "empty_batches", "loss"))
        ):
            continue
        text = f"{name} {100 * value:.2f}"
        if key in compared:
            c = compared[key]
            text += f" (published {100 * c['published']:.2f}, {100 * c['difference']:+.2f})"
        parts.append(text)
    return f"{task}: " + ", ".join(parts)
