"""A training set made of several sources, each with a weight (an upsampling factor, as open_clip's
`--train-data-upsampling-factors`): `MixtureSampler` draws global indices into their concatenation, the same
order on every rank, and resumes mid-epoch like the samplers of datamodules/loading.py."""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from datamodules.loading import take_skip


def largest_remainder(total: int, shares: Sequence[float]) -> list[int]:
    """`total` split into integers proportional to `shares`, summing to `total` (Hamilton's method)."""
    norm = sum(shares)
    exact = [total * s / norm for s in shares]
    counts = [math.floor(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


class MixtureSampler(DistributedSampler):
    """Global indices into the concatenation of sources of `sizes`, each source drawn by its `weights`.

    The sources are concatenated (`torch.utils.data.ConcatDataset(sources)`: source i holds the global indices
    [sum(sizes[:i]), sum(sizes[:i + 1]))) and the sampler yields global indices. A sample of a source with weight 3
    is drawn three times as often as one of weight 1, so source i's expected share of an epoch is
    size_i * weight_i / sum_j size_j * weight_j (all weights 1: every sample equally often, whatever the source).
    Sources of equal size with weights [3, 1] give shares of 75 % and 25 %.

    An epoch is `num_samples` draws over all ranks (default: sum of size_i * weight_i, rounded):

        replacement=True    each draw picks a source by its share, then a sample of it uniformly at random;
        replacement=False   source i gets a quota of draws proportional to its share; it is met as whole passes over
                            the source (each a fresh permutation) plus a random part of one more, so no sample comes
                            back before its whole source has been seen in that epoch.

    The epoch's order depends on (seed, epoch) only, and every rank computes the same global order and takes every
    `num_replicas`-th index from its rank on, so every rank takes the same number of samples (the order is padded
    by wrapping around to a multiple of the world size). Mid-epoch resume follows datamodules/loading.py: the sampler
    has `epoch`, `seed`, `skip` and `skip_epoch`, and a `ResumableDataLoader` over it checkpoints its position; the
    sampler's own `state_dict()` does the same for use without that loader.

    A `DistributedSampler` for Lightning's sake only (Lightning keeps a training loader's sampler under DDP when it
    is one, and would wrap any other); it reads no dataset and is built from sizes alone.

    Args:
        sizes: samples in each source.
        weights: upsampling factor of each source (>= 0, not all 0).
        num_samples: draws per epoch over all ranks; None: sum of size * weight, rounded.
        replacement: draw with replacement (each draw independent) or without (quotas met by passes, module doc).
        seed: the order of epoch e depends on (seed, e) only.
        num_replicas: ranks sharing the epoch; None: torch.distributed's world size, or 1.
        rank: this rank; None: torch.distributed's rank, or 0.
        shuffle: shuffle the epoch's indices; False keeps them grouped by source (the draw itself stays random).
    """

    skip: int = 0
    skip_epoch: int | None = None

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        num_samples: int | None = None,
        replacement: bool = True,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        shuffle: bool = True,
    ) -> None:
        sizes, weights = [int(s) for s in sizes], [float(w) for w in weights]
        if len(sizes) != len(weights) or not sizes:
            raise ValueError(
                f"a mixture needs one weight per source: {len(sizes)} sources, {len(weights)} weights"
            )
        if any(s < 0 for s in sizes) or any(w < 0 or not math.isfinite(w) for w in weights):
            raise ValueError(
                f"source sizes and weights must be >= 0, got sizes {sizes} and weights {weights}"
            )
        mass = [s * w for s, w in zip(sizes, weights)]
        if sum(mass) <= 0:
            raise ValueError(f"every source is empty or weighted 0 (sizes {sizes}, weights {weights})")
        if num_replicas is None:
            num_replicas = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if rank is None:
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.sizes, self.weights = sizes, weights
        self.offsets = [0]
        for s in sizes:
            self.offsets.append(self.offsets[-1] + s)
        self.probabilities = [m / sum(mass) for m in mass]
        self.total = round(sum(mass)) if num_samples is None else int(num_samples)
        if self.total < 1:
            raise ValueError(f"a mixture epoch needs at least one sample, got num_samples {self.total}")
        self.replacement, self.seed, self.shuffle = replacement, seed, shuffle
        self.num_replicas, self.rank = num_replicas, rank
        self.num_samples = math.ceil(self.total / num_replicas)  # per rank, as DistributedSampler names it
        self.total_size = self.num_samples * num_replicas
        self.epoch = 0
        self.drop_last = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def source_of(self, index: int) -> int:
        """The source a global index belongs to."""
        if not 0 <= index < self.offsets[-1]:
            raise IndexError(f"index {index} is outside the mixture's {self.offsets[-1]} samples")
        return bisect.bisect_right(self.offsets, index) - 1

    def counts(self, indices: Iterable[int]) -> list[int]:
        """How many of `indices` come from each source (the realised shares, for logging)."""
        sources = torch.bucketize(
            torch.as_tensor(list(indices), dtype=torch.long), torch.tensor(self.offsets[1:]), right=True
        )
        return torch.bincount(sources, minlength=len(self.sizes)).tolist()

    def epoch_indices(self, epoch: int | None = None) -> list[int]:
        """Every rank's indices of `epoch` (default: the current one), in order, padded to `total_size`."""
        g = torch.Generator().manual_seed(self.seed + (self.epoch if epoch is None else epoch))
        if self.replacement:
            sources = torch.multinomial(
                torch.tensor(self.probabilities), self.total, replacement=True, generator=g
            )
            if not self.shuffle:
                sources = sources.sort(stable=True).values
            sizes = torch.tensor(self.sizes, dtype=torch.float64)[sources]
            offsets = torch.tensor(self.offsets[:-1])[sources]
            within = (torch.rand(self.total, generator=g, dtype=torch.float64) * sizes).long()
            indices = offsets + within
        else:
            parts = []
            for source, quota in enumerate(largest_remainder(self.total, self.probabilities)):
                size, offset = self.sizes[source], self.offsets[source]
                passes = [
                    torch.randperm(size, generator=g) for _ in range(math.ceil(quota / size) if size else 0)
                ]
                parts.append(
                    torch.cat(passes)[:quota] + offset if passes else torch.empty(0, dtype=torch.long)
                )
            indices = torch.cat(parts)
            if self.shuffle:
                indices = indices[torch.randperm(len(indices), generator=g)]
        indices = indices.tolist()
        pad = self.total_size - len(indices)
        return indices + (indices * math.ceil(pad / len(indices)))[:pad]

    def rank_indices(self, epoch: int | None = None) -> list[int]:
        """This rank's indices of `epoch`: every `num_replicas`-th from `rank` on, `num_samples` of them."""
        return self.epoch_indices(epoch)[self.rank : self.total_size : self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        skip = take_skip(self)
        self._consumed = skip
        for index in self.rank_indices()[skip:]:
            self._consumed += 1
            yield index

    def state_dict(self) -> dict[str, int]:
        """The epoch and how many of this rank's indices of it were handed out. A DataLoader's workers take
        indices ahead of the training loop: in training, `ResumableDataLoader` over this sampler checkpoints
        what the loop took instead."""
        return {"epoch": self.epoch, "consumed": getattr(self, "_consumed", 0)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.set_epoch(state["epoch"])
        self.skip, self.skip_epoch = state["consumed"], state["epoch"]
