"""The speech tower of speech-text alignment: waveform -> log-mel -> SpecAugment -> 4x conv subsampling ->
Transformer (the shared encoder) or Conformer -> masked mean -> projection into the joint space.

Padding never changes an utterance's embedding (in eval mode). Every stage that mixes neighbouring frames
sees, past an utterance's end, exactly what it would see if the utterance were alone:
  * the STFT is uncentred, so frame t reads samples [t·hop, t·hop + win) and never the padding;
  * padded frames are zeroed before each convolution, which is what the convolution's own zero padding
    shows the utterance when it is alone;
  * attention gets a key-padding mask, and pooling averages real frames only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torchaudio
from torch import Tensor, nn

from datamodules.sections import flat_hparams
from lightning_modules.components.encoder import (
    EncoderConfig,
    TransformerEncoder,
    lengths_to_mask,
    masked_mean_pool,
)
from lightning_modules.components.hf_towers import HFSpeechTower, PretrainedSpeechTower, TorchaudioSpeechTower
from lightning_modules.components.towers import EncoderShape, TowerTraining


@dataclass
class SpeechTowerConfig(EncoderShape, TowerTraining):
    """The speech tower: encoder size preset and overrides (`EncoderShape`), front end, SpecAugment and encoder
    choice."""

    dropout: float = 0.1
    """Dropout on the encoder's input, attention probabilities and block outputs."""
    sample_rate: int = 16000
    """Waveform sample rate (Hz)."""
    n_mels: int = 80
    """Mel filterbank channels."""
    win_ms: float = 25.0
    """Analysis window (and FFT) length in milliseconds."""
    hop_ms: float = 10.0
    """Frame shift in milliseconds."""
    log_floor: float = 1e-6
    """log(max(mel power, floor)): silence and digital zeros stay finite."""
    freq_masks: int = 2
    """SpecAugment frequency masks per utterance (training only)."""
    freq_mask_width: int = 27
    """Widest frequency mask, in mel channels."""
    time_masks: int = 2
    """SpecAugment time masks per utterance (training only)."""
    time_mask_width: int = 40
    """Widest time mask, in 10 ms frames."""
    conv_channels: int = 256
    """Channels of the two subsampling convolutions."""
    encoder: Literal["transformer", "conformer"] = "transformer"
    """The shared TransformerEncoder, or torchaudio's Conformer."""
    conformer_kernel_size: int = 31
    """Depthwise convolution kernel of the Conformer blocks (odd)."""
    gradient_checkpointing: bool = False
    """Recompute the Transformer blocks in backward to save memory (torchaudio's Conformer has no such switch)."""
    arch_args: dict[str, Any] = field(default_factory=dict)
    """With init.source torchaudio: keyword arguments of the builder `torchaudio.models.<init.name>` (all of
    them for wav2vec2_model / wavlm_model, which have no preset size)."""

    def encoder_config(self) -> EncoderConfig:
        # pre-LN unless norm_first says otherwise: trains from scratch without the warmup tricks post-LN needs
        shape = {"norm_first": True, **self.encoder_overrides()}
        return EncoderConfig.from_size(self.size, layer_norm_eps=1e-5, **shape)

    def check_data(self, data: dict, where: str) -> None:
        """The log-mel front end is made for one sample rate: the DataModule's (its hyperparameters `data`).
        Pretrained wav2vec 2.0 / HuBERT / WavLM towers were trained on 16 kHz audio."""
        data = flat_hparams(data)
        if self.init.source != "scratch" and data.get("sample_rate", 16000) != 16000:
            raise ValueError(
                f"{where}.sample_rate is {data['sample_rate']} but the pretrained speech tower "
                f"({self.init.source}) takes 16 kHz waveforms: set {where}.sample_rate 16000"
            )
        if self.init.source == "scratch" and data.get("sample_rate", self.sample_rate) != self.sample_rate:
            raise ValueError(
                f"{where}.sample_rate ({data['sample_rate']}) differs from model.speech.sample_rate "
                f"({self.sample_rate})"
            )

    @property
    def win_length(self) -> int:
        return round(self.sample_rate * self.win_ms / 1000)

    @property
    def hop_length(self) -> int:
        return round(self.sample_rate * self.hop_ms / 1000)


