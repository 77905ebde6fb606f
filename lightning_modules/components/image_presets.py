"""What the image tower (image_tower.py) and the pretrained-backbone loaders (clip_import.py) share: the pixel
statistics of OpenAI CLIP and ImageNet, and where a torchvision ViT or ResNet keeps its blocks and its head."""

from __future__ import annotations

from torch import nn

# OpenAI CLIP's pixel statistics (what scratch towers are normalised with) and ImageNet's (torchvision's
# classification weights and presets)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def torchvision_blocks(model: nn.Module) -> list[nn.Module]:
    """A torchvision ViT's Transformer blocks, first to last, or a ResNet's four stages."""
    if hasattr(model, "encoder"):  # VisionTransformer
        return list(model.encoder.layers)
    return [model.layer1, model.layer2, model.layer3, model.layer4]


def torchvision_head(model: nn.Module) -> list[nn.Module]:
    """What a torchvision ViT or ResNet runs after its blocks, classifier aside: the ViT's final LayerNorm (a
    ResNet's global average pool has no parameters)."""
    return [model.encoder.ln] if hasattr(model, "encoder") else []
