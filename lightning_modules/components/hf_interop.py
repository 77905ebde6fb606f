"""Read and write Hugging Face BERT checkpoint folders (config.json + model.safetensors / pytorch_model.bin).

Weights are read with safetensors or `torch.load(weights_only=True)`: no pickle code is ever run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from lightning_modules.components.bert import BertConfig, BertForPreTraining, BertModel

_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "relu": "relu"}


def config_from_hf(hf: dict) -> BertConfig:
    act = hf.get("hidden_act", "gelu")
    if act not in _ACTIVATIONS:
        raise ValueError(f"unsupported hidden_act {act!r} in the Hugging Face config")
    return BertConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        intermediate_size=hf.get("intermediate_size", 4 * hf["hidden_size"]),
        dropout=hf.get("hidden_dropout_prob", 0.1),
        attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
        layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
        max_position_embeddings=hf.get("max_position_embeddings", 512),
        type_vocab_size=hf.get("type_vocab_size", 2),
        pad_token_id=hf.get("pad_token_id", 0) or 0,
        activation=_ACTIVATIONS[act],
    )


def config_to_hf(cfg: BertConfig) -> dict:
    if cfg.norm_first:
        raise ValueError("Hugging Face BERT is post-LN; a pre-LN model cannot be exported to its format")
    act = {"gelu": "gelu", "gelu_tanh": "gelu_new", "relu": "relu"}[cfg.activation]
    return {
        "architectures": ["BertForPreTraining"],
        "model_type": "bert",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "intermediate_size": cfg.intermediate_size,
        "hidden_act": act,
        "hidden_dropout_prob": cfg.dropout,
        "attention_probs_dropout_prob": cfg.attention_dropout,
        "max_position_embeddings": cfg.max_position_embeddings,
        "type_vocab_size": cfg.type_vocab_size,
        "initializer_range": 0.02,
        "layer_norm_eps": cfg.layer_norm_eps,
        "pad_token_id": cfg.pad_token_id,
        "position_embedding_type": "absolute",
        "tie_word_embeddings": True,
    }


def _name_map(num_layers: int) -> dict[str, str]:
    """Our parameter name -> Hugging Face name (BertForPreTraining layout); q/k/v are handled apart."""
    m = {
        "bert.embeddings.word.weight": "bert.embeddings.word_embeddings.weight",
        "bert.embeddings.position.weight": "bert.embeddings.position_embeddings.weight",
        "bert.embeddings.segment.weight": "bert.embeddings.token_type_embeddings.weight",
        "bert.embeddings.norm.weight": "bert.embeddings.LayerNorm.weight",
        "bert.embeddings.norm.bias": "bert.embeddings.LayerNorm.bias",
        "bert.pooler.weight": "bert.pooler.dense.weight",
        "bert.pooler.bias": "bert.pooler.dense.bias",
        "mlm.transform.weight": "cls.predictions.transform.dense.weight",
        "mlm.transform.bias": "cls.predictions.transform.dense.bias",
        "mlm.norm.weight": "cls.predictions.transform.LayerNorm.weight",
        "mlm.norm.bias": "cls.predictions.transform.LayerNorm.bias",
        "mlm.bias": "cls.predictions.bias",
        "nsp.weight": "cls.seq_relationship.weight",
        "nsp.bias": "cls.seq_relationship.bias",
    }
    for i in range(num_layers):
        ours, theirs = f"bert.encoder.blocks.{i}.", f"bert.encoder.layer.{i}."
        for p in ("weight", "bias"):
            m[f"{ours}attention.out.{p}"] = f"{theirs}attention.output.dense.{p}"
            m[f"{ours}attention_norm.{p}"] = f"{theirs}attention.output.LayerNorm.{p}"
            m[f"{ours}ffn.0.{p}"] = f"{theirs}intermediate.dense.{p}"
            m[f"{ours}ffn.2.{p}"] = f"{theirs}output.dense.{p}"
            m[f"{ours}ffn_norm.{p}"] = f"{theirs}output.LayerNorm.{p}"
    return m


def bert_model_state_to_hf(bert: BertModel) -> dict[str, Tensor]:
    """The weights of our `BertModel` (no pretraining heads) under transformers' `BertModel` names."""
    num_layers, h = bert.cfg.num_layers, bert.cfg.hidden_size
    sd = {f"bert.{k}": v for k, v in bert.state_dict().items()}
    out = {hf[len("bert.") :]: sd[mine] for mine, hf in _name_map(num_layers).items() if mine in sd}
    for i in range(num_layers):
        for p in ("weight", "bias"):
            q, k, v = sd[f"bert.encoder.blocks.{i}.attention.qkv.{p}"].split(h, 0)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"encoder.layer.{i}.attention.self.{name}.{p}"] = t
    return out


