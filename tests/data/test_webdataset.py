"""WebDataset tar shards: COCO conversion, the streaming split over ranks and workers, the DataModule mode."""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from cli import main as cli_main
from datamodules.image.coco import CocoCaptionsDataset, eval_transform, load_coco_captions
from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.image.shards.listing import expand_shards, shard_sizes
from datamodules.image.shards.members import iter_tar_samples
from datamodules.image.shards.stream import ShardLoader, ShardStream
from datamodules.image.shards.write import coco_to_shards, main
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.builders.files import CORRUPT, MISSING, PALETTE_PNG, PNG_AS_JPG, READABLE, TRUNCATED, write_fixture
from tests.helpers import CONFIGS, REPO, data_args, quiet_trainer

REAL = REPO.parent / "shared" / "data" / "real" / "coco"
LOGGER = "datamodules.image.shards"
N_TRAIN = 24


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", n_train=N_TRAIN, n_val=6, image_size=32
    )


@pytest.fixture(scope="module")
def shards(shapes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 24 training images in shards of 5: four of 5 and one of 4."""
    out = tmp_path_factory.mktemp("shards")
    coco_to_shards(shapes, "train2017", out, max_samples_per_shard=5)
    return out


def read_all(out: Path) -> dict[int, dict]:
    samples = {}
    for path in expand_shards(str(out)):
        for sample in iter_tar_samples(path):
            meta = json.loads(sample["json"])
            assert meta["image_id"] not in samples
            samples[meta["image_id"]] = {**sample, "meta": meta}
    return samples


def stream(out: Path, **kwargs) -> ShardStream:
    return ShardStream(expand_shards(str(out)), eval_transform(16), **kwargs)


def epoch_ids(
    out: Path, rank: int, world: int, workers: int, batch_size: int, epoch: int, **kwargs
) -> list[list[int]]:
    """Image ids of each batch one rank's loader gives in `epoch`."""
    data = stream(out, batch_size=batch_size, num_workers=workers, rank=rank, world_size=world, **kwargs)
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=batch_size, drop_last=True, num_workers=workers, collate_fn=list)
    assert len(loader) == len(data) // batch_size
    return [[item["image_id"] for item in batch] for batch in loader]


# -- converter -----------------------------------------------------------------------------------------


def test_converter_round_trip_keeps_every_image_caption_and_byte(
    shapes: Path, shards: Path, tmp_path: Path
) -> None:
    records = {
        r.image_id: r
        for r in load_coco_captions(shapes / "annotations" / "captions_train2017.json", shapes / "train2017")
    }
    paths = expand_shards(str(shards))
    assert [Path(p).name for p in paths] == [f"coco-{i:06d}.tar" for i in range(5)]
    assert expand_shards(str(shards / "coco-{000000..000004}.tar")) == paths
    assert expand_shards(str(shards / "coco-*.tar")) == paths

    samples = read_all(shards)
    assert sorted(samples) == sorted(records)  # every image once, across shards
    for image_id, sample in samples.items():
        record = records[image_id]
        assert sample["__key__"] == f"{image_id:012d}"
        assert set(sample) == {"__key__", "__url__", "jpg", "txt", "json", "meta"}
        assert sample["jpg"] == Path(record.path).read_bytes()  # original bytes, not re-encoded
        assert sample["meta"]["captions"] == list(record.captions) and len(record.captions) == 5
        assert sample["meta"]["caption_ids"] == list(record.caption_ids)
        assert sample["meta"]["file_name"] == Path(record.path).name
        assert sample["txt"].decode() == record.captions[0]

    info = json.loads((shards / "_info.json").read_text())
    assert [s["num_samples"] for s in info["shards"]] == [5, 5, 5, 5, 4] == shard_sizes(paths)
    assert info["num_samples"] == N_TRAIN and info["num_captions"] == 5 * N_TRAIN
    assert json.loads((shards / "sizes.json").read_text())["coco-000004.tar"] == 4
    # Shuffled before writing, seeded: not in id order, and the same order every time.
    order = [json.loads(s["json"])["image_id"] for p in paths for s in iter_tar_samples(p)]
    assert order != sorted(order)
    again = coco_to_shards(shapes, "train2017", tmp_path / "again", max_samples_per_shard=5)
    assert [
        json.loads(s["json"])["image_id"]
        for p in expand_shards(str(tmp_path / "again"))
        for s in iter_tar_samples(p)
    ] == order
    assert again["shards"] == info["shards"]
    with pytest.raises(FileExistsError):
        coco_to_shards(shapes, "train2017", shards)


