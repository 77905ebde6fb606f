"""Image preprocessing: uint8 batches from every image DataModule, normalised once on the device by the image tower
with its source's statistics, and evaluation crops equal to each source's reference pipeline (open_clip's
preprocessing, Hugging Face's CLIPImageProcessor, torchvision's ImageClassification preset) on full-size photos
whose crop margins are odd and even."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torchvision.transforms import v2

from datamodules.image.classification_datamodule import ClassificationDataModule
from datamodules.image.coco import eval_transform, read_rgb
from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from lightning_modules.components.image_tower import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    ImageTower,
    ImageTowerConfig,
)
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.training.callbacks import to_picture
from tests.helpers import REPO

open_clip = pytest.importorskip("open_clip")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")  # small models: one thread (tests/helpers.single_thread)

# (width, height) of COCO-like photos; shorter side to 224, the longer side's margin around the 224 crop is
# 111, 127, 75 (odd: the crop offset is x.5 and the references round it differently) and 74 (even)
PHOTO_SIZES = ((640, 427), (640, 408), (500, 374), (640, 480), (427, 640))
HF_MEAN, HF_STD = (0.5, 0.45, 0.4), (0.2, 0.25, 0.3)  # not CLIP's: proves the folder's own are used
OPEN_CLIP_224 = "mmpretrain-test-vit-224"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Noisy gradients at the sizes of COCO photos, JPEG (the last one PNG), in file-name order; a one-pixel
    shift of the crop changes every patch."""
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    paths = []
    for k, (w, h) in enumerate(PHOTO_SIZES):
        ramp = np.linspace(0, 160, w)[None, :, None] + np.linspace(0, 60, h)[:, None, None]
        image = Image.fromarray(np.clip(ramp + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8))
        path = folder / f"{k:02d}_{w}x{h}.{'png' if k == len(PHOTO_SIZES) - 1 else 'jpg'}"
        image.save(path, quality=90) if path.suffix == ".jpg" else image.save(path)
        paths.append(path)
    return paths


# -- Item: uint8 batches, normalised on the device ---------------------------------------------------------------
def _coco(root: Path, tmp_path: Path, num_workers: int = 0, **sections) -> CocoCaptionsDataModule:
    return CocoCaptionsDataModule(
        str(root),
        context_length=16,
        images={"image_size": 32},
        loader={"batch_size": 4, "eval_batch_size": 4, "num_workers": num_workers},
        tokenizer={"vocab_size": 100, "cache_dir": str(tmp_path / "cache")},
        **sections,
    )


