"""`cli.py export` of models that did not start from a whole CLIP: a scratch image-text model as a transformers
`VisionTextDualEncoderModel` or as an encoder-pair folder, a speech-text model as an encoder-pair folder. Each
folder is loaded by the reference library (transformers' Auto classes, the README's snippet) and its embeddings
are compared with the trained model's (fp32; 1e-4 guards the attention kernels' different summation orders:
SDPA on unpadded tokens here, eager or SDPA with a padding mask in transformers)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from torch import Tensor

from cli import main
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.hf_export import ExportError, export_image_text
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.speech_tower import SpeechTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.speech_text_module import SpeechTextModule
from tests.builders.pretrained import bert_folder, roberta_folder, speech_folder
from tests.helpers import REPO, cli_args

TOL = 1e-4
CAPTIONS = [
    "a red circle on the left",
    "two blue squares above a green triangle",
    "a small yellow star",
    "the big purple circle at the bottom right of the image",
]
TINY_IMAGE = ImageTowerConfig("vit_tiny", image_size=32, patch_size=8, layers=1, width=32, heads=2)
TINY_TEXT = dict(size="tiny", layers=1, hidden=32, heads=2, max_len=16)


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(CAPTIONS * 4, vocab_size=80, min_frequency=1)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """Weights moved off their initial values (LayerNorms, zero biases, the identity-free projections), as
    training leaves them: an export that dropped or mixed up a tensor would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return module.eval()


def save_ckpt(module: torch.nn.Module, tokenizer: TextTokenizer, path: Path, context_length: int) -> Path:
    """What a Trainer's checkpoint holds that `export` reads: weights, hyperparameters, system, tokenizer and
    the DataModule's hyperparameters."""
    torch.save(
        {
            "state_dict": module.state_dict(),
            "hyper_parameters": dict(module.hparams),
            "system_class_path": f"{type(module).__module__}.{type(module).__qualname__}",
            "tokenizer_json": tokenizer.tokenizer.to_str(),
            "datamodule_hyper_parameters": {"context_length": context_length},
        },
        path,
    )
    return path


def readme_snippet(folder: Path) -> dict:
    """Run the README's snippet against `folder`; its functions and objects."""
    code = re.search(r"```python\n(.*?)```", (folder / "README.md").read_text(), re.S).group(1)
    assert 'Path(".")' in code
    scope: dict = {}
    exec(code.replace('Path(".")', f"Path({str(folder)!r})"), scope)  # noqa: S102 - the snippet under test
    return scope


def max_diff(a: Tensor, b: Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


def image_text(text: dict, image: ImageTowerConfig = TINY_IMAGE) -> ImageTextModule:
    torch.manual_seed(0)
    module = ImageTextModule(image=image, text=TextTowerConfig(**text), vocab_size=80, embed_dim=16)
    return perturbed(module)


# image-text -----------------------------------------------------------------------------------------------------
def test_scratch_clip_exports_as_an_encoder_pair_the_snippet_loads(tokenizer, tmp_path: Path) -> None:
    """A text tower pooled by its first token ([CLS] state, the default) is no VisionTextDualEncoderModel: the
    export is an encoder pair whose README snippet embeds as the model does."""
    module = image_text(TINY_TEXT)
    ckpt = save_ckpt(module, tokenizer, tmp_path / "c.ckpt", context_length=12)
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    assert {p.name for p in out.iterdir()} >= {"image_encoder", "text_encoder", "projections.safetensors"}
    snippet = readme_snippet(out)
    assert isinstance(snippet["image_encoder"], transformers.ViTModel)
    assert isinstance(snippet["text_encoder"], transformers.BertModel)
    # the exported tokenizer gives the towers' ids: [CLS] text [SEP], truncated to the context length, padded
    ours = tokenizer(CAPTIONS, 12)
    theirs = snippet["tokenizer"](CAPTIONS, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(theirs["input_ids"], ours["input_ids"])
    assert torch.equal(theirs["attention_mask"].bool(), ours["attention_mask"])
    pixels = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(snippet["embed_texts"](CAPTIONS), module.pair.text(**ours)) <= TOL
        assert max_diff(snippet["embed_images"](pixels), module.pair.image(pixels)) <= TOL
        assert float(snippet["heads"]["logit_scale"].exp()) == pytest.approx(
            float(module.logit_scale), rel=1e-6
        )
    with pytest.raises(FileExistsError, match="already exists: give a new path"):
        main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])


