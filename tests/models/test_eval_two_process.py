"""A whole evaluation from the command line, in one process and in two (DDP over gloo on the CPU), gives the same
numbers over the same items: a checkpoint of this framework, the eval configs as published, sets whose size the
two processes do not divide (the distributed sampler repeats items to even them out, and each must count once)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.helpers import REPO, free_port, quiet_trainer, single_thread
from tests.models.test_eval_protocols import write_cifar, write_karpathy

CIFAR_TEST_IMAGES = 21  # odd: two processes get 11 each, one image twice
FLICKR_TEST_IMAGES = (
    7  # 36 captions (one image has 6): 4 images and 18 captions a process, one image repeated
)


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


def evaluate(root: Path, devices: int, *args: str) -> dict:
    """`python cli.py test ...` in a process of its own (two under DDP); the results.json it writes."""
    distributed = ["--trainer.strategy=ddp"] if devices > 1 else []
    env = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
    }
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK"):  # a fresh launch, not a rank of ours
        env.pop(key, None)
    command = [
        sys.executable,
        str(REPO / "cli.py"),
        "test",
        *args,
        "--trainer.accelerator=cpu",
        f"--trainer.devices={devices}",
        *distributed,
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={root}",
    ]
    done = subprocess.run(command, cwd=root.parent, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
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


@pytest.mark.slow  # three CLI processes a task (one, then two under DDP): about a minute on 2 cores
def test_cifar10_and_flickr30k_evaluations_in_two_processes_give_the_one_process_numbers(
    tmp_path: Path,
) -> None:
    ckpt, karpathy = image_text_checkpoint(tmp_path)
    write_cifar(tmp_path / "cifar", n_test=CIFAR_TEST_IMAGES)
    cifar = [
        "--config",
        str(REPO / "configs/eval/cifar10_zeroshot.yaml"),
        "--model.init_args.init_clip=null",
        f"--model.init_args.ckpt_path={ckpt}",
        f"--data.init_args.root={tmp_path / 'cifar'}",
        "--data.init_args.images.image_size=32",
        "--data.init_args.loader.batch_size=4",  # several batches a process, the last one short
        "--data.init_args.loader.num_workers=0",
    ]
    one = evaluate(tmp_path / "cifar_one", 1, *cifar)
    two = evaluate(tmp_path / "cifar_two", 2, *cifar)
    assert_same_numbers(
        one, two, {"test/zero_shot_acc", "test/zero_shot_acc_top5", "test/zero_shot_mean_per_class_recall"}
    )
    for results in (one, two):
        data = results["protocol"]["data"]
        assert (data["images"], data["images_counted"], data["classes"]) == (CIFAR_TEST_IMAGES,) * 2 + (10,)
        assert results["protocol"]["model"]["kind"] == "checkpoint"

    flickr = [
        "--config",
        str(REPO / "configs/eval/flickr30k_retrieval.yaml"),
        "--model.init_args.init_clip=null",
        f"--model.init_args.ckpt_path={ckpt}",
        f"--data.init_args.root={tmp_path / 'flickr30k-images'}",
        f"--data.init_args.karpathy_json={karpathy}",
        f"--data.init_args.tokenizer.path={ckpt}",
        "--data.init_args.context_length=16",
        "--data.init_args.images.image_size=32",
        "--data.init_args.loader.eval_batch_size=2",
        "--data.init_args.loader.num_workers=0",
    ]
    one = evaluate(tmp_path / "flickr_one", 1, *flickr)
    two = evaluate(tmp_path / "flickr_two", 2, *flickr)
    recalls = {f"test/{d}_R@{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}
    assert_same_numbers(one, two, recalls | {"test/R@mean"})
    captions = 5 * FLICKR_TEST_IMAGES + 1
    for results in (one, two):
        data = results["protocol"]["data"]
        assert (data["images_listed"], data["captions_listed"]) == (FLICKR_TEST_IMAGES, captions)
        assert (data["images_counted"], data["captions_counted"]) == (FLICKR_TEST_IMAGES, captions)
    print({k: (one["metrics"][k], two["metrics"][k]) for k in sorted(recalls)})
    assert torch.tensor([one["metrics"][k] for k in recalls]).gt(0).any()  # not a model that scores nothing
