"""COCO captions DataModule and the synthetic shapes set, on small generated fixtures and the genuine sample."""

from __future__ import annotations

import functools
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from lightning.pytorch import LightningModule
from PIL import Image

import datamodules.image.coco_datamodule as coco
from datamodules.image.coco import CaptionsFileError, load_karpathy_splits, read_rgb
from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.synthetic.shapes import COLOURS, generate_shapes_coco
from tests.builders.files import (
    CMYK,
    CORRUPT,
    GRAY,
    MISSING,
    PALETTE_PNG,
    PNG_AS_JPG,
    READABLE,
    RED,
    TRUNCATED,
    write_fixture,
)
from tests.helpers import REPO, cli_args, data_args, quiet_trainer

REAL = REPO.parent / "shared" / "data" / "real" / "coco"
LOGGER = "datamodules.image.coco_datamodule"


@pytest.fixture
def fixture_root(tmp_path: Path) -> tuple[Path, dict[int, int]]:
    root = tmp_path / "coco"
    return root, write_fixture(root)


@pytest.fixture(scope="module")
def shapes_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", n_train=16, n_val=6, image_size=48
    )


def make_dm(root: Path, tmp_path: Path, **kwargs) -> CocoCaptionsDataModule:
    defaults = {
        "train_split": "val2017",
        "images": {"image_size": 32},
        "loader": {"batch_size": 4, "eval_batch_size": 4, "num_workers": 0},
        "context_length": 16,
        "tokenizer": {"cache_dir": str(tmp_path / "cache")},
    }
    return CocoCaptionsDataModule(str(root), **data_args(defaults, kwargs))


def draws(loader, epochs: int) -> list[dict[int, int]]:
    """image id -> drawn caption id, for each pass over a training loader."""
    out = []
    for _ in range(epochs):
        drawn = {}
        for batch in loader:
            drawn.update(zip(batch["image_ids"].tolist(), batch["caption_ids"].tolist()))
        out.append(drawn)
    return out


# -- synthetic generator --------------------------------------------------------------------------


def test_synthetic_shapes_captions_describe_the_pixels(shapes_root: Path) -> None:
    train = json.loads((shapes_root / "annotations" / "captions_train2017.json").read_text())
    val = json.loads((shapes_root / "annotations" / "captions_val2017.json").read_text())
    assert (len(train["images"]), len(val["images"])) == (16, 6)
    assert not {im["id"] for im in train["images"]} & {im["id"] for im in val["images"]}
    for split, data in (("train2017", train), ("val2017", val)):
        per_image = defaultdict(list)
        for ann in data["annotations"]:
            per_image[ann["image_id"]].append(ann["caption"])
        for im in data["images"]:
            captions = per_image[im["id"]]
            assert len(captions) == 5 and len(set(captions)) == 5
            pixels = np.asarray(Image.open(shapes_root / split / im["file_name"]).convert("RGB")).astype(int)
            for obj in im["objects"]:
                x, y = (round(v) for v in obj["center"])
                assert np.abs(pixels[y, x] - COLOURS[obj["colour"]]).max() < 50, (im["file_name"], obj)
                assert all(obj["colour"] in c and obj["shape"] in c for c in captions), captions


def test_synthetic_shapes_is_deterministic_and_idempotent(shapes_root: Path, tmp_path: Path) -> None:
    stamp = (shapes_root / "annotations" / "captions_train2017.json").stat().st_mtime_ns
    assert generate_shapes_coco(shapes_root, n_train=16, n_val=6, image_size=48) == shapes_root
    assert (shapes_root / "annotations" / "captions_train2017.json").stat().st_mtime_ns == stamp
    # An empty root gets the same bytes; a root holding anything else is refused (tests/data/test_data_safety.py).
    other = tmp_path / "other"
    other.mkdir()
    generate_shapes_coco(other, n_train=16, n_val=6, image_size=48)
    for name in (
        "annotations/captions_train2017.json",
        "train2017/000000000001.jpg",
        "val2017/000000000017.jpg",
    ):
        assert (other / name).read_bytes() == (shapes_root / name).read_bytes()
    assert not list(other.glob(".tmp-*"))
    # Held-out images are fresh draws, not copies of training images.
    assert (shapes_root / "val2017/000000000017.jpg").read_bytes() != (
        shapes_root / "train2017/000000000001.jpg"
    ).read_bytes()