def test_converter_counts_without_a_manifest_and_is_read_by_webdataset(shards: Path, tmp_path: Path) -> None:
    copy = tmp_path / "bare"
    copy.mkdir()
    for path in expand_shards(str(shards)):
        shutil.copy(path, copy)
    assert shard_sizes(expand_shards(str(copy))) == [5, 5, 5, 5, 4]  # counted from the tar headers
    wds = pytest.importorskip("webdataset")
    keys = [s["__key__"] for s in wds.WebDataset(expand_shards(str(shards)), shardshuffle=False)]
    assert sorted(keys) == sorted(f"{i:012d}" for i in read_all(shards))


def test_shards_also_end_at_a_size_limit(shapes: Path, tmp_path: Path) -> None:
    limit = 4000  # bytes of member data (images, captions, json), tar headers not counted
    info = coco_to_shards(shapes, "train2017", tmp_path, max_samples_per_shard=100, max_shard_bytes=limit)
    sizes = [
        [sum(len(v) for k, v in sample.items() if not k.startswith("__")) for sample in iter_tar_samples(p)]
        for p in expand_shards(str(tmp_path))
    ]
    assert [len(s) for s in sizes] == [s["num_samples"] for s in info["shards"]] and sum(
        map(len, sizes)
    ) == N_TRAIN
    assert len(sizes) > 2 and all(sum(s) <= limit for s in sizes)
    assert all(sum(s) + nxt[0] > limit for s, nxt in zip(sizes, sizes[1:]))  # no shard ends early


def test_corrupt_and_missing_images_are_skipped_counted_and_named(tmp_path: Path, caplog) -> None:
    root = tmp_path / "coco"
    write_fixture(root)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        info = main(
            ["--root", str(root), "--split", "val2017", "--out", str(tmp_path / "out"), "--shard-size", "4"]
        )
    assert info["skipped"] == {"missing": 1, "unreadable": 2}
    samples = read_all(tmp_path / "out")
    assert sorted(samples) == READABLE and info["num_samples"] == len(READABLE)
    assert [s["num_samples"] for s in info["shards"]] == [4, 4, 4]
    # A PNG named .jpg keeps its bytes under its true extension.
    png = (root / "val2017" / f"{PNG_AS_JPG:012d}.jpg").read_bytes()
    assert samples[PNG_AS_JPG]["png"] == png and "jpg" not in samples[PNG_AS_JPG]
    assert samples[PALETTE_PNG]["png"] == (root / "val2017" / f"{PALETTE_PNG:012d}.png").read_bytes()
    warned = " ".join(r.getMessage() for r in caplog.records)
    for image_id in (CORRUPT, TRUNCATED, MISSING):
        assert f"{image_id:012d}.jpg" in warned


# -- streaming -------------------------------------------------------------------------------------------


def test_two_ranks_of_two_workers_see_every_sample_once_per_epoch(shards: Path) -> None:
    # 5 shards (5, 5, 5, 5, 4) for 4 worker runs of 6 samples: runs start and stop inside shards.
    for epoch in (0, 1):
        ranks = [epoch_ids(shards, rank, 2, 2, batch_size=2, epoch=epoch) for rank in range(2)]
        assert len(ranks[0]) == len(ranks[1]) == 6  # the same number of steps on every rank
        seen = [i for batches in ranks for batch in batches for i in batch]
        assert sorted(seen) == sorted(read_all(shards))  # all 24, none twice
    # Batches of 4: 3 steps per rank, dealt 2 and 1 to its workers; all 24 seen, none twice.
    ranks = [epoch_ids(shards, rank, 2, 2, batch_size=4, epoch=0) for rank in range(2)]
    seen = [i for batches in ranks for batch in batches for i in batch]
    assert len(ranks[0]) == len(ranks[1]) == 3 and len(seen) == len(set(seen)) == 24


