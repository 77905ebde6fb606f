"""Zero-shot image classification with a trained image-text model: classes are named, never trained on.

Each class name is written into every prompt template ("a picture of a {}" -> "a picture of a red circle"); the
text tower embeds each prompt, and the class embedding is the mean of its prompts' unit embeddings, scaled back
to unit length (the prompt ensemble of Radford et al. 2021, "Learning Transferable Visual Models From Natural
Language Supervision"). An image is given the class whose embedding has the highest cosine with its own.

    python cli.py test --config configs/zeroshot/shapes.yaml \
        --model.init_args.ckpt_path runs/clip_quickstart/checkpoints/last.ckpt

logs `test/zero_shot_acc` (top-1), `test/zero_shot_acc_top5` when there are more than 5 classes, and with
`per_class: true` `test/zero_shot_acc/<class folder>`.
"""

from __future__ import annotations

import importlib
import logging
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.contrastive import as_config
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextPair, image_text_from_checkpoint

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
) -> Tensor:
    """(C, D) unit vectors: for each class, the mean of the unit text embeddings of its prompts, renormalised.

    `encode_text(input_ids, attention_mask)` gives (B, D) embeddings, normalised or not.
    """
    if not class_names or not templates:
        raise ValueError("zero-shot classification needs at least one class name and one prompt template")
    prompts = [fill_template(t, name) for name in class_names for t in templates]
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
        tok = TextTokenizer.from_file(tokenizer, bool(data_hp.get("lowercase", True)))
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


class ZeroShotClassifier(L.LightningModule):
    """A frozen image-text model classifying images among named classes; test or validate only."""

    def __init__(
        self,
        ckpt_path: str | None = None,
        templates: list[str] | None = None,
        class_names: list[str] | None = None,
        tokenizer: str | None = None,
        context_length: int | None = None,
        per_class: bool = False,
        vocab_size: int | None = None,
    ) -> None:
        """
        Args:
            ckpt_path: an `ImageTextModule` checkpoint (e.g. runs/clip_quickstart/checkpoints/last.ckpt).
            templates: prompt templates with `{}` for the class name; None uses `DEFAULT_TEMPLATES`.
            class_names: class names in label order; None takes the DataModule's (`class_names`, from folders).
            tokenizer: the training tokenizer file; None finds it through the checkpoint (see `load_image_text`).
            context_length: longest prompt in tokens; None uses the checkpoint's caption context length.
            per_class: also log the accuracy of every class.
            vocab_size: unused; the CLI links the DataModule's vocabulary size to every model, and this model's
                comes with its checkpoint.
        """
        super().__init__()
        self.save_hyperparameters()
        self.templates = list(templates) if templates else list(DEFAULT_TEMPLATES)
        self.pair: ImageTextPair | None = None
        self.tokenizer: TextTokenizer | None = None
        self.context_length = context_length
        if ckpt_path:
            pair, tok, saved_length = load_image_text(ckpt_path, tokenizer)
            self.set_model(pair, tok, context_length or saved_length)
        self.register_buffer("class_embeds", torch.empty(0), persistent=False)
        self.metrics = nn.ModuleDict()

    def set_model(self, pair: ImageTextPair, tokenizer: TextTokenizer, context_length: int) -> None:
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
                "no class names: set model.init_args.class_names or use an ImageFolderDataModule"
            )
        return list(dm.class_names)

    def build_classes(self, class_names: Sequence[str]) -> Tensor:
        """Compute (and keep) the class embeddings of `class_names` with this model's prompt templates."""
        if self.pair is None:
            raise ValueError("no image-text model: set model.init_args.ckpt_path")
        self.class_embeds = class_embeddings(
            self.pair.encode_text,
            self.tokenizer,
            class_names,
            self.templates,
            self.context_length,
            device=self.device,
        )
        return self.class_embeds

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (the image tower normalises them) -> (B, C) cosines between images and classes."""
        return self.pair.encode_image(images).float() @ self.class_embeds.T

    # evaluation ---------------------------------------------------------------------------------
    def _start(self, stage: str) -> None:
        dm = self.trainer.datamodule if self._trainer is not None else None
        if self.pair is not None and dm is not None:  # the tower normalises: a DataModule's mean must be its
            data, tower = dict(getattr(dm, "hparams", {})), self.pair.image
            tower.check_data(data, "data")
            want = tower.reference_resize
            if want and data.get("resize", "tensor") != want:
                log.warning(
                    "data.resize (%s) is not %s, the mode of the image tower's source: its crops differ from the "
                    "reference preprocessing by resampling or a pixel",
                    data.get("resize", "tensor"),
                    want,
                )
        names = self.class_names()
        self.build_classes(names)
        n = len(names)
        metrics = {"zero_shot_acc": MulticlassAccuracy(n, top_k=1, average="micro")}
        if n > 5:
            metrics["zero_shot_acc_top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        if self.hparams.per_class:
            metrics["per_class"] = MulticlassAccuracy(n, average=None)
        self.metrics[stage] = nn.ModuleDict(metrics).to(self.device)
        log.info("zero-shot: %d classes x %d prompt templates", n, len(self.templates))

    def _step(self, batch: dict, stage: str) -> None:
        self.log(
            f"{stage}/skipped_items", float(batch["skipped"]), reduce_fx="sum", on_step=False, on_epoch=True
        )
        if not len(batch["labels"]):
            return
        logits = self(batch["images"])
        for metric in self.metrics[stage].values():
            metric.update(logits, batch["labels"])

    def _end(self, stage: str) -> None:
        metrics = self.metrics[stage]
        values = {f"{stage}/{k}": m.compute() for k, m in metrics.items() if k != "per_class"}
        if "per_class" in metrics:
            folders = getattr(getattr(self.trainer, "datamodule", None), "datasets", {}).get(stage)
            keys = (
                folders.folders if folders is not None else [n.replace(" ", "_") for n in self.class_names()]
            )
            values.update(
                {f"{stage}/zero_shot_acc/{k}": v for k, v in zip(keys, metrics["per_class"].compute())}
            )
        self.log_dict(values)
        for metric in metrics.values():
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

    def predict_step(self, batch: dict, batch_idx: int) -> Tensor:
        """Predicted class ids of a batch."""
        if not len(self.class_embeds):
            self.build_classes(self.class_names())
        return self(batch["images"]).argmax(dim=-1)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained
