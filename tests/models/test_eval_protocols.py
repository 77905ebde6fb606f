"""Evaluation like the papers: zero-shot classification, retrieval and probes from the CLI, with results that
describe their protocol; and the evaluation models composed of plain modules."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES
from PIL import Image

from datamodules.image.classification_sets import (
    CifarDataset,
    ImageNetDataset,
    imagenet_classes,
    prompt_templates,
)
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.retrieval import RetrievalRecall
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule, ImageTextPair, image_text_from_checkpoint
from lightning_modules.linear_probe import DEFAULT_WEIGHT_DECAYS, held_out, linear_probe, read_features
from lightning_modules.training.evaluation import caption_set_protocol
from lightning_modules.zero_shot import ZeroShotClassifier, ZeroShotScores
from tests.builders.files import write_cifar, write_jpeg, write_karpathy
from tests.helpers import REPO, cli_args

open_clip = pytest.importorskip("open_clip")

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_image_text(vocab_size: int = 100) -> ImageTextModule:
    return ImageTextModule(
        vocab_size=vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=32, layers=1),
        text=TextTowerConfig("tiny", layers=1, heads=2, max_len=16),
    )


def save_system(module: L.LightningModule, path: Path, **extra) -> Path:
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), **extra}, path)
    return path


# -- composition ------------------------------------------------------------------------------------------


def test_no_contextvars_under_lightning_modules() -> None:
    """The systems are composed of plain modules: no context-variable workaround is needed anywhere."""
    files = sorted((REPO / "lightning_modules").rglob("*.py"))
    assert len(files) > 10
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] == "contextvars" for n in names), f"{path} imports contextvars"


def test_the_zero_shot_classifier_holds_the_contrastive_core_not_a_lightning_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trained = tiny_image_text()
    ckpt = save_system(trained, tmp_path / "clip.ckpt", tokenizer_json=None)
    pair, saved = image_text_from_checkpoint(ckpt, "zero-shot")
    assert type(pair) is ImageTextPair and not pair.training and saved["hyper_parameters"]["embed_dim"] == 16
    for key, value in trained.pair.state_dict().items():
        assert torch.equal(pair.state_dict()[key], value), key
    classifier = ZeroShotClassifier()
    classifier.set_model(pair, None, 16)
    for system in (classifier, trained):
        nested = [n for n, m in system.named_modules() if n and isinstance(m, L.LightningModule)]
        assert not nested, f"{type(system).__name__} holds LightningModules: {nested}"
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():  # the same weights: the same embeddings (same kernels and shapes: exact)
        assert torch.equal(pair.encode_image(images), trained.eval().encode_image(images))


# -- fixtures in the real layouts ---------------------------------------------------------------------------

TINY = "mmpretrain-eval-tiny-vit"


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random open_clip ViT (32 px, 1 layer per tower, width 32) saved in open_clip's native format."""
    tmp = tmp_path_factory.mktemp("open_clip")
    cfg = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (tmp / f"{TINY}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp / f"{TINY}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY, pretrained=None)
    torch.save(model.state_dict(), tmp / "tiny.pt")
    return tmp / "tiny.pt"


def reference_open_clip(path: Path, name: str = TINY):
    """open_clip's own model and tokenizer for a checkpoint file, eval mode."""
    model = open_clip.create_model(name, pretrained=str(path)).eval()
    return model, open_clip.get_tokenizer(name)


WNIDS = ("n01440764", "n01443537", "n15075141")  # tench, goldfish, toilet tissue: labels 0, 1, 999


