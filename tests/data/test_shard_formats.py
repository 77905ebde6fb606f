"""Shards as people have them: gzip-compressed tars, captions under another member or a json field, sets without
captions and files that are not tars (one `error:` line before the run), samples without a caption (a skip)."""

from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
import torch
import webdataset as wds

from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.image.shards.listing import expand_shards
from datamodules.image.shards.members import iter_tar_samples, read_shard
from datamodules.image.shards.remote import ShardUnreadable
from datamodules.image.shards.stream import ShardStream
from datamodules.image.shards.write import coco_to_shards
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.builders.files import LOGGER, TRANSFORM, captioned, png, write_tar
from tests.builders.runs import CLIP, fails
from tests.helpers import cli_args, quiet_trainer


def classification_shard(path: Path, n: int = 6) -> Path:
    """WebDataset's own sample layout for classification (png + cls, no caption), written by its ShardWriter."""
    with wds.ShardWriter(str(path.parent / path.name.replace("000000", "%06d")), maxcount=100) as sink:
        for k in range(n):
            sink.write({"__key__": f"{k:06d}", "png": png(k), "cls": str(k % 3).encode()})
    return path


def captions_of(shards: list[str], **kwargs) -> list[str]:
    items = list(ShardStream(shards, TRANSFORM, shuffle_buffer=1, **kwargs))
    return sorted(item["captions"][0] for item in items if item is not None)


# -- compressed shards ------------------------------------------------------------------------------------
@pytest.mark.parametrize("suffix", [".tar.gz", ".tgz"])
def test_gzip_shards_read_as_the_plain_ones(suffix: str, tmp_path: Path) -> None:
    samples = captioned(5)
    (tmp_path / "plain").mkdir()
    (tmp_path / "gz").mkdir()
    plain = write_tar(tmp_path / "plain" / "s-000000.tar", samples)
    packed = write_tar(tmp_path / "gz" / f"s-000000{suffix}", samples, "w:gz")
    assert packed.read_bytes()[:2] == b"\x1f\x8b"
    # skipping into the shard and a limit work as on a plain tar
    for skip, limit in ((0, None), (2, 2), (4, None)):
        got = list(iter_tar_samples(str(packed), skip, limit))
        want = list(iter_tar_samples(str(plain), skip, limit))
        assert [{k: v for k, v in s.items() if k != "__url__"} for s in got] == [
            {k: v for k, v in s.items() if k != "__url__"} for s in want
        ]
    assert expand_shards(str(tmp_path / "gz")) == [str(packed)]  # a folder lists compressed shards too
    assert captions_of([str(packed)]) == [f"photo {k}" for k in range(5)]
    # the same shard through a command, read as a stream
    assert captions_of([f"pipe:cat {packed}"], num_samples=5) == [f"photo {k}" for k in range(5)]


@pytest.mark.parametrize("remote", [False, True])
def test_gzip_shard_cut_short_is_an_error(remote: bool, tmp_path: Path) -> None:
    whole = write_tar(tmp_path / "whole.tar.gz", captioned(6), "w:gz").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(whole[: len(whole) * 2 // 3])
    url = f"pipe:cat {cut}" if remote else str(cut)
    with pytest.raises(ShardUnreadable, match="cut.tar.gz"):
        list(read_shard(url, retries=0))


def test_gzip_shards_train(tmp_path: Path) -> None:
    shapes = generate_shapes_coco(tmp_path / "coco", n_train=8, n_val=2, image_size=32)
    out = tmp_path / "shards"
    coco_to_shards(shapes, "train2017", out, max_samples_per_shard=4)
    for plain in sorted(out.glob("*.tar")):  # the converter's own output, compressed as other tools ship it
        (out / f"{plain.name}.gz").write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    (out / "sizes.json").write_text(json.dumps({f"coco-{k:06d}.tar.gz": 4 for k in range(2)}))
    dm = CocoCaptionsDataModule(root=str(shapes), context_length=16, images={"image_size": 16, "min_scale": 1.0}, loader={"batch_size": 4, "num_workers": 0}, tokenizer={"vocab_size": 60, "cache_dir": str(tmp_path / "cache")}, shards={"urls": str(out / "coco-{000000..000001}.tar.gz")},)  # fmt: skip
    module = ImageTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2),
        text=TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16),
    )
    trainer = quiet_trainer(fast_dev_run=2)
    trainer.fit(module, dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])
    assert dm.skipped_images == 0


