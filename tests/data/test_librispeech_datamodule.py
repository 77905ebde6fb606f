"""LibriSpeech DataModule, duration-bucket sampler and synthetic tone set, on small generated fixtures."""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from lightning.fabric.utilities.data import _set_sampler_epoch
from torch.utils.data import DataLoader

import datamodules.speech.librispeech as librispeech_reader
import datamodules.speech.librispeech_datamodule as lsdm
from datamodules.loading import seeded_loader
from datamodules.speech.librispeech import load_audio, parse_speakers
from datamodules.speech.librispeech_datamodule import DurationBucketBatchSampler, LibriSpeechDataModule
from datamodules.synthetic.tones import generate_tone_librispeech, render_sentence, tone_lexicon
from tests.helpers import REPO, data_args

N_TRAIN, N_VAL = 24, 8
REAL = REPO.parent / "shared" / "data" / "real" / "librispeech"
LOGGER = "datamodules.speech.librispeech_datamodule"


@pytest.fixture(scope="module")
def tone_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tones")
    generate_tone_librispeech(root, n_train_utts=N_TRAIN, n_val_utts=N_VAL, seed=1)
    return root


@pytest.fixture
def tone_copy(tone_root: Path, tmp_path: Path) -> Path:
    """A private copy to damage."""
    shutil.copytree(tone_root, tmp_path / "data")
    return tmp_path / "data"


def make_dm(root: Path, tmp_path: Path, **kwargs) -> LibriSpeechDataModule:
    defaults = {
        "loader": {"num_workers": 0},
        "batching": {"max_batch_seconds": 30.0, "num_buckets": 3},
        "tokenizer": {"cache_dir": str(tmp_path / "cache")},
    }
    return LibriSpeechDataModule(str(root), **data_args(defaults, kwargs))


def chapter_dirs(base: Path, subset: str = "train-clean-100") -> list[Path]:
    return sorted(p for p in (base / "LibriSpeech" / subset).glob("*/*") if p.is_dir())


# -- synthetic generator --------------------------------------------------------------------------


def test_generator_writes_librispeech_tree_and_is_idempotent(tone_root: Path) -> None:
    base = tone_root / "LibriSpeech"
    for subset, n in (("train-clean-100", N_TRAIN), ("dev-clean", N_VAL)):
        flacs = sorted((base / subset).glob("*/*/*.flac"))
        lines = [ln for t in (base / subset).glob("*/*/*.trans.txt") for ln in t.read_text().splitlines()]
        assert len(flacs) == n and len(lines) == n
        assert {ln.split()[0] for ln in lines} == {f.stem for f in flacs}
        assert all(3 <= len(ln.split()) - 1 <= 6 and ln == ln.upper() for ln in lines)
    info = sf.info(str(flacs[0]))
    assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
    assert 0.5 < info.duration < 6.0
    assert not list(tone_root.glob(".tmp-*"))  # the temporary folder was renamed away
    before = sorted((p, p.stat().st_mtime_ns) for p in base.rglob("*"))
    assert generate_tone_librispeech(tone_root, n_train_utts=N_TRAIN, n_val_utts=N_VAL, seed=1) == base
    assert sorted((p, p.stat().st_mtime_ns) for p in base.rglob("*")) == before


def test_generator_is_reproducible_and_words_sound_alike(tmp_path: Path) -> None:
    a = generate_tone_librispeech(tmp_path / "a", n_train_utts=4, n_val_utts=1, seed=3)
    b = generate_tone_librispeech(tmp_path / "b", n_train_utts=4, n_val_utts=1, seed=3)
    fa, fb = sorted(a.rglob("*.flac")), sorted(b.rglob("*.flac"))
    assert [f.name for f in fa] == [f.name for f in fb]
    assert np.array_equal(sf.read(str(fa[0]))[0], sf.read(str(fb[0]))[0])
    # A word is rendered with its own tones: the loudest frequency is one of them (pitch varies by ~2%).
    lexicon = tone_lexicon()
    assert [f for f, _ in lexicon["CAT"]] != [f for f, _ in lexicon["WIND"]]
    rng = np.random.default_rng(0)
    for word in ("CAT", "WIND", "THE"):
        wave = render_sentence([word], 16000, rng)
        peak = np.fft.rfftfreq(len(wave), 1 / 16000)[np.abs(np.fft.rfft(wave)).argmax()]
        assert min(abs(peak - f) / f for f, _ in lexicon[word]) < 0.03