def test_generate_if_missing_writes_the_set_into_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        coco, "generate_shapes_coco", functools.partial(generate_shapes_coco, n_train=8, n_val=4)
    )
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    root = tmp_path / "quick"
    dm = CocoCaptionsDataModule(
        str(root),
        generate_if_missing=True,
        loader={"num_workers": 0},
    )
    assert dm.vocab_size > 20  # usable before setup(): the CLI links it to the model at instantiation
    assert len(list((root / "train2017").glob("*.jpg"))) == 8
    # the vocabulary is cached in the per-user cache folder, not in the data root
    assert any((tmp_path / "xdg" / "mmpretrain").glob("wordpiece-*/tokenizer.json"))
    assert not (root / ".cache").exists()


# -- batches -----------------------------------------------------------------------------------------


def test_batch_shapes_and_dtypes(shapes_root: Path, tmp_path: Path) -> None:
    dm = make_dm(shapes_root, tmp_path, train_split="train2017", loader={"eval_batch_size": 3})
    dm.setup("fit")
    train = next(iter(dm.train_dataloader()))
    assert train["images"].shape == (4, 3, 32, 32) and train["images"].dtype == torch.uint8
    n, length = train["input_ids"].shape
    assert n == 4 and length <= 16
    assert train["input_ids"].dtype == torch.long and train["attention_mask"].dtype == torch.bool
    assert (train["input_ids"][:, 0] == dm.tokenizer.cls_id).all()
    assert (train["input_ids"][~train["attention_mask"]] == dm.pad_id).all()
    assert train["image_ids"].dtype == torch.long and train["caption_ids"].shape == (4,)
    assert train["skipped"] == 0 and "caption_image_ids" not in train
    # raw pixels: the image tower normalises them on the device
    assert train["images"].max() > 1

    val = next(iter(dm.val_dataloader()))
    assert val["images"].shape == (3, 3, 32, 32)
    assert val["input_ids"].shape[0] == val["attention_mask"].shape[0] == val["caption_ids"].shape[0] == 15
    assert torch.equal(val["caption_image_ids"], val["image_ids"].repeat_interleave(5))


def test_tokenizer_is_cached_and_a_given_vocabulary_is_used(shapes_root: Path, tmp_path: Path) -> None:
    first = make_dm(shapes_root, tmp_path, train_split="train2017")
    second = make_dm(shapes_root, tmp_path, train_split="train2017")
    assert second.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    assert len(list((tmp_path / "cache").glob("wordpiece-*"))) == 1
    first.tokenizer.save(tmp_path / "vocab")
    given = make_dm(
        shapes_root,
        tmp_path,
        train_split="train2017",
        tokenizer={"path": str(tmp_path / "vocab" / "vocab.txt")},
    )
    assert given.vocab_size == first.vocab_size
    assert given.tokenizer.source.endswith("vocab.txt")


# -- bad input and caption alignment -------------------------------------------------------------------


def test_read_rgb_converts_every_colour_mode(fixture_root) -> None:
    root, _ = fixture_root
    for image_id in (1, GRAY, CMYK, PNG_AS_JPG, PALETTE_PNG):
        name = f"{image_id:012d}.png" if image_id == PALETTE_PNG else f"{image_id:012d}.jpg"
        pixels = read_rgb(str(root / "val2017" / name))
        assert pixels.shape == (3, 30, 40) and pixels.dtype == torch.uint8
        left = pixels[:, 15, 5].tolist()
        expected = (
            [round(0.299 * RED[0] + 0.587 * RED[1] + 0.114 * RED[2])] * 3 if image_id == GRAY else list(RED)
        )
        assert np.abs(np.array(left) - expected).max() <= 8, (image_id, left)