def write_imagenet(root: Path, per_class: int = 2) -> dict[str, int]:
    """ImageNet's two usual layouts of the same images: val/<wnid>/<image> and a flat val_flat/ with Kaggle's
    LOC_val_solution.csv and a `<file> <label>` text file. Returns file name -> standard label."""
    labels, k = {}, 0
    rows = ["ImageId,PredictionString"]
    for wnid, label in zip(WNIDS, (0, 1, 999)):
        for _ in range(per_class):
            k += 1
            name = f"ILSVRC2012_val_{k:08d}.JPEG"
            write_jpeg(root / "val" / wnid / name, np.random.default_rng(k))
            (root / "val_flat").mkdir(parents=True, exist_ok=True)
            (root / "val_flat" / name).write_bytes((root / "val" / wnid / name).read_bytes())
            rows.append(f"ILSVRC2012_val_{k:08d},{wnid} 1 2 3 4")
            labels[name] = label
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    (root / "val.txt").write_text("".join(f"{n} {y}\n" for n, y in labels.items()))
    return labels


def cli_eval(config: str, tmp_path: Path, *overrides: str):
    from cli import main

    return main(
        cli_args(
            "test",
            "--trainer.devices=1",
            "--trainer.logger=false",
            "--data.init_args.images.image_size=32",
            *overrides,
            config=f"eval/{config}",
            root=tmp_path / "run",
        )
    )


# -- zero-shot ------------------------------------------------------------------------------------------


def test_bundled_imagenet_names_and_templates_are_the_clip_papers() -> None:
    wnids, names = imagenet_classes()
    assert len(wnids) == len(names) == 1000 and list(wnids) == sorted(wnids)
    assert names == tuple(IMAGENET_CLASSNAMES)  # open_clip's copy of the CLIP notebook's list
    templates = prompt_templates("imagenet")
    assert templates == [t("{}") for t in OPENAI_IMAGENET_TEMPLATES] and len(templates) == 80
    assert len(prompt_templates("cifar")) == 18 and prompt_templates("cifar")[0] == "a photo of a {}."
    assert (wnids[0], names[0], wnids[999], names[999]) == ("n01440764", "tench", "n15075141", "toilet paper")


def _classifier_equals_open_clips(path: Path, name: str, classes: list[str]) -> None:
    model, tokenizer = reference_open_clip(path, name)
    theirs = open_clip.build_zero_shot_classifier(model, tokenizer, classes, OPENAI_IMAGENET_TEMPLATES)
    ours = ZeroShotClassifier(
        init_clip={"source": "open_clip", "name": name, "path": str(path)}, templates="imagenet"
    )
    got = ours.build_classes(classes)
    assert got.shape == theirs.T.shape
    # the same weights through the same kernels, batched differently (our 256 prompts, their 10 classes x 80)
    assert (got - theirs.T).abs().max().item() <= 1e-5


def test_zero_shot_classifier_equals_open_clips_own(tiny_open_clip: Path) -> None:
    _classifier_equals_open_clips(tiny_open_clip, TINY, list(imagenet_classes()[1][:5]))


@pytest.mark.slow  # a full-size ViT-B-32 text tower over 5 classes x 80 prompts, twice: minutes on 2 shared cores
def test_zero_shot_classifier_equals_open_clips_own_full_size_vit_b_32(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None)
    torch.save(model.state_dict(), tmp_path / "ViT-B-32-random.pt")
    _classifier_equals_open_clips(
        tmp_path / "ViT-B-32-random.pt", "ViT-B-32", list(imagenet_classes()[1][::200])
    )


def test_imagenet_layouts_give_the_standard_labels(tmp_path: Path) -> None:
    labels = write_imagenet(tmp_path)
    folders = ImageNetDataset(tmp_path / "val", lambda x: x)
    csv_flat = ImageNetDataset(tmp_path / "val_flat", lambda x: x, tmp_path / "LOC_val_solution.csv")
    txt_flat = ImageNetDataset(tmp_path / "val_flat", lambda x: x, tmp_path / "val.txt")
    for ds in (folders, csv_flat, txt_flat):
        assert sorted((p.name, y) for p, y in ds.samples) == sorted(labels.items())
        assert len(ds.class_names) == 1000 and ds.class_names[999] == "toilet paper"
    (tmp_path / "bad.txt").write_text("ILSVRC2012_val_00000001.JPEG n99999999\n")
    with pytest.raises(ValueError, match=r"bad.txt:1: 'n99999999' is neither an ImageNet WordNet id"):
        ImageNetDataset(tmp_path / "val_flat", lambda x: x, tmp_path / "bad.txt")
    with pytest.raises(ValueError, match="needs its labels file"):
        ImageNetDataset(tmp_path / "val_flat", lambda x: x)