def test_every_image_datamodule_sends_uint8_images(tmp_path: Path) -> None:
    """COCO (folder training, validation, test, predict), WebDataset shards, ImageFolder and the tri-modal
    DataModule: images arrive as (B, 3, S, S) uint8; evaluation loaders keep no workers between runs."""
    from datamodules.image.shards.write import coco_to_shards
    from datamodules.synthetic.shapes import generate_shapes_coco
    from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder
    from datamodules.trimodal_datamodule import TriModalDataModule, generate_spoken_captions

    root = generate_shapes_coco(tmp_path / "shapes", n_train=8, n_val=4, image_size=40)
    dm = _coco(root, tmp_path, predict={"split": "val2017", "images": str(root / "val2017")})
    batches = {
        "train": next(iter(dm.train_dataloader())),
        "val": next(iter(dm.val_dataloader())),
        "test": next(iter(dm.test_dataloader())),
        **{f"predict{k}": next(iter(loader)) for k, loader in enumerate(dm.predict_dataloader())},
    }
    coco_to_shards(root, "train2017", tmp_path / "shards", max_samples_per_shard=4)
    batches["shards"] = next(
        iter(_coco(root, tmp_path, shards={"urls": str(tmp_path / "shards")}).train_dataloader())
    )
    folder = generate_shapes_imagefolder(
        tmp_path / "folder",
        colours=("red", "blue"),
        per_class={"train": 2, "val": 2, "test": 2},
        image_size=40,
    )
    images = ClassificationDataModule(
        "imagefolder",
        str(folder),
        train_split="train",
        val_split="val",
        images={"image_size": 32},
        loader={"batch_size": 4, "num_workers": 0},
    )
    batches["imagefolder"] = next(iter(images.test_dataloader()))
    generate_spoken_captions(root, tmp_path / "speech", (1, 1))
    tri = TriModalDataModule(
        {
            "root": str(root),
            "images": {"image_size": 32},
            "loader": {"batch_size": 4, "num_workers": 0},
            "context_length": 16,
        },
        {
            "root": str(tmp_path / "speech"),
            "test_subsets": ["dev-clean"],
            "loader": {"num_workers": 0},
            "context_length": 16,
        },
        tokenizer={"vocab_size": 100, "cache_dir": str(tmp_path / "cache")},
    )
    tri.setup("fit")
    batches["trimodal_train"] = next(iter(tri.train_dataloader()))[0]["image_text"]
    batches["trimodal_val"] = next(iter(tri.val_dataloader()[0]))
    for name, batch in batches.items():
        assert batch["images"].dtype == torch.uint8, name
        assert batch["images"].shape[1:] == (3, 32, 32) and batch["images"].max() > 1, name
    # the W&B examples and the notebook show a batch's pixels as they are
    assert np.array_equal(
        to_picture(batches["val"]["images"][0]), batches["val"]["images"][0].permute(1, 2, 0)
    )

    workers = _coco(root, tmp_path, num_workers=2)
    assert workers.train_dataloader().persistent_workers
    assert (
        not workers.val_dataloader().persistent_workers and not workers.test_dataloader().persistent_workers
    )
    images.num_workers = 2
    assert not any(images.loader(role).persistent_workers for role in ("train", "val", "test"))


def _open_clip_tiny(tmp: Path) -> Path:
    name = "mmpretrain-test-tiny-vit-32"
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 100, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{name}.json")
    torch.save(open_clip.create_model(name, pretrained=None).state_dict(), tmp / "oc.pt")
    return tmp / "oc.pt"


def _hf_vision(tmp: Path, image_size: int = 32, patch: int = 8) -> Path:
    vision = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch,
    )
    transformers.CLIPVisionModel(vision).save_pretrained(tmp / "hf")
    transformers.CLIPImageProcessor(image_mean=list(HF_MEAN), image_std=list(HF_STD)).save_pretrained(
        tmp / "hf"
    )
    return tmp / "hf"


def _tower(source: str, tmp: Path) -> tuple[ImageTower, tuple, tuple]:
    """A small image tower of `source` and the mean and std its source preprocesses with."""
    torch.manual_seed(0)
    if source == "scratch":
        cfg = ImageTowerConfig("vit_tiny", image_size=32, layers=1)
        return ImageTower(cfg, 16), CLIP_MEAN, CLIP_STD
    if source == "open_clip":
        init = TowerInit("open_clip", str(_open_clip_tiny(tmp)), "mmpretrain-test-tiny-vit-32")
        return ImageTower(ImageTowerConfig(image_size=32, init=init), 16), CLIP_MEAN, CLIP_STD
    if source == "hf":
        init = TowerInit("hf", str(_hf_vision(tmp)))
        return ImageTower(ImageTowerConfig(image_size=32, init=init), 16), HF_MEAN, HF_STD
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp / "resnet18.pth")
    init = TowerInit("torchvision", str(tmp / "resnet18.pth"), "resnet18")
    return ImageTower(ImageTowerConfig(image_size=32, init=init), 16), IMAGENET_MEAN, IMAGENET_STD


@pytest.mark.parametrize("source", ["scratch", "open_clip", "hf", "torchvision"])
def test_the_tower_normalises_uint8_pixels_with_its_sources_statistics(source: str, tmp_path: Path) -> None:
    """uint8 crops through the tower give the embeddings of the float pipeline the DataModules ran before on the
    CPU (ToDtype + Normalize with the source's mean and std) within 1e-5: the same arithmetic in another order
    moves an input by an ulp, not by the 1e-2 of a grey level or another mean."""
    tower, mean, std = _tower(source, tmp_path)
    tower.eval()
    pixels = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    before = v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))])
    with torch.no_grad():
        got, want = tower(pixels), tower(before(pixels))
    assert (got - want).abs().max().item() <= 1e-5 * want.abs().max().item()
    # the other sources' statistics give other embeddings: the check above can tell them apart
    other = v2.Normalize([0.5] * 3, [0.5] * 3)(v2.ToDtype(torch.float32, scale=True)(pixels))
    with torch.no_grad():
        assert (tower(other) - want).abs().max().item() > 1e-3 * want.abs().max().item()
    if source == "scratch":  # bf16-true: the tower's input follows its dtype (uint8 is not cast by Lightning)
        assert tower.to(torch.bfloat16)(pixels).dtype == torch.bfloat16


def test_predict_zero_shot_and_probe_embed_uint8_as_normalised_pixels() -> None:
    """predict_step, the zero-shot classifier and the linear probe's encoder all reach the tower's normalisation:
    uint8 pixels give the embeddings of the normalised float pixels (1e-5: see above)."""
    from lightning_modules.linear_probe import image_encoder
    from lightning_modules.zero_shot import ZeroShotClassifier

    torch.manual_seed(0)
    model = ImageTextModule(
        vocab_size=100, embed_dim=16, image=ImageTowerConfig("vit_tiny", image_size=32, layers=1)
    ).eval()
    pixels = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    normalised = v2.Normalize(list(CLIP_MEAN), list(CLIP_STD))(pixels.float() / 255)
    with torch.no_grad():
        want = F.normalize(model.pair.image(normalised), dim=-1)
        predicted = model.predict_step({"images": pixels, "image_keys": list("abcd")}, 0)
        probe = image_encoder(model)({"images": pixels})
        zero_shot = ZeroShotClassifier()
        zero_shot.set_model(model.pair, None, 16)
        zero_shot.class_embeds = F.normalize(torch.randn(3, 16), dim=-1)
        logits = zero_shot(pixels)
    assert (predicted["embeddings"]["image"][1] - want).abs().max() <= 1e-5
    assert (probe - want).abs().max() <= 1e-5
    assert (logits - want @ zero_shot.class_embeds.T).abs().max() <= 1e-5


def test_a_datamodule_mean_other_than_the_towers_is_refused() -> None:
    tower = ImageTower(ImageTowerConfig("vit_tiny", image_size=32, layers=1), 16)
    tower.check_data({"mean": list(CLIP_MEAN), "std": None}, "data")  # the tower's own, or unset: fine
    with pytest.raises(ValueError, match=r"data.images.mean .* model.image.mean"):
        tower.check_data({"mean": list(IMAGENET_MEAN)}, "data")
    imagenet = ImageTower(
        ImageTowerConfig("vit_tiny", image_size=32, layers=1, mean=IMAGENET_MEAN, std=IMAGENET_STD), 16
    )
    imagenet.check_data({"mean": IMAGENET_MEAN, "std": IMAGENET_STD}, "data")
    assert torch.equal(imagenet.pixel_std.flatten(), torch.tensor(IMAGENET_STD))
    assert "pixel_mean" not in imagenet.state_dict()  # checkpoints keep their keys


# -- Item: the reference pipelines on full-size photos -----------------------------------------------------------
def test_resize_modes_crop_the_reference_pixels(photos: list[Path]) -> None:
    """Each `data.images.resize` mode gives its reference's pixels exactly, on photos of odd and even crop margins:
    tensor = transformers' CLIPImageProcessor, pil = open_clip's preprocessing, torchvision = the
    ImageClassification preset of torchvision's IMAGENET1K_V1 weights (normalised: 1e-6, the float32 rounding of
    one formula, far below a grey level's 1/255/std)."""
    processor = transformers.CLIPImageProcessor(do_rescale=False, do_normalize=False)
    open_clip_crop = v2.Compose(
        open_clip.image_transform(224, is_train=False).transforms[:-1]
    )  # no Normalize
    preset = torchvision.models.ResNet50_Weights.IMAGENET1K_V1.transforms()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    for path in photos:
        pixels = read_rgb(str(path))
        with Image.open(path) as im:
            hf = processor(images=im.convert("RGB"), return_tensors="pt")["pixel_values"][0]
            oc = open_clip_crop(im.convert("RGB"))
        ours = eval_transform(224, "tensor")(pixels)
        assert ours.dtype == torch.uint8 and torch.equal(ours.float(), hf.float()), path.name
        assert torch.equal(eval_transform(224, "pil")(pixels).float() / 255, oc), path.name
        ours = (eval_transform(224, "torchvision")(pixels).float() / 255 - mean) / std
        assert (ours - preset(pixels)).abs().max() <= 1e-6, path.name


