"""A rank whose whole batch failed to decode, under DDP with the loss gathering negatives across ranks.

Two gloo processes run the image-text system's own training and validation steps (the contrastive core's gather
path) with rank 0's batch empty; a single process runs them on rank 1's batch alone. The empty rank must join
every collective (else the other rank waits forever), contribute zero rows, and leave the loss, the gradients and
the retrieval figures those of the single process. A hang fails the test at its deadline instead of blocking.
"""

from __future__ import annotations

import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule

VOCAB = 50
DEADLINE_S = 90  # a hang would otherwise block the suite; a normal run takes a few seconds
TOL = dict(rtol=1e-5, atol=1e-5)


def tiny_module() -> ImageTextModule:
    torch.manual_seed(0)
    image = ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2)
    text = TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16)
    return ImageTextModule(vocab_size=VOCAB, embed_dim=16, image=image, text=text)


def batches(empty: bool) -> tuple[dict, dict]:
    """A training batch (4 pairs, two captions of image 1) and an evaluation batch (2 images, 5 captions); both
    with zero rows, as the collate gives them, when every image failed to decode."""
    g = torch.Generator().manual_seed(1)
    train = {
        "images": torch.randn(4, 3, 16, 16, generator=g),
        "input_ids": torch.randint(5, VOCAB, (4, 6), generator=g),
        "attention_mask": torch.ones(4, 6, dtype=torch.bool),
        "image_ids": torch.tensor([1, 2, 1, 3]),
        "caption_ids": torch.arange(100, 104),
        "skipped": 0,
    }
    val = {
        "images": torch.randn(2, 3, 16, 16, generator=g),
        "input_ids": torch.randint(5, VOCAB, (5, 6), generator=g),
        "attention_mask": torch.ones(5, 6, dtype=torch.bool),
        "image_ids": torch.tensor([7, 8]),
        "caption_ids": torch.arange(200, 205),
        "caption_image_ids": torch.tensor([7, 7, 7, 8, 8]),
        "skipped": 0,
    }
    if empty:
        for batch in (train, val):
            for key, value in batch.items():
                batch[key] = value[:0] if key != "input_ids" and torch.is_tensor(value) else value
            batch["input_ids"] = torch.empty(0, 0, dtype=torch.long)
            batch["attention_mask"] = torch.empty(0, 0, dtype=torch.bool)
            batch["skipped"] = 3
    return train, val


class TrainingStep(nn.Module):
    """The module's training_step as DDP's forward, so DDP all-reduces the gradients as under Lightning."""

    def __init__(self, module: ImageTextModule) -> None:
        super().__init__()
        self.module = module

    def forward(self, batch: dict) -> torch.Tensor:
        return self.module.training_step(batch, 0)


def run_steps(module: ImageTextModule, train: dict, val: dict, ddp: bool) -> dict:
    """One training step (loss, gradients) and one validation step (retrieval), with what the module logs."""
    logged: list[tuple[str, float, int | None]] = []
    module.log = lambda name, value, batch_size=None, **kw: logged.append((name, float(value), batch_size))
    step = DistributedDataParallel(TrainingStep(module)) if ddp else module.training_step
    loss = step(train) if ddp else step(train, 0)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.requires_grad}
    module.eval()
    with torch.no_grad():
        module.validation_step(val, 0)
    retrieval = {k: v.item() for k, v in module.pair.retrieval["val"].compute().items()}  # syncs across ranks
    return {"loss": loss.item(), "grads": grads, "retrieval": retrieval, "logged": logged}


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=2, timeout=timedelta(seconds=60)
    )
    train, val = batches(empty=rank == 0)
    torch.save(run_steps(tiny_module().train(), train, val, ddp=True), Path(out_dir) / f"rank{rank}.pt")
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
            pytest.fail(
                f"the 2-rank step with one empty batch did not finish in {DEADLINE_S} s: a rank hangs"
            )
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.fixture(scope="module")
def alone() -> dict:
    train, val = batches(empty=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run_steps(tiny_module().train(), train, val, ddp=False)
    finally:
        torch.set_num_threads(threads)


def test_empty_rank_training_step_equals_one_process_on_the_other_batch(
    ranks: list[dict], alone: dict
) -> None:
    empty, full = ranks
    assert empty["loss"] == 0.0
    # the mean of the ranks' losses is what DDP optimises, and what `train/loss` logs (synced)
    assert (empty["loss"] + full["loss"]) / 2 == pytest.approx(alone["loss"], rel=1e-5)
    logged = [logged_values(r, "train/loss")[0][0] for r in ranks]
    assert sum(logged) / 2 == pytest.approx(alone["loss"], rel=1e-5)
    for rank in ranks:  # DDP's averaged gradients, identical on both ranks
        assert rank["grads"].keys() == alone["grads"].keys()
        for name, grad in alone["grads"].items():
            torch.testing.assert_close(rank["grads"][name], grad, **TOL, msg=name)
    assert alone["grads"]["pair.log_scale"].abs() > 0  # a gradient that could be wrong, not all zeros


def test_empty_rank_validation_equals_one_process_on_the_other_batch(ranks: list[dict], alone: dict) -> None:
    # Lightning's epoch mean of `val/loss`: each rank's value weighted by its batch size
    (loss0, rows0), (loss1, rows1) = (logged_values(r, "val/loss")[0] for r in ranks)
    assert rows0 == 0 and rows1 == 2
    ((expected, _),) = logged_values(alone, "val/loss")
    assert (loss0 * rows0 + loss1 * rows1) / (rows0 + rows1) == pytest.approx(expected, rel=1e-5)
    for rank in ranks:
        assert rank["retrieval"] == pytest.approx(alone["retrieval"], rel=1e-6)
    assert 0 < alone["retrieval"]["i2t_R@1"] <= 1


def test_the_empty_batch_is_counted_in_the_logs(ranks: list[dict], alone: dict) -> None:
    for stage in ("train", "val"):
        counts = [logged_values(r, f"{stage}/empty_batches") for r in ranks]
        assert counts == [[(1.0, None)], [(0.0, None)]]  # summed over ranks and steps by Lightning: 1
        assert logged_values(ranks[0], f"{stage}/skipped_items") == [(3.0, None)]
        assert logged_values(alone, f"{stage}/empty_batches") == [(0.0, None)]
