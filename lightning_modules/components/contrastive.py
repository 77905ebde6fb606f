"""The contrastive core every alignment system shares: two towers in one joint space, a learnable temperature,
a loss from the one loss library and the one retrieval metric.

A `ContrastivePair` subclass registers its two towers and says how a batch becomes `PairEmbeddings` (`embed`);
this class normalises, scores and evaluates. A rank whose batch has zero rows (every item failed to decode)
still runs every collective of the step, so the other ranks never wait on it. Training weights rank r's loss
by W * n_r / N (W ranks, n_r local rows, N rows in all), so DDP's gradient average is the gradient of the mean
over all N rows, whether the ranks hold equal, uneven or zero rows."""

from __future__ import annotations

import math
from collections.abc import MutableMapping
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.losses import build_loss, gather_sizes, zero_loss
from lightning_modules.components.retrieval import RetrievalRecall
from lightning_modules.components.towers import keep_locked_in_eval

LossName = Literal["infonce", "siglip", "triplet", "npair", "circle"]
C = TypeVar("C")


@dataclass
class ContrastiveLossConfig:
    """The loss of the shared loss library and the learnable temperature it is scaled by."""

    name: LossName = "infonce"
    """Loss: infonce (CLIP), siglip, triplet, npair or circle."""
    options: dict[str, Any] = field(default_factory=dict)
    """Extra arguments of the loss, e.g. {gather: false} (no cross-rank negatives) or {margin: 0.2}."""
    init_logit_scale: float = 1 / 0.07
    """Initial inverse temperature (CLIP: 1 / 0.07); learned in log space."""
    max_logit_scale: float = 100.0
    """Clamp of the inverse temperature (CLIP: 100)."""
    init_logit_bias: float | None = None
    """Initial logit bias (SigLIP: -10); None for no bias."""


def as_config(cls: type[C], value: C | dict[str, Any]) -> C:
    """A config section as its dataclass: checkpoints store the sections as plain dicts."""
    return value if isinstance(value, cls) else cls(**value)


def plain_sections(hparams: MutableMapping[str, Any]) -> None:
    """Config sections saved as hyperparameters become plain dicts, in place: a checkpoint then loads with
    `torch.load(weights_only=True)` and its hparams.yaml reads back without this code."""
    for key, value in hparams.items():
        if is_dataclass(value) and not isinstance(value, type):
            hparams[key] = asdict(value)


@dataclass
class PairEmbeddings:
    """Both sides of a batch. Row i of `a` pairs with row `pair_index[i]` of `b` for the loss.

    Training batches are 1:1 (`pair_index` = None). Evaluation batches may hold one image and all its
    captions; then `b` has more rows and `pair_index` picks one caption per image for the loss.
    `groups` mark positives: equal group ids are the same image / the same transcript.
    """

    a: Tensor
    b: Tensor
    a_keys: Tensor
    a_groups: Tensor
    b_keys: Tensor
    b_groups: Tensor
    pair_index: Tensor | None = None


