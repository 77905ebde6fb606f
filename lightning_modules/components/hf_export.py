"""Export of any trained image-text or speech-text pair as folders the reference libraries load.

An image-text pair whose towers both pool as transformers does (a ViT or a Hugging Face CLIP vision tower, a
text tower with `pooling: cls`) becomes one `VisionTextDualEncoderModel` folder; any other pair, speech-text
included, becomes an encoder pair: two transformers folders, the projections and temperature in
projections.safetensors, the pooling in export.json, and a README.md whose snippet loads and embeds. Our BERT
is written as `BertModel`, a torchvision ViT as `ViTModel`, a ResNet as `ResNetModel`; Hugging Face towers
keep their class. Parts transformers has no class for are refused with an error naming the part. See
`docs/pretrained.md`."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck, ResNet
from torchvision.models.vision_transformer import VisionTransformer

from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.clip_import import HFVision, TorchvisionBackbone
from lightning_modules.components.hf_interop import bert_model_state_to_hf, config_to_hf
from lightning_modules.components.hf_towers import HFSpeechTower, HFTextTower, TorchaudioSpeechTower
from lightning_modules.components.image_tower import ImageTower
from lightning_modules.components.speech_tower import SpeechTower
from lightning_modules.components.text_tower import TextTower

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A part of a model that the export format cannot hold; the message names it."""


def refuse_existing(out: Path) -> None:
    """Users' files are never overwritten: an export writes only a new folder."""
    if out.exists():
        raise FileExistsError(f"{out} already exists: give a new path for the export")


