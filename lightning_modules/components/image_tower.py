"""The image tower of image-text alignment: a torchvision backbone, its pooled features, a linear projection.

    ViT     images -> patches + [class] token -> pre-LN Transformer -> final LN -> class-token state
    ResNet  images -> ResNet-50 trunk -> global average pool (2048-d)
    both    pooled features -> W_proj (no bias) -> embed_dim (not normalised: the loss normalises)

The DataModules send uint8 images (a quarter of float32's bytes to copy); `ImageTower.normalize` scales and
normalises them on the device, the one place this happens; float input is taken as already normalised. A
backbone with more than one 2-D convolution runs channels-last (`uses_channels_last`) for cuDNN's tensor-core
kernels; a ViT, whose one convolution is the patch embedding, stays as it is. FSDP2 refuses non-contiguous
parameters, so a channels-last tower does not shard with `FSDP2Strategy`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models.vision_transformer import VisionTransformer

from datamodules.sections import flat_hparams
from lightning_modules.components.clip_import import load_image_backbone
from lightning_modules.components.image_presets import (
    CLIP_MEAN,
    CLIP_STD,
    torchvision_blocks,
    torchvision_head,
)
from lightning_modules.components.image_presets import IMAGENET_MEAN as IMAGENET_MEAN  # re-exported
from lightning_modules.components.image_presets import IMAGENET_STD as IMAGENET_STD  # re-exported
from lightning_modules.components.towers import TowerTraining

ImageArch = Literal["vit_b_16", "vit_b_32", "vit_tiny", "vit_custom", "resnet50"]

# (patch size, layers, width, heads); the MLP is 4 x width as in ViT-B. vit_b_16 / vit_b_32 are torchvision's
# shapes, built here so the image size is free; vit_tiny is a CPU size, vit_custom the benchmark's shape.
VIT_PRESETS: dict[str, tuple[int, int, int, int]] = {
    "vit_b_16": (16, 12, 768, 12),
    "vit_b_32": (32, 12, 768, 12),
    "vit_tiny": (8, 4, 128, 4),
    "vit_custom": (32, 4, 256, 4),
}


def uses_channels_last(backbone: nn.Module) -> bool:
    """Whether `backbone` runs channels-last: it has convolutions beyond a single stem or patch convolution."""
    return sum(isinstance(m, nn.Conv2d) for m in backbone.modules()) > 1


class PatchDropout(nn.Module):
    """(B, 1 + N, D) tokens -> (B, 1 + K, D), K = round((1 - p) N): the first (class) token and, per row, a random
    K of the N patch tokens, in training only (FLIP, Li et al. 2023). The random numbers are drawn on the tokens'
    device from torch's generator, so a seeded run keeps the same patches. No parameters: a tower's state-dict
    keys are the same with it or without it."""

    def __init__(self, prob: float = 0.0) -> None:
        super().__init__()
        self.prob = prob

    def kept(self, patches: int) -> int:
        """How many of `patches` patch tokens a training row keeps (at least one)."""
        return max(1, round((1.0 - self.prob) * patches))

    def forward(self, tokens: Tensor) -> Tensor:
        if not self.training or self.prob == 0.0:
            return tokens
        first, patches = tokens[:, :1], tokens[:, 1:]
        rows, n, width = patches.shape
        keep = torch.rand(rows, n, device=tokens.device).topk(self.kept(n), dim=1).indices
        patches = patches.gather(1, keep.unsqueeze(-1).expand(-1, -1, width))
        return torch.cat([first, patches], dim=1)

    def _before_blocks(self, module: nn.Module, args: tuple) -> tuple:
        return (self(args[0]), *args[1:])

    def _after_embeddings(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor:
        return self(output)

    def attach(self, backbone: nn.Module) -> None:
        """Put this module where `backbone` has its tokens after the position embedding and before its blocks:
        open_clip's own `patch_dropout` slot; a hook on torchvision's `encoder.layers` (which receive
        pos-embedded, dropped-out tokens) or on Hugging Face CLIP's `embeddings`. Hooks are bound methods, so a
        deep copy of the tower calls its own copy of this module."""
        visual = getattr(backbone, "visual", None)  # OpenClipVision
        if visual is not None and hasattr(visual, "patch_dropout"):
            if getattr(visual, "class_embedding", None) is None:
                raise ValueError("model.image.patch_dropout: this open_clip ViT has no class token to keep")
            visual.patch_dropout = self
            return
        vision = getattr(backbone, "vision_model", None)  # HFVision
        if vision is not None:
            vision.embeddings.register_forward_hook(self._after_embeddings)
            return
        vit = getattr(backbone, "model", backbone)  # TorchvisionBackbone or the scratch VisionTransformer
        if isinstance(vit, VisionTransformer):
            vit.encoder.layers.register_forward_pre_hook(self._before_blocks)
            return
        raise ValueError(
            f"model.image.patch_dropout needs a ViT; this image tower's backbone is a {type(vit).__name__}"
        )


class ViTShape(NamedTuple):
    """A ViT's shape once the preset and the overrides are combined."""

    patch_size: int
    layers: int
    width: int
    heads: int
    mlp_dim: int


