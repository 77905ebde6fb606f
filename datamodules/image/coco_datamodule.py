"""COCO Captions for CLIP-style image-text training and retrieval evaluation: the official or Karpathy layout
read from a folder (or, for training, WebDataset shards streamed by datamodules/image/shards/), with batches
of uint8 images and tokenized captions for the image-text systems."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset

from datamodules.image.clip_tokenizer import ClipTokenizer, is_clip_tokenizer
from datamodules.image.coco import (
    CaptionCollate,
    CaptionedImage,
    CocoCaptionsDataset,
    eval_transform,
    load_coco_captions,
    load_karpathy_splits,
    train_transform,
)
from datamodules.image.shards.listing import expand_shards, shard_selection
from datamodules.image.shards.members import shard_captions
from datamodules.image.shards.stream import ShardLoader, ShardStream
from datamodules.loading import SPLIT_STAGE, ResumableDataLoader, ResumableSampler, stage_splits
from datamodules.predict_data import CaptionedImageItems, ImageFiles, PredictCollate, TextLines
from datamodules.sections import (
    ImagesConfig,
    LoaderConfig,
    ShardsConfig,
    TokenizerConfig,
    as_section,
    plain_sections,
)
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)


class EpochDataLoader(ResumableDataLoader):
    """The training loader of the folder layout: resumable mid-epoch, and it tells its dataset the epoch.

    Lightning calls `set_epoch` on samplers only, and workers start fetching as soon as the underlying iterator
    is made, so the epoch (for the shuffle and the caption draw) is set on the sampler here first; the base class
    gives the dataset the sampler's epoch. `epoch_fn` gives the
    trainer's epoch (right after a resume too); without one, or when it returns None, the loader counts its own
    passes. The position in the epoch is checkpointed by `ResumableDataLoader`.
    """

    def __init__(
        self,
        dataset: CocoCaptionsDataset,
        sampler: ResumableSampler,
        batch_size: int,
        epoch_fn: Callable[[], int | None] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(dataset, sampler, batch_size, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        epoch = self._passes if epoch is None else epoch
        self._passes += 1
        self.sampler.set_epoch(epoch)  # `ResumableDataLoader` passes it on to the dataset
        yield from super().__iter__()

    def load_state_dict(self, state: dict[str, int]) -> None:
        super().load_state_dict(state)
        self._passes = state["epoch"]  # without a trainer, the resumed pass is the saved epoch


@dataclass
class CaptionPredict:
    """What `predict` embeds into the joint space; one loader per input given (datamodules/predict_data.py)."""

    split: str | None = None
    """This split's images and all their captions (keys: COCO image and caption ids); with `karpathy_json`, a
    role: train, val or test."""
    images: str | None = None
    """The images of this folder, recursively (keys: paths relative to it); unreadable files are skipped and
    listed in the writer's metadata."""
    texts: str | None = None
    """The captions of this UTF-8 file, one per line (keys: line numbers)."""


# defaults of the sections (each DataModule works on copies of its own)
_IMAGES = ImagesConfig()
_LOADER = LoaderConfig(batch_size=64)
_TOKENIZER = TokenizerConfig(cache_dir=None)  # not under root: the data root is the user's, the cache ours
_SHARDS = ShardsConfig()
_PREDICT = CaptionPredict()


