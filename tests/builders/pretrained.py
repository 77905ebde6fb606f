"""Tiny random Hugging Face model folders (BERT, RoBERTa, wav2vec 2.0, HuBERT, WavLM) as save_pretrained
writes them; importing this module skips the test module without transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from datamodules.tokenizer import train_wordpiece

transformers = pytest.importorskip("transformers")

TEXTS = [
    "a red circle above a blue square",
    "two green triangles on the left",
    "the quick brown fox jumps over the lazy dog",
    "speech and text in one joint space",
] * 5


TEXT_BODY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


def bert_folder(root: Path) -> Path:
    """A tiny random `BertModel` and its WordPiece tokenizer, as save_pretrained writes them."""
    tok = train_wordpiece(TEXTS, vocab_size=80, min_frequency=1)
    hf_tok = transformers.BertTokenizerFast(tokenizer_object=tok, do_lower_case=True)
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=tok.get_vocab_size(), **TEXT_BODY, max_position_embeddings=64)
    folder = root / "bert"
    transformers.BertModel(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def roberta_folder(root: Path) -> Path:
    """A tiny random `RobertaModel` and its byte-level BPE tokenizer (tokenizer.json, vocab.json, merges.txt)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok.train_from_iterator(
        TEXTS, trainers.BpeTrainer(vocab_size=120, special_tokens=specials, show_progress=False)
    )
    tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    hf_tok = transformers.RobertaTokenizerFast(tokenizer_object=tok)
    torch.manual_seed(0)
    cfg = transformers.RobertaConfig(
        vocab_size=tok.get_vocab_size(),
        **TEXT_BODY,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
    )
    folder = root / "roberta"
    transformers.RobertaModel(cfg).save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


# 320 samples (20 ms) a frame, as the real models: a 3 s utterance gives 150 frames, not thousands
SPEECH_CONV = dict(conv_dim=(16,) * 4, conv_kernel=(10, 3, 3, 3), conv_stride=(5, 4, 4, 4), conv_bias=False)
SPEECH_BODY = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    mask_time_prob=0.0,
)


def speech_folder(root: Path, kind: str) -> Path:
    """A tiny random wav2vec 2.0 (GroupNorm feature encoder), HuBERT (LayerNorm, stable layer norm) or WavLM."""
    torch.manual_seed(0)
    if kind == "wav2vec2":
        model = transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**SPEECH_CONV, **SPEECH_BODY))
    elif kind == "hubert":
        cfg = transformers.HubertConfig(
            **SPEECH_CONV, **SPEECH_BODY, feat_extract_norm="layer", do_stable_layer_norm=True
        )
        model = transformers.HubertModel(cfg)
    else:
        model = transformers.WavLMModel(
            transformers.WavLMConfig(**SPEECH_CONV, **SPEECH_BODY, num_buckets=32)
        )
    folder = root / kind
    model.save_pretrained(folder)
    return folder
