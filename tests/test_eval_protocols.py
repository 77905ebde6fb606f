"""Evaluation like the papers: zero-shot classification, retrieval and probes from the CLI, with results that
describe their protocol; and the evaluation models composed of plain modules."""

from __future__ import annotations

import ast
from pathlib import Path

import lightning as L
import pytest
import torch

from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule, ImageTextPair, image_text_from_checkpoint
from lightning_modules.zero_shot import ZeroShotClassifier

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_image_text(vocab_size: int = 100) -> ImageTextModule:
    return ImageTextModule(
        vocab_size=vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=32, layers=1),
        text=TextTowerConfig("tiny", layers=1, heads=2, max_len=16),
    )


def save_system(module: L.LightningModule, path: Path, **extra) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), **extra}, path)
    return path


# -- composition ------------------------------------------------------------------------------------------


def test_no_contextvars_under_lightning_modules() -> None:
    """The systems are composed of plain modules: no context-variable workaround is needed anywhere."""
    files = sorted((ROOT / "lightning_modules").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "contextvars" for n in names), f"{path} imports contextvars"


def test_the_zero_shot_classifier_holds_the_contrastive_core_not_a_lightning_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = tiny_image_text()
    ckpt = save_system(trained, tmp_path / "clip.ckpt", tokenizer_json=None)
    pair, saved = image_text_from_checkpoint(ckpt, "zero-shot")
    assert type(pair) is ImageTextPair and not pair.training and saved["hyper_parameters"]["embed_dim"] == 16
    for key, value in trained.pair.state_dict().items():
        assert torch.equal(pair.state_dict()[key], value), key
    classifier = ZeroShotClassifier()
    classifier.set_model(pair, None, 16)
    for system in (classifier, trained):
        nested = [n for n, m in system.named_modules() if n and isinstance(m, L.LightningModule)]
        assert not nested, f"{type(system).__name__} holds LightningModules: {nested}"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # the same weights: the same embeddings (same kernels and shapes: exact)
        assert torch.equal(pair.encode_image(images), trained.eval().encode_image(images))
