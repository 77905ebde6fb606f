"""Speech-text contrastive alignment (LibriSpeech): a speech tower and a BERT text tower in one joint space.

a = utterances, b = their transcripts. Identical transcripts share a `text_id`: they are positives of each
other in the loss and in Recall@K, never negatives.
"""

from __future__ import annotations

import logging
from typing import Literal

from torch import Tensor

from lightning_modules.components.bert import BertConfig
from lightning_modules.components.encoder import EncoderConfig, SizeName, TransformerEncoder
from lightning_modules.components.speech_tower import SpeechTower, SpeechTowerConfig
from lightning_modules.components.text_tower import TextTower, load_mlm_encoder
from lightning_modules.contrastive_module import ContrastiveModule, PairEmbeddings
from lightning_modules.optim import Schedule
from lightning_modules.resilience import zero_loss

log = logging.getLogger(__name__)


class SpeechTextModule(ContrastiveModule):
    """Aligns utterances with transcripts; logs `val/a2t_R@K` (speech -> text) and `val/t2a_R@K`."""

    row_keys = (
        "waveforms",
        "wave_lengths",
        "input_ids",
        "attention_mask",
        "utt_keys",
        "text_ids",
        "transcripts",
    )

    def __init__(
        self,
        vocab_size: int = 30522,
        embed_dim: int = 512,
        sample_rate: int = 16000,
        n_mels: int = 80,
        speech_size: SizeName = "base",
        speech_layers: int | None = None,
        speech_hidden: int | None = None,
        speech_heads: int | None = None,
        speech_dropout: float = 0.1,
        encoder: Literal["transformer", "conformer"] = "transformer",
        conv_channels: int = 256,
        conformer_kernel_size: int = 31,
        freq_masks: int = 2,
        freq_mask_width: int = 27,
        time_masks: int = 2,
        time_mask_width: int = 40,
        text_size: SizeName = "base",
        text_layers: int | None = None,
        text_hidden: int | None = None,
        text_heads: int | None = None,
        text_dropout: float = 0.1,
        text_pooling: Literal["cls", "first", "mean"] = "first",
        max_text_len: int = 512,
        text_init_ckpt: str | None = None,
        gradient_checkpointing: bool = False,
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
        grad_cache_chunks: int = 1,
    ) -> None:
        """
        Args:
            vocab_size: text vocabulary (linked from the DataModule's tokenizer by the CLI).
            embed_dim: width of the joint embedding space.
            sample_rate: waveform rate (Hz); must match the DataModule's.
            n_mels: log-mel channels (25 ms windows, 10 ms hop).
            speech_size: speech encoder preset (tiny ... large, as for BERT); the three below override it.
            speech_layers: override the preset's layer count.
            speech_hidden: override the preset's width (heads default to width / 64).
            speech_heads: override the preset's head count.
            speech_dropout: dropout in the speech encoder (also attention dropout).
            encoder: the shared pre-LN TransformerEncoder or torchaudio's Conformer.
            conv_channels: channels of the 4x subsampling convolutions.
            conformer_kernel_size: depthwise kernel of the Conformer blocks.
            freq_masks: SpecAugment frequency masks per utterance (training only; 0 disables).
            freq_mask_width: widest frequency mask (mel channels).
            time_masks: SpecAugment time masks per utterance (training only; 0 disables).
            time_mask_width: widest time mask (10 ms frames).
            text_size: BERT preset of the text tower; the three below override it.
            text_layers: override the text preset's layer count.
            text_hidden: override the text preset's width (heads default to width / 64).
            text_heads: override the text preset's head count.
            text_dropout: dropout in the text tower.
            text_pooling: 'first' ([CLS] state), 'cls' (BERT's tanh pooler) or 'mean'.
            max_text_len: the text tower's position table; at least the DataModule's context_length, and equal
                to the MLM checkpoint's max_position_embeddings when one is loaded.
            text_init_ckpt: an `MLMPretrainingModule` checkpoint of this framework to start the text tower
                from (sizes and tokenizer must be the checkpoint's: pass its vocab as --data.tokenizer).
            gradient_checkpointing: recompute Transformer blocks in backward to save memory.
            loss: contrastive loss of the shared loss library.
            loss_kwargs: extra arguments of the loss (e.g. {"gather": false}, {"margin": 0.2}).
            init_logit_scale: initial inverse temperature.
            max_logit_scale: clamp of the inverse temperature.
            init_logit_bias: initial logit bias (SigLIP); None for no bias.
            lr: peak learning rate of AdamW.
            weight_decay: AdamW decay on matrices.
            betas: AdamW betas.
            eps: AdamW epsilon.
            warmup_steps: linear warmup steps, or a fraction of all steps when < 1.
            schedule: decay after warmup: linear, cosine or constant.
            max_nonfinite_in_row: a NaN/Inf loss skips its step; this many in a row stop the run.
            grad_cache_chunks: gradient caching: embed each training batch in this many chunks and backpropagate
                the whole batch's loss chunk by chunk, so the loss sees the whole batch while activations are held
                for one chunk; same gradients (BatchNorm aside: it normalises per chunk) for about one more
                forward pass of compute. 1 = off. Optimises manually (the trainer's gradient_clip_val still
                applies); accumulate_grad_batches must be 1.
        """
        super().__init__(
            loss=loss,
            loss_kwargs=loss_kwargs,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale,
            init_logit_bias=init_logit_bias,
            prefixes=("a2t", "t2a"),
            lr=lr,
            weight_decay=weight_decay,
            betas=betas,
            eps=eps,
            warmup_steps=warmup_steps,
            schedule=schedule,
            max_nonfinite_in_row=max_nonfinite_in_row,
            grad_cache_chunks=grad_cache_chunks,
        )
        self.save_hyperparameters()
        speech_cfg = EncoderConfig.from_size(
            speech_size,
            num_layers=speech_layers,
            hidden_size=speech_hidden,
            num_heads=speech_heads or (speech_hidden // 64 if speech_hidden else None),
            dropout=speech_dropout,
            attention_dropout=speech_dropout,
            norm_first=True,  # pre-LN: trains from scratch without the warmup tricks post-LN needs
            layer_norm_eps=1e-5,
        )
        self.speech = SpeechTower(
            SpeechTowerConfig(
                sample_rate=sample_rate,
                n_mels=n_mels,
                freq_masks=freq_masks,
                freq_mask_width=freq_mask_width,
                time_masks=time_masks,
                time_mask_width=time_mask_width,
                conv_channels=conv_channels,
                encoder=encoder,
                conformer_kernel_size=conformer_kernel_size,
            ),
            speech_cfg,
            embed_dim,
        )
        text_cfg = BertConfig.from_size(
            text_size,
            num_layers=text_layers,
            hidden_size=text_hidden,
            num_heads=text_heads or (text_hidden // 64 if text_hidden else None),
            dropout=text_dropout,
            attention_dropout=text_dropout,
            vocab_size=vocab_size,
            max_position_embeddings=max_text_len,
        )
        self.text = TextTower(text_cfg, embed_dim, text_pooling)
        if text_init_ckpt:
            load_mlm_encoder(self.text, text_init_ckpt)
        self.text.bert.encoder.gradient_checkpointing = gradient_checkpointing
        if isinstance(self.speech.encoder, TransformerEncoder):  # torchaudio's Conformer has no such switch
            self.speech.encoder.gradient_checkpointing = gradient_checkpointing

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        hp = getattr(dm, "hparams", {})
        if hp.get("context_length", 0) > self.hparams.max_text_len:
            raise ValueError(
                f"data.context_length ({hp['context_length']}) exceeds model.max_text_len "
                f"({self.hparams.max_text_len}), the text tower's position table"
            )
        if hp.get("sample_rate", self.hparams.sample_rate) != self.hparams.sample_rate:
            raise ValueError(
                f"data.sample_rate ({hp['sample_rate']}) differs from model.sample_rate ({self.hparams.sample_rate})"
            )

    def embed(self, batch: dict, stage: str) -> PairEmbeddings:
        speech = self.speech(batch["waveforms"], batch["wave_lengths"])
        text = self.text(batch["input_ids"], batch["attention_mask"])
        keys, groups = batch["utt_keys"], batch["text_ids"]
        return PairEmbeddings(a=speech, b=text, a_keys=keys, a_groups=groups, b_keys=keys, b_groups=groups)

    # An empty batch (every file in it failed to decode) -------------------------------------------
    # Training returns a zero loss that touches every parameter instead of None: under DDP every rank must
    # take part in the gradient all-reduce of every step, and returning None from one rank would hang the
    # others. Caveat: with the loss's cross-rank gather on (the default), the other ranks also wait for this
    # rank in the embeddings' all_gather, which an empty rank cannot join.
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        if len(batch["utt_keys"]) == 0:
            log.warning("training batch %d is empty (all %d files undecodable)", batch_idx, batch["skipped"])
            self._log_skipped(batch, "train")
            loss = zero_loss(self)
            return self._manual_zero_loss_step(loss)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["utt_keys"]):
            super().validation_step(batch, batch_idx)
        else:
            self._log_skipped(batch, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        if len(batch["utt_keys"]):
            super().test_step(batch, batch_idx)
        else:
            self._log_skipped(batch, "test")
