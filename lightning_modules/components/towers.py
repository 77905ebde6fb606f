"""What the text and the speech tower configs share: a Transformer encoder's size preset and its overrides."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