def _read_hf_weights(folder: Path) -> dict[str, Tensor]:
    if (folder / "model.safetensors").is_file():
        sd = load_file(str(folder / "model.safetensors"))
    elif (folder / "pytorch_model.bin").is_file():
        sd = torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
    out = {}
    for k, v in sd.items():
        # TF-converted checkpoints name LayerNorm parameters gamma/beta.
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        # A bare BertModel checkpoint has no "bert." prefix.
        if k.startswith(("embeddings.", "encoder.", "pooler.")):
            k = "bert." + k
        out[k] = v
    return out


def load_hf_bert(folder: str | os.PathLike, strict_heads: bool = False) -> BertForPreTraining:
    """Build a `BertForPreTraining` from a Hugging Face BERT folder.

    A `BertModel` checkpoint has no pretraining heads: they keep their fresh initialisation unless
    `strict_heads`, which then raises.
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{folder / 'config.json'} does not exist (expected a Hugging Face BERT folder)"
        )
    cfg = config_from_hf(json.loads((folder / "config.json").read_text()))
    model = BertForPreTraining(cfg)
    theirs = _read_hf_weights(folder)
    ours = model.state_dict()
    new: dict[str, Tensor] = {}
    for mine, hf in _name_map(cfg.num_layers).items():
        if hf in theirs:
            new[mine] = theirs[hf]
    for i in range(cfg.num_layers):
        prefix = f"bert.encoder.layer.{i}.attention.self."
        for p in ("weight", "bias"):
            parts = [theirs.get(f"{prefix}{name}.{p}") for name in ("query", "key", "value")]
            if all(t is not None for t in parts):
                new[f"bert.encoder.blocks.{i}.attention.qkv.{p}"] = torch.cat(parts, 0)
    missing = [k for k in ours if k not in new and not k.startswith("mlm.embedding.")]
    body_missing = [k for k in missing if k.startswith("bert.")]
    if body_missing or (strict_heads and missing):
        raise ValueError(f"{folder}: checkpoint lacks {len(missing)} tensors, e.g. {missing[:3]}")
    for k, v in new.items():
        if ours[k].shape != v.shape:
            raise ValueError(f"{folder}: {k} has shape {tuple(v.shape)}, expected {tuple(ours[k].shape)}")
    model.load_state_dict(new, strict=False)
    return model


def save_hf_bert(model: BertForPreTraining, folder: str | os.PathLike, tokenizer=None) -> Path:
    """Write `model` as a Hugging Face `BertForPreTraining` folder (plus vocab.txt when a tokenizer is given)."""
    cfg = model.cfg
    hf_config = config_to_hf(cfg)  # refuses what the format cannot hold before anything is written
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sd = model.state_dict()
    out: dict[str, Tensor] = {hf: sd[mine] for mine, hf in _name_map(cfg.num_layers).items()}
    h = cfg.hidden_size
    for i in range(cfg.num_layers):
        for p in ("weight", "bias"):
            q, k, v = sd[f"bert.encoder.blocks.{i}.attention.qkv.{p}"].split(h, 0)
            for name, t in zip(("query", "key", "value"), (q, k, v)):
                out[f"bert.encoder.layer.{i}.attention.self.{name}.{p}"] = t
    out = {k: v.detach().contiguous().cpu() for k, v in out.items()}
    save_file(out, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(hf_config, indent=2))
    if tokenizer is not None:
        tokenizer.save(folder)
    return folder
