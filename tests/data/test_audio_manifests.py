"""Audio-text sources of your own (datamodules/speech/manifests.py, manifest_datamodule.py): NeMo manifests, Clotho
and AudioCaps CSVs, LibriSpeech subsets; bad rows skipped and named; every Clotho caption scored; mid-epoch resume;
the CLI from one config and a path; learning through a manifest."""

from __future__ import annotations

import csv
import json
import time
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch

from datamodules.sections import LoaderConfig, TokenizerConfig
from datamodules.speech.audio_text_data import caption_groups
from datamodules.speech.librispeech import index_subset
from datamodules.speech.manifest_datamodule import AudioConfig, AudioTextDataModule, MixtureBucketBatchSampler
from datamodules.speech.manifests import AudioTextSource, ManifestColumnError, read_source
from datamodules.synthetic.tones import VOCABULARY, generate_tone_librispeech, render_sentence, tone_lexicon
from lightning_modules.components.contrastive import ContrastiveLossConfig
from lightning_modules.components.speech_tower import SpeechTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.speech_text_module import SpeechTextModule
from tests.helpers import CONFIGS, cli_args, quiet_trainer

# file rate and channels of the generated clips, in turn: resampled and downmixed on reading
FORMATS = ((22050, 2, "wav"), (16000, 1, "flac"))

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


