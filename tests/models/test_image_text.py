"""Image-text (CLIP) alignment: towers, temperature, same-image positives, MLM init, learning, CLI."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision
import yaml

from cli import main
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule, image_text_from_checkpoint
from lightning_modules.mlm_module import MLMPretrainingModule
from tests.helpers import REPO, cli_args

VOCAB = 60


def tiny_module(text: dict | None = None, **kwargs) -> ImageTextModule:
    image = ImageTowerConfig("vit_tiny", image_size=16, layers=1, width=32, heads=2)
    text = TextTowerConfig(
        **{"size": "tiny", "layers": 1, "hidden": 32, "heads": 2, "max_len": 16, **(text or {})}
    )
    return ImageTextModule(vocab_size=VOCAB, embed_dim=32, image=image, text=text, **kwargs)


def train_batch(image_ids: list[int], size: int = 16, length: int = 7, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(image_ids)
    ids = torch.randint(5, VOCAB, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.bool)
    mask[0, 4:] = False  # one padded caption
    ids[~mask] = 0
    return {
        "images": torch.randn(n, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_ids": torch.tensor(image_ids),
        "caption_ids": torch.arange(100, 100 + n),
        "skipped": 0,
    }


# -- towers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "size", "overrides"),
    [
        ("vit_tiny", 32, {}),
        ("vit_custom", 64, {}),
        ("vit_custom", 48, {"patch_size": 16, "layers": 1, "width": 64}),
        ("vit_b_32", 64, {}),
        ("vit_b_16", 32, {}),
        ("resnet50", 32, {}),
    ],
)
def test_tower_gives_one_unnormalised_embedding_per_image(arch: str, size: int, overrides: dict) -> None:
    torch.manual_seed(0)
    tower = ImageTower(ImageTowerConfig(arch, image_size=size, **overrides), embed_dim=24).eval()
    with torch.no_grad():
        out = tower(torch.randn(2, 3, size, size))
    assert out.shape == (2, 24)
    assert torch.isfinite(out).all()
    assert not torch.allclose(out.norm(dim=-1), torch.ones(2))  # the loss normalises, not the tower
    assert not torch.allclose(out[0], out[1])  # depends on the image
    assert tower.channels_last == (arch == "resnet50")  # a ViT's patch embedding is its only convolution


def test_vit_presets_have_torchvision_shapes() -> None:
    with torch.device("meta"):  # shapes only: no time spent initialising 86 M parameters
        for arch, reference in (
            ("vit_b_16", torchvision.models.vit_b_16),
            ("vit_b_32", torchvision.models.vit_b_32),
        ):
            ours = ImageTower(ImageTowerConfig(arch), embed_dim=512).backbone.state_dict()
            theirs = {k: v for k, v in reference().state_dict().items() if not k.startswith("heads.")}
            assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    cfg = ImageTowerConfig("vit_custom")
    assert (cfg.vit.patch_size, cfg.vit.layers, cfg.vit.width, cfg.vit.heads, cfg.vit.mlp_dim) == (
        32,
        4,
        256,
        4,
        1024,
    )
    assert ImageTowerConfig("vit_tiny", width=256).vit.heads == 4
    assert cfg.layers is None  # the override stays unset: another arch given later gets its own preset
    with pytest.raises(ValueError, match="multiple of patch_size"):
        ImageTowerConfig("vit_b_16", image_size=100)


# -- temperature ---------------------------------------------------------------------------------------


def test_logit_scale_starts_at_clip_value_and_is_clamped_at_100() -> None:
    module = tiny_module().pair
    assert module.logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        module.log_scale.fill_(math.log(1000.0))
    assert module.logit_scale.item() == pytest.approx(100.0, rel=1e-6)
    module.logit_scale.backward()
    assert module.log_scale.grad.item() == 0.0  # clamped: no gradient pushes it further


# -- batches -------------------------------------------------------------------------------------------


def test_captions_of_the_same_image_are_not_negatives_in_training() -> None:
    torch.manual_seed(0)
    module = tiny_module().train()
    batch = train_batch([7, 3, 7, 9])  # rows 0 and 2 are two captions of image 7
    e = module.embed(batch, "train")
    assert torch.equal(e.a_groups, torch.tensor([7, 3, 7, 9]))
    assert torch.equal(e.b_groups, e.a_groups) and torch.equal(e.b_keys, batch["caption_ids"])
    loss = module.pair.loss(e)

    a, b = F.normalize(e.a, dim=-1), F.normalize(e.b, dim=-1)
    logits = module.logit_scale * a @ b.T
    masked = logits.clone()
    masked[0, 2] = masked[2, 0] = float("-inf")  # the other caption / image of image 7 is no negative
    target = torch.arange(4)
    expected = 0.5 * (F.cross_entropy(masked, target) + F.cross_entropy(masked.T, target))
    unmasked = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
    # the loss's own kernels against F.cross_entropy's: fp32 reassociation
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    assert not torch.isclose(loss, unmasked)


def test_eval_embeds_each_image_once_against_all_its_captions() -> None:
    module = tiny_module().eval()
    batch = train_batch([11, 11, 11, 12, 12], seed=1)  # 5 caption rows for 2 images
    batch["images"] = batch["images"][:2]
    batch["caption_image_ids"] = batch.pop("image_ids")
    batch["image_ids"] = torch.tensor([11, 12])
    with torch.no_grad():
        e = module.embed(batch, "val")
        loss = module.pair.loss(e)
    assert e.a.shape == (2, 32) and e.b.shape == (5, 32)
    assert torch.equal(e.pair_index, torch.tensor([0, 3]))  # each image's first caption
    assert torch.equal(e.b_groups, torch.tensor([11, 11, 11, 12, 12]))
    assert torch.equal(e.b_keys, torch.arange(100, 105))
    assert torch.isfinite(loss)


def test_empty_batch_gives_a_zero_loss_that_reaches_every_parameter() -> None:
    module = tiny_module().train()
    batch = train_batch([1, 2])
    empty = {
        "images": batch["images"][:0],
        "input_ids": torch.empty(0, 0, dtype=torch.long),
        "attention_mask": torch.empty(0, 0, dtype=torch.bool),
        "image_ids": torch.empty(0, dtype=torch.long),
        "caption_ids": torch.empty(0, dtype=torch.long),
        "skipped": 2,
    }
    loss = module.training_step(empty, 0)
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    trainable = [p for p in module.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None and not p.grad.any() for p in trainable)
    module.validation_step({**empty, "caption_image_ids": torch.empty(0, dtype=torch.long)}, 0)
    # zero rows, so that under DDP this rank still has a state to give the metric's sync
    assert [len(x) for x in module.pair.retrieval["val"].a_emb] == [0]


def test_unused_bert_pooler_is_frozen_so_ddp_needs_no_unused_parameter_search() -> None:
    assert not any(p.requires_grad for p in tiny_module().pair.text.bert.pooler.parameters())
    assert all(p.requires_grad for p in tiny_module({"pooling": "cls"}).pair.text.bert.pooler.parameters())


# -- MLM initialisation ----------------------------------------------------------------------------------


def test_text_tower_starts_from_an_mlm_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(1)
    mlm = MLMPretrainingModule(
        vocab_size=VOCAB,
        max_position_embeddings=16,
        encoder={"size": "tiny", "hidden": 32, "heads": 2, "layers": 1},
    )
    ckpt = tmp_path / "mlm.ckpt"
    torch.save({"state_dict": mlm.state_dict(), "hyper_parameters": dict(mlm.hparams)}, ckpt)

    torch.manual_seed(2)
    module = tiny_module({"init_ckpt": str(ckpt)})
    fresh = tiny_module()
    ours = module.pair.text.bert.state_dict()
    for name, value in mlm.model.bert.state_dict().items():
        torch.testing.assert_close(ours[name], value, rtol=0, atol=0)
    assert not torch.equal(
        ours["embeddings.word.weight"], fresh.pair.text.bert.state_dict()["embeddings.word.weight"]
    )
    with pytest.raises(ValueError, match="shapes differ"):
        tiny_module({"init_ckpt": str(ckpt), "hidden": 64})


@pytest.mark.parametrize("spelling", ["init", "init_ckpt"])
def test_checkpoint_is_rebuilt_without_reading_the_mlm_start_again(spelling: str, tmp_path: Path) -> None:
    """export and zero-shot rebuild an image-text checkpoint from its hyperparameters and weights: a text tower
    started from an MLM checkpoint (either spelling) does not read that file again, which may be gone."""
    mlm = MLMPretrainingModule(
        vocab_size=VOCAB,
        max_position_embeddings=16,
        encoder={"size": "tiny", "hidden": 32, "heads": 2, "layers": 1},
    )
    mlm_file = tmp_path / "mlm.ckpt"
    torch.save({"state_dict": mlm.state_dict()}, mlm_file)
    start = {"source": "ours", "path": str(mlm_file)} if spelling == "init" else str(mlm_file)
    module = tiny_module({spelling: start})
    ckpt = tmp_path / "clip.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    mlm_file.unlink()
    rebuilt, _ = image_text_from_checkpoint(ckpt, "export")
    assert not rebuilt.training
    for key, value in module.pair.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[key], value), key


# -- learning --------------------------------------------------------------------------------------------


def test_learns_shape_retrieval_far_above_chance(tiny_clip: dict) -> None:
    """300 steps of a tiny CLIP on 1000 captioned shape images (the shared `tiny_clip` fixture), held-out R@1."""
    metrics = tiny_clip["metrics"]
    i2t, t2i = metrics["val/i2t_R@1"], metrics["val/t2i_R@1"]
    # i2t: 5 hits among 5 x n_val captions; t2i: 1 hit among n_val images. Both are 1 / n_val at random.
    chance = 1 / tiny_clip["n_val"]
    print(f"held-out R@1: i2t {i2t:.3f}, t2i {t2i:.3f}; chance {chance:.3f}")
    assert i2t >= 10 * chance and t2i >= 10 * chance


# -- CLI ---------------------------------------------------------------------------------------------------


def test_cli_fit_then_test_smoke(tmp_path: Path) -> None:
    common = [
        f"--data.root={tmp_path / 'shapes'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.loader.batch_size=8",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
    ]

    def args(command: str, *extra: str) -> list[str]:
        return cli_args(command, *common, *extra, config="clip/quickstart.yaml", root=tmp_path / "run")

    cli = main(args("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2"))
    assert cli.model.hparams.vocab_size == cli.datamodule.vocab_size  # linked from the tokenizer
    assert "val/i2t_R@5" in cli.trainer.callback_metrics
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 2
    cli = main(args("test", f"--ckpt_path={last}"))
    assert "test/t2i_R@10" in cli.trainer.callback_metrics


def test_gpu_config_parses_smoke(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / "configs/clip/coco_vit_b16.yaml"), "--print_config"])
    assert exit_info.value.code in (None, 0)
    printed = capsys.readouterr().out
    assert "    image:\n      arch: vit_b_16\n" in printed and "precision: bf16-mixed" in printed
    assert "    text:\n      size: base\n" in printed  # each tower its own section


TOWERS = {"clip": ("image", "text"), "speech": ("speech", "text"), "trimodal": ("image", "speech", "text")}


@pytest.mark.parametrize(
    "config",
    sorted(
        str(p.relative_to(REPO))
        for task in (*TOWERS, "zeroshot")
        for p in (REPO / "configs" / task).glob("*.yaml")
    ),
)
def test_every_alignment_config_prints_its_tower_sections(config: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(REPO / config), "--print_config"])
    assert exit_info.value.code in (None, 0)
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    task = Path(config).parent.name
    if task == "zeroshot":
        assert model["ckpt_path"].endswith("last.ckpt")
        return
    for tower in TOWERS[task]:  # each tower a section with its documented fields, its preset first
        assert next(iter(model[tower])) in ("arch", "size"), tower
    assert {"name", "init_logit_scale"} <= model["loss"].keys() and "lr" in model["optimizer"]
