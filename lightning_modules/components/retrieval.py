"""Cross-modal retrieval Recall@K, shared by image-text (COCO) and speech-text evaluation.

A query is correct at K if any gallery item of the same group ranks within its top K by cosine similarity.
Groups express "which items count as a match": for COCO an image and its captions share group = image_id;
for speech an utterance and every transcript with identical text share group = transcript id.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["RetrievalRecall", "first_occurrence", "mean_recall", "recall_at_k"]


@torch.no_grad()
def recall_at_k(
    query: Tensor,
    gallery: Tensor,
    query_groups: Tensor,
    gallery_groups: Tensor,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Fraction of queries with a same-group gallery item among their top K, for each K in ``ks``.

    Args:
        query: (Q, D) query embeddings.
        gallery: (G, D) gallery embeddings.
        query_groups: (Q,) int64 group id of each query.
        gallery_groups: (G,) int64 group id of each gallery item.
        ks: cut-offs; a K larger than G counts as G.
        chunk_size: queries scored at once; memory is O(chunk_size * G), never O(Q * G).
    """
    if query.shape[0] == 0 or gallery.shape[0] == 0:
        raise ValueError("recall_at_k needs a non-empty query set and gallery")
    if query.shape[0] != query_groups.shape[0] or gallery.shape[0] != gallery_groups.shape[0]:
        raise ValueError("embeddings and group ids must have the same length")
    # Normalising is a no-op for normalised inputs and makes the dot product a cosine otherwise.
    query = F.normalize(query.float(), dim=-1)
    gallery = F.normalize(gallery.float(), dim=-1)
    gallery_groups = gallery_groups.to(query.device)
    query_groups = query_groups.to(query.device)
    max_k = min(max(ks), gallery.shape[0])

    hits = torch.zeros(len(ks), dtype=torch.long, device=query.device)
    for start in range(0, query.shape[0], chunk_size):
        sim = query[start : start + chunk_size] @ gallery.T
        top = sim.topk(max_k, dim=1).indices  # (chunk, max_k), best first
        match = gallery_groups[top] == query_groups[start : start + chunk_size, None]
        for i, k in enumerate(ks):
            hits[i] += match[:, :k].any(dim=1).sum()
    return {k: hits[i].item() / query.shape[0] for i, k in enumerate(ks)}


def mean_recall(recalls: Mapping[str, Tensor]) -> Tensor:
    """The mean of every `..._R@K` value in `recalls` (both directions, every K): the one retrieval score that
    checkpoints monitor (`val/R@mean`, mode max). Unlike the in-batch contrastive loss it does not change with the
    batch size."""
    values = [v.float() for k, v in recalls.items() if "_R@" in k and not k.endswith("R@mean")]
    if not values:
        raise ValueError(f"no R@K value among {sorted(recalls)}")
    return torch.stack(values).mean()


def first_occurrence(keys: Tensor) -> Tensor:
    """Indices of the first occurrence of each distinct key, ordered by key."""
    unique, inverse = torch.unique(keys, return_inverse=True)
    positions = torch.arange(keys.shape[0], device=keys.device)
    first = torch.full((unique.shape[0],), keys.shape[0], dtype=torch.long, device=keys.device)
    return first.scatter_reduce(0, inverse, positions, reduce="amin")


class RetrievalRecall(Metric):
    """Recall@K in both directions between two modalities a and b.

    ``update`` accumulates embeddings with their keys and groups; ``compute`` gathers them from all ranks,
    keeps one row per key on each side (DistributedSampler pads with repeated samples, and an image is repeated
    once per caption in a batch) and returns ``{f"{prefix_a2b}_R@{k}": ..., f"{prefix_b2a}_R@{k}": ...}``.

    COCO: a = images (key = group = image_id), b = captions (key = annotation id, group = image_id).
    Speech: a = utterances, b = transcripts (key = utterance index, group = transcript id on both sides).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(
        self,
        prefix_a2b: str = "a2b",
        prefix_b2a: str = "b2a",
        ks: Sequence[int] = (1, 5, 10),
        chunk_size: int = 1024,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.prefix_a2b = prefix_a2b
        self.prefix_b2a = prefix_b2a
        self.ks = tuple(ks)
        self.chunk_size = chunk_size
        for name in ("a_emb", "a_keys", "a_groups", "b_emb", "b_keys", "b_groups"):
            self.add_state(name, default=[], dist_reduce_fx="cat")
        self.scored: dict[str, int] = {}

    def counts(self) -> dict[str, int]:
        """Distinct items of each side the last `compute` scored ({"a": images, "b": captions} for COCO)."""
        return dict(self.scored)

    def update(
        self,
        a_emb: Tensor,
        a_keys: Tensor,
        a_groups: Tensor,
        b_emb: Tensor,
        b_keys: Tensor,
        b_groups: Tensor,
    ) -> None:
        """Add a batch: ``a_emb`` (Na, D) with (Na,) keys/groups, ``b_emb`` (Nb, D) with (Nb,) keys/groups."""
        if not (a_emb.shape[0] == a_keys.shape[0] == a_groups.shape[0]):
            raise ValueError("a_emb, a_keys and a_groups must have the same length")
        if not (b_emb.shape[0] == b_keys.shape[0] == b_groups.shape[0]):
            raise ValueError("b_emb, b_keys and b_groups must have the same length")
        self.a_emb.append(a_emb.detach())
        self.a_keys.append(a_keys.detach().long())
        self.a_groups.append(a_groups.detach().long())
        self.b_emb.append(b_emb.detach())
        self.b_keys.append(b_keys.detach().long())
        self.b_groups.append(b_groups.detach().long())

    def compute(self) -> dict[str, Tensor]:
        a_keep = first_occurrence(dim_zero_cat(self.a_keys))
        b_keep = first_occurrence(dim_zero_cat(self.b_keys))
        a_emb, a_groups = dim_zero_cat(self.a_emb)[a_keep], dim_zero_cat(self.a_groups)[a_keep]
        b_emb, b_groups = dim_zero_cat(self.b_emb)[b_keep], dim_zero_cat(self.b_groups)[b_keep]

        # what was scored, every process's rows together, each once (`counts`)
        self.scored = {"a": len(a_keep), "b": len(b_keep)}
        a2b = recall_at_k(a_emb, b_emb, a_groups, b_groups, self.ks, self.chunk_size)
        b2a = recall_at_k(b_emb, a_emb, b_groups, a_groups, self.ks, self.chunk_size)
        out = {f"{self.prefix_a2b}_R@{k}": torch.tensor(v) for k, v in a2b.items()}
        out.update({f"{self.prefix_b2a}_R@{k}": torch.tensor(v) for k, v in b2a.items()})
        return out
