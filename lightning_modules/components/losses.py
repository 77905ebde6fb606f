"""Contrastive and metric-learning losses shared by the image-text and speech-text tasks.

Every loss has the call signature ``loss(a, b, logit_scale, logit_bias=None, ids=None, *, sizes=None)``:
``a``, ``b`` are L2-normalised (B, D) embeddings, row i of ``a`` pairing with row i of ``b``; logits are
``logit_scale * a @ b.T`` (+ ``logit_bias`` for SigLIP; Triplet, N-pair and Circle use raw cosines); rows with
equal ``ids`` are mutual positives, never each other's negatives; ``sizes`` are the ranks' row counts when the
caller has gathered them already. With ``gather=True`` and several ranks, each rank scores its rows against
the columns of every rank (gathered with gradient) and normalises by its local rows, so DDP's average
reproduces the single-process loss and gradient, uneven row counts included."""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "LOSSES",
    "CircleLoss",
    "InfoNCELoss",
    "NPairLoss",
    "PairwiseLoss",
    "SigLIPLoss",
    "TripletLoss",
    "build_loss",
    "gather_no_grad",
    "gather_with_grad",
]


def world_size() -> int:
    """Processes in the default group (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def _rank() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def zero_loss(module: nn.Module) -> Tensor:
    """A loss of exactly zero that reaches every trainable parameter: its backward gives zero gradients, touches
    nothing non-finite, and lets a rank without rows join DDP's gradient all-reduce."""
    return torch.stack([p.sum() * 0.0 for p in module.parameters() if p.requires_grad]).sum()


_host_group: tuple[object, object] | None = None  # (the default group, its gloo twin)


def _device_backend() -> bool:
    """Whether the default group's collectives run on a device (NCCL and the like), not on the host (gloo)."""
    return dist.get_backend() != "gloo"


def host_group() -> object | None:
    """A gloo group over the default group's ranks, for exchanging host numbers without touching a device; None
    when the default group is gloo already. Made once per default group, at the first call, which every rank
    reaches at the same point (the first contrastive loss)."""
    global _host_group
    if not _device_backend():
        return None
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        _host_group = (dist.group.WORLD, dist.new_group(backend="gloo"))
    return _host_group[1]


def gather_sizes(n: int) -> list[int]:
    """Row counts of every rank (batches may differ, e.g. with duration bucketing). The counts are host numbers,
    so they travel over a CPU (gloo) group: on GPUs an all-gather of device tensors and reading it back would
    wait for every kernel queued so far, once per step."""
    if world_size() == 1:
        return [n]
    mine = torch.tensor([n])
    sizes = [torch.zeros_like(mine) for _ in range(world_size())]
    dist.all_gather(sizes, mine, group=host_group())
    return [int(s) for s in sizes]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    return torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])]) if rows > x.shape[0] else x


def gather_with_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0, keeping the autograd graph.

    The backward pass sums the incoming gradients of each slice onto the rank that owns it. Ranks may hold
    different numbers of rows (`sizes`, from `gather_sizes`): rows are padded to the largest count for the
    collective and the padding is cut away again. Identity when not distributed or with world size 1.
    """
    if world_size() == 1:
        return x
    sizes = sizes or gather_sizes(x.shape[0])
    parts = dist_fn.all_gather(_pad_rows(x.contiguous(), max(sizes)))
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def gather_no_grad(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Concatenate ``x`` from all ranks along dim 0 without gradient (for ids, labels); uneven sizes allowed.

    Identity when not distributed or with world size 1.
    """
    if world_size() == 1:
        return x
    sizes = sizes or gather_sizes(x.shape[0])
    x = _pad_rows(x.contiguous(), max(sizes))
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


def _similarity(x: Tensor, y: Tensor) -> Tensor:
    """``x @ y.T``, upcast from half precision: softmax/sigmoid over thousands of logits needs fp32 range."""
    sim = x @ y.T
    return sim.float() if sim.dtype in (torch.float16, torch.bfloat16) else sim


class _Columns(NamedTuple):
    """Local rows (B) against the columns (N = W*B when gathering, else B)."""

    a_cols: Tensor  # (N, D)
    b_cols: Tensor  # (N, D)
    pos: Tensor  # (B,) column index of each row's own pair
    diag: Tensor  # (B, N) bool, True at (i, pos[i])
    same: Tensor  # (B, N) bool, True where the column shares the row's id (superset of diag)


