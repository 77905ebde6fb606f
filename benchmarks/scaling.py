"""Data-parallel scaling on CPU: MLM training tokens/s with 1 process and with 2 DDP processes (gloo).

Both runs use Lightning's own DDP path (`strategy="ddp_spawn"`) with the same per-process batch, so 2 processes
handle twice the tokens per step; efficiency = tokens/s(2) / (2 x tokens/s(1)). The two settings alternate
(1, 2, 1, 2, ...) and each measures only the steps after its warm-up, so a noisy machine hurts both alike.
Each process gets `--threads` intra-op threads: with 2 cores, 1 thread each keeps the processes off each other.

    python benchmarks/scaling.py                       # mini BERT, seq 128, 16 sequences per process
    python benchmarks/scaling.py --size small --batch 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule  # noqa: E402


class RandomMLM(Dataset):
    """Random token sequences, 15% of positions to predict: the model's cost without a corpus."""

    def __init__(self, n: int, length: int, vocab: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(5, vocab, (n, length), generator=g)
        self.chosen = torch.rand(n, length, generator=g) < 0.15

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        length = self.ids.shape[1]
        return {
            "input_ids": self.ids[i],
            "attention_mask": torch.ones(length, dtype=torch.long),
            "token_type_ids": (torch.arange(length) >= length // 2).long(),
            "labels": torch.where(self.chosen[i], self.ids[i], IGNORE_INDEX),
            "nsp_labels": torch.tensor(i % 2),
        }


class StepTimer(L.Callback):
    """Wall time of every step after the warm-up, written by rank 0 to a JSON file (spawned processes return
    nothing to the parent)."""

    def __init__(self, warmup: int, out: str) -> None:
        self.warmup, self.out = warmup, out
        self.start: float | None = None
        self.tokens = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.perf_counter()
            self.tokens = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.start is not None:
            self.tokens += int(batch["attention_mask"].sum()) * trainer.world_size

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.start is not None:
            seconds = time.perf_counter() - self.start
            Path(self.out).write_text(json.dumps({"tokens": self.tokens, "seconds": seconds}))


def run(processes: int, args: argparse.Namespace) -> float:
    """Tokens per second of one training run with `processes` DDP processes."""
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "timing.json")
        model = MLMPretrainingModule(
            vocab_size=args.vocab,
            max_position_embeddings=args.seq,
            encoder={"size": args.size},
            optimizer={"warmup_steps": 0},
        )
        data = RandomMLM(args.batch * processes * (args.steps + args.warmup + 1), args.seq, args.vocab)
        loader = torch.utils.data.DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True)
        trainer = L.Trainer(
            accelerator="cpu",
            devices=processes,
            strategy="ddp_spawn" if processes > 1 else "auto",
            max_steps=args.warmup + args.steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[StepTimer(args.warmup, out)],
            default_root_dir=tmp,
        )
        trainer.fit(model, loader)
        timing = json.loads(Path(out).read_text())
    return timing["tokens"] / timing["seconds"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", default="mini", help="BERT preset")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16, help="sequences per process per step")
    p.add_argument("--vocab", type=int, default=30522)
    p.add_argument("--steps", type=int, default=20, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2, help="alternating rounds of (1 process, 2 processes)")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    results: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for n in (1, 2):
            results[n].append(run(n, args))
            print(f"{n} process(es): {results[n][-1]:,.0f} tokens/s", flush=True)
    one, two = statistics.median(results[1]), statistics.median(results[2])
    print(f"tokens/s  1 process: {one:,.0f}   2 processes (DDP, gloo): {two:,.0f}")
    print(f"speed-up: {two / one:.2f}x  scaling efficiency: {two / (2 * one):.2f}")
    print(f"ratio: {two / one:.2f}")


if __name__ == "__main__":
    main()
