"""The text tower of the alignment systems: the shared BERT encoder, pooling and a linear projection.

`TextTowerConfig` is the `model.text` section of every alignment config and `build_text_tower` the one place a
text tower is made, for image-text, speech-text and tri-modal alike.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor, nn

from datamodules.sections import flat_hparams
from lightning_modules.components.bert import BertConfig, BertModel
from lightning_modules.components.hf_interop import load_hf_bert
from lightning_modules.components.hf_towers import HFTextTower
from lightning_modules.components.towers import EncoderShape, TowerInit, TowerTraining
from lightning_modules.training.checkpoints import read_checkpoint

log = logging.getLogger(__name__)

Pooling = Literal["cls", "first", "mean", "eot"]
# Hugging Face encoders whose position ids start after the padding index
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod")


@dataclass
class TextTowerConfig(EncoderShape, TowerTraining):
    """A BERT text tower: a size preset, optional overrides of its shape, pooling and regularisation.

    The vocabulary is not here: it is the system's `vocab_size`, linked from the DataModule's tokenizer.
    """

    pooling: Pooling = "first"
    """'first' ([CLS] / <s> state), 'cls' (the model's tanh pooler over it), 'mean' (over real tokens) or 'eot'
    (the last real token's state)."""
    max_len: int = 77
    """Rows of the position table: at least the DataModule's context_length, and equal to the MLM
    checkpoint's max_position_embeddings with init.source ours. Sources hf_bert and hf take the folder's."""
    init_ckpt: str | None = None
    """Short for `init: {source: ours, path: ...}`: an MLM checkpoint of this framework to start from."""
    gradient_checkpointing: bool = False
    """Recompute the Transformer blocks in backward: less activation memory for about one more forward."""

    def bert_config(self, vocab_size: int) -> BertConfig:
        return BertConfig.from_size(
            self.size, vocab_size=vocab_size, max_position_embeddings=self.max_len, **self.encoder_overrides()
        )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_ckpt and self.init.source != "scratch":
            raise ValueError(
                f"model.text.init_ckpt and model.text.init.source {self.init.source} both name a start: keep init"
            )

    @property
    def start(self) -> TowerInit:
        """`init`, with `init_ckpt` read as `{source: ours, path: init_ckpt}`."""
        return TowerInit(source="ours", path=self.init_ckpt) if self.init_ckpt else self.init

    def position_limit(self) -> int:
        """The longest text the tower takes: `max_len`, or the Hugging Face folder's position table (RoBERTa-style
        models number positions from pad_token_id + 1, so that many rows are not positions of text)."""
        start = self.start
        config = Path(start.path or "") / "config.json"
        if start.source not in ("hf", "hf_bert") or not config.is_file():
            return self.max_len
        hf = json.loads(config.read_text())
        offset = hf.get("pad_token_id", 1) + 1 if hf.get("model_type") in _OFFSET_POSITIONS else 0
        return int(hf.get("max_position_embeddings", 512)) - offset

    def check_data(self, data: dict, where: str) -> None:
        """The DataModule's texts (its hyperparameters `data`) must fit the position table."""
        data = flat_hparams(data)
        limit = self.position_limit()
        if data.get("context_length", 0) > limit:
            table = (
                "model.text.max_len" if limit == self.max_len else f"the position table of {self.start.path}"
            )
            raise ValueError(
                f"{where}.context_length ({data['context_length']}) exceeds {table} ({limit}), "
                "the text tower's position table"
            )


class TextTower(nn.Module):
    """Token ids -> BERT hidden states -> pooled vector -> projection into the joint space (not normalised)."""

    def __init__(self, cfg: BertConfig, embed_dim: int, pooling: Pooling = "first") -> None:
        super().__init__()
        self.bert = BertModel(cfg)
        self.pooling = pooling
        self.proj = nn.Linear(cfg.hidden_size, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=cfg.hidden_size**-0.5)
        if pooling != "cls":
            # BERT's tanh pooler is unused then; frozen, DDP does not wait for its gradient and AdamW skips it
            self.bert.pooler.requires_grad_(False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's Transformer blocks, first to last."""
        return self.bert.encoder.blocks

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        hidden = self.bert(input_ids, attention_mask)
        return self.proj(self.bert.pool(hidden, attention_mask, self.pooling))


def build_text_tower(cfg: TextTowerConfig, vocab_size: int, embed_dim: int) -> TextTower | HFTextTower:
    """The text tower of `cfg`, from the source `cfg.init` names: random weights, an MLM checkpoint of this
    framework (ours), a Hugging Face BERT folder into our encoder (hf_bert) or any Hugging Face encoder (hf).

    `vocab_size` is the DataModule's tokenizer's: a pretrained tower must have exactly that many token rows.
    """
    init = cfg.start
    if init.source not in ("scratch", "ours", "hf_bert", "hf"):
        raise ValueError(
            f"model.text.init.source {init.source!r} is not a text source; use scratch, ours, hf_bert or hf"
        )
    if init.source != "scratch" and not init.path:
        raise ValueError(f"model.text.init.source {init.source} needs model.text.init.path")
    if init.source == "hf":
        tower: TextTower | HFTextTower = HFTextTower(init.path, embed_dim, cfg.pooling)
        check_vocab(tower.vocab_size, vocab_size, init.path)
        if cfg.gradient_checkpointing:
            tower.model.gradient_checkpointing_enable()
        return tower
    if init.source == "hf_bert":
        bert = load_hf_bert(init.path).bert
        check_vocab(bert.cfg.vocab_size, vocab_size, init.path)
        tower = TextTower(bert.cfg, embed_dim, cfg.pooling)
        tower.bert.load_state_dict(bert.state_dict())
        log.info("text tower initialised from the Hugging Face BERT folder %s", init.path)
    else:
        tower = TextTower(cfg.bert_config(vocab_size), embed_dim, cfg.pooling)
        if init.source == "ours":
            load_mlm_encoder(tower, init.path)
    tower.bert.encoder.gradient_checkpointing = cfg.gradient_checkpointing
    return tower


def check_vocab(tower_vocab: int, tokenizer_vocab: int, source: str | Path) -> None:
    """A pretrained tower's embedding rows must be the tokenizer's: otherwise ids point at other tokens' rows."""
    if tower_vocab != tokenizer_vocab:
        raise ValueError(
            f"the tokenizer has {tokenizer_vocab} tokens but the text tower from {source} has {tower_vocab}: "
            f"give the tower's own tokenizer, data.tokenizer.path={source}"
        )


def load_mlm_encoder(tower: TextTower, ckpt_path: str | Path) -> None:
    """Initialise the tower's BERT from an MLM checkpoint of this framework (`MLMPretrainingModule`).

    Read by `read_checkpoint` (weights_only, memory-mapped; CheckpointError naming the file when it is missing,
    truncated or no torch file); the pretraining heads are left out, shapes must match. A bare state dict of the
    MLM system is taken too.
    """
    path = Path(ckpt_path)
    ckpt = read_checkpoint(path, needs=())
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
