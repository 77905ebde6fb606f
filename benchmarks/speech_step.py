"""Speech-text throughput on CPU: seconds of audio trained per second of wall time, and how fast one
DataLoader worker decodes and featurises audio.

Training: the quickstart model and a base-size one (12 x 768 speech Transformer, BERT-base text tower), AdamW
steps on tone-corpus batches after a warm-up step. One worker: `LibriSpeechDataset.__getitem__` plus log-mel
features, one thread, on the tone corpus and the real LibriSpeech sample when present. `ratio: X` = the slower
corpus's real-time factor / 50 (the target per worker), so X >= 1 meets it.

    python benchmarks/speech_step.py [--steps 3] [--base-steps 2] [--threads 1]"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datamodules.speech.librispeech import LibriSpeechDataset, SpeechTextCollator, index_subset  # noqa: E402
from datamodules.speech.librispeech_datamodule import DurationBucketBatchSampler, LibriSpeechDataModule  # noqa: E402
from datamodules.synthetic.tones import generate_tone_librispeech  # noqa: E402
from lightning_modules.components.speech_tower import LogMel, SpeechTowerConfig  # noqa: E402
from lightning_modules.speech_text_module import SpeechTextModule  # noqa: E402
from lightning_modules.training.optim import param_groups  # noqa: E402

REAL = ROOT.parent / "shared" / "data" / "real" / "librispeech"
TARGET_RTF = 50.0


def quickstart_model(vocab_size: int) -> SpeechTextModule:
    cfg = yaml.safe_load((ROOT / "configs" / "speech" / "quickstart.yaml").read_text())
    return SpeechTextModule(vocab_size=vocab_size, **cfg["model"]["init_args"])


def batches(dm: LibriSpeechDataModule, max_seconds: float, count: int) -> list[dict]:
    """The first `count` shuffled training batches of at most `max_seconds` padded audio."""
    dataset = dm.datasets["train"]
    sampler = DurationBucketBatchSampler(dataset.durations, max_seconds, num_buckets=4, shuffle=True)
    collate = SpeechTextCollator(dm.tokenizer, dm.hparams.context_length)
    return [collate([dataset[i] for i in idx]) for idx in sampler.epoch_batches()[:count]]


def train_rate(model: SpeechTextModule, data: list[dict], sample_rate: int) -> tuple[float, float]:
    """Audio seconds per wall second over `data[1:]` (data[0] warms up); also the median step time."""
    model.train()
    opt = torch.optim.AdamW(param_groups(model, 0.01, ("log_scale",)), lr=1e-4)
    times, audio = [], 0.0
    for i, batch in enumerate(data):
        start = time.perf_counter()
        loss = model.pair.loss(model.embed(batch, "train"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - start)
            audio += batch["wave_lengths"].sum().item() / sample_rate
    return audio / sum(times), statistics.median(times)


def worker_rtf(dataset: LibriSpeechDataset, repeats: int) -> tuple[float, float]:
    """Real-time factor of decode + log-mel for one process with one thread; also the audio hours read."""
    feats = LogMel(SpeechTowerConfig(sample_rate=dataset.sample_rate))
    audio, start = 0.0, time.perf_counter()
    with torch.no_grad():
        for _ in range(repeats):
            for i in range(len(dataset)):
                wave = dataset[i]["waveform"]
                feats(wave[None], torch.tensor([wave.numel()]))
                audio += wave.numel() / dataset.sample_rate
    return audio / (time.perf_counter() - start), audio / 3600


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=3, help="timed quickstart steps (after one warm-up step)")
    p.add_argument("--base-steps", type=int, default=2, help="timed base-size steps (0 skips the base model)")
    p.add_argument(
        "--threads", type=int, default=1, help="intra-op threads (more only pay off on idle cores)"
    )
    a = p.parse_args()
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        generate_tone_librispeech(tmp, n_train_utts=120, n_val_utts=8)
        dm = LibriSpeechDataModule(
            tmp,
            test_subsets=["dev-clean"],
            context_length=32,
            batching={"max_duration": 10.0},
            loader={"num_workers": 0},
            tokenizer={"vocab_size": 200, "cache_dir": str(Path(tmp) / "cache")},
        )
        dm.setup("fit")

        torch.set_num_threads(a.threads)
        print(f"training on CPU, {a.threads} threads, fp32, audio seconds trained per wall second:")
        model = quickstart_model(dm.vocab_size)
        rate, step = train_rate(model, batches(dm, 80.0, a.steps + 1), dm.hparams.sample_rate)
        print(
            f"  quickstart ({sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, 80 s batches): "
            f"{rate:6.1f} s/s  ({step:.2f} s/step)"
        )
        if a.base_steps:
            model = SpeechTextModule(vocab_size=dm.vocab_size)  # the defaults are base size
            rate, step = train_rate(model, batches(dm, 20.0, a.base_steps + 1), dm.hparams.sample_rate)
            print(
                f"  base       ({sum(p.numel() for p in model.parameters()) / 1e6:.0f} M params, 20 s batches): "
                f"{rate:6.1f} s/s  ({step:.2f} s/step)"
            )

        torch.set_num_threads(1)  # what a DataLoader worker gets
        corpora = {"tone corpus": dm.datasets["train"]}
        real = sorted(REAL.glob("LibriSpeech/*/")) if REAL.is_dir() else []
        if real:
            utts = [u for subset in real for u in index_subset(subset)[0]]
            corpora["real LibriSpeech sample"] = LibriSpeechDataset(utts)
        print("one DataLoader worker (1 thread), FLAC decode + 80-bin log-mel, real-time factor:")
        rtfs = []
        for name, dataset in corpora.items():
            rtf, hours = worker_rtf(dataset, repeats=1 if len(dataset) > 50 else 20)
            rtfs.append(rtf)
            print(f"  {name:<24} {rtf:7.0f}x real time over {hours * 60:.1f} min of audio")
    print(f"ratio: {min(rtfs) / TARGET_RTF:.2f}")


if __name__ == "__main__":
    main()
