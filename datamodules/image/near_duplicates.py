"""Near-duplicate search over unit embeddings in bounded memory: blocked matrix products on the device.

The embeddings stay where they are (host memory, or a memory-mapped array); `block` rows of them at a time go to
the device, so the device holds two blocks and one `block x block` similarity tile whatever their number. The
search is exact (every pair is compared: N^2 / 2 dot products), which a GPU does for millions of embeddings in
seconds; pairs above the threshold are few and come back to the host.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


def _blocks(n: int, block: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, block):
        yield start, min(start + block, n)


def _on(x: np.ndarray, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.from_numpy(np.array(x)).to(device=device, dtype=dtype, non_blocking=True)  # a writable copy


def similar_pairs(
    embeddings: np.ndarray,
    threshold: float,
    block: int = 8192,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> np.ndarray:
    """(P, 2) index pairs i < j of rows of `embeddings` (N, D unit vectors) whose cosine is above `threshold`."""
    device = torch.device(device)
    found: list[torch.Tensor] = []
    n = len(embeddings)
    for i0, i1 in _blocks(n, block):
        a = _on(embeddings[i0:i1], device, dtype)
        for j0, j1 in _blocks(n, block):
            if j1 <= i0:  # the lower triangle: its pairs were found from the other side
                continue
            b = a if j0 == i0 else _on(embeddings[j0:j1], device, dtype)
            sims = a @ b.T
            hits = (sims > threshold).nonzero()
            hits = hits[hits[:, 0] + i0 < hits[:, 1] + j0]  # each pair once, no self pairs
            if len(hits):
                found.append((hits + torch.tensor([i0, j0], device=device)).cpu())
    return torch.cat(found).numpy() if found else np.zeros((0, 2), dtype=np.int64)


def nearest_in(
    queries: np.ndarray,
    references: np.ndarray,
    block: int = 8192,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, (cosine, index) of its most similar row of `references` (both unit vectors)."""
    device = torch.device(device)
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    where = np.full(len(queries), -1, dtype=np.int64)
    for i0, i1 in _blocks(len(queries), block):
        q = _on(queries[i0:i1], device, dtype)
        for j0, j1 in _blocks(len(references), block):
            top, idx = (q @ _on(references[j0:j1], device, dtype).T).max(dim=1)
            top, idx = top.float().cpu().numpy(), idx.cpu().numpy() + j0
            better = top > best[i0:i1]
            best[i0:i1][better], where[i0:i1][better] = top[better], idx[better]
    return best, where


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Cluster id of each of `n` items, joined by `pairs` (connected components; union-find with path
    halving): the smallest index of its cluster, so a unique item is its own cluster."""
    parent = np.arange(n)

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        ri, rj = root(i), root(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([root(i) for i in range(n)], dtype=np.int64)
