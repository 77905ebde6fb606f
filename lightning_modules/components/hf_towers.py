"""Pretrained text and speech towers from local files: any Hugging Face encoder folder (BERT, RoBERTa, XLM-R
...), wav2vec 2.0 / HuBERT / WavLM as a Hugging Face folder or as a torchaudio architecture with its state
dict.

The reference libraries' model classes run the encoders; these wrappers add pooling over real tokens or
frames, a projection into the joint space and `blocks` (for `unlocked_layers`). Nothing is downloaded
(`local_files_only=True`, `weights_only=True`). Speech towers take raw 16 kHz waveforms (B, T) and their
lengths; padding never changes an embedding: base models, whose feature encoder's GroupNorm spans the whole
time axis, run one utterance at a time, the layer-normalised ones batched with the attention mask."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
import torchaudio
from torch import Tensor, nn

from lightning_modules.components.encoder import last_token_pool, lengths_to_mask, masked_mean_pool
from lightning_modules.components.towers import load_matching_state_dict, read_hf_config, read_state_dict

log = logging.getLogger(__name__)

HF_SPEECH_TYPES = ("wav2vec2", "hubert", "wavlm")
TORCHAUDIO_SPEECH = (
    "wav2vec2_model",
    "wav2vec2_base",
    "wav2vec2_large",
    "wav2vec2_large_lv60k",
    "hubert_base",
    "hubert_large",
    "hubert_xlarge",
    "wavlm_model",
    "wavlm_base",
    "wavlm_large",
)


def _load_hf_model(folder: Path, what: str, **overrides: Any) -> nn.Module:
    """`AutoModel` from a local folder, refusing weights that do not fit its config.json in one line.

    transformers would re-initialise missing tensors at random with only a logged report; a tower that starts
    partly random is not what the user asked for.
    """
    from transformers import AutoModel

    try:
        model, info = AutoModel.from_pretrained(
            folder, local_files_only=True, output_loading_info=True, ignore_mismatched_sizes=True, **overrides
        )
    except OSError as err:  # transformers names the missing weights file in several lines
        raise FileNotFoundError(
            f"{folder}: cannot load the {what} weights ({str(err).splitlines()[0]})"
        ) from None
    mismatched = {key: (theirs, ours) for key, theirs, ours in info["mismatched_keys"]}
    if mismatched or info["missing_keys"]:
        order = list(model.state_dict())
        first = ""
        if mismatched:
            key = min(mismatched, key=lambda k: order.index(k) if k in order else len(order))
            theirs, ours = mismatched[key]
            first = f"first mismatching tensor {key}: {tuple(theirs)} in the checkpoint, {tuple(ours)} in the model; "
        raise ValueError(
            f"{folder}: the weights do not fit its config.json: {first}{len(info['missing_keys'])} missing and "
            f"{len(info['unexpected_keys'])} unexpected keys; give the folder save_pretrained wrote, unchanged"
        )
    # from_pretrained leaves the model in eval mode; a tower starts in train mode like any new nn.Module
    return model.train()


def _module_list(model: nn.Module, names: tuple[str, ...]) -> nn.ModuleList:
    """The first of `names` that is a ModuleList in `model` (where the architecture keeps its layers)."""
    modules = dict(model.named_modules())
    for name in names:
        if isinstance(modules.get(name), nn.ModuleList):
            return modules[name]
    raise ValueError(f"{type(model).__name__}: no Transformer block list at {' or '.join(names)}")


# -- text ------------------------------------------------------------------------------------------


class HFTextTower(nn.Module):
    """Token ids + mask -> a Hugging Face encoder's last hidden states -> pooled -> projection (not normalised).

    Pooling: 'first' (the first token's state: [CLS] or <s>), 'cls' (the model's own pooler when it has one),
    'mean' (over real tokens) or 'eot' (the last real token's state, as CLIP's text tower).
    """

    def __init__(self, folder: str | Path, embed_dim: int, pooling: str = "first") -> None:
        super().__init__()
        if pooling not in ("first", "cls", "mean", "eot"):
            raise ValueError(f"unknown pooling {pooling!r}; choose first, cls, mean or eot")
        folder = Path(folder)
        config = read_hf_config(folder, "text encoder")
        # the pooler is only built (and only trains) when it is the pooling: unused, DDP would wait for its gradient
        overrides = {} if pooling == "cls" else {"add_pooling_layer": False}
        try:
            self.model = _load_hf_model(folder, "text encoder", **overrides)
        except TypeError:  # encoders without a pooler take no add_pooling_layer
            self.model = _load_hf_model(folder, "text encoder")
        if pooling == "cls" and getattr(self.model, "pooler", None) is None:
            raise ValueError(
                f"{folder}: model.text.pooling cls needs a model with a pooler; use first, mean or eot"
            )
        self.pooling = pooling
        self.vocab_size = int(config["vocab_size"])
        self.max_len = int(config.get("max_position_embeddings") or 512)
        hidden = self.model.config.hidden_size
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)

    @property
    def blocks(self) -> nn.ModuleList:
        """The encoder's Transformer layers, first to last."""
        return _module_list(self.model, ("encoder.layer", "encoder.layers", "layers", "layer"))

    def _run(self, input_ids: Tensor, attention_mask: Tensor) -> Any:
        return self.model(input_ids=input_ids, attention_mask=attention_mask.long())

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The model's last hidden states (B, L, hidden)."""
        return self._run(input_ids, attention_mask).last_hidden_state

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        out = self._run(input_ids, attention_mask)
        hidden, mask = out.last_hidden_state, attention_mask.bool()
        if self.pooling == "first":
            pooled = hidden[:, 0]
        elif self.pooling == "cls":
            pooled = out.pooler_output
        elif self.pooling == "mean":
            pooled = masked_mean_pool(hidden, mask)
        else:
            pooled = last_token_pool(hidden, mask)
        return self.proj(pooled)


