"""Callbacks every task shares."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from torch import Tensor

from lightning_modules.contrastive_module import ContrastiveModule
from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule

if TYPE_CHECKING:
    from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


def plot_metrics_csv(path: str | Path) -> list[Path]:
    """One PNG per stage (train, val, test, other) beside `metrics.csv`, a panel per metric against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    with path.open(newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if not step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series[key].append((float(step), float(value)))
                except ValueError:
                    continue
    stages: dict[str, list[str]] = defaultdict(list)
    for key in sorted(series):
        stages[key.split("/")[0] if "/" in key else "other"].append(key)
    written = []
    for stage, keys in stages.items():
        cols = min(3, len(keys))
        rows = math.ceil(len(keys) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
        for ax, key in zip(axes.flat, keys):
            steps, values = zip(*series[key])
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3)
            ax.set_title(key)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(keys) :]:
            ax.axis("off")
        fig.tight_layout()
        out = path.parent / f"curves_{stage}.png"
        fig.savefig(out, dpi=100)
        plt.close(fig)
        written.append(out)
    return written


class _LossAtLoggingSteps:
    """Progress-bar mixin: shows the training loss as of the last logging step.

    The systems log `train/loss` without `prog_bar`: Lightning reads every progress-bar metric to the host after
    every batch, which on a GPU waits for the whole step. The bar reads the loss from the callback metrics (still
    on the device) only at logging steps, where the logger reads the metrics anyway, and shows that value until
    the next one."""

    shown_keys = ("train/loss",)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        shown = self.__dict__.setdefault("_shown", {})
        if trainer.training and (not shown or trainer.global_step % trainer.log_every_n_steps == 0):
            for key in self.shown_keys:
                if (value := trainer.callback_metrics.get(key)) is not None:
                    shown[key] = float(value)
        return {**items, **shown}


class LossTQDMProgressBar(_LossAtLoggingSteps, TQDMProgressBar):
    """Lightning's tqdm bar (log files: SLURM, CI) with the loss of the last logging step."""


class LossRichProgressBar(_LossAtLoggingSteps, RichProgressBar):
    """Lightning's Rich bar (terminals) with the loss of the last logging step."""


class MetricCurves(L.Callback):
    """At the end of `fit`, when no W&B logger is configured, save loss and metric curves as PNG files
    beside each CSV logger's `metrics.csv`, so a run can be looked at without a dashboard."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or any(isinstance(lg, WandbLogger) for lg in trainer.loggers):
            return
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                logger.save()
                metrics = Path(logger.log_dir) / "metrics.csv"
                if metrics.is_file():
                    for png in plot_metrics_csv(metrics):
                        log.info("saved %s", png)


# Example tables on W&B ---------------------------------------------------------------------------------------
def join_wordpieces(pieces: list[str]) -> str:
    """WordPiece tokens back to text: `##` pieces join the word before them."""
    words: list[str] = []
    for piece in pieces:
        if piece.startswith("##") and words:
            words[-1] += piece[2:]
        else:
            words.append(piece)
    return " ".join(words)


@torch.no_grad()
def fill_mask_examples(module: MLMPretrainingModule, batch: dict, k: int = 5) -> list[dict]:
    """Per sequence of an MLM batch: its tokens, the positions chosen for prediction, their true ids, and the
    model's top-k ids and probabilities there."""
    mlm_logits, _ = module(batch)
    top_p, top_ids = mlm_logits.float().softmax(-1).topk(k, dim=-1)
    chosen = batch["labels"] != IGNORE_INDEX
    rows, start = [], 0
    for i in range(len(batch["input_ids"])):
        positions = chosen[i].nonzero().flatten()
        end = start + len(positions)  # the head's rows are the chosen positions in row-major order
        rows.append(
            {
                "input_ids": batch["input_ids"][i][batch["attention_mask"][i].bool()].tolist(),
                "positions": positions.tolist(),
                "labels": batch["labels"][i, positions].tolist(),
                "top_ids": top_ids[start:end].tolist(),
                "top_probs": top_p[start:end].tolist(),
            }
        )
        start = end
    return rows


