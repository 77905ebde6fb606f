"""Fine-tuning a pretrained BERT: sequence (and sentence-pair) classification, and token classification (NER).

The encoder comes from `init_ckpt` (an MLM checkpoint of this framework; architecture from its saved
hyperparameters) or `init_from_hf` (a Hugging Face BERT folder); with neither, a fresh encoder of the shape
`encoder` is trained from scratch, a baseline. `optimizer.layer_decay` turns on layer-wise learning-rate decay
(see `llrd.py`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassF1Score

from datamodules.masking import IGNORE_INDEX
from datamodules.text.conll_datamodule import CONLL2003_LABELS
from lightning_modules.components.bert import BertModel
from lightning_modules.components.bert_finetune import SequenceClassifier, TokenClassifier, pretrained_bert
from lightning_modules.components.ner_metrics import EntityF1
from lightning_modules.components.towers import EncoderShape
from lightning_modules.training.checkpoint_io import CheckpointExtras
from lightning_modules.training.ema import EMAConfig
from lightning_modules.training.hparams import (
    FINETUNE_ENCODER,
    FINETUNE_OPTIMIZER,
    ReadsFlatHparams,
    bert_config,
    section,
)
from lightning_modules.training.llrd import build_llrd_optimizer
from lightning_modules.training.nonfinite import SkipNonFiniteSteps
from lightning_modules.training.optim import OptimizerConfig

STAGES = ("val", "test")


class FineTuneModule(ReadsFlatHparams, SkipNonFiniteSteps, CheckpointExtras):
    """What both tasks share: the pretrained encoder, the optimizer with optional LLRD, the training step."""

    DEFAULT_ENCODER, DEFAULT_OPTIMIZER = FINETUNE_ENCODER, FINETUNE_OPTIMIZER

    def __init__(
        self,
        init_ckpt: str | None = None,
        init_from_hf: str | None = None,
        vocab_size: int | None = None,
        encoder: EncoderShape = FINETUNE_ENCODER,
        max_position_embeddings: int = 512,
        classifier_dropout: float | None = None,
        optimizer: OptimizerConfig = FINETUNE_OPTIMIZER,
        max_nonfinite_in_row: int = 20,
        ema: EMAConfig | None = None,
    ) -> None:
        """
        Args:
            init_ckpt: an MLM checkpoint of this framework to start from (read with weights_only=True).
            init_from_hf: a Hugging Face BERT folder (config.json + weights) to start from.
            vocab_size: vocabulary size (linked from the DataModule's tokenizer; must match the checkpoint's).
            encoder: shape of a fresh encoder (neither init_ckpt nor init_from_hf: a from-scratch baseline); a
                pretrained encoder has its checkpoint's shape.
            max_position_embeddings: length of the position table (fresh encoder only).
            classifier_dropout: dropout before the classifier; None takes the encoder's hidden dropout.
            optimizer: AdamW and its schedule (lr 3e-5, weight decay 0.01, 10% warmup, linear decay by default);
                layer_decay d gives block l of L the rate lr * d^(L - l), the embeddings lr * d^(L + 1).
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            ema: an exponential moving average of the weights (lightning_modules/training/ema.py); None: none.
        """
        super().__init__()
        self.save_hyperparameters()
        encoder, optimizer = section(FINETUNE_ENCODER, encoder), section(FINETUNE_OPTIMIZER, optimizer)
        # the whole sections, as plain dicts: a checkpoint loads with weights_only=True
        self.hparams.update(encoder=asdict(encoder), optimizer=asdict(optimizer))
        self.optimizer_config = optimizer
        self.max_nonfinite_in_row = max_nonfinite_in_row

    def pretrained_encoder(self) -> tuple[BertModel, float]:
        """The encoder the head goes on, and the head's dropout."""
        h = self.hparams
        fresh = bert_config(h.encoder, h.vocab_size or 30522, h.max_position_embeddings)
        bert = pretrained_bert(h.init_ckpt, h.init_from_hf, fresh)
        if h.vocab_size is not None and bert.cfg.vocab_size != h.vocab_size:
            raise ValueError(
                f"the pretrained encoder has a vocabulary of {bert.cfg.vocab_size} tokens but the data's tokenizer "
                f"has {h.vocab_size}: give the data module the checkpoint's own tokenizer (--data.tokenizer.path)"
            )
        return bert, bert.cfg.dropout if h.classifier_dropout is None else h.classifier_dropout

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"))

    def model_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch, "train")
        # averaged over ranks in the step's one all-reduce, with the non-finite check
        self.log("train/loss", self.rank_means(loss, loss=loss)["loss"])
        # the last group is the head's, at the full lr also with layer_decay
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"] if self._trainer else 0.0)
        return self.skip_if_nonfinite(loss)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        m = self.metrics[stage]
        if not m["loss"].update_called:
            return
        values = {}
        for name, metric in m.items():
            value = metric.compute()
            # EntityF1 gives a dict: precision, recall, f1, f1_<TYPE>
            values.update(
                {f"{stage}/{k}": v for k, v in value.items()}
                if isinstance(value, dict)
                else {f"{stage}/{name}": value}
            )
            metric.reset()
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self) -> dict:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return build_llrd_optimizer(
            self.model, self.model.bert, self.optimizer_config, total, fused=self.fused_adamw_allowed()
        )


class SequenceClassificationModule(FineTuneModule):
    """loss = CE(W dropout(pooled [CLS]) + b, label); a sentence or a pair `[CLS] A [SEP] B [SEP]`.

    Metrics: accuracy, and F1 of class 1 with two classes (MRPC, QQP) or macro F1 with more (MNLI).
    """

    def __init__(self, num_labels: int = 2, **kwargs) -> None:
        """
        Args:
            num_labels: number of classes (the data module's label list must be as long).
        """
        super().__init__(**kwargs)
        self.model = SequenceClassifier(*self.pretrained_encoder(), num_labels)
        self.metrics = nn.ModuleDict(
            {
                stage: MetricCollection(
                    {
                        "loss": MeanMetric(),
                        "acc": MulticlassAccuracy(num_labels, average="micro"),
                        "f1": BinaryF1Score()
                        if num_labels == 2
                        else MulticlassF1Score(num_labels, average="macro"),
                    }
                )
                for stage in STAGES
            }
        )

    def setup(self, stage: str) -> None:
        labels = getattr(getattr(self.trainer, "datamodule", None), "labels", None)
        if labels is not None and len(labels) != self.hparams.num_labels:
            raise ValueError(
                f"the data has {len(labels)} classes {labels}, the model {self.hparams.num_labels}: set --model.num_labels"
            )

    def model_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.float(), labels)
        preds = logits.argmax(-1)
        if stage == "train":
            self.log("train/acc", (preds == labels).float().mean())
            return loss
        m = self.metrics[stage]
        m["loss"].update(loss.detach(), labels.numel())
        m["acc"].update(preds, labels)
        m["f1"].update(preds, labels)
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Class index per example, with the example's `index` (the GLUE submission's id)."""
        return {"index": batch["index"], "prediction": self(batch).argmax(-1)}


class TokenClassificationModule(FineTuneModule):
    """loss = CE over each word's first word piece; scores: entity-level precision, recall and F1 over whole
    sentences (a word without a piece, cut off by max_length, counts as predicted O)."""

    def __init__(self, labels: list[str] | None = None, strict: bool = False, **kwargs) -> None:
        """
        Args:
            labels: the tag set, IOB1 or IOB2 (class index = position); None: CoNLL-2003's
                O, B-PER, I-PER, B-ORG, I-ORG, B-LOC, I-LOC, B-MISC, I-MISC. Must equal the data module's.
            strict: score entities as seqeval's strict IOB2 mode (an entity must start with B-); False counts
                as conlleval and seqeval's default do, which also reads IOB1.
        """
        labels = list(labels or CONLL2003_LABELS)
        if "O" not in labels:
            raise ValueError(f"the labels {labels} have no O tag")
        super().__init__(**kwargs)
        self.model = TokenClassifier(*self.pretrained_encoder(), len(labels))
        self.labels = labels
        self.outside = labels.index("O")
        self.metrics = nn.ModuleDict(
            {
                stage: nn.ModuleDict({"loss": MeanMetric(), "entities": EntityF1(labels, strict)})
                for stage in STAGES
            }
        )

    def setup(self, stage: str) -> None:
        labels = getattr(getattr(self.trainer, "datamodule", None), "labels", None)
        if labels is not None and list(labels) != self.labels:
            raise ValueError(
                f"the data's labels {list(labels)} differ from the model's {self.labels}: set --model.labels"
            )

    def word_predictions(self, logits: Tensor, word_pos: Tensor) -> Tensor:
        """(B, W) class of each word: the prediction at its first piece, O where it has none."""
        at_first = logits.argmax(-1).gather(1, word_pos.clamp_min(0))
        return torch.where(word_pos >= 0, at_first, torch.full_like(at_first, self.outside))

    def model_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        logits = self(batch)
        labels = batch["labels"]
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        if stage == "train":
            scored = labels != IGNORE_INDEX
            self.log("train/acc", (logits.argmax(-1)[scored] == labels[scored]).float().mean())
            return loss
        gold = batch["word_labels"]
        preds = self.word_predictions(logits, batch["word_pos"])
        lengths = (gold != IGNORE_INDEX).sum(1).tolist()
        m = self.metrics[stage]
        m["loss"].update(loss.detach(), sum(lengths))
        m["entities"].update(
            [p[:n] for p, n in zip(preds.tolist(), lengths)], [g[:n] for g, n in zip(gold.tolist(), lengths)]
        )
        return loss

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict:
        """The tags of each sentence's words, with the sentence's number in its file (`index`)."""
        preds = self.word_predictions(self(batch), batch["word_pos"])
        lengths = (batch["word_labels"] != IGNORE_INDEX).sum(1).tolist()
        tags = [[self.labels[i] for i in p[:n]] for p, n in zip(preds.tolist(), lengths)]
        return {"index": batch["index"], "tags": tags}
