"""Gradient caching: chunked backward passes give the parameter gradients of one pass over the whole batch, with
the random state of dropout and SpecAugment replayed, inside Lightning's manual optimisation (clipping, LR
schedule, non-finite skip, DDP)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

import lightning_modules.contrastive_module as contrastive_module
import lightning_modules.training.nonfinite as nonfinite
from lightning_modules.components.contrastive import PairEmbeddings
from lightning_modules.components.speech_tower import SpeechTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.contrastive_module import ContrastiveModule
from lightning_modules.speech_text_module import SpeechTextModule
from lightning_modules.training.nonfinite import NonFiniteLossError
from tests.builders.alignment import IMAGE_TEXT_VOCAB, image_text, sections
from tests.builders.callbacks import CountCollectives
from tests.helpers import quiet_trainer

VOCAB = IMAGE_TEXT_VOCAB  # the batches' token ids, within image_text()'s vocabulary

# chunked and whole-batch passes run other matmul shapes and sum gradients in another order: fp32 reassociation
GRAD_TOL = dict(atol=1e-5, rtol=1e-4)
# Adam moves a weight by about lr * sign(g) once |g| >> eps, even where g is float noise around zero (attention's
# key bias): runs whose gradients agree to 1e-7 would then differ by lr. eps = 1e-3 keeps such moves at noise level.
ADAM_EPS = 1e-3


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


def image_text_batch(image_ids: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(image_ids)
    ids = torch.randint(5, VOCAB, (n, 7), generator=g)
    mask = torch.ones(n, 7, dtype=torch.bool)
    mask[1, 4:] = False
    ids[~mask] = 0
    return {
        "images": torch.randn(n, 3, 16, 16, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_ids": torch.tensor(image_ids),
        "caption_ids": torch.arange(100, 100 + n),
        "skipped": 0,
    }


def speech_text(dropout: float = 0.0, masks: int = 0, **kwargs) -> SpeechTextModule:
    torch.manual_seed(0)
    encoder = {k: kwargs.pop(k) for k in ("encoder", "conformer_kernel_size") if k in kwargs}
    speech = SpeechTowerConfig(
        "tiny", layers=1, hidden=32, heads=2, dropout=dropout, n_mels=16, conv_channels=4
    )
    speech = replace(
        speech, freq_masks=masks, freq_mask_width=4, time_masks=masks, time_mask_width=5, **encoder
    )
    text = TextTowerConfig("tiny", layers=1, hidden=32, heads=2, dropout=dropout, max_len=16)
    return SpeechTextModule(speech, text, vocab_size=VOCAB, embed_dim=16, **sections(kwargs))


def speech_text_batch(text_ids: list[int], seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = len(text_ids)
    lengths = torch.tensor([4000 - 300 * i for i in range(n)])
    waves = 0.1 * torch.randn(n, int(lengths.max()), generator=g)
    waves[torch.arange(waves.shape[1])[None, :] >= lengths[:, None]] = 0.0
    return {
        "waveforms": waves,
        "wave_lengths": lengths,
        "input_ids": torch.randint(5, VOCAB, (n, 6), generator=g),
        "attention_mask": torch.ones(n, 6, dtype=torch.bool),
        "utt_keys": torch.arange(n) + 10,
        "text_ids": torch.tensor(text_ids),
        "transcripts": [f"t{i}" for i in text_ids],
        "skipped": 0,
    }


# rows sharing a group (same image / transcript) sit in different chunks: the loss must see the whole batch
GROUPS = [7, 3, 7, 9, 3, 5]


def grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def assert_same_grads(ours: dict, expected: dict) -> None:
    assert ours.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(ours[name], expected[name], **GRAD_TOL, msg=name)


# -- splitting ------------------------------------------------------------------------------------------


def test_split_batch_cuts_every_row_entry_at_the_same_rows() -> None:
    module = speech_text()
    batch = speech_text_batch(GROUPS)
    chunks = module.pair.split_batch(batch, 4)
    assert [len(c["utt_keys"]) for c in chunks] == [1, 2, 1, 2]
    assert [t for c in chunks for t in c["transcripts"]] == batch["transcripts"]
    for key in set(module.pair.row_keys) - {"transcripts"}:
        assert torch.equal(torch.cat([c[key] for c in chunks]), batch[key]), key
    assert all(c["skipped"] == 0 and c["waveforms"].shape[1] == 4000 for c in chunks)
    assert len(module.pair.split_batch(batch, 10)) == 6  # never an empty chunk


# -- gradients ------------------------------------------------------------------------------------------


CASES = {  # no dropout, no SpecAugment: the chunks' random draws cannot match one pass's
    "image-text": (image_text, image_text_batch),
    "image-text-siglip": (
        lambda **kw: image_text(loss="siglip", init_logit_bias=-2.0, **kw),
        image_text_batch,
    ),
    "speech-text": (speech_text, speech_text_batch),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_gradients_equal_one_pass_over_the_whole_batch(case: str) -> None:
    build, make_batch = CASES[case]
    batch = make_batch(GROUPS)
    plain = build().train()
    plain.pair.loss(plain.embed(batch, "train")).backward()
    expected = grads(plain)

    cached = build(grad_cache_chunks=3).train()
    loss = cached.cached_backward(batch)
    torch.testing.assert_close(loss, plain.pair.loss(plain.embed(batch, "train")).detach(), **GRAD_TOL)
    ours = grads(cached)
    assert_same_grads(ours, expected)
    assert ours["pair.log_scale"].abs() > 1e-4  # the temperature's gradient, counted once
    if "siglip" in case:
        assert ours["pair.logit_bias"].abs() > 1e-4


RANDOM_CASES = {  # dropout everywhere, and SpecAugment in the speech tower
    "image-text": (lambda **kw: image_text(dropout=0.2, **kw), image_text_batch),
    "image-text-checkpointed": (
        lambda **kw: image_text(dropout=0.2, gradient_checkpointing=True, **kw),
        image_text_batch,
    ),
    "speech-text": (lambda **kw: speech_text(dropout=0.2, masks=2, **kw), speech_text_batch),
    "speech-text-conformer": (  # BatchNorm: its running statistics move once per chunk, as in one pass
        lambda **kw: speech_text(dropout=0.2, masks=2, encoder="conformer", conformer_kernel_size=3, **kw),
        speech_text_batch,
    ),
}


@pytest.mark.parametrize("case", list(RANDOM_CASES))
def test_cached_gradients_replay_the_random_state_of_each_chunk(
    case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With dropout (and SpecAugment), the large batch is the chunks' forward passes under one graph: the
    random draws are those of pass 1, and pass 2 must draw the same again."""
    build, make_batch = RANDOM_CASES[case]
    batch = make_batch(GROUPS)
    reference = build(grad_cache_chunks=3).train()
    torch.manual_seed(1)
    parts = [reference.embed(chunk, "train") for chunk in reference.pair.split_batch(batch, 3)]
    fields = contrastive_module._ROW_FIELDS
    e = PairEmbeddings(*(torch.cat([getattr(p, f) for p in parts]) for f in fields))
    reference.pair.loss(e).backward()
    expected = grads(reference)

    cached = build(grad_cache_chunks=3).train()
    torch.manual_seed(1)
    cached.cached_backward(batch)
    assert_same_grads(grads(cached), expected)
    buffers = dict(reference.named_buffers())
    for name, value in cached.named_buffers():
        torch.testing.assert_close(value, buffers[name], msg=name)

    # without the replay pass 2 draws other masks, and the gradients are wrong
    monkeypatch.setattr(contrastive_module, "set_rng_state", lambda state: None)
    unreplayed = build(grad_cache_chunks=3).train()
    torch.manual_seed(1)
    unreplayed.cached_backward(batch)
    wrong = grads(unreplayed)
    assert not all(torch.allclose(wrong[n], expected[n], **GRAD_TOL) for n in expected)


