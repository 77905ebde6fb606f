"""`MixtureSampler`: shares by weight, equal steps per rank, draws without replacement, exact mid-epoch resume."""

from __future__ import annotations

import json
from itertools import islice
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, Dataset

from datamodules.loading import ResumableDataLoader
from datamodules.mixture import MixtureSampler, largest_remainder


class Ids(Dataset):
    def __init__(self, start: int, n: int) -> None:
        self.start, self.n = start, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.start + i


def _shares(counts: list[int]) -> list[float]:
    return [c / sum(counts) for c in counts]


@pytest.mark.parametrize("world", [1, 2])
def test_weights_three_to_one_give_75_25_over_10000_draws_per_rank_arithmetic(world: int) -> None:
    """Every rank computes its own indices (one process here); together they hold the 10,000 draws, each rank
    the same number, and the shares are within 2 points of 75/25."""
    samplers = [
        MixtureSampler([400, 400], [3, 1], num_samples=10_000, seed=1, num_replicas=world, rank=r)
        for r in range(world)
    ]
    per_rank = [list(s) for s in samplers]
    assert [len(x) for x in per_rank] == [10_000 // world] * world == [len(s) for s in samplers]
    counts = samplers[0].counts(i for x in per_rank for i in x)
    assert sum(counts) == 10_000
    assert abs(_shares(counts)[0] - 0.75) < 0.02, counts
    # the ranks split one global order: interleaved, they are the epoch's indices
    assert [i for row in zip(*per_rank) for i in row] == samplers[0].epoch_indices()


def test_weights_are_upsampling_factors_of_each_sample() -> None:
    """Sizes 100 and 300, weights 3 and 1: each sample of either source is drawn equally often, so the shares are
    50/50 and the default epoch is 100 * 3 + 300 * 1 draws."""
    sampler = MixtureSampler([100, 300], [3, 1], seed=2)
    assert sampler.total == 600
    counts = sampler.counts(list(sampler))
    assert abs(_shares(counts)[0] - 0.5) < 0.06, (
        counts
    )  # 600 draws: 3 standard deviations of a binomial share


def test_indices_match_concat_dataset_and_source_of() -> None:
    sources = [Ids(0, 5), Ids(1000, 7), Ids(2000, 3)]
    concat = ConcatDataset(sources)
    sampler = MixtureSampler([len(s) for s in sources], [1, 2, 1], num_samples=300, seed=4)
    for index in sampler:
        source = sampler.source_of(index)
        assert concat[index] // 1000 == source
    with pytest.raises(IndexError):
        sampler.source_of(15)


def test_without_replacement_meets_quotas_in_whole_passes() -> None:
    """Weight 2.5 on 8 samples: two full passes and 4 distinct samples of a third; weight 0.5 on 6: 3 distinct."""
    sampler = MixtureSampler([8, 6], [2.5, 0.5], replacement=False, seed=3)
    indices = list(sampler)
    assert sampler.total == 23 and len(indices) == 23
    first = [i for i in indices if i < 8]
    second = [i for i in indices if i >= 8]
    assert sorted(set(first)) == list(range(8))
    assert sorted(torch.bincount(torch.tensor(first)).tolist()) == [2] * 4 + [3] * 4
    assert len(second) == len(set(second)) == 3
    assert largest_remainder(10, [1, 1, 1]) == [4, 3, 3]


def test_epochs_differ_and_repeat_by_seed() -> None:
    a = MixtureSampler([50, 50], [1, 1], seed=0)
    b = MixtureSampler([50, 50], [1, 1], seed=0)
    b.set_epoch(1)
    assert list(a) != list(b)
    a.set_epoch(1)
    assert list(a) == list(b)


def test_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="one weight per source"):
        MixtureSampler([3, 4], [1])
    with pytest.raises(ValueError, match="empty or weighted 0"):
        MixtureSampler([3, 4], [0, 0])


def _loader(epoch: int, rank: int, workers: int, replacement: bool) -> ResumableDataLoader:
    dataset = ConcatDataset([Ids(0, 40), Ids(100, 25)])
    sampler = MixtureSampler([40, 25], [3, 1], 180, replacement, seed=5, num_replicas=2, rank=rank)
    sampler.set_epoch(epoch)
    return ResumableDataLoader(
        dataset,
        sampler,
        batch_size=4,
        drop_last=True,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


def _flat(batches) -> list[int]:
    return [int(i) for b in batches for i in b.tolist()]


@pytest.mark.parametrize(("rank", "replacement"), [(0, True), (1, False)])
def test_interrupted_run_takes_the_same_sample_ids_as_an_unbroken_one(rank: int, replacement: bool) -> None:
    """Two workers prefetch ahead while the consumer has taken 5 batches; the checkpointed state counts 5, and a
    fresh loader resumed from it yields exactly the rest of the unbroken epoch, then whole epochs again."""
    unbroken = _flat(_loader(3, rank, 0, replacement))
    first = _loader(3, rank, 2, replacement)
    it = iter(first)
    taken = list(islice(it, 5))
    state = first.state_dict()
    del it
    assert state == {"epoch": 3, "consumed": 20}
    second = _loader(0, rank, 0, replacement)  # a fresh process builds its loader at epoch 0
    second.load_state_dict(state)
    rest = list(second)
    assert _flat(taken) + _flat(rest) == unbroken
    assert _flat(second) == _flat(_loader(3, rank, 0, replacement))  # the skip is used once


def test_sampler_state_dict_resumes_without_the_loader() -> None:
    sampler = MixtureSampler([30, 30], [1, 3], num_samples=50, seed=9)
    sampler.set_epoch(2)
    whole = list(sampler)
    it = iter(sampler)
    head = list(islice(it, 17))
    state = sampler.state_dict()
    assert state == {"epoch": 2, "consumed": 17}
    fresh = MixtureSampler([30, 30], [1, 3], num_samples=50, seed=9)
    fresh.load_state_dict(state)
    assert head + list(fresh) == whole


def _gloo_rank(rank: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        sampler = MixtureSampler(
            [400, 400], [3, 1], num_samples=10_000, seed=1
        )  # rank and world from the group
        counts = torch.tensor(sampler.counts(list(sampler)) + [len(sampler)])
        gathered = [torch.zeros_like(counts) for _ in range(2)]
        dist.all_gather(gathered, counts)
        if rank == 0:
            Path(out).write_text(json.dumps([g.tolist() for g in gathered]))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_equal_steps_and_75_25_shares(tmp_path) -> None:
    out = tmp_path / "counts.json"
    torch.multiprocessing.spawn(_gloo_rank, args=(str(tmp_path / "init"), str(out)), nprocs=2, join=True)
    (a0, b0, n0), (a1, b1, n1) = json.loads(out.read_text())
    assert n0 == n1 == 5_000
    assert abs((a0 + a1) / 10_000 - 0.75) < 0.02
