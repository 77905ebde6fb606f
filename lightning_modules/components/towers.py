"""What the tower configs share: a Transformer encoder's size preset and its overrides (text and speech), and
where a tower's weights come from and how it trains (every tower)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from lightning_modules.components.encoder import SizeName


@dataclass
class EncoderShape:
    """Size preset of a Transformer tower and overrides of its shape."""

    size: SizeName = "base"
    """Preset (tiny, mini, small, medium, base, large, as for BERT); the three fields below override it."""
    layers: int | None = None
    """Encoder blocks; None keeps the preset's."""
    hidden: int | None = None
    """Width; None keeps the preset's. Heads then default to width / 64."""
    heads: int | None = None
    """Attention heads; None keeps the preset's (or width / 64 when only the width is overridden)."""
    dropout: float = 0.0
    """Dropout on the encoder's input, attention probabilities and block outputs."""

    def encoder_overrides(self) -> dict[str, Any]:
        """`EncoderConfig.from_size` arguments of this shape (None: the preset's)."""
        return dict(
            num_layers=self.layers,
            hidden_size=self.hidden,
            num_heads=self.heads or (self.hidden // 64 if self.hidden else None),
            dropout=self.dropout,
            attention_dropout=self.dropout,
        )


TowerSource = Literal["scratch", "ours", "hf_bert", "hf", "open_clip", "torchvision", "torchaudio"]


@dataclass
class TowerInit:
    """Where a tower's weights come from. Every source is a local file or folder: nothing is downloaded."""

    source: TowerSource = "scratch"
    """scratch: random weights; ours: an MLM checkpoint of this framework (text); hf_bert: a Hugging Face BERT
    folder into our encoder (text); hf: a Hugging Face folder through transformers (text encoders, CLIP,
    wav2vec 2.0 / HuBERT / WavLM); open_clip: an open_clip model name and checkpoint; torchvision: an
    architecture and its state-dict file (image); torchaudio: an architecture and a state-dict file (speech)."""
    path: str | None = None
    """The checkpoint file or model folder."""
    name: str | None = None
    """The model name, where the source needs one (open_clip's ViT-B-32, torchvision's vit_b_16,
    torchaudio's hubert_base)."""


@dataclass(kw_only=True)
class TowerTraining:
    """How a tower starts and trains; every tower config has these fields (keyword-only, after its own)."""

    init: TowerInit = field(default_factory=TowerInit)
    """Pretrained weights to start from (model.<tower>.init.source / .path / .name)."""
    lock: bool = False
    """Freeze the whole tower (LiT): no gradients, no optimiser state, eval mode for dropout and norms."""
    unlocked_layers: int | None = None
    """With lock: the last N blocks (and the head/projection) still train; None or 0: none of them."""
    lr_mult: float = 1.0
    """This tower's learning rate is the optimiser's times this factor."""
