"""Speech-text (or audio-caption) alignment on your own audio-text data: per split a source (a NeMo manifest, a
Clotho or AudioCaps caption CSV, a LibriSpeech subset; readers in manifests.py), batches bucketed by duration
under a padded-seconds budget (`DurationBucketBatchSampler`, as for LibriSpeech), a WordPiece tokenizer trained on
the training captions or loaded.

Clips with several captions (Clotho's five, AudioCaps' test clips): training draws one caption per clip each
epoch; validation and test score every caption, each clip once against all captions of the split, as COCO's
five captions per image are scored (`val/a2t_R@K`: a clip is right when any of its captions ranks in its top K;
`val/t2a_R@K`: each caption retrieves its clip).

Distributed training: the batch sampler shards batches over ranks itself; run with
`Trainer(use_distributed_sampler=False)` (the speech configs set it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from lightning import LightningDataModule
from torch.utils.data import DataLoader

from datamodules.loading import SPLIT_STAGE, ResumableBatchDataLoader, stage_splits
from datamodules.mixture import MixtureSampler
from datamodules.sections import LoaderConfig, TokenizerConfig
from datamodules.speech.audio_text_data import AudioTextCollator, AudioTextDataset
from datamodules.speech.librispeech_datamodule import DurationBucketBatchSampler
from datamodules.speech.manifests import PROBLEMS, AudioClip, AudioTextSource, read_source
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

Split = Literal["train", "val", "test"]


@dataclass
class AudioConfig:
    """How clips are decoded and batched."""

    sample_rate: int = 16000
    """Clips are resampled to this rate (Hz) and downmixed to mono."""
    max_duration: float = 30.0
    """Clips longer than this (seconds) are left out, with a warning that counts them."""
    max_batch_seconds: float = 300.0
    """Padded audio seconds per batch (clips in the batch x the longest); the evaluation batches' budget too."""
    num_buckets: int = 10
    """Duration buckets: more mean less padding but less mixing of lengths within a batch."""

    def __post_init__(self) -> None:
        if self.max_duration > self.max_batch_seconds:
            raise ValueError(
                f"max_duration ({self.max_duration} s) exceeds max_batch_seconds ({self.max_batch_seconds} s): "
                "the longest clips would not fit in a batch"
            )


@dataclass
class MixtureConfig:
    """Several training sources, each drawn by its weight (datamodules/mixture.py), bucketed by duration."""

    sources: list[AudioTextSource] = field(default_factory=list)
    """The training sources with their weights, instead of `data.train`; empty: `data.train` alone, every clip
    once per epoch."""
    num_samples: int | None = None
    """Clips drawn per epoch over all devices; None: the sum of each source's size times its weight."""
    replacement: bool = False
    """Draw with replacement (each draw independent) or without (every clip of a source before any repeats)."""


@dataclass
class PredictInputs:
    """What `predict` embeds: a split's clips and captions, a folder of audio files, a file of texts."""

    split: Split | None = None
    """Embed this split's clips and all their captions (keys: the clip's key, `<key>#<n>` for its captions)."""
    audio: str | None = None
    """A folder of audio files (keys: paths relative to it, without the suffix)."""
    texts: str | None = None
    """A UTF-8 file of texts, one a line (keys: `<file name>:<line>`)."""


def _section(cls: type, value: object) -> object:
    """A section as its dataclass: checkpoints store them as plain dicts."""
    if value is None or isinstance(value, cls):
        return value
    if cls is MixtureConfig:
        value = {**value, "sources": [_section(AudioTextSource, s) for s in value.get("sources", [])]}
    return cls(**value)


