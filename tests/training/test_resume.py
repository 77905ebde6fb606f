"""Exact mid-epoch resume: a run killed with SIGKILL and resumed from its last checkpoint trains on the same
sequence of samples (and losses) as an unbroken run: no seen batch replayed, no unseen batch skipped.

The loader tests take batches out of loaders with worker processes (which prefetch several batches ahead)
and check that the saved position is what the consumer took. The end-to-end tests run `cli.py fit` in a
subprocess that kills itself after a checkpoint, resume it with `--ckpt_path`, and compare the per-step
sample ids recorded by `tests.resume_helpers.RecordSampleIds` with an unbroken run's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from itertools import islice
from pathlib import Path

import pytest
import torch
from torch.utils.data import Dataset

from datamodules.loading import ResumableBatchDataLoader, ResumableDataLoader, ResumableSampler
from datamodules.speech.librispeech_datamodule import DurationBucketBatchSampler
from datamodules.synthetic.tones import generate_tone_librispeech
from tests.helpers import REPO, cli_args, cli_env
from tests.resume_helpers import read_records


class Ids(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


def _position(loader: ResumableDataLoader | ResumableBatchDataLoader):
    """The sampler that holds the epoch and the skip."""
    return loader.sampler if isinstance(loader, ResumableDataLoader) else loader.batch_sampler


def _flat(batches) -> list[int]:
    return [int(i) for b in batches for i in (b if isinstance(b, list) else b.tolist())]


# -- loaders --------------------------------------------------------------------------------------


def _sample_loader(workers: int, epoch: int, rank: int = 0, replicas: int = 1) -> ResumableDataLoader:
    """103 samples in batches of 4 (drop_last)."""
    sampler = ResumableSampler(
        Ids(103), num_replicas=replicas, rank=rank, shuffle=True, seed=5, drop_last=True
    )
    sampler.set_epoch(epoch)
    return ResumableDataLoader(
        Ids(103),
        sampler,
        batch_size=4,
        drop_last=True,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
    )


def _bucket_loader(workers: int, epoch: int, rank: int = 0, replicas: int = 1) -> ResumableBatchDataLoader:
    """90 utterances of 1 to 6.5 s in duration-bucketed batches."""
    durations = [1.0 + (7 * i % 23) / 4 for i in range(90)]
    sampler = DurationBucketBatchSampler(
        durations, 12.0, num_buckets=3, seed=5, num_replicas=replicas, rank=rank
    )
    sampler.set_epoch(epoch)
    return ResumableBatchDataLoader(
        Ids(90), sampler, num_workers=workers, prefetch_factor=4 if workers else None, collate_fn=list
    )


LOADERS = pytest.mark.parametrize(
    "make", [_sample_loader, _bucket_loader], ids=["samples", "duration_buckets"]
)


@LOADERS
@pytest.mark.parametrize("rank", [0, 1])
def test_state_mid_epoch_resumes_at_the_next_batch_with_workers(make, rank: int) -> None:
    """Two workers have up to 8 batches in flight when the consumer has taken 3; the state counts the 3."""
    epoch = _flat(make(0, 2, rank, 2))

    first = make(2, 2, rank, 2)
    it = iter(first)
    taken = list(islice(it, 3))
    state = first.state_dict()
    del it
    per_batch = 4 if isinstance(first, ResumableDataLoader) else 1
    assert state == {"epoch": 2, "consumed": 3 * per_batch}

    second = make(2, 0, rank, 2)  # a fresh process builds its loader at epoch 0
    second.load_state_dict(state)
    assert second.state_dict() == state  # a checkpoint before the first resumed batch keeps the position
    rest = list(second)
    assert _flat(taken) + _flat(rest) == epoch
    assert len(rest) == len(second) - 3
    assert _flat(second) == _flat(make(0, 2, rank, 2))  # the skip is used once: the next pass is whole


@LOADERS
def test_state_at_the_end_of_an_epoch_does_not_skip_the_next_epoch(make) -> None:
    loader = make(0, 1)
    list(loader)
    _position(loader).set_epoch(2)  # the trainer sets the next epoch before its first batch is taken
    state = loader.state_dict()
    assert state == {
        "epoch": 1,
        "consumed": len(loader) * (4 if isinstance(loader, ResumableDataLoader) else 1),
    }

    resumed = make(0, 0)
    resumed.load_state_dict(state)
    assert list(resumed) == []  # epoch 1 again: nothing of it is left
    _position(resumed).set_epoch(2)
    reference = _flat(make(0, 2))
    assert _flat(resumed) == reference and len(reference) > 0

    resumed = make(0, 0)
    resumed.load_state_dict(state)
    _position(resumed).set_epoch(2)  # the trainer goes straight on to epoch 2
    assert _flat(resumed) == reference


class EpochIds(Ids):
    """Items carry the epoch the dataset was told; shared memory, so forked workers see it change."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int) -> None:
        self.epoch.fill_(epoch)

    def __getitem__(self, i: int) -> tuple[int, int]:
        return i, int(self.epoch)


