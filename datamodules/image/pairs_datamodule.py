"""Contrastive image-text training on the user's own pairs (CSV/TSV, JSON lines, Parquet, a folder of images with
`.txt` captions, or WebDataset shards): one source per split, or for training a weighted mixture of several,
with the batches of `CocoCaptionsDataModule` and duplicate groups that keep a pair's copies from being
negatives."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.image.clip_tokenizer import ClipTokenizer, is_clip_tokenizer
from datamodules.image.coco import CaptionCollate, eval_transform, train_transform
from datamodules.image.coco_datamodule import EpochDataLoader
from datamodules.image.pair_duplicates import cached_duplicate_groups
from datamodules.image.pairs import Format, PairsDataset, PairTable, infer_format, read_source
from datamodules.loading import SPLIT_STAGE, stage_splits
from datamodules.mixture import MixtureSampler
from datamodules.sections import ImagesConfig, LoaderConfig, ShardsConfig, TokenizerConfig, as_section
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


@dataclass
class PairSource:
    """One source of image-caption pairs."""

    path: str
    """A manifest (.csv, .tsv, .jsonl, .parquet; local or a URL), a folder of images with .txt captions, or
    WebDataset shards (a .tar brace pattern or a folder of .tar files)."""
    weight: float = 1.0
    """Upsampling factor in a training mixture: each of its samples is drawn `weight` times as often as one of
    weight 1 (open_clip's upsampling factors)."""
    format: Format = "auto"
    """csv, tsv, jsonl, parquet, folder or shards; auto tells it by the path."""


@dataclass
class PairColumns:
    """Where manifests hold the image and the caption."""

    image_key: str = "filepath"
    """Column (CSV, TSV, Parquet) or field (JSON lines) of the image: a path relative to the manifest's folder,
    an absolute path or URL, or in Parquet the encoded bytes or a {bytes, path} struct."""
    caption_key: str = "title"
    """Column or field of the caption."""
    separator: str | None = None
    """Field separator of CSV manifests; None: ',' for .csv and a tab for .tsv."""


@dataclass
class MixtureConfig:
    """How the training sources are drawn (datamodules/mixture.py)."""

    weights: list[float] | None = None
    """Upsampling factor of each `::`-separated training source, in order; None: all 1."""
    sources: list[PairSource] | None = None
    """The training sources as a list of {path, weight, format}, instead of `data.train`."""
    num_samples: int | None = None
    """Samples per epoch over all devices; None: sum of each source's size times its weight."""
    replacement: bool = False
    """Draw with replacement (each draw independent) or without (every sample of a source before any repeats)."""


_COLUMNS, _MIXTURE, _IMAGES, _SHARDS = PairColumns(), MixtureConfig(), ImagesConfig(), ShardsConfig()
_LOADER, _TOKENIZER = LoaderConfig(), TokenizerConfig()


class PairsCollate(CaptionCollate):
    """`CaptionCollate`, and in training `sources`: the source index of each kept row."""

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Any]:
        batch = super().__call__(items)
        if self.train:
            sources = [item.get("source", 0) for item in items if item is not None]
            batch["sources"] = torch.tensor(sources, dtype=torch.long)
        return batch


