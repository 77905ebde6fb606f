"""Image batches under FSDP2, compressed or malformed shards, a failing rank-0 save step, the image tower's pixel
statistics under dtype conversion and on resume."""

from __future__ import annotations

import copy
import logging
import struct
import tarfile
import zlib
from pathlib import Path

import pytest
import torch
import torchvision
from torch.utils.data import DataLoader

from datamodules.image.shards.listing import shard_sizes
from datamodules.image.shards.members import first_readable, shard_captions
from datamodules.image.shards.remote import ShardUnreadable
from datamodules.image.shards.stream import ShardStream
from lightning_modules.components.image_tower import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    ImageTower,
    ImageTowerConfig,
)
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.training import strategies
from lightning_modules.training.strategies import FSDP2Strategy, apply_fsdp2
from lightning_modules.trimodal_module import TriModalModule
from tests.builders.alignment import BF16_TOL, IMAGE, SPEECH, SYSTEMS, TEXT, VOCAB, image_text_batches
from tests.builders.files import LOGGER, TRANSFORM, captioned, write_tar
from tests.helpers import quiet_trainer, world_of_one


def _uint8_images(batch: dict, g: torch.Generator) -> dict:
    """`batch` with its images as the DataModules send them: uint8 pixels."""
    shape = batch["images"].shape
    return {**batch, "images": torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("system", ["image_text", "trimodal"])
def test_fsdp2_bf16_step_takes_uint8_images_under_32_true(system: str, tmp_path: Path) -> None:
    """FSDP2 casts floating-point inputs only: uint8 images reach the tower as they are, and the tower's
    normalised pixels must meet its stem in the gathered weights' dtype (bf16), giving the unsharded float32
    system's loss."""
    module, train, _ = SYSTEMS[system]()
    g = torch.Generator().manual_seed(3)
    if system == "trimodal":
        train = {**train, "image_text": _uint8_images(train["image_text"], g)}
    else:
        train = _uint8_images(train, g)
    plain = copy.deepcopy(module)
    module.log = plain.log = lambda *args, **kwargs: None
    with world_of_one(tmp_path) as mesh:
        apply_fsdp2(module, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        loss = module.training_step(train, 0)
        loss.backward()
        torch.testing.assert_close(loss.float(), plain.training_step(train, 0), **BF16_TOL)


# -- a gzip shard whose deflate data is corrupt ---------------------------------------------------------------
def corrupt_gzip_shard(path: Path, n: int, sample: int) -> Path:
    """A gzip-compressed shard of `n` captioned samples whose deflate stream turns invalid in the middle of the
    caption of sample `sample`, a long one (64 KiB, past gzip's read-ahead, so the member's read meets it): a
    block header of the reserved type 3 there (zlib: "invalid block type"), whatever the zlib build (the data
    before it is flushed to a byte boundary)."""
    samples = captioned(n)
    samples[sample]["txt"] = b"photo " * 11000
    plain = write_tar(path.with_suffix(".plain"), samples)
    with tarfile.open(plain) as tar:
        member = tar.getmember(f"{sample:06d}.txt")
        cut = member.offset_data + member.size // 2
    data = plain.read_bytes()
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    body = deflate.compress(data[:cut]) + deflate.flush(zlib.Z_FULL_FLUSH) + b"\x06\xff\xff"
    body += deflate.compress(data[cut:]) + deflate.flush()
    trailer = struct.pack("<II", zlib.crc32(data), len(data) & 0xFFFFFFFF)
    path.write_bytes(b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + body + trailer)
    return path


def test_corrupt_gzip_shard_is_a_logged_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Corrupt deflate data in the middle of a shard (zlib.error) ends that shard, named in the log and counted,
    not the run: the other shard's samples come, the run is made up to its length."""
    good = str(write_tar(tmp_path / "good-000000.tar.gz", captioned(4), "w:gz"))
    bad = str(corrupt_gzip_shard(tmp_path / "bad-000001.tar.gz", 8, sample=5))
    stream = ShardStream([good, bad], TRANSFORM, shuffle_buffer=1, sizes=[4, 8], retries=1, retry_delay=0)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = list(stream)
    assert len(items) == 12 and stream.skipped_shards == 1
    given = [item["captions"][0] for item in items if item is not None]
    # the good shard's 4 and the bad one's first 5 (photo 0-4; its sample 5 holds the corrupt data)
    assert sorted(given) == sorted([f"photo {k}" for k in range(4)] * 2 + ["photo 4"])
    skips = [r.getMessage() for r in caplog.records if r.getMessage().startswith("skipping shard")]
    assert len(skips) == 1 and skips[0].startswith(f"skipping shard {bad}: error: Error -3"), skips
    assert "(2 tries" in skips[0]


def test_corrupt_gzip_shard_alone_is_one_line(tmp_path: Path) -> None:
    """The only shard, corrupt: counting its samples, and its first sample when the corruption is at the start,
    end in one line that names it."""
    middle = str(corrupt_gzip_shard(tmp_path / "mid-000000.tar.gz", 8, sample=5))
    with pytest.raises(ShardUnreadable) as caught:
        shard_sizes([middle])
    assert str(caught.value).startswith(
        f"{middle}: cannot count its samples: error: Error -3 while decompressing"
    )
    start = str(corrupt_gzip_shard(tmp_path / "start-000000.tar.gz", 4, sample=0))
    with pytest.raises(ShardUnreadable) as caught:
        first_readable([start], caption_key="txt")
    message = str(caught.value)
    assert (
        message.startswith(f"none of the 1 shards can be read; the first: {start}: ") and "\n" not in message
    )


# -- a file system step of rank 0 failing while saving a sharded checkpoint -----------------------------------------
class TwoRanks(FSDP2Strategy):
    """One of two ranks, without a process group: rank 0's collectives record what it sends; rank 1's give back
    what rank 0 sent, in order (what a broadcast and an all-reduce of a decision give it)."""

    def __init__(self, rank: int, sent: list) -> None:
        super().__init__()
        self.parallel_devices = [torch.device("cpu")]
        self.rank, self.sent, self.calls = rank, sent, 0

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def _collective(self, value: object) -> object:
        if self.rank == 0:
            self.sent.append(value)
        else:
            value = self.sent[self.calls]
        self.calls += 1
        return value

    def broadcast(self, obj: object, src: int = 0) -> object:
        return self._collective(obj)

    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return self._collective(decision)

    def barrier(self, name: str | None = None) -> None:
        self._collective(None)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled, unavailable or uninitialized")
@pytest.mark.parametrize("step", ["mkdir", "clean", "swap"])
def test_rank_zero_save_step_failing_raises_on_every_rank(
    step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0 alone makes the folder, cleans killed writes' leftovers and swaps the new checkpoint in: when one
    raises (no permission, no space, rmtree failing on NFS), rank 0 still reaches the collective the others wait
    in, and every rank raises the same one line naming the checkpoint."""
    target = tmp_path / "run" / "last.ckpt"
    broken = {
        "mkdir": (Path, "mkdir", PermissionError(13, "Permission denied", str(target.parent))),
        "clean": (
            strategies,
            "clean_interrupted_saves",
            OSError(16, "Device or resource busy", "x/.nfs0001"),
        ),
        "swap": (strategies, "swap_into_place", OSError(28, "No space left on device")),
    }
    owner, name, error = broken[step]
    if step == "swap":
        target.parent.mkdir()

    def fail(*args, **kwargs) -> None:
        raise error

    checkpoint = {"state_dict": {"w": torch.ones(2)}, "optimizer_states": [], "global_step": 1}
    sent: list = []
    raised = []
    for rank in (0, 1):
        with monkeypatch.context() as patch:
            if rank == 0:  # the step runs on rank 0 only
                patch.setattr(owner, name, fail)
            with pytest.raises(OSError) as caught:
                TwoRanks(rank, sent).save_checkpoint(copy.deepcopy(checkpoint), target)
        raised.append(str(caught.value))
        if rank == 0:  # rank 0 leaves no new folder behind (rank 1, run after it here, writes its part again)
            assert not list(target.parent.glob(".last.ckpt.tmp-*"))
    # rank 0's last collective sends the failure: the one rank 1 waits in after the step
    assert sent[-1] == (None, raised[0].partition(f"{target}: ")[2])
    assert raised[0] == raised[1] and "\n" not in raised[0]
    assert raised[0].startswith(f"cannot save the sharded checkpoint {target}: {type(error).__name__}: ")
    assert str(error.strerror) in raised[0]


# -- a json member that does not parse -------------------------------------------------------------------------
def test_sample_with_malformed_json_is_a_logged_skip(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A json member that is not JSON (the first sample's, which the caption check reads too) skips that sample,
    counted and logged with `url:key`, in training and in the vocabulary's captions; the shard reads on."""
    samples = captioned(3)
    samples[0]["json"] = b'{"caption": "cut sh'
    shard = str(write_tar(tmp_path / "s-000000.tar", samples))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        items = list(ShardStream([shard], TRANSFORM, shuffle_buffer=1))
        vocabulary = list(shard_captions([shard], retry_delay=0))
    assert sum(item is None for item in items) == 1  # CaptionCollate drops and counts it
    assert sorted(i["captions"][0] for i in items if i is not None) == ["photo 1", "photo 2"]
    assert sorted(vocabulary) == ["photo 1", "photo 2"]
    skips = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skips) == 2 and all(
        f"{shard}:000000" in s and "json member is not valid JSON" in s for s in skips
    )


# -- the image tower's pixel statistics ----------------------------------------------------------------------------
def test_pixel_statistics_stay_float32_when_the_tower_changes_dtype() -> None:
    """`tower.to(bf16)` (bf16-true) converts the weights, not the statistics: they keep CLIP's exact float32
    values, and uint8 pixels are normalised in float32 before the cast to the weights' dtype."""
    torch.manual_seed(0)
    tower = ImageTower(IMAGE, 16).to(torch.bfloat16)
    assert tower.backbone.conv_proj.weight.dtype == torch.bfloat16
    assert tower.pixel_mean.dtype == tower.pixel_std.dtype == torch.float32
    assert torch.equal(tower.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))
    assert torch.equal(tower.pixel_std.flatten(), torch.tensor(CLIP_STD))
    images = torch.randint(
        0, 256, (2, 3, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    want = ((images.float() / 255 - mean) / std).to(torch.bfloat16)
    assert torch.equal(tower.normalize(images), want)  # the same float32 operations, one rounding to bf16
    assert tower(images).dtype == torch.bfloat16
    tower.float()  # and back: still exact
    assert torch.equal(tower.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))


# -- resuming a run whose DataModule named the normalisation -------------------------------------------------------
def _torchvision_image(tmp_path: Path) -> ImageTowerConfig:
    """A torchvision architecture's state-dict file: the tower's own statistics are ImageNet's."""
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
    return ImageTowerConfig(
        image_size=16, init=TowerInit("torchvision", str(tmp_path / "resnet18.pth"), "resnet18")
    )


@pytest.mark.parametrize("system", ["image_text", "trimodal"])
def test_resume_adopts_the_normalisation_its_datamodule_recorded(
    system: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A checkpoint whose DataModule recorded CLIP's mean and std (the default before the tower normalised) and
    whose tower, from a torchvision file, would now take ImageNet's: resuming (`on_load_checkpoint`) gives the
    tower CLIP's, records them in the hyperparameters the next checkpoints save, and says so in one warning."""
    image = _torchvision_image(tmp_path)
    if system == "image_text":
        module = ImageTextModule(image, TEXT, vocab_size=VOCAB, embed_dim=16)
        tower, recorded = module.pair.image, {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
        checkpoint = {"datamodule_hyper_parameters": {"image_size": 16, **recorded}}
    else:
        module = TriModalModule(image, SPEECH, TEXT, vocab_size=VOCAB, embed_dim=16)
        tower, recorded = module.image_text.image, {"mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
        checkpoint = {"datamodule_hyper_parameters": {"image_text": recorded, "speech_text": {}}}
    assert torch.equal(tower.pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    with caplog.at_level(logging.WARNING, logger="lightning_modules.image_text_module"):
        module.on_load_checkpoint(checkpoint)
    assert torch.equal(tower.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))
    assert torch.equal(tower.pixel_std.flatten(), torch.tensor(CLIP_STD))
    assert module.hparams["image"]["mean"] == CLIP_MEAN and module.hparams["image"]["std"] == CLIP_STD
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and f"mean {list(CLIP_MEAN)}" in warnings[0], warnings
    assert f"in place of mean {list(IMAGENET_MEAN)}" in warnings[0]
    # model.image.mean set, or the DataModule's the tower's own: nothing changes, nothing is said
    caplog.clear()
    module.on_load_checkpoint(checkpoint)
    assert not caplog.records and torch.equal(tower.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))


@pytest.mark.slow  # a Lightning fit and resume, ~2.5 s; the hook itself: the test above
@pytest.mark.usefixtures("one_thread")
def test_fit_from_such_a_checkpoint_trains_and_saves_with_its_normalisation(tmp_path: Path) -> None:
    """`fit(ckpt_path=...)` through Lightning: the resumed run normalises with the recorded statistics, and the
    checkpoint it writes holds them in `model.image`, so a later resume or evaluation keeps them."""
    g = torch.Generator().manual_seed(0)
    batch = _uint8_images(image_text_batches(g)[0], g)
    image = _torchvision_image(tmp_path)
    first = ImageTextModule(image, TEXT, vocab_size=VOCAB, embed_dim=16)
    trainer = quiet_trainer(max_steps=1, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(first, DataLoader([batch], batch_size=None))
    trainer.save_checkpoint(tmp_path / "old.ckpt")
    ckpt = torch.load(tmp_path / "old.ckpt", weights_only=True)
    ckpt["datamodule_hyper_parameters"] = {"image_size": 16, "mean": list(CLIP_MEAN), "std": list(CLIP_STD)}
    torch.save(ckpt, tmp_path / "old.ckpt")

    resumed = ImageTextModule(image, TEXT, vocab_size=VOCAB, embed_dim=16)
    trainer = quiet_trainer(max_steps=2, enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(resumed, DataLoader([batch], batch_size=None), ckpt_path=tmp_path / "old.ckpt")
    assert trainer.global_step == 2
    assert torch.equal(resumed.pair.image.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    saved = torch.load(tmp_path / "new.ckpt", weights_only=True)["hyper_parameters"]["image"]
    assert tuple(saved["mean"]) == CLIP_MEAN and tuple(saved["std"]) == CLIP_STD
