"""Zero-shot image classification with an image-text model: classes are named, never trained on.

Each class embedding is the renormalised mean of the unit text embeddings of its prompts (every template filled
with the class name: the prompt ensemble of the CLIP paper); an image gets the class of highest cosine, one
(B, D) x (D, C) product per batch, so 50,000 images need the memory of one batch. The model is a checkpoint of
this framework (`ckpt_path`) or a whole imported CLIP (`init_clip`: an open_clip file or a Hugging Face folder);
the CLIP paper's ImageNet class names and templates are bundled (datamodules/image/metadata/). Logs
`{stage}/zero_shot_acc` (top-1), `_top5` (more than 5 classes), `_mean_per_class_recall` and, with
`per_class: true`, one accuracy per class; every image counts once over all processes. Protocols and commands:
`docs/finetune-and-eval.md`.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from datamodules.image.classification_sets import file_sha256, prompt_templates
from datamodules.image.clip_tokenizer import OPEN_CLIP_PREFIX, ClipTokenizer
from datamodules.sections import flat_hparams
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.clip_import import load_clip
from lightning_modules.components.contrastive import ContrastiveLossConfig, as_config
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.retrieval import first_occurrence
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import (
    ImageTextPair,
    clip_image_text_pair,
    clip_preprocessing,
    image_text_from_checkpoint,
)

log = logging.getLogger(__name__)

# For photographs of things; a dataset whose images look otherwise does better with its own (see the shapes config).
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a picture of a {}.",
    "a close-up photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the small {}.",
    "a photo of the large {}.",
    "a drawing of a {}.",
)


def fill_template(template: str, name: str) -> str:
    """`template` with `name` in place of `{}`, and "a" turned into "an" before a vowel ("an orange star")."""
    return re.sub(r"\b([Aa]) (?=[aeiouAEIOU])", r"\1n ", template.format(name))


@torch.no_grad()
def class_embeddings(
    encode_text: Callable[[Tensor, Tensor], Tensor],
    tokenizer: TextTokenizer,
    class_names: Sequence[str],
    templates: Sequence[str],
    context_length: int,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    fix_articles: bool = True,
) -> Tensor:
    """(C, D) unit vectors: for each class, the mean of the unit text embeddings of its prompts, renormalised.

    `encode_text(input_ids, attention_mask)` gives (B, D) embeddings, normalised or not. `fix_articles`: "a"
    becomes "an" before a vowel (`fill_template`); off, the templates are filled verbatim, as the papers' are.
    """
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one prompt template")
    fill = fill_template if fix_articles else str.format
    prompts = [fill(t, name) for name in class_names for t in templates]
    parts = []
    for start in range(0, len(prompts), batch_size):
        tokens = tokenizer(prompts[start : start + batch_size], context_length)
        out = encode_text(tokens["input_ids"].to(device), tokens["attention_mask"].to(device))
        parts.append(F.normalize(out.float(), dim=-1))
    per_prompt = torch.cat(parts).view(len(class_names), len(templates), -1)
    return F.normalize(per_prompt.mean(dim=1), dim=-1)


def _datamodule_class(class_path: str | None) -> type:
    if not class_path:
        from datamodules.image.coco_datamodule import CocoCaptionsDataModule

        return CocoCaptionsDataModule
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_image_text(
    ckpt_path: str | Path, tokenizer: str | None = None
) -> tuple[ImageTextPair, TextTokenizer, int]:
    """An `ImageTextModule` checkpoint's contrastive core (eval mode), its tokenizer and its caption context
    length.

    The model is rebuilt by `image_text_from_checkpoint` (read with weights_only=True, memory-mapped; a file that
    is no image-text checkpoint of this framework raises CheckpointError naming it). The tokenizer is, in order:
    the `tokenizer` file given; the checkpoint's `tokenizer_json`; the one the checkpoint's DataModule
    (`datamodule_hyper_parameters`) loads, i.e. its tokenizer file or the vocabulary it trained and cached (trained
    again, identically, from its captions when the cache is gone).
    """
    pair, ckpt = image_text_from_checkpoint(ckpt_path, "zero-shot")
    vocab_size = ckpt["hyper_parameters"]["vocab_size"]
    max_len = as_config(TextTowerConfig, ckpt["hyper_parameters"].get("text") or {}).max_len
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    context_length = int(data_hp.get("context_length") or max_len)
    if tokenizer:
        tok = TextTokenizer.from_file(tokenizer, bool(flat_hparams(data_hp).get("lowercase", True)))
    elif "tokenizer_json" in ckpt:
        tok = TextTokenizer.carried_by(ckpt, f"{ckpt_path}:tokenizer_json")
    elif data_hp:
        cls = _datamodule_class(data_hp.pop("_class_path", None))
        data_hp = {k: v for k, v in data_hp.items() if not k.startswith("_")}
        tok = cls(**data_hp).tokenizer
    else:
        raise ValueError(
            f"{ckpt_path} carries neither a tokenizer nor its DataModule's settings: pass the training tokenizer "
            "(tokenizer.json / vocab.txt) as model.init_args.tokenizer"
        )
    if tok.vocab_size != vocab_size:
        raise ValueError(
            f"the tokenizer ({tok.source}) has {tok.vocab_size} tokens but the checkpoint's text tower "
            f"{vocab_size}: not the tokenizer the model was trained with"
        )
    return pair, tok, min(context_length, max_len)


def load_clip_start(init: TowerInit | dict) -> tuple[ImageTextPair, ClipTokenizer, int, dict]:
    """A whole CLIP imported as it is (an open_clip file, a Hugging Face CLIPModel folder; see
    components/clip_import.py): its contrastive core (eval mode), its own tokenizer, its context length and its
    preprocessing ({image_size, mean, std, resize})."""
    init = as_config(TowerInit, init)
    parts = load_clip(init)
    pair = clip_image_text_pair(parts, ImageTowerConfig(image_size=parts.image_size), ContrastiveLossConfig())
    tokenizer = ClipTokenizer(
        f"{OPEN_CLIP_PREFIX}{init.name}" if init.source == "open_clip" else str(init.path)
    )
    return pair.eval(), tokenizer, parts.context_length, clip_preprocessing(parts)


def path_sha256(path: str | Path) -> str:
    """sha256 of a model file, or of a folder's files (name and bytes, in sorted order)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\t{file_sha256(file)}\n".encode())
    return digest.hexdigest()


