"""Images, speech and text in one embedding space: the image-text and the speech-text systems trained together
on one text tower.

    loss = image_text_weight * L(images, captions) + speech_text_weight * L(utterances, transcripts)

Each step takes one COCO batch and one LibriSpeech batch (datamodules/trimodal_datamodule.py). The two systems
are the framework's own `ImageTextModule` and `SpeechTextModule`, composed: their towers, `embed`, loss and
retrieval metric are used as they are, except that the speech-text system's text tower IS the image-text one,
so both objectives train it. Each system keeps its own learnable temperature: the two tasks differ in how hard
they are, and one shared temperature would be a compromise that fits neither.

Images and speech never meet in training; they meet through the text both are aligned to. Evaluation reports
i2t/t2i on COCO, a2t/t2a on LibriSpeech and, when the speech set speaks the COCO captions (the quickstart's
spoken captions), i2a/a2i: an utterance is a hit for an image query when it speaks one of the image's captions.
"""

from __future__ import annotations

import contextvars
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_modules.components.encoder import SizeName
from lightning_modules.components.retrieval import RetrievalRecall, mean_recall
from lightning_modules.contrastive_module import NO_DECAY_NAMES, ContrastiveModule, PairEmbeddings
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.optim import Schedule, build_optimizer
from lightning_modules.resilience import CheckpointExtras, SkipNonFiniteSteps, zero_loss
from lightning_modules.speech_text_module import SpeechTextModule

TASKS = ("image_text", "speech_text")  # the order of the evaluation loaders, as in TriModalDataModule
_ROWS = {"image_text": "image_ids", "speech_text": "utt_keys"}  # a batch entry with one item per row