@dataclass
class ImageTowerConfig(TowerTraining):
    """Backbone choice and, for the ViTs, overrides of the preset's shape.

    The override fields keep what was given (None = the preset's); `vit` combines them with the preset, so a
    config that changes `arch` never inherits another preset's resolved shape.
    """

    arch: ImageArch = "vit_b_16"
    """Backbone: a ViT preset (vit_b_16, vit_b_32, vit_tiny for CPU, vit_custom) or torchvision's ResNet-50."""
    image_size: int = 224
    """Side of the square input; a ViT's position table is made for exactly this size (the DataModule's)."""
    patch_size: int | None = None
    """ViT patch side; None keeps the preset's. image_size must be a multiple of it."""
    layers: int | None = None
    """ViT encoder blocks; None keeps the preset's."""
    width: int | None = None
    """ViT width; None keeps the preset's."""
    heads: int | None = None
    """ViT attention heads; None keeps the preset's (or width / 64 when only the width is overridden)."""
    mlp_dim: int | None = None
    """ViT feed-forward width; None means 4 x width."""
    dropout: float = 0.0
    """ViT dropout after attention, in the MLP and on the embeddings (CLIP uses none)."""
    attention_dropout: float = 0.0
    """ViT dropout on attention probabilities."""
    patch_dropout: float = 0.0
    """Patch dropout (FLIP): in training, each image keeps a random round((1 - p) x N) of its N patch tokens
    (after the position embedding; the class token always) for the ViT blocks; evaluation sees every patch.
    0.5 about halves the image tower's cost per step. Any ViT (scratch, torchvision, open_clip, Hugging Face)."""
    mean: tuple[float, float, float] | None = None
    """Per-channel mean the tower normalises its uint8 input with; None: its source's (open_clip's
    preprocess_cfg, the Hugging Face folder's preprocessor_config.json, ImageNet's for a named torchvision
    architecture, CLIP's for scratch and for a torchvision file loaded into the configured arch)."""
    std: tuple[float, float, float] | None = None
    """Per-channel standard deviation, as `mean`; None: its source's."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("mean", "std"):  # checkpoints store the sections as plain dicts, tuples as lists
            value = getattr(self, key)
            if value is not None:
                if len(value) != 3:
                    raise ValueError(f"model.image.{key} needs 3 values (R, G, B), got {list(value)}")
                setattr(self, key, tuple(float(v) for v in value))
        if not 0.0 <= self.patch_dropout < 1.0:
            raise ValueError(f"model.image.patch_dropout must be in [0, 1), got {self.patch_dropout}")
        if self.arch != "resnet50" and self.arch not in VIT_PRESETS:
            raise ValueError(
                f"unknown image arch {self.arch!r}; choose one of {', '.join(VIT_PRESETS)} or resnet50"
            )
        if self.arch == "resnet50" or self.init.source in ("open_clip", "hf") or bool(self.init.name):
            return  # a pretrained backbone of its own architecture: the ViT fields do not apply
        vit = self.vit
        if self.image_size % vit.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {vit.patch_size}")
        if vit.width % vit.heads:
            raise ValueError(f"ViT width {vit.width} is not divisible by heads {vit.heads}")

    def check_data(self, data: dict, where: str) -> None:
        """A ViT's position table is made for one image size: the DataModule's (its hyperparameters `data`)."""
        data = flat_hparams(data)
        if self.arch != "resnet50" and data.get("image_size", self.image_size) != self.image_size:
            raise ValueError(
                f"{where}.images.image_size ({data['image_size']}) differs from model.image.image_size "
                f"({self.image_size}), the size the ViT's position table is made for"
            )

    @property
    def vit(self) -> ViTShape:
        """The ViT's shape: the preset of `arch` with the given overrides."""
        patch, layers, width, heads = VIT_PRESETS[self.arch]
        if self.width is not None:
            heads = self.heads or max(1, self.width // 64)
        width = self.width or width
        return ViTShape(
            self.patch_size or patch,
            self.layers or layers,
            width,
            self.heads or heads,
            self.mlp_dim or 4 * width,
        )


class ImageTower(nn.Module):
    """Images (B, 3, H, W) -> (B, embed_dim) joint-space embeddings (not normalised)."""

    def __init__(
        self, cfg: ImageTowerConfig, embed_dim: int | None, backbone: nn.Module | None = None
    ) -> None:
        """`backbone`: a pretrained one (components/clip_import.py) instead of the one `cfg` describes; its
        output is projected to `embed_dim`, or used as it is when it already has that width and `cfg` says no
        projection of its own is wanted (a whole-CLIP start passes `embed_dim=None`)."""
        super().__init__()
        self.cfg = cfg
        # a torchvision state dict without an architecture name is loaded into the configured backbone below
        own_arch = cfg.init.source == "torchvision" and not cfg.init.name
        self.pretrained = backbone is not None or (cfg.init.source != "scratch" and not own_arch)
        if self.pretrained:
            self.backbone = (
                backbone if backbone is not None else load_image_backbone(cfg.init, cfg.image_size)
            )
            features = self.backbone.output_dim
            # a whole-CLIP start keeps CLIP's own projection: nothing is added after it
            self.proj = nn.Identity() if embed_dim is None else nn.Linear(features, embed_dim, bias=False)
            if embed_dim is not None:
                nn.init.normal_(self.proj.weight, std=features**-0.5)
        else:
            self._build_scratch(cfg, embed_dim)
            if own_arch:
                load_image_backbone(cfg.init, cfg.image_size, own=self.backbone)
        self.patch_dropout = PatchDropout(cfg.patch_dropout)
        if cfg.patch_dropout > 0:
            self.patch_dropout.attach(self.backbone)
        self.channels_last = uses_channels_last(self.backbone)
        if self.channels_last:
            self.backbone.to(memory_format=torch.channels_last)
        # (mean, std) of a pretrained backbone's source; scratch towers (and a torchvision file loaded into the
        # configured arch, e.g. one this framework exported) use CLIP's
        source_mean, source_std = getattr(self.backbone, "pixel_stats", (CLIP_MEAN, CLIP_STD))
        mean, std = cfg.mean or source_mean, cfg.std or source_std
        # not in the state dict: checkpoints keep their keys, and the statistics follow the config
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> ImageTower:
        """As nn.Module's (`.to`, `.cuda`, `.bfloat16`, ...), but the pixel statistics move device only: they stay
        float32, with their exact values, whatever dtype the weights take (bf16 would round CLIP's 0.48145466 to
        0.48046875)."""
        stats = {name: getattr(self, name) for name in ("pixel_mean", "pixel_std")}
        super()._apply(fn, recurse)
        for name, own in stats.items():
            moved = getattr(self, name)
            if moved.dtype != own.dtype:
                setattr(self, name, own.to(device=moved.device))
        return self

    @property
    def reference_resize(self) -> str | None:
        """The `data.resize` mode that reproduces the preprocessing of this tower's source (None: scratch)."""
        return getattr(self.backbone, "reference_resize", None)

    def check_data(self, data: dict, where: str) -> None:
        """A DataModule's `mean` / `std` (hyperparameters `data`), where given, must be the tower's own: the
        tower, not the DataModule, normalises the pixels."""
        data = flat_hparams(data)
        for key, own in (("mean", self.pixel_mean), ("std", self.pixel_std)):
            given = data.get(key)
            want = [round(float(v), 8) for v in own.flatten()]
            # 1e-6: the configs' 8-digit CLIP numbers against their float32 copies
            if given is not None and any(abs(float(g) - w) > 1e-6 for g, w in zip(given, want, strict=True)):
                raise ValueError(
                    f"{where}.images.{key} ({list(given)}) differs from the image tower's normalisation ({want}: "
                    f"model.image.{key}, or its source's): the tower normalises the uint8 batches on the device; "
                    f"leave {where}.images.{key} unset, or set model.image.{key}"
                )

    def normalize(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels -> the backbone's input: scaled to [0, 1], less the mean, over the std
        (in float32, then in the dtype of the backbone's stem weights, read at call time: bf16 when FSDP2 gathers
        them so, which casts floating-point inputs only)."""
        pixels = images.float().div_(255)
        pixels = (pixels - self.pixel_mean) / self.pixel_std  # float32 statistics (see `_apply`)
        return pixels.to(self._stem_weight().dtype)

    def _stem_weight(self) -> Tensor:
        """The weight of the backbone's first convolution (the patch embedding or the ResNet stem), which the
        normalised pixels meet first; the backbone's first parameter where it has no convolution."""
        stem = next((m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
        return stem.weight if stem is not None else next(self.backbone.parameters())

    def _build_scratch(self, cfg: ImageTowerConfig, embed_dim: int) -> None:
        """The backbone `cfg` describes, with random weights, and the projection after it."""
        if cfg.arch == "resnet50":
            self.backbone = torchvision.models.resnet50(weights=None)
            features = self.backbone.fc.in_features
            self.backbone.fc = nn.Identity()  # keep the global-average-pooled 2048-d features
        else:
            vit = cfg.vit
            self.backbone = VisionTransformer(
                image_size=cfg.image_size,
                patch_size=vit.patch_size,
                num_layers=vit.layers,
                num_heads=vit.heads,
                hidden_dim=vit.width,
                mlp_dim=vit.mlp_dim,
                dropout=cfg.dropout,
                attention_dropout=cfg.attention_dropout,
            )
            features = vit.width
            self.backbone.heads = nn.Identity()  # the classifier head goes; the class-token state stays
        self.proj = nn.Linear(features, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=features**-0.5)

    @property
    def blocks(self) -> list[nn.Module]:
        """The backbone's blocks, first to last (Transformer blocks; a ResNet's four stages)."""
        return list(self.backbone.blocks) if self.pretrained else torchvision_blocks(self.backbone)

    @property
    def head(self) -> list[nn.Module | nn.Parameter]:
        """What follows the blocks: the final norm and the projections."""
        backbone_head = self.backbone.head if self.pretrained else torchvision_head(self.backbone)
        return [*backbone_head, self.proj]

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (normalised here) or float pixels already normalised."""
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.proj(self.backbone(images))