def test_cls_pooled_clip_exports_as_a_dual_encoder_auto_classes_load(tokenizer, tmp_path: Path) -> None:
    """With the text tower pooled by BERT's tanh pooler the export is one VisionTextDualEncoderModel, loaded by
    AutoModel and AutoProcessor; its features, logits and preprocessing are the model's."""
    module = image_text({**TINY_TEXT, "pooling": "cls"})
    ckpt = save_ckpt(module, tokenizer, tmp_path / "c.ckpt", context_length=12)
    out = tmp_path / "hf"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    model = transformers.AutoModel.from_pretrained(out).eval()
    processor = transformers.AutoProcessor.from_pretrained(out)
    assert isinstance(model, transformers.VisionTextDualEncoderModel)
    assert isinstance(model.vision_model, transformers.ViTModel)
    images = [(torch.rand(3, 40 + 8 * i, 48) * 255).to(torch.uint8) for i in range(2)]
    batch = processor(text=CAPTIONS, images=images, padding=True, truncation=True, return_tensors="pt")
    ours_ids = tokenizer(CAPTIONS, 12)
    assert torch.equal(batch["input_ids"], ours_ids["input_ids"])
    with torch.no_grad():
        theirs_txt = model.get_text_features(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        theirs_img = model.get_image_features(pixel_values=batch["pixel_values"])
        assert max_diff(theirs_txt.pooler_output, module.pair.text(**ours_ids)) <= TOL
        assert max_diff(theirs_img.pooler_output, module.pair.image(batch["pixel_values"])) <= TOL
        assert float(model.logit_scale.exp()) == pytest.approx(float(module.logit_scale), rel=1e-6)
    # the processor's pixels are the tower's: the tensor-mode evaluation crop, scaled and normalised with its
    # mean and std (2e-2: one grey level over CLIP's std, where two bicubic roundings meet)
    from datamodules.image.coco import eval_transform

    crop = torch.stack([eval_transform(32, "tensor")(im) for im in images])
    assert max_diff(batch["pixel_values"], module.pair.image.normalize(crop)) <= 2e-2


# the RoBERTa case is slow: the encoder-pair path runs in the default run with our BERT
@pytest.mark.parametrize(
    ("kind", "pooling"), [("bert", "cls"), pytest.param("roberta", "mean", marks=pytest.mark.slow)]
)
def test_hugging_face_text_towers_keep_their_class(tmp_path: Path, kind: str, pooling: str) -> None:
    """A text tower started from a Hugging Face folder is written as that folder's class (BertModel in a dual
    encoder, RobertaModel in an encoder pair), with the folder's tokenizer as the DataModule used it."""
    folder = (bert_folder if kind == "bert" else roberta_folder)(tmp_path)
    tok = TextTokenizer.from_file(folder)
    torch.manual_seed(0)
    text = TextTowerConfig(pooling=pooling, init=TowerInit(source="hf", path=str(folder)))
    module = perturbed(ImageTextModule(image=TINY_IMAGE, text=text, vocab_size=tok.vocab_size, embed_dim=16))
    ckpt = save_ckpt(module, tok, tmp_path / "c.ckpt", context_length=12)
    out = tmp_path / "out"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    ids = tok(CAPTIONS, 12)
    with torch.no_grad():
        if kind == "bert":
            model = transformers.AutoModel.from_pretrained(out).eval()
            assert isinstance(model.text_model, transformers.BertModel)
            theirs = model.get_text_features(**ids).pooler_output
        else:
            snippet = readme_snippet(out)
            assert isinstance(snippet["text_encoder"], transformers.RobertaModel)
            assert torch.equal(
                snippet["tokenizer"](CAPTIONS, padding=True, truncation=True, return_tensors="pt")[
                    "input_ids"
                ],
                ids["input_ids"],
            )
            theirs = snippet["embed_texts"](CAPTIONS)
        assert max_diff(theirs, module.pair.text(**ids)) <= TOL


def test_a_hugging_face_clip_image_tower_keeps_its_class(tokenizer, tmp_path: Path) -> None:
    """An image tower started from a Hugging Face CLIP vision folder is written as CLIPVisionModel in the dual
    encoder, its projection after the CLIP pooler."""
    torch.manual_seed(0)
    vision = transformers.CLIPVisionConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    transformers.CLIPVisionModel(vision).save_pretrained(tmp_path / "clip_vision")
    image = ImageTowerConfig(image_size=32, init=TowerInit("hf", str(tmp_path / "clip_vision")))
    module = image_text({**TINY_TEXT, "pooling": "cls"}, image)
    ckpt = save_ckpt(module, tokenizer, tmp_path / "c.ckpt", context_length=12)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    model = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    assert isinstance(model.vision_model, transformers.CLIPVisionModel)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs = model.get_image_features(pixel_values=pixels).pooler_output
        assert max_diff(theirs, module.pair.image(pixels)) <= TOL


def test_forms_and_parts_that_cannot_be_written_are_refused_by_name(tokenizer, tmp_path: Path) -> None:
    first = save_ckpt(image_text(TINY_TEXT), tokenizer, tmp_path / "first.ckpt", 12)
    with pytest.raises(ExportError, match="the text tower pools by 'first'.*use --form pair"):
        main(["export", "--ckpt_path", str(first), "--out", str(tmp_path / "a"), "--form", "dual"])
    assert not (tmp_path / "a").exists()


@pytest.mark.slow  # a ResNet-50-wide network (about 10 s); the ViT exports above are the default-run version
def test_resnet_image_tower_exports_as_a_resnet_model_in_an_encoder_pair(tokenizer, tmp_path: Path) -> None:
    """A ResNet image tower (torchvision's, channels-last, batch norms with running statistics) becomes a
    transformers ResNetModel in an encoder pair; as a dual encoder it is refused by name."""
    import torchvision

    from lightning_modules.components.clip_import import TorchvisionBackbone

    torch.manual_seed(0)
    resnet = torchvision.models.ResNet(torchvision.models.resnet.Bottleneck, [1, 1, 1, 1])
    module = ImageTextModule(image=TINY_IMAGE, text=TextTowerConfig(**TINY_TEXT), vocab_size=80, embed_dim=16)
    image = ImageTowerConfig("resnet50", image_size=32)
    module.pair.image = ImageTower(image, 16, backbone=TorchvisionBackbone(resnet, 32))
    resnet.train()(torch.randn(4, 3, 32, 32))  # running statistics other than the initial ones
    module = perturbed(module)
    with pytest.raises(
        ExportError, match=r"image backbone \(ResNetModel\) pools to \(B, C, 1, 1\).*--form pair"
    ):
        export_image_text(module.pair, tokenizer, 12, tmp_path / "dual", form="dual")
    export_image_text(module.pair, tokenizer, 12, tmp_path / "out")
    snippet = readme_snippet(tmp_path / "out")
    assert isinstance(snippet["image_encoder"], transformers.ResNetModel)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert max_diff(snippet["embed_images"](pixels), module.pair.image(pixels)) <= TOL
    assert not (tmp_path / "dual").exists()


# speech-text ----------------------------------------------------------------------------------------------------
TINY_SPEECH = dict(size="tiny", layers=1, hidden=32, heads=2, conv_channels=8, n_mels=16)


def waves(lengths: list[int]) -> tuple[Tensor, Tensor]:
    torch.manual_seed(2)
    batch = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        batch[i, :n] = torch.randn(n) * 0.1
    return batch, torch.tensor(lengths)


@pytest.mark.parametrize("source", ["scratch", "wav2vec2"])
def test_speech_text_exports_as_an_encoder_pair_the_snippet_loads(
    tokenizer, tmp_path: Path, source: str
) -> None:
    speech = SpeechTowerConfig(**TINY_SPEECH)
    if source != "scratch":
        speech = SpeechTowerConfig(init=TowerInit("hf", str(speech_folder(tmp_path, source))))
    torch.manual_seed(0)
    text = TextTowerConfig(**{**TINY_TEXT, "pooling": "mean"})
    module = perturbed(SpeechTextModule(speech=speech, text=text, vocab_size=80, embed_dim=16))
    ckpt = save_ckpt(module, tokenizer, tmp_path / "c.ckpt", context_length=12)
    out = tmp_path / "out"
    main(["export", "--ckpt_path", str(ckpt), "--out", str(out)])
    snippet = readme_snippet(out)
    if source != "scratch":
        assert isinstance(snippet["speech_encoder"], transformers.Wav2Vec2Model)
    wave, lengths = waves([4000, 2400])
    with torch.no_grad():
        assert max_diff(snippet["embed_speech"](wave, lengths), module.pair.speech(wave, lengths)) <= TOL
        assert max_diff(snippet["embed_texts"](CAPTIONS), module.pair.text(**tokenizer(CAPTIONS, 12))) <= TOL


# the quickstart configs -----------------------------------------------------------------------------------------
def quickstart_model(task: str) -> dict:
    return yaml.safe_load((REPO / "configs" / task / "quickstart.yaml").read_text())["model"]["init_args"]


def check_export(pair: torch.nn.Module, tokenizer: TextTokenizer, out: Path, context_length: int) -> dict:
    """Max abs differences between the README snippet's embeddings of `out` and those of the contrastive core
    `pair`."""
    snippet = readme_snippet(out)
    ids = tokenizer(CAPTIONS, context_length)
    diffs = {"text": max_diff(snippet["embed_texts"](CAPTIONS), pair.text(**ids))}
    if hasattr(pair, "image"):
        size = pair.image.cfg.image_size
        pixels = torch.randn(2, 3, size, size)
        diffs["image"] = max_diff(snippet["embed_images"](pixels), pair.image(pixels))
    else:
        wave, lengths = waves([16000, 9000])
        diffs["speech"] = max_diff(snippet["embed_speech"](wave, lengths), pair.speech(wave, lengths))
    return diffs


@pytest.mark.slow  # the quickstart sizes (about 5 s each); the tiny towers above are the default-run version
@pytest.mark.parametrize("task", ["clip", "speech"])
def test_quickstart_models_export_with_equal_embeddings(tokenizer, tmp_path: Path, task: str) -> None:
    """The quickstart configs' models (built from their model sections, weights moved as training would)."""
    args = {**quickstart_model(task), "vocab_size": 80}
    torch.manual_seed(0)
    module = perturbed(ImageTextModule(**args) if task == "clip" else SpeechTextModule(**args))
    ckpt = save_ckpt(module, tokenizer, tmp_path / "c.ckpt", context_length=32)
    main(["export", "--ckpt_path", str(ckpt), "--out", str(tmp_path / "out")])
    with torch.no_grad():
        diffs = check_export(module.pair, tokenizer, tmp_path / "out", 32)
    assert max(diffs.values()) <= TOL, diffs


@pytest.mark.slow  # two short trainings (about 70 s together on 2 busy cores)
@pytest.mark.parametrize("task", ["clip", "speech"])
def test_quickstart_runs_export_with_equal_embeddings(tmp_path: Path, task: str) -> None:
    """`cli.py fit` of a quickstart config for two steps, then `cli.py export` of its last.ckpt: the folder the
    reference libraries load embeds as the checkpoint's model does."""
    from datamodules.synthetic.shapes import generate_shapes_coco
    from datamodules.synthetic.tones import generate_tone_librispeech
    from lightning_modules.image_text_module import image_text_from_checkpoint
    from lightning_modules.speech_text_module import speech_text_from_checkpoint

    if task == "clip":
        generate_shapes_coco(tmp_path / "data", n_train=16, n_val=8, image_size=64)
        data = ["--data.loader.batch_size=8"]
    else:
        generate_tone_librispeech(tmp_path / "data", n_train_utts=16, n_val_utts=6)
        data = ["--data.batching.max_duration=6", "--data.batching.max_batch_seconds=8"]
    root = tmp_path / "run"
    main(
        cli_args(
            "fit",
            "--trainer.max_steps=2",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.val_check_interval=2",
            f"--data.root={tmp_path / 'data'}",
            f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
            "--data.loader.num_workers=0",
            *data,
            config=f"{task}/quickstart.yaml",
            root=root,
        )
    )
    last = root / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "out")])
    load = image_text_from_checkpoint if task == "clip" else speech_text_from_checkpoint
    pair, ckpt = load(last, "test")
    with torch.no_grad():
        diffs = check_export(pair, TextTokenizer.carried_by(ckpt, str(last)), tmp_path / "out", 32)
    assert max(diffs.values()) <= TOL, diffs
