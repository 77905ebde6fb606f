"""Images, speech and text in one embedding space: the image-text and the speech-text systems trained together
on one text tower.

    loss = image_text_weight * L(images, captions) + speech_text_weight * L(utterances, transcripts)

Each step takes one COCO batch and one LibriSpeech batch (datamodules/trimodal_datamodule.py). The module
holds the two systems' contrastive pairs built on ONE text tower object, so both objectives train it; each
pair keeps its own temperature, as the two tasks differ in difficulty. Images and speech meet only through the
text: evaluation reports i2t/t2i, a2t/t2a and, when the utterances speak the COCO captions, i2a/a2i."""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_modules.components.contrastive import (
    ContrastivePair,
    as_config,
)
from lightning_modules.components.image_tower import ImageTower, ImageTowerConfig
from lightning_modules.components.retrieval import RetrievalRecall, mean_recall
from lightning_modules.components.speech_tower import SpeechTowerConfig, build_speech_tower
from lightning_modules.components.text_tower import TextTower, TextTowerConfig, build_text_tower
from lightning_modules.contrastive_module import AlignmentModule, log_empty
from lightning_modules.image_text_module import ImageTextPair, adopt_recorded_statistics
from lightning_modules.speech_text_module import SpeechTextPair
from lightning_modules.training.prediction import embedding_prediction

TASKS = ("image_text", "speech_text")  # the order of the evaluation loaders, as in TriModalDataModule
_IMAGE, _SPEECH, _TEXT = ImageTowerConfig(), SpeechTowerConfig(), TextTowerConfig()


