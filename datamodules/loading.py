"""A DataLoader whose position in the epoch is saved in checkpoints.

Lightning stores the `state_dict()` of every training DataLoader that has one and hands it back through
`load_state_dict()` before the resumed run iterates. The state is the sampler's epoch and how many samples
the training loop has received; on resume the sampler skips exactly those indices (no sample is loaded to
skip it), so the run continues with the next unseen batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A seeded DistributedSampler (order depends on seed and epoch only) whose next pass can start `skip`
    indices in. Being a DistributedSampler, Lightning uses it as it is under DDP."""

    skip: int = 0

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        return iter(list(super().__iter__())[skip:])


class ResumableDataLoader(DataLoader):
    """DataLoader over a seeded DistributedSampler that can resume in the middle of an epoch."""

    def __init__(self, dataset: Any, sampler: ResumableSampler, batch_size: int, **kwargs: Any) -> None:
        # its own generator: iterating must not draw from the global RNG, or a resumed run (which iterates
        # once more than an unbroken one) would get different dropout masks
        kwargs.setdefault("generator", torch.Generator().manual_seed(sampler.seed))
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, **kwargs)
        self._yielded = 0
        self._start = 0

    def __iter__(self) -> Iterator[Any]:
        self._start = self.sampler.skip
        self._yielded = 0
        for batch in super().__iter__():
            self._yielded += 1  # counted as the training loop takes it, not as workers prefetch
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.sampler.epoch, "consumed": self._start + self._yielded * self.batch_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(state["epoch"])
        self.sampler.skip = state["consumed"]