class MixtureBucketBatchSampler(DurationBucketBatchSampler):
    """`DurationBucketBatchSampler` over each epoch's draw of a `MixtureSampler` (one global draw, the same on
    every rank): the drawn clips are sorted by duration into `num_buckets` equal-count buckets, each with its
    batch size under `max_batch_seconds`, and the batches are shuffled and sharded over ranks as the base class
    does. A draw packs into a slightly different number of batches each epoch; the count is fixed at the first
    epoch's, so `len()` is exact: a later epoch that packs into more batches leaves out its last few (random
    ones, the order being shuffled), one that packs into fewer repeats its first few."""

    def __init__(
        self,
        durations: Sequence[float],
        mixture: MixtureSampler,
        max_batch_seconds: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        super().__init__(durations, max_batch_seconds, num_buckets, shuffle, seed, num_replicas, rank)
        self.durations = np.asarray(durations, dtype=np.float64)
        self.mixture = mixture
        self.num_buckets = num_buckets
        self.num_batches = len(self.draw_batches(0))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.mixture.set_epoch(epoch)

    def draw_batches(self, epoch: int) -> list[list[int]]:
        """The batches of `epoch`'s draw, before sharding over ranks."""
        drawn = np.asarray(self.mixture.epoch_indices(epoch)[: self.mixture.total], dtype=np.int64)
        drawn = drawn[np.argsort(self.durations[drawn], kind="stable")]
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for bucket in np.array_split(drawn, min(self.num_buckets, len(drawn))):
            size = max(1, int(self.max_batch_seconds // max(self.durations[bucket].max(), 1e-9)))
            idx = rng.permutation(bucket) if self.shuffle else bucket
            batches += [idx[i : i + size].tolist() for i in range(0, len(idx), size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def epoch_batches(self) -> list[list[int]]:
        return self.draw_batches(self.epoch)


# the defaults of the sections, never changed in place
_AUDIO, _MIXTURE, _PREDICT = AudioConfig(), MixtureConfig(), PredictInputs()
_LOADER, _TOKENIZER = LoaderConfig(), TokenizerConfig()


class AudioTextDataModule(LightningDataModule):
    """(audio, text) pairs from manifests, caption CSVs or LibriSpeech subsets as padded waveform + token batches
    for `SpeechTextModule`; the batch is `AudioTextCollator`'s (datamodules/speech/manifests.py).

    Needs `Trainer(use_distributed_sampler=False)` under DDP: the batch sampler shards by rank itself.
    """

    def __init__(
        self,
        train: AudioTextSource | None = None,
        val: AudioTextSource | None = None,
        test: AudioTextSource | None = None,
        root: str | None = None,
        audio: AudioConfig = _AUDIO,
        mixture: MixtureConfig = _MIXTURE,
        predict: PredictInputs = _PREDICT,
        loader: LoaderConfig = _LOADER,
        tokenizer: TokenizerConfig = _TOKENIZER,
        context_length: int = 64,
    ) -> None:
        """
        Args:
            train: the training source (format, path, fields); None for a machine that only evaluates, or when
                `mixture.sources` lists several.
            val: the validation source.
            test: the test source; None tests on `val`.
            root: the folder relative source paths start from, so one setting moves a whole data set.
            audio: sample rate, longest clip, padded seconds per batch, duration buckets.
            mixture: several training sources with their weights, drawn anew each epoch.
            predict: what `predict` embeds.
            loader: workers and seed (`batch_size` is not used: batches hold `audio.max_batch_seconds`).
            tokenizer: a vocab.txt / tokenizer.json / checkpoint, or a WordPiece vocabulary trained on the
                training captions once and cached in `tokenizer.cache_dir` (with LibriSpeech's audio index).
            context_length: maximum tokens per caption, including [CLS] and [SEP].
        """
        super().__init__()
        self.mixture: MixtureConfig = _section(MixtureConfig, mixture)
        if self.mixture.sources and train is not None:
            raise ValueError(
                "data.mixture.sources lists the training sources with their weights: leave data.train unset"
            )
        self.sources: dict[str, AudioTextSource | None] = {
            "train": _section(AudioTextSource, train) or (self.mixture.sources or [None])[0],
            "val": _section(AudioTextSource, val),
            "test": _section(AudioTextSource, test or val),
        }
        self.root = root
        self.audio: AudioConfig = _section(AudioConfig, audio)
        self.predict_inputs: PredictInputs = _section(PredictInputs, predict)
        self.loader: LoaderConfig = _section(LoaderConfig, loader)
        self.tokenizer_config: TokenizerConfig = _section(TokenizerConfig, tokenizer)
        self.context_length = context_length
        self.save_hyperparameters()
        sections = {
            "train": self.sources["train"] if train is not None else None,
            "val": self.sources["val"],
            "test": _section(AudioTextSource, test),
            "audio": self.audio,
            "mixture": self.mixture,
            "predict": self.predict_inputs,
            "loader": self.loader,
            "tokenizer": self.tokenizer_config,
        }
        for key, section in sections.items():  # plain values: a checkpoint loads with weights_only
            self.hparams[key] = None if section is None else asdict(section)
        self.datasets: dict[str, AudioTextDataset] = {}
        self.problems: dict[str, dict[str, int]] = {}  # split -> kind of left-out row -> count
        self._clips: dict[str, list[list[AudioClip]]] = {}  # split -> clips of each of its sources

    @property
    def sample_rate(self) -> int:
        return self.audio.sample_rate

    def split_sources(self, split: str) -> list[AudioTextSource]:
        if split == "train" and self.mixture.sources:
            return list(self.mixture.sources)
        source = self.sources[split]
        if source is None:
            raise ValueError(f"no {split} source: set data.{split}.path (and data.{split}.format)")
        return [source]

    def clips(self, split: str) -> list[list[AudioClip]]:
        """The clips of each source of `split`, read once; left-out rows are counted and warned about."""
        if split not in self._clips:
            per_source, counts = [], {}
            for source in self.split_sources(split):
                clips, problems = read_source(source, self.root, self.tokenizer_config.cache_dir)
                kept = self._within_max_duration(split, source, clips)
                if len(kept) < len(clips):  # warned about with the setting to change
                    counts["too_long"] = counts.get("too_long", 0) + len(clips) - len(kept)
                clips = kept
                for kind, items in problems.items():
                    counts[kind] = counts.get(kind, 0) + len(items)
                    log.warning(
                        "%s: left out %d %s of %s, e.g. %s",
                        split,
                        len(items),
                        PROBLEMS.get(kind, kind),
                        source.path,
                        "; ".join(items[:3]),
                    )
                if not clips:
                    raise ValueError(f"{split} source {source.path} ({source.format}) yields no usable clip")
                per_source.append(clips)
            self._clips[split] = per_source
            self.problems[split] = counts
        return self._clips[split]

    def _within_max_duration(
        self, split: str, source: AudioTextSource, clips: list[AudioClip]
    ) -> list[AudioClip]:
        limit = self.audio.max_duration
        kept = [c for c in clips if c.duration <= limit]
        if len(kept) < len(clips):
            longest = max(c.duration for c in clips)
            log.warning(
                "%s: max_duration=%s s leaves out %d of %d clips of %s, the longest %.1f s; to keep them raise "
                "data.audio.max_duration to %d and data.audio.max_batch_seconds to at least as much",
                split,
                limit,
                len(clips) - len(kept),
                len(clips),
                source.path,
                longest,
                math.ceil(longest),
            )
        return kept

    # tokenizer -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> TextTokenizer:
        """Loaded, or trained on the training captions (keyed by them) on first use, so `vocab_size` is known
        before `setup`."""
        return self.tokenizer_config.build(self._training_captions)

    def _training_captions(self) -> list[str]:
        if self.sources["train"] is None:
            raise ValueError(
                "no training source to train the vocabulary on: give data.tokenizer.path, or a checkpoint "
                "with --ckpt_path (validate, test and predict then use the checkpoint's tokenizer)"
            )
        return [c for clips in self.clips("train") for clip in clips for c in clip.captions]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    # Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        _ = self.tokenizer  # rank 0 trains and caches it; the other ranks load the cached copy

    def setup(self, stage: str | None = None) -> None:
        for split in stage_splits(stage):
            # a split without a source is left out: fit without `val` trains without validation
            if split not in self.datasets and self.sources[split] is not None:
                self.datasets[split] = self._build_split(split)

    def _build_split(self, split: str, train: bool | None = None) -> AudioTextDataset:
        clips = [clip for source in self.clips(split) for clip in source]
        dataset = AudioTextDataset(
            clips,
            self.audio.sample_rate,
            self.tokenizer_config.lowercase,
            train=split == "train" if train is None else train,
            seed=self.loader.seed,
        )
        log.info(
            "%s: %d clips, %d captions, %.2f h",
            split,
            len(dataset),
            dataset.num_captions,
            sum(dataset.durations) / 3600,
        )
        return dataset

    def batch_sampler(self, split: str, shuffle: bool) -> DurationBucketBatchSampler:
        """Duration buckets over the split's clips, or for a training mixture over each epoch's draw."""
        dataset = self.datasets[split]
        buckets = dict(num_buckets=self.audio.num_buckets, shuffle=shuffle, seed=self.loader.seed)
        if split != "train" or not self.mixture.sources:
            return DurationBucketBatchSampler(dataset.durations, self.audio.max_batch_seconds, **buckets)
        sources = self.mixture.sources
        draw = MixtureSampler(
            [len(clips) for clips in self.clips("train")],
            [s.weight for s in sources],
            num_samples=self.mixture.num_samples,
            replacement=self.mixture.replacement,
            seed=self.loader.seed,
            num_replicas=1,  # the global draw: its batches are sharded over ranks as the buckets' are
            rank=0,
        )
        log.info(
            "training mixture of %d clips an epoch, expected shares: %s",
            draw.total,
            ", ".join(f"{s.path} {p:.1%} (weight {s.weight:g})" for s, p in zip(sources, draw.probabilities)),
        )
        return MixtureBucketBatchSampler(dataset.durations, draw, self.audio.max_batch_seconds, **buckets)

    def dataloader(self, split: str, shuffle: bool = False) -> DataLoader:
        """The loader of `split` ("train", "val" or "test")."""
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        dataset = self.datasets[split]
        sampler = self.batch_sampler(split, shuffle)
        workers = self.loader.num_workers
        # the training loader's position is checkpointed, so a run killed mid-epoch resumes at the next batch;
        # it also tells the dataset its epoch, which draws the captions
        loader_cls = ResumableBatchDataLoader if split == "train" else DataLoader
        return loader_cls(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=AudioTextCollator(self.tokenizer, self.context_length, all_captions=split != "train"),
            pin_memory=self.loader.pin,
            persistent_workers=split == "train" and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self.dataloader("val") if self.sources["val"] is not None else []

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per input given (see `datamodules/predict_data.py` for the batches)."""
        from datamodules.predict_data import ClipItems, PredictCollate, audio_text_predict_loaders

        inputs = self.predict_inputs
        return audio_text_predict_loaders(
            ClipItems(self._build_split(inputs.split, train=False)) if inputs.split else None,
            inputs.audio,
            inputs.texts,
            sample_rate=self.audio.sample_rate,
            collate=lambda: PredictCollate(self.tokenizer, self.context_length, text_kind="caption"),
            batch_size=self.loader.eval_size,
            num_workers=self.loader.num_workers,
            pin_memory=self.loader.pin,
            nothing="nothing to predict: set --data.predict.split (train, val or test: clips and captions), "
            "--data.predict.audio (a folder of audio files) and/or --data.predict.texts (one text a line)",
        )
