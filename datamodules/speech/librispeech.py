"""LibriSpeech, read: the tree `LibriSpeech/<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` with a
`<speaker>-<chapter>.trans.txt` per chapter (lines `<utt-id> TRANSCRIPT`) and SPEAKERS.TXT; utterance and
speaker records, transcript normalisation, FLAC decoding (soundfile), the cached per-subset index, the map-style
dataset and its collate function. The DataModule (librispeech_datamodule.py) batches and distributes them."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
import torchaudio
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

_INDEX_VERSION = 1
# FLAC leaves total_samples at 0 when the encoder did not know it; libsndfile then reports SF_COUNT_MAX.
UNKNOWN_FRAMES = 1 << 62


class AudioDecodeError(ValueError):
    """An audio file that cannot be decoded (corrupt, truncated or empty), named in the message."""


@dataclass(frozen=True)
class Utterance:
    key: str  # "<speaker>-<chapter>-<utt>"
    path: str
    transcript: str  # as written in trans.txt
    frames: int  # at the file's own sample rate
    file_rate: int
    speaker: int
    chapter: int

    @property
    def duration(self) -> float:
        return self.frames / self.file_rate


@dataclass(frozen=True)
class Speaker:
    id: int
    sex: str
    subset: str
    minutes: float
    name: str


def normalise_transcript(text: str, lowercase: bool = True) -> str:
    """The text the tokenizer sees; also what decides whether two transcripts are the same."""
    text = " ".join(text.split())
    return text.lower() if lowercase else text


def parse_speakers(path: str | os.PathLike) -> dict[int, Speaker]:
    """Parse `SPEAKERS.TXT`: `;` comments, then `ID | SEX | SUBSET | MINUTES | NAME` rows."""
    speakers: dict[int, Speaker] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith(";"):
            continue
        # A reader's NAME may itself contain "|", so split off only the first four fields.
        fields = [f.strip() for f in line.split("|", maxsplit=4)]
        try:
            sid, sex, subset, minutes, name = fields
            speakers[int(sid)] = Speaker(int(sid), sex, subset, float(minutes), name)
        except ValueError:
            log.debug("%s: skipping malformed line %r", path, line)
    return speakers


def read_transcripts(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """`<utt-id> TRANSCRIPT` lines -> ({utt_id: transcript}, malformed lines). A missing final newline is fine."""
    out: dict[str, str] = {}
    malformed: list[str] = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        parts = line.strip().split(maxsplit=1)
        if not parts:
            continue
        if len(parts) < 2:
            malformed.append(line.strip())
            continue
        out[parts[0]] = parts[1]
    return out, malformed


def subset_transcripts(subset_dirs: Sequence[Path], lowercase: bool = True) -> list[str]:
    """The normalised transcripts of every chapter under `subset_dirs` in a fixed order: a tokenizer's training
    text."""
    texts = []
    for subset in subset_dirs:
        for trans in sorted(subset.glob("*/*/*.trans.txt")):
            found, _ = read_transcripts(trans)
            texts += [normalise_transcript(t, lowercase) for t in found.values()]
    return texts


def load_audio(
    path: str | os.PathLike,
    sample_rate: int | None = None,
    expected_frames: int | None = None,
    segment: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Decode to a mono float32 waveform at `sample_rate` (the file's own rate when None). `segment` = (first
    frame, frames) at the file's own rate decodes only those frames: soundfile seeks to the first, so a segment
    of a long file costs its own length.

    Raises `AudioDecodeError` for an unreadable file, no samples, or fewer frames than the header (or the
    segment) promised.
    """
    start, frames = segment if segment is not None else (0, -1)
    where = f"{path}" if segment is None else f"{path} (frames {start} to {start + frames})"
    try:
        data, rate = sf.read(str(path), frames=frames, start=start, dtype="float32", always_2d=True)
    except (RuntimeError, OSError, ValueError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise AudioDecodeError(f"{where}: {err}") from None
    if expected_frames is not None and expected_frames < UNKNOWN_FRAMES and len(data) < expected_frames:
        raise AudioDecodeError(f"{where}: truncated ({len(data)} of {expected_frames} frames)")
    if len(data) == 0:
        raise AudioDecodeError(f"{where}: no audio samples")
    wave = torch.from_numpy(data.mean(axis=1) if data.shape[1] > 1 else data[:, 0])
    if sample_rate is not None and rate != sample_rate:
        wave = torchaudio.functional.resample(wave, rate, sample_rate)
    return wave.contiguous()


def load_audio_or_skip(
    path: str,
    sample_rate: int,
    expected_frames: int | None,
    warned: set[str],
    segment: tuple[int, int] | None = None,
) -> torch.Tensor | None:
    """`load_audio`, or None for a file (or segment) that does not decode, logged once per path (`warned`
    remembers them): the datasets' items, which the collate drops and counts."""
    try:
        return load_audio(path, sample_rate, expected_frames=expected_frames, segment=segment)
    except AudioDecodeError as err:
        if path not in warned:
            warned.add(path)
            log.warning("skipping undecodable audio %s", err)
        return None


# -- index ----------------------------------------------------------------------------------------


def _chapter_signature(chapter_dir: Path) -> list[list[Any]]:
    # Name, size and mtime of every file: any added, removed or rewritten file invalidates the chapter.
    return sorted(
        [e.name, e.stat().st_size, e.stat().st_mtime_ns] for e in os.scandir(chapter_dir) if e.is_file()
    )


def _index_chapter(chapter_dir: Path) -> dict[str, list]:
    """Pair a chapter's FLAC files with its transcript lines; JSON-able so it can be cached."""
    transcripts: dict[str, str] = {}
    malformed: list[str] = []
    for trans in sorted(chapter_dir.glob("*.trans.txt")):
        found, bad = read_transcripts(trans)
        transcripts.update(found)
        malformed += [f"{trans}: {line!r}" for line in bad]
    audio = {p.name[: -len(".flac")]: p for p in sorted(chapter_dir.glob("*.flac"))}
    out: dict[str, list] = {
        "utts": [],
        "no_audio": [f"{chapter_dir}/{u}" for u in sorted(set(transcripts) - set(audio))],
        "no_transcript": [],
        "unreadable": [],
        "empty": [],
        "malformed": malformed,
    }
    for utt_id, path in audio.items():
        if utt_id not in transcripts:
            out["no_transcript"].append(str(path))
            continue
        if path.stat().st_size == 0:
            out["empty"].append(str(path))
            continue
        try:
            info = sf.info(str(path))
            frames, rate = info.frames, info.samplerate
            if frames >= UNKNOWN_FRAMES:  # length not in the header: decode once to count
                frames = len(load_audio(path))
        except (RuntimeError, OSError, ValueError) as err:
            out["unreadable"].append(f"{path} ({err})")
            continue
        if frames == 0:
            out["empty"].append(str(path))
            continue
        out["utts"].append([utt_id, path.name, transcripts[utt_id], frames, rate])
    return out


def index_subset(
    subset_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> tuple[list[Utterance], dict[str, list[str]]]:
    """Walk one subset; returns its utterances and the problems found, by kind, as example strings.

    With `cache_dir`, per-chapter results are cached (keyed by the files' names, sizes and mtimes), so a
    second run reads no audio headers.
    """
    subset_dir = Path(subset_dir).resolve()
    cache_file = None
    cached: dict[str, Any] = {}
    if cache_dir is not None:
        digest = hashlib.sha256(str(subset_dir).encode()).hexdigest()[:12]
        cache_file = Path(cache_dir) / "librispeech-index" / f"{subset_dir.name}-{digest}.json"
        try:
            payload = json.loads(cache_file.read_text())
            if payload.get("version") == _INDEX_VERSION:
                cached = payload["chapters"]
        except (OSError, ValueError, KeyError):
            cached = {}
    chapters: dict[str, Any] = {}
    changed = False
    utterances: list[Utterance] = []
    problems: dict[str, list[str]] = {}
    chapter_dirs = sorted(p for p in subset_dir.glob("*/*") if p.is_dir())
    # train-960 has ~5,700 chapters: reading their audio headers the first time takes minutes, so show it moves
    for chapter_dir in tqdm(
        chapter_dirs, desc=f"indexing {subset_dir.name}", unit=" chapters", disable=len(chapter_dirs) < 50
    ):
        rel = f"{chapter_dir.parent.name}/{chapter_dir.name}"
        sig = _chapter_signature(chapter_dir)
        entry = cached.get(rel)
        if entry is None or entry["sig"] != sig:
            entry = {"sig": sig, "data": _index_chapter(chapter_dir)}
            changed = True
        chapters[rel] = entry
        data = entry["data"]
        for kind, items in data.items():
            if kind != "utts":
                problems.setdefault(kind, []).extend(items)
        speaker, chapter = chapter_dir.parent.name, chapter_dir.name
        for utt_id, name, transcript, frames, rate in data["utts"]:
            utterances.append(
                Utterance(
                    utt_id,
                    str(chapter_dir / name),
                    transcript,
                    frames,
                    rate,
                    int(speaker) if speaker.isdigit() else -1,
                    int(chapter) if chapter.isdigit() else -1,
                )
            )
    if cache_file is not None and (changed or set(chapters) != set(cached)):
        try:  # temporary file then rename: concurrent ranks never read a half-written index
            cache_file.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=".tmp-index-")
            with os.fdopen(fd, "w") as f:
                json.dump({"version": _INDEX_VERSION, "chapters": chapters}, f)
            os.replace(tmp, cache_file)
        except OSError as err:
            log.debug("could not write the index cache %s: %s", cache_file, err)
    return utterances, {k: v for k, v in problems.items() if v}


# -- dataset, collate, sampler --------------------------------------------------------------------


class LibriSpeechDataset(Dataset):
    """Utterances of one split. An undecodable file yields None (warned once per file) for the collate to drop."""

    def __init__(
        self, utterances: Sequence[Utterance], sample_rate: int = 16000, lowercase: bool = True
    ) -> None:
        self.utterances = list(utterances)
        self.sample_rate = sample_rate
        self.texts = [normalise_transcript(u.transcript, lowercase) for u in self.utterances]
        # Identical normalised transcripts share an id, so a contrastive loss can treat them as
        # positives of each other instead of as negatives.
        ids: dict[str, int] = {}
        self.text_ids = [ids.setdefault(t, len(ids)) for t in self.texts]
        self._warned: set[str] = set()

    def __len__(self) -> int:
        return len(self.utterances)

    @property
    def durations(self) -> list[float]:
        return [u.duration for u in self.utterances]

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        utt = self.utterances[i]
        wave = load_audio_or_skip(utt.path, self.sample_rate, utt.frames, self._warned)
        if wave is None:
            return None
        return {
            "waveform": wave,
            "text": self.texts[i],
            "transcript": utt.transcript,
            "utt_key": i,
            "text_id": self.text_ids[i],
        }


def pad_waveforms(waves: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """1-D waveforms -> (B, longest) zero-padded on the right, and their (B,) lengths; (0, 0) for none."""
    lengths = torch.tensor([w.numel() for w in waves], dtype=torch.long)
    waveforms = torch.zeros(len(waves), int(lengths.max()) if len(waves) else 0)
    for row, w in enumerate(waves):
        waveforms[row, : lengths[row]] = w
    return waveforms, lengths


class SpeechTextCollator:
    """Zero-pads waveforms, tokenizes the normalised transcripts, and drops items the dataset gave up on."""

    def __init__(self, tokenizer: TextTokenizer, context_length: int = 64) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length

    def __call__(self, items: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [it for it in items if it is not None]
        waveforms, lengths = pad_waveforms([it["waveform"] for it in kept])
        if kept:
            text = self.tokenizer([it["text"] for it in kept], max_length=self.context_length)
        else:  # every file in the batch was bad: an empty batch the module should skip
            text = {
                "input_ids": torch.zeros(0, 0, dtype=torch.long),
                "attention_mask": torch.zeros(0, 0, dtype=torch.bool),
            }
        return {
            "waveforms": waveforms,
            "wave_lengths": lengths,
            "input_ids": text["input_ids"],
            "attention_mask": text["attention_mask"],
            "utt_keys": torch.tensor([it["utt_key"] for it in kept], dtype=torch.long),
            "text_ids": torch.tensor([it["text_id"] for it in kept], dtype=torch.long),
            "transcripts": [it["transcript"] for it in kept],
            "skipped": len(items) - len(kept),
        }
