"""The inputs of `predict` for the alignment systems: plain folders of images or audio files, a text file with
one caption (or transcript) per line, and the items of a labelled split, all as one kind of item and batch.

Item: any of `image` + `image_key`, `waveform` + `audio_key`, `texts` + `text_keys` (lists: a COCO image brings
all its captions), or `unreadable` (the path of a file that could not be decoded, which the collate function
drops and the batch lists so that the prediction writer can name it in its metadata).

Batch: `images` (B, 3, H, W) uint8 (the image tower normalises them on the device) and `image_keys`; `waveforms`
(B, T) zero-padded, `wave_lengths` (B,) and `audio_keys`; `input_ids` / `attention_mask` (N, L) and `text_keys`, `text_kind` (caption or transcript); `unreadable`
list[str]. Keys are strings: a
file's path relative to its folder, `<file name>:<line>`, a COCO id, a LibriSpeech utterance id.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from datamodules.image.coco import read_rgb  # decodes every format torchvision or PIL can
from datamodules.speech.librispeech import AudioDecodeError, load_audio, pad_waveforms
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
AUDIO_SUFFIXES = (".flac", ".wav", ".ogg", ".mp3", ".opus")


def list_files(folder: str | Path, suffixes: Sequence[str], what: str) -> list[Path]:
    """Files under `folder` (recursively) with one of `suffixes`, in a fixed order; a one-line error when the
    folder is missing or holds none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"predict folder {root} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise FileNotFoundError(f"predict folder {root} holds no {what} files ({', '.join(suffixes)})")
    return files


class ImageFiles(Dataset):
    """The images of a folder; key = path relative to the folder."""

    def __init__(self, folder: str | Path, transform: Callable[[Tensor], Tensor]) -> None:
        self.root = Path(folder)
        self.files = list_files(folder, IMAGE_SUFFIXES, "image")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        key = path.relative_to(self.root).as_posix()
        try:
            pixels = read_rgb(str(path))
        except Exception as err:  # any decoder's failure on one file: skip it, never end the run
            log.warning("skipping unreadable image %s: %s", path, err)
            return {"unreadable": str(path)}
        return {"image": self.transform(pixels), "image_key": key}


class AudioFiles(Dataset):
    """The audio files of a folder, mono at `sample_rate`; key = the file name without its suffix (a
    LibriSpeech utterance id for LibriSpeech files)."""

    def __init__(self, folder: str | Path, sample_rate: int) -> None:
        self.root = Path(folder)
        self.files = list_files(folder, AUDIO_SUFFIXES, "audio")
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path = self.files[i]
        try:
            wave = load_audio(path, self.sample_rate)
        except AudioDecodeError as err:
            log.warning("skipping unreadable audio %s", err)
            return {"unreadable": str(path)}
        return {"waveform": wave, "audio_key": path.relative_to(self.root).with_suffix("").as_posix()}


class TextLines(Dataset):
    """The non-blank lines of a UTF-8 text file; key = `<file name>:<line number>` (from 1), e.g. `captions.txt:3`."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"predict text file {path} does not exist")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text: {err.reason} at byte {err.start}") from None
        self.name = path.name
        self.rows = [(n, line.strip()) for n, line in enumerate(lines, 1) if line.strip()]
        if not self.rows:
            raise ValueError(f"predict text file {path} holds no text")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        line, text = self.rows[i]
        # the file's name in the key keeps its lines apart from a split's caption ids in one output
        return {"texts": [text], "text_keys": [f"{self.name}:{line}"], "line": line}


class CaptionedImageItems(Dataset):
    """A COCO split (a `CocoCaptionsDataset` in evaluation mode) as predict items: each image with all its
    captions; keys = the COCO image id and the caption (annotation) ids."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        record, item = self.dataset.images[i], self.dataset[i]
        if item is None:
            return {"unreadable": str(record.path)}
        return {
            "image": item["image"],
            "image_key": str(record.image_id),
            "texts": list(item["captions"]),
            "text_keys": [str(c) for c in item["caption_ids"]],
        }


