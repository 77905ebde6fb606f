"""Image batches under FSDP2, compressed or malformed shards, a failing rank-0 save step, the image tower's pixel
statistics under dtype conversion and on resume."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from lightning_modules.strategies import apply_fsdp2
from tests.test_contrastive_ddp import SYSTEMS
from tests.test_fsdp2_contrastive import BF16_TOL, world_of_one


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
