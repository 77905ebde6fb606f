"""Training samples streamed from shards: each epoch's shard order cut into equal whole-batch shares per rank
and worker, so every DDP rank takes the same steps; resampled epochs, resumption inside an epoch, and the
DataLoader that checkpoints its position. docs/data.md describes the arithmetic."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from datamodules.image.coco import CaptionedImage, caption_item, decode_rgb
from datamodules.image.shards.listing import SampleList, shard_sizes
from datamodules.image.shards.members import (
    IMAGE_EXTENSIONS,
    MalformedSample,
    first_readable,
    key_image_id,
    parse_caption_key,
    read_shard,
    sample_captions,
)
from datamodules.image.shards.remote import ShardUnreadable

log = logging.getLogger(__name__)

T = TypeVar("T")

# Lightning warns that an IterableDataset's length "could be inaccurate" with several workers; a ShardStream's
# is exact for the worker count it is built for, which its __iter__ checks.
warnings.filterwarnings("ignore", message="Your `IterableDataset` has `__len__` defined")


def buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Shuffle a stream through a buffer of `size` items: each new item takes the place of a random one, which
    is given out; the last `size` come out in random order."""
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        k = int(rng.integers(size))
        yield buffer[k]
        buffer[k] = item
    for k in rng.permutation(len(buffer)):
        yield buffer[k]


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Batches every rank takes per epoch: its share of the samples rounded down to whole batches, at least one
    (when `world_size` batches need more samples than there are, the epoch's order wraps round)."""
    return max(1, num_samples // (world_size * batch_size))


def worker_batches(steps: int, workers: int) -> list[int]:
    """Batches of each worker of a rank taking `steps` steps: dealt in turn from worker 0, as the DataLoader takes
    them (batch i from worker i % workers), so the first `steps % workers` workers give one more."""
    share, extra = divmod(steps, workers)
    return [share + (k < extra) for k in range(workers)]


class ShardStream(IterableDataset):
    """Training samples streamed from WebDataset shards, split by rank and worker (docs/data.md, "Web-scale data").

    Yields the items of `CocoCaptionsDataset` in training (one caption per image), None for an image that does
    not decode (`CaptionCollate` drops and counts it). `len()` is the number of samples of one rank per epoch.

    Args:
        shards: shard paths, in a fixed order (the same on every rank).
        transform: image transform of decoded (3, H, W) uint8 tensors.
        batch_size: per-device batch size: each rank's share and each worker's run are whole batches of it.
        num_workers: DataLoader workers per rank (0 counts as 1); must match the loader's.
        seed: seeds the shard order, the shuffle buffer and the caption draw, with the epoch.
        shuffle_buffer: encoded samples each worker holds to shuffle its run.
        rank: this process's rank; None asks torch.distributed (0 when it is not initialised).
        world_size: number of ranks; None asks torch.distributed (1 when it is not initialised).
        sizes: samples per shard; None reads them from `_info.json` / `sizes.json` (see `shard_sizes`).
        num_samples: samples in all the shards, for shards without sizes files (`train_num_samples`).
        retries: times a shard that fails to open or is cut short is opened again before it is skipped.
        retry_delay: seconds before the first retry of a shard, doubled at each further one; None: RETRY_DELAY.
        caption_key: where a sample's caption is: a member's extension (`txt`) or `json:FIELD` (see
            `parse_caption_key`); the converter's json record, with every caption of an image, is used first.
        resampled: draw whole shards with replacement for each worker run (docs/curation.md); an epoch is
            `num_samples` samples when given, else as many as the shards hold.
        selection: read only the samples of this sample list (its shards must be `shards`, in its order).

    A sample without an image or a caption member is skipped, logged with its reason and counted as a skipped image;
    shards whose first samples hold no caption at all stop the run before it starts. A shard skipped after its
    retries is logged by name and counted in `skipped_shards`; the samples it did not give are made up at the end of
    the run by None items, so every rank still takes the same number of steps.
    """

    def __init__(
        self,
        shards: Sequence[str],
        transform: Callable[[Tensor], Tensor],
        batch_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        rank: int | None = None,
        world_size: int | None = None,
        sizes: Sequence[int] | None = None,
        num_samples: int | None = None,
        retries: int = 2,
        retry_delay: float | None = None,
        caption_key: str = "txt",
        resampled: bool = False,
        selection: SampleList | None = None,
    ) -> None:
        parse_caption_key(caption_key)
        self.shards = list(shards)
        self.caption_key = caption_key
        self.resampled = resampled
        self.selection = selection
        if selection is not None:
            if selection.shards != self.shards:
                raise ValueError("the sample list's shards are not the shards given to the stream")
            self.sizes = selection.sizes
        elif resampled and num_samples is not None and sizes is None:
            self.sizes = []  # drawn shards are read whole: their sizes are not needed
        else:
            self.sizes = list(sizes) if sizes is not None else shard_sizes(self.shards, num_samples)
        # a wrong address or a set without captions fails here, in one line, not as a run of empty batches
        first_readable(self.shards, caption_key=caption_key)
        self.num_samples = num_samples if resampled and num_samples is not None else sum(self.sizes)
        if self.num_samples == 0:
            raise ValueError(f"the {len(self.shards)} shards hold no samples (the first: {self.shards[0]})")
        self.transform = transform
        self.batch_size = batch_size
        self.num_workers = max(1, num_workers)
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world_size = rank, world_size
        self.retries, self.retry_delay = retries, retry_delay
        # Shared memory, so persistent workers see them change: the epoch, and where a resumed epoch restarts.
        self._epoch = torch.zeros((), dtype=torch.long).share_memory_()
        self._resume = torch.tensor([-1, 0], dtype=torch.long).share_memory_()  # (epoch, batches consumed)
        self._skipped = torch.zeros(self.num_workers, dtype=torch.long).share_memory_()  # one slot per worker
        self._warned: set[str] = set()
        self._wrap_warned = False

    @property
    def skipped_shards(self) -> int:
        """Shard reads given up after their retries, by all workers of this rank since the stream was built (a
        shard split between two workers' runs and lost to both counts twice)."""
        return int(self._skipped.sum())

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(epoch)

    def resume_at(self, epoch: int, batches: int) -> None:
        """Make the pass over `epoch` start after the first `batches` batches this rank's loader gave."""
        self._resume.copy_(torch.tensor([epoch, batches]))

    def topology(self) -> tuple[int, int]:
        """(rank, world size)."""
        if self.rank is not None:
            return self.rank, self.world_size or 1
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def steps(self) -> int:
        """Batches every rank's loader gives per epoch."""
        _, world = self.topology()
        needed = world * self.batch_size
        if needed > self.num_samples and not self._wrap_warned:
            self._wrap_warned = True
            log.warning(
                "%d samples are fewer than one batch of %d for each of %d ranks: every epoch is one step, "
                "%d samples of it seen twice",
                self.num_samples,
                self.batch_size,
                world,
                needed - self.num_samples,
            )
        return steps_per_epoch(self.num_samples, world, self.batch_size)

    def run(self, slot: int) -> tuple[int, int]:
        """(first, end) positions, in the epoch's sample order, of the run of worker slot `slot` (rank x workers
        + worker)."""
        rank, worker = divmod(slot, self.num_workers)
        steps = self.steps()
        batches = worker_batches(steps, self.num_workers)
        first = (rank * steps + sum(batches[:worker])) * self.batch_size
        return first, first + batches[worker] * self.batch_size

    def __len__(self) -> int:
        return self.steps() * self.batch_size

    def shard_order(self, epoch: int) -> list[int]:
        """Indices of the shards in the order they are read in `epoch`: drawn from (seed, epoch) only."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards)).tolist()

    def assignment(self, epoch: int, slot: int) -> list[tuple[int, int, int]]:
        """(shard index, first sample, end sample) pieces of the run of worker slot `slot` (rank x workers +
        worker) in `epoch`."""
        start, end = self.run(slot)
        order = self.shard_order(epoch)
        pieces, offset = [], 0
        while offset < end:  # past the last sample, the order starts again (see `steps`)
            for i in order:
                lo, hi = offset, offset + self.sizes[i]
                if hi > start and lo < end:
                    pieces.append((i, max(start, lo) - lo, min(end, hi) - lo))
                offset = hi
                if offset >= end:
                    break
        return pieces

    def _piece(self, i: int, first: int, stop: int | None) -> Iterator[dict[str, Any]]:
        """Samples `first` to `stop` (None: the end) of shard i; of its listed samples with a sample list."""
        if self.selection is None:
            yield from read_shard(
                self.shards[i],
                first,
                None if stop is None else stop - first,
                retries=self.retries,
                retry_delay=self.retry_delay,
            )
            return
        positions, keys = self.selection.positions[i][first:stop], self.selection.keys[i][first:stop]
        if len(positions) == 0:
            return
        wanted = dict(zip(positions.tolist(), keys))
        lo = int(positions[0])
        samples = read_shard(
            self.shards[i],
            lo,
            int(positions[-1]) + 1 - lo,
            retries=self.retries,
            retry_delay=self.retry_delay,
        )
        for index, sample in enumerate(samples, start=lo):
            if index in wanted:
                if sample["__key__"] != wanted[index]:
                    raise ValueError(
                        f"{self.shards[i]}: sample {index} is {sample['__key__']}, not {wanted[index]} as the "
                        "sample list says: the shard changed since it was scored"
                    )
                yield sample

    def drawn_shards(self, epoch: int, slot: int) -> Iterator[int]:
        """The shards a resampled run of worker slot `slot` reads in `epoch`, in order (endless): drawn with
        replacement from (seed, epoch, slot), so every rank and worker has its own stream."""
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        while True:
            yield int(rng.integers(len(self.shards)))

    def _resampled(self, epoch: int, slot: int, worker: int, length: int) -> Iterator[dict[str, Any]]:
        given, empty = 0, 0
        for i in self.drawn_shards(epoch, slot):
            if given >= length or empty >= len(self.shards):  # nothing readable left: padded in __iter__
                return
            before = given
            try:
                for sample in self._piece(i, 0, None):
                    yield sample
                    given += 1
                    if given >= length:
                        return
            except ShardUnreadable as err:
                log.error("skipping shard %s", err)
                self._skipped[worker] += 1
            empty = empty + 1 if given == before else 0

    def _encoded(self, epoch: int, slot: int, worker: int) -> Iterator[dict[str, Any]]:
        if self.resampled:
            first, end = self.run(slot)
            yield from self._resampled(epoch, slot, worker, end - first)
            return
        for i, first, stop in self.assignment(epoch, slot):
            try:
                yield from self._piece(i, first, stop)
            except ShardUnreadable as err:  # the run is padded to its length in __iter__
                log.error("skipping shard %s", err)  # the message starts with the shard's name
                self._skipped[worker] += 1

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != self.num_workers:
            raise RuntimeError(
                f"ShardStream was built for {self.num_workers} workers per rank but runs in {workers}"
            )
        rank, _ = self.topology()
        epoch = int(self._epoch)
        resume_epoch, consumed = self._resume.tolist()
        consumed = consumed if resume_epoch == epoch else 0
        # The loader takes batches from its workers in turn, starting with worker 0: batch i of a pass came
        # from worker i % workers (a worker with one batch fewer runs out after the others' last turn, which
        # leaves that order as it is). A pass resumed after `consumed` batches starts with worker 0 too, so
        # worker w takes over the run of worker (w + consumed) % workers and skips the batches it already gave.
        role = (worker + consumed) % workers
        skip = max(0, (consumed - role + workers - 1) // workers) * self.batch_size
        slot = rank * workers + role
        first, end = self.run(slot)
        length = end - first
        samples = buffer_shuffle(
            self._encoded(epoch, slot, worker),
            self.shuffle_buffer,
            np.random.default_rng([self.seed, epoch, slot]),
        )
        given = 0
        for given, sample in enumerate(samples, start=1):
            if given > skip:  # skipped samples are never decoded
                yield self._decode(sample, epoch)
        if given < length:
            # A shard held fewer samples than its count says: pad, or this rank would take fewer steps than
            # the others and DDP would wait forever. The padding counts as undecodable images.
            log.warning("worker %d of rank %d: %d samples short; padded", worker, rank, length - given)
            for _ in range(max(0, length - max(given, skip))):
                yield None

    def _decode(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        key, url = sample["__key__"], sample["__url__"]
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        try:
            image_id, captions, caption_ids = sample_captions(sample, self.caption_key)
        except MalformedSample as err:
            self._warn(f"sample {url}:{key}", key_image_id(key), err.why)
            return None
        if image_id is None:  # another tool's shards: the id comes from the key
            image_id = key_image_id(key)
        name = f"{url}:{key}.{ext}"
        if ext is None or not captions:
            members = ", ".join(sorted(k for k in sample if not k.startswith("__")))
            why = "no image member" if ext is None else f"no caption for caption_key={self.caption_key!r}"
            self._warn(f"sample {url}:{key}", image_id, f"{why} (it holds {members})")
            return None
        try:
            pixels = decode_rgb(sample[ext])
        except Exception as err:  # one bad image must not end the run
            self._warn(f"unreadable image {name}", image_id, str(err))
            return None
        record = CaptionedImage(image_id, name, tuple(captions), tuple(caption_ids))
        return caption_item(record, self.transform(pixels), True, self.seed, epoch)

    def _warn(self, what: str, image_id: int, why: str) -> None:
        if what not in self._warned:
            self._warned.add(what)
            log.warning("skipping %s (image id %d): %s", what, image_id, why)


class ShardLoader(DataLoader):
    """The DataLoader of a `ShardStream`: sets its epoch before each pass and saves its position in checkpoints.

    `epoch_fn` gives the trainer's epoch; without one, or when it returns None, the loader counts its passes.
    Lightning stores `state_dict()` in checkpoints and hands it to `load_state_dict()` on resume; the resumed
    pass then skips, without decoding them, the samples of the batches already consumed. That needs the same
    number of ranks and workers as the interrupted run; otherwise the epoch starts over, with a warning.
    """

    def __init__(
        self, dataset: ShardStream, epoch_fn: Callable[[], int | None] | None = None, **kwargs: Any
    ) -> None:
        kwargs.setdefault("drop_last", True)
        super().__init__(dataset, **kwargs)
        self.epoch_fn = epoch_fn
        self._passes = 0
        self._epoch = 0
        self._start = 0
        self._yielded = 0
        self._resume: tuple[int, int] = (-1, 0)

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_fn() if self.epoch_fn is not None else None
        self._epoch = self._passes if epoch is None else epoch
        self._passes += 1
        resume_epoch, batches = self._resume
        self._start = batches if resume_epoch == self._epoch else 0
        self._yielded = 0
        self.dataset.set_epoch(self._epoch)
        for batch in super().__iter__():
            self._yielded += 1  # counted as the training loop takes it, not as workers prefetch
            yield batch

    def state_dict(self) -> dict[str, int]:
        _, world = self.dataset.topology()
        return {
            "epoch": self._epoch,
            "batches": self._start + self._yielded,
            "world_size": world,
            "num_workers": self.dataset.num_workers,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        _, world = self.dataset.topology()
        self._passes = state["epoch"]
        if (state["world_size"], state["num_workers"]) != (world, self.dataset.num_workers):
            log.warning(
                "checkpoint of %d ranks x %d workers resumed on %d x %d: its epoch starts over",
                state["world_size"],
                state["num_workers"],
                world,
                self.dataset.num_workers,
            )
            return
        self._resume = (state["epoch"], state["batches"])
        self.dataset.resume_at(state["epoch"], state["batches"])
        # a checkpoint written before the first resumed batch must hold the same position
        self._epoch, self._start, self._yielded = state["epoch"], state["batches"], 0