@pytest.fixture(scope="module")
def clip_224(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Whole CLIP models at the full 224 px input (patch 32, width 64, 2 layers), random, in their libraries'
    native formats: an open_clip state dict and a Hugging Face CLIPModel folder with its CLIPImageProcessor."""
    tmp = tmp_path_factory.mktemp("clip_224")
    cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "head_width": 32, "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp / f"{OPEN_CLIP_224}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{OPEN_CLIP_224}.json")
    torch.manual_seed(0)
    torch.save(open_clip.create_model(OPEN_CLIP_224, pretrained=None).state_dict(), tmp / "open_clip.pt")
    text = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
    )
    vision = transformers.CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=32,
    )
    config = transformers.CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=32
    )
    transformers.CLIPModel(config).save_pretrained(tmp / "hf")
    transformers.CLIPImageProcessor(image_mean=list(HF_MEAN), image_std=list(HF_STD)).save_pretrained(
        tmp / "hf"
    )
    return {"open_clip": tmp / "open_clip.pt", "hf": tmp / "hf"}


def _reference_embeddings(source: str, clip_224: dict[str, Path], photos: list[Path]) -> torch.Tensor:
    """The reference library's own preprocessing and encoder, on the photos as Pillow opens them."""
    images = []
    for path in photos:
        with Image.open(path) as im:
            images.append(im.convert("RGB"))
    with torch.no_grad():
        if source == "open_clip":
            model, _, preprocess = open_clip.create_model_and_transforms(
                OPEN_CLIP_224, pretrained=str(clip_224["open_clip"])
            )
            return model.eval().encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
        model = transformers.CLIPModel.from_pretrained(clip_224["hf"], local_files_only=True).eval()
        pixels = transformers.CLIPImageProcessor.from_pretrained(clip_224["hf"], local_files_only=True)(
            images=images, return_tensors="pt"
        )["pixel_values"]
        return F.normalize(model.get_image_features(pixel_values=pixels).pooler_output, dim=-1)


def _predicted_distances(source: str, clip_224: dict[str, Path], photos: list[Path]) -> dict[str, float]:
    """1 - cos between the reference embeddings of `photos` (one folder, in file-name order) and those of a
    whole-CLIP start (model.init_clip) through the predict path: the DataModule's predict_images loader with
    the source's data.images.resize, then predict_step."""
    init = (
        TowerInit("open_clip", str(clip_224["open_clip"]), OPEN_CLIP_224) if source == "open_clip" else None
    )
    init = init or TowerInit("hf", str(clip_224["hf"]))
    module = ImageTextModule(
        vocab_size=49408, embed_dim=32, image=ImageTowerConfig(image_size=224), init_clip=init
    ).eval()
    resize = module.clip_preprocess["resize"]
    assert resize == {"open_clip": "pil", "hf": "tensor"}[source]
    dm = CocoCaptionsDataModule(
        str(photos[0].parent / "no_coco"),
        images={"image_size": 224, "resize": resize},
        loader={"eval_batch_size": len(photos), "num_workers": 0},
        tokenizer={"path": "open_clip:ViT-B-32"},  # CLIP's BPE; no texts are embedded here
        predict={"images": str(photos[0].parent)},
    )
    (loader,) = dm.predict_dataloader()
    with torch.no_grad():
        keys, ours = module.predict_step(next(iter(loader)), 0)["embeddings"]["image"]
    assert keys == [p.name for p in photos]
    distance = 1 - (ours * _reference_embeddings(source, clip_224, photos)).sum(-1)
    return dict(zip(keys, distance.tolist()))


@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_whole_clip_embeds_full_size_photos_as_its_library(
    source: str, clip_224: dict[str, Path], photos: list[Path]
) -> None:
    """A whole-CLIP start embeds photos of odd and even crop margins as its library's own preprocessing and
    encoder do: 1 - cos <= 1e-6 in fp32 for every photo (a one-pixel shift of the crop costs ~1e-3)."""
    distances = _predicted_distances(source, clip_224, photos)
    assert max(distances.values()) <= 1e-6, distances


REAL_COCO = REPO.parent / "shared" / "data" / "real" / "coco" / "val2017"


@pytest.mark.skipif(not REAL_COCO.is_dir(), reason="no genuine COCO sample (../shared/data/real)")
@pytest.mark.parametrize("source", ["open_clip", "hf"])
def test_whole_clip_embeds_genuine_coco_photos_as_its_library(source: str, clip_224: dict[str, Path]) -> None:
    """The same on the 20 genuine COCO val2017 JPEGs of the shared sample, four of which have odd crop margins."""
    distances = _predicted_distances(source, clip_224, sorted(REAL_COCO.glob("*.jpg")))
    assert max(distances.values()) <= 1e-6, distances


def test_torchvision_tower_embeds_full_size_photos_as_torchvision(photos: list[Path], tmp_path: Path) -> None:
    """A torchvision architecture's published state-dict file (the file name of ResNet18_Weights.IMAGENET1K_V1):
    data.images.resize torchvision and the tower's ImageNet normalisation give the pooled features of torchvision's model
    on its weights' own preset (1 - cos <= 1e-6 in fp32)."""
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / Path(weights.url).name
    torch.save(ref.state_dict(), path)
    tower = ImageTower(
        ImageTowerConfig(image_size=224, init=TowerInit("torchvision", str(path), "resnet18")), 8
    )
    tower.eval()
    assert tower.reference_resize == "torchvision"
    ref.fc = torch.nn.Identity()
    pixels = [read_rgb(str(p)) for p in photos]
    with torch.no_grad():
        ours = tower.backbone(
            tower.normalize(torch.stack([eval_transform(224, "torchvision")(p) for p in pixels]))
        )
        want = ref(torch.stack([weights.transforms()(p) for p in pixels]))
    distance = 1 - F.cosine_similarity(ours, want, dim=-1)
    assert distance.max().item() <= 1e-6, distance.tolist()


def test_a_checkpoint_whose_datamodule_named_its_normalisation_keeps_it(tmp_path: Path) -> None:
    """A checkpoint whose DataModule normalised with its own mean and std (ImageNet's here) rebuilds a tower that
    normalises with the same: zero-shot, export and probes see the pixels the model trained on."""
    from lightning_modules.components.text_tower import TextTowerConfig
    from lightning_modules.image_text_module import image_text_from_checkpoint

    model = ImageTextModule(
        vocab_size=100,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=32, layers=1),
        text=TextTowerConfig("tiny", layers=1, heads=2, max_len=16),
    )
    torch.save(
        {
            "state_dict": model.state_dict(),
            "hyper_parameters": dict(model.hparams),
            "datamodule_hyper_parameters": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        },
        tmp_path / "trained.ckpt",
    )
    loaded, _ = image_text_from_checkpoint(tmp_path / "trained.ckpt", "zero-shot")
    assert torch.equal(loaded.image.pixel_mean.flatten(), torch.tensor(IMAGENET_MEAN))
    assert torch.equal(loaded.image.pixel_std.flatten(), torch.tensor(IMAGENET_STD))
    assert torch.equal(model.pair.image.pixel_mean.flatten(), torch.tensor(CLIP_MEAN))  # scratch default