def render_fill_mask(tokenizer: TextTokenizer, row: dict) -> dict:
    """One example as text: the input with chosen positions numbered (`[2]` where the model saw [MASK],
    `[2:word]` where it saw a random or the unchanged token), the top-k per number, and the truth."""
    tok = tokenizer.tokenizer
    number = {p: n for n, p in enumerate(row["positions"], 1)}
    pieces = []
    for j, i in enumerate(row["input_ids"]):
        if j in number:
            pieces.append(
                f"[{number[j]}]" if i == tokenizer.mask_id else f"[{number[j]}:{tok.id_to_token(i)}]"
            )
        elif i not in (tokenizer.cls_id, tokenizer.pad_id):
            pieces.append(tok.id_to_token(i))
    predictions, truth, correct = [], [], 0
    for n, (label, ids, probs) in enumerate(zip(row["labels"], row["top_ids"], row["top_probs"]), 1):
        guesses = ", ".join(f"{tok.id_to_token(i)} {p:.0%}" for i, p in zip(ids, probs))
        predictions.append(f"[{n}] {guesses}")
        truth.append(f"[{n}] {tok.id_to_token(label)}")
        correct += ids[0] == label
    n = len(row["labels"])
    return {
        "input": join_wordpieces(pieces),
        "predictions": "\n".join(predictions),
        "truth": " ".join(truth),
        "top1_acc": correct / n if n else float("nan"),
    }


@torch.no_grad()
def retrieval_examples(module: ContrastiveModule, batch: dict, k: int = 5) -> dict[str, Tensor]:
    """Each `a` item of an evaluation batch (image, utterance) against every `b` item of the same batch
    (caption, transcript): cosine similarities, the top-k `b` rows and whether each is a right one."""
    e = module.embed(batch, "val")
    sim = F.normalize(e.a.float(), dim=-1) @ F.normalize(e.b.float(), dim=-1).T
    scores, indices = sim.topk(min(k, sim.shape[1]), dim=-1)
    right = e.b_groups[indices] == e.a_groups[:, None]
    # the first b row of the same group: the item's own caption / transcript
    truth = (e.b_groups[None, :] == e.a_groups[:, None]).float().argmax(1)
    return {"similarity": sim, "scores": scores, "indices": indices, "right": right, "truth": truth}


def batch_texts(batch: dict, tokenizer: TextTokenizer | None) -> list[str]:
    """The text of each `b` row: raw transcripts when the batch carries them, else the decoded token ids."""
    if "transcripts" in batch and len(batch["transcripts"]) == len(batch["input_ids"]):
        return list(batch["transcripts"])
    if tokenizer is None:
        return [""] * len(batch["input_ids"])
    return [
        tokenizer.decode(ids[mask.bool()].tolist())
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"])
    ]


