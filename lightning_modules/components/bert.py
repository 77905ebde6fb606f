"""BERT (Devlin et al. 2019) on the shared encoder: embeddings, the encoder, pooler and pretraining heads.

Parameter names follow the structure, not Hugging Face's; `hf_interop.py` maps between the two.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.encoder import (
    Dropout,
    EncoderConfig,
    TransformerEncoder,
    activation,
    cls_pool,
    last_token_pool,
    masked_mean_pool,
)
from lightning_modules.components.lm_loss import linear_cross_entropy


@dataclass
class BertConfig(EncoderConfig):
    """Encoder shape plus the text embedding tables."""

    vocab_size: int = 30522
    """WordPiece vocabulary size."""
    max_position_embeddings: int = 512
    """Longest sequence the learned position table covers."""
    type_vocab_size: int = 2
    """Segment (token type) ids: 2 for sentence A / B."""
    pad_token_id: int = 0
    """Id of [PAD]; its embedding row starts at zero."""


class BertEmbeddings(nn.Module):
    """E = LN(token + position + segment), then dropout."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.word = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.segment = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.dropout = Dropout(cfg.dropout)
        self.register_buffer("position_ids", torch.arange(cfg.max_position_embeddings), persistent=False)

    def forward(self, input_ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        n = input_ids.shape[1]
        x = self.word(input_ids) + self.position(self.position_ids[:n])
        x = x + (self.segment(token_type_ids) if token_type_ids is not None else self.segment.weight[0])
        return self.dropout(self.norm(x))


class BertModel(nn.Module):
    """Token ids in, hidden states out; `pool` gives one vector per sequence."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = BertEmbeddings(cfg)
        self.encoder = TransformerEncoder(cfg)
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.apply(lambda m: init_bert_weights(m, 0.02))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        need_weights: bool = False,
        output_positions: Tensor | None = None,
        token_index: Tensor | None = None,
        output_width: int | None = None,
    ):
        """`attention_mask` is (B, L), True (or 1) at real tokens, as in Hugging Face. `output_positions`: see
        `TransformerEncoder` (then (R, d) states of those flat positions only); `token_index`, `output_width`:
        the batch's layout where the collate computed it (`TransformerEncoder`), so nothing is read from the
        device."""
        mask = attention_mask.bool() if attention_mask is not None else None
        x = self.embeddings(input_ids, token_type_ids)
        return self.encoder(x, mask, need_weights, output_positions, token_index, output_width)

    def cls_pooler(self, first: Tensor) -> Tensor:
        """BERT's pooler: tanh(W h_[CLS] + b)."""
        return torch.tanh(self.pooler(first))

    def pool(self, hidden: Tensor, attention_mask: Tensor | None = None, mode: str = "cls") -> Tensor:
        """'cls': BERT's tanh pooler on [CLS]; 'first': raw [CLS] state; 'mean': masked mean; 'eot': the last
        real token's state."""
        if mode == "cls":
            return self.cls_pooler(cls_pool(hidden))
        if mode == "first":
            return cls_pool(hidden)
        if mode == "mean":
            return masked_mean_pool(hidden, attention_mask.bool() if attention_mask is not None else None)
        if mode == "eot":
            return last_token_pool(hidden, attention_mask)
        raise ValueError(f"unknown pooling {mode!r}; choose cls, first, mean or eot")


class MLMHead(nn.Module):
    """logits = LN(GELU(h W + b)) Eᵀ + b_vocab, with E the (tied) input embedding matrix."""

    def __init__(self, cfg: BertConfig, embedding: nn.Embedding) -> None:
        super().__init__()
        self.transform = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.embedding = embedding  # tied: the decoder weight is the input embedding table
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        self.activation = activation(cfg.activation)  # BERT's head uses the encoder's hidden_act

    def transform_states(self, hidden: Tensor) -> Tensor:
        return self.norm(self.activation(self.transform(hidden)))

    def forward(self, hidden: Tensor) -> Tensor:
        return F.linear(self.transform_states(hidden), self.embedding.weight, self.bias)

    def loss(self, hidden: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """(summed cross-entropy, top-1 hits) of the rows of `hidden` against `targets`, through the fused
        chunked vocabulary projection (`linear_cross_entropy`): the (N, V) logits never exist at once."""
        return linear_cross_entropy(self.transform_states(hidden), self.embedding.weight, self.bias, targets)


class SparseLayout(NamedTuple):
    """Where the MLM head and the encoder's last block work, computed by the collate on the host
    (`datamodules.masking.sparse_layout`), so that no shape is read from the device."""

    token_index: Tensor
    """(T,) flat positions b * L + l of the real tokens, ascending."""
    output_positions: Tensor
    """(R,) flat positions of the masked tokens and of every [CLS], ascending."""
    output_width: int
    """The most output positions of one sequence."""
    masked_rows: Tensor
    """(M,) the rows of `output_positions` that are masked, in order."""
    cls_rows: Tensor
    """(B,) the row of `output_positions` of each sequence's [CLS]."""

    @classmethod
    def of_batch(cls, batch: dict) -> SparseLayout | None:
        """The layout a batch carries; None where its collate gave none."""
        if not all(key in batch for key in cls._fields):
            return None
        return cls(*(batch[key] for key in cls._fields))


class PretrainingOutput(NamedTuple):
    """What the pretraining losses and metrics need, without the (M, V) MLM logits."""

    mlm_loss_sum: Tensor
    """Cross-entropy summed over the M masked tokens (divide by the count to average)."""
    mlm_hits: Tensor
    """(M,) bool: the target token has the top logit, per masked position in row-major order."""
    mlm_targets: Tensor
    """(M,) original token ids at the masked positions."""
    nsp_logits: Tensor
    """(B, 2) next-sentence logits."""


class BertForPreTraining(nn.Module):
    """BERT with the masked-LM head (tied decoder) and the next-sentence head."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.bert = BertModel(cfg)
        self.mlm = MLMHead(cfg, self.bert.embeddings.word)
        self.nsp = nn.Linear(cfg.hidden_size, 2)
        self.mlm.apply(lambda m: init_bert_weights(m, 0.02))
        init_bert_weights(self.nsp, 0.02)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        token_type_ids: Tensor | None = None,
        masked_positions: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        """MLM logits and NSP logits.

        With `masked_positions` (a (B, L) bool map of real tokens) the MLM head runs only at those positions
        and returns (M, V) logits for the M masked tokens in row-major order; the vocabulary projection is the
        costliest matmul of a small BERT, and ~85% of its rows would be thrown away. The last encoder block, too,
        runs its per-token work only for the masked positions and [CLS], the only outputs the two heads read.
        Without it, (B, L, V).
        """
        if masked_positions is None:
            hidden = self.bert(input_ids, attention_mask, token_type_ids)
            return self.mlm(hidden), self.nsp(self.bert.pool(hidden))
        masked_states, cls_states = self._masked_and_cls_states(
            input_ids, attention_mask, token_type_ids, masked_positions
        )
        return self.mlm(masked_states), self.nsp(self.bert.cls_pooler(cls_states))

    def pretraining_outputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        token_type_ids: Tensor | None,
        labels: Tensor,
        ignore_index: int = -100,
        layout: SparseLayout | None = None,
    ) -> PretrainingOutput:
        """The MLM loss (summed), top-1 hits and targets at the positions where `labels` != `ignore_index`, and
        the NSP logits: the work of `forward(..., masked_positions)` plus the loss, with the vocabulary projection
        and its cross-entropy fused (`MLMHead.loss`). With the collate's `layout` the step reads no shape from the
        device; without it, the masked positions' count and layout are read (host syncs)."""
        if layout is not None:
            states = self.bert(
                input_ids,
                attention_mask,
                token_type_ids,
                output_positions=layout.output_positions,
                token_index=layout.token_index,
                output_width=layout.output_width,
            )
            masked_states, cls_states = states[layout.masked_rows], states[layout.cls_rows]
            targets = labels.reshape(-1)[layout.output_positions[layout.masked_rows]]
        else:
            masked = labels != ignore_index
            masked_states, cls_states = self._masked_and_cls_states(
                input_ids, attention_mask, token_type_ids, masked
            )
            targets = labels[masked]
        loss_sum, hits = self.mlm.loss(masked_states, targets)
        return PretrainingOutput(loss_sum, hits, targets, self.nsp(self.bert.cls_pooler(cls_states)))

    def _masked_and_cls_states(
        self, input_ids: Tensor, attention_mask: Tensor | None, token_type_ids: Tensor | None, masked: Tensor
    ) -> tuple[Tensor, Tensor]:
        """Final states of the masked positions (row-major) and of [CLS], from an encoder whose last block
        works on those rows only."""
        wanted = masked.clone()
        wanted[:, 0] = True  # [CLS], for NSP
        positions = wanted.reshape(-1).nonzero().squeeze(1)  # ascending: row-major order
        states = self.bert(input_ids, attention_mask, token_type_ids, output_positions=positions)
        is_masked = masked.reshape(-1)[positions]
        is_first = positions % masked.shape[1] == 0
        return states[is_masked], states[is_first]


def init_bert_weights(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, 0.02) weights, zero biases, unit LayerNorm, zero padding embedding."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
