"""The one Transformer encoder every task uses: the BERT text model, the CLIP text tower and the speech tower.

It reads like the paper (Vaswani et al. 2017):
    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k) V
    MultiHead(X)       = Concat(head_1, ..., head_h) W^O,  head_i = Attention(X W_i^Q, X W_i^K, X W_i^V)
    post-LN (BERT):    X = LN(X + Dropout(MultiHead(X)));   X = LN(X + Dropout(FFN(X)))
    pre-LN (option):   X = X + Dropout(MultiHead(LN(X)));   X = X + Dropout(FFN(LN(X)))
    FFN(X)             = GELU(X W_1 + b_1) W_2 + b_2
The softmax product is computed by `torch.nn.functional.scaled_dot_product_attention`, which picks a fused
kernel (flash / memory-efficient / CPU flash) for the device.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SizeName = Literal["tiny", "mini", "small", "medium", "base", "large"]

# (layers, hidden) of the BERT paper (base, large) and of the miniature BERTs of Turc et al. 2019;
# heads = hidden / 64 and the feed-forward width = 4 x hidden, as in both papers.
SIZES: dict[str, tuple[int, int]] = {
    "tiny": (2, 128),
    "mini": (4, 256),
    "small": (4, 512),
    "medium": (8, 512),
    "base": (12, 768),
    "large": (24, 1024),
}


@dataclass
class EncoderConfig:
    """Shape and regularisation of a Transformer encoder (BERT defaults)."""

    hidden_size: int = 768
    """Model width d_model."""
    num_layers: int = 12
    """Number of encoder blocks."""
    num_heads: int = 12
    """Attention heads; d_k = hidden_size / num_heads."""
    intermediate_size: int | None = None
    """Feed-forward width; None means 4 x hidden_size."""
    dropout: float = 0.1
    """Dropout on embeddings, attention output and feed-forward output."""
    attention_dropout: float = 0.1
    """Dropout on the attention probabilities."""
    layer_norm_eps: float = 1e-12
    """LayerNorm epsilon (BERT uses 1e-12)."""
    norm_first: bool = False
    """Pre-LN blocks (with a final LayerNorm) instead of BERT's post-LN."""
    activation: Literal["gelu", "gelu_tanh", "relu"] = "gelu"
    """Feed-forward non-linearity (BERT: exact GELU)."""

    def __post_init__(self) -> None:
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")

    @classmethod
    def from_size(cls, size: SizeName, **overrides) -> EncoderConfig:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
        layers, hidden = SIZES[size]
        cfg = cls(hidden_size=hidden, num_layers=layers, num_heads=hidden // 64)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        return replace(cfg, **overrides) if overrides else cfg


def activation(name: str) -> nn.Module:
    return {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU()}[name]


class Dropout(nn.Dropout):
    """`nn.Dropout` (same module, same state) that draws its mask faster on CPU.

    The mask is the same Bernoulli(1 - p) keep-mask with 1 / (1 - p) scaling, from the same global generator.
    On CPU, `bernoulli_` (behind `F.dropout`) runs single-threaded at about half the speed of `torch.rand`,
    so the keep-mask is drawn as `rand >= p` there: dropout's share of a small BERT's CPU training step halves.
    Elsewhere (CUDA's fused kernel) it is `F.dropout`.
    """

    def forward(self, x: Tensor) -> Tensor:
        p = self.p
        if not self.training or p == 0.0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        if p == 1.0:
            return x * 0.0
        keep = torch.rand(x.shape, dtype=torch.float32, device=x.device) >= p
        return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))


