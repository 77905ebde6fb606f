"""Zero-shot classification, linear probes and the ImageFolder reader."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cli import main
from datamodules.image.classification_datamodule import ClassificationDataModule
from datamodules.speech.librispeech_datamodule import LibriSpeechDataModule
from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder
from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.speech_tower import SpeechTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.linear_probe import (
    extract_embeddings,
    few_shot_indices,
    image_encoder,
    linear_probe,
    speech_encoder,
    split_per_class,
)
from lightning_modules.speech_text_module import SpeechTextModule
from lightning_modules.zero_shot import ZeroShotClassifier, class_embeddings, fill_template, load_image_text
from tests.helpers import cli_args, quiet_trainer

SHAPES_TEMPLATES = ["a {}", "a picture of a {}", "there is a {}", "a {} on a gray background", "a single {}"]
TEST_SHAPES = ("circle", "square", "cross")  # x all 8 colours: 24 classes


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


@pytest.fixture(scope="module")
def clip_run(tiny_clip: dict, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The shared tiny CLIP (300 steps on the captioned shapes) and the shape classes in ImageFolder layout,
    drawn the same way."""
    folder = generate_shapes_imagefolder(
        tmp_path_factory.mktemp("classes") / "classes",
        shapes=TEST_SHAPES,
        per_class={"train": 10, "val": 5, "test": 10},
        image_size=32,
    )
    return {"ckpt": tiny_clip["ckpt"], "classes": folder, "tokenizer": tiny_clip["tokenizer"]}


def class_folder_dm(
    root: Path, train_split: str | None = "train", val_split: str | None = "val"
) -> ClassificationDataModule:
    return ClassificationDataModule(
        "imagefolder",
        str(root),
        train_split=train_split,
        val_split=val_split,
        images={"image_size": 32},
        loader={"batch_size": 128, "num_workers": 0},
    )


# -- zero-shot -----------------------------------------------------------------------------------------


def test_prompt_ensemble_is_the_normalised_mean_of_normalised_prompt_embeddings(tmp_path: Path) -> None:
    tok = TextTokenizer.train(
        ["a red circle", "a picture of an orange square", "there is a blue star"] * 3, 100
    )
    torch.manual_seed(0)
    table = torch.nn.Embedding(tok.vocab_size, 8)

    def encode(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # unnormalised
        return (table(input_ids) * attention_mask[..., None]).sum(1)

    names, templates = ["red circle", "orange square"], ["a {}", "a picture of a {}", "there is a {}"]
    got = class_embeddings(encode, tok, names, templates, context_length=16)
    for row, name in zip(got, names):
        prompts = [fill_template(t, name) for t in templates]
        singles = [F.normalize(encode(**tok([p], 16)), dim=-1)[0] for p in prompts]
        expected = F.normalize(torch.stack(singles).mean(0), dim=0)
        # batched and single prompts: other shapes, other sums
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-6)
    assert got.norm(dim=-1).allclose(torch.ones(2))
    assert fill_template("a picture of a {}", "orange square") == "a picture of an orange square"
    assert fill_template("a {}", "red circle") == "a red circle"


def test_zero_shot_accuracy_far_above_chance_after_short_image_text_training(clip_run: dict) -> None:
    dm = class_folder_dm(clip_run["classes"])
    model = ZeroShotClassifier(str(clip_run["ckpt"]), templates=SHAPES_TEMPLATES, per_class=True)
    metrics = quiet_trainer(enable_checkpointing=False).test(model, dm, verbose=False)[0]
    n = dm.num_classes
    chance = 1 / n
    acc, top5 = metrics["test/zero_shot_acc"], metrics["test/zero_shot_acc_top5"]
    print(f"zero-shot over {n} classes: top-1 {acc:.3f}, top-5 {top5:.3f}; chance {chance:.3f}")
    assert n == 24 and "red circle" in dm.class_names
    assert acc >= 4 * chance, f"top-1 {acc:.3f} not well above chance 1/{n} = {chance:.3f}"
    assert top5 >= 4 * 5 * chance, f"top-5 {top5:.3f} not well above chance 5/{n} = {5 * chance:.3f}"
    per_class = [metrics[f"test/zero_shot_acc/{folder}"] for folder in dm.dataset("test").folders]
    assert sum(per_class) / n == pytest.approx(acc, abs=1e-6)  # equal class sizes: the mean is the accuracy


