"""Entity-level precision, recall and F1 for IOB-tagged sequences, counted as conlleval and seqeval count them.

An entity is a (type, start, end) span. A predicted entity is correct only when a gold entity of the same type
covers exactly the same tokens; partly overlapping or mistyped entities count as one false positive and one
false negative. Scores are micro-averaged over all entities.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

Span = tuple[str, int, int]
"""(type, start, end): the entity covers tokens start..end-1."""


def split_tag(tag: str) -> tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '')."""
    if tag == "O":
        return "O", ""
    prefix, sep, kind = tag.partition("-")
    if not sep or prefix not in ("B", "I") or not kind:
        raise ValueError(f"tag {tag!r} is not O, B-<type> or I-<type> (IOB1/IOB2 tags)")
    return prefix, kind


def entity_spans(tags: Sequence[str], strict: bool = False) -> list[Span]:
    """The entities of one tag sequence.

    Lenient (default; conlleval and seqeval's default mode) reads IOB1 and IOB2 alike: an entity starts at
    B-X, or at an I-X that does not continue an X entity (how IOB1, the tagging of the original CoNLL-2003
    files, starts every entity not directly after another of its type; in IOB2 it reads a broken sequence
    such as `O I-PER` as an entity), and goes on over the I-X that follow.

    `strict` (IOB2 as seqeval's strict mode): only B-X starts an entity; an I-X that does not continue an
    X entity belongs to none.
    """
    spans: list[Span] = []
    kind, start = "", 0  # kind: type of the open entity, "" when none is open
    for i, tag in enumerate([*tags, "O"]):  # a final O closes the last entity
        prefix, t = split_tag(tag)
        if prefix == "I" and t == kind:
            continue
        if kind:
            spans.append((kind, start, i))
            kind = ""
        if prefix == "B" or (prefix == "I" and not strict):
            kind, start = t, i
    return spans


def prf(correct: Tensor, predicted: Tensor, gold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Precision, recall, F1 from counts; 0 where a denominator is 0 (as seqeval reports it)."""
    p = correct / predicted.clamp_min(1)
    r = correct / gold.clamp_min(1)
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-12), torch.zeros_like(p))
    return p, r, f1


class EntityF1(Metric):
    """Micro precision, recall and F1 over exactly matched entities, plus F1 per entity type.

    `update` takes tag sequences, as strings or as indices into `labels`; `compute` returns a dict with
    `precision`, `recall`, `f1` and `f1_<TYPE>` for each type in `labels`.
    """

    full_state_update = False

    def __init__(self, labels: Sequence[str], strict: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.labels = list(labels)
        self.strict = strict
        self.types = sorted({split_tag(tag)[1] for tag in self.labels} - {""})
        self._type_index = {t: i for i, t in enumerate(self.types)}
        for name in ("correct", "predicted", "gold"):
            self.add_state(name, torch.zeros(len(self.types), dtype=torch.long), dist_reduce_fx="sum")

    def _tags(self, seq: Sequence[str | int] | Tensor) -> list[str]:
        if isinstance(seq, Tensor):
            seq = seq.tolist()
        return [tag if isinstance(tag, str) else self.labels[tag] for tag in seq]

    def _count(self, spans: list[Span] | set[Span]) -> Tensor:
        counts = torch.zeros(len(self.types), dtype=torch.long)
        for kind, _, _ in spans:
            if kind not in self._type_index:
                raise ValueError(f"entity type {kind!r} is not among the labels {self.labels}")
            counts[self._type_index[kind]] += 1
        return counts.to(self.correct.device)

    def update(self, preds: Sequence[Sequence[str | int]], target: Sequence[Sequence[str | int]]) -> None:
        if len(preds) != len(target):
            raise ValueError(f"{len(preds)} predicted sequences for {len(target)} gold ones")
        for p, g in zip(preds, target):
            p, g = self._tags(p), self._tags(g)
            if len(p) != len(g):
                raise ValueError(f"a predicted sequence of {len(p)} tags for a gold one of {len(g)}")
            pred, gold = set(entity_spans(p, self.strict)), set(entity_spans(g, self.strict))
            self.correct += self._count(pred & gold)
            self.predicted += self._count(pred)
            self.gold += self._count(gold)

    def compute(self) -> dict[str, Tensor]:
        p, r, f1 = prf(self.correct.sum().float(), self.predicted.sum().float(), self.gold.sum().float())
        out = {"precision": p, "recall": r, "f1": f1}
        _, _, per_type = prf(self.correct.float(), self.predicted.float(), self.gold.float())
        out.update({f"f1_{t}": per_type[i] for i, t in enumerate(self.types)})
        return out
