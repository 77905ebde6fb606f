"""A whole evaluation from the command line, in one process and in two (DDP over gloo on the CPU), gives the same
numbers over the same items: a checkpoint of this framework, the eval configs as published, sets whose size the
two processes do not divide (the distributed sampler repeats items to even them out, and each must count once).
The runs are slow (separate processes); in the default run, test_eval_protocols.py checks the gather's arithmetic
on two fake ranks and this file that every process joins the report's one collective."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import lightning as L
import pytest
import yaml

from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.builders.files import write_cifar, write_karpathy
from tests.helpers import CONFIGS, cli_args, cli_env, quiet_trainer, run_cli, single_thread

CIFAR_TEST_IMAGES = 21  # odd: two processes get 11 each, one image twice
# 36 captions (one image has 6); two processes get 4 images each, one image (with its captions) twice
FLICKR_TEST_IMAGES = 7


def image_text_checkpoint(tmp: Path) -> tuple[Path, Path]:
    """A tiny image-text model (width 32, one layer a tower, 32 px) trained one step through Lightning on the
    Karpathy file's training images and saved by the trainer, so it carries its tokenizer. Returns the checkpoint
    and the Karpathy file (7 test images, 36 captions)."""
    from datamodules.image.coco_datamodule import CocoCaptionsDataModule

    karpathy = write_karpathy(tmp / "flickr30k-images", "flickr30k", n_test=FLICKR_TEST_IMAGES, n_train=4)
    with single_thread():
        L.seed_everything(0)
        dm = CocoCaptionsDataModule(
            str(tmp / "flickr30k-images"),
            karpathy_json=str(karpathy),
            context_length=16,
            images={"image_size": 32, "min_scale": 1.0},
            loader={"batch_size": 4, "num_workers": 0},
            tokenizer={"vocab_size": 100, "cache_dir": str(tmp / "cache")},
        )
        module = ImageTextModule(
            vocab_size=dm.vocab_size,
            embed_dim=16,
            image=ImageTowerConfig("vit_tiny", image_size=32, patch_size=8, layers=1, width=32, heads=2),
            text=TextTowerConfig("tiny", layers=1, hidden=32, heads=2, max_len=16),
        )
        trainer = quiet_trainer(max_steps=1, limit_val_batches=0, enable_checkpointing=False)
        trainer.fit(module, dm)
        ckpt = tmp / "clip.ckpt"
        trainer.save_checkpoint(ckpt)
    return ckpt, karpathy


def evaluate(root: Path, devices: int, config: str | list[str], *args: str) -> dict:
    """`python cli.py test ...` in a process of its own (two under DDP); the results.json it writes."""
    distributed = ["--trainer.strategy=ddp"] if devices > 1 else []
    command = cli_args("test", *args, f"--trainer.devices={devices}", *distributed, config=config, root=root)
    done = run_cli(command, cwd=root.parent, env=cli_env(MASTER_ADDR="127.0.0.1"))
    joined = range(devices) if devices > 1 else []  # Lightning logs each process joining the process group
    for rank in joined:
        assert f"GLOBAL_RANK: {rank}, MEMBER: {rank + 1}/{devices}" in done.stderr, done.stderr[-3000:]
    found = sorted(root.rglob("results.json"))
    assert len(found) == 1, f"results.json under {root}: {found}\n{done.stderr[-3000:]}"
    return json.loads(found[0].read_text())


def assert_same_numbers(one: dict, two: dict, keys: set[str]) -> None:
    """Every metric in `keys`: the same in both runs. Accuracies and recalls are hits counted over the same items
    with the same model, so they agree exactly unless an item is counted twice or lost; 1e-6 only allows for the
    float division."""
    assert keys <= set(one["metrics"]) and keys <= set(two["metrics"]), sorted(one["metrics"])
    for key in sorted(keys):
        assert two["metrics"][key] == pytest.approx(one["metrics"][key], abs=1e-6), key
    assert one["protocol"]["processes"] == 1 and two["protocol"]["processes"] == 2


class OtherRank:
    """The trainer as a process other than rank 0 of two sees it; `log_dir` counts the broadcasts it joins."""

    is_global_zero, world_size, precision = False, 2, "32-true"
    callback_metrics: dict = {}
    datamodule = ckpt_path = None

    def __init__(self, root: Path) -> None:
        self.default_root_dir, self.broadcasts = str(root), 0

    @property
    def log_dir(self) -> str:
        self.broadcasts += 1  # under DDP every process must call it: rank 0 waits for the others
        return self.default_root_dir


def test_every_process_joins_the_log_dir_broadcast_and_only_rank_0_writes(tmp_path: Path) -> None:
    """Lightning's `trainer.log_dir` is a collective under DDP; a report that asked for it on rank 0 only would
    leave rank 0 waiting for a peer that has finished (the two-process runs below fail that way)."""
    from types import SimpleNamespace

    from lightning_modules.training.evaluation import EvaluationReport

    trainer = OtherRank(tmp_path)
    EvaluationReport().on_test_end(trainer, SimpleNamespace(protocol=lambda: {"model": {}}))
    assert trainer.broadcasts == 1 and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return image_text_checkpoint(tmp_path_factory.mktemp("clip"))


def report(task: str, one: dict, two: dict, keys: set[str]) -> None:
    """The numbers of both runs on stdout (`pytest -s` shows them)."""
    print(task, json.dumps({k: [one["metrics"][k], two["metrics"][k]] for k in sorted(keys)}))


@pytest.mark.slow  # three CLI processes (one run, then two under DDP): about a minute on 2 shared cores
def test_cifar10_zero_shot_in_two_processes_gives_the_one_process_numbers(
    clip_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, _ = clip_checkpoint
    write_cifar(tmp_path / "cifar", n_test=CIFAR_TEST_IMAGES)
    cifar = [
        "--model.init_args.init_clip=null",
        f"--model.init_args.ckpt_path={ckpt}",
        f"--data.init_args.root={tmp_path / 'cifar'}",
        "--data.init_args.images.image_size=32",
        "--data.init_args.loader.batch_size=4",  # several batches a process, the last one short
        "--data.init_args.loader.num_workers=0",
    ]
    one = evaluate(tmp_path / "one", 1, "eval/cifar10_zeroshot.yaml", *cifar)
    two = evaluate(tmp_path / "two", 2, "eval/cifar10_zeroshot.yaml", *cifar)
    keys = {"test/zero_shot_acc", "test/zero_shot_acc_top5", "test/zero_shot_mean_per_class_recall"}
    report("cifar10", one, two, keys)
    assert_same_numbers(one, two, keys)
    for results in (one, two):
        data = results["protocol"]["data"]
        assert (data["images"], data["images_counted"], data["classes"]) == (CIFAR_TEST_IMAGES,) * 2 + (10,)
        assert results["protocol"]["model"]["kind"] == "checkpoint"


@pytest.mark.slow  # three CLI processes (one run, then two under DDP): about a minute on 2 shared cores
def test_zero_shot_with_an_undecodable_image_in_two_processes_gives_the_one_process_numbers(
    clip_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    """An image folder of 9 images whose 4th does not decode: the second process meets it, and the skipped count in
    results.json is the whole run's, as in one process, not rank 0's alone."""
    from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder

    ckpt, _ = clip_checkpoint
    colours = ("red", "green", "blue")
    root = generate_shapes_imagefolder(
        tmp_path / "shapes", colours, ("circle",), per_class={"test": 3}, image_size=32
    )
    # files in sorted order: blue 0-2, green 3-5, red 6-8; two processes take 0, 2, 4, 6, 8 and 1, 3, 5, 7, 0
    broken = sorted((root / "test" / "green_circle").iterdir())[0]
    broken.write_bytes(b"not an image")
    shapes = [
        f"--model.init_args.ckpt_path={ckpt}",
        f"--data.init_args.root={root}",
        "--data.init_args.generate_if_missing=false",
        "--data.init_args.images.image_size=32",
        "--data.init_args.loader.batch_size=2",
        "--trainer.logger=false",
        "--trainer.callbacks+=lightning_modules.training.evaluation.EvaluationReport",
    ]
    one = evaluate(tmp_path / "one", 1, "zeroshot/shapes.yaml", *shapes)
    two = evaluate(tmp_path / "two", 2, "zeroshot/shapes.yaml", *shapes)
    keys = {"test/zero_shot_acc", "test/zero_shot_mean_per_class_recall", "test/skipped_items"}
    report("shapes folder", one, two, keys)
    assert_same_numbers(one, two, keys)
    files = sorted((root / "test").rglob("*.jpg"))
    assert len(files) == 9
    for results in (one, two):  # every file accounted for once: 8 scored, 1 skipped
        counted = results["protocol"]["data"]["images_counted"]
        assert (counted, results["metrics"]["test/skipped_items"]) == (len(files) - 1, 1)


@pytest.mark.slow  # three CLI processes (one run, then two under DDP): about a minute on 2 shared cores
def test_flickr30k_retrieval_in_two_processes_gives_the_one_process_numbers(
    clip_checkpoint: tuple[Path, Path], tmp_path: Path
) -> None:
    ckpt, karpathy = clip_checkpoint
    flickr = [
        "--model.init_args.init_clip=null",
        f"--model.init_args.ckpt_path={ckpt}",
        f"--data.init_args.root={karpathy.parent}",
        f"--data.init_args.karpathy_json={karpathy}",
        f"--data.init_args.tokenizer.path={ckpt}",
        "--data.init_args.context_length=16",
        "--data.init_args.images.image_size=32",
        "--data.init_args.loader.eval_batch_size=2",  # 4 batches of images, the last one short
        "--data.init_args.loader.num_workers=0",
    ]
    one = evaluate(tmp_path / "one", 1, "eval/flickr30k_retrieval.yaml", *flickr)
    two = evaluate(tmp_path / "two", 2, "eval/flickr30k_retrieval.yaml", *flickr)
    recalls = {f"test/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    report("flickr30k", one, two, recalls)
    assert_same_numbers(one, two, recalls | {"test/R@mean"})
    assert 0 < one["metrics"]["test/t2i_R@1"] < 1  # neither a model that finds nothing nor a trivial set
    captions = 5 * FLICKR_TEST_IMAGES + 1
    for results in (one, two):
        data = results["protocol"]["data"]
        assert (data["images_listed"], data["captions_listed"]) == (FLICKR_TEST_IMAGES, captions)
        assert (data["images_counted"], data["captions_counted"]) == (FLICKR_TEST_IMAGES, captions)


LIBRISPEECH_TEST_UTTERANCES = 7  # in 3 duration buckets, one batch each: the second process repeats the first


def speech_text_checkpoint(tmp: Path) -> tuple[Path, Path]:
    """A tiny speech-text model (width 32, one layer a tower) trained one step by `cli.py fit` on the speech
    quickstart config over the generated tone LibriSpeech, and saved by its trainer; its test-clean is a copy of the
    7 dev-clean utterances. Returns the checkpoint and the data root."""
    from cli import main
    from datamodules.synthetic.tones import generate_tone_librispeech

    libri = generate_tone_librispeech(tmp / "tones", n_train_utts=8, n_val_utts=LIBRISPEECH_TEST_UTTERANCES)
    shutil.copytree(libri / "dev-clean", libri / "test-clean")  # LibriSpeech's test-clean layout
    with single_thread():
        cli = main(
            cli_args(
                "fit",
                f"--data.root={tmp / 'tones'}",
                f"--data.tokenizer.cache_dir={tmp / 'cache'}",
                "--data.tokenizer.vocab_size=100",
                "--data.context_length=16",
                "--data.loader.num_workers=0",
                "--model.embed_dim=16",
                "--model.speech.layers=1",
                "--model.speech.hidden=32",
                "--model.speech.conv_channels=8",
                "--model.text.layers=1",
                "--model.text.hidden=32",
                "--model.text.max_len=16",
                "--trainer.max_steps=1",
                "--trainer.limit_val_batches=0",
                "--trainer.enable_checkpointing=false",
                config="speech/quickstart.yaml",
                root=tmp / "fit",
            )
        )
        ckpt = tmp / "speech.ckpt"
        cli.trainer.save_checkpoint(ckpt)
    return ckpt, tmp / "tones"


@pytest.mark.slow  # three CLI processes (one run, then two under DDP): about a minute on 2 shared cores
def test_librispeech_test_clean_retrieval_in_two_processes_gives_the_one_process_numbers(
    tmp_path: Path,
) -> None:
    """configs/eval/librispeech_test_clean.yaml stacked on the speech run's config, as its header says; the
    duration-bucketing batch sampler shards by rank itself and repeats whole batches to even the ranks out."""
    from datamodules.speech.librispeech_datamodule import DurationBucketBatchSampler, LibriSpeechDataModule

    ckpt, root = speech_text_checkpoint(tmp_path / "speech")
    config = yaml.safe_load((CONFIGS / "speech/quickstart.yaml").read_text())
    batching = {**config["data"]["init_args"]["batching"], "num_buckets": 3}
    dm = LibriSpeechDataModule(
        str(root),
        test_subsets=["test-clean"],
        batching=batching,
        tokenizer={"path": str(ckpt), "cache_dir": str(tmp_path / "cache")},
    )
    dm.setup("test")
    durations = dm.datasets["test"].durations
    seconds, buckets = batching["max_batch_seconds"], batching["num_buckets"]
    shards = [
        DurationBucketBatchSampler(durations, seconds, buckets, shuffle=False, num_replicas=2, rank=r)
        for r in (0, 1)
    ]
    assert len(durations) == LIBRISPEECH_TEST_UTTERANCES
    assert sum(len(batch) for shard in shards for batch in shard) > len(durations)  # a batch evaluated twice
    libri = [
        f"--ckpt_path={ckpt}",
        f"--data.root={root}",
        "--data.context_length=16",
        "--data.batching.num_buckets=3",  # 3 batches: the second process repeats one
        "--data.loader.num_workers=0",
    ]
    configs = ["speech/quickstart.yaml", "eval/librispeech_test_clean.yaml"]
    one = evaluate(tmp_path / "one", 1, configs, *libri)
    two = evaluate(tmp_path / "two", 2, configs, *libri)
    recalls = {f"test/{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)}
    report("librispeech test-clean", one, two, recalls)
    assert_same_numbers(one, two, recalls | {"test/R@mean"})
    for results in (one, two):
        data = results["protocol"]["data"]
        assert (data["subsets"], data["utterances"]) == (["test-clean"], LIBRISPEECH_TEST_UTTERANCES)
        assert (data["utterances_counted"], data["texts_counted"]) == (LIBRISPEECH_TEST_UTTERANCES,) * 2
        assert results["protocol"]["model"]["kind"] == "checkpoint"
