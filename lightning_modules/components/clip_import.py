"""Pretrained image towers and whole CLIP models from the files people have on disk: a torchvision state dict,
an open_clip checkpoint, a Hugging Face `CLIPModel` / `CLIPVisionModel` folder. Nothing is downloaded.

The reference libraries' own classes are built (torchvision's, open_clip's `create_model(name)`, transformers'
`from_pretrained(local_files_only=True)`) and the weights loaded into them, so the imported forward is the
reference forward. Checkpoint files are read with `weights_only=True` or safetensors only.

Each backbone also says how its source preprocesses images: `pixel_stats` (mean, std), which the image tower
normalises with, and `reference_resize`, the `data.resize` mode whose crops are the reference pipeline's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_modules.components.image_presets import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    torchvision_blocks,
    torchvision_head,
)
from lightning_modules.components.towers import (
    TowerInit,
    load_matching_state_dict,
    read_hf_config,
    read_state_dict,
)


def _need(init: TowerInit, where: str, name: bool) -> None:
    if not init.path:
        raise ValueError(f"{where}.init.path is required for source {init.source!r}")
    if name and not init.name:
        raise ValueError(
            f"{where}.init.name is required for source {init.source!r} (e.g. ViT-B-32, vit_b_16)"
        )


# open_clip ------------------------------------------------------------------------------------------------------
def load_open_clip(init: TowerInit, where: str = "model.init_clip") -> nn.Module:
    """open_clip's own model class for `init.name`, with the weights of the local checkpoint `init.path`."""
    import open_clip

    _need(init, where, name=True)
    try:
        model = open_clip.create_model(init.name, pretrained=None)
    except RuntimeError as err:
        raise ValueError(f"{where}.init.name: {err}") from None
    state = read_state_dict(init.path)
    # some open_clip releases save a scalar temperature; the class's is (1,) or ()
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in state and isinstance(own, Tensor) and state[key].ndim != own.ndim:
            state[key] = state[key].reshape(own.shape)
    load_matching_state_dict(model, state, init.path, f"open_clip {init.name}")
    return model.eval()


# Hugging Face CLIP ----------------------------------------------------------------------------------------------
def load_hf_clip(folder: str, where: str = "model.init_clip", vision_only: bool = False) -> nn.Module:
    """A `CLIPModel` (or, for an image tower, a `CLIPVisionModel`) from a local folder."""
    import transformers

    cfg = read_hf_config(folder, "CLIPModel / CLIPVisionModel" if vision_only else "CLIPModel")
    kind = cfg.get("model_type")
    if kind == "clip_vision_model" and vision_only:
        return transformers.CLIPVisionModel.from_pretrained(folder, local_files_only=True).eval()
    if kind != "clip":
        raise ValueError(
            f"{folder}/config.json is a {kind!r} model; {where} needs a Hugging Face CLIPModel folder "
            f"(model_type 'clip'{' or clip_vision_model' if vision_only else ''})"
        )
    return transformers.CLIPModel.from_pretrained(folder, local_files_only=True).eval()


