"""Resampled shard epochs (shards drawn with replacement) and sample lists read by the shard stream."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch.multiprocessing as mp
from torch.utils.data import DataLoader

from datamodules.image.coco import eval_transform
from datamodules.image.shards.listing import expand_shards, shard_selection
from datamodules.image.shards.members import iter_tar_samples
from datamodules.image.shards.stream import ShardLoader, ShardStream
from datamodules.image.shards.write import coco_to_shards
from datamodules.synthetic.shapes import generate_shapes_coco
from tests.helpers import free_port


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 shapes images in shards of 5: four of 5 and one of 4."""
    root = generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", n_train=24, n_val=2, image_size=32
    )
    out = tmp_path_factory.mktemp("shards")
    coco_to_shards(root, "train2017", out, max_samples_per_shard=5)
    return out


def resampled(out: Path | str, **kwargs) -> ShardStream:
    shards, selection = shard_selection(str(out))
    return ShardStream(shards, eval_transform(16), resampled=True, selection=selection, **kwargs)


def rank_epoch(
    out: Path | str, rank: int, world: int, epoch: int, seed: int = 0, **kwargs
) -> list[list[int]]:
    """Image ids of each batch one rank's loader (2 workers, batches of 2) gives in `epoch`."""
    data = resampled(out, batch_size=2, num_workers=2, rank=rank, world_size=world, seed=seed, **kwargs)
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=2, drop_last=True, num_workers=2, collate_fn=list)
    return [[item["image_id"] for item in batch] for batch in loader]


def test_resampled_ranks_take_equal_steps_of_draws_with_replacement(shards: Path) -> None:
    # 40 samples per epoch over 2 ranks x 2 workers: 10 steps of 2 on each rank, 5 per worker run.
    epochs = {(r, e): rank_epoch(shards, r, 2, e, num_samples=40) for r in range(2) for e in range(2)}
    assert all(len(batches) == 10 and all(len(b) == 2 for b in batches) for batches in epochs.values())
    seen = {key: [i for batch in batches for i in batch] for key, batches in epochs.items()}
    # 40 draws from 24 images: with replacement, some image comes twice within one epoch
    assert max(Counter(seen[0, 0] + seen[1, 0]).values()) > 1
    assert seen[0, 0] != seen[1, 0] and seen[0, 0] != seen[0, 1]  # each rank and epoch its own stream
    assert rank_epoch(shards, 0, 2, 0, num_samples=40) == epochs[0, 0]  # deterministic per seed
    assert rank_epoch(shards, 0, 2, 0, seed=1, num_samples=40) != epochs[0, 0]
    # without num_samples an epoch is as long as the shards: 24 // (2 x 2) = 6 steps per rank
    assert len(rank_epoch(shards, 1, 2, 0)) == 6
    data = resampled(shards, rank=0, world_size=2)
    assert [d for _, d in zip(range(8), data.drawn_shards(0, 0))] == [
        d for _, d in zip(range(8), resampled(shards, rank=1, world_size=2).drawn_shards(0, 0))
    ]  # the stream of a slot is a function of (seed, epoch, slot) only


def test_resampled_run_resumed_mid_epoch_equals_an_unbroken_one(shards: Path) -> None:
    def loader() -> ShardLoader:
        data = resampled(shards, batch_size=2, num_workers=2, num_samples=24)
        return ShardLoader(data, batch_size=2, num_workers=2, collate_fn=list)

    def ids(batches) -> list[list[int]]:
        return [[item["image_id"] for item in batch] for batch in batches]

    full = ids(iter(loader()))
    interrupted = loader()
    it = iter(interrupted)
    taken = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    assert len(full) == 12 and ids(taken) + ids(iter(resumed)) == full


def test_sample_list_reads_only_its_samples_in_order_of_its_shards(shards: Path, tmp_path: Path) -> None:
    paths = expand_shards(str(shards))
    rows = [
        {"shard": p, "index": i, "key": s["__key__"]}
        for p in paths
        for i, s in enumerate(iter_tar_samples(p, read=lambda ext: False))
        if i % 2 == 0  # every other sample: 3, 3, 3, 3, 2
    ]
    listed = tmp_path / "kept.parquet"
    pq.write_table(pa.Table.from_pylist(rows), listed)
    assert expand_shards(str(listed)) == paths
    data = resampled(listed, batch_size=2)  # one rank: an epoch of 14 listed samples
    data.resampled = False  # the plain split: every listed sample once
    got = sorted(int(item["image_id"]) for item in data if item is not None)
    assert got == sorted(int(r["key"]) for r in rows) and len(got) == 14
    rows[0]["key"] = "000000999999"  # a shard rewritten since it was listed is named
    pq.write_table(pa.Table.from_pylist(rows), listed)
    with pytest.raises(ValueError, match="the shard changed since it was scored"):
        list(resampled(listed, batch_size=2))
    pq.write_table(pa.Table.from_pylist([{"shard": paths[0], "key": "x"}]), listed)
    with pytest.raises(ValueError, match=r"kept.parquet: a sample list needs columns .* lacks \['index'\]"):
        shard_selection(str(listed))


def _gloo_rank(rank: int, shards: str, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # rank and world size from the process group, as the DataModule passes the trainer's
        data = resampled(
            shards,
            batch_size=2,
            num_workers=1,
            num_samples=40,
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
        )
        loader = ShardLoader(data, batch_size=2, num_workers=1, collate_fn=list)
        ids = [[item["image_id"] for item in batch] for batch in loader]
        gathered: list = [None, None]
        dist.all_gather_object(gathered, ids)
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_take_equal_steps_from_their_own_draws(shards: Path, tmp_path: Path) -> None:
    out = tmp_path / "ids.json"
    mp.spawn(_gloo_rank, args=(str(shards), free_port(), str(out)), nprocs=2)
    ranks = json.loads(out.read_text())
    assert len(ranks[0]) == len(ranks[1]) == 10  # 40 samples, 2 ranks, batches of 2
    assert ranks[0] != ranks[1]
    for rank in range(2):  # what each rank computes alone, told its rank (1 worker, batches of 2)
        data = resampled(shards, batch_size=2, num_workers=1, rank=rank, world_size=2, num_samples=40)
        loader = DataLoader(data, batch_size=2, num_workers=1, collate_fn=list)
        assert ranks[rank] == [[item["image_id"] for item in batch] for batch in loader]