class TriModalModule(SkipNonFiniteSteps, CheckpointExtras):
    """Aligns images, speech and text; logs `val/{i2t,t2i,a2t,t2a,i2a,a2i}_R@K`, `val/R@mean` (of
    i2t, t2i, a2t, t2a) and `train/loss`."""

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 512,
        image_tower: dict[str, Any] | None = None,
        speech_tower: dict[str, Any] | None = None,
        text_size: SizeName = "base",
        text_layers: int | None = None,
        text_hidden: int | None = None,
        text_heads: int | None = None,
        text_dropout: float = 0.0,
        text_pooling: Literal["cls", "first", "mean"] = "first",
        max_text_len: int = 77,
        text_init_ckpt: str | None = None,
        gradient_checkpointing: bool = False,
        image_text_weight: float = 1.0,
        speech_text_weight: float = 1.0,
        loss: Literal["infonce", "siglip", "triplet", "npair", "circle"] = "infonce",
        loss_kwargs: dict | None = None,
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
        lr: float = 5e-4,
        weight_decay: float = 0.2,
        betas: tuple[float, float] = (0.9, 0.98),
        eps: float = 1e-6,
        warmup_steps: int | float = 0.05,
        schedule: Schedule = "cosine",
        max_nonfinite_in_row: int = 20,
    ) -> None:
        """
        Args:
            vocab_size: the shared text vocabulary (linked from the DataModule's tokenizer by the CLI).
            embed_dim: width of the joint embedding space of all three modalities.
            image_tower: `ImageTextModule` arguments of the image tower (image_arch, image_size, vit_*,
                image_dropout); its defaults otherwise (ViT-B/16 at 224 px).
            speech_tower: `SpeechTextModule` arguments of the speech tower (sample_rate, n_mels, speech_*,
                encoder, conv_channels, SpecAugment); its defaults otherwise.
            text_size: BERT preset of the shared text tower; the three below override it.
            text_layers: override the text preset's layer count.
            text_hidden: override the text preset's width (heads default to width / 64).
            text_heads: override the text preset's head count.
            text_dropout: dropout in the text tower (also attention dropout).
            text_pooling: 'first' ([CLS] state), 'cls' (BERT's tanh pooler) or 'mean'.
            max_text_len: the text tower's position table; at least both DataModules' context_length.
            text_init_ckpt: an `MLMPretrainingModule` checkpoint to start the text tower from.
            gradient_checkpointing: recompute Transformer blocks in backward to save memory.
            image_text_weight: weight of the image-text loss in the sum.
            speech_text_weight: weight of the speech-text loss in the sum.
            loss: contrastive loss of the shared loss library, for both tasks.
            loss_kwargs: extra arguments of the loss.
            init_logit_scale: initial inverse temperature of each task (each learns its own).
            max_logit_scale: clamp of the inverse temperatures.
            init_logit_bias: initial logit bias (SigLIP); None for no bias.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW decay on matrices.
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: linear warmup steps, or a fraction of all steps when < 1.
            schedule: decay after warmup: linear, cosine or constant.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
        """
        super().__init__()
        self.save_hyperparameters()
        self.max_nonfinite_in_row = max_nonfinite_in_row
        shared = dict(
            vocab_size=vocab_size,
            embed_dim=embed_dim,
            loss=loss,
            loss_kwargs=loss_kwargs,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            init_logit_bias=init_logit_bias,
            gradient_checkpointing=gradient_checkpointing,
        )
        text = dict(
            text_size=text_size,
            text_layers=text_layers,
            text_hidden=text_hidden,
            text_heads=text_heads,
            text_dropout=text_dropout,
            text_pooling=text_pooling,
            max_text_len=max_text_len,
        )
        for name, tower in (("image_tower", image_tower), ("speech_tower", speech_tower)):
            reserved = sorted((tower or {}).keys() & {*shared, *text, "text_init_ckpt"})
            if reserved:
                raise ValueError(
                    f"model.{name} sets {reserved}: set them once, as model.<name>, for both tasks"
                )
        # Built in an empty context: inside LightningCLI's they would save its hyperparameters (this module's)
        # as their own.
        self.image_text = contextvars.Context().run(
            ImageTextModule, **shared, **text, **(image_tower or {}), text_init_ckpt=text_init_ckpt
        )
        self.speech_text = contextvars.Context().run(
            SpeechTextModule, **shared, **text, **(speech_tower or {})
        )
        self.speech_text.text = self.image_text.text  # one text tower: both objectives train it
        self.weights = {"image_text": image_text_weight, "speech_text": speech_text_weight}
        # images against utterances; the other four directions are the two systems' own metrics
        self.image_speech = nn.ModuleDict(
            {stage: RetrievalRecall(prefix_a2b="i2a", prefix_b2a="a2i") for stage in ("val", "test")}
        )
        self.eval_loss = nn.ModuleDict(
            {f"{stage}_{task}": MeanMetric() for stage in ("val", "test") for task in TASKS}
        )

    def system(self, task: str) -> ContrastiveModule:
        return self.image_text if task == "image_text" else self.speech_text

    @property
    def text(self) -> nn.Module:
        return self.image_text.text

    def setup(self, stage: str) -> None:
        # what each system checks of its DataModule, checked here against the tri-modal DataModule's two
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "task"):
            return
        for task in TASKS:
            data, model = dm.task(task).hparams, self.system(task).hparams
            if data.get("context_length", 0) > model.max_text_len:
                raise ValueError(
                    f"{task} context_length ({data['context_length']}) exceeds model.max_text_len "
                    f"({model.max_text_len}), the text tower's position table"
                )
        image, speech = dm.task("image_text").hparams, dm.task("speech_text").hparams
        image_model, speech_model = self.image_text.hparams, self.speech_text.hparams
        if image_model.image_arch != "resnet50" and image.get("image_size") != image_model.image_size:
            raise ValueError(
                f"image_text image_size ({image['image_size']}) differs from model.image_tower.image_size "
                f"({image_model.image_size}), the size the ViT's position table is made for"
            )
        if speech.get("sample_rate") != speech_model.sample_rate:
            raise ValueError(
                f"speech_text sample_rate ({speech['sample_rate']}) differs from model.speech_tower.sample_rate "
                f"({speech_model.sample_rate})"
            )

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) normalised pixels -> (B, embed_dim) unit vectors."""
        return self.image_text.encode_image(images)

    def encode_speech(self, waveforms: Tensor, wave_lengths: Tensor) -> Tensor:
        """(B, T) zero-padded waveforms and their (B,) lengths -> (B, embed_dim) unit vectors."""
        return F.normalize(self.speech_text.speech(waveforms, wave_lengths), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return self.image_text.encode_text(input_ids, attention_mask)

    # training ---------------------------------------------------------------------------------
    def task_loss(self, task: str, batch: dict) -> Tensor:
        """One task's contrastive loss. A batch every item of which failed to decode gives a zero that reaches
        the task's parameters (under DDP every rank must join every gradient all-reduce)."""
        system = self.system(task)
        if len(batch[_ROWS[task]]):
            return system.pair_loss(system.embed(batch, "train"))
        if task == "image_text":  # embeds a blank row, so a rank that gathers still joins the all_gather
            return system.pair_loss(system.embed(batch, "train")) * 0.0
        return zero_loss(system)

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> Tensor | None:
        losses = {task: self.task_loss(task, batch[task]) for task in TASKS}
        loss = sum(self.weights[task] * losses[task] for task in TASKS)
        for task in TASKS:
            rows = len(batch[task][_ROWS[task]])
            self.log(f"train/{task}_loss", losses[task], batch_size=rows)
            self.log(f"train/{task}_logit_scale", self.system(task).logit_scale.detach(), batch_size=rows)
            if "skipped" in batch[task]:
                skipped = float(batch[task]["skipped"])
                self.log(
                    f"train/{task}_skipped_items", skipped, reduce_fx="sum", on_step=False, on_epoch=True
                )
        self.log("train/loss", loss, prog_bar=True)
        return self.skip_if_nonfinite(loss)

    # evaluation -------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, dataloader_idx: int, stage: str) -> None:
        task = TASKS[dataloader_idx]
        system = self.system(task)
        rows = len(batch[_ROWS[task]])
        if not rows:  # every item failed to decode; not scored
            if task == "image_text":  # a blank row joins the other ranks' all_gather, if the loss gathers
                system.pair_loss(system.embed(batch, stage))
            return
        e: PairEmbeddings = system.embed(batch, stage)
        self.eval_loss[f"{stage}_{task}"].update(system.pair_loss(e), rows)
        a = F.normalize(e.a.float(), dim=-1)
        b = F.normalize(e.b.float(), dim=-1)
        system.retrieval[stage].update(a, e.a_keys, e.a_groups, b, e.b_keys, e.b_groups)
        none = a.new_zeros(0, a.shape[1])
        no_ids = e.a_keys.new_zeros(0)
        if task == "image_text":
            self.image_speech[stage].update(a, e.a_keys, e.a_groups, none, no_ids, no_ids)
        elif "image_ids" in batch:  # spoken captions: the speech side, grouped by the image spoken about
            paired = batch["image_ids"] >= 0
            image_ids = batch["image_ids"][paired]
            self.image_speech[stage].update(none, no_ids, no_ids, a[paired], e.a_keys[paired], image_ids)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def _log_eval(self, stage: str) -> None:
        values: dict[str, Tensor] = {}
        # R@mean: of the two trained pairs, not of the emergent image<->speech (reported on spoken COCO only)
        trained: dict[str, Tensor] = {}
        for task in TASKS:
            metric = self.system(task).retrieval[stage]
            if metric.update_called:
                recalls = metric.compute()
                trained.update(recalls)
                values.update({f"{stage}/{k}": v for k, v in recalls.items()})
            metric.reset()
        if trained:
            values[f"{stage}/R@mean"] = mean_recall(trained)
        image_speech = self.image_speech[stage]
        if any(len(k) for k in image_speech.a_keys) and any(len(k) for k in image_speech.b_keys):
            values.update({f"{stage}/{k}": v for k, v in image_speech.compute().items()})
        image_speech.reset()
        losses = {}
        for task in TASKS:
            mean = self.eval_loss[f"{stage}_{task}"]
            if mean.update_called:
                losses[task] = values[f"{stage}/{task}_loss"] = mean.compute()
            mean.reset()
        if losses:
            values[f"{stage}/loss"] = sum(self.weights[task] * loss for task, loss in losses.items())
        self.log_dict(values, prog_bar=stage == "val", add_dataloader_idx=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self):
        total = max(1, int(self.trainer.estimated_stepping_batches))
        hp = self.hparams
        return build_optimizer(
            self,
            hp.lr,
            hp.weight_decay,
            hp.betas,
            hp.eps,
            hp.warmup_steps,
            total,
            hp.schedule,
            no_decay_names=NO_DECAY_NAMES,
            fused=not self.trainer.gradient_clip_val,
        )
