"""Users' data is never deleted, overwritten or moved (issue 14, point 0).

Genuine-looking folders (a COCO root with only val2017, a LibriSpeech tree with only test-clean, a Wikipedia
dump, an ImageFolder set) are given to every quickstart config as its data path, for fit, validate and test:
each file is hashed before and after, and the command either stops with the one-line error or runs on the
genuine data. The generators' shared folder check (datamodules/generated.py) is tested on its own too.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from PIL import Image

from cli import main
from datamodules.generated import (
    MARKER,
    ForeignDataError,
    claim_folder,
    generated_by,
    is_complete,
    written_whole,
)
from datamodules.synthetic.sample_corpus import generate_sample_corpus
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder
from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.tokenizer import TextTokenizer
from datamodules.trimodal_datamodule import generate_spoken_captions
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.helpers import cli_args, sha256_of_files

STAGES = ("fit", "validate", "test")
CAPTIONS = [
    "A woman stands in the dining area at the table.",
    "A room with chairs, a table, and a woman in it.",
    "A man riding a wave on top of a surfboard.",
    "A surfer rides a small wave near the beach.",
    "Two dogs play with a frisbee in the park.",
    "A brown dog runs across the green grass.",
]
# one or two genuine transcripts per utterance: upper case, no punctuation, as LibriSpeech writes them
TRANSCRIPTS = [
    "HE HOPED THERE WOULD BE STEW FOR DINNER TURNIPS AND CARROTS",
    "STUFF IT INTO YOU HIS BELLY COUNSELLED HIM",
    "AFTER EARLY NIGHTFALL THE YELLOW LAMPS WOULD LIGHT UP HERE AND THERE",
]


# -- the genuine-looking folders ---------------------------------------------------------------------------
def _photo(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=85)


@pytest.fixture
def coco_val(tmp_path: Path) -> Path:
    """An evaluation machine's COCO: val2017 and its captions, no training annotations."""
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / "annotations").mkdir()
    images, annotations = [], []
    for n, image_id in enumerate((139, 285, 632)):
        name = f"{image_id:012d}.jpg"
        _photo(root / "val2017" / name, n)
        images.append({"id": image_id, "file_name": name, "width": 64, "height": 48, "license": 4})
        for k in range(2):
            caption = CAPTIONS[2 * n + k]
            annotations.append({"id": 1000 + 2 * n + k, "image_id": image_id, "caption": caption})
    data = {"info": {"description": "COCO 2017 Dataset", "year": 2017}, "images": images}
    data["annotations"] = annotations
    (root / "annotations" / "captions_val2017.json").write_text(json.dumps(data))
    return root