class PairwiseLoss(nn.Module):
    """Base class: builds the local-rows x global-columns geometry shared by all losses."""

    def __init__(self, gather: bool = True) -> None:
        super().__init__()
        self.gather = gather

    def _columns(self, a: Tensor, b: Tensor, ids: Tensor | None, sizes: list[int] | None = None) -> _Columns:
        """Gather the columns and build the masks of local rows against them. `sizes` (every rank's row count),
        when given, are used instead of an all-gather of the row counts."""
        if a.shape != b.shape or a.dim() != 2:
            raise ValueError(f"a and b must both be (B, D), got {tuple(a.shape)} and {tuple(b.shape)}")
        batch = a.shape[0]
        distributed = self.gather and world_size() > 1
        if not distributed:
            sizes = [batch]
        elif sizes is None:
            sizes = gather_sizes(batch)
        elif len(sizes) != world_size() or sizes[_rank()] != batch:
            raise ValueError(
                f"sizes {list(sizes)} must hold the row count of each of the {world_size()} ranks, this rank's "
                f"(rank {_rank()}) being {batch}"
            )
        a_cols = gather_with_grad(a, sizes) if distributed else a
        b_cols = gather_with_grad(b, sizes) if distributed else b
        offset = sum(sizes[: _rank()]) if distributed else 0  # this rank's first global column

        pos = torch.arange(batch, device=a.device) + offset
        diag = torch.arange(a_cols.shape[0], device=a.device)[None, :] == pos[:, None]
        if ids is None:
            same = diag
        else:
            if ids.shape != (batch,):
                raise ValueError(f"ids must have shape ({batch},), got {tuple(ids.shape)}")
            ids_cols = gather_no_grad(ids, sizes) if distributed else ids
            same = ids[:, None] == ids_cols[None, :]
        return _Columns(a_cols, b_cols, pos, diag, same)

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        ids: Tensor | None = None,
        *,
        sizes: list[int] | None = None,
    ) -> Tensor:
        """Mean per-anchor loss, averaged over the a->b and b->a directions."""
        cols = self._columns(a, b, ids, sizes)
        a2b = self._per_anchor(_similarity(a, cols.b_cols), cols, logit_scale)
        b2a = self._per_anchor(_similarity(b, cols.a_cols), cols, logit_scale)
        reg = self._regulariser(a, b)
        return 0.5 * (a2b.mean() + b2a.mean()) + reg

    def _per_anchor(self, sim: Tensor, cols: _Columns, logit_scale: Tensor | float) -> Tensor:
        """Loss of each local anchor (B,) from its cosine similarities ``sim`` (B, N) to all columns."""
        raise NotImplementedError

    def _regulariser(self, a: Tensor, b: Tensor) -> Tensor | float:
        return 0.0


class InfoNCELoss(PairwiseLoss):
    """Symmetric CLIP / InfoNCE loss.

    For anchor i with logits ``z_ij = t * a_i . b_j``:  ``-z_ii + log sum_{j: j == i or id_j != id_i} exp(z_ij)``,
    i.e. cross-entropy with the own pair as target and same-id columns removed from the denominator.
    """

    def _per_anchor(self, sim: Tensor, cols: _Columns, logit_scale: Tensor | float) -> Tensor:
        logits = (logit_scale * sim).masked_fill(cols.same & ~cols.diag, float("-inf"))
        return F.cross_entropy(logits, cols.pos, reduction="none")


class NPairLoss(PairwiseLoss):
    """Multi-class N-pair loss (Sohn, 2016) on cosine similarities, both directions.

    Per anchor: ``log(1 + sum_{j: id_j != id_i} exp(s_ij - s_ii))``. ``l2_reg`` adds
    ``l2_reg * mean_i (|a_i|^2 + |b_i|^2) / 2`` as in the paper; it is a constant for normalised embeddings,
    so it only matters when the caller passes unnormalised ones.
    """

    def __init__(self, l2_reg: float = 0.0, gather: bool = True) -> None:
        super().__init__(gather=gather)
        self.l2_reg = l2_reg

    def _per_anchor(self, sim: Tensor, cols: _Columns, logit_scale: Tensor | float) -> Tensor:
        s_pos = sim.gather(1, cols.pos[:, None])
        diffs = (sim - s_pos).masked_fill(cols.same, float("-inf"))
        # log(1 + sum exp(d)) == logsumexp([0, d...]); the 0 is the positive's own term.
        zero = diffs.new_zeros(diffs.shape[0], 1)
        return torch.logsumexp(torch.cat([zero, diffs], dim=1), dim=1)

    def _regulariser(self, a: Tensor, b: Tensor) -> Tensor | float:
        if self.l2_reg == 0.0:
            return 0.0
        return self.l2_reg * 0.5 * (a.pow(2).sum(1) + b.pow(2).sum(1)).mean()