class CocoCaptionsDataModule(LightningDataModule):
    """COCO Captions (or any set in its format) for contrastive image-text training and retrieval evaluation.

    Where the data is read from:

        official layout   root/annotations/captions_<split>.json, images in root/<split>/<file_name>
                          (file_name comes from the JSON, so 2014 names like COCO_val2014_000000042.jpg work too)
        karpathy_json     dataset_coco.json decides the splits (train + restval / val / test), images in
                          root/<filepath>/<filename>

    Batches, the contract with the image-text LightningModule:

        train  images (B, 3, H, W) uint8 (the image tower scales and normalises them on the device), input_ids (B, L)
               long, attention_mask (B, L) bool, image_ids (B,) long, caption_ids (B,) long annotation ids,
               skipped: int = images of this batch that failed to decode.
               One caption per image, drawn afresh each epoch, seeded by (seed, epoch, image id).
        eval   the same keys, but input_ids, attention_mask and caption_ids have one row per caption of every image
               in the batch (N >= B rows), and caption_image_ids (N,) long holds each caption's image id, so the
               retrieval metric sees every image once and every caption.

    A file that cannot be decoded never ends a run: its item comes back as None, the collate function drops it
    together with its captions and counts it in `skipped`. Missing files are found and dropped up front in `setup`.

    Training reads either the folder layout, through a seeded sampler whose position is saved in checkpoints (a run
    resumed mid-epoch continues with the next unseen batch), or WebDataset tar shards (`shards.urls`), streamed and
    split by rank and worker. Evaluation always reads the folder layout: retrieval ranks every caption against every
    image of the split.

    Args:
        root: dataset folder: annotations/captions_<split>.json and one image folder per split.
        train_split: split trained on (official layout).
        val_split: split validated on (official layout).
        test_split: split tested on; None tests on `val_split`, since COCO's test2017 has no public captions.
        karpathy_json: Karpathy's dataset_coco.json; when given it decides membership (train + restval / val /
            test), the three split arguments are ignored and images are read from root/<filepath>/<filename>.
        images: crop size, normalisation and resize mode; `images.resize` pil reproduces open_clip's evaluation
            crops (configs/clip/coco_openclip_vit_b32.yaml sets it).
        loader: batch sizes (images per batch), workers, and the seed of the shuffle and the per-epoch caption draw.
        tokenizer: `tokenizer.path` a vocab.txt / tokenizer.json (or a folder with one) or a checkpoint (.ckpt)
            of this framework; for a whole-CLIP start (model.init_clip) CLIP's tokenizer: `open_clip:ViT-B-32` or
            the HF CLIP folder; None trains a WordPiece vocabulary of `tokenizer.vocab_size` on the training
            captions once and caches it under `tokenizer.cache_dir` (None: `$XDG_CACHE_HOME/mmpretrain`, never
            root). The `vocab_size` property gives the size actually trained. The CLI's validate and test set the
            path to --ckpt_path, so only that stage's split needs to be on the machine.
        context_length: longest token sequence, [CLS] and [SEP] included; longer captions are truncated.
        generate_if_missing: write the synthetic shapes set into root when a split it reads has no annotations
            (quickstart); only into a root that is new, empty or a generated set, any other is refused.
        shards: WebDataset tar shards (`shards.urls`) to train on instead of the training split's folder, as
            written by `python -m datamodules.image.shards.write`; validation and test still read the folder
            layout. Without `tokenizer.path`, the vocabulary is trained on the training split's annotations when
            they exist, else on the captions stored in the shards (which reads every shard once: for large remote
            sets pass `tokenizer.path`).
        predict: the inputs `predict` embeds: a split, a folder of images, a file of captions.
    """

    def __init__(
        self,
        root: str = "data/coco",
        train_split: str = "train2017",
        val_split: str = "val2017",
        test_split: str | None = None,
        karpathy_json: str | None = None,
        images: ImagesConfig = _IMAGES,
        loader: LoaderConfig = _LOADER,
        tokenizer: TokenizerConfig = _TOKENIZER,
        context_length: int = 64,
        generate_if_missing: bool = False,
        shards: ShardsConfig = _SHARDS,
        predict: CaptionPredict = _PREDICT,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.root = Path(root)
        self.train_split = train_split
        self.val_split = val_split
        self.test_split = test_split
        self.karpathy_json = karpathy_json
        self.images = as_section(ImagesConfig, images)
        self.loader_config = as_section(LoaderConfig, loader)
        self.tokenizer_config = as_section(TokenizerConfig, tokenizer)
        self.context_length = context_length
        self.generate_if_missing = generate_if_missing
        self.shards = as_section(ShardsConfig, shards)
        self.predict_inputs = as_section(CaptionPredict, predict)
        # the settings read where they are used, under their short names
        self.image_size = self.images.image_size
        self.batch_size = self.loader_config.batch_size
        self.eval_batch_size = self.loader_config.eval_size
        self.num_workers = self.loader_config.num_workers
        self.seed = self.loader_config.seed
        self.cache_dir = Path(self.tokenizer_config.cache)

        self._loaded: dict[str, list[CaptionedImage]] = {}  # by split name, or by role in Karpathy mode
        # by role: "train", "val", "test"; training from shards is a ShardStream (an IterableDataset)
        self.datasets: dict[str, CocoCaptionsDataset | IterableDataset] = {}
        self.missing_images: dict[str, int] = {}  # by role: files listed but absent, found in setup()
        self.skipped_images = 0  # undecodable images met in batches on this process (counted from `skipped`)

    # data on disk --------------------------------------------------------------------------------------------
    def _annotation_file(self, split: str) -> Path:
        return self.root / "annotations" / f"captions_{split}.json"

    def _ensure_data(self, split: str) -> None:
        # Only a split that is read and missing asks for the synthetic set, so a genuine root without training
        # annotations (an evaluation machine) is tested as it is; generate_shapes_coco itself refuses any
        # folder that holds data it did not write.
        if self.generate_if_missing and not self.karpathy_json and not self._annotation_file(split).exists():
            log.info("no %s annotations under %s: writing the synthetic shapes set there", split, self.root)
            generate_shapes_coco(self.root)

    def _split_name(self, role: str) -> str:
        return {"train": self.train_split, "val": self.val_split, "test": self.test_split or self.val_split}[
            role
        ]

    def records(self, role: str) -> list[CaptionedImage]:
        """All images listed for `role` ("train", "val" or "test"), parsed once and kept."""
        if self.karpathy_json:
            if not self._loaded:
                self._loaded = load_karpathy_splits(self.karpathy_json, self.root)
            return self._loaded[role]
        return self._split_records(self._split_name(role))

    def _split_records(self, split: str) -> list[CaptionedImage]:
        """All images listed in the official layout's `split` (e.g. val2017), parsed once and kept."""
        if split not in self._loaded:
            self._ensure_data(split)
            self._loaded[split] = load_coco_captions(self._annotation_file(split), self.root / split)
        return self._loaded[split]

    def _existing(self, images: list[CaptionedImage], role: str) -> list[CaptionedImage]:
        # One directory listing per folder instead of a stat per file: cheap even for 118k files on a network disk.
        listings: dict[str, set[str]] = {}
        present, missing = [], []
        for record in images:
            folder, name = os.path.split(record.path)
            if folder not in listings:
                listings[folder] = set(os.listdir(folder)) if os.path.isdir(folder) else set()
            (present if name in listings[folder] else missing).append(record)
        self.missing_images[role] = len(missing)
        if missing:
            log.warning(
                "%s: %d of %d image files are missing and left out with their captions (e.g. %s)",
                role,
                len(missing),
                len(images),
                ", ".join(r.path for r in missing[:3]),
            )
        return present

    # tokenizer -------------------------------------------------------------------------------------------------
    @cached_property
    def tokenizer(self) -> TextTokenizer | ClipTokenizer:
        """The text tokenizer, loaded or trained (and cached, keyed by the captions) on first use, so it works
        before setup(). CLIP's BPE for `open_clip:NAME` or a Hugging Face CLIP folder (a whole-CLIP start)."""
        if is_clip_tokenizer(self.tokenizer_config.path):
            return ClipTokenizer(self.tokenizer_config.path)
        return self.tokenizer_config.build(self._training_captions)

    def _training_captions(self) -> list[str]:
        try:
            return self._read_training_captions()
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err}. The vocabulary is trained on the training captions: to evaluate without them, "
                "pass --ckpt_path (validate and test use the checkpoint's tokenizer) or --data.tokenizer.path"
            ) from None

    def _read_training_captions(self) -> list[str]:
        # Annotations first, so shards and folder train the same vocabulary; shards alone when there are none.
        annotated = self.karpathy_json or self._annotation_file(self.train_split).is_file()
        if self.shards.urls and not annotated:
            log.info(
                "no training annotations under %s: training the vocabulary on the shards' captions", self.root
            )
            shards = expand_shards(self.shards.urls)
            return list(
                shard_captions(shards, retries=self.shards.retries, caption_key=self.shards.caption_key)
            )
        return [c for r in self.records("train") for c in r.captions]

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    # LightningDataModule hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        # the splits this run reads: a test run on a genuine validation split needs no training split
        stage = self.trainer.state.fn if self.trainer is not None else None
        for role in stage_splits(str(stage.value) if stage else None):
            self._ensure_data(self._split_name(role))
        _ = self.tokenizer  # trains and caches the vocabulary once, on the first process

    def setup(self, stage: str | None = None) -> None:
        roles = stage_splits(stage)
        if stage == "test" and not (self.test_split or self.karpathy_json):
            log.info("no test_split given: testing on %s", self.val_split)
        for role in roles:
            if role in self.datasets:
                continue
            train = role == "train"
            transform = (
                train_transform(self.image_size, self.images.min_scale)
                if train
                else eval_transform(self.image_size, self.images.resize)
            )
            if train and self.shards.urls:
                self.datasets[role] = self._shard_stream(transform)
                continue
            images = self._existing(self.records(role), role)
            self.datasets[role] = CocoCaptionsDataset(images, transform, train=train, seed=self.seed)

    def _shard_stream(self, transform: Callable[[Tensor], Tensor]) -> IterableDataset:
        rank, world = self._topology()
        shards, selection = shard_selection(self.shards.urls)
        return ShardStream(
            shards,
            transform,
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            seed=self.seed,
            shuffle_buffer=self.shards.shuffle_buffer,
            rank=rank,
            world_size=world,
            num_samples=self.shards.num_samples,
            retries=self.shards.retries,
            caption_key=self.shards.caption_key,
            resampled=self.shards.resampled,
            selection=selection,
        )

    @property
    def skipped_shards(self) -> int:
        """Reads of training shards given up after their retries on this process, over all epochs (0 without
        `shards.urls`); a shard split between two workers' runs and lost to both counts twice."""
        stream = self.datasets.get("train")
        return int(getattr(stream, "skipped_shards", 0))

    def _topology(self) -> tuple[int | None, int | None]:
        # The trainer's rank and world size; None lets the shard stream ask torch.distributed itself.
        if self.trainer is None:
            return None, None
        return self.trainer.global_rank, self.trainer.world_size

    def _current_epoch(self) -> int | None:
        return self.trainer.current_epoch if self.trainer is not None else None

    def _loader(self, role: str) -> DataLoader:
        if role not in self.datasets:
            self.setup(SPLIT_STAGE[role])
        train = role == "train"
        dataset = self.datasets[role]
        kwargs: dict[str, Any] = {
            "batch_size": self.batch_size if train else self.eval_batch_size,
            "drop_last": train,
            "num_workers": self.num_workers,
            # evaluation loaders start their workers at each run: idle between runs, they would hold shared memory
            "persistent_workers": train and self.num_workers > 0,
            "pin_memory": self.loader_config.pin,  # pinning without a GPU only warns
            "collate_fn": CaptionCollate(self.tokenizer, self.context_length, self.image_size, train),
        }
        if not train:
            return DataLoader(dataset, **kwargs)
        if isinstance(dataset, IterableDataset):
            return ShardLoader(dataset, epoch_fn=self._current_epoch, **kwargs)
        rank, world = self._topology()
        # An explicit seeded sampler: the order of epoch e depends on (seed, e) only, on one device or many, and
        # its position is checkpointed. Being a DistributedSampler, Lightning keeps it under DDP.
        sampler = ResumableSampler(
            dataset, num_replicas=world or 1, rank=rank or 0, shuffle=True, seed=self.seed, drop_last=True
        )
        return EpochDataLoader(dataset, sampler, epoch_fn=self._current_epoch, **kwargs)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    @property
    def predicts(self) -> bool:
        """Whether any predict input is set."""
        return any(asdict(self.predict_inputs).values())

    def predict_dataloader(self) -> list[DataLoader]:
        """One loader per input given: the split's images with their captions, a folder of images, a file of
        captions (see `datamodules/predict_data.py` for the batches)."""
        transform = eval_transform(self.image_size, self.images.resize)
        inputs = self.predict_inputs
        datasets = []
        if inputs.split:
            # a role (train, val, test) with karpathy_json, else a split's folder name
            split = inputs.split
            records = self.records(split) if self.karpathy_json else self._split_records(split)
            records = self._existing(records, "predict")
            datasets.append(CaptionedImageItems(CocoCaptionsDataset(records, transform, train=False)))
        if inputs.images:
            datasets.append(ImageFiles(inputs.images, transform))
        if inputs.texts:
            datasets.append(TextLines(inputs.texts))
        if not datasets:
            raise ValueError(
                "nothing to predict: set --data.predict.split (a split's images and captions), --data.predict.images "
                "(a folder of images) and/or --data.predict.texts (a text file, one caption per line)"
            )
        collate = PredictCollate(self.tokenizer, self.context_length)
        return [
            DataLoader(d, batch_size=self.eval_batch_size, num_workers=self.num_workers, collate_fn=collate)
            for d in datasets
        ]

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        # Workers cannot share a counter cheaply; the batches they send can.
        self.skipped_images += int(batch["skipped"]) if "skipped" in batch else len(batch["unreadable"])
        return batch