def _librispeech_subset(folder: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    chapter = folder / "1089" / "134686"
    chapter.mkdir(parents=True)
    lines = []
    for n, text in enumerate(TRANSCRIPTS):
        utt = f"1089-134686-{n:04d}"
        wave = (0.1 * rng.standard_normal(8000)).astype(np.float32)  # half a second at 16 kHz
        sf.write(chapter / f"{utt}.flac", wave, 16000, subtype="PCM_16", format="FLAC")
        lines.append(f"{utt} {text}\n")
    (chapter / "1089-134686.trans.txt").write_text("".join(lines))


@pytest.fixture
def librispeech(tmp_path: Path) -> Path:
    """A LibriSpeech download holding only test-clean, in the official tree."""
    root = tmp_path / "librispeech"
    _librispeech_subset(root / "LibriSpeech" / "test-clean", 0)
    (root / "LibriSpeech" / "SPEAKERS.TXT").write_text("1089  | M | test-clean       | 25.00 | Reader\n")
    return root


@pytest.fixture
def librispeech_subsets(tmp_path: Path) -> Path:
    """Subset folders kept directly in a folder of one's own (not named LibriSpeech)."""
    root = tmp_path / "speech_subsets"
    _librispeech_subset(root / "test-clean", 1)
    return root


def _wikipedia_dump(path: Path) -> None:
    pages = "".join(
        f"  <page>\n    <title>Town {n}</title>\n    <ns>0</ns>\n    <id>{n}</id>\n    <revision>\n"
        f"      <id>{100 + n}</id>\n      <model>wikitext</model>\n      <format>text/x-wiki</format>\n"
        f"      <text xml:space=\"preserve\">'''Town {n}''' is a town on the river. {' '.join(CAPTIONS)}\n\n"
        f"== History ==\n{' '.join(reversed(CAPTIONS))}</text>\n    </revision>\n  </page>\n"
        for n in range(1, 13)
    )
    with bz2.open(path, "wt", encoding="utf-8") as f:
        f.write('<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10">\n')
        f.write(pages + "</mediawiki>\n")


@pytest.fixture
def wikipedia(tmp_path: Path) -> Path:
    """A Wikipedia folder of one's own, named like the cache's sample folder: `<cache_dir>/sample_corpus`."""
    root = tmp_path / "corpora" / "sample_corpus"
    root.mkdir(parents=True)
    _wikipedia_dump(root / "enwiki-20240101-pages-articles1.xml.bz2")
    (root / "README.txt").write_text("downloaded from dumps.wikimedia.org\n")
    return root


@pytest.fixture
def imagefolder(tmp_path: Path) -> Path:
    """A classification set in ImageFolder layout with only a test split."""
    root = tmp_path / "pets"
    for c, name in enumerate(("cat", "dog")):
        (root / "test" / name).mkdir(parents=True)
        for i in range(2):
            _photo(root / "test" / name / f"{i}.jpg", 10 * c + i)
    return root


# -- checking ------------------------------------------------------------------------------------------------
def assert_untouched(root: Path, before: dict[str, str]) -> None:
    after = sha256_of_files(root)
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    added = sorted(set(after) - set(before))
    assert not changed, f"changed or removed in {root}: {changed}"
    assert not added, f"written into {root}: {added}"


def run_or_error(args: list[str], capsys: pytest.CaptureFixture) -> tuple[object | None, str | None]:
    """(the CLI, None) when the command ran, (None, its one error line) when it stopped with one."""
    capsys.readouterr()
    try:
        return main(args, friendly_errors=True), None
    except SystemExit as exit_info:
        assert exit_info.code == 2
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, errors
        return None, errors[0]


def quick(config: str, stage: str, tmp_path: Path, *extra: str) -> list[str]:
    """A quickstart command cut to one batch, writing its run and caches under tmp_path."""
    args = cli_args(stage, *extra, config=config, root=tmp_path / "run")
    args += ["--trainer.limit_val_batches=1", "--trainer.limit_test_batches=1"]
    if stage == "fit":
        args += [
            "--trainer.max_steps=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.val_check_interval=1",
        ]
    return args


REFUSED = "holds other data"  # ForeignDataError's text; the rest names the folder and the setting


# -- the shared folder check ---------------------------------------------------------------------------------
def test_claim_folder_takes_new_and_empty_folders_and_marks_them(tmp_path: Path) -> None:
    new, empty = tmp_path / "a" / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        assert claim_folder(folder, "gen", {"n": 1}, "advice") == folder
        marker = json.loads((folder / MARKER).read_text())
        assert marker == {"generator": "gen", "params": {"n": 1}, "complete": False}
        assert sorted(p.name for p in folder.iterdir()) == [MARKER]
        assert not is_complete(folder, "gen")


def test_claim_folder_reuses_its_own_marker_and_refuses_everything_else(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    claim_folder(ours, "gen", {"n": 1}, "advice")
    (ours / "half-written.bin").write_bytes(b"x")  # an interrupted run's debris: ours to rewrite
    assert claim_folder(ours, "gen", {"n": 2}, "advice") == ours
    assert generated_by(ours)["params"] == {"n": 1}  # the marker changes only when the set is complete
    with pytest.raises(ForeignDataError) as other_generator:
        claim_folder(ours, "another", {}, "point x elsewhere")
    assert str(other_generator.value) == (
        f"{ours} holds a set written by gen, not a set written by another, and is never overwritten or "
        "deleted: point x elsewhere"
    )
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "photo.jpg").write_bytes(b"\xff\xd8")
    (foreign / MARKER).write_text("not json")  # a marker we cannot read vouches for nothing
    with pytest.raises(ForeignDataError, match=r"foreign holds other data, not a set written by gen") as err:
        claim_folder(foreign, "gen", {}, "set data.generate_if_missing false")
    assert isinstance(err.value, ValueError) and "\n" not in str(err.value)  # the CLI's one-line errors
    assert (foreign / MARKER).read_text() == "not json"


def test_written_whole_moves_a_finished_set_in_and_nothing_else(tmp_path: Path) -> None:
    root = claim_folder(tmp_path / "set", "gen", {"n": 1}, "advice")
    done = (root / "b").is_file
    with pytest.raises(RuntimeError), written_whole(root, "gen", {"n": 1}, ["a", "b"], done) as tmp:
        (tmp / "a").mkdir()
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in root.iterdir()) == [MARKER] and not is_complete(root, "gen")

    (root / "a").mkdir()
    (root / "a" / "half-written").write_text(
        "debris"
    )  # an interrupted run's, in a folder carrying our marker
    with written_whole(root, "gen", {"n": 1}, ["a", "b"], done) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "x").write_text("ours")
        (tmp / "b").write_text("last")
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "a", "b"]
    assert [p.name for p in (root / "a").iterdir()] == ["x"] and is_complete(root, "gen")

    other = claim_folder(tmp_path / "raced", "gen", {"n": 1}, "advice")
    with written_whole(other, "gen", {"n": 2}, ["a"], (other / "a").is_dir) as tmp:
        (tmp / "a").mkdir()
        (tmp / "a" / "x").write_text("ours")
        (other / "a").mkdir()  # another process renamed its finished set into place meanwhile
        (other / "a" / "x").write_text("theirs")
    assert (other / "a" / "x").read_text() == "theirs" and sorted(p.name for p in other.iterdir()) == [
        MARKER,
        "a",
    ]
    assert generated_by(other)["params"] == {"n": 1}  # its own marker is the other process's to write


