"""BERT with task heads for fine-tuning, and the pretrained encoder they start from.

The encoder comes from an MLM checkpoint of this framework (architecture from its saved hyperparameters),
from a Hugging Face BERT folder, or fresh from a size preset (a from-scratch baseline).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from torch import Tensor, nn

from lightning_modules.components.bert import BertConfig, BertModel, init_bert_weights
from lightning_modules.components.hf_interop import config_from_hf, load_hf_bert
from lightning_modules.training.checkpoints import read_checkpoint
from lightning_modules.training.hparams import MLM_ENCODER, MLM_OPTIMIZER, bert_config, sections_from_flat

log = logging.getLogger(__name__)


def mlm_bert_config(hparams: dict) -> BertConfig:
    """The encoder configuration an `MLMPretrainingModule` built from these hyperparameters (its sections, or the
    flat arguments that checkpoints without sections hold)."""
    if hparams.get("init_from_hf"):
        # the shape came from that folder's config.json, not from the arguments
        folder = Path(hparams["init_from_hf"])
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"the checkpoint was initialised from the Hugging Face folder {folder}, whose config.json "
                "(the architecture) is no longer there"
            )
        return config_from_hf(json.loads((folder / "config.json").read_text()))
    h = sections_from_flat(hparams, MLM_ENCODER, MLM_OPTIMIZER)
    return bert_config(
        h.get("encoder") or MLM_ENCODER,
        h.get("vocab_size") or 30522,
        h.get("max_position_embeddings") or 512,
        h.get("pad_token_id") or 0,
    )


def read_mlm_checkpoint(path: str | os.PathLike) -> tuple[BertConfig, dict[str, Tensor]]:
    """Encoder configuration and `BertModel` weights of an MLM checkpoint, read by `read_checkpoint`
    (weights_only, memory-mapped; CheckpointError naming the file when it is missing, truncated or no checkpoint
    of this framework)."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    if "hyper_parameters" not in ckpt:
        raise ValueError(
            f"{path} is not a Lightning checkpoint of MLMPretrainingModule (no hyper_parameters)"
        )
    prefix = "model.bert."
    weights = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path} holds no BERT encoder weights (expected keys starting with {prefix!r})")
    return mlm_bert_config(ckpt["hyper_parameters"]), weights


def pretrained_bert(
    init_ckpt: str | None, init_from_hf: str | None, fresh: BertConfig | None = None
) -> BertModel:
    """The encoder of an MLM checkpoint, of a Hugging Face folder, or (neither given) a fresh one of `fresh`."""
    if init_ckpt and init_from_hf:
        raise ValueError("give init_ckpt or init_from_hf, not both")
    if init_from_hf:
        return load_hf_bert(init_from_hf).bert
    if init_ckpt:
        cfg, weights = read_mlm_checkpoint(init_ckpt)
        bert = BertModel(cfg)
        missing, unexpected = bert.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{init_ckpt}: encoder weights do not fit (missing {missing[:3]}, unexpected {unexpected[:3]})"
            )
        log.info("encoder initialised from %s (%d tensors)", init_ckpt, len(weights))
        return bert
    if fresh is None:
        raise ValueError("no init_ckpt, no init_from_hf and no configuration for a fresh encoder")
    return BertModel(fresh)


class SequenceClassifier(nn.Module):
    """logits = W dropout(tanh(W_p h_[CLS] + b_p)) + b: BERT's pooled [CLS] and a linear layer."""

    def __init__(self, bert: BertModel, dropout: float, num_labels: int) -> None:
        super().__init__()
        self.bert = bert
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.cfg.hidden_size, num_labels)
        init_bert_weights(self.classifier, 0.02)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        hidden = self.bert(input_ids, attention_mask, token_type_ids)
        return self.classifier(self.dropout(self.bert.pool(hidden, attention_mask, "cls")))


class TokenClassifier(nn.Module):
    """logits_t = W dropout(h_t) + b at every position."""

    def __init__(self, bert: BertModel, dropout: float, num_labels: int) -> None:
        super().__init__()
        self.bert = bert
        # the pooler is unused: frozen, DDP does not wait for its gradient and AdamW skips it
        self.bert.pooler.requires_grad_(False)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(bert.cfg.hidden_size, num_labels)
        init_bert_weights(self.classifier, 0.02)

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None
    ) -> Tensor:
        return self.classifier(self.dropout(self.bert(input_ids, attention_mask, token_type_ids)))
