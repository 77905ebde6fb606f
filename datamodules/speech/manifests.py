"""Audio-text sources, read: NeMo JSON-lines manifests, Clotho's and AudioCaps' caption CSVs, LibriSpeech subsets
(`read_source`). Every reader turns its source into `AudioClip`s and a record of the rows it left out, by kind;
a bad row is skipped and counted, never fatal, and a file without a configured column stops with
`ManifestColumnError`. audio_text_data.py makes the clips items; `AudioTextDataModule` (manifest_datamodule.py)
batches them."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import soundfile as sf

from datamodules.speech.librispeech import (
    UNKNOWN_FRAMES,
    AudioDecodeError,
    index_subset,
    load_audio,
)

log = logging.getLogger(__name__)

SourceFormat = Literal["nemo", "clotho", "audiocaps", "librispeech"]
AUDIOCAPS_PATTERNS = ("{youtube_id}_{start_time}", "{audiocap_id}", "Y{youtube_id}", "{youtube_id}")
AUDIO_EXTENSIONS = (".wav", ".flac")
# the fields each format reads when the source names none: (audio, text, duration)
_DEFAULT_FIELDS: dict[str, tuple[str | None, str, str | None]] = {
    "nemo": ("audio_filepath", "text", "duration"),
    "clotho": ("file_name", "caption", None),
    "audiocaps": (None, "caption", None),
}
# the kinds of left-out rows, as the DataModule's warning names them
PROBLEMS = {
    "malformed": "malformed row(s) (too few fields, no JSON object, a field missing)",
    "empty_caption": "empty caption(s)",
    "missing_audio": "row(s) whose audio file does not exist",
    "unreadable": "unreadable audio file(s)",
    "empty": "zero-length audio file(s)",
    "bad_segment": "segment row(s) (offset) outside their file: offset negative or past the end, duration missing "
    "or not positive, or the segment running past the file's end",
    "no_audio": "LibriSpeech transcript line(s) without audio",
    "no_transcript": "LibriSpeech audio file(s) without a transcript line",
}


class ManifestColumnError(ValueError):
    """A manifest or CSV without a column (field) the source is configured to read; names the file and the column."""


@dataclass
class AudioTextSource:
    """One source of (audio, text) pairs: a manifest, a caption CSV beside its clips, or a LibriSpeech subset."""

    path: str
    """The NeMo manifest (.json / .jsonl), the Clotho or AudioCaps CSV, or the LibriSpeech subset folder
    (`LibriSpeech/train-clean-100`); relative to data.root when that is set."""
    format: SourceFormat = "nemo"
    """nemo, clotho, audiocaps or librispeech."""
    audio_dir: str | None = None
    """The folder of the clips (relative: to the manifest's folder). None: NeMo paths are relative to the
    manifest's folder; a CSV's clips are in the folder named like the CSV (`train.csv` -> `train/`,
    `clotho_captions_development.csv` -> `development/`), else beside it."""
    audio_field: str | None = None
    """The column (field) with the audio file; None: `audio_filepath` (nemo), `file_name` (clotho), none
    (audiocaps: the file is found by `file_patterns`)."""
    text_field: str | None = None
    """The column with the text; a CSV's columns `<text_field>_<n>` are further captions of the same clip.
    None: `text` (nemo), `caption` (clotho, audiocaps)."""
    duration_field: str | None = None
    """The column with the duration in seconds; None: `duration` (nemo). Rows without it are timed from the
    file's header."""
    file_patterns: list[str] | None = None
    """AudioCaps: file names to look for, as format strings over the row's columns, tried in order with
    .wav and .flac; None: `{youtube_id}_{start_time}`, `{audiocap_id}`, `Y{youtube_id}`, `{youtube_id}`."""
    weight: float = 1.0
    """Share of this source in a mixture of training sources (relative to the others' weights)."""


@dataclass(frozen=True)
class AudioClip:
    """One audio file and its captions (one for a transcript, five for a Clotho clip)."""

    key: str
    """Stable name of the clip: its path as the manifest writes it, a LibriSpeech utterance id."""
    path: str
    captions: tuple[str, ...]
    duration: float
    """Seconds."""
    frames: int | None = None
    """Frames at the file's own rate, when the header was read: a file that decodes shorter is truncated. A
    segment's own frames."""
    start: int | None = None
    """A segment of the file (a NeMo row with `offset`): its first frame at the file's own rate, from which
    `frames` frames are decoded; None: the whole file."""

    @property
    def segment(self) -> tuple[int, int] | None:
        """(first frame, frames) of a segment, as `load_audio` takes it; None for the whole file."""
        return None if self.start is None else (self.start, self.frames or 0)


Problems = dict[str, list[str]]


def _note(problems: Problems, kind: str, where: str) -> None:
    problems.setdefault(kind, []).append(where)


def audio_frames(path: str | os.PathLike) -> tuple[int, int]:
    """(frames, sample rate) from the file's header; a FLAC that does not state its length is decoded once to
    count. Raises `AudioDecodeError` for a file soundfile cannot open."""
    try:
        info = sf.info(str(path))
    except (RuntimeError, OSError, ValueError) as err:  # soundfile.LibsndfileError is a RuntimeError
        raise AudioDecodeError(f"{path}: {err}") from None
    frames = info.frames
    if frames >= UNKNOWN_FRAMES:
        frames = len(load_audio(path))
    return frames, info.samplerate


def audio_header(path: str | os.PathLike) -> tuple[int, float]:
    """(frames, seconds) from the file's header, as `audio_frames` reads them."""
    frames, rate = audio_frames(path)
    return frames, frames / rate if rate else 0.0


def _timed(
    key: str, path: Path, captions: Sequence[str], duration: float | None, where: str, problems: Problems
) -> AudioClip | None:
    """A clip of an existing file; its duration from the manifest or else from the header. None when left out."""
    if not path.is_file():
        _note(problems, "missing_audio", f"{where}: {path}")
        return None
    frames = None
    if duration is None:
        try:
            frames, duration = audio_header(path)
        except AudioDecodeError as err:
            _note(problems, "unreadable", f"{where}: {err}")
            return None
    if duration <= 0:
        _note(problems, "empty", f"{where}: {path}")
        return None
    return AudioClip(key, str(path), tuple(captions), float(duration), frames)


# Manifests write durations rounded (NeMo's tools: to 2 or 3 decimals), so a file's last segment may end up to
# this many seconds past the file's end; it is read to the end. A segment running further is left out.
SEGMENT_END_SLACK = 0.01


def _segment(
    key: str,
    path: Path,
    captions: Sequence[str],
    offset: float,
    duration: float,
    where: str,
    problems: Problems,
    headers: dict[Path, tuple[int, int] | AudioDecodeError],
) -> AudioClip | None:
    """A clip of the seconds [offset, offset + duration) of an existing file, checked against its header (read
    once per file: `headers` keeps them). Frames are the seconds times the file's rate, rounded. None when left
    out."""
    if not path.is_file():
        _note(problems, "missing_audio", f"{where}: {path}")
        return None
    if path not in headers:
        try:
            headers[path] = audio_frames(path)
        except AudioDecodeError as err:
            headers[path] = err
    header = headers[path]
    if isinstance(header, AudioDecodeError):
        _note(problems, "unreadable", f"{where}: {header}")
        return None
    frames, rate = header
    start, count = round(offset * rate), round(duration * rate)
    length = f"{path} ({frames / rate:.3f} s)" if rate else str(path)
    if start >= frames:
        _note(problems, "bad_segment", f"{where}: offset {offset} s is at or past the end of {length}")
        return None
    past = start + count - frames
    if past > round(SEGMENT_END_SLACK * rate):
        _note(
            problems,
            "bad_segment",
            f"{where}: offset {offset} s + duration {duration} s runs {past / rate:.3f} s past the end of "
            f"{length}",
        )
        return None
    count = min(count, frames - start)
    if count <= 0:
        _note(problems, "bad_segment", f"{where}: duration {duration} s is shorter than one frame")
        return None
    return AudioClip(key, str(path), tuple(captions), count / rate, count, start)


def _clean(text: Any) -> str:
    return " ".join(str(text).split()) if text is not None else ""


def read_nemo_manifest(
    path: Path,
    audio_dir: Path | None = None,
    audio_field: str = "audio_filepath",
    text_field: str = "text",
    duration_field: str | None = "duration",
) -> tuple[list[AudioClip], Problems]:
    """A NeMo manifest: one JSON object a line. Relative audio paths resolve against `audio_dir`, by default the
    manifest's folder; rows of the same file (or the same segment) are one clip with all their texts.

    A row with `offset` names a segment of its file, as NeMo reads it: the seconds [offset, offset + duration),
    keyed `<audio path>@<offset>+<duration>`; several rows may point into one file. A segment with a negative
    offset, no duration or one not above zero, starting past the file's end or running past it (beyond
    `SEGMENT_END_SLACK`) is left out as a "bad_segment". `offset` 0 without a duration is the whole file."""
    base = audio_dir or path.parent
    problems: Problems = {}
    # clip key -> (file, texts, duration, first row, offset: None for the whole file)
    rows: dict[str, tuple[Path, list[str], float | None, str, float | None]] = {}
    seen_fields: set[str] = set()
    has = {audio_field: False, text_field: False}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate(lines, 1):
        where = f"{path}:{number}"
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as err:
            _note(problems, "malformed", f"{where}: not JSON ({err.msg})")
            continue
        if not isinstance(row, dict):
            _note(problems, "malformed", f"{where}: not a JSON object")
            continue
        seen_fields.update(row)
        for name in has:
            has[name] |= name in row
        if audio_field not in row or text_field not in row:
            missing = audio_field if audio_field not in row else text_field
            _note(problems, "malformed", f"{where}: no field {missing!r}")
            continue
        offset = None
        if row.get("offset") is not None:
            try:
                offset = float(row["offset"])
            except (TypeError, ValueError):
                _note(problems, "malformed", f"{where}: offset {row['offset']!r} is not a number")
                continue
        text = _clean(row[text_field])
        if not text:
            _note(problems, "empty_caption", where)
            continue
        duration = None
        if duration_field and row.get(duration_field) is not None:
            try:
                duration = float(row[duration_field])
            except (TypeError, ValueError):
                _note(
                    problems,
                    "malformed",
                    f"{where}: {duration_field} {row[duration_field]!r} is not a number",
                )
                continue
        name = str(row[audio_field])
        if offset is not None and (offset != 0 or duration is not None):
            if not offset >= 0 or not math.isfinite(offset):
                _note(problems, "bad_segment", f"{where}: offset {offset} s is not a time in the file")
                continue
            if duration is None or not duration > 0 or not math.isfinite(duration):
                what = "no duration" if duration is None else f"duration {duration} s"
                _note(problems, "bad_segment", f"{where}: offset {offset} s with {what}")
                continue
            key = f"{name}@{offset}+{duration}"
        else:
            key, offset = name, None
        entry = rows.setdefault(key, (base / name, [], duration, where, offset))
        entry[1].append(text)
    for name, ok in has.items():
        if not ok and (rows or problems):
            found = ", ".join(sorted(seen_fields)) or "none"
            raise ManifestColumnError(
                f"{path}: no row has the field {name!r} (fields found: {found}); name the right one with the "
                "source's audio_field / text_field"
            )
    headers: dict[Path, tuple[int, int] | AudioDecodeError] = {}
    clips = []
    for key, (file, texts, duration, where, offset) in rows.items():
        if offset is None:
            clip = _timed(key, file, texts, duration, where, problems)
        else:
            clip = _segment(key, file, texts, offset, duration or 0.0, where, problems, headers)
        if clip is not None:
            clips.append(clip)
    return clips, problems


def _csv_audio_dir(path: Path) -> Path:
    """The folder named like the CSV (`train.csv` -> `train/`, `clotho_captions_development.csv` ->
    `development/`), else the CSV's own folder."""
    for name in (path.stem, path.stem.removeprefix("clotho_captions_")):
        if (path.parent / name).is_dir():
            return path.parent / name
    return path.parent


def _pattern_fields(pattern: str) -> list[str]:
    return re.findall(r"{(\w+)}", pattern)


def read_caption_csv(
    path: Path,
    audio_dir: Path | None = None,
    audio_field: str | None = "file_name",
    text_field: str = "caption",
    duration_field: str | None = None,
    file_patterns: Sequence[str] = (),
    clip_fields: Sequence[str] = (),
) -> tuple[list[AudioClip], Problems]:
    """A caption CSV with a header row: the audio file in `audio_field` or found by `file_patterns` (format strings
    over the row's columns, each tried with .wav and .flac); captions in `text_field` and `<text_field>_<n>`.
    Rows that share the values of `clip_fields` (AudioCaps: the YouTube id and start), or else the audio file,
    are one clip with all their captions."""
    audio_dir = audio_dir or _csv_audio_dir(path)
    problems: Problems = {}
    try:
        with path.open(
            encoding="utf-8-sig", newline=""
        ) as f:  # utf-8-sig: spreadsheet exports start with a BOM
            table = list(csv.reader(f))
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not table:
        raise ManifestColumnError(f"{path}: empty file, no header row")
    header = [h.strip() for h in table[0]]
    text_columns = [
        i for i, h in enumerate(header) if h == text_field or re.fullmatch(rf"{re.escape(text_field)}_\d+", h)
    ]
    needed = [text_field] if not text_columns else []
    if audio_field is not None:
        needed += [audio_field] if audio_field not in header else []
    else:
        usable = [p for p in file_patterns if all(f in header for f in _pattern_fields(p))]
        if not usable:
            fields = sorted({f for p in file_patterns for f in _pattern_fields(p)} - set(header))
            needed += fields
        file_patterns = usable
    if duration_field is not None and duration_field not in header:
        needed.append(duration_field)
    if needed:
        raise ManifestColumnError(
            f"{path}: no column {', '.join(map(repr, needed))} (columns: {', '.join(header) or 'none'}); name the "
            "right one with the source's audio_field / text_field / duration_field"
        )
    names = {e.name for e in os.scandir(audio_dir)} if audio_dir.is_dir() else set()
    group_by = [header.index(f) for f in clip_fields if f in header]
    clips: dict[Any, tuple[str | None, list[str], float | None, str]] = {}
    for number, values in enumerate(table[1:], 2):
        where = f"{path}:{number}"
        if not any(v.strip() for v in values):
            continue
        if len(values) < len(header):
            _note(problems, "malformed", f"{where}: {len(values)} of {len(header)} fields")
            continue
        row = dict(zip(header, (v.strip() for v in values)))
        captions = [_clean(values[i]) for i in text_columns]
        for _ in range(captions.count("")):
            _note(problems, "empty_caption", where)
        captions = [c for c in captions if c]
        if not captions:
            continue
        duration = None
        if duration_field is not None:
            try:
                duration = float(row[duration_field])
            except ValueError:
                _note(
                    problems,
                    "malformed",
                    f"{where}: {duration_field} {row[duration_field]!r} is not a number",
                )
                continue
        if audio_field is not None:
            file: str | None = row[audio_field]  # as written: relative to audio_dir, or absolute
        else:
            found = [
                p.format(**row) + ext
                for p in file_patterns
                for ext in AUDIO_EXTENSIONS
                if p.format(**row) + ext in names
            ]
            file = found[0] if found else None
        clip_id = tuple(values[i].strip() for i in group_by) if group_by else file
        entry = clips.get(clip_id)
        if entry is None:
            clips[clip_id] = (file, captions, duration, where)
        else:
            # another row of a clip seen before: its captions join the clip's; a file of its own may stand in
            # when the first row's was missing
            clips[clip_id] = (entry[0] or file, entry[1] + captions, entry[2], entry[3])
    out = []
    for file, captions, duration, where in clips.values():
        if file is None:
            tried = ", ".join(p + "{.wav,.flac}" for p in file_patterns)
            _note(problems, "missing_audio", f"{where}: none of {tried} in {audio_dir}")
            continue
        if (clip := _timed(file, audio_dir / file, captions, duration, where, problems)) is not None:
            out.append(clip)
    return out, problems


def read_source(
    source: AudioTextSource, root: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> tuple[list[AudioClip], Problems]:
    """The clips of one source and the rows it left out, by kind. A missing file or folder raises
    FileNotFoundError naming it.

    An `AudioClip` is one audio file with one or more captions and its duration; a left-out row is named
    `file:line: what`. A bad row is a missing or unreadable audio file, an empty caption or too few fields; a file
    without a configured column stops with `ManifestColumnError`, one line naming the file and the column.

        nemo         {"audio_filepath": "a.wav", "duration": 2.4, "text": "..."} per line; paths relative to the
                     manifest's folder (NeMo's rule) or absolute; with "offset" a row is the segment
                     [offset, offset + duration) s of its file
        clotho       `file_name,caption_1,...,caption_5`, the clips in a folder beside the CSV
        audiocaps    `audiocap_id,youtube_id,start_time,caption`, the clips named `<youtube_id>_<start_time>.wav`
                     (aac-datasets), `<audiocap_id>.wav` (yt-dlp scripts), `Y<youtube_id>.wav` (AudioSet) or
                     `<youtube_id>.wav`, `.flac` too; the rows of one YouTube clip are one clip with all their captions
        librispeech  a subset folder of the LibriSpeech tree (`librispeech.index_subset`)

    Durations come from the manifest where it gives them, else from the file's header (`soundfile.info`), so
    bucketing by duration decodes nothing; a segment's is its own, checked against its file's header. The dataset
    and collate function serve the batches of `speech_text_module.SpeechTextPair`.
    """
    path = Path(source.path)
    if root is not None and not path.is_absolute():
        path = Path(root) / path
    if source.format == "librispeech":
        if not path.is_dir():
            raise FileNotFoundError(f"LibriSpeech subset folder {path} does not exist")
        utterances, problems = index_subset(path, cache_dir)
        clips = [AudioClip(u.key, u.path, (u.transcript,), u.duration, u.frames) for u in utterances]
        return clips, problems
    if not path.is_file():
        raise FileNotFoundError(f"{source.format} manifest {path} does not exist")
    audio_default, text_default, duration_default = _DEFAULT_FIELDS[source.format]
    audio_dir = None
    if source.audio_dir is not None:
        audio_dir = path.parent / source.audio_dir
        if not audio_dir.is_dir():
            raise FileNotFoundError(f"audio folder {audio_dir} (audio_dir of {path}) does not exist")
    audio_field = source.audio_field or audio_default
    text_field = source.text_field or text_default
    duration_field = source.duration_field or duration_default
    if source.format == "nemo":
        return read_nemo_manifest(
            path, audio_dir, audio_field or "audio_filepath", text_field, duration_field
        )
    patterns = source.file_patterns or (AUDIOCAPS_PATTERNS if source.format == "audiocaps" else ())
    if audio_field is None and not patterns:
        raise ValueError(f"{path}: name the audio column (audio_field) or the file names (file_patterns)")
    clip_fields = ("youtube_id", "start_time") if source.format == "audiocaps" else ()
    return read_caption_csv(path, audio_dir, audio_field, text_field, duration_field, patterns, clip_fields)