def _tiny_generators(tmp_path: Path) -> dict[str, Callable[[Path], object]]:
    def shapes(root: Path) -> Path:
        return generate_shapes_coco(root, n_train=4, n_val=2, image_size=16)

    return {
        "shapes_coco": shapes,
        "shapes_folder": lambda root: generate_shapes_imagefolder(
            root, colours=["red"], shapes=["circle"], per_class={"test": 2}, image_size=16
        ),
        "tones": lambda root: generate_tone_librispeech(root, n_train_utts=2, n_val_utts=1),
        "spoken_captions": lambda root: generate_spoken_captions(shapes(tmp_path / "shapes"), root, (1, 1)),
        "sample_corpus": lambda root: generate_sample_corpus(root, articles_per_town=1, story_lines=20),
    }


GENERATORS = ("shapes_coco", "shapes_folder", "tones", "spoken_captions", "sample_corpus")


@pytest.mark.parametrize("name", GENERATORS)
def test_every_generator_refuses_a_folder_of_other_data_and_reuses_its_own(name: str, tmp_path: Path) -> None:
    generate = _tiny_generators(tmp_path)[name]
    foreign = tmp_path / "foreign"
    (foreign / "val2017").mkdir(parents=True)
    (foreign / "val2017" / "000000000139.jpg").write_bytes(b"\xff\xd8 genuine")
    before = sha256_of_files(foreign)
    with pytest.raises(
        ForeignDataError, match=f"^{re.escape(str(foreign))} holds other data.*: .*empty or new"
    ):
        generate(foreign)
    assert_untouched(foreign, before)
    assert not list(tmp_path.glob(".*tmp*")) and not list(foreign.glob(".*"))

    ours = tmp_path / "ours"
    generate(ours)
    assert generated_by(ours)["complete"] is True
    written = sha256_of_files(ours)
    assert len(written) > 2 and not [k for k in written if ".tmp" in k]
    generate(ours)  # a finished set is kept as it is
    assert sha256_of_files(ours) == written


def test_a_marked_folder_left_unfinished_is_generated_again(tmp_path: Path) -> None:
    """An interrupted run leaves its marker saying "not complete" and debris; the next run replaces the debris."""
    root = tmp_path / "shapes"
    claim_folder(root, "datamodules.synthetic.shapes.generate_shapes_coco", {}, "advice")
    (root / "val2017").mkdir()
    (root / "val2017" / "half-written.jpg").write_bytes(b"\xff\xd8")
    generate_shapes_coco(root, n_train=4, n_val=2, image_size=16)
    assert sorted(p.name for p in (root / "val2017").iterdir()) == ["000000000005.jpg", "000000000006.jpg"]
    marker = generated_by(root)
    assert marker["complete"] is True and marker["params"]["n_train"] == 4
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "annotations", "train2017", "val2017"]


