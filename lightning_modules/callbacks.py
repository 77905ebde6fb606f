"""Callbacks every task shares."""

from __future__ import annotations

import csv
import logging
import math
from collections import defaultdict
from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, WandbLogger

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