def test_cifar_pickled_batches_are_read_as_distributed(tmp_path: Path) -> None:
    images, labels = write_cifar(tmp_path)
    ds = CifarDataset(tmp_path, "cifar10", "test", lambda x: x)
    assert len(ds) == 12 and ds.labels == labels and ds.class_names[1] == "automobile"
    assert torch.equal(ds[3]["image"], torch.from_numpy(images[3]))
    assert len(CifarDataset(tmp_path / "cifar-10-batches-py", "cifar10", "train", lambda x: x)) == 20
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"test_batch: not a CIFAR pickled batch"):
        CifarDataset(tmp_path, "cifar10", "test", lambda x: x)


def test_any_imagefolder_is_a_classification_set_with_its_protocol(tmp_path: Path) -> None:
    from datamodules.image.classification_datamodule import ClassificationDataModule
    from datamodules.sections import ImagesConfig, LoaderConfig
    from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder

    root = generate_shapes_imagefolder(
        tmp_path / "set", colours=("red", "blue"), shapes=("circle",), per_class={"test": 2}, image_size=32
    )
    dm = ClassificationDataModule(
        "imagefolder",
        str(root),
        test_split="test",
        images=ImagesConfig(image_size=32),
        loader=LoaderConfig(num_workers=0),
    )
    assert dm.class_names == ["blue circle", "red circle"]
    batch = next(iter(dm.loader("test")))
    assert batch["labels"].tolist() == [0, 0, 1, 1] and batch["indices"].tolist() == [0, 1, 2, 3]
    protocol = dm.protocol()
    assert (protocol["dataset"], protocol["split"], protocol["images"], protocol["classes"]) == (
        "imagefolder",
        "test",
        4,
        2,
    )
    (root / "test" / "red_circle" / "00000.jpg").write_bytes(b"changed")  # a changed file changes the listing
    assert (
        ClassificationDataModule("imagefolder", str(root), "test").protocol()["images_listing_sha256"]
        != (protocol["images_listing_sha256"])
    )


def test_cli_cifar10_zero_shot_from_an_open_clip_file_writes_its_protocol(
    tiny_open_clip: Path, tmp_path: Path
) -> None:
    """configs/eval/cifar10_zeroshot.yaml straight from an open_clip file: the numbers are open_clip's own
    classifier applied to open_clip's own image features, and results.json says how they were made."""
    images, labels = write_cifar(tmp_path / "cifar", n_test=24)
    cli_eval(
        "cifar10_zeroshot.yaml",
        tmp_path,
        f"--data.init_args.root={tmp_path / 'cifar'}",
        f"--model.init_args.init_clip.name={TINY}",
        f"--model.init_args.init_clip.path={tiny_open_clip}",
        "--data.init_args.loader.batch_size=10",
        "--data.init_args.loader.num_workers=0",
    )
    model, tokenizer = reference_open_clip(tiny_open_clip)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    weights = open_clip.build_zero_shot_classifier(model, tokenizer, names, prompt_templates("cifar"))
    mean, std = (
        torch.tensor(model.visual.image_mean).view(3, 1, 1),
        torch.tensor(model.visual.image_std).view(3, 1, 1),
    )
    with torch.no_grad():  # 32 px images at 32 px: open_clip's resize and crop leave them as they are
        x = (torch.from_numpy(images).float() / 255 - mean) / std
        scores = model.encode_image(x, normalize=True) @ weights
    want_top1 = (scores.argmax(1) == torch.tensor(labels)).float().mean().item()
    want_top5 = (scores.topk(5).indices == torch.tensor(labels)[:, None]).any(1).float().mean().item()
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    metrics = results["metrics"]
    assert metrics["test/zero_shot_acc"] == pytest.approx(want_top1, abs=1e-6)
    assert metrics["test/zero_shot_acc_top5"] == pytest.approx(want_top5, abs=1e-6)
    protocol = results["protocol"]
    data = protocol["data"]
    assert (data["dataset"], data["split"], data["images"], data["classes"], data["images_counted"]) == (
        "cifar10",
        "test",
        24,
        10,
        24,
    )
    assert set(data["files_sha256"]) == {"test_batch", "batches.meta"}
    assert protocol["templates"]["count"] == 18 and protocol["templates"]["source"] == "cifar"
    assert protocol["model"]["sha256"] == hashlib.sha256(tiny_open_clip.read_bytes()).hexdigest()
    assert protocol["preprocessing"] == {
        "image_size": 32,
        "resize": "pil",
        "resize_to": "shorter side",
        "crop": "centre",
    }
    assert protocol["normalisation"]["mean"] == pytest.approx(list(open_clip.OPENAI_DATASET_MEAN), abs=1e-7)
    assert protocol["precision"] == "32-true" and protocol["processes"] == 1
    fig = results["published"]["figures"]["test/zero_shot_acc"]
    assert fig["published"] == 0.8983 and fig["difference"] == pytest.approx(want_top1 - 0.8983, abs=1e-6)


