"""DataLoaders whose position in the epoch is saved in checkpoints, so a run resumed mid-epoch continues with the
next unseen batch: `ResumableDataLoader` over a seeded sampler (positions in samples), `ResumableBatchDataLoader`
over a batch sampler (positions in batches)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

# The splits each Lightning stage reads (a stage opens only its own: an evaluation machine may hold no training
# data), and the stage whose setup builds a split a loader is asked for outside its stage.
STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ()}
SPLIT_STAGE = {"train": "fit", "val": "validate", "test": "test"}


def stage_splits(stage: str | None) -> tuple[str, ...]:
    """The splits `stage` reads (`STAGE_SPLITS`); all three for None or a stage not listed."""
    return STAGE_SPLITS.get(stage or "", ("train", "val", "test"))


def take_skip(position: Any) -> int:
    """How far this pass of `position` (a sampler with `epoch`, `skip`, `skip_epoch`) starts in; clears it.

    A skip applies to the pass of the epoch it was set for (`skip_epoch`; None means the current one): a
    checkpoint written after an epoch's last batch says "all of epoch e consumed", and when the trainer moves
    on to epoch e + 1 that must not skip anything there."""
    skip = position.skip if position.skip_epoch in (None, position.epoch) else 0
    position.skip, position.skip_epoch = 0, None
    return skip


class ResumableSampler(DistributedSampler):
    """A seeded DistributedSampler (order depends on seed and epoch only) whose next pass can start `skip`
    indices in (see `take_skip`). Being a DistributedSampler, Lightning uses it as it is under DDP."""

    skip: int = 0
    skip_epoch: int | None = None

    def __iter__(self) -> Iterator[int]:
        skip = take_skip(self)
        return iter(list(super().__iter__())[skip:])


class _PositionedLoader(DataLoader):
    """Counts what the training loop takes and saves it as (epoch, consumed) in `position`'s units.

    Lightning 2.x keeps the `state_dict()` of every training DataLoader that has `state_dict` and `load_state_dict`
    in the checkpoint (`loops.fit_loop.state_dict.combined_loader`) and hands it back through `load_state_dict()`
    before the resumed run first iterates. The state is the sampler's epoch and how many samples the training
    loop has received in it; on resume the sampler skips exactly those indices (no sample is loaded to skip it).
    Lightning restores the loader state only when it resumes mid-epoch or in iteration-based training, and it does
    not call `on_train_epoch_start` when it resumes mid-epoch: the loaders therefore tell an epoch-dependent dataset
    its epoch themselves.

    What counts is what the training loop took, not what worker processes prefetched: the count grows as each
    batch is handed over. Lightning's fetcher reads one batch ahead only for loaders without a length, so for
    these (sized) loaders the count at checkpoint time is the number of batches trained on. The checkpoint is
    written by rank 0 and loaded by every rank; that is right because under DDP every rank takes the same number
    of batches per epoch.
    """

    def _position(self) -> Any:
        """The sampler that holds `epoch`, `skip` and `skip_epoch`."""
        raise NotImplementedError

    def _per_batch(self) -> int:
        """Sampler positions one batch advances."""
        raise NotImplementedError

    def _reset_position(self) -> None:
        # `_start` positions skipped plus `_yielded` batches handed out, in epoch `_epoch`
        self._epoch = self._position().epoch
        self._start = 0
        self._yielded = 0

    def __iter__(self) -> Iterator[Any]:
        position = self._position()
        if self._dataset_epoch and hasattr(self.dataset, "set_epoch"):
            # here, not in an `on_train_epoch_start` hook: Lightning skips that hook when it resumes in the
            # middle of an epoch, and workers fetch as soon as the pass starts
            self.dataset.set_epoch(position.epoch)
        self._epoch = position.epoch
        # read before the pass starts: `take_skip` runs when workers first ask the sampler for indices
        self._start = position.skip if position.skip_epoch in (None, position.epoch) else 0
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1  # counted as the training loop takes it, not as workers prefetch
            yield batch

    def state_dict(self) -> dict[str, int]:
        # the epoch the count belongs to, not the sampler's: between epochs the trainer may already have set
        # the next epoch while the count is still the finished one's
        return {"epoch": self._epoch, "consumed": self._start + self._yielded * self._per_batch()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        position = self._position()
        position.set_epoch(state["epoch"])
        position.skip, position.skip_epoch = state["consumed"], state["epoch"]
        # a checkpoint written before the first resumed batch must hold the same position
        self._epoch, self._start, self._yielded = state["epoch"], state["consumed"], 0


class ResumableDataLoader(_PositionedLoader):
    """DataLoader over a seeded DistributedSampler that can resume in the middle of an epoch; the position
    is counted in samples of this rank.

    `dataset_epoch`: before each pass, call `dataset.set_epoch(epoch)` (when the dataset has it), for
    datasets whose samples depend on the epoch (fresh masks, a caption drawn per epoch). None means when
    the sampler shuffles, i.e. for training loaders; evaluation loaders keep their dataset's epoch fixed.
    """

    def __init__(
        self,
        dataset: Any,
        sampler: ResumableSampler,
        batch_size: int,
        dataset_epoch: bool | None = None,
        **kwargs: Any,
    ) -> None:
        # its own generator: iterating must not draw from the global RNG, or a resumed run (which iterates
        # once more than an unbroken one) would get different dropout masks
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._dataset_epoch = sampler.shuffle if dataset_epoch is None else dataset_epoch
        self._reset_position()

    def _position(self) -> ResumableSampler:
        return self.sampler

    def _per_batch(self) -> int:
        return self.batch_size


class ResumableBatchDataLoader(_PositionedLoader):
    """DataLoader over a batch sampler that can resume in the middle of an epoch; the position is counted in
    batches of this rank. The batch sampler has `epoch`, `set_epoch`, `seed`, and skips `skip` batches of
    its next pass when `skip_epoch` is None or its epoch (see `take_skip`). `dataset_epoch`: as for
    `ResumableDataLoader`."""

    def __init__(self, dataset: Any, batch_sampler: Any, dataset_epoch: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("generator", torch.Generator().manual_seed(batch_sampler.seed))
        super().__init__(dataset, batch_sampler=batch_sampler, **kwargs)
        self._dataset_epoch = dataset_epoch
        self._reset_position()

    def _position(self) -> Any:
        return self.batch_sampler

    def _per_batch(self) -> int:
        return 1


def seeded_loader(
    dataset: Any,
    trainer: Any,
    train: bool,
    batch_size: int,
    seed: int,
    num_workers: int,
    collate_fn: Any,
    drop_last: bool | None = None,
) -> ResumableDataLoader:
    """The loader every map-style DataModule serves: an explicit, seeded sampler, so the order of epoch e depends
    on (seed, e) only, on one device or many (rank and world size from `trainer`), with its position checkpointed.
    Training shuffles and gives every rank the same number of samples; `drop_last` (default: when training)
    also drops the last partial batch."""
    world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
    sampler = ResumableSampler(
        dataset, num_replicas=world, rank=rank, shuffle=train, seed=seed, drop_last=train
    )
    return ResumableDataLoader(
        dataset,
        sampler=sampler,
        batch_size=batch_size,
        drop_last=train if drop_last is None else drop_last,
        num_workers=num_workers,
        persistent_workers=train and num_workers > 0,  # evaluation workers would hold memory between runs
        pin_memory=torch.cuda.is_available(),
        collate_fn=collate_fn,
    )