# -- training through Lightning -------------------------------------------------------------------------


class GradNorms(Callback):
    """Total gradient norm before clipping (callbacks' hook runs before the module's) and at the step's end."""

    def __init__(self) -> None:
        self.before, self.after = [], []

    @staticmethod
    def _norm(module: L.LightningModule) -> float:
        return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None]).norm().item()

    def on_before_optimizer_step(self, trainer, module, optimizer) -> None:
        self.before.append(self._norm(module))

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if trainer.global_step > len(self.after):
            self.after.append(self._norm(module))


def fit(module: ContrastiveModule, batches: list[dict], root: Path, **trainer_kwargs) -> L.Trainer:
    defaults = dict(
        max_epochs=1,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=root,
    )
    trainer = quiet_trainer(**{**defaults, **trainer_kwargs})
    trainer.fit(module, DataLoader(batches, batch_size=None))
    return trainer


def assert_same_parameters(ours: torch.nn.Module, expected: torch.nn.Module) -> None:
    theirs = dict(expected.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p, theirs[name], **GRAD_TOL, msg=name)


def moved(module: torch.nn.Module, initial: dict[str, torch.Tensor]) -> float:
    return max((p - initial[n]).abs().max().item() for n, p in module.named_parameters())


def test_trainer_steps_with_grad_cache_match_plain_training(tmp_path: Path) -> None:
    batches = [image_text_batch(GROUPS, seed=s) for s in range(3)]
    kwargs = dict(lr=1e-2, warmup_steps=1, schedule="cosine", eps=ADAM_EPS)  # the LR changes every step
    clip = dict(gradient_clip_val=0.05, max_steps=3)
    initial = copy.deepcopy(image_text(**kwargs).state_dict())
    plain = image_text(**kwargs)
    plain_trainer = fit(plain, batches, tmp_path / "plain", **clip)
    cached, norms = image_text(grad_cache_chunks=3, **kwargs), GradNorms()
    trainer = fit(cached, batches, tmp_path / "cached", callbacks=[norms], **clip)

    assert not cached.automatic_optimization and trainer.global_step == plain_trainer.global_step == 3
    assert_same_parameters(cached, plain)
    assert moved(cached, initial) > 1e-3  # it trained
    # the trainer's gradient_clip_val applies in manual optimisation too
    assert min(norms.before) > 0.05 and norms.after == pytest.approx([0.05] * 3, rel=1e-4)
    for key in ("train/loss", "train/logit_scale"):
        torch.testing.assert_close(
            trainer.callback_metrics[key], plain_trainer.callback_metrics[key], **GRAD_TOL
        )
    lr = trainer.lr_scheduler_configs[0].scheduler.get_last_lr()
    assert lr == plain_trainer.lr_scheduler_configs[0].scheduler.get_last_lr() == [0.0, 0.0]  # cosine's end


