"""The clips of an audio-text split as training and evaluation items: `AudioTextDataset` (decoding, one caption
drawn per epoch or all of them), `AudioTextCollator` (padding and tokenising; clips that share a caption are one
group). The sources are read by manifests.py; predict_data.py makes the clips predict items."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datamodules.speech.librispeech import load_audio_or_skip, normalise_transcript, pad_waveforms
from datamodules.speech.manifests import AudioClip
from datamodules.tokenizer import TextTokenizer


def caption_groups(captions: Sequence[Sequence[str]]) -> list[int]:
    """A group id per clip: clips that share an identical (normalised) caption are one group, so neither the
    loss nor Recall@K counts such a clip or caption as a wrong match. Ids are numbered in order of first clip."""
    parent = list(range(len(captions)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[str, int] = {}
    for i, texts in enumerate(captions):
        for text in texts:
            j = owner.setdefault(text, i)
            a, b = find(i), find(j)
            if a != b:
                parent[max(a, b)] = min(a, b)
    ids: dict[int, int] = {}
    return [ids.setdefault(find(i), len(ids)) for i in range(len(captions))]


class AudioTextDataset(Dataset):
    """The clips of one split, mono at `sample_rate`. Training items carry one caption per clip, drawn afresh
    each epoch from (seed, epoch, clip); evaluation items carry all of them. An undecodable file yields None
    (warned once per file) for the collate function to drop."""

    def __init__(
        self,
        clips: Sequence[AudioClip],
        sample_rate: int = 16000,
        lowercase: bool = True,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        self.clips = list(clips)
        self.sample_rate = sample_rate
        self.train = train
        self.seed = seed
        self.epoch = 0
        self.captions = [[normalise_transcript(c, lowercase) for c in clip.captions] for clip in self.clips]
        self.groups = caption_groups(self.captions)
        # caption j of clip i has the key first_caption[i] + j: unique in the split, stable across epochs
        self.first_caption = np.concatenate([[0], np.cumsum([len(c) for c in self.captions])[:-1]]).tolist()
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.clips)

    @property
    def durations(self) -> list[float]:
        return [c.duration for c in self.clips]

    @property
    def num_captions(self) -> int:
        return sum(len(c) for c in self.captions)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def caption_choice(self, i: int) -> list[int]:
        """The captions item `i` carries this epoch (indices into its clip's)."""
        n = len(self.captions[i])
        if not self.train or n == 1:
            return list(range(n)) if not self.train else [0]
        return [int(np.random.default_rng([self.seed, self.epoch, i]).integers(n))]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        clip = self.clips[i]
        wave = load_audio_or_skip(clip.path, self.sample_rate, clip.frames, self._warned, clip.segment)
        if wave is None:
            return None
        chosen = self.caption_choice(i)
        return {
            "waveform": wave,
            "texts": [self.captions[i][j] for j in chosen],
            "raw": [clip.captions[j] for j in chosen],
            "caption_keys": [self.first_caption[i] + j for j in chosen],
            "utt_key": i,
            "text_id": self.groups[i],
        }


class AudioTextCollator:
    """Pads waveforms, tokenizes captions, drops items the dataset gave up on.

    Batch (B clips): `waveforms` (B, T), `wave_lengths` (B,), `utt_keys` (B,) clip index in the split, `text_ids`
    (B,) the clip's group (`caption_groups`), `skipped` int, and `input_ids` / `attention_mask` (N, L) with
    `transcripts` (N captions as written). Training: N = B, row i's caption is clip i's. Evaluation (`all_captions`):
    every caption of every clip, N >= B, with `caption_keys` (N,) unique caption ids, `caption_utt_keys` (N,)
    and `caption_groups` (N,) the clip and group each belongs to, so Recall@K scores each clip once against all
    captions.
    """

    def __init__(
        self, tokenizer: TextTokenizer, context_length: int = 64, all_captions: bool = False
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.all_captions = all_captions

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [it for it in items if it is not None]
        waveforms, lengths = pad_waveforms([it["waveform"] for it in kept])
        texts = [t for it in kept for t in it["texts"]]
        if texts:
            text = self.tokenizer(texts, max_length=self.context_length)
        else:  # every file in the batch was bad: an empty batch the module skips
            text = {
                "input_ids": torch.zeros(0, 0, dtype=torch.long),
                "attention_mask": torch.zeros(0, 0, dtype=torch.bool),
            }
        batch = {
            "waveforms": waveforms,
            "wave_lengths": lengths,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "utt_keys": torch.tensor([it["utt_key"] for it in kept], dtype=torch.long),
            "text_ids": torch.tensor([it["text_id"] for it in kept], dtype=torch.long),
            "transcripts": [t for it in kept for t in it["raw"]],
            "skipped": len(items) - len(kept),
        }
        if self.all_captions:
            per_clip = [len(it["texts"]) for it in kept]
            batch["caption_keys"] = torch.tensor(
                [k for it in kept for k in it["caption_keys"]], dtype=torch.long
            )
            batch["caption_utt_keys"] = batch["utt_keys"].repeat_interleave(
                torch.tensor(per_clip, dtype=torch.long)
            )
            batch["caption_groups"] = batch["text_ids"].repeat_interleave(
                torch.tensor(per_clip, dtype=torch.long)
            )
        return batch
