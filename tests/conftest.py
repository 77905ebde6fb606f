"""Fixtures more than one test file uses."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import pytest

from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.contrastive import ContrastiveLossConfig
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.helpers import quiet_trainer, single_thread

TINY_CLIP_VAL_IMAGES = 100


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Each test of a file that asks for it (`pytestmark = pytest.mark.usefixtures("one_thread")`) runs on one
    thread (`single_thread`)."""
    with single_thread():
        yield


@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """The same for a whole module, its module-scoped fixtures included."""
    with single_thread():
        yield


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny CLIP trained 300 steps on 32 px captioned shapes (about 35 s on 2 cores), validated once at the end
    and saved: the image-text learning test reads its retrieval figures, the zero-shot and probe tests load it.

    Returns the validation metrics, the checkpoint, the tokenizer file and the shapes set's root."""
    tmp = tmp_path_factory.mktemp("tiny_clip")
    with single_thread():  # one busy thread beats two fighting other processes for the cores
        root = generate_shapes_coco(tmp / "shapes", n_train=1000, n_val=TINY_CLIP_VAL_IMAGES, image_size=32)
        L.seed_everything(0)
        dm = CocoCaptionsDataModule(
            str(root),
            context_length=32,
            images={"image_size": 32, "min_scale": 1.0},
            loader={"batch_size": 64, "eval_batch_size": 100, "num_workers": 0},
            tokenizer={"vocab_size": 200, "cache_dir": str(tmp / "cache")},
        )
        module = ImageTextModule(
            vocab_size=dm.vocab_size,
            embed_dim=128,
            image=ImageTowerConfig("vit_tiny", image_size=32, layers=2),
            text=TextTowerConfig("tiny", heads=2, max_len=32),
            loss=ContrastiveLossConfig(init_logit_scale=10.0),
            optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.05),
        )
        trainer = quiet_trainer(
            max_steps=300,
            val_check_interval=300,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
        )
        trainer.fit(module, dm)
        ckpt = tmp / "clip.ckpt"
        trainer.save_checkpoint(ckpt)
    return {
        "metrics": {k: v.item() for k, v in trainer.callback_metrics.items()},
        "ckpt": ckpt,
        "tokenizer": Path(dm.tokenizer.source),
        "root": root,
        "n_val": TINY_CLIP_VAL_IMAGES,
    }