def test_grad_cache_clips_fused_adamw_under_bf16_mixed(tmp_path: Path) -> None:
    """bf16-mixed has no GradScaler: manual optimisation keeps fused AdamW with the trainer's clipping too."""
    batches = [image_text_batch(GROUPS, seed=s) for s in range(2)]
    module, norms = image_text(grad_cache_chunks=2, lr=1e-2, eps=ADAM_EPS), GradNorms()
    clip = dict(gradient_clip_val=0.05, max_steps=2, precision="bf16-mixed")
    trainer = fit(module, batches, tmp_path, callbacks=[norms], **clip)
    assert not module.automatic_optimization and trainer.global_step == 2
    assert trainer.optimizers[0].defaults["fused"] is True
    assert min(norms.before) > 0.05 and norms.after == pytest.approx([0.05] * 2, rel=1e-4)


def counted_reduce_steps(module: ContrastiveModule) -> list[int]:
    """One entry per call of the module's `reduce_step`, the step's all-reduce under DDP."""
    calls: list[int] = []
    original = module.reduce_step

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    module.reduce_step = counted
    return calls


def nan_batch(batch: dict) -> dict:
    bad = copy.deepcopy(batch)
    bad["waveforms"][0, 0] = float("nan")
    return bad


# where the NaN step is skipped: fused AdamW on the device (found_inf), or any other optimizer after a host read
SKIPS = ["device", "host"]