class PairItems(Dataset):
    """A split's rows as predict items (datamodules/predict_data.py): the image and its caption, both keyed by
    the row's place (`file:line`)."""

    def __init__(self, dataset: PairsDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item, where = self.dataset[i], self.dataset.where(i)
        if item is None:
            return {"unreadable": where}
        return {
            "image": item["image"],
            "image_key": where,
            "texts": list(item["captions"]),
            "text_keys": [where],
        }


class ImageTextPairsDataModule(LightningDataModule):
    """Image-caption pairs from the user's files for contrastive training, retrieval evaluation and predict.

    Sources: CSV/TSV, JSON lines, Parquet (paths or embedded image bytes, local or remote), a folder of images with
    `.txt` captions, or WebDataset shards; one source per split, or for training a weighted mixture of several
    (`a.csv::b.parquet` with `mixture.weights: [3, 1]`).

    Batches are those of `CocoCaptionsDataModule` (datamodules/image/coco_datamodule.py): uint8 images, one caption
    per image, `image_ids` that group rows as positives and `caption_ids`. In training, `image_ids` is the row's
    duplicate group: rows with the same image bytes or the same normalised caption share it, so the loss never
    treats a pair's own copy as a negative. Evaluation batches number every row on its own. Training batches also
    carry `sources` (the source of each row), which the DataModule counts to log each source's realised share.

    Training from files goes through `MixtureSampler` (datamodules/mixture.py) and a resumable loader: a run
    resumed mid-epoch continues with the next unseen batch. Training from shards streams them (`ShardStream`,
    datamodules/image/shards/) and cannot be mixed with other sources.

    Args:
        train: the training source: a path (`data/pairs.csv`), or several joined by `::` (`a.csv::b.parquet`,
            weighted by `mixture.weights`; or list them with their weights in `mixture.sources`).
        val: the validation source (`::` joins several); None: no validation.
        test: the test source; None: the validation source.
        predict: the source `predict` embeds (images and captions, keyed by file and line).
        columns: the manifests' image and caption columns (open_clip's `filepath` and `title` by default).
        mixture: weights, epoch length and replacement of the training draw.
        images: image size, crop scale and evaluation resize (not `image`: the system's image tower has that
            name, and Lightning merges both sets of hyper-parameters).
        context_length: longest token sequence, [CLS] and [SEP] included; longer captions are truncated.
        dedup: group exact duplicates of the training set (same image bytes or same normalised caption) as mutual
            positives. Finding them reads every training image once, in `prepare_data` (once per node); the groups
            are cached under `tokenizer.cache_dir` (pair-duplicates/, keyed by the rows and the sizes and times of
            their files), and each rank's setup reads them there.
        shards: streaming, caption member and retries of WebDataset shards (the training source, streamed; or an
            evaluation source, read whole); their paths are the sources, so `shards.urls` stays unset.
        loader: batch sizes, workers and seed.
        tokenizer: the WordPiece tokenizer (trained on the training captions unless `path` is given); a path
            `open_clip:NAME` or a Hugging Face CLIP folder loads CLIP's BPE.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        columns: PairColumns = _COLUMNS,
        mixture: MixtureConfig = _MIXTURE,
        images: ImagesConfig = _IMAGES,
        context_length: int = 64,
        dedup: bool = True,
        shards: ShardsConfig = _SHARDS,
        loader: LoaderConfig = _LOADER,
        tokenizer: TokenizerConfig = _TOKENIZER,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        columns, mixture, images = (
            as_section(PairColumns, columns),
            as_section(MixtureConfig, mixture),
            as_section(ImagesConfig, images),
        )
        shards, loader = as_section(ShardsConfig, shards), as_section(LoaderConfig, loader)
        if shards.urls:
            raise ValueError(
                f"data.shards.urls ({shards.urls}): image-text pairs take their shards as a source, "
                "data.train (or data.val, data.test); leave data.shards.urls unset"
            )
        tokenizer = as_section(TokenizerConfig, tokenizer)
        self.sources = {
            "train": self._train_sources(train, mixture),
            "val": _joined(val),
            "test": _joined(test) or _joined(val),
            "predict": _joined(predict),
        }
        self.columns, self.mixture, self.images = columns, mixture, images
        self.context_length = context_length
        self.dedup = dedup
        self.shards = shards
        self.loader, self.tokenizer_config = loader, tokenizer
        self._tables: dict[str, list[PairTable]] = {}
        self.datasets: dict[str, Any] = {}
        self.skipped_rows: dict[str, int] = {}  # by split: rows of its manifests skipped at reading
        # training rows joined to an earlier one, by image and by caption
        self.duplicates: dict[str, int] = {}
        self.source_counts = [0] * len(self.sources["train"])  # training rows taken from each source
        self.skipped_images = 0

    @staticmethod
    def _train_sources(train: str | None, mixture: MixtureConfig) -> list[PairSource]:
        weights = mixture.weights
        if mixture.sources:
            if train or weights:
                raise ValueError(
                    "data.mixture.sources lists the training sources with their weights: leave data.train and "
                    "data.mixture.weights unset"
                )
            return [s if isinstance(s, PairSource) else PairSource(**s) for s in mixture.sources]
        sources = _joined(train)
        if weights is not None and len(weights) != len(sources):
            raise ValueError(
                f"data.mixture.weights has {len(weights)} weights for {len(sources)} training sources ({train})"
            )
        for source, weight in zip(sources, weights or [1.0] * len(sources)):
            source.weight = float(weight)
        return sources

    # sources ------------------------------------------------------------------------------------------------
    def _is_shards(self, split: str) -> bool:
        sources = self.sources[split]
        formats = [s.format if s.format != "auto" else infer_format(s.path) for s in sources]
        if "shards" in formats and len(sources) > 1 and split == "train":
            raise ValueError(
                "WebDataset shards stream and cannot be mixed with other training sources: give them alone "
                f"({' :: '.join(s.path for s in sources)})"
            )
        return formats == ["shards"]

    def tables(self, split: str) -> list[PairTable]:
        """The rows of each source of `split`, read once and kept."""
        if split not in self._tables:
            sources = self.sources[split]
            if not sources:
                raise ValueError(f"no data.{split} source given")
            c, o = self.columns, self.shards
            self._tables[split] = [
                read_source(
                    s.path, s.format, c.image_key, c.caption_key, c.separator, o.caption_key, o.retries
                )
                for s in sources
            ]
            self.skipped_rows[split] = sum(sum(t.skipped.values()) for t in self._tables[split])
        return self._tables[split]

    # tokenizer ------------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> TextTokenizer | ClipTokenizer:
        """Loaded from `tokenizer.path`, or trained on the training captions once and cached."""
        if is_clip_tokenizer(self.tokenizer_config.path):
            return ClipTokenizer(self.tokenizer_config.path)
        return self.tokenizer_config.build(self._training_captions)

    def _training_captions(self) -> list[str]:
        if not self.sources["train"]:
            raise ValueError(
                "the vocabulary is trained on the training captions, and there is no data.train source: pass "
                "--ckpt_path (evaluation uses the checkpoint's tokenizer) or data.tokenizer.path"
            )
        if self._is_shards("train"):
            from datamodules.image.shards.listing import expand_shards
            from datamodules.image.shards.members import shard_captions

            shards = expand_shards(self.sources["train"][0].path)
            return list(shard_captions(shards, self.shards.retries, caption_key=self.shards.caption_key))
        return [c for t in self.tables("train") for c in t.captions]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    # Lightning hooks --------------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        _ = self.tokenizer  # trains and caches the vocabulary once, on the first process
        fitting = self.trainer is None or self.trainer.state.fn == "fit"
        if fitting and self.dedup and self.sources["train"] and not self._is_shards("train"):
            self._duplicate_groups()  # reads every training image once per node; setup reads the cache

    def setup(self, stage: str | None = None) -> None:
        for split in stage_splits(stage):
            if split in self.datasets or not self.sources[split]:
                continue
            train = split == "train"
            if train and self._is_shards("train"):
                self.datasets[split] = self._shard_stream()
                continue
            tables = self.tables(split)
            groups = self._groups() if train and self.dedup else None
            transform = (
                train_transform(self.images.image_size, self.images.min_scale)
                if train
                else eval_transform(self.images.image_size, self.images.resize)
            )
            self.datasets[split] = PairsDataset(tables, transform, train, groups, seed=self.loader.seed)

    def _duplicate_groups(self) -> tuple[Any, dict[str, int]]:
        """The training rows' duplicate groups and counts, from the cache (built there when missing or bad)."""
        paths = [s.path for s in self.sources["train"]]
        return cached_duplicate_groups(paths, self.tables("train"), self.tokenizer_config.cache)

    def _groups(self) -> Any:
        groups, counts = self._duplicate_groups()
        self.duplicates = counts
        if counts["image"] or counts["caption"]:
            log.info(
                "training set: %d rows repeat an earlier row's image bytes and %d its caption; %d groups of "
                "mutual positives over %d rows",
                counts["image"],
                counts["caption"],
                len(set(groups.tolist())),
                len(groups),
            )
        return groups

    def _shard_stream(self) -> Any:
        from datamodules.image.shards.listing import expand_shards
        from datamodules.image.shards.stream import ShardStream

        rank, world = self._topology()
        o = self.shards
        return ShardStream(
            expand_shards(self.sources["train"][0].path),
            train_transform(self.images.image_size, self.images.min_scale),
            batch_size=self.loader.batch_size,
            num_workers=self.loader.num_workers,
            seed=self.loader.seed,
            shuffle_buffer=o.shuffle_buffer,
            rank=rank,
            world_size=world,
            num_samples=o.num_samples,
            retries=o.retries,
            caption_key=o.caption_key,
            resampled=o.resampled,
        )

    def _topology(self) -> tuple[int, int]:
        if self.trainer is None:
            return 0, 1
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _loader_kwargs(self, train: bool) -> dict[str, Any]:
        workers = self.loader.num_workers
        return {
            "batch_size": self.loader.batch_size if train else self.loader.eval_size,
            "drop_last": train,
            "num_workers": workers,
            "persistent_workers": train and workers > 0,
            "pin_memory": self.loader.pin,
            "collate_fn": PairsCollate(self.tokenizer, self.context_length, self.images.image_size, train),
        }

    def sampler(self) -> MixtureSampler:
        """The training draw over the sources (module doc of datamodules/mixture.py)."""
        dataset = self.datasets["train"]
        rank, world = self._topology()
        return MixtureSampler(
            dataset.sizes,
            [s.weight for s in self.sources["train"]],
            num_samples=self.mixture.num_samples,
            replacement=self.mixture.replacement,
            seed=self.loader.seed,
            num_replicas=world,
            rank=rank,
        )

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.datasets:
            self.setup("fit")
        dataset = self.datasets["train"]
        kwargs = self._loader_kwargs(train=True)
        if not isinstance(dataset, PairsDataset):  # shards
            from datamodules.image.shards.stream import ShardLoader

            return ShardLoader(dataset, epoch_fn=self._current_epoch, **kwargs)
        sampler = self.sampler()
        if len(self.sources["train"]) > 1:
            log.info(
                "training mixture, expected shares: %s",
                ", ".join(
                    f"{s.path} {p:.1%} (weight {s.weight:g})"
                    for s, p in zip(self.sources["train"], sampler.probabilities)
                ),
            )
        return _ReportingLoader(
            dataset, sampler, epoch_fn=self._current_epoch, on_end=self.report_shares, **kwargs
        )

    def _eval_loader(self, split: str) -> DataLoader | list:
        if not self.sources[split]:
            return []  # Lightning skips a stage whose loaders are an empty list
        if split not in self.datasets:
            self.setup(SPLIT_STAGE[split])
        return DataLoader(self.datasets[split], **self._loader_kwargs(train=False))

    def val_dataloader(self) -> DataLoader | list:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader | list:
        return self._eval_loader("test")

    def predict_dataloader(self) -> DataLoader:
        from datamodules.predict_data import PredictCollate

        if not self.sources["predict"]:
            raise ValueError("nothing to predict: set --data.predict to a source of images and captions")
        transform = eval_transform(self.images.image_size, self.images.resize)
        dataset = PairsDataset(self.tables("predict"), transform, train=False)
        collate = PredictCollate(self.tokenizer, self.context_length)
        return DataLoader(
            PairItems(dataset),
            batch_size=self.loader.eval_size,
            num_workers=self.loader.num_workers,
            collate_fn=collate,
        )

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # workers cannot share counters cheaply; the batches they send can
        if "skipped" in batch:
            self.skipped_images += int(batch["skipped"])
        elif "unreadable" in batch:
            self.skipped_images += len(batch["unreadable"])
        if "sources" in batch:
            for source, n in enumerate(
                torch.bincount(batch["sources"], minlength=len(self.source_counts)).tolist()
            ):
                self.source_counts[source] += n
        return batch

    def shares(self) -> list[float]:
        """Each training source's share of the rows this process has trained on so far."""
        total = sum(self.source_counts)
        return [n / total if total else 0.0 for n in self.source_counts]

    def report_shares(self) -> None:
        """Log each training source's realised share (this process's rows), and give it to the trainer's loggers."""
        sources = self.sources["train"]
        if len(sources) < 2 or not sum(self.source_counts):
            return
        shares = self.shares()
        log.info(
            "training mixture, realised shares over %d rows: %s",
            sum(self.source_counts),
            ", ".join(f"{s.path} {p:.1%}" for s, p in zip(sources, shares)),
        )
        trainer = self.trainer
        if trainer is not None and trainer.is_global_zero:
            for logger in trainer.loggers:
                metrics = {f"train/share_source{i}": p for i, p in enumerate(shares)}
                logger.log_metrics(metrics, step=trainer.global_step)


class _ReportingLoader(EpochDataLoader):
    """The resumable training loader, calling `on_end` when a pass over the epoch ends."""

    def __init__(self, *args: Any, on_end: Any = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_end = on_end

    def __iter__(self) -> Any:
        yield from super().__iter__()
        if self.on_end is not None:
            self.on_end()


def _joined(spec: str | None) -> list[PairSource]:
    """`a.csv::b.parquet` as sources of weight 1."""
    if not spec:
        return []
    return [PairSource(path.strip()) for path in spec.split("::") if path.strip()]