def _plain(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", torch.float32).clone(memory_format=torch.contiguous_format)


# towers as transformers models ---------------------------------------------------------------------------------
def vit_to_hf(vit: VisionTransformer) -> nn.Module:
    """A torchvision `VisionTransformer` (heads removed) as transformers' `ViTModel` with the same forward: the
    pooler is an identity (linear activation), so `pooler_output` is the final-LayerNorm class-token state that
    torchvision's ViT returns."""
    import transformers

    width = vit.hidden_dim
    layers = list(vit.encoder.layers)
    config = transformers.ViTConfig(
        hidden_size=width,
        num_hidden_layers=len(layers),
        num_attention_heads=layers[0].self_attention.num_heads if layers else 1,
        intermediate_size=layers[0].mlp[0].out_features if layers else 4 * width,
        hidden_act="gelu",  # torchvision's MLPBlock: exact GELU
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        layer_norm_eps=vit.encoder.ln.eps,
        image_size=vit.image_size,
        patch_size=vit.patch_size,
        num_channels=3,
        qkv_bias=True,
        pooler_output_size=width,
        pooler_act="linear",
    )
    model = transformers.ViTModel(config, add_pooling_layer=True)
    sd = vit.state_dict()
    state = {
        "embeddings.cls_token": sd["class_token"],
        "embeddings.position_embeddings": sd["encoder.pos_embedding"],
        "embeddings.patch_embeddings.projection.weight": sd["conv_proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd["conv_proj.bias"],
        "layernorm.weight": sd["encoder.ln.weight"],
        "layernorm.bias": sd["encoder.ln.bias"],
        "pooler.dense.weight": torch.eye(width),
        "pooler.dense.bias": torch.zeros(width),
    }
    for i in range(len(layers)):
        ours, theirs = f"encoder.layers.encoder_layer_{i}.", f"layers.{i}."
        for p in ("weight", "bias"):
            q, k, v = sd[f"{ours}self_attention.in_proj_{p}"].chunk(3, 0)
            state.update(
                {
                    f"{theirs}attention.q_proj.{p}": q,
                    f"{theirs}attention.k_proj.{p}": k,
                    f"{theirs}attention.v_proj.{p}": v,
                    f"{theirs}attention.o_proj.{p}": sd[f"{ours}self_attention.out_proj.{p}"],
                    f"{theirs}layernorm_before.{p}": sd[f"{ours}ln_1.{p}"],
                    f"{theirs}layernorm_after.{p}": sd[f"{ours}ln_2.{p}"],
                    f"{theirs}mlp.fc1.{p}": sd[f"{ours}mlp.0.{p}"],
                    f"{theirs}mlp.fc2.{p}": sd[f"{ours}mlp.3.{p}"],
                }
            )
    _load_exactly(model, state, "the ViT image backbone")
    return model.eval()


def resnet_to_hf(resnet: ResNet) -> nn.Module:
    """A torchvision `ResNet` (fc removed) as transformers' `ResNetModel`: the same stem, stages and batch norms
    (stride in the 3 x 3 convolution, torchvision's v1.5), its `pooler_output` (B, C, 1, 1) the global average
    pool that torchvision's ResNet returns flattened."""
    import transformers

    stages = [resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]
    bottleneck = isinstance(stages[0][0], Bottleneck)
    last_bn = "bn3" if bottleneck else "bn2"
    config = transformers.ResNetConfig(
        num_channels=3,
        embedding_size=resnet.conv1.out_channels,
        hidden_sizes=[getattr(stage[-1], last_bn).num_features for stage in stages],
        depths=[len(stage) for stage in stages],
        layer_type="bottleneck" if bottleneck else "basic",
        hidden_act="relu",
        downsample_in_first_stage=False,
        downsample_in_bottleneck=False,
    )
    model = transformers.ResNetModel(config)
    sd = resnet.state_dict()
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")

    def conv_bn(theirs: str, conv: str, norm: str) -> dict[str, Tensor]:
        pair = {f"{theirs}.convolution.weight": sd[f"{conv}.weight"]}
        pair.update({f"{theirs}.normalization.{k}": sd[f"{norm}.{k}"] for k in bn})
        return pair

    state = conv_bn("embedder.embedder", "conv1", "bn1")
    convs = ("conv1", "conv2", "conv3") if bottleneck else ("conv1", "conv2")
    for s, stage in enumerate(stages):
        for b, block in enumerate(stage):
            ours, theirs = f"layer{s + 1}.{b}", f"encoder.stages.{s}.layers.{b}"
            for i, conv in enumerate(convs):
                state.update(conv_bn(f"{theirs}.layer.{i}", f"{ours}.{conv}", f"{ours}.bn{i + 1}"))
            if block.downsample is not None:
                state.update(conv_bn(f"{theirs}.shortcut", f"{ours}.downsample.0", f"{ours}.downsample.1"))
    _load_exactly(model, state, "the ResNet image backbone")
    return model.eval()


def bert_to_hf(tower: TextTower) -> nn.Module:
    """Our BERT text encoder as transformers' `BertModel` (with its tanh pooler)."""
    import transformers

    hf_config = config_to_hf(tower.bert.cfg)  # refuses a pre-LN encoder, which BERT's format cannot hold
    hf_config["architectures"] = ["BertModel"]
    del hf_config["model_type"]
    model = transformers.BertModel(transformers.BertConfig(**hf_config), add_pooling_layer=True)
    _load_exactly(model, bert_model_state_to_hf(tower.bert), "the BERT text encoder")
    return model.eval()


def _load_exactly(model: nn.Module, state: dict[str, Tensor], what: str) -> None:
    """Load `state` into `model`, every key and shape matching: a part whose shape the transformers class cannot
    take, or a transformers release that names the weights otherwise, fails here before anything is written."""
    import transformers

    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        key = (shapes or missing or unexpected)[0]
        found = (
            f"{key} is {tuple(state[key].shape)} here, {tuple(own[key].shape)} in {type(model).__name__}"
            if shapes
            else f"{key} {'missing' if missing else 'unexpected'}"
        )
        raise ExportError(
            f"{what} does not fit transformers {transformers.__version__}' {type(model).__name__}: {found}"
        )
    model.load_state_dict({k: _plain(v) for k, v in state.items()}, strict=True)


def hf_tokenizer(tokenizer: TextTokenizer, context_length: int) -> Any:
    """The DataModule's tokenizer as a transformers fast tokenizer: `[CLS] text [SEP]`, truncated to
    `context_length`, right-padded with [PAD], as `TextTokenizer.pack` gives the towers."""
    from transformers import PreTrainedTokenizerFast

    inner = tokenizer.tokenizer
    names = [inner.id_to_token(i) for i in (tokenizer.pad_id, tokenizer.unk_id, tokenizer.cls_id)]
    names += [inner.id_to_token(i) for i in (tokenizer.sep_id, tokenizer.mask_id)]
    pad, unk, cls, sep, mask = names
    clone = type(inner).from_str(inner.to_str())
    clone.no_padding()
    clone.no_truncation()
    return PreTrainedTokenizerFast(
        tokenizer_object=clone,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_max_length=context_length,
        padding_side="right",
        truncation_side="right",
    )


def image_processor(tower: ImageTower) -> Any:
    """A `CLIPImageProcessor` of the tower's evaluation pipeline (`data.resize: tensor`): shorter side to the
    tower's image size with bicubic, centre crop, scaled to [0, 1], normalised with the tower's mean and std."""
    from transformers import CLIPImageProcessor

    size = tower.cfg.image_size
    return CLIPImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=3,  # bicubic
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=[float(v) for v in tower.pixel_mean.flatten()],
        image_std=[float(v) for v in tower.pixel_std.flatten()],
        do_convert_rgb=True,
    )


@dataclass
class EncoderPart:
    """One tower as a transformers model (or None), how its output is pooled and its projection (E, D)."""

    model: nn.Module | None
    pooling: str
    """pooler_output, or first, mean or eot over the model's last hidden states."""
    projection: Tensor
    dual: bool = True
    """Whether VisionTextDualEncoderModel can hold it (its pooled output is (B, D))."""


def image_part(tower: ImageTower) -> EncoderPart:
    """The image tower as a transformers vision model pooled by `pooler_output`, and its projection."""
    backbone = tower.backbone
    inner = backbone.model if isinstance(backbone, TorchvisionBackbone) else backbone
    proj = tower.proj.weight if isinstance(tower.proj, nn.Linear) else None
    if isinstance(inner, VisionTransformer):
        return EncoderPart(vit_to_hf(inner), "pooler_output", _plain(proj))
    if isinstance(inner, ResNet):
        # pooled (B, C, 1, 1): VisionTextDualEncoderModel's projection takes (B, C) only
        return EncoderPart(resnet_to_hf(inner), "pooler_output", _plain(proj), dual=False)
    if isinstance(backbone, HFVision):
        # the CLIP vision projection, then the tower's own where it has one: one linear map
        weight = _plain(backbone.projection.weight) if isinstance(backbone.projection, nn.Linear) else None
        if proj is not None:
            weight = _plain(proj) if weight is None else _plain(proj) @ weight
        if weight is None:
            weight = torch.eye(backbone.output_dim)
        return EncoderPart(backbone.vision_model.eval(), "pooler_output", weight)
    what = type(inner).__name__
    raise ExportError(
        f"the image tower's backbone ({what}) has no transformers class whose pooled output is the tower's: "
        "export the image backbone alone with `--what image` (a torchvision state dict)"
    )


def text_part(tower: nn.Module) -> EncoderPart:
    """The text tower as a transformers model, its pooling and its projection."""
    if isinstance(tower, TextTower):
        model, pooling = bert_to_hf(tower), tower.pooling
    elif isinstance(tower, HFTextTower):
        model, pooling = tower.model.eval(), tower.pooling
    else:
        raise ExportError(
            f"the text tower ({type(tower).__name__}) is neither this framework's BERT nor a Hugging Face encoder"
        )
    return EncoderPart(model, "pooler_output" if pooling == "cls" else pooling, _plain(tower.proj.weight))


# image-text -----------------------------------------------------------------------------------------------------
def export_image_text(
    pair: nn.Module,
    tokenizer: TextTokenizer | None,
    context_length: int,
    out: str | Path,
    form: str = "auto",
) -> Path:
    """Write an image-text pair (`pair.image`, `pair.text`, `pair.logit_scale`) as a transformers folder.

    `form`: dual (a `VisionTextDualEncoderModel`; refused where a tower's pooling is not the class's), pair (the
    encoder-pair folder) or auto (dual where it fits)."""
    import transformers

    out = Path(out)
    refuse_existing(out)
    if tokenizer is None:
        raise ExportError(
            "the checkpoint carries no tokenizer (tokenizer_json): its text tower cannot be exported"
        )
    image, text = image_part(pair.image), text_part(pair.text)
    scale = float(pair.logit_scale.detach().log())  # the clamped temperature the model scores with
    fits = text.pooling == "pooler_output" and image.dual
    if form == "dual" and not image.dual:
        raise ExportError(
            f"the image backbone ({type(image.model).__name__}) pools to (B, C, 1, 1), which "
            "VisionTextDualEncoderModel cannot project; use --form pair"
        )
    if form == "dual" and not fits:
        raise ExportError(
            f"the text tower pools by {text.pooling!r}: VisionTextDualEncoderModel pools text by the tanh pooler "
            "(model.text.pooling cls); use --form pair"
        )
    processor = image_processor(pair.image)
    hf_tok = hf_tokenizer(tokenizer, context_length)
    if fits and form != "pair":
        config = transformers.VisionTextDualEncoderConfig.from_vision_text_configs(
            image.model.config, text.model.config, projection_dim=image.projection.shape[0]
        )
        model = transformers.VisionTextDualEncoderModel(
            config, vision_model=image.model, text_model=text.model
        )
        with torch.no_grad():
            model.visual_projection.weight.copy_(image.projection)
            model.text_projection.weight.copy_(text.projection)
            model.logit_scale.fill_(scale)
        model.save_pretrained(out)
        transformers.VisionTextDualEncoderProcessor(processor, hf_tok).save_pretrained(out)
        return out
    if form == "auto":
        log.info(
            "VisionTextDualEncoderModel cannot hold this model (image %s, text pooled by %r): writing an "
            "encoder pair",
            type(image.model).__name__,
            text.pooling,
        )
    out.mkdir(parents=True)
    image.model.save_pretrained(out / "image_encoder")
    processor.save_pretrained(out / "image_encoder")
    text.model.save_pretrained(out / "text_encoder")
    hf_tok.save_pretrained(out / "text_encoder")
    _write_heads(out, {"image_projection": image.projection, "text_projection": text.projection}, scale)
    spec = {
        "kind": "image-text",
        "image": {"folder": "image_encoder", "pooling": image.pooling},
        "text": {"folder": "text_encoder", "pooling": text.pooling},
    }
    _write_spec(out, spec, IMAGE_TEXT_README)
    return out


# speech-text ----------------------------------------------------------------------------------------------------
def export_speech_text(
    pair: nn.Module, tokenizer: TextTokenizer | None, context_length: int, out: str | Path
) -> Path:
    """Write a speech-text pair (`pair.speech`, `pair.text`, `pair.logit_scale`) as an encoder-pair folder."""
    out = Path(out)
    refuse_existing(out)
    if tokenizer is None:
        raise ExportError(
            "the checkpoint carries no tokenizer (tokenizer_json): its text tower cannot be exported"
        )
    text = text_part(pair.text)
    speech = pair.speech
    if isinstance(speech, HFSpeechTower):
        source = {
            "source": "transformers",
            "normalize": speech.normalize,
            "per_utterance": speech.per_utterance,
        }
    elif isinstance(speech, SpeechTower):
        source = {"source": "multimodal-pretrain", "config": asdict(speech.cfg)}
    elif isinstance(speech, TorchaudioSpeechTower):
        raise ExportError(
            "the speech tower is a torchaudio architecture: torchaudio has no folder format; start from its "
            "Hugging Face folder (model.speech.init.source hf) to export it"
        )
    else:
        raise ExportError(f"the speech tower ({type(speech).__name__}) is of no known kind")
    out.mkdir(parents=True)
    folder = out / "speech_encoder"
    if isinstance(speech, HFSpeechTower):
        speech.model.save_pretrained(folder)
    else:
        folder.mkdir()
        save_file({k: _plain(v) for k, v in speech.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(source["config"], indent=2))
    text.model.save_pretrained(out / "text_encoder")
    hf_tokenizer(tokenizer, context_length).save_pretrained(out / "text_encoder")
    scale = float(pair.logit_scale.detach().log())
    _write_heads(
        out, {"speech_projection": _plain(speech.proj.weight), "text_projection": text.projection}, scale
    )
    spec = {
        "kind": "speech-text",
        "speech": {"folder": "speech_encoder", **{k: v for k, v in source.items() if k != "config"}},
        "text": {"folder": "text_encoder", "pooling": text.pooling},
    }
    _write_spec(out, spec, SPEECH_TEXT_README)
    return out


def _write_heads(out: Path, projections: dict[str, Tensor], log_scale: float) -> None:
    heads = {k: v.contiguous() for k, v in projections.items()}
    heads["logit_scale"] = torch.tensor(log_scale)
    save_file(heads, str(out / "projections.safetensors"), metadata={"format": "pt"})


def _write_spec(out: Path, spec: dict, readme: str) -> None:
    (out / "export.json").write_text(json.dumps(spec, indent=2))
    (out / "README.md").write_text(readme)


# The README snippets: what a user runs, and what tests/models/test_export_any.py runs against the folders.
_POOL = '''def pool(out, mask, how):
    """The tower's pooling over the encoder's output (export.json names it)."""
    if how == "pooler_output":
        return out.pooler_output.flatten(1)
    hidden, mask = out.last_hidden_state, mask.bool()
    if how == "first":
        return hidden[:, 0]
    if how == "mean":
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
    if how == "eot":
        return hidden[torch.arange(len(hidden)), mask.sum(1) - 1]
    raise ValueError(how)


@torch.no_grad()
def embed_texts(texts):
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt", return_token_type_ids=False)
    out = text_encoder(**batch)
    return pool(out, batch["attention_mask"], spec["text"]["pooling"]) @ heads["text_projection"].T
'''

IMAGE_TEXT_README = (
    """# Exported image-text model

Written by `python cli.py export`: an image encoder and a text encoder, each a transformers folder, with the
projections into the joint space and the temperature in `projections.safetensors` and each encoder's pooling in
`export.json`. Embeddings are not normalised; normalise them for cosine scores.

```python
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoImageProcessor, AutoModel, AutoTokenizer

folder = Path(".")  # this folder
spec = json.loads((folder / "export.json").read_text())
heads = load_file(str(folder / "projections.safetensors"))
image_encoder = AutoModel.from_pretrained(folder / "image_encoder").eval()
processor = AutoImageProcessor.from_pretrained(folder / "image_encoder")
text_encoder = AutoModel.from_pretrained(folder / "text_encoder").eval()
tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")


"""
    + _POOL
    + '''

@torch.no_grad()
def embed_images(images):
    """PIL images (or pixel_values already made by the processor) -> (B, E) embeddings."""
    pixels = images if torch.is_tensor(images) else processor(images=images, return_tensors="pt")["pixel_values"]
    out = image_encoder(pixel_values=pixels)
    return pool(out, None, spec["image"]["pooling"]) @ heads["image_projection"].T
```
'''
)

SPEECH_TEXT_README = (
    """# Exported speech-text model

Written by `python cli.py export`: a speech encoder and a text encoder with the projections into the joint space
and the temperature in `projections.safetensors`. The speech encoder is a transformers folder (wav2vec 2.0,
HuBERT, WavLM) or, for a tower trained from scratch, this framework's `SpeechTower` as its config and
safetensors state dict. Waveforms are 16 kHz mono float tensors (B, T), zero-padded, with their lengths in
samples. Embeddings are not normalised; normalise them for cosine scores.

```python
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

folder = Path(".")  # this folder
spec = json.loads((folder / "export.json").read_text())
heads = load_file(str(folder / "projections.safetensors"))
text_encoder = AutoModel.from_pretrained(folder / "text_encoder").eval()
tokenizer = AutoTokenizer.from_pretrained(folder / "text_encoder")
speech_spec = spec["speech"]
if speech_spec["source"] == "transformers":
    speech_encoder = AutoModel.from_pretrained(folder / "speech_encoder").eval()
else:  # this framework's scratch tower (pip install multimodal-pretrain, or a clone on sys.path)
    from lightning_modules.components.speech_tower import SpeechTower, SpeechTowerConfig

    config = json.loads((folder / "speech_encoder" / "config.json").read_text())
    speech_encoder = SpeechTower(SpeechTowerConfig(**config), heads["speech_projection"].shape[0]).eval()
    speech_encoder.load_state_dict(load_file(str(folder / "speech_encoder" / "model.safetensors")))


"""
    + _POOL
    + """

@torch.no_grad()
def embed_speech(waveforms, lengths):
    if speech_spec["source"] != "transformers":
        return speech_encoder(waveforms, lengths)  # its own projection is heads["speech_projection"]
    states = []
    for wave, n in zip(waveforms, lengths.tolist()):  # one utterance at a time: no padding reaches the encoder
        x = wave[None, :n]
        if speech_spec["normalize"]:  # the feature extractor's do_normalize
            x = (x - x.mean()) / torch.sqrt(x.var(unbiased=False) + 1e-7)
        states.append(speech_encoder(x).last_hidden_state[0].mean(0))
    return torch.stack(states) @ heads["speech_projection"].T
```
"""
)
