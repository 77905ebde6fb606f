"""The text tower of the alignment tasks: the shared BERT encoder, pooling and a linear projection."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lightning_modules.components.bert import BertConfig, BertModel

log = logging.getLogger(__name__)


class TextTower(nn.Module):
    """Token ids -> BERT hidden states -> pooled vector -> projection into the joint space (not normalised)."""

    def __init__(
        self, cfg: BertConfig, embed_dim: int, pooling: Literal["cls", "first", "mean"] = "first"
    ) -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.pooling = pooling
        self.proj = nn.Linear(cfg.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.hidden_size**-0.5)
        if pooling != "cls":
            # BERT's tanh pooler is unused then; frozen, DDP does not wait for its gradient and AdamW skips it
            self.bert.pooler.requires_grad_(False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids, attention_mask)
        return self.proj(self.bert.pool(hidden, attention_mask, self.pooling))


def load_mlm_encoder(tower: TextTower, ckpt_path: str | Path) -> None:
    """Initialise the tower's BERT from an MLM checkpoint of this framework (`MLMPretrainingModule`).

    Read with `weights_only=True`; the pretraining heads are left out, shapes must match.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"MLM checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    state = ckpt.get("state_dict", ckpt)
    prefix = "model.bert."
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not weights:
        raise ValueError(f"{path} holds no BERT encoder weights (expected keys starting with {prefix!r})")
    own = tower.bert.state_dict()
    bad = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(
            f"{path}: shapes differ from the configured text tower for {bad[:3]}; "
            "configure the tower with the checkpoint's size and vocabulary"
        )
    missing, unexpected = tower.bert.load_state_dict(weights, strict=False)
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks {missing[:3]} ...")
    log.info("text tower initialised from %s (%d tensors)", path, len(weights))