def test_shard_order_is_drawn_from_seed_and_epoch(shards: Path) -> None:
    data = stream(shards)
    orders = [data.shard_order(epoch) for epoch in range(4)]
    assert len({tuple(o) for o in orders}) > 1 and sorted(orders[0]) == list(range(5))
    assert [stream(shards).shard_order(e) for e in range(4)] == orders  # what every rank computes
    assert [stream(shards, seed=1).shard_order(e) for e in range(4)] != orders
    # The samples themselves: the same for a seed and epoch, another order in another epoch.
    first = epoch_ids(shards, 0, 1, 1, batch_size=2, epoch=0)
    assert epoch_ids(shards, 0, 1, 1, batch_size=2, epoch=0) == first
    assert epoch_ids(shards, 0, 1, 1, batch_size=2, epoch=1) != first


def test_resumed_stream_continues_with_the_next_unseen_batch(shards: Path) -> None:
    def loader() -> ShardLoader:
        data = stream(shards, batch_size=2, num_workers=2)
        return ShardLoader(data, batch_size=2, num_workers=2, collate_fn=list)

    def ids(batches) -> list[list[int]]:
        return [[item["image_id"] for item in batch] for batch in batches]

    unbroken = loader()
    next(iter(unbroken))  # epoch 0
    full = ids(iter(unbroken))  # epoch 1
    interrupted = loader()
    list(iter(interrupted))
    it = iter(interrupted)
    taken = [next(it) for _ in range(5)]
    state = interrupted.state_dict()
    assert state == {"epoch": 1, "batches": 5, "world_size": 1, "num_workers": 2}
    resumed = loader()
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state
    rest = list(iter(resumed))
    assert ids(taken) + ids(rest) == full
    assert resumed.state_dict()["batches"] == len(full) == 12
    assert ids(iter(resumed)) != full  # the next epoch starts at its beginning


def test_shards_of_another_tool_stream_with_txt_captions(shapes: Path, tmp_path: Path) -> None:
    # img2dataset-like: no manifest, no .json with captions, keys that are not ids.
    images = sorted((shapes / "train2017").iterdir())[:4]
    with tarfile.open(tmp_path / "web-0.tar", "w") as tar:
        for k, path in enumerate(images):
            for ext, data in (("jpg", path.read_bytes()), ("txt", f"  photo\n{k} ".encode())):
                info = tarfile.TarInfo(f"shard/img{k}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = stream(tmp_path, batch_size=2)
    assert data.sizes == [4] and len(data) == 4
    items = list(data)
    assert sorted(item["captions"][0] for item in items) == [f"photo {k}" for k in range(4)]
    assert len({item["image_id"] for item in items}) == 4 and all(item["image_id"] >= 0 for item in items)


# -- DataModule ------------------------------------------------------------------------------------------


def make_dm(root: Path, tmp_path: Path, **kwargs) -> CocoCaptionsDataModule:
    defaults = {
        "images": {"image_size": 16},
        "loader": {"batch_size": 4, "eval_batch_size": 6, "num_workers": 0},
        "context_length": 16,
        "tokenizer": {"vocab_size": 100, "cache_dir": str(tmp_path / "cache")},
    }
    return CocoCaptionsDataModule(str(root), **data_args(defaults, kwargs))


def test_shard_batches_match_folder_batches(shapes: Path, shards: Path, tmp_path: Path) -> None:
    folder = make_dm(shapes, tmp_path)
    sharded = make_dm(shapes, tmp_path, shards={"urls": str(shards / "coco-{000000..000004}.tar")})
    assert sharded.tokenizer.fingerprint() == folder.tokenizer.fingerprint()  # trained on the annotations
    a, b = next(iter(folder.train_dataloader())), next(iter(sharded.train_dataloader()))
    assert set(a) == set(b)
    for key, value in a.items():
        if isinstance(value, torch.Tensor):
            assert b[key].dtype == value.dtype and b[key].shape[0] == value.shape[0]
            assert b[key].shape[1:] == value.shape[1:] or key in ("input_ids", "attention_mask")
    assert b["images"].shape == (4, 3, 16, 16) and b["skipped"] == 0
    # The same caption drawn for an image in the same epoch, from folder or shards.
    drawn = {}
    for loader in (folder.train_dataloader(), sharded.train_dataloader()):
        batches = list(loader)
        drawn[len(drawn)] = {
            i: c
            for batch in batches
            for i, c in zip(batch["image_ids"].tolist(), batch["caption_ids"].tolist())
        }
    assert len(drawn[1]) == N_TRAIN and all(drawn[1][i] == c for i, c in drawn[0].items())
    assert isinstance(sharded.datasets["train"], ShardStream)
    assert isinstance(sharded.val_dataloader().dataset, CocoCaptionsDataset)  # evaluation stays on the folder


def test_tokenizer_trains_on_shard_captions_without_annotations(shards: Path, tmp_path: Path) -> None:
    dm = make_dm(tmp_path / "empty", tmp_path, shards={"urls": str(shards)})
    assert "circle" in dm.tokenizer.decode(dm.tokenizer(["a red circle"], 16)["input_ids"][0].tolist())


def test_fit_from_shards_smoke(shapes: Path, shards: Path, tmp_path: Path) -> None:
    dm = make_dm(shapes, tmp_path, shards={"urls": str(shards)}, loader={"num_workers": 1})
    module = ImageTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2),
        text=TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16),
    )
    trainer = quiet_trainer(
        fast_dev_run=2,
    )
    trainer.fit(module, dm)
    assert trainer.global_step == 2 and torch.isfinite(trainer.callback_metrics["train/loss"])