@pytest.mark.parametrize("skip", SKIPS)
def test_nonfinite_loss_skips_the_step_with_grad_cache(
    skip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A NaN loss under gradient caching changes no parameter and no optimizer state, is counted in
    train/nonfinite_skipped, and the step's flag and logged loss share one `reduce_step`. Around it the run is
    that of automatic optimisation: the LR schedule advances on the skipped batch too."""
    if skip == "host":
        monkeypatch.setattr(nonfinite, "_skips_on_device", lambda optimizer: False)
    good = speech_text_batch(GROUPS)
    bad = nan_batch(good)
    kwargs = dict(warmup_steps=2, schedule="constant", eps=ADAM_EPS)  # the LR doubles after the first batch
    module = speech_text(grad_cache_chunks=2, **kwargs)
    initial = copy.deepcopy(module.state_dict())
    reduce_steps = counted_reduce_steps(module)
    with pytest.warns(UserWarning, match="non-finite loss"):
        trainer = fit(module, [bad], tmp_path / "bad")
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0
    assert len(reduce_steps) == 1
    for name, value in module.state_dict().items():
        assert torch.equal(value, initial[name]), name
    state = trainer.optimizers[0].state
    assert all(int(s["step"]) == 0 and not s["exp_avg"].any() for s in state.values())  # nothing moved
    assert trainer.global_step == (1 if skip == "device" else 0)  # a host-side skip steps no optimizer

    cached = speech_text(grad_cache_chunks=2, **kwargs)
    trainer = fit(cached, [bad, good], tmp_path / "cached")
    automatic = speech_text(**kwargs)
    with pytest.warns(UserWarning, match="non-finite loss"):
        automatic_trainer = fit(automatic, [bad, good], tmp_path / "automatic")
    assert trainer.callback_metrics["train/nonfinite_skipped"].item() == 1.0
    assert_same_parameters(cached, automatic)  # the good batch stepped at the LR after two batches
    assert moved(cached, initial) > 1e-4
    schedules = [t.lr_scheduler_configs[0].scheduler.last_epoch for t in (trainer, automatic_trainer)]
    assert schedules == [2, 2]
    assert automatic_trainer.global_step == 2 and trainer.global_step == (2 if skip == "device" else 1)


@pytest.mark.parametrize("skip", SKIPS)
def test_nonfinite_losses_in_a_row_stop_the_run_with_grad_cache(
    skip: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """max_nonfinite_in_row NaN losses in a row stop the run with the message: at a logging step when fused
    AdamW skips on the device, right at the host read otherwise (no global step passes there)."""
    if skip == "host":
        monkeypatch.setattr(nonfinite, "_skips_on_device", lambda optimizer: False)
    module = speech_text(grad_cache_chunks=2)
    module.max_nonfinite_in_row = 3
    bad = nan_batch(speech_text_batch(GROUPS))
    with pytest.raises(NonFiniteLossError, match="NaN or Inf 3 steps in a row"), pytest.warns(UserWarning):
        fit(module, [bad] * 6, tmp_path, log_every_n_steps=1 if skip == "device" else 50)
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_empty_batch_still_steps_with_grad_cache(tmp_path: Path) -> None:
    """A batch whose images all failed to decode steps with a zero gradient, as in automatic optimisation (under
    DDP this rank must join the others' all-reduce)."""
    good = image_text_batch(GROUPS)
    empty = {k: v[:0] if torch.is_tensor(v) else v for k, v in good.items()}
    empty.update(
        input_ids=torch.empty(0, 0, dtype=torch.long), attention_mask=torch.empty(0, 0, dtype=torch.bool)
    )
    kwargs = dict(lr=1e-2, warmup_steps=0, eps=ADAM_EPS)
    plain = image_text(**kwargs)
    fit(plain, [empty, good, good], tmp_path / "plain")
    cached = image_text(grad_cache_chunks=2, **kwargs)
    trainer = fit(cached, [empty, good, good], tmp_path / "cached")
    assert trainer.global_step == 3
    assert_same_parameters(cached, plain)


def test_grad_cache_rejects_gradient_accumulation(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="accumulate_grad_batches"):
        fit(image_text(grad_cache_chunks=2), [image_text_batch(GROUPS)], tmp_path, accumulate_grad_batches=2)


# -- DDP ---------------------------------------------------------------------------------------------------


class DestroyProcessGroup(Callback):
    """Ends each spawned rank's process group before the process exits: left to the interpreter's exit, gloo's
    teardown now and then aborts a rank ("terminate called without an active exception") after training ended."""

    def teardown(self, trainer, module, stage) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


@pytest.mark.slow  # ~25 s: two spawned processes
def test_ddp_two_ranks_with_grad_cache_match_one_process_plain(tmp_path: Path, monkeypatch) -> None:
    """2 gloo ranks x 3 rows, 2 chunks each, negatives gathered across ranks, gradients all-reduced once per
    step == one process, plain, 6 rows."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    halves = [
        image_text_batch(GROUPS[:3], seed=s) if s % 2 == 0 else image_text_batch(GROUPS[3:], seed=s)
        for s in range(4)
    ]
    wholes = [
        {k: torch.cat([x[k], y[k]]) if torch.is_tensor(x[k]) else x[k] for k in x}
        for x, y in zip(halves[0::2], halves[1::2])
    ]
    kwargs = dict(lr=1e-2, warmup_steps=1, eps=ADAM_EPS)
    initial = copy.deepcopy(image_text(**kwargs).state_dict())
    plain = image_text(**kwargs)
    fit(plain, wholes, tmp_path / "plain", max_steps=2)
    cached = image_text(grad_cache_chunks=2, **kwargs)
    fit(
        cached,
        halves,
        tmp_path / "ddp",
        max_steps=2,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[DestroyProcessGroup()],
    )
    assert_same_parameters(cached, plain)
    assert moved(cached, initial) > 1e-3  # it trained


@pytest.mark.slow  # ~12 s: two spawned processes
def test_ddp_grad_cache_step_has_one_small_all_reduce(tmp_path: Path, monkeypatch) -> None:
    """Per gradient-cached step under DDP (2 gloo ranks): one all-reduce of the logged loss and the non-finite
    flag, and the loss's four all-gathers (row counts, a, b, group ids), besides DDP's gradient buckets."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    batches = [image_text_batch(GROUPS[:3], seed=s) for s in range(4)]
    counter = CountCollectives(tmp_path)
    fit(
        image_text(grad_cache_chunks=2),
        batches,
        tmp_path,
        max_steps=2,
        strategy="ddp_spawn",
        devices=2,
        callbacks=[counter, DestroyProcessGroup()],
    )
    for rank in (0, 1):
        steps = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(steps) == 3  # 2 steps, then the window after the last one
        for calls in steps[:-1]:
            assert [c for c in calls if c[0] == "all_reduce"] == [["all_reduce", 2]], calls
            assert [c[0] for c in calls if c[0] == "all_gather"] == ["all_gather"] * 4, calls