def test_training_loader_tells_the_dataset_the_epoch_on_resume() -> None:
    """Lightning does not call `on_train_epoch_start` when it resumes mid-epoch, so the loader does it: the
    first prefetched batch of the resumed pass already has the checkpoint's epoch."""
    data = EpochIds(40)
    sampler = ResumableSampler(data, num_replicas=1, rank=0, shuffle=True, seed=1)
    loader = ResumableDataLoader(data, sampler, batch_size=4, num_workers=2, persistent_workers=True)
    loader.load_state_dict({"epoch": 3, "consumed": 8})
    epochs = [int(e) for _, batch_epochs in loader for e in batch_epochs]
    assert epochs == [3] * 32
    sampler.set_epoch(4)
    assert {int(e) for _, batch_epochs in loader for e in batch_epochs} == {4}

    evaluation = ResumableDataLoader(data, ResumableSampler(data, 1, 0, shuffle=False), batch_size=4)
    evaluation.sampler.set_epoch(7)  # Lightning sets the epoch on evaluation samplers too
    assert {int(e) for _, batch_epochs in evaluation for e in batch_epochs} == {4}  # left as it was


# -- end to end: kill -9 and resume ---------------------------------------------------------------


def _fit(
    run: Path,
    config: str,
    checkpoint_every: int,
    overrides: list[str],
    kill_at: int | None = None,
    ckpt: Path | None = None,
) -> None:
    """`cli.py fit` in a child process (killing itself after step `kill_at`) that records sample ids."""
    run.mkdir(parents=True, exist_ok=True)
    extra = run / "callbacks.yaml"
    extra.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning.pytorch.callbacks.ModelCheckpoint\n"
        "      init_args:\n"
        f"        dirpath: {run / 'checkpoints'}\n"
        "        monitor: null\n"  # the quickstarts monitor val/loss, and these runs do not validate
        "        save_last: true\n"
        "        save_top_k: 0\n"
        f"        every_n_train_steps: {checkpoint_every}\n"
        "    - class_path: tests.resume_helpers.RecordSampleIds\n"
        "      init_args:\n"
        f"        path: {run / 'ids'}\n"
        f"        kill_at_step: {'null' if kill_at is None else kill_at}\n"
    )
    resume = [] if ckpt is None else [f"--ckpt_path={ckpt}"]
    args = cli_args("fit", *overrides, "--trainer.logger=false", *resume, config=[config, extra], root=run)
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=REPO,
        env=cli_env(PYTHONHASHSEED="0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError):  # DDP ranks or workers the killed process left behind
            os.killpg(proc.pid, signal.SIGKILL)
    expected = -signal.SIGKILL if kill_at is not None else 0
    assert proc.returncode == expected, out.decode(errors="replace")[-4000:]


def _checkpoint_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


def _assert_resume_is_exact(
    straight: Path,
    killed: Path,
    resumed: Path,
    every: int,
    kill_at: int,
    ranks: int,
    rank0_rng_only: bool = False,
) -> None:
    """The killed run up to its checkpoint, then the resumed run, is the unbroken run, step by step.

    `rank0_rng_only`: the checkpoint holds rank 0's RNG state only, so after resuming the other ranks draw
    other dropout masks; losses are then compared up to the first resumed step of rank 0 (the weights and
    rank 0's RNG come back), not beyond."""
    ckpt_step = _checkpoint_step(killed / "checkpoints" / "last.ckpt")
    assert ckpt_step == kill_at // every * every
    for rank in range(ranks):
        unbroken = read_records(straight / "ids", rank)
        before = read_records(killed / "ids", rank)
        after = read_records(resumed / "ids", rank)
        # steps after the checkpoint and before the kill were trained on but not saved: legitimately re-run
        assert [r["step"] for r in before] == list(range(1, kill_at + 1))
        assert after[0]["step"] == ckpt_step + 1
        stitched = [r for r in before if r["step"] <= ckpt_step] + after
        assert [r["step"] for r in stitched] == [r["step"] for r in unbroken]
        assert [r["epoch"] for r in stitched] == [r["epoch"] for r in unbroken]
        assert [r["ids"] for r in stitched] == [r["ids"] for r in unbroken], f"rank {rank}"
        # the same batches, not only the same samples: masks drawn for the right epoch
        assert [r["content"] for r in stitched] == [r["content"] for r in unbroken], f"rank {rank}"
        # model, optimizer and RNG state come back too: the same losses, to the last bit on CPU
        last = len(stitched) if not rank0_rng_only else ckpt_step + (1 if rank == 0 else 0)
        losses, expected = [r["loss"] for r in stitched[:last]], [r["loss"] for r in unbroken[:last]]
        assert losses == expected, f"rank {rank}"


MLM_CONFIG = "mlm/quickstart.yaml"
MLM_STEPS = 16


def _mlm_overrides(cache: Path, workers: int) -> list[str]:
    # batches of 256 make a 7-step epoch of the sample corpus's 1950 training instances (drop_last)
    return [
        f"--data.init_args.tokenizer.cache_dir={cache}",
        f"--data.init_args.loader.num_workers={workers}",
        "--data.init_args.num_proc=1",
        "--data.init_args.loader.batch_size=256",
        "--model.init_args.encoder.size=tiny",
        "--model.init_args.encoder.hidden=32",
        "--model.init_args.encoder.layers=1",
        f"--trainer.max_steps={MLM_STEPS}",
        "--trainer.limit_val_batches=0",
    ]


@pytest.fixture(scope="module")
def mlm_straight(tmp_path_factory) -> tuple[Path, Path]:
    """The prepared corpus and one unbroken run (2 workers), shared by the cases below."""
    root = tmp_path_factory.mktemp("mlm_resume")
    cache = root / "cache"
    _fit(root / "straight", MLM_CONFIG, 100, _mlm_overrides(cache, 2))
    return cache, root / "straight"


@pytest.mark.parametrize(
    "every,kill_at",
    # about 20 s each; the default run keeps the in-process mid-epoch resume of the MLM system
    # (tests/models/test_mlm_training.py) and the loaders' and samplers' resume-state tests
    [pytest.param(3, 11, marks=pytest.mark.slow), pytest.param(7, 9, marks=pytest.mark.slow)],
    ids=["mid_epoch_1", "checkpoint_on_last_batch_of_epoch_0"],
)
def test_mlm_kill9_and_resume_matches_unbroken_run(
    mlm_straight, tmp_path: Path, every: int, kill_at: int
) -> None:
    """2 workers; 7-step epochs. Killed at step 11 with the checkpoint of step 9 (epoch 1, batch 2), or at
    step 9 with the checkpoint of step 7, the last batch of epoch 0."""
    cache, straight = mlm_straight
    overrides = _mlm_overrides(cache, 2)
    _fit(tmp_path / "killed", MLM_CONFIG, every, overrides, kill_at=kill_at)
    _fit(tmp_path / "resumed", MLM_CONFIG, every, overrides, ckpt=tmp_path / "killed/checkpoints/last.ckpt")
    _assert_resume_is_exact(straight, tmp_path / "killed", tmp_path / "resumed", every, kill_at, ranks=1)


@pytest.mark.slow
def test_mlm_ddp_kill9_and_resume_matches_unbroken_run(mlm_straight, tmp_path: Path) -> None:
    """Two CPU ranks (gloo), one worker each: the checkpoint holds rank 0's position, and every rank resumes
    its own shard at the next unseen batch."""
    cache, _ = mlm_straight
    overrides = _mlm_overrides(cache, 1) + [
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--data.init_args.loader.batch_size=128",  # per rank: the same 7-step epochs
    ]
    _fit(tmp_path / "straight", MLM_CONFIG, 100, overrides)
    _fit(tmp_path / "killed", MLM_CONFIG, 3, overrides, kill_at=11)
    _fit(tmp_path / "resumed", MLM_CONFIG, 3, overrides, ckpt=tmp_path / "killed/checkpoints/last.ckpt")
    # every rank's RNG state is in the checkpoint: all losses of both ranks match
    runs = tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed"
    _assert_resume_is_exact(*runs, 3, 11, ranks=2)
    # and the ranks saw different samples
    both = (
        read_records(tmp_path / "straight/ids", 0)[0]["ids"]
        + read_records(tmp_path / "straight/ids", 1)[0]["ids"]
    )
    assert len(set(both)) == len(both)


# slow (~25 s); the default run keeps the MLM kill -9 case and the duration-bucket sampler's resume state tests
@pytest.mark.slow
def test_speech_kill9_and_resume_matches_unbroken_run(tmp_path: Path) -> None:
    """The speech quickstart with duration-bucketed batches, 2 workers, a tiny model: killed at step 7 with
    the checkpoint of step 5, mid-epoch."""
    generate_tone_librispeech(tmp_path / "tones", n_train_utts=60, n_val_utts=8)
    overrides = [
        f"--data.init_args.root={tmp_path / 'tones'}",
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.loader.num_workers=2",
        "--data.init_args.batching.max_batch_seconds=20",
        "--model.init_args.embed_dim=32",
        "--model.init_args.speech.layers=1",
        "--model.init_args.speech.hidden=64",
        "--model.init_args.speech.conv_channels=8",
        "--model.init_args.text.layers=1",
        "--model.init_args.text.hidden=64",
        "--trainer.max_steps=10",
        "--trainer.limit_val_batches=0",
    ]
    config = "speech/quickstart.yaml"
    _fit(tmp_path / "straight", config, 100, overrides)
    _fit(tmp_path / "killed", config, 5, overrides, kill_at=7)
    _fit(tmp_path / "resumed", config, 5, overrides, ckpt=tmp_path / "killed/checkpoints/last.ckpt")
    _assert_resume_is_exact(tmp_path / "straight", tmp_path / "killed", tmp_path / "resumed", 5, 7, ranks=1)
    epochs = [r["epoch"] for r in read_records(tmp_path / "straight/ids")]
    assert epochs[6] == 0  # the kill fell inside the first epoch
