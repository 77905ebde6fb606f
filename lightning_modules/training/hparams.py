"""The sections of the BERT systems (MLM pretraining, fine-tuning): their defaults, the encoder they describe, and
the reading of checkpoints whose hyper-parameters are flat (`lr`, `hidden_size`, ...) into `model.encoder` and
`model.optimizer`.

`sections_from_flat` is the one place the flat names are mapped; `load_from_checkpoint`, `cli.py export-hf`,
`--ckpt_path` of the CLI and fine-tuning from an MLM checkpoint all read hyper-parameters through it.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, TypeVar

import torch

from lightning_modules.components.bert import BertConfig
from lightning_modules.components.towers import EncoderShape
from lightning_modules.training.optim import OptimizerConfig

# BERT's: dropout 0.1 on hidden states and attention probabilities, post-LN
MLM_ENCODER = EncoderShape(size="base", dropout=0.1)
MLM_OPTIMIZER = OptimizerConfig(
    lr=1e-4, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, warmup_steps=10000, schedule="linear"
)
FINETUNE_ENCODER = EncoderShape(size="base", dropout=0.1)
FINETUNE_OPTIMIZER = OptimizerConfig(
    lr=3e-5, weight_decay=0.01, betas=(0.9, 0.999), eps=1e-6, warmup_steps=0.1, schedule="linear"
)

S = TypeVar("S")


def section(default: S, value: S | Mapping[str, Any]) -> S:
    """A section given as its dataclass, or as a dict of some of its fields over the system's `default` (a
    checkpoint stores sections as dicts; Python callers may give only the fields they change)."""
    return replace(default, **value) if isinstance(value, Mapping) else value


# flat argument -> field of the encoder section
FLAT_ENCODER = {
    "size": "size",
    "num_layers": "layers",
    "hidden_size": "hidden",
    "num_heads": "heads",
    "intermediate_size": "intermediate",
    "dropout": "dropout",
    "attention_dropout": "attention_dropout",
    "norm_first": "norm_first",
}
FLAT_OPTIMIZER = ("lr", "weight_decay", "betas", "eps", "warmup_steps", "schedule", "layer_decay")


def sections_from_flat(
    hparams: Mapping[str, Any],
    encoder: EncoderShape = MLM_ENCODER,
    optimizer: OptimizerConfig = MLM_OPTIMIZER,
) -> dict[str, Any]:
    """A copy of `hparams` with the flat encoder and optimizer arguments moved into `encoder` and `optimizer`
    sections (plain dicts, over the system's defaults `encoder` and `optimizer` for the fields a checkpoint does
    not hold). Hyper-parameters that have their sections already come back as they are."""
    out = dict(hparams)
    shape = {field: out.pop(flat) for flat, field in FLAT_ENCODER.items() if flat in out}
    opt = {name: out.pop(name) for name in FLAT_OPTIMIZER if name in out}
    if shape:
        out["encoder"] = {**asdict(encoder), **dict(out.get("encoder") or {}), **shape}
    if opt:
        out["optimizer"] = {**asdict(optimizer), **dict(out.get("optimizer") or {}), **opt}
    return out


def bert_config(
    encoder: EncoderShape | Mapping[str, Any],
    vocab_size: int,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
) -> BertConfig:
    """The BERT encoder of an encoder section and the text embedding tables' sizes."""
    shape = EncoderShape(**encoder) if isinstance(encoder, Mapping) else encoder
    return BertConfig.from_size(
        shape.size,
        vocab_size=vocab_size,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        **shape.encoder_overrides(),
    )


class ReadsFlatHparams:
    """`load_from_checkpoint` that also reads checkpoints with flat hyper-parameters: the system's sections are
    built from them (`sections_from_flat`, over the class's `DEFAULT_ENCODER` and `DEFAULT_OPTIMIZER`)."""

    DEFAULT_ENCODER: EncoderShape = MLM_ENCODER
    DEFAULT_OPTIMIZER: OptimizerConfig = MLM_OPTIMIZER

    @classmethod
    def upgrade_hparams(cls, hparams: Mapping[str, Any]) -> dict[str, Any]:
        return sections_from_flat(hparams, cls.DEFAULT_ENCODER, cls.DEFAULT_OPTIMIZER)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | os.PathLike | io.IOBase, *args: Any, **kwargs: Any):
        from datamodules.checkpoint_file import read_checkpoint

        if isinstance(checkpoint_path, (str, os.PathLike)) and Path(checkpoint_path).is_file():
            ckpt = read_checkpoint(checkpoint_path, needs=())  # memory-mapped: the weights are not read here
            hparams = ckpt.get("hyper_parameters") or {}
            upgraded = cls.upgrade_hparams(hparams)
            if upgraded != hparams:
                # Lightning reads the hyper-parameters from the checkpoint it loads: give it the upgraded one
                ckpt["hyper_parameters"] = upgraded
                buffer = io.BytesIO()
                torch.save(ckpt, buffer)
                buffer.seek(0)
                checkpoint_path = buffer
        return super().load_from_checkpoint(checkpoint_path, *args, **kwargs)
