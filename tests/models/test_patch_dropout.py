"""Patch dropout (`model.image.patch_dropout`, FLIP) in every kind of ViT image tower: scratch (torchvision's
VisionTransformer), a torchvision backbone, open_clip's VisionTransformer and Hugging Face's CLIP vision model.

In training each image keeps round((1 - p) N) of its N patch tokens plus the class token, counted where the
tokens enter the first Transformer block; in evaluation the tower's output is the tower's without patch dropout.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from lightning_modules.components.clip_import import HFVision, OpenClipVision, TorchvisionBackbone
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig, PatchDropout
from lightning_modules.image_text_module import ImageTextModule
from tests.builders.alignment import TEXT, VOCAB, image_text_batches

pytestmark = pytest.mark.usefixtures("one_thread")

SIZE, PATCH, WIDTH = 32, 8, 32
PATCHES = (SIZE // PATCH) ** 2  # 16


def _config(p: float) -> ImageTowerConfig:
    return ImageTowerConfig(
        "vit_tiny", SIZE, patch_size=PATCH, layers=1, width=WIDTH, heads=2, patch_dropout=p
    )


def _torchvision_vit() -> VisionTransformer:
    return VisionTransformer(SIZE, PATCH, num_layers=1, num_heads=2, hidden_dim=WIDTH, mlp_dim=64)


def _open_clip() -> nn.Module:
    from open_clip.transformer import VisionTransformer as OpenClipViT

    return OpenClipVision(OpenClipViT(SIZE, PATCH, WIDTH, layers=1, heads=2, mlp_ratio=2.0, output_dim=16))


def _hf() -> nn.Module:
    import transformers

    config = transformers.CLIPVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=PATCH,
    )
    return HFVision(transformers.CLIPVisionModel(config), None)


# each kind: the backbone to give ImageTower (None: scratch) and where its first block is
KINDS: dict[str, tuple[Callable[[], nn.Module | None], Callable[[ImageTower], nn.Module]]] = {
    "scratch": (lambda: None, lambda t: t.backbone.encoder.layers[0]),
    "torchvision": (
        lambda: TorchvisionBackbone(_torchvision_vit(), SIZE),
        lambda t: t.backbone.model.encoder.layers[0],
    ),
    "open_clip": (_open_clip, lambda t: t.backbone.visual.transformer.resblocks[0]),
    "hf": (_hf, lambda t: t.backbone.vision_model.encoder.layers[0]),
}


def _tower(kind: str, p: float) -> ImageTower:
    torch.manual_seed(0)  # the same weights for every p
    backbone = KINDS[kind][0]()
    return (
        ImageTower(_config(p), 16, backbone=backbone) if backbone is not None else ImageTower(_config(p), 16)
    )


def _tokens_entering_first_block(tower: ImageTower, kind: str, images: torch.Tensor) -> torch.Size:
    seen: list[torch.Size] = []

    def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
        seen.append((args[0] if args else kwargs["hidden_states"]).shape)

    handle = KINDS[kind][1](tower).register_forward_pre_hook(record, with_kwargs=True)
    try:
        tower(images)
    finally:
        handle.remove()
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("p", [0.5, 0.25])
@pytest.mark.parametrize("kind", list(KINDS))
def test_training_keeps_the_rounded_share_of_patches_and_evaluation_all(kind: str, p: float) -> None:
    images = torch.randint(0, 256, (3, 3, SIZE, SIZE), dtype=torch.uint8)
    tower = _tower(kind, p).train()
    kept = round((1 - p) * PATCHES)
    assert _tokens_entering_first_block(tower, kind, images)[:2] == (3, 1 + kept)
    tower.eval()
    assert _tokens_entering_first_block(tower, kind, images)[:2] == (3, 1 + PATCHES)
    with torch.no_grad():
        evaluated = tower(images)
        plain = _tower(kind, 0.0).eval()(images)
        trained = tower.train()(images)
    torch.testing.assert_close(evaluated, plain, rtol=0, atol=0)  # the same code path: bit for bit
    assert not torch.allclose(trained, plain, rtol=1e-3, atol=1e-3)  # training saw fewer patches


def test_each_row_keeps_its_own_patches_and_the_seed_decides_them() -> None:
    drop = PatchDropout(0.5).train()
    # token j of row i is (i, j): what is kept says which tokens were chosen
    tokens = torch.stack(
        torch.meshgrid(torch.arange(4.0), torch.arange(1.0 + PATCHES), indexing="ij"), dim=-1
    )
    torch.manual_seed(1)
    out = drop(tokens)
    assert out.shape == (4, 1 + PATCHES // 2, 2)
    assert torch.equal(out[:, 0], tokens[:, 0])  # the class token first, in every row
    assert torch.equal(out[..., 0], torch.arange(4.0)[:, None].expand(-1, 1 + PATCHES // 2))  # own row's
    chosen = [frozenset(row.tolist()) for row in out[:, 1:, 1]]
    assert all(
        len(c) == PATCHES // 2 and 0 not in c for c in chosen
    )  # distinct patches, never the class token
    assert len(set(chosen)) > 1  # rows draw their own subsets
    torch.manual_seed(1)
    assert torch.equal(drop(tokens), out)
    assert torch.equal(drop.eval()(tokens), tokens)


def test_a_training_step_with_patch_dropout_trains_smoke() -> None:
    torch.manual_seed(0)
    image = ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2, patch_dropout=0.5)
    module = ImageTextModule(image, TEXT, vocab_size=VOCAB, embed_dim=16)
    module.log = lambda *args, **kwargs: None
    train, _ = image_text_batches(torch.Generator().manual_seed(1))
    loss = module.training_step(train, 0)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in module.pair.image.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert module.pair.image.backbone.conv_proj.weight.grad.abs().sum() > 0


def test_patch_dropout_is_a_config_setting_and_refuses_bad_values() -> None:
    import jsonargparse

    # the model section as the CLI reads it (LightningCLI adds the system's arguments the same way)
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(ImageTextModule, "model")
    assert parser.parse_args(["--model.image.patch_dropout", "0.5"]).model.image.patch_dropout == 0.5
    assert parser.get_defaults().model.image.patch_dropout == 0.0
    with pytest.raises(ValueError, match="patch_dropout must be in"):
        _config(1.0)
    with pytest.raises(ValueError, match="needs a ViT"):
        ImageTower(ImageTowerConfig("resnet50", 32, patch_dropout=0.5), 16)
