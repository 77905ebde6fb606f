"""Tiny image-text, speech-text and tri-modal systems and batches for them, built in-process: the set-up
of the contrastive training tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields

import torch
from lightning import LightningModule

from lightning_modules.components.contrastive import ContrastiveLossConfig
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.speech_tower import SpeechTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.speech_text_module import SpeechTextModule
from lightning_modules.trimodal_module import TriModalModule

VOCAB = 50
# no dropout, no SpecAugment: the two runs draw their random numbers in different orders
IMAGE = ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2)
SPEECH = SpeechTowerConfig(
    "tiny", layers=1, hidden=32, heads=2, dropout=0.0, n_mels=16, conv_channels=4, freq_masks=0, time_masks=0
)
TEXT = TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16)


def image_text_batches(g: torch.Generator) -> tuple[dict, dict]:
    """A training batch (4 pairs, two captions of image 1) and an evaluation batch (2 images, 5 captions)."""
    train = {
        "images": torch.randn(4, 3, 16, 16, generator=g),
        "input_ids": torch.randint(5, VOCAB, (4, 6), generator=g),
        "attention_mask": torch.ones(4, 6, dtype=torch.bool),
        "image_ids": torch.tensor([1, 2, 1, 3]),
        "caption_ids": torch.arange(100, 104),
        "skipped": 0,
    }
    val = {
        "images": torch.randn(2, 3, 16, 16, generator=g),
        "input_ids": torch.randint(5, VOCAB, (5, 6), generator=g),
        "attention_mask": torch.ones(5, 6, dtype=torch.bool),
        "image_ids": torch.tensor([7, 8]),
        "caption_ids": torch.arange(200, 205),
        "caption_image_ids": torch.tensor([7, 7, 7, 8, 8]),
        "skipped": 0,
    }
    return train, val


def speech_text_batch(g: torch.Generator, text_ids: list[int]) -> dict:
    n = len(text_ids)
    lengths = torch.tensor([3000 - 400 * i for i in range(n)])
    waves = 0.1 * torch.randn(n, 3000, generator=g) * (torch.arange(3000)[None, :] < lengths[:, None])
    return {
        "waveforms": waves,
        "wave_lengths": lengths,
        "input_ids": torch.randint(5, VOCAB, (n, 6), generator=g),
        "attention_mask": torch.ones(n, 6, dtype=torch.bool),
        "utt_keys": torch.arange(n) + 10 * text_ids[0],
        "text_ids": torch.tensor(text_ids),
        "transcripts": [f"t{i}" for i in text_ids],
        "skipped": 0,
    }


def image_text_system() -> tuple[LightningModule, dict, list[dict]]:
    torch.manual_seed(0)
    train, val = image_text_batches(torch.Generator().manual_seed(1))
    return ImageTextModule(IMAGE, TEXT, vocab_size=VOCAB, embed_dim=16), train, [val]


def speech_text_system() -> tuple[LightningModule, dict, list[dict]]:
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    train, val = speech_text_batch(g, [1, 2, 1, 3]), speech_text_batch(g, [4, 5, 6])
    return SpeechTextModule(SPEECH, TEXT, vocab_size=VOCAB, embed_dim=16), train, [val]


def trimodal_system() -> tuple[LightningModule, dict, list[dict]]:
    (_, image_train, (image_val,)), (_, speech_train, (speech_val,)) = (
        image_text_system(),
        speech_text_system(),
    )
    torch.manual_seed(0)
    module = TriModalModule(IMAGE, SPEECH, TEXT, vocab_size=VOCAB, embed_dim=16, speech_text_weight=2.0)
    return (
        module,
        {"image_text": image_train, "speech_text": speech_train},
        [image_val, speech_val],
    )


SYSTEMS: dict[str, Callable[[], tuple[LightningModule, dict, list[dict]]]] = {
    "image_text": image_text_system,
    "speech_text": speech_text_system,
    "trimodal": trimodal_system,
}


# bf16 weights and activations against float32 ones: the loss moves by ~1e-2 relative (8 bits of mantissa);
# a wrong plan (a tower left unsharded, a pair's temperature from the other pair) moves it by far more
BF16_TOL = dict(rtol=3e-2, atol=3e-2)


TINY = dict(
    embed_dim=32,
    image=ImageTowerConfig("vit_tiny", image_size=32, layers=1),
    speech=SpeechTowerConfig(
        "tiny",
        layers=1,
        hidden=64,
        heads=2,
        conv_channels=8,
        dropout=0.0,
        freq_masks=0,  # no SpecAugment: the gradient test compares repeated forward passes
        time_masks=0,
    ),
    text=TextTowerConfig("tiny", layers=1, hidden=64, heads=2, max_len=32),
)


IMAGE_TEXT_VOCAB = 60


def sections(kwargs: dict) -> dict:
    """The tests' flat settings sorted into the module's config sections."""
    out = {"grad_cache_chunks": kwargs.pop("grad_cache_chunks", 1)}
    if "loss" in kwargs:
        kwargs["name"] = kwargs.pop("loss")
    for name, cls in (("loss", ContrastiveLossConfig), ("optimizer", OptimizerConfig)):
        names = {f.name for f in fields(cls)}
        out[name] = cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names})
    assert not kwargs, f"no section takes {sorted(kwargs)}"
    return out


def image_text(dropout: float = 0.0, gradient_checkpointing: bool = False, **kwargs) -> ImageTextModule:
    torch.manual_seed(0)
    image = ImageTowerConfig(
        "vit_tiny", 16, layers=1, width=32, heads=2, dropout=dropout, attention_dropout=dropout
    )
    text = TextTowerConfig(
        "tiny",
        layers=1,
        hidden=32,
        heads=2,
        dropout=dropout,
        max_len=16,
        gradient_checkpointing=gradient_checkpointing,
    )
    return ImageTextModule(image, text, vocab_size=IMAGE_TEXT_VOCAB, embed_dim=16, **sections(kwargs))