# -- where the caption is ------------------------------------------------------------------------------------
def test_caption_key_names_a_member_or_a_json_field(tmp_path: Path) -> None:
    as_member = [{"__key__": f"{k}", "png": png(k), "caption": f"a {k}".encode()} for k in range(3)]
    as_field = [
        {"__key__": f"{k}", "png": png(k), "json": json.dumps({"caption": f"b {k}", "label": 1}).encode()}
        for k in range(3)
    ]
    member = str(write_tar(tmp_path / "m-000000.tar", as_member))
    field = str(write_tar(tmp_path / "f-000000.tar", as_field))
    assert captions_of([member], caption_key="caption") == ["a 0", "a 1", "a 2"]
    assert captions_of([field], caption_key="json:caption") == ["b 0", "b 1", "b 2"]
    with pytest.raises(ValueError, match="caption_key='json:'"):
        captions_of([field], caption_key="json:")


def test_sample_without_a_caption_is_a_logged_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    samples = captioned(4)
    samples[2] = {"__key__": samples[2]["__key__"], "png": png(2), "cls": b"1"}
    shard = str(write_tar(tmp_path / "s-000000.tar", samples))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = list(ShardStream([shard], TRANSFORM, shuffle_buffer=1))
    assert sum(item is None for item in items) == 1  # CaptionCollate drops and counts it
    assert sorted(i["captions"][0] for i in items if i is not None) == ["photo 0", "photo 1", "photo 3"]
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skips) == 1 and "unreadable image" not in skips[0], skips
    assert (
        f"sample {shard}:000002" in skips[0]
        and "no caption for caption_key='txt' (it holds cls, png)" in skips[0]
    )


# -- before the run: one line, exit status 2 ------------------------------------------------------------------
def _fit_args(tmp_path: Path, root: Path, shards: Path, *extra: str) -> list[str]:
    return cli_args(
        "fit",
        f"--data.init_args.root={root}",
        "--data.init_args.generate_if_missing=false",
        f"--data.init_args.shards.urls={shards}",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.shards.retries=0",
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.loader.batch_size=2",
        "--trainer.max_steps=2",  # a run that got past the checks ends soon
        "--trainer.limit_val_batches=0",
        *extra,
        config=CLIP,
        root=tmp_path / "run",
    )


@pytest.fixture(scope="module")
def annotated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(tmp_path_factory.mktemp("shapes") / "coco", n_train=4, n_val=2, image_size=32)


# annotated: the stream finds it in setup; without annotations, training the vocabulary on the shards does
@pytest.mark.parametrize("vocabulary", ["annotations", "shards"])
def test_shards_without_captions_are_one_line(
    vocabulary: str, annotated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    (tmp_path / "shards").mkdir()
    shard = classification_shard(tmp_path / "shards" / "cls-000000.tar")
    root = annotated if vocabulary == "annotations" else tmp_path / "empty"
    root.mkdir(exist_ok=True)
    error = fails(_fit_args(tmp_path, root, shard.parent), capsys)
    assert error == (
        f"error: {shard}: no caption in its first samples for data.shards.caption_key='txt' (sample 000000 holds cls, "
        "png): set data.shards.caption_key to the member holding the caption (txt, ...) or json:FIELD for a field of "
        "the json member"
    )


@pytest.mark.parametrize("vocabulary", ["annotations", "shards"])
def test_shard_that_is_not_a_tar_is_one_line(
    vocabulary: str, annotated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "bad-000000.tar").write_bytes(b"<html>403 Forbidden</html>\n" * 40)
    root = annotated if vocabulary == "annotations" else tmp_path / "empty"
    root.mkdir(exist_ok=True)
    error = fails(_fit_args(tmp_path, root, shards), capsys)
    # counted (annotations: no sizes file) or read for its captions (no annotations): the file and what it is
    bad = shards / "bad-000000.tar"
    assert error.startswith(f"error: {bad}: cannot count its samples: ") or error.startswith(
        f"error: none of the 1 shards can be read; the first: {bad}: "
    ), error
    assert error.endswith(
        "ReadError: not a tar file, plain or compressed (it starts with b'<html>403 Forbidden</htm')"
    )
