"""Speech-text contrastive alignment (LibriSpeech): a speech tower and a BERT text tower in one joint space.

a = utterances, b = their transcripts. Identical transcripts share a `text_id`: they are positives of each
other in the loss and in Recall@K, never negatives.
"""

from __future__ import annotations

import os
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.contrastive import (
    ContrastiveLossConfig,
    ContrastivePair,
    PairEmbeddings,
    as_config,
)
from lightning_modules.components.speech_tower import SpeechTowerConfig, build_speech_tower
from lightning_modules.components.text_tower import TextTowerConfig, build_text_tower
from lightning_modules.contrastive_module import ContrastiveModule, load_pair_weights, trained_text_section
from lightning_modules.training.checkpoints import check_system, read_checkpoint
from lightning_modules.training.prediction import embedding_prediction

# transcripts are longer than captions, and the text tower trains from scratch with BERT's dropout
_SPEECH, _TEXT = SpeechTowerConfig(), TextTowerConfig(dropout=0.1, max_len=512)


class SpeechTextPair(ContrastivePair):
    """Utterances (a) against transcripts (b); logs `a2t` (speech -> text) and `t2a` retrieval."""

    rows_key = "utt_keys"
    sides = ("utterances", "texts")
    row_keys = (
        "waveforms",
        "wave_lengths",
        "input_ids",
        "attention_mask",
        "utt_keys",
        "text_ids",
        "transcripts",
    )

    def __init__(
        self, speech: nn.Module, text: nn.Module, embed_dim: int, loss: ContrastiveLossConfig
    ) -> None:
        super().__init__(embed_dim, loss, prefixes=("a2t", "t2a"))
        self.speech = speech
        self.text = text

    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        speech = self.speech(batch["waveforms"], batch["wave_lengths"])
        text = self.text(batch["input_ids"], batch["attention_mask"])
        keys, groups = batch["utt_keys"], batch["text_ids"]
        if "caption_groups" not in batch:  # one text per utterance, keyed and grouped as the utterance
            return PairEmbeddings(
                a=speech, b=text, a_keys=keys, a_groups=groups, b_keys=keys, b_groups=groups
            )
        # clips with all their captions (evaluation of Clotho, AudioCaps): every caption is scored, and the loss
        # pairs each clip with its first caption
        first = (batch["caption_utt_keys"][None, :] == keys[:, None]).float().argmax(1)
        return PairEmbeddings(
            speech, text, keys, groups, batch["caption_keys"], batch["caption_groups"], first
        )


class SpeechTextModule(ContrastiveModule):
    """Aligns utterances with transcripts; logs `val/a2t_R@K` (speech -> text), `val/t2a_R@K` and `val/loss`."""

    def __init__(
        self, speech: SpeechTowerConfig = _SPEECH, text: TextTowerConfig = _TEXT, **kwargs: Any
    ) -> None:
        """
        Args:
            speech: the speech tower (model.speech.size, .encoder, SpecAugment, ...).
            text: the text tower (model.text.size, .max_len, ...); dropout 0.1 and 512 positions by default.
            kwargs: as for `ImageTextModule`.
        """
        super().__init__(**kwargs)
        speech, text = as_config(SpeechTowerConfig, speech), as_config(TextTowerConfig, text)
        self.tower_configs = {"speech": speech, "text": text}
        self.build_pair(SpeechTextPair, build_speech_tower(speech, self.embed_dim), text)

    # inference --------------------------------------------------------------------------------
    def encode_speech(self, waveforms: Tensor, wave_lengths: Tensor) -> Tensor:
        """(B, T) zero-padded waveforms and their (B,) lengths -> (B, embed_dim) unit vectors."""
        return F.normalize(self.pair.speech(waveforms, wave_lengths), dim=-1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Unit embeddings of the batch's utterances and transcripts, with their ids (`PredictionWriter`)."""
        return embedding_prediction(
            batch,
            speech=self.encode_speech,
            text=self.encode_text,
            text_kind=batch.get("text_kind", "transcript"),
        )


def speech_text_from_checkpoint(path: str | os.PathLike, asked_by: str) -> tuple[SpeechTextPair, dict]:
    """The contrastive core (`SpeechTextPair`, eval mode) of a `SpeechTextModule` checkpoint, and the checkpoint.

    Read through `read_checkpoint` (weights_only, memory-mapped). The towers are built from the saved
    hyperparameters as the system builds them and the trained weights follow: a text tower's MLM start is not
    read again; a pretrained speech tower's folder is, for its architecture."""
    ckpt = read_checkpoint(path, needs=("state_dict", "hyper_parameters"))
    check_system(path, ckpt, SpeechTextModule, asked_by)
    hparams = ckpt["hyper_parameters"]
    embed_dim = hparams["embed_dim"]
    speech = as_config(SpeechTowerConfig, hparams.get("speech") or {})
    text = as_config(TextTowerConfig, trained_text_section(hparams.get("text")))
    pair = SpeechTextPair(
        build_speech_tower(speech, embed_dim),
        build_text_tower(text, hparams["vocab_size"], embed_dim),
        embed_dim,
        as_config(ContrastiveLossConfig, hparams["loss"]),
    )
    return load_pair_weights(pair, ckpt, path, "speech-text"), ckpt