class ZeroShotScores(Metric):
    """Top-1, top-5 and mean per-class recall of class scores, each image counted once.

    Each image adds its index, its label and its 5 best classes; `compute` gathers them from every process once
    (torchmetrics' sync) and keeps the first row of each index, so the images the distributed sampler repeats to
    even out the processes are not counted twice. Memory: 7 integers per image.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, top_k: int = 5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.num_classes = num_classes
        self.top_k = min(top_k, num_classes)
        for name in ("indices", "labels", "top"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, scores: Tensor, labels: Tensor, indices: Tensor) -> None:
        """`scores` (B, C) of images `indices` (B,) with true `labels` (B,)."""
        self.indices.append(indices.detach().long())
        self.labels.append(labels.detach().long())
        self.top.append(scores.detach().topk(self.top_k, dim=-1).indices)

    def compute(self) -> dict[str, Tensor]:
        """{"top1", "top5" (with 5 or more classes), "mean_per_class_recall", "per_class" (C,) recall; NaN for a
        class without images, which the mean leaves out}."""
        keep = first_occurrence(dim_zero_cat(self.indices))
        labels, top = dim_zero_cat(self.labels)[keep], dim_zero_cat(self.top)[keep]
        hit1 = (top[:, 0] == labels).float()
        out = {"top1": hit1.mean()}
        if self.top_k >= 5:
            out["top5"] = (top[:, :5] == labels[:, None]).any(dim=1).float().mean()
        count = torch.zeros(self.num_classes, device=labels.device).index_add_(
            0, labels, torch.ones_like(hit1)
        )
        hits = torch.zeros(self.num_classes, device=labels.device).index_add_(0, labels, hit1)
        per_class = hits / count  # NaN where a class has no image
        out["per_class"] = per_class
        out["mean_per_class_recall"] = per_class[count > 0].mean()
        out["images"] = torch.tensor(len(labels))
        return out


class ZeroShotClassifier(L.LightningModule):
    """A frozen image-text model classifying images among named classes; test or validate only."""

    def __init__(
        self,
        ckpt_path: str | None = None,
        init_clip: TowerInit | None = None,
        templates: list[str] | str | None = None,
        class_names: list[str] | None = None,
        tokenizer: str | None = None,
        context_length: int | None = None,
        per_class: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        """
        Args:
            ckpt_path: an `ImageTextModule` checkpoint (e.g. runs/clip_quickstart/checkpoints/last.ckpt).
            init_clip: instead, a whole CLIP as it was published: {source: open_clip, name: ViT-B-32, path: FILE} or
                {source: hf, path: DIR}; its own tokenizer and context length are used.
            templates: prompt templates with `{}` for the class name: a list ("a" becomes "an" before a vowel), a
                bundled set ("imagenet": the CLIP paper's 80; "cifar": its 18) or a text file of templates, one
                per line (these two filled verbatim, as the papers do); None uses `DEFAULT_TEMPLATES`.
            class_names: class names in label order; None takes the DataModule's (ImageNet's bundled names, CIFAR's
                meta file, class folders).
            tokenizer: the training tokenizer file; None finds it through the checkpoint (see `load_image_text`).
            context_length: longest prompt in tokens; None uses the model's caption context length.
            per_class: also log the accuracy of every class.
            vocab_size: unused; the CLI links the DataModule's vocabulary size to every model, and this model's
                comes with its checkpoint.
        """
        super().__init__()
        self.save_hyperparameters()
        if isinstance(templates, str):
            self.templates, self.fix_articles = prompt_templates(templates), False
        else:
            self.templates, self.fix_articles = list(templates or DEFAULT_TEMPLATES), True
        self.pair: ImageTextPair | None = None
        self.tokenizer: TextTokenizer | ClipTokenizer | None = None
        self.context_length = context_length
        self.source: dict[str, Any] = {}
        if ckpt_path and init_clip:
            raise ValueError("model.init_args.ckpt_path and init_clip both name a model: give one")
        if ckpt_path:
            pair, tok, saved_length = load_image_text(ckpt_path, tokenizer)
            self.set_model(pair, tok, context_length or saved_length)
            self.source = {"kind": "checkpoint", "path": str(ckpt_path)}
        elif init_clip:
            init = as_config(TowerInit, init_clip)
            pair, tok, clip_length, preprocess = load_clip_start(init)
            self.set_model(pair, tok, context_length or clip_length)
            self.source = {"kind": init.source, "name": init.name, "path": str(init.path), **preprocess}
        self.register_buffer("class_embeds", torch.empty(0), persistent=False)
        self.metrics = nn.ModuleDict()

    def set_model(
        self, pair: ImageTextPair, tokenizer: TextTokenizer | ClipTokenizer, context_length: int
    ) -> None:
        """Use an image-text model's contrastive core already in memory (frozen here) instead of a checkpoint."""
        self.pair = pair.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.context_length = self.context_length or context_length

    def train(self, mode: bool = True) -> ZeroShotClassifier:
        super().train(mode)
        if self.pair is not None:
            self.pair.eval()  # frozen: no dropout, ever
        return self

    # classes ------------------------------------------------------------------------------------
    def class_names(self) -> list[str]:
        if self.hparams.class_names:
            return list(self.hparams.class_names)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "class_names"):
            raise ValueError(
                "no class names: set model.init_args.class_names or use a classification DataModule"
            )
        return list(dm.class_names)

    def build_classes(self, class_names: Sequence[str]) -> Tensor:
        """Compute (and keep) the class embeddings of `class_names` with this model's prompt templates."""
        if self.pair is None:
            raise ValueError("no image-text model: set model.init_args.ckpt_path or init_clip")
        self.class_embeds = class_embeddings(
            self.pair.encode_text,
            self.tokenizer,
            class_names,
            self.templates,
            self.context_length,
            device=self.device,
            fix_articles=self.fix_articles,
        )
        return self.class_embeds

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (the image tower normalises them) -> (B, C) cosines between images and classes."""
        return self.pair.encode_image(images).float() @ self.class_embeds.T

    def protocol(self) -> dict[str, Any]:
        """The model and prompts of this evaluation, for results.json: source and its sha256, templates, classes,
        context length and the image tower's normalisation."""
        templates = self.hparams.templates
        source = dict(self.source)
        if source.get("path") and Path(source["path"]).exists():
            source["sha256"] = path_sha256(source["path"])
        tower = self.pair.image if self.pair is not None else None
        return {
            "model": source,
            "templates": {
                "source": templates if isinstance(templates, str) else "given" if templates else "default",
                "count": len(self.templates),
                "sha256": hashlib.sha256("\n".join(self.templates).encode()).hexdigest(),
                "verbatim": not self.fix_articles,
            },
            "classes": len(self.class_embeds) or None,
            "context_length": self.context_length,
            "normalisation": {
                "mean": [round(float(v), 8) for v in tower.pixel_mean.flatten()]
                if tower is not None
                else None,
                "std": [round(float(v), 8) for v in tower.pixel_std.flatten()] if tower is not None else None,
            },
        }

    # evaluation ---------------------------------------------------------------------------------
    def _start(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.pair is not None and dm is not None:  # the tower normalises: a DataModule's mean must be its
            data, tower = flat_hparams(getattr(dm, "hparams", {})), self.pair.image
            tower.check_data(data, "data")
            want = tower.reference_resize
            if want and data.get("resize", "tensor") != want:
                log.warning(
                    "data.images.resize (%s) is not %s, the mode of the image tower's source: its crops differ from the "
                    "reference preprocessing by resampling or a pixel",
                    data.get("resize", "tensor"),
                    want,
                )
        names = self.class_names()
        self.build_classes(names)
        self.metrics[stage] = ZeroShotScores(len(names)).to(self.device)
        log.info("zero-shot: %d classes x %d prompt templates", len(names), len(self.templates))

    def _step(self, batch: dict, stage: str) -> None:
        # summed over the processes too: rank 0's count alone misses what the others could not decode
        self.log(
            f"{stage}/skipped_items",
            float(batch["skipped"]),
            reduce_fx="sum",
            on_step=False,
            on_epoch=True,
            sync_dist=True,
        )
        labels = batch["labels"]
        # an empty batch still updates: every process then holds a state for the gather
        scores = (
            self(batch["images"]) if len(labels) else self.class_embeds.new_zeros(0, len(self.class_embeds))
        )
        self.metrics[stage].update(scores, labels, batch["indices"])

    def _end(self, stage: str) -> None:
        metric = self.metrics[stage]
        scores = metric.compute()
        values = {
            f"{stage}/zero_shot_acc": scores["top1"],
            f"{stage}/zero_shot_mean_per_class_recall": scores["mean_per_class_recall"],
        }
        if metric.num_classes > 5:
            values[f"{stage}/zero_shot_acc_top5"] = scores["top5"]
        if self.hparams.per_class:
            folders = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get(stage)
            keys = getattr(folders, "folders", None) or [n.replace(" ", "_") for n in self.class_names()]
            values.update({f"{stage}/zero_shot_acc/{k}": v for k, v in zip(keys, scores["per_class"])})
        self.counted = {"images": int(scores["images"])}
        self.log_dict(values)
        metric.reset()

    def on_validation_start(self) -> None:
        self._start("val")

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_start(self) -> None:
        self._start("test")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end("test")

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        """Predicted class ids of a batch (one loader per split the DataModule sets)."""
        if not len(self.class_embeds):
            self.build_classes(self.class_names())
        return self(batch["images"]).argmax(dim=-1)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained
