"""Pretrained image towers and whole-CLIP starts (components/clip_import.py), and tower locking
(components/towers.py): tiny random reference models built with open_clip, transformers and torchvision, saved in
their native format under tmp_path, loaded through our path and compared with the reference forward."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from datamodules.image.clip_tokenizer import ClipTokenizer
from datamodules.image.coco import decode_rgb, eval_transform
from lightning_modules.components.clip_import import load_image_backbone
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.components.towers import CheckpointMismatch, TowerInit
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.image_text_module import ImageTextModule
from tests.helpers import cli_args

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

TINY_OPEN_CLIP = "mmpretrain-test-tiny-vit"
TEXTS = ["a red circle", "two blue squares on a white background", "a green triangle"]


@pytest.fixture(scope="module")
def open_clip_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random open_clip ViT (32 px, 2 layers, width 64) registered under a test name, and its state dict."""
    tmp = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    }
    (tmp / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{TINY_OPEN_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(2.5)  # not the default, so a temperature that is not carried over shows
    torch.save(model.state_dict(), tmp / "tiny_open_clip.pt")
    return tmp / "tiny_open_clip.pt"


@pytest.fixture(scope="module")
def hf_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF CLIPModel folder with CLIP's tokenizer files (CLIP's BPE vocabulary, as open_clip ships it)
    and an image-processor config, written by save_pretrained."""
    folder = tmp_path_factory.mktemp("hf_clip")
    bpe = open_clip.get_tokenizer("ViT-B-32")
    # open_clip names the two special tokens differently from the OpenAI/HF files
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    (folder / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    tok = transformers.CLIPTokenizerFast(str(folder / "vocab.json"), str(folder / "merges.txt"))
    text = transformers.CLIPTextConfig(
        vocab_size=len(bpe.encoder),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32).save_pretrained(folder)
    return folder


def _images(n: int = 3, size: tuple[int, int] = (40, 32)) -> list[Image.Image]:
    """Random RGB images whose short side is already the checkpoints' 32 px (see test docstrings)."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(n)]


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")  # lossless: the reference reads the very same pixels
    return out.getvalue()


def _our_logits(module: ImageTextModule, images: list[Image.Image], tok: ClipTokenizer) -> torch.Tensor:
    """Our zero-shot / retrieval path: the DataModule's decode and eval transform, our tokenizer and encoders."""
    pre = module.clip_preprocess
    transform = eval_transform(pre["image_size"], pre["resize"])
    pixels = torch.stack([transform(decode_rgb(_png(im))) for im in images])
    ids = tok(TEXTS, 77)
    with torch.no_grad():
        return module.logit_scale * module.encode_image(pixels) @ module.encode_text(**ids).T


def test_open_clip_whole_start_gives_reference_logits(open_clip_ckpt: Path) -> None:
    """Image tower, text tower, projections, temperature and tokenizer from one open_clip checkpoint: image-text
    logits equal open_clip's own usage (create_model_and_transforms + its tokenizer) within 1e-4. The images'
    short side is the checkpoint's size, so both pipelines only center-crop and normalise (torchvision's tensor
    resize and PIL's differ by a grey level here and there), and once resized from 64x48: with data.images.resize pil,
    as open_clip's preprocessing resizes with Pillow."""
    model, _, preprocess = open_clip.create_model_and_transforms(
        TINY_OPEN_CLIP, pretrained=str(open_clip_ckpt)
    )
    model.eval()
    ours = ImageTextModule(
        vocab_size=49408,
        embed_dim=32,
        image=ImageTowerConfig("vit_tiny", image_size=32),
        init_clip=TowerInit("open_clip", str(open_clip_ckpt), TINY_OPEN_CLIP),
    ).eval()
    assert float(ours.logit_scale) == pytest.approx(np.exp(2.5), rel=1e-6)
    assert ours.clip_preprocess["resize"] == "pil"
    for images in (_images(), _images(size=(64, 48))):
        with torch.no_grad():
            img = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
            txt = model.encode_text(open_clip.get_tokenizer(TINY_OPEN_CLIP)(TEXTS), normalize=True)
            want = model.logit_scale.exp() * img @ txt.T
        got = _our_logits(ours, images, ClipTokenizer(f"open_clip:{TINY_OPEN_CLIP}"))
        assert (got - want).abs().max().item() <= 1e-4


def test_hf_clip_whole_start_gives_reference_logits(hf_clip_dir: Path) -> None:
    """The same from a HF CLIPModel folder: logits equal CLIPModel's logits_per_image on CLIPProcessor's inputs.
    Here the images are resized too (64x48 -> 43x32, then cropped): transformers resizes with torch, as we do."""
    ref = transformers.CLIPModel.from_pretrained(hf_clip_dir, local_files_only=True).eval()
    processor = transformers.CLIPProcessor.from_pretrained(hf_clip_dir, local_files_only=True)
    images = _images(size=(64, 48))
    inputs = processor(text=TEXTS, images=images, return_tensors="pt", padding="max_length", max_length=77)
    with torch.no_grad():
        want = ref(**inputs).logits_per_image
    ours = ImageTextModule(
        vocab_size=49408,
        embed_dim=32,
        image=ImageTowerConfig("vit_tiny", image_size=32),
        init_clip=TowerInit("hf", str(hf_clip_dir)),
    ).eval()
    got = _our_logits(ours, images, ClipTokenizer(str(hf_clip_dir)))
    assert (got - want).abs().max().item() <= 1e-4


def test_open_clip_and_hf_image_towers_equal_reference_features(
    open_clip_ckpt: Path, hf_clip_dir: Path
) -> None:
    """model.image.init alone: the backbone is the reference vision tower (open_clip's visual, HF's vision model
    with its projection), followed by a new projection into our joint space."""
    pixels = torch.randn(2, 3, 32, 32)
    ref = open_clip.create_model(TINY_OPEN_CLIP, pretrained=str(open_clip_ckpt)).eval()
    tower = ImageTower(
        ImageTowerConfig(image_size=32, init=TowerInit("open_clip", str(open_clip_ckpt), TINY_OPEN_CLIP)), 16
    ).eval()
    with torch.no_grad():
        # ours against the reference: other kernels (memory format, fused attention), fp32 reassociation
        assert torch.allclose(tower.backbone(pixels), ref.encode_image(pixels), atol=1e-5, rtol=1e-5)
        assert tower(pixels).shape == (2, 16)
    # a ViT has one convolution, its patch embedding: it stays in the default memory format
    assert not tower.channels_last and all(p.is_contiguous() for p in tower.parameters())
    hf = transformers.CLIPModel.from_pretrained(hf_clip_dir, local_files_only=True).eval()
    tower = ImageTower(ImageTowerConfig(image_size=32, init=TowerInit("hf", str(hf_clip_dir))), 16).eval()
    with torch.no_grad():
        assert torch.allclose(
            tower.backbone(pixels),
            hf.get_image_features(pixel_values=pixels).pooler_output,
            atol=1e-5,
            rtol=1e-5,
        )
    assert not tower.channels_last and all(p.is_contiguous() for p in tower.parameters())


def test_torchvision_state_dict_gives_reference_features(tmp_path: Path, one_thread: None) -> None:
    """A torchvision state-dict file (what torchvision publishes) under its architecture's name: the tower's
    pooled features equal torchvision's model without its classifier. A ResNet runs channels-last: its
    convolution weights are NHWC, with the file's keys and values; its export is contiguous again (safetensors
    takes it) and loads into torchvision's model."""
    from safetensors.torch import save_file

    from lightning_modules.components.clip_import import export_image_backbone

    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    torch.save(ref.state_dict(), tmp_path / "resnet18.pth")
    tower = ImageTower(
        ImageTowerConfig(
            image_size=64, init=TowerInit("torchvision", str(tmp_path / "resnet18.pth"), "resnet18")
        ),
        8,
    ).eval()
    pixels = torch.randn(2, 3, 64, 64)
    ref.fc = torch.nn.Identity()
    with torch.no_grad():
        want = ref(pixels)
        # ours (channels-last) against the reference: other convolution kernels, fp32 reassociation
        assert torch.allclose(tower.backbone(pixels), want, atol=1e-5, rtol=1e-5)
        # with channels-last input
        assert torch.allclose(tower(pixels), tower.proj(want), atol=1e-5, rtol=1e-5)
    assert len(tower.blocks) == 4
    convs = [m.weight for m in tower.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert tower.channels_last and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not tower.backbone.model.conv1.weight.is_contiguous()  # the 7x7 stem really changed its strides
    ours, theirs = tower.backbone.model.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
    written = torch.load(export_image_backbone(tower.backbone, tmp_path / "export.pt"), weights_only=True)
    assert all(v.is_contiguous() for v in written.values())
    save_file(written, str(tmp_path / "export.safetensors"))
    ref.load_state_dict(written)


def test_open_clip_modified_resnet_runs_channels_last_and_exports_back(
    tmp_path: Path, one_thread: None
) -> None:
    """An open_clip ModifiedResNet ("RN50"-style; tiny: one bottleneck per stage, width 8, 32 px) as the image
    tower: channels-last convolution weights with the checkpoint's keys and values, features equal to open_clip's
    encode_image; written back by the open_clip export, contiguous, it loads into open_clip's model."""
    from lightning_modules.components.clip_import import OpenClipText, export_open_clip

    name = "mmpretrain-test-tiny-rn"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    torch.manual_seed(0)
    ref = open_clip.create_model(name, pretrained=None).eval()
    torch.save(ref.state_dict(), tmp_path / "rn.pt")
    tower = ImageTower(
        ImageTowerConfig(image_size=32, init=TowerInit("open_clip", str(tmp_path / "rn.pt"), name)), 8
    )
    tower.eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.encode_image(pixels)
        # ours (channels-last) against the reference: other convolution kernels, fp32 reassociation
        assert torch.allclose(tower.backbone(pixels), want, atol=1e-5, rtol=1e-5)
        # with channels-last input
        assert torch.allclose(tower(pixels), tower.proj(want), atol=1e-5, rtol=1e-5)
    convs = [m.weight for m in tower.backbone.modules() if isinstance(m, torch.nn.Conv2d)]
    assert tower.channels_last and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not tower.backbone.visual.conv1.weight.is_contiguous()  # the 3x3 stem really changed its strides
    ours, theirs = tower.backbone.visual.state_dict(), ref.visual.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], v) for k, v in theirs.items())
    text = OpenClipText(open_clip.create_model(name, pretrained=None))
    out = export_open_clip(tower.backbone, text, torch.tensor(2.5), tmp_path / "back.pt")
    written = torch.load(out, weights_only=True)
    assert all(v.is_contiguous() for v in written.values())
    back = open_clip.create_model(name, pretrained=None).eval()
    back.load_state_dict(written)
    with torch.no_grad():
        assert torch.equal(back.encode_image(pixels), want)


# bad input ------------------------------------------------------------------------------------------------------
def test_mismatching_checkpoint_names_first_tensor_and_counts(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None, num_classes=10).state_dict(), tmp_path / "r.pth")
    init = TowerInit("torchvision", str(tmp_path / "r.pth"), "resnet18")
    with pytest.raises(
        CheckpointMismatch, match=r"fc.weight: \(10, 512\) in the checkpoint, \(1000, 512\).*0 missing and 0"
    ):
        load_image_backbone(init, 64)
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "r2.pth")
    with pytest.raises(CheckpointMismatch, match="1 missing and 1 unexpected"):
        load_image_backbone(TowerInit("torchvision", str(tmp_path / "r2.pth"), "resnet18"), 64)


def test_pickled_whole_model_is_refused(tmp_path: Path) -> None:
    torch.save(torchvision.models.resnet18(weights=None), tmp_path / "whole.pth")
    with pytest.raises(ValueError, match=r"whole.pth is not a plain state dict"):
        load_image_backbone(TowerInit("torchvision", str(tmp_path / "whole.pth"), "resnet18"), 64)


def test_folder_without_config_json_is_refused(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match="has no config.json: give a Hugging Face CLIPModel / CLIPVisionModel folder"
    ):
        load_image_backbone(TowerInit("hf", str(tmp_path)), 32)


def test_vocabulary_and_size_must_be_the_checkpoints(open_clip_ckpt: Path) -> None:
    init = TowerInit("open_clip", str(open_clip_ckpt), TINY_OPEN_CLIP)
    with pytest.raises(ValueError, match=r"model.vocab_size .* is 30522 but the CLIP checkpoint's is 49408"):
        ImageTextModule(vocab_size=30522, embed_dim=32, image=ImageTowerConfig(image_size=32), init_clip=init)
    with pytest.raises(ValueError, match=r"model.image.image_size is 64 but the CLIP checkpoint's is 32"):
        ImageTextModule(vocab_size=49408, embed_dim=32, image=ImageTowerConfig(image_size=64), init_clip=init)


# locking and learning rates -------------------------------------------------------------------------------------
def _scratch(image: dict, text: dict | None = None, lr: float = 1e-3) -> ImageTextModule:
    return ImageTextModule(
        vocab_size=50,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=16, layers=3, **image),
        text=TextTowerConfig("tiny", layers=2, heads=2, max_len=8, **(text or {})),
        optimizer=OptimizerConfig(lr=lr),
    )


def _trained_names(module: ImageTextModule, tower: str) -> set[str]:
    return {n for n, p in getattr(module.pair, tower).named_parameters() if p.requires_grad}


def test_locked_tower_is_frozen_in_eval_and_outside_autograd() -> None:
    module = _scratch({"lock": True, "dropout": 0.5})
    module.train()
    assert _trained_names(module, "image") == set()
    assert not module.pair.image.training and module.pair.text.training
    pixels = torch.randn(2, 3, 16, 16)
    out = module.pair.image(pixels)
    assert not out.requires_grad
    assert torch.equal(out, module.pair.image(pixels))  # dropout 0.5 is off: the locked tower stays in eval
    assert torch.is_grad_enabled()  # the hooks restore autograd after the locked forward
    groups = OptimizerConfig(lr=1e-3).build(module, 10, fused=False, towers=module.towers())["optimizer"]
    in_groups = {id(p) for g in groups.param_groups for p in g["params"]}
    assert not any(id(p) in in_groups for p in module.pair.image.parameters())


def test_unlocked_layers_train_the_last_blocks_and_the_head() -> None:
    module = _scratch({"lock": True, "unlocked_layers": 1})
    names = _trained_names(module, "image")
    assert names and all(
        n.startswith(("backbone.encoder.layers.encoder_layer_2.", "backbone.encoder.ln.", "proj."))
        for n in names
    )
    assert any(n.startswith("proj.") for n in names) and any(".encoder_layer_2." in n for n in names)
    module.train()
    assert not module.pair.image.blocks[0].training and module.pair.image.blocks[2].training
    with pytest.raises(ValueError, match=r"model.image.unlocked_layers \(4\) exceeds the tower's 3 blocks"):
        _scratch({"lock": True, "unlocked_layers": 4})
    with pytest.raises(ValueError, match=r"model.image.unlocked_layers \(1\) needs model.image.lock: true"):
        _scratch({"unlocked_layers": 1})