def test_checkpoint_tokenizer_equals_the_training_file(clip_run: dict, tmp_path: Path) -> None:
    """The tokenizer travels in the checkpoint; an older checkpoint without it finds it through its DataModule."""
    _, given, _ = load_image_text(clip_run["ckpt"], tokenizer=str(clip_run["tokenizer"]))
    ckpt = torch.load(clip_run["ckpt"], map_location="cpu", weights_only=True)
    assert "tokenizer_json" in ckpt
    _, stored, length = load_image_text(clip_run["ckpt"])
    assert stored.fingerprint() == given.fingerprint() and length == 32
    del ckpt["tokenizer_json"]
    torch.save(ckpt, tmp_path / "old.ckpt")
    _, found, _ = load_image_text(tmp_path / "old.ckpt")
    assert found.fingerprint() == given.fingerprint()


def test_checkpoint_from_before_the_tower_sections_is_refused_by_name(tmp_path: Path) -> None:
    old = tmp_path / "flat.ckpt"
    torch.save(
        {
            "state_dict": {},
            "hyper_parameters": {"vocab_size": 60, "image_arch": "vit_tiny", "max_text_len": 16},
        },
        old,
    )
    with pytest.raises(ValueError, match=r"flat.ckpt was written before the towers became config sections"):
        load_image_text(old)


def test_cli_zero_shot_test_smoke(clip_run: dict, tmp_path: Path) -> None:
    cli = main(
        cli_args(
            "test",
            f"--model.init_args.ckpt_path={clip_run['ckpt']}",
            f"--data.root={clip_run['classes']}",
            "--data.images.image_size=32",
            config="zeroshot/shapes.yaml",
            root=tmp_path / "run",
        )
    )
    metrics = cli.trainer.callback_metrics
    assert 0.0 <= metrics["test/zero_shot_acc"].item() <= metrics["test/zero_shot_acc_top5"].item() <= 1.0
    # the towers come from the checkpoint's sections, whatever the CLI links into the classifier's arguments
    assert cli.model.pair.text.bert.embeddings.word.num_embeddings == cli.model.tokenizer.vocab_size


# -- linear probes -------------------------------------------------------------------------------------


def test_few_shot_sampling_takes_exactly_k_per_class_and_is_seeded() -> None:
    labels = torch.arange(5).repeat_interleave(torch.tensor([7, 9, 6, 12, 8]))[torch.randperm(42)]
    for k in (1, 5):
        idx = few_shot_indices(labels, k, seed=3)
        assert labels[idx].bincount(minlength=5).tolist() == [k] * 5
        assert torch.equal(idx, few_shot_indices(labels, k, seed=3))
    assert not torch.equal(few_shot_indices(labels, 5, seed=3), few_shot_indices(labels, 5, seed=4))
    a, b, c = split_per_class(labels, (3, 2, 1), seed=0)
    assert len(set(a.tolist()) | set(b.tolist()) | set(c.tolist())) == 5 * 6  # disjoint
    with pytest.raises(ValueError, match="fewer than"):
        few_shot_indices(labels, 7)


