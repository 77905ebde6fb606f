"""A rank whose whole batch failed to decode, under DDP with the loss gathering negatives across ranks.

Two gloo processes run each alignment system's own training and validation steps (the contrastive core's gather
path) with rank 0's batches empty; a single process runs them on rank 1's batches alone. The empty rank must join
every collective (else the other rank waits forever), contribute zero rows, and leave the loss, the gradients and
the retrieval figures those of the single process. A hang fails the test at its deadline instead of blocking.
The same processes count the all-gathers of each training step (the row counts are gathered once) and run the
gradient-caching step of the two-tower systems.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from lightning import LightningModule
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tests.builders.alignment import SYSTEMS
from tests.helpers import single_thread

DEADLINE_S = 120  # a hang would otherwise block the suite; a normal run takes seconds
# two half-batches and an all-reduce sum in another order than one process: fp32 reassociation
TOL = dict(rtol=1e-5, atol=1e-5)


def emptied(batch: dict) -> dict:
    """The batch the collate gives when every item failed to decode: zero rows (images keep their shape)."""
    out = {
        k: v[:0] if k == "images" else v.new_zeros((0,) * v.dim())
        for k, v in batch.items()
        if torch.is_tensor(v)
    }
    return {**out, "transcripts": [], "skipped": 3} if "transcripts" in batch else {**out, "skipped": 3}


class TrainingStep(nn.Module):
    """The module's training_step as DDP's forward, so DDP all-reduces the gradients as under Lightning."""

    def __init__(self, module: LightningModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


@contextmanager
def recorded_all_gathers() -> Iterator[list[tuple[str, tuple[int, ...]]]]:
    """Every `torch.distributed.all_gather` inside the block (the loss library's and autograd's gathers go through
    it), as the dtype and shape of the tensor this rank sends."""
    calls: list[tuple[str, tuple[int, ...]]] = []
    original = dist.all_gather

    def recorded(tensor_list: list, tensor: torch.Tensor, *args: object, **kwargs: object) -> object:
        calls.append((str(tensor.dtype), tuple(tensor.shape)))
        return original(tensor_list, tensor, *args, **kwargs)

    dist.all_gather = recorded
    try:
        yield calls
    finally:
        dist.all_gather = original


def run_steps(system: str, empty: bool, ddp: bool) -> dict:
    """One training step (loss, gradients, its all-gathers) and one validation epoch, with what the module logs."""
    module, train, vals = SYSTEMS[system]()
    if empty:
        train = {k: emptied(v) for k, v in train.items()} if system == "trimodal" else emptied(train)
        vals = [emptied(v) for v in vals]
    logged: list[tuple[str, float, int | None]] = []

    def log(name: str, value: object, batch_size: int | None = None, **kwargs: object) -> None:
        logged.append((name, float(value), batch_size))

    module.log = log
    module.log_dict = lambda values, **kwargs: [log(k, v) for k, v in values.items()]
    step = DistributedDataParallel(TrainingStep(module)) if ddp else None  # alive until its all-reduce ran
    with recorded_all_gathers() as gathers:
        loss = step(train) if step is not None else module.training_step(train, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.eval()
    with torch.no_grad():
        for idx, val in enumerate(vals):
            module.validation_step(val, 0, idx) if system == "trimodal" else module.validation_step(val, 0)
        module.on_validation_epoch_end()  # the metrics' compute syncs across ranks
    return {"loss": loss.item(), "grads": grads, "logged": logged, "gathers": gathers}


def run_cached_step(system: str, empty: bool) -> dict:
    """One gradient-caching step (2 chunks) of a two-tower system: its loss, its all-gathers, and its gradients
    averaged over the ranks as DDP's all-reduce would."""
    module, train, _ = SYSTEMS[system]()
    module.grad_cache_chunks = 2
    with recorded_all_gathers() as gathers:
        loss = module.cached_backward(emptied(train) if empty else train)
    grads = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            grads[name] = p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grads[name])
            grads[name] /= dist.get_world_size()
    return {"loss": loss.item(), "grads": grads, "gathers": gathers}


