"""CLIP's byte-level BPE tokenizer for a whole-CLIP start, from the same source as the model: open_clip's own
tokenizer for an open_clip model name (its vocabulary file ships inside the open_clip package), or a Hugging Face
CLIP folder's tokenizer files (tokenizer.json, or vocab.json + merges.txt). Nothing is downloaded.

Rows are `<|startoftext|> text <|endoftext|>`, truncated and padded to exactly `max_length` (CLIP's context
length, 77): open_clip adds its whole position table, so its text tower needs that length.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch

OPEN_CLIP_PREFIX = "open_clip:"


def is_clip_tokenizer(path: str | None) -> bool:
    """Whether data.tokenizer names a CLIP tokenizer: `open_clip:NAME` or a Hugging Face CLIP folder."""
    if not path:
        return False
    if path.startswith(OPEN_CLIP_PREFIX):
        return True
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "clip"


class ClipTokenizer:
    """CLIP's tokenizer with the interface of `TextTokenizer` the image-text DataModule uses."""

    def __init__(self, path: str) -> None:
        self.source = path
        if path.startswith(OPEN_CLIP_PREFIX):
            import open_clip

            name = path[len(OPEN_CLIP_PREFIX) :]
            self._open_clip = open_clip.get_tokenizer(name)
            self._hf = None
            self.vocab_size = len(self._open_clip.encoder)
            self.pad_id = 0  # open_clip pads with 0; its EOT pooling takes the highest id, the end token
        else:
            from transformers import CLIPTokenizerFast

            folder = Path(path)
            if not any((folder / f).is_file() for f in ("tokenizer.json", "vocab.json")):
                raise FileNotFoundError(
                    f"{folder} has no CLIP tokenizer files: give a folder with tokenizer.json, or vocab.json and "
                    "merges.txt (CLIPTokenizerFast.save_pretrained writes them)"
                )
            self._open_clip = None
            self._hf = CLIPTokenizerFast.from_pretrained(str(folder), local_files_only=True)
            self.vocab_size = len(self._hf)
            self.pad_id = self._hf.pad_token_id

    def fingerprint(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def __call__(self, texts: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        """(B, max_length) ids and mask, start and end tokens included, truncated to `max_length`."""
        if self._open_clip is not None:
            ids = self._open_clip(list(texts), context_length=max_length)
            ends = ids.argmax(dim=-1)  # the end token has the highest id of the vocabulary
            mask = torch.arange(max_length)[None, :] <= ends[:, None]
            return {"input_ids": ids, "attention_mask": mask}
        out = self._hf(
            list(texts), padding="max_length", truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"].bool()}