def hf_pixel_stats(folder: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of a Hugging Face CLIP folder's `preprocessor_config.json`; CLIPImageProcessor's defaults
    (OpenAI CLIP's) without one."""
    mean, std = CLIP_MEAN, CLIP_STD
    pre = Path(folder) / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        mean, std = tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return mean, std


class HFVision(nn.Module):
    """A HF CLIP vision transformer as a backbone: pixels -> pooled state -> its projection, when it has one."""

    # CLIPImageProcessor: torchvision's bicubic on the tensor, crop offset rounded down
    reference_resize = "tensor"

    def __init__(
        self,
        vision_model: nn.Module,
        projection: nn.Module | None,
        pixel_stats: tuple[tuple[float, ...], tuple[float, ...]] = (CLIP_MEAN, CLIP_STD),
    ) -> None:
        super().__init__()
        self.pixel_stats = pixel_stats
        self.vision_model = vision_model
        self.projection = projection if projection is not None else nn.Identity()
        self.image_size = vision_model.config.image_size
        self.output_dim = (
            projection.out_features if projection is not None else vision_model.config.hidden_size
        )

    @property
    def blocks(self) -> nn.ModuleList:
        return self.vision_model.encoder.layers

    @property
    def head(self) -> list[nn.Module]:
        return [self.vision_model.post_layernorm, self.projection]

    def forward(self, images: Tensor) -> Tensor:
        return self.projection(self.vision_model(pixel_values=images).pooler_output)


class OpenClipVision(nn.Module):
    """open_clip's `visual` as a backbone (its output is already in CLIP's joint space)."""

    reference_resize = "pil"  # open_clip's preprocessing: Pillow's bicubic, torchvision's CenterCrop

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        pre = getattr(visual, "preprocess_cfg", None) or {}
        self.pixel_stats = (tuple(pre.get("mean", CLIP_MEAN)), tuple(pre.get("std", CLIP_STD)))
        self.visual = visual
        size = visual.image_size
        self.image_size = size[0] if isinstance(size, (tuple, list)) else size
        self.output_dim = visual.output_dim

    @property
    def blocks(self) -> nn.ModuleList:
        trunk = getattr(self.visual, "transformer", None)
        if trunk is None:  # ModifiedResNet: its four stages
            return nn.ModuleList(
                [self.visual.layer1, self.visual.layer2, self.visual.layer3, self.visual.layer4]
            )
        return trunk.resblocks

    @property
    def head(self) -> list[nn.Module | nn.Parameter]:
        parts = [getattr(self.visual, n, None) for n in ("ln_post", "attnpool", "proj", "head")]
        return [p for p in parts if isinstance(p, (nn.Module, nn.Parameter))]

    def forward(self, images: Tensor) -> Tensor:
        return self.visual(images)


# torchvision ----------------------------------------------------------------------------------------------------
class TorchvisionBackbone(nn.Module):
    """A torchvision classifier without its classification layer: pooled features."""

    reference_resize = "torchvision"  # the ImageClassification preset
    pixel_stats = (IMAGENET_MEAN, IMAGENET_STD)  # every torchvision classification preset's

    def __init__(self, model: nn.Module, image_size: int) -> None:
        super().__init__()
        self.model = model
        self.image_size = image_size
        if hasattr(model, "heads"):  # VisionTransformer: class-token state
            self.output_dim = model.hidden_dim
            model.heads = nn.Identity()
        elif hasattr(model, "fc"):  # ResNet: global average pool
            self.output_dim = model.fc.in_features
            model.fc = nn.Identity()
        else:
            raise ValueError(f"torchvision model {type(model).__name__} is neither a ViT nor a ResNet")

    @property
    def blocks(self) -> list[nn.Module]:
        return torchvision_blocks(self.model)

    @property
    def head(self) -> list[nn.Module]:
        return torchvision_head(self.model)

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def load_torchvision(init: TowerInit, image_size: int, where: str = "model.image") -> TorchvisionBackbone:
    """torchvision's architecture `init.name` (vit_b_16, resnet50, ...) with the state dict at `init.path`, the
    file torchvision publishes (e.g. vit_b_16-c867db91.pth)."""
    import torchvision

    _need(init, where, name=True)
    try:
        builder = torchvision.models.get_model_builder(init.name)
    except ValueError:
        raise ValueError(f"{where}.init.name: torchvision has no model {init.name!r}") from None
    kwargs = {"image_size": image_size} if init.name.startswith("vit_") else {}
    model = builder(weights=None, **kwargs)
    load_matching_state_dict(model, read_state_dict(init.path), init.path, f"torchvision {init.name}")
    return TorchvisionBackbone(model, image_size)


def load_image_backbone(
    init: TowerInit, image_size: int, where: str = "model.image", own: nn.Module | None = None
) -> nn.Module:
    """The backbone of a pretrained image tower: a module with `output_dim`, `image_size`, `blocks`, `head`.

    `own`: the tower's configured backbone (a torchvision ViT or ResNet-50 without its head), which a
    torchvision state dict without `init.name` is loaded into (e.g. an image tower this framework exported)."""
    if init.source == "torchvision" and not init.name and own is not None:
        _need(init, where, name=False)
        arch = f"the configured {where} (model.image.arch and its shape)"
        load_matching_state_dict(own, read_state_dict(init.path), init.path, arch)
        return own
    if init.source == "torchvision":
        return load_torchvision(init, image_size, where)
    if init.source == "open_clip":
        backbone: nn.Module = OpenClipVision(load_open_clip(init, where).visual)
    elif init.source == "hf":
        _need(init, where, name=False)
        model = load_hf_clip(init.path, where, vision_only=True)
        projection = getattr(model, "visual_projection", None)
        # transformers 5's CLIPVisionModel is the vision transformer itself; CLIPModel holds one
        vision = getattr(model, "vision_model", model)
        backbone = HFVision(vision, projection, hf_pixel_stats(init.path))
    else:
        raise ValueError(
            f"{where}.init.source {init.source!r} is not an image source; use torchvision, open_clip or hf"
        )
    if backbone.image_size != image_size:
        raise ValueError(
            f"{where}.image_size ({image_size}) differs from the checkpoint's ({backbone.image_size}): set "
            f"{where}.image_size and data.images.image_size to {backbone.image_size}"
        )
    return backbone


# whole CLIP -----------------------------------------------------------------------------------------------------


class OpenClipText(nn.Module):
    """open_clip's text transformer, projection and EOT pooling (the model without its `visual`)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # the temperature lives in the pair; the image side in the image tower: neither stays here
        for name in ("visual", "logit_scale", "logit_bias"):
            if hasattr(model, name):
                delattr(model, name)
        self.model = model

    @property
    def blocks(self) -> nn.ModuleList:
        text = getattr(self.model, "text", self.model)
        return text.transformer.resblocks

    @property
    def head(self) -> list[nn.Module | nn.Parameter]:
        text = getattr(self.model, "text", self.model)
        parts = [getattr(text, "ln_final", None), getattr(text, "text_projection", None)]
        return [p for p in parts if isinstance(p, (nn.Module, nn.Parameter))]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        # CLIP's causal mask makes padding after the EOT token invisible to it; the mask is not needed
        return self.model.encode_text(input_ids)


class HFClipText(nn.Module):
    """HF CLIP's text transformer, its EOT pooling and text projection."""

    def __init__(self, text_model: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.text_model = text_model
        self.projection = projection

    @property
    def blocks(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    @property
    def head(self) -> list[nn.Module]:
        return [self.text_model.final_layer_norm, self.projection]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self.text_model(input_ids=input_ids, attention_mask=attention_mask.long())
        return self.projection(out.pooler_output)


@dataclass
class ClipParts:
    """What a whole-CLIP start takes from one checkpoint."""

    image: nn.Module
    text: nn.Module
    log_scale: float
    embed_dim: int
    image_size: int
    context_length: int
    vocab_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def load_clip(init: TowerInit) -> ClipParts:
    """Image tower, text tower, temperature and preprocessing of one open_clip checkpoint or HF CLIP folder."""
    if init.source == "open_clip":
        model = load_open_clip(init)
        image = OpenClipVision(model.visual)
        log_scale = float(model.logit_scale.detach().reshape(()))
        text_cfg = getattr(model, "text", model)
        context_length = int(getattr(model, "context_length", None) or text_cfg.context_length)
        vocab = int(getattr(model, "vocab_size", None) or text_cfg.vocab_size)
        return ClipParts(
            image,
            OpenClipText(model),
            log_scale,
            image.output_dim,
            image.image_size,
            context_length,
            vocab,
            *image.pixel_stats,
        )
    if init.source == "hf":
        _need(init, "model.init_clip", name=False)
        model = load_hf_clip(init.path)
        image = HFVision(model.vision_model, model.visual_projection, hf_pixel_stats(init.path))
        cfg = model.config
        return ClipParts(
            image,
            HFClipText(model.text_model, model.text_projection),
            float(model.logit_scale.detach()),
            cfg.projection_dim,
            cfg.vision_config.image_size,
            cfg.text_config.max_position_embeddings,
            cfg.text_config.vocab_size,
            *image.pixel_stats,
        )
    raise ValueError(f"model.init_clip.source {init.source!r}: use open_clip or hf")


# export ---------------------------------------------------------------------------------------------------------
def _refuse_existing(out: Path) -> None:
    # users' files are never overwritten: the export writes only a new file or folder
    if out.exists():
        raise FileExistsError(f"{out} already exists: give a new path for the export")


def _plain(tensor: Tensor) -> Tensor:
    """A contiguous copy: a channels-last tower's weights are written as the reference libraries publish theirs,
    so the file converts to safetensors (which refuses non-contiguous tensors) as it is."""
    return tensor.detach().clone(memory_format=torch.contiguous_format)


def export_open_clip(image: nn.Module, text: nn.Module, log_scale: Tensor, out: str | Path) -> Path:
    """Write a whole-CLIP model started from open_clip back as an open_clip state dict: the file that
    `open_clip.create_model(name)` + `load_state_dict` (or `pretrained=FILE`) loads."""
    out = Path(out)
    _refuse_existing(out)
    if not isinstance(image, OpenClipVision) or not isinstance(text, OpenClipText):
        raise ValueError("this model's towers did not come from open_clip: export it in their own format")
    state = {k: _plain(v) for k, v in text.model.state_dict().items()}
    state.update({f"visual.{k}": _plain(v) for k, v in image.visual.state_dict().items()})
    state["logit_scale"] = log_scale.detach().clone().reshape(())
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out


def export_hf_clip(
    image: nn.Module, text: nn.Module, log_scale: Tensor, out: str | Path, tokenizer_from: str | None
) -> Path:
    """Write a whole-CLIP model started from a HF CLIP folder back as a `CLIPModel` folder (with the source
    folder's tokenizer and image-processor files)."""
    import transformers

    out = Path(out)
    _refuse_existing(out)
    if not isinstance(image, HFVision) or not isinstance(text, HFClipText):
        raise ValueError(
            "this model's towers did not come from a HF CLIP folder: export it in their own format"
        )
    config = transformers.CLIPConfig(
        text_config=text.text_model.config.to_dict(),
        vision_config=image.vision_model.config.to_dict(),
        projection_dim=text.projection.out_features,
    )
    model = transformers.CLIPModel(config)
    model.text_model.load_state_dict(text.text_model.state_dict())
    model.vision_model.load_state_dict(image.vision_model.state_dict())
    model.text_projection.load_state_dict(text.projection.state_dict())
    model.visual_projection.load_state_dict(image.projection.state_dict())
    with torch.no_grad():
        model.logit_scale.copy_(log_scale.detach().reshape(model.logit_scale.shape))
    model.save_pretrained(out)
    if tokenizer_from:
        transformers.CLIPTokenizerFast.from_pretrained(tokenizer_from, local_files_only=True).save_pretrained(
            out
        )
        if (Path(tokenizer_from) / "preprocessor_config.json").is_file():
            transformers.CLIPImageProcessor.from_pretrained(
                tokenizer_from, local_files_only=True
            ).save_pretrained(out)
    return out


def export_image_backbone(backbone: nn.Module, out: str | Path) -> Path:
    """Write an image tower's backbone as a state dict: a torchvision model's own keys, loadable again as
    `model.image.init: {source: torchvision, path: FILE}` (name: the torchvision architecture, or none for the
    tower's configured arch)."""
    out = Path(out)
    _refuse_existing(out)
    inner = backbone.model if isinstance(backbone, TorchvisionBackbone) else backbone
    state = {k: _plain(v) for k, v in inner.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    return out