@pytest.mark.slow  # a second CLI run (~7 s); the readers of both layouts are checked in the default run
def test_cli_imagenet_zero_shot_reads_the_flat_folder_with_its_labels_file(
    tiny_open_clip: Path, tmp_path: Path
) -> None:
    labels = write_imagenet(tmp_path / "imagenet")
    cli = cli_eval(
        "imagenet_zeroshot.yaml",
        tmp_path,
        f"--data.init_args.root={tmp_path / 'imagenet'}",
        "--data.init_args.test_split=val_flat",
        f"--data.init_args.labels_file={tmp_path / 'imagenet' / 'LOC_val_solution.csv'}",
        f"--model.init_args.init_clip.name={TINY}",
        f"--model.init_args.init_clip.path={tiny_open_clip}",
        '--model.init_args.templates=["a photo of a {}."]',  # 1,000 prompts instead of 80,000: seconds
        "--data.init_args.loader.num_workers=0",
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    data = results["protocol"]["data"]
    assert (data["images"], data["classes"], data["images_counted"]) == (len(labels), 1000, len(labels))
    assert "LOC_val_solution.csv" in data["files_sha256"]
    assert cli.model.class_embeds.shape == (1000, 16)
    assert 0 <= results["metrics"]["test/zero_shot_mean_per_class_recall"] <= 1


# -- retrieval --------------------------------------------------------------------------------------------


def caption_groups(n_images: int, seed: int = 0) -> torch.Tensor:
    """The image of each caption: 5 per image, 6 for every seventh (COCO has 5 to 7), in shuffled order."""
    counts = [6 if i % 7 == 0 else 5 for i in range(n_images)]
    groups = torch.arange(n_images).repeat_interleave(torch.tensor(counts))
    return groups[torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed))]


