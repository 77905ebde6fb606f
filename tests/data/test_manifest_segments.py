"""NeMo manifest rows with `offset` (datamodules/speech/manifests.py): each reads the seconds
[offset, offset + duration) of its file, several rows into one file; bad segments are counted and named by
manifest line; the DataModule filters and buckets by the segment's duration; rows without offset are unchanged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from datamodules.sections import LoaderConfig
from datamodules.speech.audio_text_data import AudioTextDataset
from datamodules.speech.manifest_datamodule import AudioConfig, AudioTextDataModule
from datamodules.speech.manifests import AudioTextSource, read_source

RATE = 16000
LONG_SECONDS = 12  # longer than max_duration below: only its segments fit


def ramp(frames: int, step: int) -> np.ndarray:
    """int16 samples that differ from each neighbour, so a slice off by one frame does not match."""
    return ((np.arange(frames, dtype=np.int64) * step) % 65536 - 32768).astype(np.int16)


@pytest.fixture
def recording(tmp_path: Path) -> dict:
    """A 12 s 16 kHz FLAC, a 3 s 8 kHz FLAC (resampled on reading) and a 1 s FLAC read whole, as int16."""
    clips = tmp_path / "clips"
    clips.mkdir()
    files = {
        "long.flac": (ramp(LONG_SECONDS * RATE, 7), RATE),
        "low.flac": (ramp(3 * 8000, 13), 8000),
        "short.flac": (ramp(RATE, 3), RATE),
    }
    for name, (samples, rate) in files.items():
        sf.write(clips / name, samples, rate, subtype="PCM_16")
    return files


def write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


GOOD = [
    {"audio_filepath": "clips/long.flac", "offset": 0.5, "duration": 2.0, "text": "first part"},
    {"audio_filepath": "clips/long.flac", "offset": 3.25, "duration": 1.5, "text": "second part"},
    {"audio_filepath": "clips/long.flac", "offset": 3.25, "duration": 1.5, "text": "second part again"},
    {"audio_filepath": "clips/long.flac", "offset": 7.0, "duration": 4.0, "text": "third part"},
    {"audio_filepath": "clips/low.flac", "offset": 1.0, "duration": 1.25, "text": "a low rate part"},
    # ends 5 ms past the file, within SEGMENT_END_SLACK (rounded durations): read to the end
    {"audio_filepath": "clips/long.flac", "offset": 11.995, "duration": 0.01, "text": "the last frames"},
    {"audio_filepath": "clips/short.flac", "duration": 1.0, "text": "a whole file"},
    {"audio_filepath": "clips/long.flac", "duration": 12.0, "text": "the whole long file"},
]
BAD = [  # manifest lines 9 to 15
    {"audio_filepath": "clips/long.flac", "offset": -1.0, "duration": 1.0, "text": "negative offset"},
    {"audio_filepath": "clips/long.flac", "offset": 11.5, "duration": 2.0, "text": "runs past the end"},
    {"audio_filepath": "clips/long.flac", "offset": 13.0, "duration": 1.0, "text": "starts past the end"},
    {"audio_filepath": "clips/long.flac", "offset": 2.0, "text": "offset without duration"},
    {"audio_filepath": "clips/long.flac", "offset": 2.0, "duration": 0, "text": "zero duration"},
    {"audio_filepath": "clips/gone.flac", "offset": 1.0, "duration": 1.0, "text": "missing file"},
    {"audio_filepath": "clips/long.flac", "offset": "soon", "duration": 1.0, "text": "offset not a number"},
]


def test_segments_decode_the_slice_of_their_file_and_bad_ones_are_named(
    tmp_path: Path, recording: dict
) -> None:
    manifest = write_manifest(tmp_path / "m.json", GOOD + BAD)
    clips, problems = read_source(AudioTextSource("m.json"), root=tmp_path)
    assert [c.key for c in clips] == [
        "clips/long.flac@0.5+2.0",
        "clips/long.flac@3.25+1.5",
        "clips/long.flac@7.0+4.0",
        "clips/low.flac@1.0+1.25",
        "clips/long.flac@11.995+0.01",
        "clips/short.flac",
        "clips/long.flac",
    ]
    assert clips[1].captions == ("second part", "second part again")  # rows of one segment are one clip
    assert [c.duration for c in clips] == [2.0, 1.5, 4.0, 1.25, 0.005, 1.0, 12.0]
    assert [(c.start, c.frames) for c in clips[:5]] == [
        (8000, 32000),
        (52000, 24000),
        (112000, 64000),
        (8000, 10000),
        (191920, 80),
    ]
    assert (clips[-2].start, clips[-2].frames) == (None, None)  # no offset: the whole file, as any row

    counts = {kind: len(items) for kind, items in problems.items()}
    assert counts == {"bad_segment": 5, "missing_audio": 1, "malformed": 1}
    by_line = {item.split(": ", 1)[0]: item for item in problems["bad_segment"]}
    assert set(by_line) == {f"{manifest}:{n}" for n in range(9, 14)}  # file and line named
    long_file = f"{tmp_path / 'clips' / 'long.flac'} (12.000 s)"
    assert by_line[f"{manifest}:10"] == (
        f"{manifest}:10: offset 11.5 s + duration 2.0 s runs 1.500 s past the end of {long_file}"
    )
    assert by_line[f"{manifest}:11"] == f"{manifest}:11: offset 13.0 s is at or past the end of {long_file}"
    assert by_line[f"{manifest}:12"] == f"{manifest}:12: offset 2.0 s with no duration"
    assert by_line[f"{manifest}:13"] == f"{manifest}:13: offset 2.0 s with duration 0.0 s"
    assert problems["missing_audio"][0].startswith(f"{manifest}:14: ")
    assert problems["malformed"] == [f"{manifest}:15: offset 'soon' is not a number"]

    # decoded: exactly the int16 samples of the slice over 32768 (float32 holds them exactly), no tolerance
    dataset = AudioTextDataset(clips, sample_rate=RATE)
    long, _ = recording["long.flac"]
    for i, offset, seconds in [(0, 0.5, 2.0), (1, 3.25, 1.5), (2, 7.0, 4.0), (4, 11.995, 0.005)]:
        first = round(offset * RATE)
        expected = torch.from_numpy(long[first : first + round(seconds * RATE)].astype(np.float32) / 32768)
        assert torch.equal(dataset[i]["waveform"], expected), clips[i].key
    # the 8 kHz segment is resampled as a whole file is: the same resampler on the same frames
    low, _ = recording["low.flac"]
    expected = torchaudio.functional.resample(
        torch.from_numpy(low[8000:18000].astype(np.float32) / 32768), 8000, RATE
    )
    assert torch.equal(dataset[3]["waveform"], expected)
    short, _ = recording["short.flac"]
    assert torch.equal(dataset[5]["waveform"], torch.from_numpy(short.astype(np.float32) / 32768))
    assert dataset[6]["waveform"].numel() == LONG_SECONDS * RATE


def test_datamodule_filters_and_buckets_by_the_segment_duration(
    tmp_path: Path, recording: dict, caplog: pytest.LogCaptureFixture
) -> None:
    manifest = write_manifest(tmp_path / "m.json", GOOD + BAD)
    dm = AudioTextDataModule(
        train=AudioTextSource(str(manifest)),
        audio=AudioConfig(max_duration=10.0, max_batch_seconds=20.0, num_buckets=2),
        loader=LoaderConfig(num_workers=0),
    )
    with caplog.at_level(logging.WARNING, logger="datamodules.speech.manifest_datamodule"):
        dm.setup("fit")
    # the 12 s file read whole is longer than max_duration; its segments are not
    assert dm.problems["train"] == {"too_long": 1, "bad_segment": 5, "missing_audio": 1, "malformed": 1}
    assert "train: left out 5 segment row(s) (offset) outside their file" in caplog.text
    assert f"{manifest}:9: offset -1.0 s is not a time in the file" in caplog.text
    durations = dm.datasets["train"].durations
    assert durations == [2.0, 1.5, 4.0, 1.25, 0.005, 1.0]
    sampler = dm.batch_sampler("train", shuffle=False)
    # buckets of the 3 shortest clips (longest 1.25 s) and the 3 longest (4 s), each under 20 padded seconds
    assert sampler.batch_sizes == [16, 5]
    assert sorted(len(b) for b in sampler.epoch_batches()) == [3, 3]