def test_linear_probe_on_frozen_image_embeddings_full_and_few_shot(clip_run: dict) -> None:
    model, _, _ = load_image_text(clip_run["ckpt"])
    dm = class_folder_dm(clip_run["classes"])
    encode = image_encoder(model)
    train, val, test = (extract_embeddings(encode, dm.loader(role)) for role in ("train", "val", "test"))
    chance = 1 / dm.num_classes
    results = {k: linear_probe(train, val, test, k=k) for k in (None, 1, 5)}
    print({k: round(r.accuracy, 3) for k, r in results.items()}, f"chance {chance:.3f}")
    assert [r.train_size for r in results.values()] == [10 * 24, 24, 5 * 24]
    for k, r in results.items():
        assert r.accuracy >= 3 * chance, f"k={k}: accuracy {r.accuracy:.3f}, chance 1/24 = {chance:.3f}"
    assert results[None].accuracy >= results[1].accuracy
    assert linear_probe(train, val, test, k=5, seed=0) == results[5]  # deterministic for a seed


def test_linear_probe_on_frozen_speech_embeddings_reads_the_word_count(tmp_path: Path) -> None:
    """The label is how many words an utterance speaks (3 to 6): a frozen, randomly initialised speech tower
    already carries it, since its mean-pooled positions depend on the length."""
    generate_tone_librispeech(tmp_path, n_train_utts=240, n_val_utts=4)
    dm = LibriSpeechDataModule(
        str(tmp_path),
        loader={"num_workers": 0},
        tokenizer={"cache_dir": str(tmp_path / "cache"), "vocab_size": 120},
    )
    dm.setup("fit")
    words = torch.tensor([len(u.transcript.split()) - 3 for u in dm.datasets["train"].utterances])
    torch.manual_seed(0)
    model = SpeechTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=32,
        speech=SpeechTowerConfig("tiny", layers=1, hidden=64, heads=2, conv_channels=8),
        text=TextTowerConfig("tiny", layers=1, hidden=64, heads=2, dropout=0.1, max_len=32),
    )
    x, y = extract_embeddings(speech_encoder(model), dm.train_dataloader(), lambda b: words[b["utt_keys"]])
    assert len(y) == 240
    train, val, test = split_per_class(y, (25, 10, 15), seed=0)
    chance = 1 / 4
    for k in (None, 5):
        r = linear_probe((x[train], y[train]), (x[val], y[val]), (x[test], y[test]), k=k)
        assert r.accuracy >= 1.6 * chance, f"k={k}: accuracy {r.accuracy:.3f}, chance 1/4"


# -- ImageFolder reader --------------------------------------------------------------------------------


def test_imagefolder_names_classes_by_folder_and_skips_corrupt_images(tmp_path: Path) -> None:
    root = generate_shapes_imagefolder(
        tmp_path / "set", colours=("red", "blue"), shapes=("circle",), per_class={"test": 3}, image_size=32
    )
    (root / "test" / "red_circle" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (root / "test" / "red_circle" / "notes.txt").write_text("not an image: ignored")
    dm = class_folder_dm(root, train_split=None, val_split=None)
    assert dm.class_names == ["blue circle", "red circle"]  # sorted folders, underscores as spaces
    batches = [dm.on_before_batch_transfer(b, 0) for b in dm.test_dataloader()]
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and len(dm.dataset("test")) == 7
    assert sum(b["skipped"] for b in batches) == 1 and dm.skipped_images == 1
    assert batches[0]["images"].shape[1:] == (3, 32, 32)
    with pytest.raises(ValueError, match="train_split is not set"):
        dm.train_dataloader()


def test_generated_shape_classes_are_deterministic_and_complete(tmp_path: Path) -> None:
    kwargs = dict(
        colours=("green",), shapes=("star", "cross"), per_class={"train": 2, "test": 1}, image_size=32
    )
    a = generate_shapes_imagefolder(tmp_path / "a", **kwargs)
    b = generate_shapes_imagefolder(tmp_path / "b", **kwargs)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert [str(p) for p in files] == [
        "test/green_cross/00000.jpg",
        "test/green_star/00000.jpg",
        "train/green_cross/00000.jpg",
        "train/green_cross/00001.jpg",
        "train/green_star/00000.jpg",
        "train/green_star/00001.jpg",
    ]
    assert all((a / p).read_bytes() == (b / p).read_bytes() for p in files)