class LogMel(nn.Module):
    """Waveforms (B, T) with lengths -> per-utterance normalised log-mel frames (B, N, n_mels) and frame counts.

    `num_frames(T) = 1 + (max(T, win) - win) // hop`: the STFT is uncentred and a waveform shorter than one
    window is zero-extended to one frame. Each mel channel is normalised to zero mean and unit variance over
    the utterance's real frames (cepstral mean and variance normalisation); padded frames come out as 0.
    """

    def __init__(self, cfg: SpeechTowerConfig) -> None:
        super().__init__()
        self.win = cfg.win_length
        self.hop = cfg.hop_length
        self.floor = cfg.log_floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=self.win,
            win_length=self.win,
            hop_length=self.hop,
            n_mels=cfg.n_mels,
            center=False,  # centring would reflect-pad the end of the batch, not of each utterance
            power=2.0,
        )

    def num_frames(self, samples: Tensor) -> Tensor:
        return 1 + (samples.clamp_min(self.win) - self.win) // self.hop

    def forward(self, waveforms: Tensor, lengths: Tensor, crop: bool = False) -> tuple[Tensor, Tensor]:
        """`crop`: to the longest utterance's frames (read from the device); else the frames of the padded
        width, known on the host (the collates pad to the longest waveform: the same frames)."""
        frames = self.num_frames(lengths)
        longest = int(lengths.max()) if crop else waveforms.shape[1]
        needed = self.win + (max(longest, self.win) - self.win) // self.hop * self.hop
        if waveforms.shape[1] < needed:
            waveforms = nn.functional.pad(waveforms, (0, needed - waveforms.shape[1]))
        # features in float32 even under autocast: bf16 would quantise the mel energies
        with torch.autocast(waveforms.device.type, enabled=False):
            x = self.mel(waveforms[:, :needed].float()).clamp_min(self.floor).log().transpose(1, 2)
        mask = lengths_to_mask(frames, x.shape[1]).unsqueeze(-1)  # (B, N, 1)
        count = frames[:, None, None].to(x.dtype)
        mean = (x * mask).sum(1, keepdim=True) / count
        var = (((x - mean) * mask) ** 2).sum(1, keepdim=True) / count
        return (x - mean) * torch.rsqrt(var + 1e-5) * mask, frames