CACHED_SYSTEMS = ("image_text", "speech_text")  # gradient caching is a ContrastiveModule's (not tri-modal)


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    results = {system: run_steps(system, empty=rank == 0, ddp=True) for system in SYSTEMS}
    results["cached"] = {system: run_cached_step(system, empty=rank == 0) for system in CACHED_SYSTEMS}
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def logged_values(result: dict, name: str) -> list[tuple[float, int | None]]:
    return [(value, size) for key, value, size in result["logged"] if key == name]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("ddp_empty")
    start = time.monotonic()
    context = mp.start_processes(
        _worker, args=(str(folder / "init"), str(folder)), nprocs=2, join=False, start_method="spawn"
    )
    while not context.join(timeout=1):  # raises if a rank failed
        if time.monotonic() - start > DEADLINE_S:
            for process in context.processes:
                process.kill()
            pytest.fail(f"2 ranks, one with empty batches, did not finish in {DEADLINE_S} s: a rank hangs")
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def alone() -> dict:
    with single_thread():  # one busy thread beats two fighting other processes for the cores
        return {system: run_steps(system, empty=False, ddp=False) for system in SYSTEMS}


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_empty_rank_training_step_equals_one_process_on_the_other_batch(
    system: str, ranks: list[dict], alone: dict
) -> None:
    (empty, full), one = (r[system] for r in ranks), alone[system]
    assert empty["loss"] == 0.0
    # the mean of the ranks' losses is what DDP optimises, and what `train/loss` logs (synced); rel: as TOL
    assert (empty["loss"] + full["loss"]) / 2 == pytest.approx(one["loss"], rel=1e-5)
    logged = [logged_values(r, "train/loss")[0][0] for r in (empty, full)]
    assert sum(logged) / 2 == pytest.approx(one["loss"], rel=1e-5)
    for rank in (empty, full):  # DDP's averaged gradients, identical on both ranks
        assert rank["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, **TOL, msg=name)
    assert max(g.abs().max() for n, g in one["grads"].items() if "log_scale" in n) > 0  # not all zeros


# per pair: the row counts (one int64 each rank), then the rows of a and b (padded to the largest count, 4) and
# their group ids
ONE_PAIR_GATHERS = [
    ("torch.int64", (1,)),
    ("torch.float32", (4, 16)),
    ("torch.float32", (4, 16)),
    ("torch.int64", (4,)),
]


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_the_training_step_gathers_the_row_counts_once(system: str, ranks: list[dict]) -> None:
    """The loss's cross-rank gather and the rank weight share one all-gather of the row counts."""
    pairs = 2 if system == "trimodal" else 1
    for rank in ranks:
        assert rank[system]["gathers"] == ONE_PAIR_GATHERS * pairs


@pytest.mark.parametrize("system", CACHED_SYSTEMS)
def test_empty_rank_grad_cache_step_equals_one_process_on_the_other_batch(
    system: str, ranks: list[dict], alone: dict
) -> None:
    (empty, full), one = (r["cached"][system] for r in ranks), alone[system]
    assert empty["loss"] == 0.0 and (empty["loss"] + full["loss"]) / 2 == pytest.approx(one["loss"], rel=1e-5)
    for rank in (empty, full):
        assert rank["gathers"] == ONE_PAIR_GATHERS
        assert rank["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, **TOL, msg=name)


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_empty_rank_validation_equals_one_process_on_the_other_batch(
    system: str, ranks: list[dict], alone: dict
) -> None:
    (empty, full), one = (r[system] for r in ranks), alone[system]
    recalls = {k for k, _, _ in one["logged"] if "_R@" in k}
    assert len(recalls) >= 6  # R@1, 5, 10 both ways (tri-modal: of both pairs)
    for key in recalls:
        expected = logged_values(one, key)
        assert logged_values(empty, key) == pytest.approx(expected) and logged_values(full, key) == expected
    if system == "trimodal":  # the per-task means are torchmetrics', synced across ranks
        for key in ("val/image_text_loss", "val/speech_text_loss", "val/loss"):
            ((expected, _),) = logged_values(one, key)
            assert [v for r in (empty, full) for v, _ in logged_values(r, key)] == pytest.approx(
                [expected] * 2, rel=1e-5
            )
        return
    # Lightning's epoch mean of `val/loss`: each rank's value weighted by its batch size
    (loss0, rows0), (loss1, rows1) = (logged_values(r, "val/loss")[0] for r in (empty, full))
    assert rows0 == 0 and rows1 > 0
    ((expected, _),) = logged_values(one, "val/loss")
    assert (loss0 * rows0 + loss1 * rows1) / (rows0 + rows1) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_the_empty_batch_is_counted_in_the_logs(system: str, ranks: list[dict], alone: dict) -> None:
    tasks = ("image_text_", "speech_text_") if system == "trimodal" else ("",)
    for stage in ("train", "val"):
        for task in tasks:
            key = f"{stage}/{task}empty_batches"
            counts = [logged_values(r[system], key) for r in ranks]
            assert counts == [[(1.0, None)], [(0.0, None)]]  # summed over ranks and steps by Lightning: 1
            assert logged_values(ranks[0][system], f"{stage}/{task}skipped_items") == [(3.0, None)]
            assert logged_values(alone[system], key) == [(0.0, None)]