def test_lr_mult_sets_each_towers_learning_rate() -> None:
    module = _scratch({"lr_mult": 0.1}, {"lr_mult": 2.0}, lr=1e-3)
    opt = OptimizerConfig(lr=1e-3).build(module, 10, fused=False, towers=module.towers())["optimizer"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lr_of[id(module.pair.image.proj.weight)] == pytest.approx(1e-4)
    assert lr_of[id(module.pair.text.proj.weight)] == pytest.approx(2e-3)
    assert lr_of[id(module.pair.log_scale)] == pytest.approx(1e-3)
    assert len(lr_of) == sum(1 for p in module.parameters() if p.requires_grad)


# export back ----------------------------------------------------------------------------------------------------
def _save_ckpt(module: ImageTextModule, path: Path) -> Path:
    """What a Trainer's checkpoint holds that `export` reads: the weights, the hyperparameters, the system."""
    state = {
        "state_dict": module.state_dict(),
        "hyper_parameters": dict(module.hparams),
        "system_class_path": f"{type(module).__module__}.{type(module).__qualname__}",
    }
    torch.save(state, path)
    return path


def _perturbed(module: ImageTextModule) -> ImageTextModule:
    """Changed weights, as training would leave them, so an export of the original weights would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return module.eval()


def test_open_clip_start_exports_back_to_open_clip(open_clip_ckpt: Path, tmp_path: Path) -> None:
    """`cli.py export` writes the trained whole CLIP as an open_clip state dict; open_clip loads it and embeds
    images and texts as our model does."""
    from cli import main

    init = TowerInit("open_clip", str(open_clip_ckpt), TINY_OPEN_CLIP)
    ours = _perturbed(
        ImageTextModule(vocab_size=49408, embed_dim=32, image=ImageTowerConfig(image_size=32), init_clip=init)
    )
    main(
        [
            "export",
            "--ckpt_path",
            str(_save_ckpt(ours, tmp_path / "c.ckpt")),
            "--out",
            str(tmp_path / "oc.pt"),
        ]
    )
    ref = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    ref.load_state_dict(torch.load(tmp_path / "oc.pt", weights_only=True))
    ref.eval()
    pixels, ids = torch.randn(2, 3, 32, 32), ClipTokenizer(f"open_clip:{TINY_OPEN_CLIP}")(TEXTS, 77)
    with torch.no_grad():
        assert (ours.encode_image(pixels) - ref.encode_image(pixels, normalize=True)).abs().max() <= 1e-5
        assert (
            ours.encode_text(**ids) - ref.encode_text(ids["input_ids"], normalize=True)
        ).abs().max() <= 1e-5
        assert float(ref.logit_scale.exp()) == pytest.approx(float(ours.logit_scale), rel=1e-6)
    with pytest.raises(FileExistsError, match="oc.pt already exists: give a new path"):
        main(["export", "--ckpt_path", str(tmp_path / "c.ckpt"), "--out", str(tmp_path / "oc.pt")])


def test_hf_clip_start_exports_back_to_a_hf_folder(hf_clip_dir: Path, tmp_path: Path) -> None:
    from cli import main

    init = TowerInit("hf", str(hf_clip_dir))
    ours = _perturbed(
        ImageTextModule(vocab_size=49408, embed_dim=32, image=ImageTowerConfig(image_size=32), init_clip=init)
    )
    main(["export", "--ckpt_path", str(_save_ckpt(ours, tmp_path / "c.ckpt")), "--out", str(tmp_path / "hf")])
    ref = transformers.CLIPModel.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tok = transformers.CLIPTokenizerFast.from_pretrained(tmp_path / "hf", local_files_only=True)
    ids = tok(TEXTS, padding="max_length", max_length=77, return_tensors="pt")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        theirs_img = torch.nn.functional.normalize(
            ref.get_image_features(pixel_values=pixels).pooler_output, dim=-1
        )
        theirs_txt = torch.nn.functional.normalize(ref.get_text_features(**ids).pooler_output, dim=-1)
        assert (ours.encode_image(pixels) - theirs_img).abs().max() <= 1e-5
        assert (
            ours.encode_text(ids["input_ids"], ids["attention_mask"].bool()) - theirs_txt
        ).abs().max() <= 1e-5


# learning proof -------------------------------------------------------------------------------------------------
def _lit_run(tiny_clip: dict, tmp_path: Path, steps: int) -> dict[str, float]:
    """A LiT run: the image tower of the briefly trained quickstart model (tiny_clip), exported with
    `cli.py export --what image`, locked; a fresh text tower trained for `steps` steps on the same shapes set."""
    import lightning as L

    from cli import main
    from datamodules.image.coco_datamodule import CocoCaptionsDataModule
    from lightning_modules.components.contrastive import ContrastiveLossConfig
    from tests.helpers import quiet_trainer, single_thread

    image_file = tmp_path / "image_tower.pt"
    main(["export", "--ckpt_path", str(tiny_clip["ckpt"]), "--out", str(image_file), "--what", "image"])
    with single_thread():  # one busy thread beats two fighting other processes for the cores
        L.seed_everything(0)
        dm = CocoCaptionsDataModule(
            str(tiny_clip["root"]),
            context_length=32,
            images={"image_size": 32, "min_scale": 1.0},
            loader={"batch_size": 64, "eval_batch_size": 100, "num_workers": 0},
            tokenizer={"path": str(tiny_clip["tokenizer"]), "cache_dir": str(tmp_path / "cache")},
        )
        module = ImageTextModule(
            vocab_size=dm.vocab_size,
            embed_dim=128,
            image=ImageTowerConfig(
                "vit_tiny", image_size=32, layers=2, init=TowerInit("torchvision", str(image_file)), lock=True
            ),
            text=TextTowerConfig("tiny", heads=2, max_len=32),
            loss=ContrastiveLossConfig(init_logit_scale=10.0),
            optimizer=OptimizerConfig(lr=3e-3, weight_decay=0.05),
        )
        frozen = {k: v.clone() for k, v in module.pair.image.state_dict().items()}
        trainer = quiet_trainer(
            max_steps=steps,
            val_check_interval=steps,
            check_val_every_n_epoch=None,
            num_sanity_val_steps=0,
            enable_checkpointing=False,
        )
        trainer.fit(module, dm)
    # locked: the exported tower's weights are exactly the ones it ended with
    assert all(torch.equal(v, module.pair.image.state_dict()[k]) for k, v in frozen.items())
    return {k: v.item() for k, v in trainer.callback_metrics.items()}


def test_lit_from_exported_image_tower_learns(tiny_clip: dict, tmp_path: Path) -> None:
    """Part 8 of the pretrained-towers issue: a locked exported image tower and a fresh text tower reach val R@5
    >= 0.5 both ways in 60 steps (at most 200 asked; ~18 s on a busy 2-core machine). Chance: i2t ranks 5 of 500
    captions (R@5 about 0.05), t2i 1 of 100 images (0.05). Measured: i2t 0.60, t2i 0.78 (200 steps: 0.65, 0.82)."""
    metrics = _lit_run(tiny_clip, tmp_path, steps=60)
    assert metrics["val/i2t_R@5"] >= 0.5 and metrics["val/t2i_R@5"] >= 0.5, metrics


# the configs on CPU with tiny overrides ---------------------------------------------------------------------------
_CPU = [
    "--trainer.devices=1",
    "--trainer.strategy=auto",
    "--trainer.precision=32-true",
    "--trainer.max_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--data.generate_if_missing=true",
    "--data.loader.num_workers=0",
    "--data.loader.batch_size=4",
    "--data.loader.eval_batch_size=8",
    "--data.images.image_size=32",
    "--data.context_length=77",
    "--model.init_args.image.image_size=32",
]


def _fit_on_cpu(config: str, tmp_path: Path, *extra: str) -> list[str]:
    """`cli.py fit` of configs/clip/<config> for 2 CPU steps at 32 pixels on the shapes set, writing under
    tmp_path/run."""
    return cli_args(
        "fit",
        *_CPU,
        f"--data.root={_shapes(tmp_path)}",
        *extra,
        config=f"clip/{config}",
        root=tmp_path / "run",
    )


def _shapes(tmp_path: Path) -> Path:
    from datamodules.synthetic.shapes import generate_shapes_coco

    return generate_shapes_coco(tmp_path / "shapes", n_train=8, n_val=8, image_size=32)


def test_coco_openclip_config_fine_tunes_on_cpu_smoke(open_clip_ckpt: Path, tmp_path: Path) -> None:
    """configs/clip/coco_openclip_vit_b32.yaml, with the tiny open_clip model in place of ViT-B-32: 2 steps; the
    trained model kept the checkpoint's temperature as its start and its tokenizer's vocabulary."""
    from cli import main

    cli = main(
        _fit_on_cpu(
            "coco_openclip_vit_b32.yaml",
            tmp_path,
            f"--data.tokenizer.path=open_clip:{TINY_OPEN_CLIP}",
            f"--model.init_args.init_clip.name={TINY_OPEN_CLIP}",
            f"--model.init_args.init_clip.path={open_clip_ckpt}",
            "--model.init_args.embed_dim=32",
        )
    )
    assert cli.model.hparams.vocab_size == 49408
    assert cli.trainer.global_step == 2 and "val/i2t_R@5" in cli.trainer.callback_metrics
    # zero-shot reads the checkpoint back with CLIP's tokenizer, named by the DataModule's settings
    from lightning_modules.zero_shot import load_image_text

    model, tok, context = load_image_text(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert isinstance(tok, ClipTokenizer) and tok.vocab_size == 49408 and context == 77
    assert torch.equal(model.log_scale, cli.model.pair.log_scale)


@pytest.mark.slow  # ~10 s; locking is covered in the default run by the unit tests and the LiT proof
def test_coco_lit_config_trains_only_the_text_tower_on_cpu_smoke(
    open_clip_ckpt: Path, tmp_path: Path
) -> None:
    """configs/clip/coco_lit.yaml with the tiny open_clip image tower (locked) and a tiny text tower started from
    scratch (the Hugging Face text source is tested with the text towers): 2 steps leave the image tower as
    loaded."""
    from cli import main

    cli = main(
        _fit_on_cpu(
            "coco_lit.yaml",
            tmp_path,
            "--data.tokenizer.path=null",
            "--data.tokenizer.vocab_size=100",
            f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
            f"--model.init_args.image.init.name={TINY_OPEN_CLIP}",
            f"--model.init_args.image.init.path={open_clip_ckpt}",
            "--model.init_args.text.init.source=scratch",
            "--model.init_args.text.init.path=null",
            "--model.init_args.text.size=tiny",
            "--model.init_args.text.heads=2",
            "--model.init_args.embed_dim=32",
        )
    )
    ref = open_clip.create_model(TINY_OPEN_CLIP, pretrained=str(open_clip_ckpt)).visual.state_dict()
    ours = cli.model.pair.image.backbone.visual.state_dict()
    assert cli.trainer.global_step == 2
    assert all(torch.equal(ours[k], v) for k, v in ref.items())
    assert not any(p.requires_grad for p in cli.model.pair.image.parameters())


def test_unlocked_layers_of_an_open_clip_start(open_clip_ckpt: Path) -> None:
    """open_clip's towers list their blocks too: the last block, the final norm and the projection train."""
    module = ImageTextModule(
        vocab_size=49408,
        embed_dim=32,
        image=ImageTowerConfig(image_size=32, lock=True, unlocked_layers=1),
        text=TextTowerConfig(lock=True, unlocked_layers=1),
        init_clip=TowerInit("open_clip", str(open_clip_ckpt), TINY_OPEN_CLIP),
    )
    image = {
        n.split(".")[2] if ".resblocks." not in n else n.split(".")[4]
        for n in _trained_names(module, "image")
    }
    text = {
        n.split(".")[1] if ".resblocks." not in n else n.split(".")[3] for n in _trained_names(module, "text")
    }
    assert image == {"ln_post", "proj", "1"}  # resblocks.1 of 2
    assert text == {"ln_final", "text_projection", "1"}