def test_eval_keeps_every_caption_with_its_image_and_skips_bad_files(fixture_root, tmp_path, caplog) -> None:
    root, owner = fixture_root
    dm = make_dm(root, tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        dm.setup("validate")
        loader = dm.val_dataloader()
        passes = [list(loader) for _ in range(2)]

    assert dm.missing_images == {"val": 1}
    for batches in passes:
        assert sum(b["skipped"] for b in batches) == 2  # corrupt + truncated
        image_ids = torch.cat([b["image_ids"] for b in batches]).tolist()
        assert sorted(image_ids) == READABLE
        caption_ids = torch.cat([b["caption_ids"] for b in batches]).tolist()
        caption_image_ids = torch.cat([b["caption_image_ids"] for b in batches]).tolist()
        assert [owner[c] for c in caption_ids] == caption_image_ids
        assert Counter(caption_image_ids) == {i: 5 + i % 3 for i in READABLE}
        for b in batches:
            assert set(b["caption_image_ids"].tolist()) == set(b["image_ids"].tolist())
            assert b["images"].shape[0] == b["image_ids"].shape[0]
            # The token rows are the captions named by caption_ids, not a neighbour's.
            for ids, image_id in zip(b["input_ids"].tolist(), b["caption_image_ids"].tolist()):
                assert f"photo {image_id} shows" in dm.tokenizer.decode(ids)

    warned = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
    assert len(warned) == 2  # once per file, not once per pass
    assert any(f"{CORRUPT:012d}.jpg" in m for m in warned) and any(
        f"{TRUNCATED:012d}.jpg" in m for m in warned
    )
    assert any(
        f"{MISSING:012d}.jpg" in r.getMessage() and "1 of 15" in r.getMessage() for r in caplog.records
    )
    assert any(
        "1 captions name image ids" in r.getMessage() and "999" in r.getMessage() for r in caplog.records
    )
    assert all(
        "\n" not in c and "  " not in c and c == c.strip() for r in dm.records("val") for c in r.captions
    )


def test_training_draw_varies_by_epoch_and_is_reproducible(fixture_root, tmp_path) -> None:
    root, owner = fixture_root
    dm = make_dm(root, tmp_path, loader={"batch_size": 2})
    epochs = draws(dm.train_dataloader(), 3)
    assert all(owner[c] == i for drawn in epochs for i, c in drawn.items())
    assert epochs[0] != epochs[1] and epochs[1] != epochs[2]
    assert draws(make_dm(root, tmp_path, loader={"batch_size": 2}).train_dataloader(), 3) == epochs
    assert (
        draws(make_dm(root, tmp_path, loader={"batch_size": 2, "seed": 1}).train_dataloader(), 1)[0]
        != epochs[0]
    )
    # Persistent workers keep their own dataset copy; the epoch still reaches them.
    with_worker = make_dm(root, tmp_path, loader={"batch_size": 2, "num_workers": 1})
    assert draws(with_worker.train_dataloader(), 2) == epochs[:2]


def test_trainer_sets_the_draw_epoch_and_counts_skips(fixture_root, tmp_path) -> None:
    root, _ = fixture_root

    class Recorder(LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(()))
            self.drawn: dict[int, dict[int, int]] = defaultdict(dict)

        def training_step(self, batch, batch_idx):
            ids = zip(batch["image_ids"].tolist(), batch["caption_ids"].tolist())
            self.drawn[self.current_epoch].update(ids)
            return self.weight * batch["images"].float().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    # 14 files on disk, batches of 7: no batch is dropped, so both bad files are met every epoch.
    dm = make_dm(root, tmp_path, loader={"batch_size": 7})
    model = Recorder()
    trainer = quiet_trainer(
        max_epochs=2,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
    )
    trainer.fit(model, datamodule=dm)
    assert dm.skipped_images == 4
    assert [model.drawn[e] for e in (0, 1)] == draws(
        make_dm(root, tmp_path, loader={"batch_size": 7}).train_dataloader(), 2
    )


# -- errors and the Karpathy splits --------------------------------------------------------------------


def test_missing_annotations_raise_with_the_expected_layout(tmp_path: Path) -> None:
    dm = CocoCaptionsDataModule(
        str(tmp_path / "nowhere"),
        loader={"num_workers": 0},
    )
    with pytest.raises(
        FileNotFoundError, match=r"captions_train2017\.json.*annotations/captions_<split>\.json"
    ):
        dm.setup("fit")


def test_karpathy_splits_decide_membership(fixture_root, tmp_path) -> None:
    root, owner = fixture_root
    # 2014-style folder and file names, as in dataset_coco.json.
    (root / "val2014").mkdir()
    splits = {1: "train", 2: "restval", 3: "val", 4: "test", 5: "test"}
    images = []
    for image_id, split in splits.items():
        name = f"COCO_val2014_{image_id:012d}.jpg"
        (root / "val2014" / name).write_bytes((root / "val2017" / f"{image_id:012d}.jpg").read_bytes())
        sentences = [
            {"raw": f"photo {image_id} shows thing {k}", "sentid": c}
            for k, c in enumerate(sorted(c for c, i in owner.items() if i == image_id))
        ]
        images.append(
            {
                "filepath": "val2014",
                "filename": name,
                "cocoid": image_id,
                "split": split,
                "sentences": sentences,
            }
        )
    (tmp_path / "dataset_coco.json").write_text(json.dumps({"dataset": "coco", "images": images}))

    dm = make_dm(
        root,
        tmp_path,
        karpathy_json=str(tmp_path / "dataset_coco.json"),
        tokenizer={"cache_dir": str(tmp_path / "k")},
    )
    dm.setup()
    assert [r.image_id for r in dm.datasets["train"].images] == [1, 2]
    assert [r.image_id for r in dm.datasets["val"].images] == [3]
    test = list(dm.test_dataloader())
    assert torch.cat([b["image_ids"] for b in test]).tolist() == [4, 5]
    assert all(
        owner[c] == i
        for b in test
        for c, i in zip(b["caption_ids"].tolist(), b["caption_image_ids"].tolist())
    )


# -- the genuine sample ----------------------------------------------------------------------------------


def test_real_coco_sample_one_eval_epoch(tmp_path: Path) -> None:
    if not REAL.is_dir():
        pytest.skip(f"genuine COCO sample not found at {REAL}")
    annotations = json.loads((REAL / "annotations" / "captions_val2017.json").read_text())
    owner = {a["id"]: a["image_id"] for a in annotations["annotations"]}
    dm = CocoCaptionsDataModule(
        str(REAL),
        train_split="val2017",
        val_split="val2017",
        loader={"batch_size": 8, "eval_batch_size": 8, "num_workers": 0},
        tokenizer={"cache_dir": str(tmp_path / "cache")},
    )
    dm.setup("fit")
    batches = list(dm.val_dataloader())
    image_ids = torch.cat([b["image_ids"] for b in batches])
    caption_ids = torch.cat([b["caption_ids"] for b in batches]).tolist()
    caption_image_ids = torch.cat([b["caption_image_ids"] for b in batches]).tolist()
    assert len(image_ids) == len(set(image_ids.tolist())) == 20
    assert len(caption_ids) == len(set(caption_ids)) == 100
    assert [owner[c] for c in caption_ids] == caption_image_ids
    assert sum(b["skipped"] for b in batches) == 0 and dm.missing_images == {"train": 0, "val": 0}
    assert batches[0]["images"].shape == (8, 3, 224, 224)
    train = next(iter(dm.train_dataloader()))
    assert train["images"].shape == (8, 3, 224, 224) and train["input_ids"].shape[0] == 8
    assert all(owner[c] == i for c, i in zip(train["caption_ids"].tolist(), train["image_ids"].tolist()))


# -- unreadable captions files, as the command line reports them ----------------------------------------------

GOOD_CAPTIONS = {
    "images": [{"id": 1, "file_name": "1.jpg"}],
    "annotations": [{"id": 10, "image_id": 1, "caption": "a red square"}],
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # cut mid-caption, as an interrupted download leaves it
        (
            json.dumps(GOOD_CAPTIONS)[:-10],
            "is not valid JSON: Unterminated string starting at: line 1 column 100 (char 99) (it does not end "
            "with '}': an interrupted download or copy?)",
        ),
        (
            '{"images": [], "annotations": [],}',
            "is not valid JSON: Expecting property name enclosed in double",
        ),
        (
            json.dumps({"annotations": []}),
            "has no 'images' list: a captions file holds 'images' and 'annotations'",
        ),
        (json.dumps({"images": [], "annotations": {}}), "has a non-list 'annotations' list"),
        (json.dumps([GOOD_CAPTIONS]), "the top level is a JSON list, not an object"),
        (
            json.dumps({**GOOD_CAPTIONS, "annotations": [*GOOD_CAPTIONS["annotations"], {"id": 11}]}),
            "annotations[1] lacks the key 'image_id'",
        ),
        (json.dumps({**GOOD_CAPTIONS, "images": [{"id": 1}]}), "images[0] lacks the key 'file_name'"),
    ],
    ids=[
        "truncated",
        "bad-syntax",
        "no-images",
        "annotations-not-a-list",
        "not-an-object",
        "no-image_id",
        "no-file_name",
    ],
)
def test_cli_names_the_captions_file_and_what_is_wrong(
    tmp_path: Path, capsys: pytest.CaptureFixture, text: str, expected: str
) -> None:
    from cli import main

    captions = tmp_path / "coco" / "annotations" / "captions_train2017.json"
    captions.parent.mkdir(parents=True)
    captions.write_text(text)
    args = cli_args(
        "fit",
        f"--data.root={tmp_path / 'coco'}",
        "--data.generate_if_missing=false",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        config="clip/quickstart.yaml",
        root=tmp_path / "run",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1
    assert errors[0].startswith(f"error: {captions}")
    assert expected in errors[0]
    assert captions.read_text() == text  # read, never rewritten


def test_karpathy_file_errors_name_the_file_and_the_image(tmp_path: Path) -> None:
    karpathy = tmp_path / "dataset_coco.json"
    karpathy.write_text(json.dumps({"dataset": "coco"}))
    with pytest.raises(CaptionsFileError, match=r"dataset_coco\.json has no 'images' list"):
        load_karpathy_splits(karpathy, tmp_path)
    image = {"filepath": "val2014", "filename": "a.jpg", "cocoid": 1, "split": "val"}
    karpathy.write_text(json.dumps({"images": [{**image, "sentences": []}, image]}))
    with pytest.raises(CaptionsFileError, match=r"dataset_coco\.json: images\[1\] lacks the key 'sentences'"):
        load_karpathy_splits(karpathy, tmp_path)