class TriModalModule(AlignmentModule):
    """Aligns images, speech and text; logs `val/{i2t,t2i,a2t,t2a,i2a,a2i}_R@K`, `val/R@mean` (of
    i2t, t2i, a2t, t2a) and `train/loss`."""

    def __init__(
        self,
        image: ImageTowerConfig = _IMAGE,
        speech: SpeechTowerConfig = _SPEECH,
        text: TextTowerConfig = _TEXT,
        image_text_weight: float = 1.0,
        speech_text_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            image: the image tower (model.image.arch, .image_size, ...).
            speech: the speech tower (model.speech.size, .encoder, SpecAugment, ...).
            text: the one text tower both tasks train (model.text.size, .max_len, ...).
            image_text_weight: weight of the image-text loss in the sum.
            speech_text_weight: weight of the speech-text loss in the sum.
            kwargs: `AlignmentModule`'s arguments: vocab_size, embed_dim, loss (each task learns its own
                temperature from its settings), optimizer, max_nonfinite_in_row.
        """
        super().__init__(**kwargs)
        image, speech = as_config(ImageTowerConfig, image), as_config(SpeechTowerConfig, speech)
        text = as_config(TextTowerConfig, text)
        self.tower_configs = {"image": image, "speech": speech, "text": text}
        embed_dim, loss = self.embed_dim, self.loss_config
        image_tower = ImageTower(image, embed_dim)  # built first, as in image-text: the same initial weights
        shared_text = build_text_tower(text, self.vocab_size, embed_dim)  # one object: both tasks train it
        self.image_text = ImageTextPair(image_tower, shared_text, embed_dim, loss)
        self.speech_text = SpeechTextPair(build_speech_tower(speech, embed_dim), shared_text, embed_dim, loss)
        self.weights = {"image_text": image_text_weight, "speech_text": speech_text_weight}
        # images against utterances; the other four directions are the two pairs' own metrics
        self.image_speech = nn.ModuleDict(
            {stage: RetrievalRecall(prefix_a2b="i2a", prefix_b2a="a2i") for stage in ("val", "test")}
        )
        self.eval_loss = nn.ModuleDict(
            {f"{stage}_{task}": MeanMetric() for stage in ("val", "test") for task in TASKS}
        )
        self.lock_towers()

    def towers(self) -> dict[str, tuple[nn.Module, Any]]:
        configs = self.tower_configs
        return {
            "image": (self.image_text.image, configs["image"]),
            "speech": (self.speech_text.speech, configs["speech"]),
            "text": (self.image_text.text, configs["text"]),
        }

    def pair(self, task: str) -> ContrastivePair:
        return self.image_text if task == "image_text" else self.speech_text

    @property
    def text(self) -> TextTower:
        return self.image_text.text

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        data = (checkpoint.get("datamodule_hyper_parameters") or {}).get("image_text") or {}
        adopt_recorded_statistics(self.image_text.image, self.hparams["image"], data)

    def setup(self, stage: str) -> None:
        # what each two-tower system checks of its DataModule, checked here against the tri-modal DataModule's two
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is None or not hasattr(dm, "task"):
            return
        towers = self.tower_configs
        for task in TASKS:
            towers["text"].check_data(dm.task(task).hparams, f"data.{task}")
        towers["image"].check_data(dm.task("image_text").hparams, "data.image_text")
        self.image_text.image.check_data(dm.task("image_text").hparams, "data.image_text")
        towers["speech"].check_data(dm.task("speech_text").hparams, "data.speech_text")

    # inference --------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) uint8 pixels (or float ones already normalised) -> (B, embed_dim) unit vectors."""
        return F.normalize(self.image_text.image(images), dim=-1)

    def encode_speech(self, waveforms: Tensor, wave_lengths: Tensor) -> Tensor:
        """(B, T) zero-padded waveforms and their (B,) lengths -> (B, embed_dim) unit vectors."""
        return F.normalize(self.speech_text.speech(waveforms, wave_lengths), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) token ids and mask -> (B, embed_dim) unit vectors."""
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """Unit embeddings of whatever the batch holds (images, utterances, captions or transcripts), with their
        ids, all in the one space (`PredictionWriter`)."""
        return embedding_prediction(
            batch,
            image=self.encode_image,
            speech=self.encode_speech,
            text=self.encode_text,
            text_kind=batch.get("text_kind", "caption"),
        )

    # training ---------------------------------------------------------------------------------
    def task_loss(self, task: str, batch: dict) -> Tensor:
        """One task's loss as this rank backpropagates it (rank-weighted; a connected zero for an empty batch)."""
        return self.pair(task).training_loss(batch)[0]

    def training_step(self, batch: dict[str, dict], batch_idx: int) -> Tensor | None:
        losses, rows = {}, {}
        for task in TASKS:
            losses[task], rows[task] = self.pair(task).training_loss(batch[task])
        loss = sum(self.weights[task] * losses[task] for task in TASKS)
        # averaged over ranks in the step's one all-reduce, with the non-finite check
        means = self.rank_means(loss, loss=loss, **{task: losses[task] for task in TASKS})
        for task in TASKS:
            self.log(f"train/{task}_loss", means[task], batch_size=rows[task])
            logit_scale = self.pair(task).logit_scale.detach()
            self.log(f"train/{task}_logit_scale", logit_scale, batch_size=rows[task])
            log_empty(self, batch[task], rows[task], "train", f"{task}_")
        self.log("train/loss", means["loss"], batch_size=sum(rows.values()))
        return self.skip_if_nonfinite(loss)

    # evaluation -------------------------------------------------------------------------------
    def _eval_step(self, batch: dict, dataloader_idx: int, stage: str) -> None:
        task = TASKS[dataloader_idx]
        pair = self.pair(task)
        rows = pair.rows(batch)
        loss, e = pair.evaluate(batch, stage)  # unit embeddings; zero rows for an empty batch
        self.eval_loss[f"{stage}_{task}"].update(loss, rows)
        log_empty(self, batch, rows, stage, f"{task}_")
        none = e.a.new_zeros(0, e.a.shape[1])
        no_ids = e.a_keys.new_zeros(0)
        if task == "image_text":
            self.image_speech[stage].update(e.a, e.a_keys, e.a_groups, none, no_ids, no_ids)
        elif "image_ids" in batch:  # spoken captions: the speech side, grouped by the image spoken about
            paired = batch["image_ids"] >= 0
            image_ids = batch["image_ids"][paired]
            self.image_speech[stage].update(none, no_ids, no_ids, e.a[paired], e.a_keys[paired], image_ids)

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "val")

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._eval_step(batch, dataloader_idx, "test")

    def _log_eval(self, stage: str) -> None:
        values: dict[str, Tensor] = {}
        # R@mean: of the two trained pairs, not of the emergent image<->speech (reported on spoken COCO only)
        trained: dict[str, Tensor] = {}
        for task in TASKS:
            metric = self.pair(task).retrieval[stage]
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