class Recorder(L.LightningModule):
    """Records (epoch, image ids, caption ids) of every training batch; learns nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(()))
        self.seen: list[tuple[int, list[int], list[int]]] = []

    def training_step(self, batch, batch_idx):
        self.seen.append((self.current_epoch, batch["image_ids"].tolist(), batch["caption_ids"].tolist()))
        return self.weight * batch["images"].float().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


class StopAfter(L.Callback):
    """Ends fit after `n` steps, as an interruption would."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


@pytest.mark.parametrize("source", ["folder", "shards"])
def test_fit_resumed_mid_epoch_sees_the_batches_an_unbroken_run_sees(
    source: str, shapes: Path, shards: Path, tmp_path: Path
) -> None:
    def fit(run: str, stop: int | None = None, resume: str | None = None) -> list:
        extra = {"shards": {"urls": str(shards)}, "loader": {"num_workers": 2}} if source == "shards" else {}
        dm = make_dm(shapes, tmp_path, **extra)
        model = Recorder()
        trainer = quiet_trainer(
            max_epochs=2,
            limit_val_batches=0,
            callbacks=[
                L.pytorch.callbacks.ModelCheckpoint(
                    dirpath=tmp_path / run, save_last=True, every_n_train_steps=1
                ),
                *([StopAfter(stop)] if stop else []),
            ],
        )
        trainer.fit(model, datamodule=dm, ckpt_path=resume)
        return model.seen

    straight = fit("a")
    assert [e for e, _, _ in straight] == [0] * 6 + [1] * 6  # 24 images, batches of 4
    assert fit("b", stop=9) == straight[:9]  # stops after the 3rd batch of epoch 1
    assert fit("b", resume=str(tmp_path / "b" / "last.ckpt")) == straight[9:]


def test_real_coco_sample_converts_and_reads_back(tmp_path: Path) -> None:
    if not REAL.is_dir():
        pytest.skip(f"genuine COCO sample not found at {REAL}")
    info = coco_to_shards(REAL, "val2017", tmp_path / "shards", max_samples_per_shard=8)
    assert (
        info["num_samples"] == 20
        and info["num_captions"] == 100
        and info["skipped"] == {"missing": 0, "unreadable": 0}
    )
    samples = read_all(tmp_path / "shards")
    records = load_coco_captions(REAL / "annotations" / "captions_val2017.json", REAL / "val2017")
    assert sorted(samples) == sorted(r.image_id for r in records)  # each image once
    for record in records:
        assert samples[record.image_id]["jpg"] == Path(record.path).read_bytes()
        assert samples[record.image_id]["meta"]["captions"] == list(record.captions)
    data = ShardStream(expand_shards(str(tmp_path / "shards")), eval_transform(32), batch_size=4)
    items = list(data)
    assert len(items) == 20 and all(item["image"].shape == (3, 32, 32) for item in items)


def test_shards_config_parses_smoke(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["fit", "--config", str(CONFIGS / "clip/coco_shards_vit_b16.yaml"), "--print_config"])
    assert exit_info.value.code in (None, 0)
    assert "shards:\n      urls: /data/coco_shards/train\n" in capsys.readouterr().out