# -- DataModule on a clean tree -------------------------------------------------------------------


def test_index_and_batch_format(tone_root: Path, tmp_path: Path) -> None:
    dm = make_dm(tone_root, tmp_path)
    vocab = dm.vocab_size  # known before setup
    assert 5 < vocab <= 8192
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (N_TRAIN, N_VAL)
    assert dm.problems == {"train": {}, "val": {}}
    batches = list(dm.train_dataloader())
    b = batches[0]
    n = b["waveforms"].shape[0]
    assert b["waveforms"].dtype == torch.float32 and b["waveforms"].shape[1] == int(b["wave_lengths"].max())
    assert b["wave_lengths"].dtype == torch.long and b["wave_lengths"].shape == (n,)
    assert b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.bool
    assert b["input_ids"].shape == b["attention_mask"].shape and b["input_ids"].shape[0] == n
    assert b["input_ids"].shape[1] <= 64 and int(b["input_ids"].max()) < vocab
    assert (b["input_ids"][:, 0] == dm.tokenizer.cls_id).all()
    assert b["utt_keys"].dtype == torch.long and b["text_ids"].dtype == torch.long
    assert b["skipped"] == 0 and len(b["transcripts"]) == n
    # Padding is zeros past each length, and the text is the lowercased transcript.
    for row in range(n):
        assert not b["waveforms"][row, b["wave_lengths"][row] :].any()
        decoded = dm.tokenizer.decode(b["input_ids"][row][b["attention_mask"][row]].tolist())
        assert decoded == b["transcripts"][row].lower()
    keys = torch.cat([x["utt_keys"] for x in batches]).tolist()
    assert sorted(keys) == list(range(N_TRAIN))
    assert len(dm.speakers) == 12 and dm.speakers[100].subset == "train-clean-100"


def test_index_cache_is_reused_and_invalidated(tone_copy: Path, tmp_path: Path, monkeypatch) -> None:
    make_dm(tone_copy, tmp_path).setup("validate")
    calls = []
    real_info = sf.info
    monkeypatch.setattr(librispeech_reader.sf, "info", lambda p: calls.append(p) or real_info(p))
    dm = make_dm(tone_copy, tmp_path)
    dm.setup("validate")
    assert calls == [] and len(dm.datasets["val"]) == N_VAL  # served from the cache
    chapter = chapter_dirs(tone_copy, "dev-clean")[0]
    victim = sorted(chapter.glob("*.flac"))[0]
    victim.unlink()
    dm = make_dm(tone_copy, tmp_path)
    dm.setup("validate")
    assert len(calls) == len(list(chapter.glob("*.flac")))  # only the changed chapter is re-read
    assert len(dm.datasets["val"]) == N_VAL - 1 and dm.problems["val"] == {"no_audio": 1}


def test_identical_transcripts_share_text_ids(tone_copy: Path, tmp_path: Path) -> None:
    chapter = chapter_dirs(tone_copy)[0]
    trans = next(chapter.glob("*.trans.txt"))
    lines = trans.read_text().splitlines()
    ids = [ln.split()[0] for ln in lines]
    # Same words, different spacing: the same normalised text.
    lines[0], lines[1] = f"{ids[0]} THE RED  CAT", f"{ids[1]} THE RED CAT"
    trans.write_text("\n".join(lines) + "\n")
    dm = make_dm(tone_copy, tmp_path)
    dm.setup("fit")
    ds = dm.datasets["train"]
    pos = {u.key: i for i, u in enumerate(ds.utterances)}
    a, b = pos[ids[0]], pos[ids[1]]
    assert ds.text_ids[a] == ds.text_ids[b]
    others = {ds.text_ids[i] for i in range(len(ds)) if i not in (a, b) and ds.texts[i] != "the red cat"}
    assert ds.text_ids[a] not in others
    batch = dm.train_dataloader().collate_fn([ds[a], ds[b]])
    assert batch["text_ids"][0] == batch["text_ids"][1]


# -- sampler ------------------------------------------------------------------------------------


