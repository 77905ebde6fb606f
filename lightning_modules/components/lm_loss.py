"""Cross-entropy of a vocabulary projection, fused and blocked: loss = Σ_i [logsumexp(z_i) - z_i[t_i]], z = h
Wᵀ + b.

The (N, V) logits of a language-model head and their softmax are the largest tensors of an MLM step.
`linear_cross_entropy` works on blocks of rows: per block it computes the logits, the loss and at once the
gradients (∂loss/∂z = softmax(z) - onehot(t)), so backward only scales them. Same FLOPs, without the big
intermediates; on CPU the block lives in a workspace kept between calls (fresh large allocations fault their
pages in one by one). The result equals `F.cross_entropy(F.linear(h, W, b), t, reduction="sum")` in fp32;
under bf16 autocast the matmuls run in bf16, the softmax in fp32. Without gradients and under fp16 it is the
plain computation."""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["linear_cross_entropy"]


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """(summed cross-entropy over the N rows, (N,) bool top-1 hits) of logits = hidden @ weight.T + bias.

    `hidden` (N, d), `weight` (V, d), `bias` (V,) or None, `targets` (N,) int64 class ids (all valid: select
    the rows to score beforehand). Divide the sum by the count you want to average over. A row is a hit when
    its target's logit is the row's maximum (top-1 accuracy; a max shared with another class counts as a hit).
    The hits come from a max, not an argmax: on CPU argmax over a vocabulary costs as much as the softmax.
    `chunk_rows`: most rows per block (the rows are split into equal blocks; each block streams the weight
    matrix three times); by default on CPU, where the block lives in a workspace kept between calls, as many
    as fit in 128 MiB of fp32 logits (between 64 and 1024), and 2048 on accelerators.

    Under fp16 (autocast or fp16 tensors) it is the plain computation: the fused path casts softmax - onehot
    to the matmul dtype before the loss scale of fp16 training is applied, and fp16 would flush the small
    probabilities to zero.
    """
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"{hidden.shape[0]} hidden rows but {targets.shape[0]} targets")
    if bias is None:
        bias = weight.new_zeros(weight.shape[0])
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weight, bias))
    device = hidden.device.type
    fp16 = torch.float16 in (hidden.dtype, weight.dtype) or (
        torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) == torch.float16
    )
    if not needs_grad or fp16 or hidden.shape[0] == 0:
        logits = F.linear(hidden, weight, bias).float()
        hits = logits.gather(1, targets[:, None]).squeeze(1) >= logits.amax(-1)
        return F.cross_entropy(logits, targets, reduction="sum"), hits
    if chunk_rows is None:
        # on CPU the block stays in a workspace: up to 128 MiB of fp32 logits (1099 rows of BERT's vocabulary)
        chunk_rows = max(64, min(1024, (128 << 20) // (4 * weight.shape[0]))) if device == "cpu" else 2048
    n = hidden.shape[0]
    blocks = -(-n // max(1, chunk_rows))
    # equal blocks: every block streams the whole weight matrix three times, so a small remainder block costs
    # nearly as much as a full one
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, -(-n // blocks))


_WORKSPACES: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}


def _workspace(numel: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A logits block kept between calls on CPU, where a large fresh allocation is a new mapping whose pages
    fault in one by one every step; accelerators' caching allocators already recycle memory."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    key = (threading.get_ident(), device, dtype)  # one per thread: a block is in use only inside one call
    buf = _WORKSPACES.get(key)
    if buf is None or buf.numel() < numel:
        buf = _WORKSPACES[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor, targets: Tensor, chunk_rows: int):
        device = hidden.device.type
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            b = bias.float()
            n, vocab = h.shape[0], w.shape[0]
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = None
            grad_b = torch.zeros(vocab, dtype=torch.float32, device=bias.device)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            hits = torch.empty(n, dtype=torch.bool, device=hidden.device)
            arange = torch.arange(min(chunk_rows, n), device=hidden.device)
            block = _workspace(vocab * min(chunk_rows, n), dtype, hidden.device)
            for start in range(0, n, chunk_rows):
                hc, tc = h[start : start + chunk_rows], targets[start : start + chunk_rows]
                c = hc.shape[0]
                rows = arange[:c]
                # W hᵀ: (V, c), vocabulary-major, so every softmax step is a column-wise (vectorised) pass
                z = torch.mm(w, hc.t(), out=block[: vocab * c].view(vocab, c)).float()
                z += b[:, None]
                target = z[tc, rows]
                top = z.amax(0)
                hits[start : start + c] = target >= top
                g = z.sub_(top).exp_()  # exp(z - max), in place
                total = g.sum(0)
                loss += (top + total.log() - target).sum()  # logsumexp(z) - z[t]
                g.mul_(total.reciprocal())  # softmax
                g[tc, rows] -= 1.0  # ∂/∂z of the summed loss = softmax - onehot
                if want_b:
                    grad_b += g.sum(1)
                g = g.to(dtype)
                if want_h:
                    grad_h[start : start + c] = torch.mm(g.t(), w)
                if not want_w:
                    continue
                if grad_w is None:
                    grad_w = torch.mm(g, hc).float()
                elif dtype == torch.float32:
                    grad_w.addmm_(g, hc)
                else:
                    grad_w += torch.mm(g, hc)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype)
        ctx.used = False
        ctx.mark_non_differentiable(hits)
        return loss, hits

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_hits: Tensor | None):
        if ctx.used:  # the stored gradients are scaled in place, so a second pass would be wrong
            raise RuntimeError("linear_cross_entropy does not support backward through the same graph twice")
        ctx.used = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        w_dtype, b_dtype = ctx.dtypes
        grad_h = (grad_h.float() * grad_loss).to(grad_h.dtype) if ctx.needs_input_grad[0] else None
        grad_w = grad_w.mul_(grad_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
        grad_b = grad_b.mul_(grad_loss).to(b_dtype) if ctx.needs_input_grad[2] else None
        return grad_h, grad_w, grad_b, None, None