def write_tones(folder: Path, n: int, seed: int = 0, words: int = 4) -> list[dict]:
    """`n` clips of tone words (datamodules/synthetic/tones.py) in `folder`, alternately 22.05 kHz stereo WAV and
    16 kHz mono FLAC; returns per clip its file name, words, duration, rate and frame count."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lexicon = tone_lexicon()
    clips = []
    for i in range(n):
        rate, channels, ext = FORMATS[i % 2]
        chosen = [VOCABULARY[w] for w in rng.choice(len(VOCABULARY), size=words, replace=False)]
        wave = render_sentence(chosen, rate, rng, lexicon=lexicon)
        if channels == 2:  # the right channel quieter: a downmix is the mean, not either channel
            wave = np.stack([wave, 0.5 * wave], axis=1)
        name = f"clip{i:03d}.{ext}"
        sf.write(folder / name, wave, rate)
        clips.append(
            {"name": name, "words": chosen, "duration": len(wave) / rate, "rate": rate, "frames": len(wave)}
        )
    return clips


def write_nemo(path: Path, clips: list[dict], prefix: str = "clips/", extra: str = "") -> Path:
    lines = [
        json.dumps(
            {"audio_filepath": prefix + c["name"], "duration": c["duration"], "text": " ".join(c["words"])}
        )
        for c in clips
    ]
    path.write_text("\n".join(lines) + "\n" + extra, encoding="utf-8")
    return path


def captions_of(words: list[str], k: int, seed: int) -> list[str]:
    """`k` different orders of the same words: five captions of one clip."""
    rng = np.random.default_rng(seed)
    return [" ".join(words)] + [" ".join(rng.permutation(words)) for _ in range(k - 1)]


def write_clotho(root: Path, split: str, n: int, seed: int) -> Path:
    clips = write_tones(root / split, n, seed)
    csv_path = root / f"clotho_captions_{split}.csv"
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        out = csv.writer(f)
        out.writerow(["file_name", *(f"caption_{k}" for k in range(1, 6))])
        for i, c in enumerate(clips):
            out.writerow([c["name"], *captions_of(c["words"], 5, seed * 1000 + i)])
    return csv_path


def small_dm(**kwargs) -> AudioTextDataModule:
    base = dict(
        audio=AudioConfig(max_duration=10.0, max_batch_seconds=20.0, num_buckets=2),
        loader=LoaderConfig(num_workers=0),
        context_length=16,
    )
    return AudioTextDataModule(**{**base, **kwargs})


def tokenizer(tmp_path: Path) -> TokenizerConfig:
    return TokenizerConfig(vocab_size=120, cache_dir=str(tmp_path / "cache"))


# -- readers --------------------------------------------------------------------------------------


def test_nemo_manifest_reads_any_rate_and_channels_and_names_bad_rows(tmp_path: Path) -> None:
    clips = write_tones(tmp_path / "clips", 4)
    (tmp_path / "clips" / "corrupt.wav").write_bytes(b"RIFF not really a wave file")
    absolute = json.dumps(
        {"audio_filepath": str(tmp_path / "clips" / clips[0]["name"]), "text": "absolute path"}
    )
    extra = "\n".join(
        [
            absolute,  # no duration: read from the header
            '{"audio_filepath": "clips/gone.wav", "duration": 1.0, "text": "missing file"}',
            '{"audio_filepath": "clips/corrupt.wav", "text": "unreadable, no duration"}',
            '{"audio_filepath": "clips/clip001.wav", "duration": 1.0, "text": "  "}',
            '{"text": "no audio field"}',
            "{not json",
        ]
    )
    manifest = write_nemo(tmp_path / "m.json", clips, extra=extra + "\n")
    found, problems = read_source(AudioTextSource("m.json"), root=tmp_path)
    assert [c.key for c in found] == [f"clips/{c['name']}" for c in clips] + [
        str(tmp_path / "clips/clip000.wav")
    ]
    assert found[-1].frames == clips[0]["frames"]  # from the header, at the file's own rate
    assert found[-1].duration == pytest.approx(clips[0]["duration"])
    counts = {kind: len(items) for kind, items in problems.items()}
    assert counts == {"missing_audio": 1, "unreadable": 1, "empty_caption": 1, "malformed": 2}
    assert problems["missing_audio"][0].startswith(f"{manifest}:6:")  # file and line named
    assert problems["empty_caption"] == [f"{manifest}:8"]

    dm = small_dm(train=AudioTextSource(str(manifest)), tokenizer=tokenizer(tmp_path))
    dm.setup("fit")
    assert dm.problems["train"] == counts
    dataset = dm.datasets["train"]
    for i, clip in enumerate(clips):
        item = dataset[i]
        # resampled to 16 kHz (within the resampler's rounding of a sample) and one channel
        assert item["waveform"].ndim == 1
        assert abs(item["waveform"].numel() - clip["duration"] * 16000) <= 1
    stereo = dataset[0]["waveform"]  # 22.05 kHz stereo, left = 2 x right: the mean is 0.75 x left
    left = torch.from_numpy(sf.read(tmp_path / "clips" / clips[0]["name"], dtype="float32")[0][:, 0])
    import torchaudio

    # float32 resampling of the same samples in a different order: 1e-5 guards only rounding
    expected = torchaudio.functional.resample(0.75 * left, 22050, 16000)
    torch.testing.assert_close(stereo, expected, atol=1e-5, rtol=1e-4)


def test_a_manifest_without_the_configured_field_stops_with_one_line(tmp_path: Path, capsys) -> None:
    from cli import main

    write_tones(tmp_path / "clips", 2)
    manifest = tmp_path / "m.json"
    manifest.write_text(
        '{"audio": "clips/clip000.wav", "text": "a b"}\n{"audio": "clips/clip001.flac", "text": "c"}\n'
    )
    with pytest.raises(ManifestColumnError, match=rf"{manifest}: no row has the field 'audio_filepath'"):
        read_source(AudioTextSource(str(manifest)))
    clips, _ = read_source(AudioTextSource(str(manifest), audio_field="audio"))
    assert len(clips) == 2

    clotho = tmp_path / "c.csv"
    clotho.write_text("file,caption_1\nclip000.wav,a b\n")
    with pytest.raises(ManifestColumnError, match=rf"{clotho}: no column 'file_name'"):
        read_source(AudioTextSource(str(clotho), format="clotho", audio_dir="clips"))

    args = cli_args(
        "fit",
        f"--data.root={tmp_path}",
        "--data.train.path=m.json",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        config="speech/manifest.yaml",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    last = (
        capsys.readouterr().err.strip().splitlines()[-1]
    )  # lines before it: warnings of the test's own argv
    assert last.startswith("error: ") and f"{manifest}: no row has the field 'audio_filepath'" in last


def test_clotho_reads_five_captions_per_clip_and_names_bad_rows(tmp_path: Path) -> None:
    csv_path = write_clotho(tmp_path, "development", 3, seed=1)
    with csv_path.open("a", newline="") as f:
        f.write("clip000.wav,only two fields\n")  # too few fields
        f.write("gone.wav,a,b,c,d,e\n")  # no such clip
        f.write('clip001.flac,one,,three,"  ",five\n')  # a second row of clip001 with two empty captions
    clips, problems = read_source(AudioTextSource(csv_path.name, format="clotho"), root=tmp_path)
    assert [c.key for c in clips] == ["clip000.wav", "clip001.flac", "clip002.wav"]
    assert [len(c.captions) for c in clips] == [5, 8, 5]  # clip001: its row and the extra one's three
    assert {k: len(v) for k, v in problems.items()} == {
        "malformed": 1,
        "missing_audio": 1,
        "empty_caption": 2,
    }
    assert problems["malformed"] == [f"{csv_path}:5: 2 of 6 fields"]
    assert problems["empty_caption"] == [f"{csv_path}:7", f"{csv_path}:7"]


@pytest.mark.parametrize("pattern", ["{youtube_id}_{start_time}", "{audiocap_id}", "Y{youtube_id}"])
def test_audiocaps_clips_are_found_under_the_common_namings(tmp_path: Path, pattern: str) -> None:
    clips = write_tones(tmp_path / "scratch", 2)
    audio = tmp_path / "test"
    audio.mkdir()
    rows = [(100 + k, "abcDEF-12_x", 30, f"caption {k}") for k in range(5)]  # one clip, five captions
    rows += [(200, "zzzzzzzzzzz", 0, "another clip")]
    for (cap_id, yt, start, _), clip in zip(rows[:1] + rows[5:], clips):
        name = pattern.format(audiocap_id=cap_id, youtube_id=yt, start_time=start)
        ext = Path(clip["name"]).suffix
        (tmp_path / "scratch" / clip["name"]).rename(audio / f"{name}{ext}")
    with (tmp_path / "test.csv").open("w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
        out.writerows(rows)
    found, problems = read_source(AudioTextSource("test.csv", format="audiocaps"), root=tmp_path)
    assert problems == {}
    assert [len(c.captions) for c in found] == [5, 1]  # the five rows of one YouTube clip are one clip
    assert found[0].captions == tuple(f"caption {k}" for k in range(5))
    assert Path(found[1].path).parent == audio


def test_librispeech_subset_is_a_source(tmp_path: Path) -> None:
    tree = generate_tone_librispeech(tmp_path / "tones", n_train_utts=6, n_val_utts=2)
    clips, problems = read_source(
        AudioTextSource("LibriSpeech/dev-clean", format="librispeech"), root=tmp_path / "tones"
    )
    utterances, _ = index_subset(tree / "dev-clean")
    assert problems == {}
    assert [(c.key, c.captions, c.frames) for c in clips] == [
        (u.key, (u.transcript,), u.frames) for u in utterances
    ]


def test_clips_that_share_a_caption_are_one_group() -> None:
    # clip 2 shares a caption with clip 0, clip 3 with clip 2: all three are positives of each other
    groups = caption_groups([["a", "b"], ["c"], ["d", "b"], ["d"], ["e"]])
    assert groups == [0, 1, 0, 0, 2]


# -- evaluation scores every caption --------------------------------------------------------------


def test_validation_scores_every_caption_of_every_clip(tmp_path: Path) -> None:
    """A clip is right at K when any of its captions ranks in its top K; every caption is a query of its own."""
    write_clotho(tmp_path, "validation", 4, seed=2)
    dm = small_dm(
        val=AudioTextSource("clotho_captions_validation.csv", format="clotho"),
        root=str(tmp_path),
        tokenizer=TokenizerConfig(path=None, vocab_size=120, cache_dir=str(tmp_path / "cache")),
    )
    dm.sources["train"] = dm.sources["val"]  # the vocabulary from these captions
    batches = list(dm.val_dataloader())
    assert sum(len(b["utt_keys"]) for b in batches) == 4
    assert sum(len(b["caption_keys"]) for b in batches) == 20  # five captions a clip, all of them served
    model = SpeechTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=8,
        speech=SpeechTowerConfig("tiny", layers=1, hidden=32, heads=2, conv_channels=4),
        text=TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16),
    )
    pair = model.pair
    metric = pair.retrieval["val"]
    for batch in batches:
        e = pair.embed(batch, "val")
        assert torch.equal(e.b_keys, batch["caption_keys"]) and torch.equal(
            e.b_groups, batch["caption_groups"]
        )
        # planted embeddings: a clip equals its caption number 3 (of 5); its other captions lean towards the next
        # clip (cosine 0.71), so they retrieve that one first and rank below caption 3 for their own clip
        n_clips = len(batch["utt_keys"])
        dims = torch.eye(20)
        a = dims[batch["utt_keys"] * 5 + 2]
        b = dims[batch["caption_keys"]] + dims[(batch["caption_utt_keys"] + 1) % 4 * 5 + 2]
        third = batch["caption_keys"] % 5 == 2
        b[third] = dims[batch["caption_keys"][third]]
        metric.update(a, e.a_keys, e.a_groups, b, e.b_keys, e.b_groups)
        assert e.pair_index.tolist() == [5 * i for i in range(n_clips)]  # the loss: each clip's first caption
    scores = metric.compute()
    assert scores["a2t_R@1"] == 1.0  # every clip finds one of its captions first
    assert scores["t2a_R@1"] == pytest.approx(4 / 20)  # only caption 3 of each clip finds its clip first


# -- resume ---------------------------------------------------------------------------------------


def test_a_resumed_loader_serves_the_batches_of_the_unbroken_epoch(tmp_path: Path) -> None:
    write_clotho(tmp_path, "development", 12, seed=3)

    def loader():
        dm = small_dm(
            train=AudioTextSource("clotho_captions_development.csv", format="clotho"),
            root=str(tmp_path),
            tokenizer=tokenizer(tmp_path),
            audio=AudioConfig(max_duration=5.0, max_batch_seconds=6.0, num_buckets=3),
        )
        return dm.train_dataloader()

    def content(batch):
        return batch["utt_keys"].tolist(), batch["input_ids"].tolist()

    unbroken = loader()
    unbroken.batch_sampler.set_epoch(1)
    batches = [content(b) for b in unbroken]
    assert len(batches) >= 4
    epoch0 = loader()
    first = [content(b) for b in epoch0]
    assert first != batches  # epoch 1 reshuffles clips and draws other captions
    resumed = loader()
    resumed.load_state_dict({"epoch": 1, "consumed": 2})
    assert [content(b) for b in resumed] == batches[2:]


# -- CLI and learning -----------------------------------------------------------------------------

TINY_MODEL = [
    "--trainer.precision=32-true",
    "--model.embed_dim=16",
    "--model.speech.size=tiny",
    "--model.speech.layers=1",
    "--model.speech.hidden=32",
    "--model.speech.heads=2",
    "--model.speech.conv_channels=4",
    "--model.text.size=tiny",
    "--model.text.layers=1",
    "--model.text.hidden=32",
    "--model.text.heads=2",
    "--data.loader.num_workers=0",
    "--data.tokenizer.vocab_size=120",
]


def tiny_cli(command: str, tmp_path: Path, config: str, root: Path, *extra: str) -> list[str]:
    """The experiment's config (under configs/speech) and the folder of the data; the rest keeps the run tiny and
    quiet, under tmp_path; `extra` come last."""
    return cli_args(
        command,
        f"--data.root={root}",
        *TINY_MODEL,
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        *extra,
        config=f"speech/{config}",
        root=tmp_path / "run",
    )


def nemo_folder(folder: Path) -> Path:
    """The layout configs/speech/manifest.yaml reads: train_manifest.json and val_manifest.json."""
    write_nemo(folder / "train_manifest.json", write_tones(folder / "clips", 8, seed=4))
    write_nemo(folder / "val_manifest.json", write_tones(folder / "val", 4, seed=5), prefix="val/")
    return folder


def test_cli_fit_from_a_nemo_manifest_smoke(tmp_path: Path) -> None:
    """One training step and one validation from the config and the data folder."""
    from cli import main

    cli = main(
        tiny_cli(
            "fit",
            tmp_path,
            "manifest.yaml",
            nemo_folder(tmp_path / "data"),
            "--trainer.max_steps=1",
            "--trainer.val_check_interval=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.logger=false",  # no metrics.csv to plot: the PNG curves cost seconds
        )
    )
    assert cli.trainer.global_step == 1
    assert "val/a2t_R@1" in cli.trainer.callback_metrics


@pytest.mark.slow
def test_cli_trains_validates_and_predicts_from_a_nemo_manifest(tmp_path: Path) -> None:
    from cli import main

    data = nemo_folder(tmp_path / "data")
    cli = main(
        tiny_cli(
            "fit", tmp_path, "manifest.yaml", data, "--trainer.max_steps=2", "--trainer.val_check_interval=2"
        )
    )
    assert cli.trainer.global_step == 2
    assert cli.model.pair.text.bert.cfg.vocab_size == cli.datamodule.vocab_size
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    cli = main(tiny_cli("validate", tmp_path, "manifest.yaml", data, f"--ckpt_path={ckpt}"))
    assert 0.0 <= cli.trainer.callback_metrics["val/a2t_R@1"] <= 1.0
    out = tmp_path / "predictions"
    main(
        tiny_cli(
            "predict",
            tmp_path,
            "manifest.yaml",
            data,
            f"--config={CONFIGS / 'predict/embeddings.yaml'}",
            f"--trainer.callbacks.init_args.output_dir={out}",
            "--data.predict.split=val",
            f"--ckpt_path={ckpt}",
        )
    )
    import pyarrow.parquet as pq

    table = pq.read_table(out / "embeddings.parquet").to_pydict()
    assert sorted(zip(table["kind"], table["id"])) == sorted(
        [("utterance", f"val/clip{i:03d}.{FORMATS[i % 2][2]}") for i in range(4)]
        + [("caption", f"val/clip{i:03d}.{FORMATS[i % 2][2]}#1") for i in range(4)]
    )


@pytest.mark.slow
def test_cli_trains_validates_and_predicts_from_a_clotho_folder(tmp_path: Path) -> None:
    from cli import main

    data = tmp_path / "clotho"
    for split, n, seed in (("development", 8, 6), ("validation", 4, 7), ("evaluation", 4, 8)):
        write_clotho(data, split, n, seed)
    cli = main(
        tiny_cli("fit", tmp_path, "clotho.yaml", data, "--trainer.max_steps=2", "--trainer.max_epochs=1")
    )
    assert cli.trainer.global_step == 2
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    cli = main(tiny_cli("test", tmp_path, "clotho.yaml", data, f"--ckpt_path={ckpt}"))
    # every caption scored: the test batches carry 4 clips and their 20 captions, and a caption's R@10 is 1
    # whenever it ranks the 4 clips
    batches = list(cli.datamodule.test_dataloader())
    assert sum(len(b["utt_keys"]) for b in batches) == 4
    assert sorted(torch.cat([b["caption_keys"] for b in batches]).tolist()) == list(range(20))
    assert cli.trainer.callback_metrics["test/t2a_R@10"] == 1.0
    assert 0.0 <= cli.trainer.callback_metrics["test/a2t_R@1"] <= 1.0
    cli = main(tiny_cli("validate", tmp_path, "clotho.yaml", data, f"--ckpt_path={ckpt}"))
    assert {f"val/{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)} <= set(cli.trainer.callback_metrics)
    out = tmp_path / "predictions"
    main(
        tiny_cli(
            "predict",
            tmp_path,
            "clotho.yaml",
            data,
            f"--config={CONFIGS / 'predict/embeddings.yaml'}",
            f"--trainer.callbacks.init_args.output_dir={out}",
            "--data.predict.split=val",
            f"--ckpt_path={ckpt}",
        )
    )
    import pyarrow.parquet as pq

    table = pq.read_table(out / "embeddings.parquet").to_pydict()
    names = [f"clip{i:03d}.{FORMATS[i % 2][2]}" for i in range(4)]
    assert sorted(zip(table["kind"], table["id"])) == sorted(
        [("utterance", n) for n in names] + [("caption", f"{n}#{c}") for n in names for c in range(1, 6)]
    )


def learn(
    tmp_path: Path,
    steps: int,
    n_train: int,
    words: int = 3,
    batch_seconds: float = 60.0,
    lr: float = 2e-3,
    held_out: bool = True,
) -> tuple[dict, float]:
    """Train a tiny model `steps` steps on tone clips of `words` words through a NeMo manifest; the validation
    metrics on 40 held-out clips (`held_out`) or on the training clips, and the chance R@5."""
    data = tmp_path / "data"
    write_nemo(data / "train.json", write_tones(data / "clips", n_train, seed=11, words=words))
    write_nemo(data / "val.json", write_tones(data / "val", 40, seed=12, words=words), prefix="val/")
    dm = AudioTextDataModule(
        train=AudioTextSource("train.json"),
        val=AudioTextSource("val.json" if held_out else "train.json"),
        root=str(data),
        audio=AudioConfig(max_duration=5.0, max_batch_seconds=batch_seconds, num_buckets=2),
        loader=LoaderConfig(num_workers=0),
        tokenizer=tokenizer(tmp_path),
        context_length=16,
    )
    L.seed_everything(0)
    model = SpeechTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=64,
        speech=SpeechTowerConfig(
            "tiny", layers=1, heads=2, dropout=0.0, conv_channels=16, freq_mask_width=10, time_mask_width=10
        ),
        text=TextTowerConfig("tiny", layers=1, heads=2, dropout=0.0, pooling="mean", max_len=16),
        loss=ContrastiveLossConfig(init_logit_scale=10.0),
        optimizer=OptimizerConfig(lr=lr, weight_decay=0.01, warmup_steps=min(10, steps // 4)),
    )
    trainer = quiet_trainer(
        max_steps=steps, limit_val_batches=0, enable_checkpointing=False, use_distributed_sampler=False
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    metrics = quiet_trainer(use_distributed_sampler=False).validate(model, dm, verbose=False)[0]
    chance = 5 / len(set(dm.datasets["val"].groups))
    print(
        f"{steps} steps in {time.perf_counter() - start:.1f} s: a2t R@5 {metrics['val/a2t_R@5']:.2f}, "
        f"t2a R@5 {metrics['val/t2a_R@5']:.2f}, chance {chance:.3f}"
    )
    return metrics, chance


def test_learns_the_training_clips_through_a_manifest_quickly(tmp_path: Path) -> None:
    """The short version: in 12 steps 16 clips of two tone words are told apart, R@1 far above chance (1/16)."""
    metrics, chance = learn(
        tmp_path, steps=12, n_train=16, words=2, batch_seconds=40.0, lr=3e-3, held_out=False
    )
    chance_r1 = chance / 5
    assert chance_r1 == pytest.approx(1 / 16)
    assert metrics["val/a2t_R@1"] >= 4 * chance_r1
    assert metrics["val/t2a_R@1"] >= 4 * chance_r1


@pytest.mark.slow
def test_learns_retrieval_through_a_manifest(tmp_path: Path) -> None:
    """60 steps on 240 clips: held-out clips and captions retrieved far above chance (R@5 chance 0.125)."""
    metrics, chance = learn(tmp_path, steps=60, n_train=240)
    assert chance == pytest.approx(5 / 40)
    assert metrics["val/a2t_R@5"] >= max(0.5, 4 * chance)
    assert metrics["val/t2a_R@5"] >= max(0.5, 4 * chance)


# -- mixtures -------------------------------------------------------------------------------------


def test_a_training_mixture_draws_sources_by_weight_in_duration_buckets(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_nemo(data / "small.json", write_tones(data / "a", 6, seed=20, words=2), prefix="a/")
    write_nemo(data / "large.json", write_tones(data / "b", 18, seed=21, words=5), prefix="b/")
    sources = [AudioTextSource("small.json", weight=6.0), AudioTextSource("large.json", weight=1.0)]

    def loader():
        return small_dm(
            mixture={"sources": sources, "num_samples": 240, "replacement": True},
            root=str(data),
            tokenizer=tokenizer(tmp_path),
            audio=AudioConfig(max_duration=5.0, max_batch_seconds=12.0, num_buckets=4),
        ).train_dataloader()

    train = loader()
    sampler = train.batch_sampler
    durations = np.array(train.dataset.durations)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(train)  # the count fixed at the first epoch's draw holds
        for keys in batches:  # padded seconds within the budget
            assert len(keys) * durations[keys].max() <= 12.0
    drawn = np.concatenate(batches)
    # small: 6 clips x weight 6 = 36, large: 18 x 1 = 18, so 2/3 of the draws; 240 draws: 160 +- 7 (one sd)
    share = (drawn < 6).mean()
    assert abs(share - 2 / 3) < 0.1, share
    assert set(drawn[drawn < 6]) == set(range(6))  # every clip of the upsampled source comes, repeatedly

    # two ranks take alternate batches of the same epoch, equally many
    ranks = [
        MixtureBucketBatchSampler(durations, sampler.mixture, 12.0, 4, seed=0, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    for r in ranks:
        r.set_epoch(2)
    shards = [list(r) for r in ranks]
    assert len(shards[0]) == len(shards[1]) == len(ranks[0]) == -(-sampler.num_batches // 2)
    one = sampler.draw_batches(2)
    padded = [one[i % len(one)] for i in range(2 * len(ranks[0]))]
    assert [b for pair in zip(*shards) for b in pair] == padded

    # resumed in the middle of epoch 2: the rest of the same epoch, audio and captions served
    resumed = loader()
    resumed.load_state_dict({"epoch": 2, "consumed": len(batches) - 3})
    assert [b["utt_keys"].tolist() for b in resumed] == batches[-3:]


def test_the_sections_are_saved_as_plain_values(tmp_path: Path) -> None:
    """Checkpoints hold the DataModule's hyperparameters and are read with weights_only: no dataclass in them."""
    dm = small_dm(
        mixture={"sources": [AudioTextSource("a.json", weight=3.0), {"path": "b.csv", "format": "clotho"}]},
        val=AudioTextSource("v.json"),
    )
    torch.save(dict(dm.hparams), tmp_path / "hparams.pt")
    saved = torch.load(tmp_path / "hparams.pt", weights_only=True)
    assert (
        saved["mixture"]["sources"][0]["weight"] == 3.0
        and saved["mixture"]["sources"][1]["format"] == "clotho"
    )
    assert saved["audio"]["max_batch_seconds"] == 20.0 and saved["train"] is None
    again = AudioTextDataModule(**saved)  # and they build the same DataModule again
    assert again.split_sources("train") == dm.split_sources("train")
    assert again.audio == dm.audio and again.sources == dm.sources
