"""Losses against slow pair-by-pair references, and 2-process gather semantics against one process."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lightning_modules.components import losses
from lightning_modules.components.losses import (
    LOSSES,
    CircleLoss,
    InfoNCELoss,
    NPairLoss,
    SigLIPLoss,
    TripletLoss,
    build_loss,
    gather_no_grad,
    gather_sizes,
    gather_with_grad,
)

# Slow references: python loops over pairs on 0-dim tensors, so autograd also gives reference gradients.


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return sum(x[k] * y[k] for k in range(x.shape[0]))


def _groups(n: int, ids: torch.Tensor | None) -> list[int]:
    return list(range(n)) if ids is None else ids.tolist()


def ref_infonce(a, b, scale, ids=None):
    g = _groups(len(a), ids)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            terms = [scale * _dot(x[i], y[j]) for j in range(len(y)) if j == i or g[j] != g[i]]
            total = total - scale * _dot(x[i], y[i]) + torch.log(sum(torch.exp(t) for t in terms))
    return total / (2 * len(a))


def ref_siglip(a, b, scale, bias, ids=None):
    g = _groups(len(a), ids)
    total = 0.0
    for i in range(len(a)):
        for j in range(len(b)):
            z = 1.0 if g[i] == g[j] else -1.0
            total = total - torch.log(torch.sigmoid(z * (scale * _dot(a[i], b[j]) + bias)))
    return total / len(a)


def ref_triplet(a, b, margin, mining, ids=None):
    g = _groups(len(a), ids)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            s_p = _dot(x[i], y[i])
            negs = [_dot(x[i], y[j]) for j in range(len(y)) if g[j] != g[i]]
            if not negs:
                continue
            s_n = max(negs, key=lambda s: s.item())
            if mining == "semihard":
                easier = [s for s in negs if s.item() < s_p.item()]
                if easier:
                    s_n = max(easier, key=lambda s: s.item())
            total = total + torch.clamp(margin + s_n - s_p, min=0.0)
    return total / (2 * len(a))


def ref_npair(a, b, l2_reg, ids=None):
    g = _groups(len(a), ids)
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            s_ii = _dot(x[i], y[i])
            inner = 1.0
            for j in range(len(y)):
                if g[j] != g[i]:
                    inner = inner + torch.exp(_dot(x[i], y[j]) - s_ii)
            total = total + torch.log(torch.as_tensor(inner, dtype=a.dtype))
    reg = sum(_dot(a[i], a[i]) + _dot(b[i], b[i]) for i in range(len(a))) / (2 * len(a))
    return total / (2 * len(a)) + l2_reg * reg


def ref_circle(a, b, m, gamma, ids=None):
    g = _groups(len(a), ids)
    o_p, o_n, d_p, d_n = 1 + m, -m, 1 - m, m
    total = 0.0
    for x, y in ((a, b), (b, a)):
        for i in range(len(x)):
            sum_p, sum_n = 0.0, 0.0
            for j in range(len(y)):
                s = _dot(x[i], y[j])
                if g[j] == g[i]:
                    alpha = torch.clamp(o_p - s, min=0.0).detach()
                    sum_p = sum_p + torch.exp(-gamma * alpha * (s - d_p))
                else:
                    alpha = torch.clamp(s - o_n, min=0.0).detach()
                    sum_n = sum_n + torch.exp(gamma * alpha * (s - d_n))
            total = total + torch.log(1 + sum_n * sum_p)
    return total / (2 * len(a))


SCALE, BIAS = 5.0, -2.0

# name -> (loss module, reference(a, b, ids))
CASES = {
    "infonce": (InfoNCELoss(), lambda a, b, ids: ref_infonce(a, b, SCALE, ids)),
    "siglip": (SigLIPLoss(), lambda a, b, ids: ref_siglip(a, b, SCALE, BIAS, ids)),
    "triplet_hardest": (
        TripletLoss(margin=0.2, mining="hardest"),
        lambda a, b, ids: ref_triplet(a, b, 0.2, "hardest", ids),
    ),
    "triplet_semihard": (
        TripletLoss(margin=0.2, mining="semihard"),
        lambda a, b, ids: ref_triplet(a, b, 0.2, "semihard", ids),
    ),
    "npair": (NPairLoss(l2_reg=0.01), lambda a, b, ids: ref_npair(a, b, 0.01, ids)),
    "circle": (CircleLoss(m=0.25, gamma=64.0), lambda a, b, ids: ref_circle(a, b, 0.25, 64.0, ids)),
}

REPEATED_IDS = torch.tensor([3, 1, 3, 0, 1, 2, 3, 5])


def _embeddings(batch: int = 8, dim: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    a = F.normalize(torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    # Correlate b with a so positives beat some negatives and every mining branch is exercised.
    b = F.normalize(a + 0.8 * torch.randn(batch, dim, generator=gen, dtype=torch.float64), dim=1)
    return a.requires_grad_(), b.requires_grad_()


@pytest.mark.parametrize("ids", [None, REPEATED_IDS], ids=["unique", "repeated"])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_pairwise_reference(name, ids):
    loss_fn, reference = CASES[name]
    a, b = _embeddings()
    loss = loss_fn(
        a, b, torch.tensor(SCALE, dtype=torch.float64), torch.tensor(BIAS, dtype=torch.float64), ids=ids
    )
    grads = torch.autograd.grad(loss, (a, b))
    expected = reference(a, b, ids)
    expected_grads = torch.autograd.grad(expected, (a, b))
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=1e-9, atol=1e-9)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_gradients_finite_with_degenerate_ids(name):
    # All rows in one group: no negatives at all, the hardest case for the -inf masking.
    loss_fn, _ = CASES[name]
    a, b = _embeddings(batch=4)
    for ids in (torch.zeros(4, dtype=torch.long), torch.tensor([0, 0, 1, 1]), None):
        loss = loss_fn(a, b, torch.tensor(SCALE), torch.tensor(BIAS), ids=ids)
        grads = torch.autograd.grad(loss, (a, b))
        assert torch.isfinite(loss)
        assert all(torch.isfinite(g).all() for g in grads)


def test_triplet_semihard_falls_back_to_hardest():
    # Positives are orthogonal (s_p = 0) while every negative has s = 1 > s_p: no semi-hard negative exists,
    # so both minings pick s_n = 1 and the loss is margin + 1 - 0 in both directions.
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    for mining in ("semihard", "hardest"):
        torch.testing.assert_close(TripletLoss(margin=0.2, mining=mining)(a, b, 1.0), torch.tensor(1.2))


def test_infonce_equals_clip_cross_entropy():
    a, b = _embeddings(batch=16, dim=8, seed=1)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * a @ b.T
    labels = torch.arange(16)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    ids = torch.arange(16) + 100  # distinct ids behave like no ids
    # float64 sums in another order than F.cross_entropy's: ~1e-15
    torch.testing.assert_close(InfoNCELoss()(a, b, scale), clip, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(InfoNCELoss()(a, b, scale, ids=ids), clip, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", ["infonce", "npair"])
def test_chance_level_is_log_batch(name):
    # Independent random embeddings in high dimension are near-orthogonal: every logit ~0 at scale 1,
    # so the softmax is uniform and the loss is log(B).
    gen = torch.Generator().manual_seed(0)
    batch = 64
    a = F.normalize(torch.randn(batch, 4096, generator=gen), dim=1)
    b = F.normalize(torch.randn(batch, 4096, generator=gen), dim=1)
    loss = build_loss(name)(a, b, torch.tensor(1.0))
    assert abs(loss.item() - math.log(batch)) < 0.02


def test_siglip_without_bias_and_build_loss():
    a, b = _embeddings(batch=4)
    # float64 sums in another order than the reference's loops: ~1e-15
    torch.testing.assert_close(SigLIPLoss()(a, b, 3.0), ref_siglip(a, b, 3.0, 0.0), rtol=1e-9, atol=1e-9)
    assert set(LOSSES) == {"infonce", "siglip", "triplet", "npair", "circle"}
    loss = build_loss("triplet", margin=0.5, mining="semihard", gather=False)
    assert (
        isinstance(loss, TripletLoss) and loss.margin == 0.5 and loss.mining == "semihard" and not loss.gather
    )
    with pytest.raises(ValueError):
        build_loss("contrastive")
    with pytest.raises(ValueError):
        TripletLoss(mining="easy")


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    ids = torch.arange(3)
    assert gather_no_grad(ids) is ids


# --- 2 ranks x B must equal 1 rank x 2B (loss averaged over ranks, grads averaged as DDP does) ---

WORLD, HALF, IN_DIM, EMB_DIM = 2, 4, 5, 3
DIST_IDS = {
    "unique": None,
    # groups 7 and 2 each have members on both ranks (rank 0 holds rows 0-3, rank 1 rows 4-7)
    "spanning": torch.tensor([7, 2, 9, 7, 2, 4, 7, 6]),
}
DIST_LOSSES = ["infonce", "siglip", "triplet", "circle", "npair"]


def _dist_problem(
    loss_name: str, rows: slice, ids: torch.Tensor | None, weight: float = 1.0, sizes: list[int] | None = None
):
    """Loss and parameter gradients of a tiny two-tower model on the given rows of a fixed batch; `sizes`: the
    ranks' row counts, passed to the loss (None: it gathers them)."""
    gen = torch.Generator().manual_seed(0)
    proj_a = torch.nn.Linear(IN_DIM, EMB_DIM, dtype=torch.float64)
    proj_b = torch.nn.Linear(IN_DIM, EMB_DIM, dtype=torch.float64)
    for p in [*proj_a.parameters(), *proj_b.parameters()]:
        p.data.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    log_scale = torch.nn.Parameter(torch.tensor(math.log(4.0), dtype=torch.float64))
    bias = torch.nn.Parameter(torch.tensor(-1.0, dtype=torch.float64))
    x_a = torch.randn(2 * HALF, IN_DIM, generator=gen, dtype=torch.float64)
    x_b = x_a + 0.5 * torch.randn(2 * HALF, IN_DIM, generator=gen, dtype=torch.float64)
    params = [*proj_a.parameters(), *proj_b.parameters(), log_scale, bias]

    a = F.normalize(proj_a(x_a[rows]), dim=1)
    b = F.normalize(proj_b(x_b[rows]), dim=1)
    loss_fn = build_loss(loss_name, gather=True)
    loss = weight * loss_fn(a, b, log_scale.exp(), bias, ids=None if ids is None else ids[rows], sizes=sizes)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    return loss.detach(), grads


