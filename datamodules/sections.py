"""Config sections every DataModule shares: how batches are loaded and which tokenizer turns text into ids.

A DataModule takes them as `loader: LoaderConfig` and `tokenizer: TokenizerConfig`, so the same setting has one
spelling in every config (`--data.loader.batch_size 64`, `--data.tokenizer.path vocab.txt`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from datamodules.tokenizer import TextTokenizer, build_tokenizer


@dataclass
class LoaderConfig:
    """Batching and worker settings of a DataModule's loaders."""

    batch_size: int = 32
    """Training examples per batch and device."""
    eval_batch_size: int | None = None
    """Examples per validation, test and predict batch; None: `batch_size`."""
    num_workers: int = 4
    """DataLoader worker processes per device."""
    seed: int = 0
    """Seed of the shuffling and of random augmentations (each epoch and rank derive their own)."""
    pin_memory: bool | None = None
    """Page-lock batches for faster host-to-GPU copies; None: exactly when CUDA is available."""

    @property
    def eval_size(self) -> int:
        return self.eval_batch_size or self.batch_size

    @property
    def pin(self) -> bool:
        return torch.cuda.is_available() if self.pin_memory is None else self.pin_memory


@dataclass
class TokenizerConfig:
    """The WordPiece tokenizer of a DataModule: loaded from `path`, or trained on the training text once and cached."""

    path: str | None = None
    """A vocab.txt, tokenizer.json or a folder holding one; None trains one on the training text."""
    vocab_size: int = 8192
    """Vocabulary size of a trained tokenizer."""
    lowercase: bool = True
    """Lowercase text before WordPiece (uncased models)."""
    strip_accents: bool | None = None
    """Remove accents; None: exactly when lowercasing (BERT-uncased's rule)."""
    cache_dir: str = "data_cache"
    """Folder the trained vocabulary is cached in (the framework owns what it writes there)."""

    def build(
        self, texts: Iterable[str] | Callable[[], Iterable[str]] | None, key: str | None = None
    ) -> TextTokenizer:
        """The tokenizer: `path` when given, else one trained on `texts` (see `build_tokenizer`)."""
        return build_tokenizer(
            self.path,
            texts,
            os.fspath(self.cache_dir),
            self.vocab_size,
            self.lowercase,
            key=key,
            strip_accents=self.strip_accents,
        )