class ConvSubsampling(nn.Module):
    """Two 3x3 stride-2 convolutions with ReLU over (time, mel), then a linear map to the model width.

    With padding 1 each halves a length L to ceil(L / 2), so the output has ceil(ceil(N / 2) / 2) frames.
    """

    def __init__(self, n_mels: int, channels: int, hidden_size: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
        self.proj = nn.Linear(channels * self.output_length(self.output_length(n_mels)), hidden_size)

    @staticmethod
    def output_length(length: Tensor | int) -> Tensor | int:
        return (length - 1) // 2 + 1  # floor((L + 2·1 - 3) / 2) + 1

    def forward(self, x: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N, F) features with (B,) lengths -> (B, N', hidden) and (B,) lengths N'."""
        x = x.unsqueeze(1)  # (B, 1, N, F): time is the conv's height
        for conv in (self.conv1, self.conv2):
            x = x * lengths_to_mask(lengths, x.shape[2])[:, None, :, None].to(x.dtype)
            x = torch.relu(conv(x))
            lengths = self.output_length(lengths)
        b, c, n, f = x.shape
        return self.proj(x.permute(0, 2, 1, 3).reshape(b, n, c * f)), lengths


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """PE(p, 2i) = sin(p / 10000^(2i/d)), PE(p, 2i+1) = cos(p / 10000^(2i/d)) (Vaswani et al. 2017): (length, dim)."""
    position = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    inv_freq = torch.exp(
        torch.arange(0, dim, 2, device=device, dtype=torch.float32) * (-math.log(10000.0) / dim)
    )
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(position * inv_freq)
    pe[:, 1::2] = torch.cos(position * inv_freq[: dim // 2])
    return pe


class MaskedConformer(nn.Module):
    """`torchaudio.models.Conformer` with padded frames zeroed in front of every depthwise convolution.

    torchaudio masks attention by length, but its convolution module slides its kernel across the padding,
    so an utterance's last frames would see whatever the padding holds after the first block. A pre-hook on
    each depthwise convolution zeroes it, as the convolution's own zero padding would for a lone utterance.
    The BatchNorm of the convolution module counts padded frames in its training statistics; in eval mode it
    is per-frame and exact.
    """

    def __init__(self, cfg: EncoderConfig, kernel_size: int) -> None:
        super().__init__()
        self.conformer = torchaudio.models.Conformer(
            input_dim=cfg.hidden_size,
            num_heads=cfg.num_heads,
            ffn_dim=cfg.intermediate_size,
            num_layers=cfg.num_layers,
            depthwise_conv_kernel_size=kernel_size,
            dropout=cfg.dropout,
        )
        self._mask: Tensor | None = None
        for layer in self.conformer.conformer_layers:
            depthwise = layer.conv_module.sequential[2]  # pointwise, GLU, *depthwise*, norm, SiLU, pointwise
            depthwise.register_forward_pre_hook(self._zero_padding)

    def _zero_padding(self, module: nn.Module, args: tuple[Tensor]) -> tuple[Tensor] | None:
        if self._mask is None:
            return None
        (x,) = args  # (B, C, N)
        return (x * self._mask[:, None, :].to(x.dtype),)

    def forward(self, x: Tensor, key_padding_mask: Tensor) -> Tensor:
        self._mask = key_padding_mask
        try:
            out, _ = self.conformer(x, key_padding_mask.sum(1))
        finally:
            self._mask = None
        return out


class SpeechTower(nn.Module):
    """Waveforms (B, T) + lengths (B,) in samples -> (B, embed_dim) utterance embeddings (not normalised)."""

    float32_inputs = True
    """The log-mel front end reads the waveforms in float32: a mixed-precision wrapper must not cast them."""

    def __init__(
        self, cfg: SpeechTowerConfig, embed_dim: int, encoder_cfg: EncoderConfig | None = None
    ) -> None:
        """`encoder_cfg` replaces the encoder shape `cfg.encoder_config()` gives (tests use other settings)."""
        super().__init__()
        self.cfg = cfg
        encoder_cfg = encoder_cfg or cfg.encoder_config()
        hidden = encoder_cfg.hidden_size
        self.features = LogMel(cfg)
        self.spec_augment = nn.Sequential(
            *(
                torchaudio.transforms.FrequencyMasking(cfg.freq_mask_width, iid_masks=True)
                for _ in range(cfg.freq_masks)
            ),
            *(
                torchaudio.transforms.TimeMasking(cfg.time_mask_width, iid_masks=True)
                for _ in range(cfg.time_masks)
            ),
        )
        self.subsample = ConvSubsampling(cfg.n_mels, cfg.conv_channels, hidden)
        self.input_scale = math.sqrt(hidden)
        self.dropout = nn.Dropout(encoder_cfg.dropout)
        if cfg.encoder == "transformer":
            self.encoder: nn.Module = TransformerEncoder(encoder_cfg)
            self.encoder.gradient_checkpointing = cfg.gradient_checkpointing
        elif cfg.encoder == "conformer":
            self.encoder = MaskedConformer(encoder_cfg, cfg.conformer_kernel_size)
        else:
            raise ValueError(f"unknown speech encoder {cfg.encoder!r}; choose transformer or conformer")
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's blocks (Transformer or Conformer), first to last."""
        if isinstance(self.encoder, MaskedConformer):
            return self.encoder.conformer.conformer_layers
        return self.encoder.blocks

    def output_lengths(self, samples: Tensor) -> Tensor:
        """Encoder frames per utterance: 4x fewer than the 10 ms log-mel frames, rounded up."""
        frames = self.features.num_frames(samples)
        return ConvSubsampling.output_length(ConvSubsampling.output_length(frames))

    def encode(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states (B, N', hidden) and their (B, N') mask, True at real frames."""
        # torchaudio's Conformer wants exactly the longest utterance's frames (and reads their count itself)
        x, frames = self.features(waveforms, lengths, crop=isinstance(self.encoder, MaskedConformer))
        if self.training and len(self.spec_augment):
            # (B, F, N) for torchaudio; a mask landing on padding is harmless: the subsampling re-zeroes it
            x = self.spec_augment(x.transpose(1, 2)).transpose(1, 2)
        # float32 features into the subsampling in its weights' dtype (bf16 when FSDP2 gathers them so)
        x, frames = self.subsample(x.to(self.subsample.conv1.weight.dtype), frames)
        mask = lengths_to_mask(frames, x.shape[1])
        # scaled by √d as in the Transformer paper, so the positions do not drown the content at init
        x = x * self.input_scale + sinusoidal_positions(x.shape[1], x.shape[2], x.device).to(x.dtype)
        x = self.dropout(x)
        return self.encoder(x, mask), mask

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        hidden, mask = self.encode(waveforms, lengths)
        return self.proj(masked_mean_pool(hidden, mask))


def build_speech_tower(cfg: SpeechTowerConfig, embed_dim: int) -> SpeechTower | PretrainedSpeechTower:
    """The speech tower of `cfg`: ours from scratch (log-mel front end), or a pretrained wav2vec 2.0 / HuBERT /
    WavLM from a Hugging Face folder (init.source hf) or a torchaudio architecture and state dict (torchaudio).
    Every one takes raw waveforms and their lengths."""
    init = cfg.init
    if init.source == "scratch":
        return SpeechTower(cfg, embed_dim)
    if init.source not in ("hf", "torchaudio"):
        raise ValueError(
            f"model.speech.init.source {init.source!r} is not a speech source; use scratch, hf or torchaudio"
        )
    if not init.path:
        raise ValueError(f"model.speech.init.source {init.source} needs model.speech.init.path")
    if init.source == "hf":
        tower: PretrainedSpeechTower = HFSpeechTower(init.path, embed_dim)
        if cfg.gradient_checkpointing:
            tower.model.gradient_checkpointing_enable()
        return tower
    if not init.name:
        raise ValueError(
            "model.speech.init.source torchaudio needs model.speech.init.name, the architecture (e.g. hubert_base)"
        )
    return TorchaudioSpeechTower(init.name, init.path, embed_dim, cfg.arch_args)
