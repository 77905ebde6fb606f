"""Dynamic masked-language-model masking, done in the collator so every epoch sees fresh masks.

The rule (Devlin et al. 2019): choose `mask_prob` of the maskable tokens (never [CLS], [SEP], [PAD] or any
other special token); of those, 80% become [MASK], 10% a random token, 10% stay unchanged; the model
predicts the original token at every chosen position. With whole-word masking a word's pieces are chosen
together. The draw for a sample depends only on (seed, epoch, sample index), so it is reproducible across
workers, ranks and restarts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# the label of positions that take no loss (cross_entropy's default); every module imports it from here
IGNORE_INDEX = -100


def sparse_layout(attention_mask: np.ndarray, labels: np.ndarray) -> dict[str, torch.Tensor | int]:
    """Where the encoder and the sparse MLM head work, from a (B, L) batch on the host, so the training step reads
    no shape from the device (`BertForPreTraining.pretraining_outputs`, fields of `SparseLayout`):
    `token_index` (flat positions of the real tokens), `output_positions` (of the masked tokens and every
    [CLS]), `output_width` (the most of those in one row, a Python int), `masked_rows` and `cls_rows` (which
    rows of `output_positions` are masked, which are [CLS])."""
    b, length = labels.shape
    wanted = labels != IGNORE_INDEX
    wanted[:, 0] = True  # [CLS], for NSP
    positions = np.flatnonzero(wanted)
    return {
        "token_index": torch.from_numpy(np.flatnonzero(attention_mask)),
        "output_positions": torch.from_numpy(positions),
        "output_width": int(wanted.sum(1).max()) if b else 0,
        "masked_rows": torch.from_numpy(np.flatnonzero(labels.reshape(-1)[positions] != IGNORE_INDEX)),
        "cls_rows": torch.from_numpy(np.flatnonzero(positions % length == 0)),
    }


class MLMCollator:
    """Pads instances into a batch and masks them.

    Each sample is a dict with `input_ids` (1-D int array, [CLS] ... [SEP] ...), optional `token_type_ids`
    and `nsp_label`, its dataset `index` and the `epoch` it is drawn for.
    """

    def __init__(
        self,
        vocab_size: int,
        pad_id: int,
        mask_id: int,
        special_ids: Sequence[int],
        mask_prob: float = 0.15,
        replace_prob: float = 0.8,
        random_prob: float = 0.1,
        whole_word: bool = False,
        word_start: np.ndarray | None = None,
        seed: int = 0,
        pad_to: int | None = None,
    ) -> None:
        if not 0.0 < mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in (0, 1), got {mask_prob}")
        if whole_word and word_start is None:
            raise ValueError("whole-word masking needs the word_start table of the vocabulary")
        self.pad_id, self.mask_id = pad_id, mask_id
        self.mask_prob, self.replace_prob, self.random_prob = mask_prob, replace_prob, random_prob
        self.whole_word, self.word_start, self.seed, self.pad_to = whole_word, word_start, seed, pad_to
        self.is_special = np.zeros(vocab_size, dtype=bool)
        self.is_special[list(special_ids)] = True
        self.random_pool = np.flatnonzero(~self.is_special)  # random replacements are ordinary tokens

    def mask(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Masked copy of `ids` and the labels (original id where chosen, IGNORE_INDEX elsewhere)."""
        ids = ids.astype(np.int64)
        candidates = np.flatnonzero(~self.is_special[ids])
        labels = np.full_like(ids, IGNORE_INDEX)
        if candidates.size == 0:
            return ids, labels
        n_target = max(1, int(round(candidates.size * self.mask_prob)))
        if self.whole_word:
            # a word = a start piece and the `##` pieces that follow it
            starts = self.word_start[ids[candidates]] | np.r_[True, np.diff(candidates) != 1]
            word_id = np.cumsum(starts) - 1
            sizes = np.bincount(word_id)
            chosen_words, total = [], 0
            for w in rng.permutation(sizes.size):  # as BERT: a word that would overflow is skipped
                if total + sizes[w] <= n_target:
                    chosen_words.append(w)
                    total += sizes[w]
                    if total == n_target:
                        break
            if not chosen_words:  # every word alone is longer than the budget
                chosen_words = [int(np.argmin(sizes))]
            chosen = candidates[np.isin(word_id, chosen_words)]
        else:
            chosen = rng.choice(candidates, size=n_target, replace=False)
        labels[chosen] = ids[chosen]
        u = rng.random(chosen.size)
        out = ids.copy()
        out[chosen[u < self.replace_prob]] = self.mask_id
        rand = chosen[(u >= self.replace_prob) & (u < self.replace_prob + self.random_prob)]
        out[rand] = self.random_pool[rng.integers(0, self.random_pool.size, rand.size)]
        return out, labels

    def __call__(self, samples: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(s["input_ids"]) for s in samples)
        if self.pad_to:
            width = max(width, self.pad_to)
        b = len(samples)
        input_ids = np.full((b, width), self.pad_id, dtype=np.int64)
        labels = np.full((b, width), IGNORE_INDEX, dtype=np.int64)
        token_type_ids = np.zeros((b, width), dtype=np.int64)
        attention_mask = np.zeros((b, width), dtype=bool)
        for i, s in enumerate(samples):
            rng = np.random.default_rng([self.seed, int(s.get("epoch", 0)), int(s["index"])])
            ids, lab = self.mask(np.asarray(s["input_ids"]), rng)
            n = ids.size
            input_ids[i, :n], labels[i, :n], attention_mask[i, :n] = ids, lab, True
            if s.get("token_type_ids") is not None:
                token_type_ids[i, :n] = s["token_type_ids"]
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
            "index": torch.tensor([int(s["index"]) for s in samples]),
            **sparse_layout(attention_mask, labels),
        }
        if "nsp_label" in samples[0]:
            batch["nsp_labels"] = torch.tensor([int(s["nsp_label"]) for s in samples])
        return batch
