"""BERT pretraining system: masked-language modelling plus optional next-sentence prediction."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from datamodules.masking import IGNORE_INDEX
from lightning_modules.components.bert import BertForPreTraining, SparseLayout
from lightning_modules.components.hf_interop import load_hf_bert, save_hf_bert
from lightning_modules.components.towers import EncoderShape
from lightning_modules.training.checkpoint_io import CheckpointExtras
from lightning_modules.training.ema import EMAConfig
from lightning_modules.training.hparams import (
    MLM_ENCODER,
    MLM_OPTIMIZER,
    ReadsFlatHparams,
    bert_config,
    section,
)
from lightning_modules.training.llrd import build_llrd_optimizer
from lightning_modules.training.nonfinite import SkipNonFiniteSteps
from lightning_modules.training.optim import OptimizerConfig


class MLMPretrainingModule(ReadsFlatHparams, SkipNonFiniteSteps, CheckpointExtras):
    """loss = CE(MLM logits at masked positions) + CE(NSP logits) when the batch holds NSP pairs.

    The MLM head runs only at the masked positions, its vocabulary projection fused with the cross-entropy in
    blocks (`BertForPreTraining.pretraining_outputs`): the same loss and gradients as the dense computation
    (tested), at a fraction of the cost.
    """

    DEFAULT_ENCODER, DEFAULT_OPTIMIZER = MLM_ENCODER, MLM_OPTIMIZER

    def __init__(
        self,
        vocab_size: int = 30522,
        encoder: EncoderShape = MLM_ENCODER,
        max_position_embeddings: int = 512,
        pad_token_id: int = 0,
        init_from_hf: str | None = None,
        optimizer: OptimizerConfig = MLM_OPTIMIZER,
        gradient_checkpointing: bool = False,
        compile: bool = False,
        max_nonfinite_in_row: int = 20,
        ema: EMAConfig | None = None,
    ) -> None:
        """
        Args:
            vocab_size: vocabulary size (linked from the DataModule's tokenizer).
            encoder: BERT size preset and overrides of its shape (model.encoder.size, .layers, .hidden, ...);
                BERT's dropout 0.1 and post-LN by default.
            max_position_embeddings: length of the position table.
            pad_token_id: id of [PAD].
            init_from_hf: a Hugging Face BERT folder (config.json + weights) to start from; its shape replaces
                `encoder`'s.
            optimizer: AdamW and its schedule (BERT's: lr 1e-4, betas (0.9, 0.999), weight decay 0.01, 10000
                warmup steps, linear decay); layer_decay gives the encoder's lower layers lower rates.
            gradient_checkpointing: recompute encoder blocks in backward to save memory.
            compile: wrap the model in torch.compile.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            ema: an exponential moving average of the weights (lightning_modules/training/ema.py); None: none.
        """
        super().__init__()
        self.save_hyperparameters()
        encoder, optimizer = section(MLM_ENCODER, encoder), section(MLM_OPTIMIZER, optimizer)
        # the whole sections, as plain dicts: a checkpoint loads with weights_only=True
        self.hparams.update(encoder=asdict(encoder), optimizer=asdict(optimizer))
        self.optimizer_config = optimizer
        self.max_nonfinite_in_row = max_nonfinite_in_row
        if init_from_hf:
            self.model = load_hf_bert(init_from_hf)
            if self.model.cfg.vocab_size != vocab_size:
                raise ValueError(
                    f"{init_from_hf} has a vocabulary of {self.model.cfg.vocab_size} tokens but the data's tokenizer "
                    f"has {vocab_size}: pass the checkpoint's vocab.txt as --data.tokenizer.path"
                )
        else:
            cfg = bert_config(encoder, vocab_size, max_position_embeddings, pad_token_id)
            self.model = BertForPreTraining(cfg)
        self.model.bert.encoder.gradient_checkpointing = gradient_checkpointing
        if compile:
            # the encoder, in place: the parameters keep their names, so checkpoints and the HF export are
            # unchanged; the heads' fused loss stays eager
            self.model.bert.compile()
        self.metrics = torch.nn.ModuleDict(
            {
                stage: MetricCollection(
                    {
                        "loss": MeanMetric(),
                        "mlm_loss": MeanMetric(),
                        "mlm_acc": MeanMetric(),  # top-1 hits over all masked tokens
                        "nsp_acc": MulticlassAccuracy(2, average="micro"),
                    },
                    prefix=f"{stage}/",
                )
                for stage in ("val", "test")
            }
        )

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        masked = batch["labels"] != IGNORE_INDEX
        return self.model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), masked)

    def model_step(self, batch: dict[str, Tensor], stage: str) -> Tensor:
        out = self.model.pretraining_outputs(
            batch["input_ids"],
            batch["attention_mask"],
            batch.get("token_type_ids"),
            batch["labels"],
            IGNORE_INDEX,
            SparseLayout.of_batch(batch),  # the collate's: no shape is read from the device
        )
        n = out.mlm_targets.numel()
        nsp_loss = None
        if "nsp_labels" in batch:  # the DataModule decides: NSP pairs carry labels, packed text none
            nsp_loss = F.cross_entropy(out.nsp_logits.float(), batch["nsp_labels"])
        if stage == "train":
            return self.train_loss(out.mlm_loss_sum, n, nsp_loss, out.mlm_hits, out.nsp_logits, batch)
        mlm_loss = out.mlm_loss_sum / n
        loss = mlm_loss if nsp_loss is None else mlm_loss + nsp_loss
        m = self.metrics[stage]
        m["loss"].update(loss.detach(), n)
        m["mlm_loss"].update(mlm_loss.detach(), n)
        m["mlm_acc"].update(out.mlm_hits.float())  # one weight per masked token
        if nsp_loss is not None:
            m["nsp_acc"].update(out.nsp_logits.detach(), batch["nsp_labels"])
        return loss

    def train_loss(
        self,
        loss_sum: Tensor,
        count: int,
        nsp_loss: Tensor | None,
        hits: Tensor,
        nsp_logits: Tensor,
        batch: dict[str, Tensor],
    ) -> Tensor:
        """Mean cross-entropy over the masked tokens of the whole global batch (+ NSP), from the local sum and count.

        Ranks hold different numbers of masked tokens, so with several ranks each one's summed loss is divided by
        the global count and multiplied by the world size, which DDP's gradient average divides out again: 2 ranks
        x batch B then give the gradient of 1 rank x batch 2B, not an average of per-rank means. The count, the
        logged global losses and the non-finite check share the step's one all-reduce (`reduce_step`). No masked
        token at all gives NaN (0 / 0) on one rank, which the non-finite guard skips.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        nsp = nsp_loss if nsp_loss is not None else loss_sum.new_zeros(())
        sums = self.reduce_step(loss_sum + nsp, count=count, mlm_loss_sum=loss_sum.detach(), nsp=nsp.detach())
        if world == 1:
            mlm_loss = loss_sum / count
        else:
            mlm_loss = loss_sum * world / sums["count"].clamp_min(1.0)
        # the global means, from the sums: the logger needs no all-reduce of its own
        global_mlm = sums["mlm_loss_sum"] / sums["count"]
        self.log("train/mlm_loss", global_mlm)
        self.log("train/loss", global_mlm + sums["nsp"] / world)
        self.log("train/mlm_acc", hits.float().mean())
        if nsp_loss is None:
            return mlm_loss
        self.log("train/nsp_loss", nsp_loss)
        self.log("train/nsp_acc", (nsp_logits.argmax(-1) == batch["nsp_labels"]).float().mean())
        return mlm_loss + nsp_loss

    # training ---------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.model_step(batch, "train")
        # the last group is the heads', at the full lr also with layer_decay
        self.log("lr", self.trainer.optimizers[0].param_groups[-1]["lr"] if self._trainer else 0.0)
        return self.skip_if_nonfinite(loss)

    # evaluation -------------------------------------------------------------------------------
    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.model_step(batch, "val")

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.model_step(batch, "test")

    def _log_eval(self, stage: str) -> None:
        m = self.metrics[stage]
        if not m["loss"].update_called:
            return
        values = m.compute()
        mlm_loss = values.pop(f"{stage}/mlm_loss")
        values[f"{stage}/perplexity"] = torch.exp(mlm_loss.clamp(max=50.0))
        values[f"{stage}/mlm_loss"] = mlm_loss
        if not m["nsp_acc"].update_called:
            values.pop(f"{stage}/nsp_acc")
        self.log_dict(values, prog_bar=stage == "val", sync_dist=False)
        m.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> dict:
        """The `top_k` most probable tokens (ids and probabilities) at each `[MASK]` (`predict_mask`), in
        row-major order, and how many masks each row has (`PredictionWriter` writes them per line)."""
        masks = batch["predict_mask"]
        k = min(int(batch["top_k"]), self.model.cfg.vocab_size)
        ids, scores = torch.empty(0, k, dtype=torch.long), torch.empty(0, k)
        if masks.any():  # a batch of lines without [MASK] has nothing to run
            logits = self.model(
                batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"), masks
            )[0]
            scores, ids = logits.float().softmax(-1).topk(k, dim=-1)
        return {
            "index": batch["index"],
            "text": batch["text"],
            "masks": masks.sum(1).tolist(),
            "top_ids": ids,
            "top_scores": scores,
        }

    def configure_optimizers(self) -> dict:
        total = max(1, int(self.trainer.estimated_stepping_batches))
        return build_llrd_optimizer(
            self.model, self.model.bert, self.optimizer_config, total, fused=self.fused_adamw_allowed()
        )

    # interop ----------------------------------------------------------------------------------
    def export_hf(self, folder: str | Path, tokenizer=None) -> Path:
        """Write a Hugging Face `BertForPreTraining` folder (config.json, model.safetensors, vocab.txt)."""
        return save_hf_bert(self.model, folder, tokenizer)