class UtteranceItems(Dataset):
    """LibriSpeech subsets (a `LibriSpeechDataset`) as predict items: each utterance with its normalised
    transcript; both keyed by the utterance id (`84-121123-0000`, the audio file's name)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        utterance, item = self.dataset.utterances[i], self.dataset[i]
        if item is None:
            return {"unreadable": str(utterance.path)}
        key = utterance.key
        return {"waveform": item["waveform"], "audio_key": key, "texts": [item["text"]], "text_keys": [key]}


class ClipItems(Dataset):
    """An audio-text split (an `AudioTextDataset`) as predict items: each clip with all its captions; keys
    = the clip's key and `<clip key>#<n>` for its n-th caption (from 1)."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        clip, item = self.dataset.clips[i], self.dataset[i]
        if item is None:
            return {"unreadable": clip.path}
        return {
            "waveform": item["waveform"],
            "audio_key": clip.key,
            "texts": item["texts"],
            "text_keys": [f"{clip.key}#{n}" for n in range(1, len(item["texts"]) + 1)],
        }


class PredictCollate:
    """Items (see the module docstring) to one batch; unreadable files are dropped and listed."""

    def __init__(self, tokenizer: TextTokenizer, context_length: int, text_kind: str = "caption") -> None:
        """
        Args:
            tokenizer: tokenizes the texts.
            context_length: longest token sequence, [CLS] and [SEP] included.
            text_kind: what the texts are (caption, transcript), told to the system in `text_kind`.
        """
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.text_kind = text_kind

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {
            "unreadable": [it["unreadable"] for it in items if "unreadable" in it],
            "text_kind": self.text_kind,
        }
        kept = [it for it in items if "unreadable" not in it]
        images = [it for it in kept if "image" in it]
        if images:
            batch["images"] = torch.stack([it["image"] for it in images])
            batch["image_keys"] = [it["image_key"] for it in images]
        waves = [it for it in kept if "waveform" in it]
        if waves:
            batch["waveforms"], batch["wave_lengths"] = pad_waveforms([it["waveform"] for it in waves])
            batch["audio_keys"] = [it["audio_key"] for it in waves]
        texts = [t for it in kept for t in it.get("texts", ())]
        if texts:
            batch.update(self.tokenizer(texts, self.context_length))
            batch["text_keys"] = [k for it in kept for k in it.get("text_keys", ())]
        return batch


def audio_text_predict_loaders(
    items: Dataset | None,
    audio: str | None,
    texts: str | None,
    *,
    sample_rate: int,
    collate: Callable[[], Callable[[list[dict[str, Any]]], dict[str, Any]]],
    batch_size: int,
    num_workers: int,
    nothing: str,
    pin_memory: bool = False,
) -> list[DataLoader]:
    """The speech-text DataModules' predict loaders, one per input given, in this order: a split's `items` (clips
    or utterances with their texts), the audio files of the folder `audio` at `sample_rate`, the lines of the
    file `texts`. With none given, ValueError(`nothing`), which names the module's settings; `collate` makes the
    batch function (a `PredictCollate`) only then, so that error comes before any tokenizer is loaded or
    trained."""
    datasets: list[Dataset] = [items] if items is not None else []
    if audio:
        datasets.append(AudioFiles(audio, sample_rate))
    if texts:
        datasets.append(TextLines(texts))
    if not datasets:
        raise ValueError(nothing)
    collate_fn = collate()
    return [
        DataLoader(
            d, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn, pin_memory=pin_memory
        )
        for d in datasets
    ]


class MaskedLinesCollate:
    """Lines with `[MASK]` tokens (from `TextLines`) to MLM inputs: the text between masks is tokenized and the
    tokenizer's mask id put in place of each `[MASK]`, whatever the tokenizer's normaliser does to the string.

    Batch: `input_ids` / `attention_mask` (B, L) `[CLS] ... [SEP]`, `predict_mask` (B, L) bool at the masks,
    `index` (B,) line numbers, `text` list[str], `top_k` int. A line cut at `max_length` loses its later masks.
    """

    def __init__(self, tokenizer: TextTokenizer, max_length: int, top_k: int) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.top_k = top_k
        self.mask_token = tokenizer.tokenizer.id_to_token(tokenizer.mask_id)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        tok = self.tokenizer
        texts = [it["texts"][0] for it in items]
        bodies = []
        for text in texts:
            pieces = tok.encode_batch(text.split(self.mask_token))
            bodies.append([t for k, ids in enumerate(pieces) for t in ([tok.mask_id] if k else []) + ids])
        batch = tok.pack(bodies, self.max_length)
        return {
            **batch,
            "predict_mask": batch["input_ids"] == tok.mask_id,
            "index": torch.tensor([it["line"] for it in items], dtype=torch.long),
            "text": texts,
            "top_k": self.top_k,
        }