class MultiHeadSelfAttention(nn.Module):
    """MultiHead(X) = Concat(head_1..head_h) W^O with the three input projections fused in one matmul."""

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.hidden_size // cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)  # [W^Q; W^K; W^V]
        self.out = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # W^O
        self.attention_dropout = cfg.attention_dropout

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        unpad: Unpadded | None = None,
        rows: RowSelection | None = None,
    ):
        """`rows`: return only those token rows (of the unpadded (T, d) layout, or of the flattened (B*L, d)
        one): every key and value is still computed from every token, but queries, attention and W^O only for
        the wanted rows."""
        if rows is not None and not need_weights:
            return self._selected_rows(x, attn_mask, unpad, rows), None
        qkv = self.qkv(x)
        if unpad is not None:  # tokens (T, 3d) back to the (B, L, 3d) layout attention needs
            qkv = unpad.pad(qkv)
        b, n, three_d = qkv.shape
        d = three_d // 3
        q, k, v = qkv.view(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        p = self.attention_dropout if self.training else 0.0
        if need_weights:  # explicit softmax(QKᵀ/√d_k), for looking inside the model
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, float("-inf"))
            weights = F.dropout(scores.softmax(-1), p)
            heads = weights @ v
        else:
            weights = None
            heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        heads = heads.transpose(1, 2).reshape(b, n, d)
        if unpad is not None:
            heads = unpad.unpad(heads)
        if rows is not None:  # with need_weights: every query was computed, keep the wanted rows
            heads = heads.reshape(-1, d)[rows.index]
        return self.out(heads), weights

    def _selected_rows(
        self, x: Tensor, attn_mask: Tensor | None, unpad: Unpadded | None, rows: RowSelection
    ) -> Tensor:
        """Attention output of the selected rows only: K and V of every token, Q of the selected ones, packed
        per sequence into a (B, rows.width) block of queries (unused slots attend too, and are dropped)."""
        d = x.shape[-1]
        w, bias = self.qkv.weight, self.qkv.bias
        kv = F.linear(x, w[d:], None if bias is None else bias[d:])
        if unpad is not None:
            kv = unpad.pad(kv)
        b, n = kv.shape[:2]
        k, v = kv.view(b, n, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q_rows = F.linear(x.reshape(-1, d)[rows.index], w[:d], None if bias is None else bias[:d])
        q = q_rows.new_zeros(b, rows.width, d).index_put((rows.batch, rows.slot), q_rows)
        q = q.view(b, rows.width, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.attention_dropout if self.training else 0.0
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        heads = heads.transpose(1, 2).reshape(b, rows.width, d)[rows.batch, rows.slot]
        return self.out(heads)


class FeedForward(nn.Sequential):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__(
            nn.Linear(cfg.hidden_size, cfg.intermediate_size),
            activation(cfg.activation),
            nn.Linear(cfg.intermediate_size, cfg.hidden_size),
        )


class EncoderBlock(nn.Module):
    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.norm_first = cfg.norm_first
        self.attention = MultiHeadSelfAttention(cfg)
        self.attention_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.ffn = FeedForward(cfg)
        self.ffn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)

    def forward(
        self,
        x: Tensor,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        unpad: Unpadded | None = None,
        rows: RowSelection | None = None,
    ):
        """With `rows`, only those token rows come out (see `TransformerEncoder`)."""
        residual = x if rows is None else x.reshape(-1, x.shape[-1])[rows.index]
        if self.norm_first:
            a, w = self.attention(self.attention_norm(x), attn_mask, need_weights, unpad, rows)
            x = residual + self.dropout(a)
            x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        else:
            a, w = self.attention(x, attn_mask, need_weights, unpad, rows)
            x = self.attention_norm(residual + self.dropout(a))
            x = self.ffn_norm(x + self.dropout(self.ffn(x)))
        return x, w


class Unpadded:
    """Indices of the real tokens of a padded (B, L) batch.

    Everything but attention works per token, so the encoder runs it on the (T, d) real tokens only
    (as MosaicBERT does) and pads just around the attention product: no work is spent on padding. `index`, the
    flat positions of the real tokens, comes with the batch where the collate computed it; found here, its size
    T is read from the device (a host sync).
    """

    def __init__(self, key_padding_mask: Tensor, index: Tensor | None = None) -> None:
        self.batch, self.length = key_padding_mask.shape
        self.index = key_padding_mask.reshape(-1).nonzero().squeeze(1) if index is None else index

    def unpad(self, x: Tensor) -> Tensor:
        return x.reshape(self.batch * self.length, -1)[self.index]

    def pad(self, tokens: Tensor) -> Tensor:
        out = tokens.new_zeros(self.batch * self.length, tokens.shape[-1])
        return out.index_copy(0, self.index, tokens).view(self.batch, self.length, -1)


class RowSelection(NamedTuple):
    """Token rows wanted from the last block: `index` into the block's (T, d) or (B*L, d) row layout, and for
    each the sequence it belongs to (`batch`) and its rank among that sequence's wanted rows (`slot`); `width`
    is the most rows any one sequence has."""

    index: Tensor
    batch: Tensor
    slot: Tensor
    width: int

    @classmethod
    def of(
        cls, positions: Tensor, length: int, batch_size: int, index: Tensor, width: int | None = None
    ) -> RowSelection:
        """`positions`: ascending flat positions b * length + l; `index`: the same rows in the block layout;
        `width`: the most positions of one sequence where the host knows it (else read from the device)."""
        batch = positions // length
        # each sequence's first row, as `batch` is ascending (bincount would read its size from the device)
        sequences = torch.arange(batch_size, device=positions.device)
        first = torch.searchsorted(batch, sequences)
        slot = torch.arange(positions.numel(), device=positions.device) - first[batch]
        if width is None:
            counts = torch.searchsorted(batch, sequences, right=True) - first
            width = int(counts.max()) if positions.numel() else 0
        return cls(index, batch, slot, width)


def attention_mask_from_padding(key_padding_mask: Tensor | None) -> Tensor | None:
    """(B, L) bool, True for real tokens -> (B, 1, 1, L) mask that SDPA broadcasts over heads and queries.

    Returns None when nothing is padded so SDPA can use its fastest mask-free kernel.
    """
    if key_padding_mask is None or bool(key_padding_mask.all()):
        return None
    return key_padding_mask[:, None, None, :].bool()


class TransformerEncoder(nn.Module):
    """Embeddings in, hidden states out. `key_padding_mask` is (B, L) with True at real positions.

    `output_positions` (flat indices b * L + l of real tokens, ascending) asks for the final states of those
    positions only, returned as (R, d): the last block then computes queries, attention, W^O, the feed-forward
    and its LayerNorms for them alone (keys and values still come from every token), as MosaicBERT does for the
    masked positions of MLM. The result is the same as selecting those rows from the full output.

    Host syncs: the layout of a padded batch decides tensor shapes. A collate that knows it passes `token_index`
    (flat positions of the real tokens, ascending) and, with `output_positions`, `output_width` (the most
    positions of one sequence), and the forward pass reads nothing from the device. Without them it reads T,
    the number of real tokens (one sync, when unpadding), or whether anything is padded (one sync, otherwise),
    and the width (one sync, with `output_positions`).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_layers))
        self.final_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) if cfg.norm_first else None
        self.gradient_checkpointing = False
        self.unpad = True

    def forward(
        self,
        x: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = False,
        output_positions: Tensor | None = None,
        token_index: Tensor | None = None,
        output_width: int | None = None,
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        unpadding = self.unpad and not need_weights and key_padding_mask is not None
        if token_index is None and unpadding:
            # the one sync of an unknown layout: T, the number of real tokens, sizes everything after
            token_index = key_padding_mask.reshape(-1).nonzero().squeeze(1)
        if token_index is not None and key_padding_mask is not None:
            padded = token_index.numel() < key_padding_mask.numel()  # host metadata: no device read
            mask = key_padding_mask[:, None, None, :].bool() if padded else None
        else:
            mask = attention_mask_from_padding(key_padding_mask)
        unpad = Unpadded(key_padding_mask, token_index) if mask is not None and unpadding else None
        if unpad is not None:
            x = unpad.unpad(x)
        rows = None
        if output_positions is not None and not need_weights:
            # the wanted positions as rows of the layout the blocks work in
            index = output_positions if unpad is None else torch.searchsorted(unpad.index, output_positions)
            batch_size, length = x.shape[:2] if unpad is None else (unpad.batch, unpad.length)
            rows = RowSelection.of(output_positions, length, batch_size, index, output_width)
        weights = []
        last = len(self.blocks) - 1
        for i, block in enumerate(self.blocks):
            block_rows = rows if i == last else None
            if self.gradient_checkpointing and self.training and not need_weights:
                x, w = torch.utils.checkpoint.checkpoint(
                    block, x, mask, False, unpad, block_rows, use_reentrant=False
                )
            else:
                x, w = block(x, mask, need_weights, unpad, block_rows)
            weights.append(w)
        if rows is not None and not self.blocks:
            x = x.reshape(-1, x.shape[-1])[rows.index]
        if self.final_norm is not None:
            x = self.final_norm(x)
        if rows is not None:
            return x
        if unpad is not None:
            x = unpad.pad(x)  # padded positions come back as zeros
        return (x, weights) if need_weights else x


def cls_pool(hidden: Tensor) -> Tensor:
    """The first position's state (BERT's [CLS])."""
    return hidden[:, 0]


def last_token_pool(hidden: Tensor, mask: Tensor) -> Tensor:
    """The state of each row's last real token (CLIP's EOT pooling); rows are right-padded, so it sits at
    length - 1."""
    last = mask.sum(1).clamp_min(1) - 1
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def lengths_to_mask(lengths: Tensor, max_length: int) -> Tensor:
    """(B,) lengths -> (B, max_length) bool, True at real positions."""
    return torch.arange(max_length, device=lengths.device)[None, :] < lengths[:, None]


def masked_mean_pool(hidden: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over real positions only, so padding never changes the pooled vector."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
