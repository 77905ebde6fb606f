"""Speech tower (features, subsampling, padding invariance, SpecAugment), the speech-text module (MLM init,
empty batches), learning on the tone corpus, and the CLI."""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from datamodules.speech.librispeech_datamodule import LibriSpeechDataModule
from datamodules.synthetic.tones import generate_tone_librispeech
from lightning_modules.components.contrastive import ContrastiveLossConfig
from lightning_modules.components.speech_tower import (
    ConvSubsampling,
    LogMel,
    SpeechTower,
    SpeechTowerConfig,
    lengths_to_mask,
)
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.mlm_module import MLMPretrainingModule
from lightning_modules.speech_text_module import SpeechTextModule
from tests.helpers import cli_args, padded_batch, quiet_trainer

VOCAB = 120
STEPS = 80  # of the learning test
TINY_SPEECH = SpeechTowerConfig("tiny", layers=1, hidden=64, heads=2, conv_channels=8)
TINY_TEXT = TextTowerConfig("tiny", layers=1, hidden=64, heads=2, dropout=0.1, max_len=32)
TINY = dict(embed_dim=32, speech=TINY_SPEECH, text=TINY_TEXT)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


def tower(encoder: str = "transformer", dropout: float = 0.0, **kw) -> SpeechTower:
    cfg = SpeechTowerConfig(
        hidden=64, layers=2, heads=4, dropout=dropout, encoder=encoder, conv_channels=8, **kw
    )
    return SpeechTower(cfg, embed_dim=32)


# -- features and lengths -------------------------------------------------------------------------


def test_log_mel_frames_follow_the_window_and_hop() -> None:
    feats = LogMel(SpeechTowerConfig())  # 16 kHz: 400-sample window, 160-sample hop
    waves, lengths = padded_batch([16000, 560, 559, 401, 400, 399, 1])
    x, frames = feats(waves, lengths)
    assert frames.tolist() == [98, 2, 1, 1, 1, 1, 1]  # 1 + (max(T, 400) - 400) // 160
    assert x.shape == (7, 98, 80)
    # at 8 kHz the same 25 ms / 10 ms are 200 / 80 samples
    assert (
        LogMel(SpeechTowerConfig(sample_rate=8000, n_mels=40)).num_frames(torch.tensor([8000])).item() == 98
    )


def test_log_mel_of_a_padded_utterance_equals_the_unpadded_one() -> None:
    feats = LogMel(SpeechTowerConfig())
    waves, lengths = padded_batch([12000, 5000, 300])
    x, frames = feats(waves, lengths)
    for i, n in enumerate(lengths.tolist()):
        alone, _ = feats(waves[i : i + 1, :n], lengths[i : i + 1])
        # other STFT shapes, then a log that magnifies small values' rounding
        assert torch.allclose(x[i, : frames[i]], alone[0], atol=1e-4, rtol=1e-5)
        assert (x[i, frames[i] :] == 0).all()  # padded frames are zero, like the convolution's own padding
    # per-utterance normalisation: zero mean, unit variance over the real frames of each channel
    real = x[0, : frames[0]]
    assert real.mean(0).abs().max() < 1e-4
    assert (real.std(0, unbiased=False) - 1).abs().max() < 1e-2


@pytest.mark.parametrize("frames", [1, 2, 3, 4, 5, 8, 97, 98, 100])
def test_subsampled_length_is_exact(frames: int) -> None:
    sub = ConvSubsampling(n_mels=80, channels=4, hidden_size=16)
    out, lengths = sub(torch.randn(1, frames, 80), torch.tensor([frames]))
    expected = math.ceil(math.ceil(frames / 2) / 2)
    assert out.shape == (1, expected, 16)
    assert lengths.item() == expected


def test_tower_output_lengths_match_the_encoder_mask() -> None:
    t = tower().eval()
    waves, lengths = padded_batch([16000, 7000, 2000, 100])
    _, mask = t.encode(waves, lengths)
    assert mask.sum(1).tolist() == t.output_lengths(lengths).tolist() == [25, 11, 3, 1]  # ceil(frames / 4)
    assert mask.shape[1] == 25