class TripletLoss(PairwiseLoss):
    """Triplet margin loss on cosine similarities with in-batch negatives, both directions.

    Per anchor: ``relu(margin + s_n - s_p)`` with ``s_p = s_ii`` and ``s_n`` the similarity of the mined negative
    among columns with a different id. ``mining="hardest"`` takes the most similar negative; ``"semihard"``
    (FaceNet) takes the most similar negative that is still less similar than the positive, falling back to the
    hardest when there is none. Anchors without any negative contribute 0.
    """

    def __init__(
        self,
        margin: float = 0.2,
        mining: Literal["hardest", "semihard"] = "hardest",
        gather: bool = True,
    ) -> None:
        super().__init__(gather=gather)
        if mining not in ("hardest", "semihard"):
            raise ValueError(f"mining must be 'hardest' or 'semihard', got {mining!r}")
        self.margin = margin
        self.mining = mining

    def _per_anchor(self, sim: Tensor, cols: _Columns, logit_scale: Tensor | float) -> Tensor:
        s_pos = sim.gather(1, cols.pos[:, None]).squeeze(1)
        negative = ~cols.same
        s_neg = sim.masked_fill(~negative, float("-inf")).amax(dim=1)
        if self.mining == "semihard":
            easier = negative & (sim < s_pos[:, None])
            s_semi = sim.masked_fill(~easier, float("-inf")).amax(dim=1)
            s_neg = torch.where(easier.any(dim=1), s_semi, s_neg)
        loss = F.relu(self.margin + s_neg - s_pos)
        return torch.where(negative.any(dim=1), loss, torch.zeros_like(loss))


class CircleLoss(PairwiseLoss):
    """Circle loss (Sun et al., 2020), pair-wise form, on cosine similarities, both directions.

    Positives of an anchor are all columns with its id (its own pair included), negatives all others::

        L = softplus( logsumexp_n(gamma * a_n * (s_n - D_n)) + logsumexp_p(-gamma * a_p * (s_p - D_p)) )

    with optima ``O_p = 1 + m``, ``O_n = -m``, margins ``D_p = 1 - m``, ``D_n = m`` and detached weights
    ``a_p = relu(O_p - s_p)``, ``a_n = relu(s_n - O_n)``.
    """

    def __init__(self, m: float = 0.25, gamma: float = 64.0, gather: bool = True) -> None:
        super().__init__(gather=gather)
        self.m = m
        self.gamma = gamma

    def _per_anchor(self, sim: Tensor, cols: _Columns, logit_scale: Tensor | float) -> Tensor:
        o_p, o_n = 1.0 + self.m, -self.m
        delta_p, delta_n = 1.0 - self.m, self.m
        # The weights only re-scale each pair's gradient; they are not optimised themselves.
        alpha_p = F.relu(o_p - sim).detach()
        alpha_n = F.relu(sim - o_n).detach()
        logit_p = (-self.gamma * alpha_p * (sim - delta_p)).masked_fill(~cols.same, float("-inf"))
        logit_n = (self.gamma * alpha_n * (sim - delta_n)).masked_fill(cols.same, float("-inf"))
        # An anchor with no negative gets logsumexp = -inf and softplus(-inf) = 0.
        return F.softplus(torch.logsumexp(logit_n, dim=1) + torch.logsumexp(logit_p, dim=1))


class SigLIPLoss(PairwiseLoss):
    """Sigmoid loss of SigLIP (Zhai et al., 2023).

    ``-1/B * sum_{i,j} log sigmoid(z_ij * (t * a_i . b_j + bias))`` with ``z_ij = +1`` when ``id_i == id_j``
    (own pair included) and ``-1`` otherwise. The sum over all pairs is already symmetric in a and b.
    ``logit_bias=None`` means no bias.
    """

    def forward(
        self,
        a: Tensor,
        b: Tensor,
        logit_scale: Tensor | float,
        logit_bias: Tensor | float | None = None,
        ids: Tensor | None = None,
        *,
        sizes: list[int] | None = None,
    ) -> Tensor:
        cols = self._columns(a, b, ids, sizes)
        logits = logit_scale * _similarity(a, cols.b_cols)
        if logit_bias is not None:
            logits = logits + logit_bias
        sign = 2.0 * cols.same.to(logits.dtype) - 1.0
        # Normalising by the local batch makes the mean over ranks equal the single-process loss.
        return -F.logsigmoid(sign * logits).sum() / a.shape[0]


LOSSES: dict[str, type[PairwiseLoss]] = {
    "infonce": InfoNCELoss,
    "siglip": SigLIPLoss,
    "triplet": TripletLoss,
    "npair": NPairLoss,
    "circle": CircleLoss,
}


def build_loss(
    name: Literal["infonce", "siglip", "triplet", "npair", "circle"], **kwargs: object
) -> PairwiseLoss:
    """Instantiate a loss by name; ``kwargs`` go to its constructor (e.g. ``gather``, ``margin``)."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name](**kwargs)
