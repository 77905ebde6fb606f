"""MLM masking statistics (15% chosen, 80/10/10), exclusions, labels, reproducibility, whole-word masking
and batch layout of `MLMCollator`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.masking import IGNORE_INDEX, MLMCollator
from lightning_modules.components.bert import SparseLayout

VOCAB = 1000
PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
EXTRA_SPECIAL = (7, 600)  # special ids in the middle of the vocabulary, e.g. added [unused] tokens
SPECIAL = (PAD, UNK, CLS, SEP, MASK, *EXTRA_SPECIAL)
PIECE_START = 500  # whole-word table: ids >= 500 are `##` continuation pieces


def _ordinary(rng: np.random.Generator, n: int, low: int = 5, high: int = VOCAB) -> np.ndarray:
    ids = rng.integers(low, high, n)
    ids[np.isin(ids, SPECIAL)] = low + 3  # 8: an ordinary id
    return ids


def _pair(rng: np.random.Generator, length: int) -> np.ndarray:
    """[CLS] A [SEP] B [SEP] with a few [UNK] and extra special ids sprinkled in."""
    body = _ordinary(rng, length - 3)
    body[rng.random(body.size) < 0.03] = UNK
    body[rng.random(body.size) < 0.02] = EXTRA_SPECIAL[0]
    cut = int(rng.integers(1, body.size))
    return np.r_[CLS, body[:cut], SEP, body[cut:], SEP].astype(np.int64)


def _words(rng: np.random.Generator, length: int) -> np.ndarray:
    """[CLS] then words of one start piece and 0-2 `##` pieces, then [SEP]."""
    toks = [CLS]
    while len(toks) < length - 1:
        toks.append(int(_ordinary(rng, 1, 5, PIECE_START)[0]))
        toks.extend(_ordinary(rng, int(rng.integers(0, 3)), PIECE_START + 1, VOCAB).tolist())
    return np.asarray([*toks[: length - 1], SEP], dtype=np.int64)


def _word_start_table() -> np.ndarray:
    table = np.ones(VOCAB, dtype=bool)
    table[PIECE_START:] = False
    return table


def _collator(**kw) -> MLMCollator:
    return MLMCollator(vocab_size=VOCAB, pad_id=PAD, mask_id=MASK, special_ids=SPECIAL, **kw)


def _draw(collator: MLMCollator, samples: list[np.ndarray]) -> tuple[np.ndarray, ...]:
    """Mask every sample with its own (seed, epoch=0, index) stream; concatenate ids, masked and labels."""
    orig, out, lab = [], [], []
    for i, ids in enumerate(samples):
        o, lb = collator.mask(ids, np.random.default_rng([collator.seed, 0, i]))
        orig.append(ids), out.append(o), lab.append(lb)
    return np.concatenate(orig), np.concatenate(out), np.concatenate(lab)


@pytest.mark.parametrize("mask_prob", [0.15, 0.3])
def test_chosen_fraction_and_80_10_10_split(mask_prob: float) -> None:
    rng = np.random.default_rng(0)
    samples = [_pair(rng, int(rng.integers(20, 129))) for _ in range(1500)]
    orig, out, labels = _draw(_collator(mask_prob=mask_prob), samples)

    maskable = ~np.isin(orig, SPECIAL)
    chosen = labels != IGNORE_INDEX
    assert not (chosen & ~maskable).any()
    assert chosen.sum() / maskable.sum() == pytest.approx(mask_prob, abs=0.01)

    # labels are the original ids exactly where chosen; every other position is unchanged
    assert (labels[chosen] == orig[chosen]).all()
    assert (labels[~chosen] == IGNORE_INDEX).all()
    assert (out[~chosen] == orig[~chosen]).all()

    n = chosen.sum()
    as_mask = (out[chosen] == MASK).sum() / n
    unchanged = (out[chosen] == orig[chosen]).sum() / n
    replaced = ((out[chosen] != MASK) & (out[chosen] != orig[chosen])).sum() / n
    assert as_mask == pytest.approx(0.8, abs=0.02)
    assert replaced == pytest.approx(0.1, abs=0.02)
    assert unchanged == pytest.approx(0.1, abs=0.02)


def test_random_replacements_are_ordinary_tokens_spread_over_the_vocabulary() -> None:
    rng = np.random.default_rng(1)
    samples = [_pair(rng, 128) for _ in range(1500)]
    orig, out, labels = _draw(_collator(), samples)
    chosen = labels != IGNORE_INDEX
    replacement = out[chosen & (out != MASK) & (out != orig)]
    assert replacement.size > 2000
    assert not np.isin(replacement, SPECIAL).any()
    assert np.unique(replacement).size > 800  # drawn from the whole vocabulary, not a few ids
    # the only special id ever written into the input is [MASK]
    assert set(np.unique(out[np.isin(out, SPECIAL)])) <= set(np.unique(orig[np.isin(orig, SPECIAL)])) | {MASK}


def test_special_tokens_are_never_chosen() -> None:
    collator = _collator()
    only_special = np.array([CLS, UNK, *EXTRA_SPECIAL, SEP, PAD, SEP])
    out, labels = collator.mask(only_special, np.random.default_rng(0))
    assert (out == only_special).all() and (labels == IGNORE_INDEX).all()

    # one ordinary token among specials: the budget rounds up to it, and nothing else is touched
    one = np.array([CLS, UNK, 42, EXTRA_SPECIAL[1], SEP])
    for seed in range(20):
        out, labels = collator.mask(one, np.random.default_rng(seed))
        assert labels.tolist() == [IGNORE_INDEX, IGNORE_INDEX, 42, IGNORE_INDEX, IGNORE_INDEX]
        assert out[[0, 1, 3, 4]].tolist() == [CLS, UNK, EXTRA_SPECIAL[1], SEP]


def test_padding_is_never_chosen() -> None:
    rng = np.random.default_rng(2)
    samples = [{"input_ids": _pair(rng, int(n)), "index": i} for i, n in enumerate(rng.integers(8, 64, 200))]
    batch = _collator()(samples)
    pad = ~batch["attention_mask"]
    assert pad.sum() > 1000
    assert (batch["input_ids"][pad] == PAD).all()
    assert (batch["labels"][pad] == IGNORE_INDEX).all()
    assert (batch["labels"][~pad] != IGNORE_INDEX).sum() > 0


def test_same_seed_epoch_index_reproduce_and_epochs_differ() -> None:
    rng = np.random.default_rng(3)
    ids = [_pair(rng, 100) for _ in range(4)]

    def batch(epoch: int, order=(0, 1, 2, 3), seed: int = 0) -> dict[str, torch.Tensor]:
        return _collator(seed=seed)([{"input_ids": ids[i], "index": i, "epoch": epoch} for i in order])

    first, again = batch(0), batch(0)
    assert torch.equal(first["input_ids"], again["input_ids"])
    assert torch.equal(first["labels"], again["labels"])
    # a sample's mask depends on its index, not on its place in the batch (or the worker that built it)
    swapped = batch(0, order=(3, 2, 1, 0))
    assert torch.equal(swapped["labels"], first["labels"].flip(0))
    assert torch.equal(swapped["index"], torch.tensor([3, 2, 1, 0]))
    for other in (batch(1), batch(0, seed=1)):
        for row in range(4):  # 15 of 97 positions: two independent draws agree with negligible odds
            assert not torch.equal(other["labels"][row] != IGNORE_INDEX, first["labels"][row] != IGNORE_INDEX)


def _word_ids(ids: np.ndarray, word_start: np.ndarray) -> np.ndarray:
    """Word number of every position; special tokens get -1 and also end a word."""
    out = np.full(ids.size, -1)
    word = -1
    prev_special = True
    for j, t in enumerate(ids):
        if t in SPECIAL:
            prev_special = True
            continue
        if word_start[t] or prev_special:
            word += 1
        out[j] = word
        prev_special = False
    return out


def test_whole_word_masking_chooses_all_pieces_of_a_word() -> None:
    table = _word_start_table()
    collator = _collator(whole_word=True, word_start=table)
    rng = np.random.default_rng(4)
    samples = [_words(rng, 128) for _ in range(600)]
    # a `##` piece right after [SEP] has no start piece before it: it is a word by itself
    samples[0][60:63] = [SEP, PIECE_START + 5, PIECE_START + 6]
    total_chosen = total_maskable = multi_piece_chosen = 0
    for i, ids in enumerate(samples):
        out, labels = collator.mask(ids, np.random.default_rng([0, 0, i]))
        chosen = labels != IGNORE_INDEX
        words = _word_ids(ids, table)
        for w in np.unique(words[words >= 0]):
            picked = chosen[words == w]
            assert picked.all() or not picked.any(), (i, w, ids[words == w], picked)
            multi_piece_chosen += picked.all() and picked.size > 1
        assert (labels[chosen] == ids[chosen]).all() and (out[~chosen] == ids[~chosen]).all()
        total_chosen += chosen.sum()
        total_maskable += (words >= 0).sum()
    assert multi_piece_chosen > 500
    assert total_chosen / total_maskable == pytest.approx(0.15, abs=0.01)


def test_whole_word_masking_fills_the_budget_on_short_sequences() -> None:
    table = _word_start_table()
    collator = _collator(whole_word=True, word_start=table)
    rng = np.random.default_rng(5)
    chosen = budget = 0
    for i in range(800):
        ids = _words(rng, 64)
        _, labels = collator.mask(ids, np.random.default_rng([0, 0, i]))
        chosen += (labels != IGNORE_INDEX).sum()
        budget += round((~np.isin(ids, SPECIAL)).sum() * 0.15)
    # a word of at most three pieces always fits once the budget has <= 2 left; only the tail can stay short
    assert chosen / budget > 0.98


def test_batch_layout_with_pairs_and_padding() -> None:
    samples = [
        {"input_ids": np.array([CLS, 10, 11, SEP, 12, SEP]), "token_type_ids": np.array([0, 0, 0, 0, 1, 1])},
        {
            "input_ids": np.array([CLS, 20, SEP, 21, 22, 23, 24, SEP]),
            "token_type_ids": np.r_[[0] * 3, [1] * 5],
        },
        {"input_ids": np.array([CLS, 30, 31, SEP, 32, 33, SEP]), "token_type_ids": np.r_[[0] * 4, [1] * 3]},
    ]
    for i, (s, nsp) in enumerate(zip(samples, (1, 0, 1))):
        s.update(index=10 + i, epoch=2, nsp_label=nsp)
    batch = _collator()(samples)
    layout = set(SparseLayout._fields)  # host-side shapes for the training step
    plain = {"input_ids", "token_type_ids", "attention_mask", "labels", "index", "nsp_labels"}
    assert set(batch) == plain | layout
    assert {k: tuple(v.shape) for k, v in batch.items() if k not in layout} == {
        "input_ids": (3, 8),
        "token_type_ids": (3, 8),
        "attention_mask": (3, 8),
        "labels": (3, 8),
        "index": (3,),
        "nsp_labels": (3,),
    }
    assert batch["attention_mask"].dtype == torch.bool
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["attention_mask"].sum(1).tolist() == [6, 8, 7]
    assert batch["token_type_ids"].tolist() == [
        [0, 0, 0, 0, 1, 1, 0, 0],
        [0, 0, 0, 1, 1, 1, 1, 1],
        [0, 0, 0, 0, 1, 1, 1, 0],
    ]
    assert batch["nsp_labels"].tolist() == [1, 0, 1]
    assert batch["index"].tolist() == [10, 11, 12]
    assert batch["input_ids"][0, 6:].tolist() == [PAD, PAD]
    # special positions pass through unmasked; each row has exactly one chosen ordinary token here
    assert batch["input_ids"][1, [0, 2, 7]].tolist() == [CLS, SEP, SEP]
    assert ((batch["labels"] != IGNORE_INDEX).sum(1) == 1).all()


def test_pad_to_and_single_segments() -> None:
    samples = [{"input_ids": np.array([CLS, 10, 11, 12, SEP]), "index": 0}]
    batch = _collator(pad_to=16)(samples)
    assert batch["input_ids"].shape == (1, 16)
    assert batch["attention_mask"][0].tolist() == [True] * 5 + [False] * 11
    assert batch["token_type_ids"].abs().sum() == 0  # no segment ids given: all sentence A
    assert "nsp_labels" not in batch


def test_invalid_settings_raise() -> None:
    with pytest.raises(ValueError, match="mask_prob"):
        _collator(mask_prob=0.0)
    with pytest.raises(ValueError, match="mask_prob"):
        _collator(mask_prob=1.0)
    with pytest.raises(ValueError, match="word_start"):
        _collator(whole_word=True)
