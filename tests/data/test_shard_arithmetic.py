"""How a ShardStream cuts an epoch into ranks, steps and worker runs: COCO train2017 at 8, 64 and 512 ranks, and
real DataLoaders with several workers giving every rank the same number of full batches."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import pytest

from datamodules.image.coco import eval_transform
from datamodules.image.shards.listing import expand_shards
from datamodules.image.shards.stream import ShardLoader, ShardStream
from datamodules.image.shards.write import coco_to_shards
from datamodules.synthetic.shapes import generate_shapes_coco

LOGGER = "datamodules.image.shards"
TRANSFORM = eval_transform(16)
# 2 cores here; the loaders below need their worker counts, not speed
MANY_WORKERS = pytest.mark.filterwarnings("ignore:This DataLoader will create")
N = 24  # images of the small set, in shards of 5, 5, 5, 5, 4

# COCO train2017 as configs/clip/coco_shards_vit_b16.yaml streams it: 118,287 images converted with
# --shard-size 1000, batch 256 per GPU, 12 DataLoader workers per GPU.
COCO_SIZES = [1000] * 118 + [287]
COCO_BATCH, COCO_WORKERS = 256, 12


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = generate_shapes_coco(tmp_path_factory.mktemp("shapes") / "coco", n_train=N, n_val=2, image_size=16)
    out = tmp_path_factory.mktemp("shards")
    coco_to_shards(root, "train2017", out, max_samples_per_shard=5)
    return out


def covered(data: ShardStream, world: int, epoch: int = 0) -> Counter:
    """How many times each (shard, sample) is in a run of some worker of some rank in `epoch`."""
    seen: Counter = Counter()
    for slot in range(world * data.num_workers):
        for shard, first, end in data.assignment(epoch, slot):
            seen.update((shard, k) for k in range(first, end))
    return seen


@pytest.mark.parametrize(
    ("world", "steps", "dropped", "repeated"),
    [(8, 57, 1551, 0), (64, 7, 3599, 0), (512, 1, 0, 512 * 256 - 118287)],
)
def test_coco_train2017_epoch_at_8_64_512_ranks(
    shards: Path, world: int, steps: int, dropped: int, repeated: int, caplog: pytest.LogCaptureFixture
) -> None:
    # One readable shard stands for COCO's 119: only the counts decide the split.
    data = ShardStream(
        expand_shards(str(shards))[:1] * len(COCO_SIZES),
        TRANSFORM,
        batch_size=COCO_BATCH,
        num_workers=COCO_WORKERS,
        rank=0,
        world_size=world,
        sizes=COCO_SIZES,
    )
    assert data.num_samples == 118287
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert len(data) == steps * COCO_BATCH  # one rank's samples: the same on every rank
    assert data.steps() == steps
    assert bool(caplog.records) == (repeated > 0)  # only an epoch shorter than one step of every rank warns

    # Every rank's share is its steps in full batches, dealt to its workers in whole batches, the first
    # steps % workers of them one more (the loader takes batch i from worker i % workers).
    share, extra = divmod(steps, COCO_WORKERS)
    batches = [share + (w < extra) for w in range(COCO_WORKERS)]
    for rank in range(world):
        runs = [data.run(rank * COCO_WORKERS + w) for w in range(COCO_WORKERS)]
        assert [end - first for first, end in runs] == [b * COCO_BATCH for b in batches]
        assert runs[0][0] == rank * steps * COCO_BATCH and runs[-1][1] == (rank + 1) * steps * COCO_BATCH
        assert all(end == nxt for (_, end), (nxt, _) in zip(runs, runs[1:]))  # contiguous

    seen = covered(data, world)
    assert sum(seen.values()) == world * steps * COCO_BATCH
    assert 118287 - len(seen) == dropped  # fewer than world x batch, a different few each epoch
    assert sum(n - 1 for n in seen.values()) == repeated
    assert max(seen.values()) == (2 if repeated else 1)


@MANY_WORKERS
def test_every_rank_of_a_multi_worker_loader_gives_its_steps_in_full_batches(shards: Path) -> None:
    # 24 images, 2 ranks of 3 workers. Batches of 3: 4 steps per rank, dealt 2, 1, 1; all 24 seen, in two
    # epochs of persistent workers. Batches of 5: 2 steps per rank, dealt 1, 1, 0 (an idle worker); 20 seen.
    for batch, steps, epochs in ((3, 4, 2), (5, 2, 1)):
        seen: list[list[int]] = [[] for _ in range(epochs)]
        for rank in range(2):
            data = ShardStream(
                expand_shards(str(shards)),
                TRANSFORM,
                batch_size=batch,
                num_workers=3,
                rank=rank,
                world_size=2,
            )
            loader = ShardLoader(
                data, batch_size=batch, num_workers=3, persistent_workers=True, collate_fn=list
            )
            assert len(loader) == steps
            for epoch in range(epochs):  # the second pass restarts the workers that ran out in the first
                got = [[item["image_id"] for item in b] for b in loader]
                assert [len(b) for b in got] == [batch] * steps  # as many full batches on every rank
                seen[epoch] += [i for b in got for i in b]
        for ids in seen:
            assert len(ids) == len(set(ids)) == 2 * steps * batch


@MANY_WORKERS
def test_uneven_worker_runs_resume_mid_epoch_exactly(shards: Path) -> None:
    # One rank, 3 workers, batches of 3: 8 steps dealt 3, 3, 2; a resume can start at any worker's turn.
    def loader() -> ShardLoader:
        data = ShardStream(expand_shards(str(shards)), TRANSFORM, batch_size=3, num_workers=3)
        return ShardLoader(data, batch_size=3, num_workers=3, collate_fn=list)

    def ids(batches) -> list[list[int]]:
        return [[item["image_id"] for item in batch] for batch in batches]

    full = ids(loader())
    assert len(full) == 8 and len({i for b in full for i in b}) == N
    for consumed in (5, 7):  # the resumed pass's worker 0 takes over worker 2's run, then worker 1's
        resumed = loader()
        resumed.load_state_dict({"epoch": 0, "batches": consumed, "world_size": 1, "num_workers": 3})
        assert ids(resumed) == full[consumed:]