# -- every quickstart config, pointed at genuine data ---------------------------------------------------------
@pytest.mark.parametrize("stage", STAGES)
def test_clip_quickstart_on_a_genuine_coco_val_folder(
    stage: str, coco_val: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sha256_of_files(coco_val)
    args = quick("clip/quickstart.yaml", stage, tmp_path, f"--data.root={coco_val}")
    args += [
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.test_split=val2017",
    ]
    cli, error = run_or_error(args, capsys)
    # no training captions to train a vocabulary on, and the synthetic set is not written in their place
    assert cli is None and f"{coco_val} holds other data" in error
    assert "set data.generate_if_missing false to read it as it is, or point data.root to an empty" in error
    assert_untouched(coco_val, before)


def test_clip_quickstart_tests_on_the_genuine_val_split(
    coco_val: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The issue's command, with the vocabulary given: it tests on COCO's own images, not on shapes."""
    tokenizer = TextTokenizer.train(CAPTIONS * 3, vocab_size=120)
    tokenizer.save(tmp_path / "vocab")
    before = sha256_of_files(coco_val)
    args = quick("clip/quickstart.yaml", "test", tmp_path, f"--data.root={coco_val}")
    args += [
        f"--data.tokenizer.path={tmp_path / 'vocab'}",
        "--data.test_split=val2017",
        "--data.loader.num_workers=0",
    ]
    cli, error = run_or_error(args, capsys)
    assert error is None
    records = cli.datamodule.records("test")
    assert sorted(r.image_id for r in records) == [139, 285, 632]
    assert {Path(r.path).parent for r in records} == {coco_val / "val2017"}
    assert cli.trainer.callback_metrics["test/loss"].isfinite()
    assert_untouched(coco_val, before)


@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("layout", ["LibriSpeech tree", "subset folders"])
def test_speech_quickstart_on_genuine_librispeech_subsets(
    stage: str, layout: str, librispeech: Path, librispeech_subsets: Path, tmp_path: Path, capsys
) -> None:
    root = librispeech if layout == "LibriSpeech tree" else librispeech_subsets
    before = sha256_of_files(root)
    args = quick("speech/quickstart.yaml", stage, tmp_path, f"--data.root={root}")
    args += [f"--data.tokenizer.cache_dir={tmp_path / 'cache'}", "--data.loader.num_workers=0"]
    cli, error = run_or_error(args, capsys)
    assert cli is None
    if layout == "LibriSpeech tree":  # read as LibriSpeech: the subsets the config asks for are missing
        assert "train-clean-100 not found" in error and "subsets found: test-clean" in error
    else:  # no LibriSpeech tree found: the tone set would be generated, but not into this folder
        assert f"{root} holds other data" in error and "point data.root to an empty or new folder" in error
    assert_untouched(root, before)


def test_speech_quickstart_tests_on_the_genuine_subset(
    librispeech: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sha256_of_files(librispeech)
    args = quick("speech/quickstart.yaml", "test", tmp_path, f"--data.root={librispeech}")
    args += [f"--data.tokenizer.cache_dir={tmp_path / 'cache'}", "--data.loader.num_workers=0"]
    args += [f"--data.{split}_subsets=[test-clean]" for split in ("train", "val", "test")]
    cli, error = run_or_error(args, capsys)
    assert error is None
    transcripts = sorted(u.transcript for u in cli.datamodule.datasets["test"].utterances)
    assert transcripts == sorted(TRANSCRIPTS)
    assert cli.trainer.callback_metrics["test/loss"].isfinite()
    assert_untouched(librispeech, before)


@pytest.mark.parametrize("stage", STAGES)
def test_trimodal_quickstart_on_genuine_coco_and_librispeech(
    stage: str, coco_val: Path, librispeech: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = {root: sha256_of_files(root) for root in (coco_val, librispeech)}
    args = quick(
        "trimodal/quickstart.yaml", stage, tmp_path, f"--data.tokenizer.cache_dir={tmp_path / 'cache'}"
    )
    args += [f"--data.image_text.root={coco_val}", f"--data.speech_text.root={librispeech}"]
    cli, error = run_or_error(args, capsys)
    assert cli is None and f"{coco_val} holds other data" in error and "data.image_text.root" in error
    for root, files in before.items():
        assert_untouched(root, files)


def test_trimodal_quickstart_does_not_speak_captions_into_a_speech_folder(
    librispeech_subsets: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shapes = generate_shapes_coco(tmp_path / "shapes", n_train=8, n_val=4, image_size=16)
    before = sha256_of_files(librispeech_subsets)
    args = quick(
        "trimodal/quickstart.yaml", "fit", tmp_path, f"--data.tokenizer.cache_dir={tmp_path / 'cache'}"
    )
    args += [f"--data.image_text.root={shapes}", f"--data.speech_text.root={librispeech_subsets}"]
    cli, error = run_or_error(args, capsys)
    assert cli is None and f"{librispeech_subsets} holds other data" in error
    assert "point data.speech_text.root to an empty or new folder" in error
    assert_untouched(librispeech_subsets, before)


@pytest.mark.parametrize("stage", STAGES)
def test_mlm_quickstart_never_replaces_a_wikipedia_folder_in_its_cache(
    stage: str, wikipedia: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The sample corpus goes to <cache_dir>/sample_corpus; a folder of one's own there is never removed or
    replaced by the generator."""
    before = sha256_of_files(wikipedia)
    args = quick("mlm/quickstart.yaml", stage, tmp_path, f"--data.tokenizer.cache_dir={wikipedia.parent}")
    cli, error = run_or_error(args, capsys)
    assert cli is None and f"{wikipedia} holds other data" in error and "data.tokenizer.cache_dir" in error
    assert_untouched(wikipedia, before)
    assert sorted(p.name for p in wikipedia.parent.iterdir()) == ["sample_corpus"]


def test_mlm_quickstart_validates_on_the_genuine_dump(
    wikipedia: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Given a corpus, the quickstart (sample_corpus: true) reads it and generates no sample."""
    dump = next(wikipedia.glob("*.xml.bz2"))
    before = sha256_of_files(wikipedia)
    args = quick("mlm/quickstart.yaml", "validate", tmp_path, f"--data.wikipedia=[{dump}]")
    args += [
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.num_proc=1",
    ]
    args += [
        "--data.tokenizer.vocab_size=150",
        "--data.examples.val_fraction=0.3",
        "--data.examples.test_fraction=0.0",
    ]
    cli, error = run_or_error(args, capsys)
    assert error is None
    index = json.loads((cli.datamodule.folder / "index.json").read_text())
    assert index["inputs"] == [str(dump.resolve())]  # the genuine dump, not the bundled sample
    assert cli.trainer.callback_metrics["val/loss"].isfinite()
    assert not (tmp_path / "cache" / "sample_corpus").exists()
    assert_untouched(wikipedia, before)


@pytest.fixture
def clip_checkpoint(tmp_path: Path) -> Path:
    """An untrained tiny CLIP saved with its tokenizer, as zero-shot classification loads it."""
    tokenizer = TextTokenizer.train(CAPTIONS * 3, vocab_size=120)
    model = ImageTextModule(
        vocab_size=tokenizer.vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=64, patch_size=16, layers=1),
        text=TextTowerConfig("tiny", layers=1, heads=2, max_len=16),
    )
    path = tmp_path / "clip.ckpt"
    state = {"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}
    torch.save({**state, "tokenizer_json": tokenizer.tokenizer.to_str()}, path)
    return path


@pytest.mark.parametrize("stage", ["validate", "test"])
def test_zero_shot_config_on_a_genuine_imagefolder(
    stage: str, imagefolder: Path, clip_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    before = sha256_of_files(imagefolder)
    args = quick("zeroshot/shapes.yaml", stage, tmp_path, f"--data.root={imagefolder}")
    args += [f"--model.init_args.ckpt_path={clip_checkpoint}"]
    cli, error = run_or_error(args, capsys)
    if stage == "test":  # read as it is: its own classes, not generated shapes
        assert error is None and cli.datamodule.class_names == ["cat", "dog"]
        assert len(cli.datamodule.dataset("test")) == 4
    else:  # no val split: an error, not a generated one
        assert cli is None and "val" in error
    assert_untouched(imagefolder, before)