def _dist_worker(rank: int, init_file: str, out_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    results = {}
    rows = slice(rank * HALF, (rank + 1) * HALF)
    for loss_name in DIST_LOSSES:
        for ids_name, ids in DIST_IDS.items():
            loss, grads = _dist_problem(loss_name, rows, ids)
            dist.all_reduce(loss)
            for g in grads:  # DDP averages gradients over ranks
                dist.all_reduce(g)
            results[loss_name, ids_name] = (loss / WORLD, [g / WORLD for g in grads])
        # uneven batches (as duration bucketing gives): rank 0 holds 3 rows, rank 1 holds 5; weighting each
        # rank's mean by its row count must give the one-process sum over all 8 rows
        uneven = slice(0, 3) if rank == 0 else slice(3, 2 * HALF)
        n = uneven.stop - uneven.start
        loss, grads = _dist_problem(loss_name, uneven, DIST_IDS["spanning"], weight=n)
        dist.all_reduce(loss)
        for g in grads:
            dist.all_reduce(g)
        results[loss_name, "uneven"] = (loss, grads)
        # the row counts handed in (as the contrastive step does) instead of gathered: the same loss
        loss, _ = _dist_problem(loss_name, uneven, DIST_IDS["spanning"], weight=n, sizes=[3, 2 * HALF - 3])
        dist.all_reduce(loss)
        results[loss_name, "uneven-sizes"] = loss
        try:  # counts that do not match this rank's rows are refused before any collective
            _dist_problem(loss_name, uneven, DIST_IDS["spanning"], sizes=[HALF, HALF])
        except ValueError as err:
            results[loss_name, "wrong-sizes"] = str(err)
    # as under NCCL: the row counts travel over a gloo twin of the default group, made once
    losses._device_backend = lambda: True
    made, new_group = [], dist.new_group
    losses.dist.new_group = lambda **kwargs: made.append(kwargs) or new_group(**kwargs)
    n = 3 if rank == 0 else 2 * HALF - 3
    results["host-sizes"] = [gather_sizes(n), gather_sizes(n)]
    results["host-groups"] = len(made)
    results["host-loss"] = _dist_problem("infonce", uneven, DIST_IDS["spanning"], weight=n)[0]
    dist.all_reduce(results["host-loss"])
    if rank == 0:
        torch.save(results, out_file)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    out_file = str(tmp / "results.pt")
    for attempt in range(2):
        try:
            mp.spawn(_dist_worker, args=(str(tmp / f"init{attempt}"), out_file), nprocs=WORLD, join=True)
            break
        except mp.ProcessExitedException as err:
            # rank 0 writes the results after the last collective, so both ranks computed them; gloo's teardown
            # can still abort a process at exit (std::terminate in its thread) on a loaded machine. A process
            # killed before that is run once more; a Python error in a worker is raised as it is.
            if os.path.exists(out_file):
                break
            if attempt == 1:
                raise err
    return torch.load(out_file)


@pytest.mark.parametrize("ids_name", list(DIST_IDS))
@pytest.mark.parametrize("loss_name", DIST_LOSSES)
def test_two_ranks_match_one_process(two_rank_results, loss_name, ids_name):
    dist_loss, dist_grads = two_rank_results[loss_name, ids_name]
    loss, grads = _dist_problem(loss_name, slice(None), DIST_IDS[ids_name])
    torch.testing.assert_close(dist_loss, loss, rtol=0, atol=1e-6)
    for got, want in zip(dist_grads, grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in grads)  # the comparison is not vacuous


@pytest.mark.parametrize("loss_name", DIST_LOSSES)
def test_uneven_rank_batches_gather_every_column(two_rank_results, loss_name):
    dist_sum, dist_grads = two_rank_results[loss_name, "uneven"]
    loss, grads = _dist_problem(loss_name, slice(None), DIST_IDS["spanning"])
    torch.testing.assert_close(dist_sum, loss * 2 * HALF, rtol=0, atol=1e-6)
    torch.testing.assert_close(two_rank_results[loss_name, "uneven-sizes"], dist_sum, rtol=0, atol=1e-12)
    assert "must hold the row count of each of the 2 ranks" in two_rank_results[loss_name, "wrong-sizes"]
    for got, want in zip(dist_grads, grads):
        torch.testing.assert_close(got, want * 2 * HALF, rtol=0, atol=1e-6)


def test_row_counts_travel_over_a_host_group_made_once(two_rank_results):
    """Under a device backend (NCCL) the row counts go over one gloo twin of the default group: the same
    counts, the same loss, and no device tensor read back on the host."""
    assert two_rank_results["host-sizes"] == [[3, 2 * HALF - 3]] * 2
    assert two_rank_results["host-groups"] == 1
    torch.testing.assert_close(
        two_rank_results["host-loss"], two_rank_results["infonce", "uneven"][0], rtol=0, atol=1e-12
    )