# -- padding and SpecAugment ----------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ["transformer", "conformer"])
def test_padding_never_changes_a_pooled_embedding(encoder: str) -> None:
    torch.manual_seed(0)
    t = tower(encoder).eval()
    waves, lengths = padded_batch([16000, 9100, 4321, 1601, 350])
    with torch.no_grad():
        batch = t(waves, lengths)
        alone = torch.cat(
            [t(waves[i : i + 1, :n], lengths[i : i + 1]) for i, n in enumerate(lengths.tolist())]
        )
        # extra trailing zeros in the batch tensor change nothing either
        wider = t(F.pad(waves, (0, 3000)), lengths)
    # other batch shapes take other kernels: fp32 reassociation through the layers
    assert torch.allclose(batch, alone, atol=1e-5, rtol=1e-5), (batch - alone).abs().max()
    assert torch.allclose(wider, batch, atol=1e-5, rtol=1e-5)
    assert batch.std(0).mean() > 1e-3  # distinct utterances, not a constant the check would pass on anyway


def test_conformer_padding_invariance_needs_the_convolution_mask() -> None:
    """Without the pre-hooks torchaudio's depthwise convolutions read the padding: the test above can fail."""
    torch.manual_seed(0)
    t = tower("conformer").eval()
    t.encoder._mask = None
    t.encoder.forward = lambda x, mask: t.encoder.conformer(x, mask.sum(1))[0]  # skip setting the mask
    waves, lengths = padded_batch([16000, 4321])
    with torch.no_grad():
        batch = t(waves, lengths)
        alone = t(waves[1:, :4321], lengths[1:])
    assert (batch[1] - alone[0]).abs().max() > 1e-3


def test_spec_augment_only_in_training() -> None:
    torch.manual_seed(0)
    t = tower(freq_masks=2, freq_mask_width=20, time_masks=2, time_mask_width=20)
    waves, lengths = padded_batch([16000, 12000])
    t.eval()
    with torch.no_grad():
        e1, e2 = t(waves, lengths), t(waves, lengths)
    assert torch.equal(e1, e2)  # eval is deterministic
    t.train()  # dropout is 0, so SpecAugment is the only randomness
    with torch.no_grad():
        t1, t2 = t(waves, lengths), t(waves, lengths)
    assert not torch.allclose(t1, e1, atol=1e-4)
    assert not torch.allclose(t1, t2, atol=1e-4)
    t.spec_augment = torch.nn.Sequential()  # no masks: training and eval agree
    with torch.no_grad():
        # train and eval may take other kernels (fused attention in eval): fp32 reassociation
        assert torch.allclose(t(waves, lengths), e1, atol=1e-6, rtol=1e-5)


def test_lengths_to_mask() -> None:
    assert lengths_to_mask(torch.tensor([2, 0, 3]), 3).tolist() == [
        [True, True, False],
        [False, False, False],
        [True, True, True],
    ]


# -- the module -----------------------------------------------------------------------------------


def fake_batch(n: int = 3, text_ids: list[int] | None = None) -> dict:
    waves, lengths = padded_batch([8000 - 1000 * i for i in range(n)])
    ids = torch.randint(5, VOCAB, (n, 6), generator=torch.Generator().manual_seed(1))
    return {
        "waveforms": waves,
        "wave_lengths": lengths,
        "input_ids": ids,
        "attention_mask": torch.ones(n, 6, dtype=torch.bool),
        "utt_keys": torch.arange(n) + 10,
        "text_ids": torch.tensor(text_ids if text_ids is not None else list(range(n))),
        "transcripts": ["x"] * n,
        "skipped": 0,
    }


