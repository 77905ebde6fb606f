"""Image-text pairs from the user's own files (`ImageTextPairsDataModule`): every manifest format, Parquet with
image bytes inside (built by Hugging Face `datasets`), bad rows, duplicate groups, mixtures, the CLI from one
CSV, and a brief training that learns retrieval."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

import cli
from cli import main
from datamodules.image.coco import load_coco_captions
from datamodules.image.pairs import MissingColumn, read_source
from datamodules.image.pairs_datamodule import ImageTextPairsDataModule, MixtureConfig
from datamodules.sections import ImagesConfig, LoaderConfig, ShardsConfig, TokenizerConfig
from datamodules.synthetic.shapes import generate_shapes_coco
from tests.helpers import cli_args

CONFIG = "clip/pairs.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, list[tuple[str, str]]]:
    """Generated captioned shape images: (absolute path, first caption) per image, by split."""
    root = generate_shapes_coco(tmp_path_factory.mktemp("shapes"), n_train=256, n_val=48, image_size=32)
    pairs = {}
    for split in ("train2017", "val2017"):
        records = load_coco_captions(root / "annotations" / f"captions_{split}.json", root / split)
        pairs[split] = [(r.path, r.captions[0]) for r in records]
    return pairs


def _csv(path: Path, rows: list[tuple[str, str]], sep: str = ",", header=("filepath", "title")) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=sep)
        writer.writerow(header)
        writer.writerows(rows)
    return str(path)


def _dm(tmp_path: Path, **kwargs) -> ImageTextPairsDataModule:
    kwargs.setdefault("images", ImagesConfig(image_size=32, min_scale=1.0))
    return ImageTextPairsDataModule(
        context_length=32,
        loader=LoaderConfig(batch_size=8, num_workers=0),
        tokenizer=TokenizerConfig(vocab_size=120, cache_dir=str(tmp_path / "cache")),
        **kwargs,
    )


def _datasets_parquet(rows: list[tuple[str, str]], out: Path, embed: bool = True) -> str:
    """A Parquet file as Hugging Face `datasets` writes an `Image()` column: {bytes, path} structs, with the
    encoded image inside (`embed`, as the Hub's exports hold it) or only its path."""
    import datasets

    images = [{"bytes": Path(p).read_bytes(), "path": Path(p).name} if embed else p for p, _ in rows]
    ds = datasets.Dataset.from_dict({"image": images, "text": [c for _, c in rows]})
    ds.cast_column("image", datasets.Image()).to_parquet(str(out))
    return str(out)


def test_every_format_reads_the_same_pairs(shapes, tmp_path: Path) -> None:
    rows = shapes["val2017"][:6]
    # relative paths, resolved from the manifest's folder
    images = tmp_path / "images"
    images.mkdir()
    for path, caption in rows:
        shutil.copy(path, images)
        (images / Path(path).with_suffix(".txt").name).write_text(caption, encoding="utf-8")
    relative = [(f"images/{Path(p).name}", c) for p, c in rows]
    sources = {
        "csv": _csv(tmp_path / "pairs.csv", relative),
        "tsv": _csv(tmp_path / "pairs.tsv", relative, sep="\t"),
        "folder": str(images),
        "parquet": _datasets_parquet(rows, tmp_path / "pairs.parquet"),
        "parquet_paths": _datasets_parquet(rows, tmp_path / "paths.parquet", embed=False),
    }
    with (tmp_path / "pairs.jsonl").open("w") as f:
        f.writelines(json.dumps({"filepath": p, "title": c}) + "\n" for p, c in relative)
    sources["jsonl"] = str(tmp_path / "pairs.jsonl")
    expected = [c for _, c in rows]
    reference = read_source(sources["csv"], "auto", "filepath", "title", None, "txt")
    pixels = [reference.read(i) for i in range(6)]
    for fmt, path in sources.items():
        image_key, caption_key = ("image", "text") if fmt.startswith("parquet") else ("filepath", "title")
        table = read_source(path, "auto", image_key, caption_key, None, "txt")
        assert table.captions == expected, fmt
        assert all(torch.equal(table.read(i), pixels[i]) for i in range(6)), fmt
    # the embedded bytes are read, not the path beside them
    assert read_source(sources["parquet"], "auto", "image", "text", None, "txt").image_bytes(0) is not None
    assert read_source(sources["parquet_paths"], "auto", "image", "text", None, "txt").image_bytes(0) is None


def test_parquet_with_embedded_bytes_trains_without_image_files(shapes, tmp_path: Path) -> None:
    """The images are copied, packed into Parquet by `datasets` and deleted: batches still decode, also when the
    Parquet is read through fsspec (memory://, as s3:// or gs:// would be)."""
    import fsspec

    copies = tmp_path / "copies"
    copies.mkdir()
    rows = [(shutil.copy(p, copies), c) for p, c in shapes["train2017"][:16]]
    parquet = _datasets_parquet(rows, tmp_path / "train.parquet")
    shutil.rmtree(copies)
    with fsspec.open("memory://pairs/train.parquet", "wb") as f:
        f.write(Path(parquet).read_bytes())
    for source in (parquet, "memory://pairs/train.parquet"):
        dm = _dm(tmp_path, train=source, columns={"image_key": "image", "caption_key": "text"})
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
        assert batch["images"].shape == (8, 3, 32, 32) and batch["images"].dtype == torch.uint8
        assert batch["skipped"] == 0


def test_bad_rows_are_skipped_named_and_counted(shapes, tmp_path: Path, caplog) -> None:
    (path, caption), (path2, caption2) = shapes["val2017"][:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    manifest = tmp_path / "pairs.csv"
    manifest.write_text(
        "filepath,title\n"
        f"{path},{caption}\n"
        f"{tmp_path / 'gone.jpg'},a missing file\n"  # line 3
        f"{path2},\n"  # line 4: empty caption
        f"{path2}\n"  # line 5: too few fields
        f"{broken},an unreadable image\n"  # line 6: read, fails to decode later
        f"{path2},{caption2}\n",
        encoding="utf-8",
    )
    with caplog.at_level(logging.WARNING):
        table = read_source(str(manifest), "auto", "filepath", "title", None, "txt")
    assert dict(table.skipped) == {"missing image file": 1, "empty caption": 1, "too few fields": 1}
    for line in (3, 4, 5):
        assert f"{manifest}:{line}" in caplog.text
    dm = _dm(tmp_path, train=str(manifest), val=str(manifest))
    dm.setup("validate")
    assert dm.skipped_rows["val"] == 3
    with caplog.at_level(logging.WARNING):
        batch = next(iter(dm.val_dataloader()))
    assert batch["skipped"] == 1 and len(batch["images"]) == 2
    assert f"{manifest}:6" in caplog.text


def test_missing_column_stops_in_one_line(shapes, tmp_path: Path) -> None:
    manifest = _csv(tmp_path / "pairs.csv", shapes["val2017"][:4], header=("image", "title"))
    with pytest.raises(MissingColumn, match=r"pairs\.csv has no column 'filepath'") as err:
        read_source(manifest, "auto", "filepath", "title", None, "txt")
    assert isinstance(err.value, cli.ACTIONABLE)  # the CLI prints one line and exits 2


@pytest.mark.slow
def test_missing_column_ends_the_cli_with_status_2(shapes, tmp_path: Path, capsys) -> None:
    manifest = _csv(tmp_path / "pairs.csv", shapes["val2017"][:4], header=("image", "title"))
    with pytest.raises(SystemExit) as exit_info:
        main(
            cli_args("fit", "--data.train", manifest, "--data.val", "null", config=CONFIG),
            friendly_errors=True,
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "pairs.csv has no column 'filepath'" in err


def test_duplicates_are_one_group_of_positives(shapes, tmp_path: Path) -> None:
    """A copy of an image under another name and a caption repeated up to case and punctuation join their rows'
    groups (transitively); the training batch's image_ids, the loss's groups, say so."""
    (a, cap_a), (b, _), (c, cap_c) = shapes["train2017"][:3]
    copy = tmp_path / "copy_of_a.jpg"
    shutil.copy(a, copy)
    rows = [(a, cap_a), (str(copy), "another caption"), (b, cap_a.upper() + "!"), (c, cap_c)]
    dm = _dm(tmp_path, train=_csv(tmp_path / "pairs.csv", rows))
    dm.loader.batch_size = 4
    dm.setup("fit")
    assert dm.duplicates == {"image": 1, "caption": 1}
    batch = next(iter(dm.train_dataloader()))
    group = {int(cid): int(gid) for cid, gid in zip(batch["caption_ids"], batch["image_ids"])}
    assert group[0] == group[1] == group[2] == 0 and group[3] == 3


def test_mixture_shares_are_counted_and_logged(shapes, tmp_path: Path, caplog) -> None:
    """Two sources of 64 and 48 rows with weights 3 and 1, 400 draws with replacement: the realised shares the
    DataModule counts from the batches are those of the weights times the sizes, 80 % and 20 %."""
    train = shapes["train2017"]
    a = _csv(tmp_path / "a.csv", train[:64])
    b = _csv(tmp_path / "b.csv", train[64:112])
    dm = _dm(tmp_path, train=f"{a}::{b}", mixture=MixtureConfig([3, 1], num_samples=400, replacement=True))
    dm.dedup = False  # the shares alone: no need to read every image for its bytes
    dm.setup("fit")
    loader = dm.train_dataloader()
    assert len(loader) == 50
    with caplog.at_level(logging.INFO):
        for batch in loader:
            dm.on_before_batch_transfer(batch, 0)
    assert sum(dm.source_counts) == 400
    assert abs(dm.shares()[0] - 0.8) < 0.06  # 400 draws: 3 standard deviations of a binomial share
    assert "realised shares over 400 rows" in caplog.text


def test_shards_train_and_evaluate(shapes, tmp_path: Path) -> None:
    """img2dataset-layout shards: streamed for training (`ShardStream`), held whole for validation."""
    from datamodules.image.shards.write import write_shards

    root = Path(shapes["val2017"][0][0]).parents[1]
    records = load_coco_captions(root / "annotations/captions_val2017.json", root / "val2017")[:24]
    write_shards(records, tmp_path / "shards", max_samples_per_shard=10)
    dm = _dm(tmp_path, train=str(tmp_path / "shards"), val=str(tmp_path / "shards"))
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (8, 3, 32, 32)
    val = [b for b in dm.val_dataloader()]
    assert sum(len(b["images"]) for b in val) == 24


def test_shards_read_the_shared_shards_section(shapes, tmp_path: Path) -> None:
    """`data.shards` (ShardsConfig) tells where a shard sample's caption is, for the training stream and for shards
    read whole; its `urls` is refused, as the shards are the sources."""
    import io
    import tarfile

    (tmp_path / "shards").mkdir()
    pairs = shapes["val2017"][:8]
    with tarfile.open(tmp_path / "shards" / "part-0.tar", "w") as tar:  # captions in a `.cap` member
        for k, (image, caption) in enumerate(pairs):
            for ext, data in (("jpg", Path(image).read_bytes()), ("cap", caption.encode())):
                info = tarfile.TarInfo(f"{k:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = str(tmp_path / "shards")
    dm = _dm(tmp_path, train=source, val=source, shards=ShardsConfig(num_samples=8, caption_key="cap"))
    dm.setup("fit")
    assert dm.datasets["train"].caption_key == "cap"
    assert [dm.datasets["val"].caption(i) for i in range(8)] == [caption for _, caption in pairs]
    assert next(iter(dm.train_dataloader()))["images"].shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="leave data.shards.urls unset"):
        _dm(tmp_path, train=source, shards=ShardsConfig(urls=source))


@pytest.mark.slow
def test_cli_trains_validates_and_predicts_from_one_csv(shapes, tmp_path: Path) -> None:
    """The repository's config with the CSVs as overrides: fit, then validate and predict its checkpoint."""
    train = _csv(tmp_path / "train.csv", shapes["train2017"][:32])
    val = _csv(tmp_path / "val.csv", shapes["val2017"][:16])

    def run(command: str, *extra: str):
        return main(
            cli_args(
                command,
                f"--data.train={train}",
                f"--data.val={val}",
                "--data.loader.num_workers=0",
                "--data.loader.batch_size=16",
                f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
                *extra,
                config=CONFIG,
                root=tmp_path / "run",
            )
        )

    cli = run("fit", "--trainer.max_epochs=1")
    assert cli.trainer.global_step == 2
    ckpt = str(next((tmp_path / "run").rglob("*.ckpt")))
    cli = run("validate", f"--ckpt_path={ckpt}")
    assert 0.0 <= float(cli.trainer.callback_metrics["val/R@mean"]) <= 1.0
    writer = tmp_path / "writer.yaml"
    out = tmp_path / "predictions"
    writer.write_text(
        "return_predictions: false\ntrainer:\n  logger: false\n  callbacks:\n"
        "    - class_path: lightning_modules.training.prediction.PredictionWriter\n"
        f"      init_args:\n        output_dir: {out}\n"
    )
    run("predict", "--config", str(writer), f"--data.predict={val}", f"--ckpt_path={ckpt}")
    metadata = json.loads((out / "metadata.json").read_text())
    assert metadata["files"], metadata


def _learn(shapes, tmp_path: Path, n_train: int, steps: int) -> dict[str, float]:
    """Train a tiny CLIP through the CSV source for `steps` steps, one thread; the validation metrics."""
    import lightning as L

    from lightning_modules.components.image_tower import ImageTowerConfig
    from lightning_modules.components.text_tower import TextTowerConfig
    from lightning_modules.contrastive_module import OptimizerConfig
    from lightning_modules.image_text_module import ImageTextModule
    from tests.helpers import quiet_trainer, single_thread

    L.seed_everything(0)
    dm = _dm(
        tmp_path,
        train=_csv(tmp_path / "train.csv", shapes["train2017"][:n_train]),
        val=_csv(tmp_path / "val.csv", shapes["val2017"]),
        dedup=False,
    )
    dm.loader.batch_size = 32
    model = ImageTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=64,
        image=ImageTowerConfig("vit_tiny", image_size=32, patch_size=8, layers=1, width=64, heads=2),
        text=TextTowerConfig(size="tiny", layers=2, hidden=64, heads=2, max_len=32),
        optimizer=OptimizerConfig(lr=3e-3, warmup_steps=0.1),
    )
    with single_thread():  # a tiny model on shared cores: more threads only contend
        quiet = {"enable_checkpointing": False, "default_root_dir": str(tmp_path)}
        quiet_trainer(max_steps=steps, limit_val_batches=0, num_sanity_val_steps=0, **quiet).fit(model, dm)
        return quiet_trainer(**quiet).validate(model, dm, verbose=False)[0]


@pytest.mark.slow
def test_brief_training_on_csv_pairs_learns_retrieval(shapes, tmp_path: Path) -> None:
    """300 steps on 256 generated pairs read from a CSV: retrieval of the 48 validation pairs far above chance.
    By chance R@K is K / 48, so val/R@mean (the mean of R@1, 5 and 10 both ways) is 16 / 144 = 0.11."""
    metrics = _learn(shapes, tmp_path, n_train=256, steps=300)
    chance = (1 + 5 + 10) / 3 / 48
    assert metrics["val/R@mean"] > 3 * chance, metrics
    assert metrics["val/i2t_R@10"] > 2 * 10 / 48 and metrics["val/t2i_R@10"] > 2 * 10 / 48, metrics


def test_short_training_on_csv_pairs_fits_them(shapes, tmp_path: Path) -> None:
    """The learning test's short version: 50 plain optimiser steps on 16 pairs read from a CSV, then image-to-text
    R@1 among those 16 far above chance (1 / 16 = 0.06; measured 0.44 after 40 steps, 0.81 after 60)."""
    from lightning_modules.components.image_tower import ImageTowerConfig
    from lightning_modules.components.text_tower import TextTowerConfig
    from lightning_modules.image_text_module import ImageTextModule
    from tests.helpers import single_thread

    torch.manual_seed(0)
    dm = _dm(tmp_path, train=_csv(tmp_path / "train.csv", shapes["train2017"][:16]), dedup=False)
    dm.loader.batch_size = 16
    dm.setup("fit")
    model = ImageTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=32,
        image=ImageTowerConfig("vit_tiny", image_size=32, patch_size=8, layers=1, width=32, heads=2),
        text=TextTowerConfig(size="tiny", layers=1, hidden=32, heads=2, max_len=32),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = next(iter(dm.train_dataloader()))
    with single_thread():  # a tiny model on shared cores: more threads only contend
        for _ in range(50):
            loss = model.pair.training_loss(batch)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            images = model.encode_image(batch["images"])
            texts = model.encode_text(batch["input_ids"], batch["attention_mask"])
    recall_at_1 = ((images @ texts.T).argmax(1) == torch.arange(16)).float().mean()
    assert recall_at_1 > 4 / 16, recall_at_1  # four times chance


def test_mixture_loader_resumes_mid_epoch_with_the_same_rows(shapes, tmp_path: Path) -> None:
    """The DataModule's training loader over a two-source mixture, stopped after 3 batches and resumed from its
    checkpointed state in a fresh DataModule, gives the rows an unbroken epoch gives (by caption id)."""
    train = shapes["train2017"]
    spec = f"{_csv(tmp_path / 'a.csv', train[:24])}::{_csv(tmp_path / 'b.csv', train[24:40])}"

    def loader():
        dm = _dm(tmp_path, train=spec, mixture=MixtureConfig([1, 2], replacement=True), dedup=False)
        dm.setup("fit")
        return dm.train_dataloader()

    unbroken = [int(i) for b in loader() for i in b["caption_ids"]]
    first = loader()
    it = iter(first)
    taken = [int(i) for _, b in zip(range(3), it) for i in b["caption_ids"]]
    state = first.state_dict()
    del it
    second = loader()
    second.load_state_dict(state)
    rest = [int(i) for b in second for i in b["caption_ids"]]
    assert state["consumed"] == 24 and taken + rest == unbroken and len(unbroken) == 56