def to_picture(image: Tensor, mean: tuple | None = None, std: tuple | None = None) -> np.ndarray:
    """(3, H, W) pixels -> (H, W, 3) uint8: a batch's uint8 pixels as they are; normalised float pixels with the
    normalisation undone when known, else stretched to the full range."""
    if image.dtype == torch.uint8:
        return image.detach().cpu().permute(1, 2, 0).numpy()
    image = image.detach().float().cpu()
    if mean is not None and std is not None:
        image = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    else:
        image = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-8)
    return (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _to_cpu(value):
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _is_empty(batch: dict) -> bool:
    return any(key in batch and len(batch[key]) == 0 for key in ("input_ids", "images", "waveforms"))


class WandbExamples(L.Callback):
    """Every `every_n_val_epochs` validation runs, log example tables to each W&B logger (nothing without one).

    * MLM (`val/examples/fill_mask`): the sequences of the first validation batch, with the model's top-k tokens
      at each position chosen for prediction, and the truth;
    * image-text / speech-text (`val/examples/i2t`, `val/examples/a2t`): each image (or utterance) of the first
      validation batch with its top-k captions (transcripts) among those of the batch, the right ones marked.

    The examples are the batches the validation loop already serves, so no extra loader or worker starts. The
    extra forward pass runs on every rank for the same batches (FSDP and DeepSpeed shard parameters: a forward
    on one rank alone would wait for the others forever); only global rank 0 keeps the results and builds and
    logs the tables, code in which no collective operation happens.
    """

    def __init__(
        self, every_n_val_epochs: int = 1, num_examples: int = 8, top_k: int = 5, num_batches: int = 1
    ) -> None:
        """
        Args:
            every_n_val_epochs: log at every n-th validation run (sanity checks not counted).
            num_examples: rows per table.
            top_k: predictions / retrieved texts per row.
            num_batches: validation batches looked at (each one a separate retrieval gallery).
        """
        super().__init__()
        self.every_n_val_epochs = every_n_val_epochs
        self.num_examples = num_examples
        self.top_k = top_k
        self.num_batches = num_batches
        self._val_runs = 0
        self._due = False
        self._collected: list[tuple[dict, object]] = []

    @staticmethod
    def _wandb_loggers(trainer: L.Trainer) -> list[WandbLogger]:
        return [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the same decision on every rank: loggers, sanity checking and the run count are the same everywhere
        self._collected = []
        self._due = False
        if trainer.sanity_checking or not self._wandb_loggers(trainer):
            return
        if not isinstance(pl_module, MLMPretrainingModule | ContrastiveModule):
            return
        self._val_runs += 1
        self._due = self._val_runs % self.every_n_val_epochs == 0

    def on_validation_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs,
        batch: dict,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self._due or dataloader_idx != 0 or batch_idx >= self.num_batches or _is_empty(batch):
            return
        with trainer.precision_plugin.val_step_context():
            if isinstance(pl_module, MLMPretrainingModule):
                result = fill_mask_examples(pl_module, batch, self.top_k)
            else:
                result = retrieval_examples(pl_module, batch, self.top_k)
        if trainer.is_global_zero:  # kept on the CPU until the tables are built at the end of the run
            self._collected.append((_to_cpu(batch), _to_cpu(result)))

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        collected, self._collected = self._collected, []
        if not (self._due and trainer.is_global_zero and collected):
            return
        import wandb  # only here: runs without W&B never import it

        dm = trainer.datamodule
        tokenizer = getattr(dm, "tokenizer", None)
        if isinstance(pl_module, MLMPretrainingModule):
            if tokenizer is None:
                return
            key = "val/examples/fill_mask"
            rows = [render_fill_mask(tokenizer, r) for _, result in collected for r in result]
            rows = rows[: self.num_examples]
            columns = ["input", f"top-{self.top_k}", "truth", "top1_acc"]
            table = wandb.Table(columns=columns, data=[list(r.values()) for r in rows])
        else:
            key = f"val/examples/{pl_module.prefixes[0]}"
            table = self._retrieval_table(wandb, collected, pl_module, dm, tokenizer)
        for logger in self._wandb_loggers(trainer):
            logger.log_metrics({key: table}, step=trainer.global_step)

    def _retrieval_table(self, wandb, collected, pl_module, dm, tokenizer):
        hp = getattr(dm, "hparams", {})
        mean = getattr(dm, "mean", None) or hp.get("mean")
        std = getattr(dm, "std", None) or hp.get("std")
        rate = int(
            getattr(dm, "sample_rate", None)
            or hp.get("sample_rate")
            or getattr(pl_module.hparams, "sample_rate", 16000)
        )
        media_column = "image" if "images" in collected[0][0] else "audio"
        data = []
        for batch, r in collected:
            texts = batch_texts(batch, tokenizer)
            for i in range(len(r["indices"])):
                if len(data) == self.num_examples:
                    break
                if media_column == "image":
                    media = wandb.Image(to_picture(batch["images"][i], mean, std))
                else:
                    wave = batch["waveforms"][i, : int(batch["wave_lengths"][i])].float().cpu().numpy()
                    media = wandb.Audio(wave, sample_rate=rate)
                retrieved = "\n".join(
                    f"{'✓' if ok else '✗'} {score:.2f} {texts[j]}"
                    for j, score, ok in zip(
                        r["indices"][i].tolist(), r["scores"][i].tolist(), r["right"][i].tolist()
                    )
                )
                hits = r["right"][i].tolist()
                data.append([media, texts[int(r["truth"][i])], retrieved, bool(hits[0]), any(hits)])
        columns = [media_column, "truth", f"top-{self.top_k} in batch", "hit@1", f"hit@{self.top_k}"]
        return wandb.Table(columns=columns, data=data)
