"""LibriSpeech for speech-text contrastive alignment: an index of (FLAC, transcript) pairs, batches
bucketed by duration under a padded-seconds budget, and a collate that pads audio and tokenizes text.

Tree: `LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`, and per chapter a
`<speaker>-<chapter>.trans.txt` with lines `<utt-id> TRANSCRIPT`.

Distributed training: `DurationBucketBatchSampler` shards batches over ranks itself, so Lightning must
not wrap it. Run with `Trainer(use_distributed_sampler=False)`; the speech configs set
`trainer.use_distributed_sampler: false`. (With the flag left on, Lightning refuses the sampler on
more than one device with a TypeError that says the same.)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch.distributed as dist
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from datamodules.loading import SPLIT_STAGE, ResumableBatchDataLoader, stage_splits, take_skip
from datamodules.predict_data import PredictCollate, UtteranceItems, audio_text_predict_loaders
from datamodules.sections import LoaderConfig, TokenizerConfig, as_section, plain_sections
from datamodules.speech.librispeech import (
    LibriSpeechDataset,
    Speaker,
    SpeechTextCollator,
    Utterance,
    index_subset,
    parse_speakers,
    subset_transcripts,
)
from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

NO_TRAINING_DATA = (
    "The vocabulary is trained on the training transcripts: to evaluate without them, pass --ckpt_path "
    "(validate, test and predict use the checkpoint's tokenizer) or --data.tokenizer.path"
)


class DurationBucketBatchSampler(Sampler[list[int]]):
    """Batches of similar-length utterances whose padded size, `len(batch) * max duration`, stays within
    `max_batch_seconds`: padded seconds, not summed seconds, is what the encoder pays for.

    Utterances are sorted by duration and split into `num_buckets` equal-count buckets; each bucket gets
    a fixed batch size, `floor(max_batch_seconds / longest in bucket)` (at least 1, so a single utterance
    longer than the budget still forms a batch). With `shuffle`, each epoch reshuffles utterances within
    their bucket (new batch compositions) and the order of all batches, from `(seed, epoch)`: reproducible,
    and the same on every rank. The batch count never changes between epochs, so `len()` is exact.

    Resuming: `skip` batches of the next pass are left out when `skip_epoch` is None or the current epoch
    (`ResumableBatchDataLoader` sets both from a checkpoint), so a resumed run continues with the next unseen
    batch; the batches themselves, being drawn from `(seed, epoch)`, are the same as in the unbroken run.

    Distributed: rank `r` of `num_replicas` takes batches `r, r + R, ...`. When the count does not divide
    evenly, the first batches are repeated to fill the last round, so every rank runs the same number of
    steps (DDP would hang otherwise); those few utterances are seen twice that epoch. `utt_keys` in the
    batch let evaluation drop the repeats. On one rank every utterance appears exactly once per epoch.
    """

    def __init__(
        self,
        durations: Sequence[float],
        max_batch_seconds: float,
        num_buckets: int = 10,
        shuffle: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
    ) -> None:
        if max_batch_seconds <= 0:
            raise ValueError(f"max_batch_seconds must be positive, got {max_batch_seconds}")
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be at least 1, got {num_buckets}")
        distributed = dist.is_available() and dist.is_initialized()
        self.num_replicas = (
            num_replicas if num_replicas is not None else (dist.get_world_size() if distributed else 1)
        )
        self.rank = rank if rank is not None else (dist.get_rank() if distributed else 0)
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {self.rank} is outside [0, {self.num_replicas})")
        self.max_batch_seconds = max_batch_seconds
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.skip = 0  # batches of this rank to leave out of the next pass
        self.skip_epoch: int | None = None
        dur = np.asarray(durations, dtype=np.float64)
        order = np.argsort(dur, kind="stable")
        self.buckets = [b for b in np.array_split(order, min(num_buckets, max(len(order), 1))) if len(b)]
        self.batch_sizes = [max(1, int(max_batch_seconds // max(dur[b].max(), 1e-9))) for b in self.buckets]
        self.num_batches = sum(math.ceil(len(b) / bs) for b, bs in zip(self.buckets, self.batch_sizes))
        # Lightning calls set_epoch on `dataloader.batch_sampler.sampler`, not on the batch sampler itself.
        self.sampler = self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def epoch_batches(self) -> list[list[int]]:
        """All batches of the current epoch, before sharding over ranks."""
        rng = np.random.default_rng([self.seed, self.epoch])
        batches: list[list[int]] = []
        for bucket, size in zip(self.buckets, self.batch_sizes):
            idx = rng.permutation(bucket) if self.shuffle else bucket
            batches += [idx[i : i + size].tolist() for i in range(0, len(idx), size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __len__(self) -> int:
        return math.ceil(self.num_batches / self.num_replicas)

    def __iter__(self) -> Iterator[list[int]]:
        # a generator, so the skip is taken when the first batch is asked for: a DataLoader with workers calls
        # `iter()` on its batch sampler twice when it starts a pass and uses only the second iterator
        skip = take_skip(self)
        batches = self.epoch_batches()
        if not batches:
            return
        total = len(self) * self.num_replicas
        padded = [batches[i % len(batches)] for i in range(total)]
        yield from padded[self.rank :: self.num_replicas][skip:]


# -- the DataModule -------------------------------------------------------------------------------


@dataclass
class DurationBatching:
    """Batches by audio duration (`DurationBucketBatchSampler`): their size is set in padded seconds."""

    max_duration: float = 20.0
    """Utterances longer than this (seconds) are dropped and counted."""
    max_batch_seconds: float = 200.0
    """Padded audio seconds per batch (batch size x longest utterance)."""
    num_buckets: int = 10
    """Duration buckets; more buckets mean less padding but less mixing."""


@dataclass
class SpeechPredict:
    """What `predict` embeds into the joint space; one loader per input given (datamodules/predict_data.py)."""

    subsets: list[str] = field(default_factory=list)
    """LibriSpeech subsets whose utterances and transcripts are embedded."""
    audio: str | None = None
    """A folder of audio files to embed."""
    texts: str | None = None
    """A UTF-8 file of transcripts to embed, one per line."""
    batch_size: int = 16
    """Items per predict batch (training and evaluation batches are sized by `batching`)."""


# defaults of the sections (each DataModule works on copies of its own)
_BATCHING = DurationBatching()
_LOADER = LoaderConfig()
_TOKENIZER = TokenizerConfig(cache_dir=None)
_PREDICT = SpeechPredict()


class LibriSpeechDataModule(LightningDataModule):
    """LibriSpeech (or the synthetic tone set) as padded waveform + token batches for speech-text alignment.

    Batch: `waveforms` (B, T) float32 zero-padded at `sample_rate`; `wave_lengths` (B,) samples;
    `input_ids` / `attention_mask` (B, L) long / bool, `[CLS] text [SEP]` with L <= context_length;
    `utt_keys` (B,) index of the utterance in its split; `text_ids` (B,) id of the normalised transcript,
    equal for identical transcripts (treat as positives); `transcripts` list[str]; `skipped` int, items
    dropped from this batch because their audio could not be decoded (B may even be 0).

    Needs `Trainer(use_distributed_sampler=False)` under DDP: the batch sampler shards by rank itself.
    """

    def __init__(
        self,
        root: str,
        train_subsets: Sequence[str] = ("train-clean-100",),
        val_subsets: Sequence[str] = ("dev-clean",),
        test_subsets: Sequence[str] = ("test-clean",),
        sample_rate: int = 16000,
        batching: DurationBatching = _BATCHING,
        loader: LoaderConfig = _LOADER,
        tokenizer: TokenizerConfig = _TOKENIZER,
        context_length: int = 64,
        generate_if_missing: bool = False,
        predict: SpeechPredict = _PREDICT,
    ) -> None:
        """
        Args:
            root: the folder holding `LibriSpeech/`, or the `LibriSpeech` folder itself.
            train_subsets: subset folders for training, e.g. `train-clean-100`, `train-clean-360`.
            val_subsets: subset folders for validation.
            test_subsets: subset folders for testing.
            sample_rate: audio is resampled to this rate (Hz) when a file differs.
            batching: the longest utterance kept and the padded seconds per batch.
            loader: workers and the seed of the per-epoch batch shuffle (`batch_size` is not used: batches are
                sized in seconds by `batching`, predict batches by `predict.batch_size`).
            tokenizer: `path` a `vocab.txt` / `tokenizer.json` (or folder), a Hugging Face model folder (its own
                tokenizer, for a text tower from that folder) or a checkpoint (.ckpt) of this framework; None
                trains WordPiece of `vocab_size` on the training transcripts once and caches it in `cache_dir`
                (None: `$XDG_CACHE_HOME/mmpretrain`), with the audio index. The CLI's validate, test and predict
                set the path to --ckpt_path, so only that stage's subsets need to be on the machine. `lowercase`
                lowercases the transcripts (LibriSpeech is UPPER CASE) before tokenizing.
            context_length: maximum tokens per transcript, including [CLS] and [SEP].
            generate_if_missing: write the synthetic tone set into `root` when it has no LibriSpeech tree; only
                into a root that is new, empty or a generated set, any other is refused.
            predict: the inputs `predict` embeds: subsets, a folder of audio, a file of transcripts.
        """
        super().__init__()
        self.batching = as_section(DurationBatching, batching)
        self.loader_config = as_section(LoaderConfig, loader)
        self.tokenizer_config = as_section(TokenizerConfig, tokenizer)
        self.predict_inputs = as_section(SpeechPredict, predict)
        max_duration, max_batch_seconds = self.batching.max_duration, self.batching.max_batch_seconds
        if max_duration > max_batch_seconds:
            raise ValueError(
                f"max_duration ({max_duration} s) exceeds max_batch_seconds ({max_batch_seconds} s): "
                "the longest utterances would not fit in a batch"
            )
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.root = Path(root)
        self.sample_rate = sample_rate
        self.context_length = context_length
        self.generate_if_missing = generate_if_missing
        self.seed = self.loader_config.seed
        self.lowercase = self.tokenizer_config.lowercase
        self.subsets = {
            "train": list(train_subsets),
            "val": list(val_subsets),
            "test": list(test_subsets),
            "predict": list(self.predict_inputs.subsets),
        }
        self.cache_dir = Path(self.tokenizer_config.cache)
        self.datasets: dict[str, LibriSpeechDataset] = {}
        self.problems: dict[str, dict[str, int]] = {}  # split -> kind of problem -> count
        self._speakers: dict[int, Speaker] | None = None

    # data location -------------------------------------------------------------------------------
    def librispeech_dir(self) -> Path:
        """The `LibriSpeech` folder, generating the synthetic set first when allowed and needed."""
        for candidate in (self.root / "LibriSpeech", self.root):
            if candidate.is_dir() and (
                candidate.name == "LibriSpeech"
                or any((candidate / s).is_dir() for subs in self.subsets.values() for s in subs)
            ):
                return candidate
        if self.generate_if_missing:  # refuses a root that holds other data (datamodules/generated.py)
            return generate_tone_librispeech(self.root, sample_rate=self.sample_rate, seed=self.seed)
        what = "does not exist" if not self.root.exists() else "holds no LibriSpeech tree"
        raise FileNotFoundError(
            f"{self.root} {what} (expected {self.root}/LibriSpeech/<subset>/<speaker>/<chapter>/*.flac); "
            "set generate_if_missing=True to write the synthetic tone set there"
        )

    def subset_dirs(self, split: str) -> list[Path]:
        base = self.librispeech_dir()
        missing = [s for s in self.subsets[split] if not (base / s).is_dir()]
        if missing:
            found = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith("."))
            raise FileNotFoundError(
                f"LibriSpeech subset(s) {', '.join(missing)} not found under {base}; "
                f"subsets found: {', '.join(found) or 'none'}"
            )
        return [base / s for s in self.subsets[split]]

    @property
    def speakers(self) -> dict[int, Speaker]:
        """Speaker metadata from `SPEAKERS.TXT` ({} when the file is absent)."""
        if self._speakers is None:
            path = self.librispeech_dir() / "SPEAKERS.TXT"
            self._speakers = parse_speakers(path) if path.is_file() else {}
        return self._speakers

    # tokenizer -----------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> TextTokenizer:
        """Loaded or trained (keyed by the transcripts) on first use, so `vocab_size` is known before `setup`
        (e.g. for CLI links)."""
        return self.tokenizer_config.build(self._training_transcripts)

    def _training_transcripts(self) -> list[str]:
        try:
            train_dirs = self.subset_dirs("train")
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{err}. {NO_TRAINING_DATA}") from None
        return subset_transcripts(train_dirs, self.lowercase)

    @property
    def vocab_size(self) -> int:
        """The actual vocabulary size (a small corpus can train fewer tokens than requested)."""
        return self.tokenizer.vocab_size

    # Lightning hooks -----------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # Rank 0 generates the data and trains the tokenizer; the other ranks then load the cached copy.
        predicting = self.trainer is not None and self.trainer.state.fn == "predict"
        if not predicting or self.subsets["predict"]:  # a folder of audio or a text file needs no LibriSpeech
            self.librispeech_dir()
        _ = self.tokenizer

    def setup(self, stage: str | None = None) -> None:
        for split in stage_splits(stage):
            if split not in self.datasets:
                self.datasets[split] = self._build_split(split)

    def _build_split(self, split: str) -> LibriSpeechDataset:
        utterances: list[Utterance] = []
        problems: dict[str, list[str]] = {}
        for subset_dir in self.subset_dirs(split):
            utts, found = index_subset(subset_dir, self.cache_dir)
            utterances += utts
            for kind, items in found.items():
                problems.setdefault(kind, []).extend(items)
        max_duration = self.batching.max_duration
        too_long = [u for u in utterances if u.duration > max_duration]
        if too_long:
            problems["too_long"] = [u.path for u in too_long]
            longest = max(u.duration for u in too_long)
            # a warning, not a count at INFO: a short max_duration silently shrinks validation and test
            # (10 s drops about three quarters of LibriSpeech's utterances)
            keep = math.ceil(longest)
            log.warning(
                "%s: max_duration=%s s drops %d of %d utterances (%.0f%%), the longest %.1f s, e.g. %s; %s. To keep "
                "them raise max_duration to %d (--data.init_args.batching.max_duration %d; tri-modal: "
                "--data.init_args.speech_text.batching.max_duration %d) and max_batch_seconds to at least as much",
                split,
                max_duration,
                len(too_long),
                len(utterances),
                100 * len(too_long) / len(utterances),
                longest,
                "; ".join(problems["too_long"][:3]),
                "training never sees them" if split == "train" else "they are not scored",
                keep,
                keep,
                keep,
            )
            utterances = [u for u in utterances if u.duration <= max_duration]
        descriptions = {
            "no_audio": "transcript line(s) without audio",
            "no_transcript": "audio file(s) without a transcript line",
            "unreadable": "unreadable audio file(s)",
            "empty": "zero-length audio file(s)",
            "malformed": "malformed transcript line(s)",
        }
        for kind, items in problems.items():
            if kind == "too_long":
                continue  # said above, with the setting to change
            log.warning(
                "%s: dropped %d %s, e.g. %s",
                split,
                len(items),
                descriptions[kind],
                "; ".join(items[:3]),
            )
        self.problems[split] = {kind: len(items) for kind, items in problems.items()}
        dataset = LibriSpeechDataset(utterances, self.sample_rate, self.lowercase)
        hours = sum(dataset.durations) / 3600
        log.info(
            "%s: %d utterances, %.2f h, from %s", split, len(dataset), hours, ", ".join(self.subsets[split])
        )
        return dataset

    def dataloader(
        self, split: str, shuffle: bool = False, wrap_collate: Callable[[Callable], Callable] | None = None
    ) -> DataLoader:
        """The loader of `split` ("train", "val" or "test"); `wrap_collate` may wrap the batch collate function
        (the tri-modal DataModule adds each utterance's image id), called once the split is set up."""
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        dataset = self.datasets[split]
        sampler = DurationBucketBatchSampler(
            dataset.durations,
            self.batching.max_batch_seconds,
            num_buckets=self.batching.num_buckets,
            shuffle=shuffle,
            seed=self.seed,
        )
        workers = self.loader_config.num_workers
        # the training loader's position is checkpointed, so a run killed mid-epoch resumes at the next batch
        loader_cls = ResumableBatchDataLoader if split == "train" else DataLoader
        collate: Callable = SpeechTextCollator(self.tokenizer, self.context_length)
        if wrap_collate is not None:
            collate = wrap_collate(collate)
        return loader_cls(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            collate_fn=collate,
            pin_memory=self.loader_config.pin,
            # Training workers keep their "already warned about this file" memory across epochs; evaluation
            # workers would only hold memory between validations.
            persistent_workers=split == "train" and workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self.dataloader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.dataloader("val")

    def test_dataloader(self) -> DataLoader:
        return self.dataloader("test")

    @property
    def predicts(self) -> bool:
        """Whether any predict input is set."""
        return bool(self.subsets["predict"] or self.predict_inputs.audio or self.predict_inputs.texts)

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per input given: the utterances of `predict.subsets` with their transcripts, a folder of
        audio files, a file of transcripts (see `datamodules/predict_data.py` for the batches)."""
        items = None
        if self.subsets["predict"]:
            if "predict" not in self.datasets:
                self.datasets["predict"] = self._build_split("predict")
            items = UtteranceItems(self.datasets["predict"])
        return audio_text_predict_loaders(
            items,
            self.predict_inputs.audio,
            self.predict_inputs.texts,
            sample_rate=self.sample_rate,
            collate=lambda: PredictCollate(self.tokenizer, self.context_length, text_kind="transcript"),
            batch_size=self.predict_inputs.batch_size,
            num_workers=self.loader_config.num_workers,
            nothing="nothing to predict: set --data.predict.subsets (LibriSpeech subsets: utterances and "
            "transcripts), --data.predict.audio (a folder of audio files) and/or --data.predict.texts (a text "
            "file, one transcript per line)",
        )