def durations(n: int = 203, seed: int = 0) -> list[float]:
    return np.random.default_rng(seed).uniform(0.5, 16.0, size=n).tolist()


def test_sampler_respects_budget_and_covers_each_utterance_once() -> None:
    dur = durations()
    sampler = DurationBucketBatchSampler(dur, max_batch_seconds=40.0, num_buckets=5, num_replicas=1, rank=0)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    for batch in batches:
        assert len(batch) * max(dur[i] for i in batch) <= 40.0 + 1e-9
    assert sorted(i for b in batches for i in b) == list(range(len(dur)))
    # Bucketing keeps lengths together: little padding compared with random batching.
    padded = sum(len(b) * max(dur[i] for i in b) for b in batches)
    assert sum(dur) / padded > 0.7


def test_sampler_epochs_shuffle_reproducibly() -> None:
    dur = durations()
    sampler = DurationBucketBatchSampler(dur, 40.0, num_buckets=5, seed=7, num_replicas=1, rank=0)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch0 != epoch1 and len(epoch0) == len(epoch1)
    assert sorted(i for b in epoch1 for i in b) == list(range(len(dur)))
    sampler.set_epoch(0)
    assert list(sampler) == epoch0
    # Lightning sets the epoch through `dataloader.batch_sampler.sampler`.
    loader = DataLoader(range(len(dur)), batch_sampler=sampler)
    _set_sampler_epoch(loader, 5)
    assert sampler.epoch == 5


def test_eval_sampler_is_deterministic_and_sorted() -> None:
    dur = durations()
    sampler = DurationBucketBatchSampler(dur, 40.0, num_buckets=5, shuffle=False, num_replicas=1, rank=0)
    first = list(sampler)
    sampler.set_epoch(3)
    assert list(sampler) == first
    flat = [dur[i] for b in first for i in b]
    assert flat == sorted(flat)


# 203 utterances make 68 batches (even split), 40 make 13 (one batch repeated).
@pytest.mark.parametrize("n", [203, 40])
def test_sampler_two_replicas_split_disjointly(n: int) -> None:
    dur = durations(n)
    shards = [
        list(DurationBucketBatchSampler(dur, 40.0, num_buckets=5, seed=1, num_replicas=2, rank=r))
        for r in range(2)
    ]
    one = DurationBucketBatchSampler(dur, 40.0, num_buckets=5, seed=1, num_replicas=1, rank=0)
    assert len(shards[0]) == len(shards[1]) == len(one) // 2 + len(one) % 2
    flat = [i for s in shards for b in s for i in b]
    assert set(flat) == set(range(n))
    repeated = len(shards[0]) * 2 - one.num_batches  # batches repeated to even out the ranks
    assert repeated == one.num_batches % 2 == {203: 0, 40: 1}[n]
    if repeated == 0:
        assert sorted(flat) == list(range(n))  # disjoint
    else:
        assert shards[1][-1] == one.epoch_batches()[0] and len(flat) == n + len(shards[1][-1])


# -- audio ----------------------------------------------------------------------------------------


def write_line(chapter: Path, utt_id: str, text: str) -> None:
    trans = next(chapter.glob("*.trans.txt"))
    body = trans.read_text()
    trans.write_text(body + ("" if body.endswith("\n") else "\n") + f"{utt_id} {text}\n")


def test_resamples_8khz_audio(tone_copy: Path, tmp_path: Path) -> None:
    chapter = chapter_dirs(tone_copy)[0]
    spk, chap = chapter.parent.name, chapter.name
    t = np.arange(4000) / 8000
    sf.write(
        str(chapter / f"{spk}-{chap}-0900.flac"), 0.5 * np.sin(2 * np.pi * 440 * t), 8000, subtype="PCM_16"
    )
    write_line(chapter, f"{spk}-{chap}-0900", "A TONE")
    dm = make_dm(tone_copy, tmp_path)
    dm.setup("fit")
    ds = dm.datasets["train"]
    i = next(i for i, u in enumerate(ds.utterances) if u.key.endswith("-0900"))
    assert ds.utterances[i].duration == pytest.approx(0.5)
    wave = ds[i]["waveform"]
    assert wave.dtype == torch.float32 and wave.shape == (8000,)
    freqs = np.fft.rfftfreq(8000, 1 / 16000)
    assert freqs[np.abs(np.fft.rfft(wave.numpy())).argmax()] == pytest.approx(440, abs=2)