def test_embed_pairs_speech_with_text_and_identical_transcripts_are_positives() -> None:
    torch.manual_seed(0)
    m = SpeechTextModule(vocab_size=VOCAB, **TINY).eval()
    batch = fake_batch(3, text_ids=[7, 7, 9])
    e = m.embed(batch, "val")
    assert e.a.shape == e.b.shape == (3, 32)
    assert e.a_keys.tolist() == e.b_keys.tolist() == [10, 11, 12]
    assert e.a_groups.tolist() == e.b_groups.tolist() == [7, 7, 9]
    a, b = F.normalize(e.a, dim=-1), F.normalize(e.b, dim=-1)
    pair = m.pair
    assert torch.allclose(pair.loss(e), pair.loss_fn(a, b, pair.logit_scale, ids=torch.tensor([7, 7, 9])))
    assert not torch.allclose(pair.loss(e), pair.loss_fn(a, b, pair.logit_scale))  # ids do matter here
    assert pair.prefixes == ("a2t", "t2a")


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_empty_batch_gives_a_zero_loss_that_reaches_every_parameter() -> None:
    m = SpeechTextModule(vocab_size=VOCAB, **TINY)
    batch = fake_batch(3)
    empty = {k: (v[:0] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    empty.update(transcripts=[], skipped=4)
    loss = m.training_step(empty, 0)
    assert loss.item() == 0.0
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.requires_grad]  # the unused BERT pooler is frozen
    assert all(g is not None and not g.any() for g in grads)  # DDP's all-reduce sees every parameter
    m.validation_step(empty, 0)  # zero rows: under DDP this rank still has a state for the metric's sync
    assert [len(x) for x in m.pair.retrieval["val"].a_emb] == [0]


def test_text_tower_starts_from_an_mlm_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    mlm = MLMPretrainingModule(
        vocab_size=VOCAB, max_position_embeddings=32, encoder={"size": "tiny", "layers": 1, "hidden": 64}
    )
    ckpt = tmp_path / "mlm.ckpt"
    torch.save({"state_dict": mlm.state_dict()}, ckpt)
    m = SpeechTextModule(vocab_size=VOCAB, **{**TINY, "text": replace(TINY_TEXT, init_ckpt=str(ckpt))})
    ours, theirs = m.pair.text.bert.state_dict(), mlm.model.bert.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert torch.equal(ours[k], theirs[k]), k
    fresh = SpeechTextModule(vocab_size=VOCAB, **TINY)
    assert not torch.equal(fresh.pair.text.bert.embeddings.word.weight, ours["embeddings.word.weight"])
    with pytest.raises(ValueError, match="shapes differ"):
        SpeechTextModule(vocab_size=VOCAB + 1, **{**TINY, "text": replace(TINY_TEXT, init_ckpt=str(ckpt))})


# -- learning and the CLI -------------------------------------------------------------------------


def test_learns_tone_retrieval_far_above_chance(tmp_path: Path) -> None:
    """A tiny model on the tone corpus retrieves held-out transcripts from speech and back."""
    generate_tone_librispeech(tmp_path / "tones", n_train_utts=240, n_val_utts=40, seed=3)
    dm = LibriSpeechDataModule(
        str(tmp_path / "tones"),
        test_subsets=["dev-clean"],
        context_length=32,
        batching={"max_duration": 10.0, "max_batch_seconds": 60.0, "num_buckets": 4},
        loader={"num_workers": 0},
        tokenizer={"vocab_size": 200, "cache_dir": str(tmp_path / "cache")},
    )
    L.seed_everything(0)
    model = SpeechTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=64,
        speech=SpeechTowerConfig(
            "tiny", layers=1, heads=2, dropout=0.0, conv_channels=16, freq_mask_width=10, time_mask_width=10
        ),
        text=TextTowerConfig("tiny", layers=1, heads=2, dropout=0.0, pooling="mean", max_len=32),
        loss=ContrastiveLossConfig(init_logit_scale=10.0),
        optimizer=OptimizerConfig(lr=2e-3, weight_decay=0.01, warmup_steps=10),
    )
    trainer = quiet_trainer(
        max_steps=STEPS,
        limit_val_batches=0,
        enable_checkpointing=False,
        use_distributed_sampler=False,
    )
    start = time.perf_counter()
    trainer.fit(model, dm)
    evaluator = quiet_trainer(use_distributed_sampler=False)
    metrics = evaluator.validate(model, dm, verbose=False)[0]
    chance = 5 / len(set(dm.datasets["val"].text_ids))
    print(
        f"{STEPS} steps in {time.perf_counter() - start:.0f} s: a2t R@5 {metrics['val/a2t_R@5']:.2f}, "
        f"t2a R@5 {metrics['val/t2a_R@5']:.2f}, chance {chance:.3f}"
    )
    assert chance <= 0.15
    assert metrics["val/a2t_R@5"] >= max(0.5, 4 * chance)
    assert metrics["val/t2a_R@5"] >= max(0.5, 4 * chance)


def test_cli_fit_then_test_smoke(tmp_path: Path) -> None:
    from cli import main

    generate_tone_librispeech(
        tmp_path / "tones", n_train_utts=24, n_val_utts=8
    )  # the CLI keeps a present set
    data = [
        f"--data.root={tmp_path / 'tones'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
    ]

    def args(command: str, *extra: str) -> list[str]:
        return cli_args(command, *data, *extra, config="speech/quickstart.yaml", root=tmp_path / "run")

    cli = main(args("fit", "--trainer.max_steps=2", "--trainer.val_check_interval=2"))
    assert cli.trainer.global_step == 2
    assert cli.model.pair.text.bert.cfg.vocab_size == cli.datamodule.vocab_size  # linked from the tokenizer
    last = next((tmp_path / "run").rglob("last.ckpt"))
    cli = main(args("test", f"--ckpt_path={last}"))
    assert "test/a2t_R@5" in cli.trainer.callback_metrics