# -- speech ----------------------------------------------------------------------------------------


def conv_output_lengths(lengths: Tensor, kernels: list[int], strides: list[int]) -> Tensor:
    """Frames a stack of unpadded 1-D convolutions gives for `lengths` samples: L <- floor((L - k) / s) + 1."""
    for k, s in zip(kernels, strides, strict=True):
        lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
    return lengths.clamp_min(0)


class PretrainedSpeechTower(nn.Module):
    """Raw waveforms (B, T) + lengths (B,) -> a pretrained speech encoder's hidden states -> mean over real frames
    -> projection (not normalised). Subclasses say how the encoder runs (`_hidden`) and where its blocks are."""

    kernels: list[int]
    strides: list[int]
    per_utterance: bool
    normalize: bool

    def _init_head(self, hidden: int, embed_dim: int, feature_encoder: nn.Module) -> None:
        self.proj = nn.Linear(hidden, embed_dim, bias=False)
        nn.init.normal_(self.proj.weight, std=hidden**-0.5)
        # GroupNorm in the feature encoder normalises over time: padding would leak into every frame
        self.per_utterance = any(isinstance(m, nn.GroupNorm) for m in feature_encoder.modules())

    def output_lengths(self, samples: Tensor) -> Tensor:
        """Encoder frames per utterance (20 ms each for the 16 kHz models)."""
        return conv_output_lengths(samples, self.kernels, self.strides)

    def _hidden(self, waveforms: Tensor, mask: Tensor | None) -> Tensor:
        raise NotImplementedError

    def encode(self, waveforms: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Hidden states (B, N, hidden) of the encoder's last layer and their (B, N) mask, True at real frames."""
        lengths = lengths.to(waveforms.device)
        sample_mask = lengths_to_mask(lengths, waveforms.shape[1])
        waveforms = waveforms * sample_mask
        if self.normalize:  # the feature extractor's do_normalize: zero mean, unit variance over real samples
            count = lengths.clamp_min(1)[:, None].to(waveforms.dtype)
            mean = waveforms.sum(1, keepdim=True) / count
            var = (((waveforms - mean) * sample_mask) ** 2).sum(1, keepdim=True) / count
            waveforms = (waveforms - mean) * torch.rsqrt(var + 1e-7) * sample_mask
        frames = self.output_lengths(lengths)
        if self.per_utterance:
            outs = [self._hidden(waveforms[i : i + 1, : int(n)], None)[0] for i, n in enumerate(lengths)]
            width = max(o.shape[0] for o in outs)
            hidden = torch.stack([nn.functional.pad(o, (0, 0, 0, width - o.shape[0])) for o in outs])
        else:
            hidden = self._hidden(waveforms, sample_mask)
        mask = lengths_to_mask(frames, hidden.shape[1])
        return hidden, mask

    def forward(self, waveforms: Tensor, lengths: Tensor) -> Tensor:
        hidden, mask = self.encode(waveforms, lengths)
        return self.proj(masked_mean_pool(hidden, mask))


class HFSpeechTower(PretrainedSpeechTower):
    """wav2vec 2.0, HuBERT or WavLM from a Hugging Face folder (`Wav2Vec2Model`, `HubertModel`, `WavLMModel`)."""

    def __init__(self, folder: str | Path, embed_dim: int) -> None:
        super().__init__()
        folder = Path(folder)
        config = read_hf_config(folder, "wav2vec 2.0 / HuBERT / WavLM")
        if config.get("model_type") not in HF_SPEECH_TYPES:
            raise ValueError(
                f"{folder}/config.json has model_type {config.get('model_type')!r}: give a wav2vec2, hubert or "
                "wavlm folder"
            )
        # layerdrop skips whole layers at random: under DDP their parameters would miss gradients
        self.model = _load_hf_model(folder, "speech encoder", layerdrop=0.0)
        self.kernels, self.strides = list(config["conv_kernel"]), list(config["conv_stride"])
        preprocessor = folder / "preprocessor_config.json"
        self.normalize = (
            bool(json.loads(preprocessor.read_text()).get("do_normalize", False))
            if preprocessor.is_file()
            else False
        )
        self._init_head(self.model.config.hidden_size, embed_dim, self.model.feature_extractor)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.layers

    def _hidden(self, waveforms: Tensor, mask: Tensor | None) -> Tensor:
        return self.model(waveforms, attention_mask=None if mask is None else mask.long()).last_hidden_state


class TorchaudioSpeechTower(PretrainedSpeechTower):
    """A torchaudio wav2vec 2.0 / HuBERT / WavLM architecture (`torchaudio.models.<name>(**arch_args)`) with the
    weights of a local state-dict file."""

    def __init__(
        self, name: str, path: str | Path, embed_dim: int, arch_args: dict[str, Any] | None = None
    ) -> None:
        super().__init__()
        if name not in TORCHAUDIO_SPEECH:
            raise ValueError(
                f"unknown torchaudio speech architecture {name!r}; choose one of {', '.join(TORCHAUDIO_SPEECH)}"
            )
        self.model = getattr(torchaudio.models, name)(**(arch_args or {}))
        load_matching_state_dict(self.model, read_state_dict(path), str(path))
        convs = [block.conv for block in self.model.feature_extractor.conv_layers]
        self.kernels = [c.kernel_size[0] for c in convs]
        self.strides = [c.stride[0] for c in convs]
        self.normalize = False  # torchaudio's pipelines feed the waveform as it is
        hidden = self.model.encoder.feature_projection.projection.out_features
        self._init_head(hidden, embed_dim, self.model.feature_extractor)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.encoder.transformer.layers

    def _hidden(self, waveforms: Tensor, mask: Tensor | None) -> Tensor:
        lengths = None if mask is None else mask.sum(1)
        hidden, _ = self.model(waveforms, lengths)
        return hidden