def test_stereo_is_mixed_down(tmp_path: Path) -> None:
    left, right = np.full(160, 0.5), np.full(160, -0.25)
    sf.write(str(tmp_path / "s.flac"), np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    wave = load_audio(tmp_path / "s.flac", 16000)
    assert wave.shape == (160,) and wave.mean().item() == pytest.approx(0.125, abs=1e-3)


def test_bad_inputs_are_skipped_and_counted(tone_copy: Path, tmp_path: Path, caplog) -> None:
    chapters = chapter_dirs(tone_copy)
    flacs = sorted(chapters[0].glob("*.flac"))
    # Truncated and corrupt in the middle: the header reads, decoding fails -> skipped at load time.
    data = flacs[0].read_bytes()
    flacs[0].write_bytes(data[: len(data) // 2])
    data = bytearray(flacs[1].read_bytes())
    data[len(data) // 3 : len(data) // 3 + 1500] = (
        np.random.default_rng(0).integers(0, 256, 1500, np.uint8).tobytes()
    )
    flacs[1].write_bytes(bytes(data))
    # Garbage header -> unreadable at index time; zero bytes -> zero-length audio.
    flacs2 = sorted(chapters[1].glob("*.flac"))
    flacs2[0].write_bytes(b"not a flac file at all" * 10)
    flacs2[1].write_bytes(b"")
    # A transcript line without audio, audio without a transcript line.
    spk, chap = chapters[2].parent.name, chapters[2].name
    write_line(chapters[2], f"{spk}-{chap}-0777", "NO AUDIO HERE")
    shutil.copy(sorted(chapters[2].glob("*.flac"))[0], chapters[2] / f"{spk}-{chap}-0888.flac")
    # A trans.txt without a final newline still yields its last line.
    trans = next(chapters[3].glob("*.trans.txt"))
    trans.write_text(trans.read_text().rstrip("\n"))

    caplog.set_level(logging.INFO, logger=LOGGER)
    dm = make_dm(tone_copy, tmp_path)
    dm.setup("fit")
    assert dm.problems["train"] == {"no_audio": 1, "no_transcript": 1, "unreadable": 1, "empty": 1}
    assert len(dm.datasets["train"]) == N_TRAIN - 2
    messages = caplog.text
    assert "1 transcript line(s) without audio" in messages and f"{spk}-{chap}-0777" in messages
    assert "1 audio file(s) without a transcript line" in messages and f"{spk}-{chap}-0888.flac" in messages
    assert flacs2[0].name in messages and flacs2[1].name in messages
    last_id = trans.read_text().splitlines()[-1].split()[0]
    assert any(u.key == last_id for u in dm.datasets["train"].utterances)

    caplog.clear()
    loader = dm.train_dataloader()
    for epoch in range(2):
        loader.batch_sampler.set_epoch(epoch)
        batches = list(loader)
        assert sum(b["skipped"] for b in batches) == 2
        assert sum(b["waveforms"].shape[0] for b in batches) == N_TRAIN - 4
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2  # once per bad file, not once per epoch
    assert any(flacs[0].name in w for w in warnings) and any(flacs[1].name in w for w in warnings)


def test_collate_of_an_all_bad_batch_is_empty(tone_root: Path, tmp_path: Path) -> None:
    dm = make_dm(tone_root, tmp_path)
    dm.setup("validate")
    batch = dm.val_dataloader().collate_fn([None, None])
    assert batch["skipped"] == 2 and batch["waveforms"].shape[0] == 0 and batch["input_ids"].shape[0] == 0


def test_too_long_utterances_are_dropped(tone_root: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dm = make_dm(tone_root, tmp_path, batching={"max_duration": 2.0})
    dm.setup("validate")
    kept = dm.datasets["val"].durations
    assert all(d <= 2.0 for d in kept)
    dropped = dm.problems["val"]["too_long"]
    assert len(kept) + dropped == N_VAL and len(kept) < N_VAL
    # a warning that counts them and names the setting, since validation then scores fewer utterances
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"val: max_duration=2.0 s drops {dropped} of {N_VAL} utterances" in warning
    assert "they are not scored" in warning and "--data.init_args.batching.max_duration" in warning


def test_max_duration_10_warns_about_genuine_librispeech(tmp_path: Path, caplog) -> None:
    """The speech quickstart's 10 s: one of the sample's four genuine utterances (10.4 s) goes."""
    if not (REAL / "LibriSpeech" / "test-clean").is_dir():
        pytest.skip(f"no LibriSpeech sample at {REAL}")
    caplog.set_level(logging.WARNING, logger=LOGGER)
    dm = make_dm(REAL, tmp_path, train_subsets=["test-clean"], batching={"max_duration": 10.0})
    dm.setup("test")
    assert len(dm.datasets["test"]) == 3
    (warning,) = [r.getMessage() for r in caplog.records]
    assert warning.startswith("test: max_duration=10.0 s drops 1 of 4 utterances (25%), the longest 10.4 s")
    assert "raise max_duration to 11 (--data.init_args.batching.max_duration 11;" in warning


def test_missing_root_or_subset_is_named(tone_root: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_dm(tmp_path / "nowhere", tmp_path).setup("fit")
    dm = make_dm(tone_root / "LibriSpeech", tmp_path, test_subsets=["test-other"])
    with pytest.raises(FileNotFoundError, match=r"test-other.*subsets found: dev-clean, train-clean-100"):
        dm.setup("test")


def test_generate_if_missing(tmp_path: Path, monkeypatch) -> None:
    small = functools.partial(generate_tone_librispeech, n_train_utts=6, n_val_utts=2)
    monkeypatch.setattr(lsdm, "generate_tone_librispeech", small)
    dm = make_dm(tmp_path / "gen", tmp_path, generate_if_missing=True)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.datasets["train"]), len(dm.datasets["val"])) == (6, 2)


# -- the genuine sample -------------------------------------------------------------------------


def test_real_librispeech_sample(tmp_path: Path) -> None:
    if not (REAL / "LibriSpeech" / "test-clean").is_dir():
        pytest.skip(f"no LibriSpeech sample at {REAL}")
    # The sample holds only test-clean, so the tokenizer trains on it too.
    dm = make_dm(
        REAL,
        tmp_path,
        train_subsets=["test-clean"],
        batching={"max_batch_seconds": 200.0, "max_duration": 20.0},
    )
    dm.setup("test")
    ds = dm.datasets["test"]
    assert len(ds) == 4 and {u.speaker for u in ds.utterances} == {1089}
    assert dm.problems["test"] == {}
    speakers = parse_speakers(REAL / "LibriSpeech" / "SPEAKERS.TXT")
    assert speakers[1089].sex == "M" and speakers[1089].subset == "test-clean" and dm.speakers == speakers
    # Every trans.txt lacks a final newline; its last line must still pair with audio.
    assert {u.key for u in ds.utterances} >= {"1089-134686-0001", "1089-134691-0001"}
    batches = list(dm.test_dataloader())
    total = sum(b["waveforms"].shape[0] for b in batches)
    assert total == 4 and all(b["skipped"] == 0 for b in batches)
    for b in batches:
        for row, key in enumerate(b["utt_keys"].tolist()):
            utt = ds.utterances[key]
            assert utt.file_rate == 16000 and int(b["wave_lengths"][row]) == utt.frames
            assert b["waveforms"][row].abs().max() > 0.01


def test_only_the_training_loader_keeps_its_workers(tone_root: Path, tmp_path: Path) -> None:
    """Evaluation workers would hold their prefetched batches in memory between validations."""
    dm = make_dm(tone_root, tmp_path, loader={"num_workers": 1})
    dm.setup("fit")
    assert dm.train_dataloader().persistent_workers
    assert not dm.val_dataloader().persistent_workers


def test_seeded_loaders_keep_workers_for_training_only() -> None:
    """The loader of the map-style DataModules (MLM, GLUE): the same rule as the speech and image loaders."""
    data = list(range(8))
    for train in (True, False):
        loader = seeded_loader(data, None, train, batch_size=2, seed=0, num_workers=1, collate_fn=None)
        assert loader.persistent_workers is train