def clip_benchmark_recalls(
    images: torch.Tensor, texts: torch.Tensor, text_image: torch.Tensor
) -> dict[str, float]:
    """CLIP_benchmark's own retrieval recall (its `recall_at_k` and `batchify`, as its `evaluate` calls them)."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    scores = texts @ images.T
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), text_image] = True
    out = {}
    for k in (1, 5, 10):
        out[f"t2i_R@{k}"] = (batchify(recall_at_k, scores, positive, 7, "cpu", k=k) > 0).float().mean().item()
        out[f"i2t_R@{k}"] = (
            (batchify(recall_at_k, scores.T, positive.T, 7, "cpu", k=k) > 0).float().mean().item()
        )
    return out


def test_retrieval_recall_equals_clip_benchmarks_on_the_same_embeddings() -> None:
    """The one retrieval metric, fed as evaluation feeds it (images repeated per batch and by the distributed
    sampler's padding, in any order), gives CLIP_benchmark's numbers exactly."""
    g = torch.Generator().manual_seed(0)
    n_images = 40
    text_image = caption_groups(n_images)
    images = F.normalize(torch.randn(n_images, 8, generator=g), dim=-1)
    # captions near their image, so the recalls are far from 0 and 1 and differ by K
    texts = F.normalize(images[text_image] + 1.2 * torch.randn(len(text_image), 8, generator=g), dim=-1)
    want = clip_benchmark_recalls(images, texts, text_image)
    assert 0.05 < want["i2t_R@1"] < want["i2t_R@10"] < 1 and 0.05 < want["t2i_R@1"] < want["t2i_R@10"] < 1

    metric = RetrievalRecall("i2t", "t2i")
    order = torch.randperm(len(texts), generator=g)
    for part in (order[:50], order[50:], order[:9]):  # the last: rows a padded rank repeats
        ids = text_image[part].unique()
        metric.update(images[ids], ids, ids, texts[part], part, text_image[part])
    got = {k: v.item() for k, v in metric.compute().items()}
    assert got == pytest.approx(want, abs=1e-9)  # the same ranks of the same cosines: counts of hits
    assert metric.counts() == {"a": n_images, "b": len(texts)}


@pytest.mark.slow  # a CLI run (~8 s); the metric's equality and the Karpathy reading are in the default run
def test_cli_flickr30k_retrieval_from_an_open_clip_file_equals_clip_benchmark(
    tiny_open_clip: Path, tmp_path: Path
) -> None:
    """configs/eval/flickr30k_retrieval.yaml on a Karpathy dataset_flickr30k.json: every test caption, and the
    recalls CLIP_benchmark gives on open_clip's own embeddings of the same images and captions."""
    karpathy = write_karpathy(tmp_path / "flickr30k-images", "flickr30k", n_test=12)  # K = 10 < 12 images
    cli_eval(
        "flickr30k_retrieval.yaml",
        tmp_path,
        f"--data.init_args.root={tmp_path / 'flickr30k-images'}",
        f"--data.init_args.karpathy_json={karpathy}",
        f"--data.init_args.tokenizer.path=open_clip:{TINY}",
        "--data.init_args.loader.num_workers=0",
        f"--model.init_args.init_clip.name={TINY}",
        f"--model.init_args.init_clip.path={tiny_open_clip}",
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    data = results["protocol"]["data"]
    assert (data["dataset"], data["split"]) == ("flickr30k", "karpathy test")
    assert (data["images_listed"], data["captions_listed"]) == (12, 61)
    assert (data["images_counted"], data["captions_counted"]) == (12, 61)
    assert "dataset_flickr30k.json" in data["files_sha256"]

    model, tokenizer = reference_open_clip(tiny_open_clip)
    _, _, preprocess = open_clip.create_model_and_transforms(TINY, pretrained=str(tiny_open_clip))
    entries = [e for e in json.loads(karpathy.read_text())["images"] if e["split"] == "test"]
    with torch.no_grad():
        pixels = torch.stack([preprocess(Image.open(karpathy.parent / e["filename"])) for e in entries])
        images = model.encode_image(pixels, normalize=True)
        captions = [s["raw"] for e in entries for s in e["sentences"]]
        texts = model.encode_text(tokenizer(captions), normalize=True)
    text_image = torch.tensor([i for i, e in enumerate(entries) for _ in e["sentences"]])
    want = clip_benchmark_recalls(images, texts, text_image)
    got = {
        k.removeprefix("test/"): v for k, v in results["metrics"].items() if "_R@" in k and "mean" not in k
    }
    assert got == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("kind", ["coco", "flickr30k"])
def test_karpathy_test_split_is_read_with_every_caption(kind: str, tmp_path: Path) -> None:
    from datamodules.image.coco_datamodule import CocoCaptionsDataModule
    from datamodules.sections import LoaderConfig

    karpathy = write_karpathy(tmp_path, kind, n_test=4)
    dm = CocoCaptionsDataModule(
        str(tmp_path), karpathy_json=str(karpathy), loader=LoaderConfig(num_workers=0)
    )
    records = dm.records("test")
    assert [len(r.captions) for r in records] == [5, 6, 5, 5]
    assert records[1].captions[5] == "A photo number 1 with caption 5."
    assert [r.image_id for r in records] == ([1000, 1001, 1002, 1003] if kind == "coco" else [0, 1, 2, 3])
    data = caption_set_protocol(dm)
    assert (data["dataset"], data["split"], data["images_listed"], data["captions_listed"]) == (
        kind,
        "karpathy test",
        4,
        21,
    )
    assert data["files_sha256"][karpathy.name] == hashlib.sha256(karpathy.read_bytes()).hexdigest()


# -- scale ------------------------------------------------------------------------------------------------


def sampler_shards(n: int, world: int) -> list[list[int]]:
    """The indices each rank evaluates under Lightning's DistributedSampler (no shuffle; padded by repeats)."""
    from torch.utils.data import DistributedSampler

    return [list(DistributedSampler(range(n), world, r, shuffle=False)) for r in range(world)]


def test_two_ranks_gathered_give_the_one_process_numbers() -> None:
    """The arithmetic of the gather, in one process: torchmetrics' sync concatenates rank 0's rows, then rank
    1's, each padded by the sampler with repeated images; every image still counts once."""
    n, classes = 13, 7
    g = torch.Generator().manual_seed(0)
    scores, labels = torch.randn(n, classes, generator=g), torch.randint(0, classes, (n,), generator=g)
    alone, gathered = ZeroShotScores(classes), ZeroShotScores(classes)
    alone.update(scores, labels, torch.arange(n))
    shards = sampler_shards(n, 2)
    assert sum(len(s) for s in shards) == 14  # one image repeated
    for shard in shards:
        idx = torch.tensor(shard)
        gathered.update(scores[idx], labels[idx], idx)
    a, b = alone.compute(), gathered.compute()
    for key in ("top1", "top5", "mean_per_class_recall", "images"):
        assert b[key].item() == a[key].item(), key
    assert a["images"].item() == n and torch.equal(a["per_class"].isnan(), b["per_class"].isnan())


def _ddp_worker(rank: int, init_file: str, out_dir: str, tensors: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    n = len(tensors["labels"])
    shard = torch.tensor(sampler_shards(n, 2)[rank])
    zero_shot = ZeroShotScores(tensors["scores"].shape[1])
    for part in shard.split(3):  # batches of 3
        zero_shot.update(tensors["scores"][part], tensors["labels"][part], part)
    retrieval = RetrievalRecall("i2t", "t2i")
    images, texts, text_image = tensors["images"], tensors["texts"], tensors["text_image"]
    for part in sampler_shards(len(texts), 2)[rank]:
        ids = text_image[part : part + 1]
        retrieval.update(images[ids], ids, ids, texts[part : part + 1], torch.tensor([part]), ids)
    out = {"zero_shot": zero_shot.compute(), "retrieval": retrieval.compute(), "counts": retrieval.counts()}
    torch.save(out, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes: about 20 s on 2 cores
def test_two_gloo_processes_give_the_one_process_numbers(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    g = torch.Generator().manual_seed(1)
    n_images = 21
    text_image = caption_groups(n_images, seed=1)
    images = F.normalize(torch.randn(n_images, 8, generator=g), dim=-1)
    tensors = {
        "scores": torch.randn(29, 11, generator=g),
        "labels": torch.randint(0, 11, (29,), generator=g),
        "images": images,
        "texts": F.normalize(images[text_image] + torch.randn(len(text_image), 8, generator=g), dim=-1),
        "text_image": text_image,
    }
    mp.start_processes(
        _ddp_worker, args=(str(tmp_path / "init"), str(tmp_path), tensors), nprocs=2, start_method="spawn"
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    alone = ZeroShotScores(11)
    alone.update(tensors["scores"], tensors["labels"], torch.arange(29))
    want = alone.compute()
    want_retrieval = clip_benchmark_recalls(images, tensors["texts"], text_image)
    for result in ranks:  # every rank computes the same, whole-set numbers
        for key in ("top1", "top5", "mean_per_class_recall", "images"):
            assert result["zero_shot"][key].item() == want[key].item(), key
        assert {k: v.item() for k, v in result["retrieval"].items()} == pytest.approx(
            want_retrieval, abs=1e-9
        )
        assert result["counts"] == {"a": n_images, "b": len(text_image)}


@pytest.mark.slow  # a CLI run of the speech-text system (~15 s)
def test_librispeech_test_clean_config_stacks_on_the_speech_run_and_reports_its_subset(
    tmp_path: Path,
) -> None:
    import shutil

    from cli import main
    from datamodules.synthetic.tones import generate_tone_librispeech

    libri = generate_tone_librispeech(tmp_path / "tones", n_train_utts=8, n_val_utts=6)
    shutil.copytree(libri / "dev-clean", libri / "test-clean")  # the layout of LibriSpeech's test-clean
    main(
        cli_args(
            "test",
            f"--data.root={tmp_path / 'tones'}",
            f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
            "--data.loader.num_workers=0",
            config=["speech/quickstart.yaml", "eval/librispeech_test_clean.yaml"],
            root=tmp_path / "run",
        )
    )
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    data = results["protocol"]["data"]
    assert (data["dataset"], data["subsets"], data["utterances"]) == ("librispeech", ["test-clean"], 6)
    keys = {f"test/{d}_R@{k}" for d in ("a2t", "t2a") for k in (1, 5, 10)}
    assert keys <= set(results["metrics"]) and all(0 <= results["metrics"][k] <= 1 for k in keys)
    assert results["protocol"]["model"]["kind"].startswith("as configured")


# -- linear probe ---------------------------------------------------------------------------------------


@pytest.mark.slow  # predict and probe from the CLI (~10 s); the held-out split is checked in the default run
def test_cli_probe_on_features_written_once_by_predict(tiny_open_clip: Path, tmp_path: Path) -> None:
    """configs/eval/probe_features.yaml writes every split's features once; `probe` reads them, fits the probe on
    train (its weight decay chosen on a held-out tenth) and scores the test split."""
    from cli import main

    write_cifar(tmp_path / "cifar", n_test=12)
    out = tmp_path / "features"
    main(
        cli_args(
            "predict",
            f"--trainer.callbacks.init_args.output_dir={out}",
            f"--data.init_args.root={tmp_path / 'cifar'}",
            "--data.init_args.images.image_size=32",
            "--data.init_args.loader.num_workers=0",
            f"--model.init_args.init_clip.name={TINY}",
            f"--model.init_args.init_clip.path={tiny_open_clip}",
            config="eval/probe_features.yaml",
            root=tmp_path / "run",
        )
    )
    splits = read_features(out)
    assert {r: len(y) for r, (_, y) in splits.items()} == {"train": 20, "test": 12}
    cifar = CifarDataset(tmp_path / "cifar", "cifar10", "test", lambda x: x)
    assert sorted(splits["test"][1].tolist()) == sorted(cifar.labels)  # every test image, its own label
    main(["probe", "--features", str(out)])
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["config.yaml"]  # nothing outside tmp_path
    saved = json.loads((out / "probe.json").read_text())
    fit, hold = held_out(splits["train"][1], 0.1)
    (x, y), (xt, yt) = splits["train"], splits["test"]
    want = linear_probe((x[fit], y[fit]), (x[hold], y[hold]), (xt, yt))
    assert saved["weight_decay"] in DEFAULT_WEIGHT_DECAYS
    assert (saved["accuracy"], saved["weight_decay"], saved["train_size"]) == (
        want.accuracy,
        want.weight_decay,
        len(fit),
    )


def test_held_out_validation_takes_a_fraction_of_every_class() -> None:
    labels = torch.arange(4).repeat_interleave(torch.tensor([10, 20, 1, 30]))
    train, val = held_out(labels, 0.1, seed=0)
    assert labels[val].bincount(minlength=4).tolist() == [1, 2, 0, 3]
    assert sorted(train.tolist() + val.tolist()) == list(range(61))
    assert torch.equal(held_out(labels, 0.1, seed=0)[1], val)