class ContrastivePair(nn.Module):
    """Two towers (registered by the subclass), the temperature, the loss and a retrieval metric per stage."""

    rows_key: str = ""
    """The batch entry with one item per row: its length is the batch's row count (0 for an empty batch)."""
    row_keys: tuple[str, ...] = ()
    """Entries of a training batch with one item per row, which gradient caching cuts into chunks."""
    sides: tuple[str, str] = ("a", "b")
    """What the two sides' items are, as results.json counts them ("images", "captions")."""

    def __init__(self, embed_dim: int, loss: ContrastiveLossConfig, prefixes: tuple[str, str]) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.loss_fn = build_loss(loss.name, **loss.options)
        # the temperature is learned in log space: τ⁻¹ = exp(log_scale), clamped at max_logit_scale. It and the
        # bias are one-element vectors, not scalars: FSDP2 shards parameters along a dimension
        self.log_scale = nn.Parameter(torch.tensor([math.log(loss.init_logit_scale)]))
        self.logit_bias = (
            nn.Parameter(torch.tensor([float(loss.init_logit_bias)]))
            if loss.init_logit_bias is not None
            else None
        )
        self.register_load_state_dict_pre_hook(_one_element_temperature)
        self.max_log_scale = math.log(loss.max_logit_scale)
        self.prefixes = prefixes
        self.retrieval = nn.ModuleDict(
            {
                stage: RetrievalRecall(prefix_a2b=prefixes[0], prefix_b2a=prefixes[1])
                for stage in ("val", "test")
            }
        )

    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        """Both sides' embeddings (not normalised) of a batch with at least one row."""
        raise NotImplementedError

    def train(self, mode: bool = True) -> ContrastivePair:
        super().train(mode)
        keep_locked_in_eval(self)  # locked towers and blocks keep dropout off and norm statistics fixed
        return self

    @property
    def logit_scale(self) -> Tensor:
        """τ⁻¹, a scalar."""
        return self.log_scale.clamp(max=self.max_log_scale).exp().reshape(())

    @property
    def scalar_bias(self) -> Tensor | None:
        """SigLIP's logit bias as a scalar; None without one."""
        return None if self.logit_bias is None else self.logit_bias.reshape(())

    def rows(self, batch: dict) -> int:
        return len(batch[self.rows_key])

    def embeddings(self, batch: dict, stage: str) -> PairEmbeddings:
        """`embed`, or for an empty batch zero rows that reach every parameter (see the module doc)."""
        if self.rows(batch):
            return self.embed(batch, stage)
        device = self.log_scale.device
        none = torch.zeros(0, self.embed_dim, device=device) + zero_loss(self)
        ids = torch.zeros(0, dtype=torch.long, device=device)
        return PairEmbeddings(none, none, ids, ids, ids, ids)

    def loss(self, e: PairEmbeddings, sizes: list[int] | None = None) -> Tensor:
        """This rank's loss, the mean over its rows against the columns of every rank; 0 without rows. `sizes`:
        every rank's row count (`row_counts`) when the caller has them, else the loss gathers them."""
        a = F.normalize(e.a.float(), dim=-1)
        b = F.normalize(e.b.float(), dim=-1)
        if e.pair_index is not None:
            b = b[e.pair_index]
        loss = self.loss_fn(a, b, self.logit_scale, self.scalar_bias, ids=e.a_groups, sizes=sizes)
        # over zero rows the library's mean is 0 / 0; its gathers have run, and the gradient stays connected
        return torch.nan_to_num(loss, nan=0.0) if len(a) == 0 else loss

    def training_loss(self, batch: dict) -> tuple[Tensor, int]:
        """The loss this rank backpropagates, weighted by W * n_r / N (module doc), and its row count."""
        rows = self.rows(batch)
        sizes = self.row_counts(rows)  # the step's one gather of the row counts, for the loss and the weight
        return self.loss(self.embeddings(batch, "train"), sizes) * self.rank_weight(rows, sizes), rows

    def row_counts(self, rows: int) -> list[int]:
        """Every rank's row count: one all-gather of host numbers under torch.distributed (over a CPU group, no
        device sync), [rows] alone."""
        return gather_sizes(rows)

    @staticmethod
    def rank_weight(rows: int, sizes: list[int]) -> float:
        """W * n_r / N (module doc) of this rank's `rows`, from every rank's row count `sizes` (`row_counts`)."""
        total = sum(sizes)
        return len(sizes) * rows / total if total else 0.0

    def evaluate(self, batch: dict, stage: str) -> tuple[Tensor, PairEmbeddings]:
        """The batch's loss (unweighted: the epoch mean weights it by the row count) and its unit embeddings,
        added to the stage's retrieval metric."""
        e = self.embeddings(batch, stage)
        loss = self.loss(e)
        a = F.normalize(e.a.float(), dim=-1)
        b = F.normalize(e.b.float(), dim=-1)
        self.retrieval[stage].update(a, e.a_keys, e.a_groups, b, e.b_keys, e.b_groups)
        return loss.detach(), PairEmbeddings(a, b, e.a_keys, e.a_groups, e.b_keys, e.b_groups, e.pair_index)

    def split_batch(self, batch: dict, chunks: int) -> list[dict]:
        """Up to `chunks` consecutive, non-empty, near-equal row ranges of a training batch; entries not in
        `row_keys` (e.g. the count of skipped items) are shared by all chunks."""
        rows = self.rows(batch)
        bounds = [i * rows // chunks for i in range(chunks + 1)]
        return [
            {k: v[lo:hi] if k in self.row_keys else v for k, v in batch.items()}
            for lo, hi in zip(bounds, bounds[1:])
            if hi > lo
        ]


def _one_element_temperature(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Checkpoints that hold the temperature and the bias as scalars load into their one-element vectors."""
    for name in ("log_scale", "logit_bias"):
        value = state_dict.get(prefix + name)
        if isinstance(value, Tensor) and value.ndim == 0:
            state_dict[prefix + name] = value.reshape(1)
