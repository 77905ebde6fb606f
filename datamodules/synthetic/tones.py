"""A synthetic LibriSpeech-format corpus for the CPU quickstart: every word of a small vocabulary is
"spoken" as its own fixed sequence of sine tones, so a small speech-text model can learn retrieval
in minutes.

The layout matches the real corpus (`LibriSpeech/<subset>/<speaker>/<chapter>/*.flac`, one
`<speaker>-<chapter>.trans.txt` per chapter, a `SPEAKERS.TXT`), so the same DataModule reads both.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf

from datamodules.generated import claim_folder, generated_by, root_advice, written_whole

log = logging.getLogger(__name__)

GENERATOR = "datamodules.synthetic.tones.generate_tone_librispeech"

VOCABULARY = (
    "THE", "A", "RED", "BLUE", "GREEN", "CAT", "DOG", "BIRD", "RUNS", "JUMPS",
    "SEES", "BIG", "SMALL", "HOUSE", "TREE", "RIVER", "OVER", "UNDER", "NEAR", "QUICKLY",
    "SLOWLY", "SUN", "MOON", "STAR", "EATS", "SINGS", "OLD", "YOUNG", "MAN", "WOMAN",
    "CHILD", "BOAT", "ROAD", "HILL", "LIGHT", "DARK", "STONE", "FIRE", "WATER", "WIND",
)  # fmt: skip

# The tone "pronunciation" of each word is drawn from this fixed seed, not from `seed`, so every
# generated set (and every split) speaks the same language.
_LEXICON_SEED = 20240601
# Log-spaced so neighbouring tones stay distinguishable after speaker pitch shifts of a few percent.
_TONE_FREQS = np.geomspace(300.0, 3400.0, 16)
_SPLITS = (("train-clean-100", 8, 2, 100), ("dev-clean", 4, 1, 900))  # subset, speakers, chapters, first id
_FADE_S = 0.01


def tone_lexicon(
    words: Sequence[str] = VOCABULARY, durations: tuple[float, float] = (0.12, 0.2)
) -> dict[str, list[tuple[float, float]]]:
    """word -> [(frequency Hz, duration s), ...]: 2 or 3 tones, each pattern unique, durations drawn from
    `durations`. Seeded: the same word list always sounds the same."""
    rng = np.random.default_rng(_LEXICON_SEED)
    seen: set[tuple[int, ...]] = set()
    lexicon: dict[str, list[tuple[float, float]]] = {}
    for word in words:
        tones: tuple[int, ...] = ()
        while not tones or tones in seen:
            n = int(rng.integers(2, 4))
            tones = tuple(int(t) for t in rng.choice(len(_TONE_FREQS), size=n, replace=False))
        seen.add(tones)
        lexicon[word] = [(float(_TONE_FREQS[t]), float(rng.uniform(*durations))) for t in tones]
    return lexicon


def _tone(freq: float, seconds: float, sample_rate: int) -> np.ndarray:
    n = max(1, int(round(seconds * sample_rate)))
    wave = np.sin(2 * np.pi * freq * np.arange(n) / sample_rate)
    # Raised-cosine edges: hard onsets would add broadband clicks that blur the tone identity.
    fade = min(int(_FADE_S * sample_rate), n // 2)
    if fade > 0:
        ramp = 0.5 - 0.5 * np.cos(np.pi * np.arange(fade) / fade)
        wave[:fade] *= ramp
        wave[n - fade :] *= ramp[::-1]
    return wave


def render_sentence(
    words: list[str],
    sample_rate: int,
    rng: np.random.Generator,
    pitch: float = 1.0,
    lexicon: dict[str, list[tuple[float, float]]] | None = None,
) -> np.ndarray:
    """Render `words` as tone patterns with per-utterance amplitude, speed, pitch and noise variation."""
    lexicon = lexicon or tone_lexicon()
    speed = rng.uniform(0.9, 1.1)
    amplitude = rng.uniform(0.25, 0.6)
    pitch = pitch * rng.uniform(0.98, 1.02)

    def silence(seconds: float) -> np.ndarray:
        return np.zeros(int(round(seconds * sample_rate)))

    parts = [silence(rng.uniform(0.05, 0.2))]
    for i, word in enumerate(words):
        if i:
            parts.append(silence(rng.uniform(0.04, 0.1) / speed))
        parts.extend(_tone(f * pitch, d / speed, sample_rate) for f, d in lexicon[word])
    parts.append(silence(rng.uniform(0.05, 0.2)))
    wave = amplitude * np.concatenate(parts)
    wave += rng.normal(0.0, rng.uniform(0.002, 0.02), size=wave.shape)
    return np.clip(wave, -1.0, 1.0).astype(np.float32)


def _write_subset(
    folder: Path,
    subset: str,
    n_utts: int,
    n_speakers: int,
    n_chapters: int,
    first_id: int,
    sample_rate: int,
    rng: np.random.Generator,
    lexicon: dict[str, list[tuple[float, float]]],
) -> list[str]:
    """Write one subset; returns its SPEAKERS.TXT lines."""
    speakers = [first_id + s for s in range(n_speakers)]
    pitches = {spk: float(rng.uniform(0.93, 1.07)) for spk in speakers}  # a speaker's "voice"
    chapters = [(spk, spk * 10 + c) for spk in speakers for c in range(n_chapters)]
    per_chapter: dict[tuple[int, int], list[str]] = {sc: [] for sc in chapters}
    seconds = dict.fromkeys(speakers, 0.0)
    for u in range(n_utts):
        spk, chap = chapters[u % len(chapters)]
        utt_id = f"{spk}-{chap}-{len(per_chapter[(spk, chap)]):04d}"
        n_words = int(rng.integers(3, 7))
        words = [VOCABULARY[w] for w in rng.choice(len(VOCABULARY), size=n_words, replace=False)]
        wave = render_sentence(words, sample_rate, rng, pitches[spk], lexicon)
        chapter_dir = folder / subset / str(spk) / str(chap)
        chapter_dir.mkdir(parents=True, exist_ok=True)
        sf.write(chapter_dir / f"{utt_id}.flac", wave, sample_rate, subtype="PCM_16", format="FLAC")
        per_chapter[(spk, chap)].append(f"{utt_id} {' '.join(words)}\n")
        seconds[spk] += len(wave) / sample_rate
    for (spk, chap), lines in per_chapter.items():
        if lines:
            (folder / subset / str(spk) / str(chap) / f"{spk}-{chap}.trans.txt").write_text("".join(lines))
    return [
        f"{spk:<5}| {'F' if spk % 2 else 'M'} | {subset:<16} | {seconds[spk] / 60:5.2f} | Tone Reader {spk}\n"
        for spk in speakers
        if seconds[spk] > 0
    ]


def generate_tone_librispeech(
    root: str | os.PathLike,
    n_train_utts: int = 600,
    n_val_utts: int = 100,
    sample_rate: int = 16000,
    seed: int = 0,
    setting: str = "data.root",
) -> Path:
    """Write `root/LibriSpeech/{train-clean-100,dev-clean}` of tone sentences; returns `root/LibriSpeech`.

    Idempotent: an existing `root/LibriSpeech` is left as it is. Writes only into a `root` that does not exist,
    is empty or carries this generator's marker (`datamodules/generated.py`); any other folder raises
    `ForeignDataError` naming `setting`, the setting that points at it. Atomic: the tree is written into a
    temporary folder and renamed into place, so an interrupted run leaves nothing half-done.
    """
    root = Path(root)
    target = root / "LibriSpeech"
    params = {
        "n_train_utts": n_train_utts,
        "n_val_utts": n_val_utts,
        "sample_rate": sample_rate,
        "seed": seed,
    }
    if target.is_dir():
        marker = generated_by(root)
        if marker is not None and marker["generator"] == GENERATOR and marker["params"] != params:
            log.warning("%s already holds a synthetic set made with other settings; keeping it", target)
        return target
    claim_folder(root, GENERATOR, params, root_advice(setting))
    with written_whole(root, GENERATOR, params, [target.name], target.is_dir) as tmp:
        tree = tmp / target.name
        tree.mkdir()
        lexicon = tone_lexicon()
        speaker_lines = [
            "; Synthetic tone corpus written by datamodules/synthetic/tones.py\n",
            ";ID  |SEX| SUBSET           |MINUTES| NAME\n",
        ]
        counts = (n_train_utts, n_val_utts)
        for i, ((subset, n_spk, n_chap, first_id), n_utts) in enumerate(zip(_SPLITS, counts)):
            # One stream per split: changing the train size leaves the validation set unchanged.
            rng = np.random.default_rng([seed, i])
            speaker_lines += _write_subset(
                tree, subset, n_utts, n_spk, n_chap, first_id, sample_rate, rng, lexicon
            )
        (tree / "SPEAKERS.TXT").write_text("".join(speaker_lines))
    log.info("wrote a synthetic tone LibriSpeech (%d train, %d dev utterances) to %s", *counts, target)
    return target
