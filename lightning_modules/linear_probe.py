"""Linear probes: how much of a label a frozen tower's embeddings carry, read by a linear classifier.

The tower embeds every example once (`extract_embeddings`); a multinomial logistic regression is then fitted
on the embeddings, full batch, with L-BFGS, for each L2 weight decay of a grid; the decay with the best
validation accuracy is kept and its classifier scored on the test split (the protocol of Radford et al. 2021,
"Learning Transferable Visual Models From Natural Language Supervision", which tunes the regularisation of
scikit-learn's logistic regression on a validation split). Few-shot probes train on exactly k examples per class,
drawn with a seed (`few_shot_indices`).

    image   ImageTextModule.encode_image over ClassificationDataModule batches (labels: e.g. class folders)
    speech  SpeechTextModule's speech tower over LibriSpeechDataModule batches (labels: e.g. `speaker_labels`)

From the command line the features are written to disk once, by `predict` with the prediction writer
(`ImageFeatures` over a `ClassificationDataModule`'s train / val / test splits; configs/eval/probe_features.yaml),
and the probe reads them (`python cli.py probe --features DIR`), printing and writing (probe.json) the accuracy
and the weight decay it chose.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_modules.components.towers import TowerInit

DEFAULT_WEIGHT_DECAYS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


@dataclass
class ProbeResult:
    """A probe's test accuracy and how it was reached."""

    accuracy: float
    """Top-1 accuracy on the test embeddings."""
    val_accuracy: float
    """Top-1 accuracy on the validation embeddings, of the chosen weight decay."""
    weight_decay: float
    """The L2 weight decay chosen on the validation split."""
    train_size: int
    """Training examples the classifier saw (k x classes for a few-shot probe)."""
    num_classes: int


# embeddings ---------------------------------------------------------------------------------------
@torch.no_grad()
def extract_embeddings(
    encode: Callable[[dict], Tensor],
    batches: Iterable[dict],
    label_fn: Callable[[dict], Tensor] = lambda batch: batch["labels"],
) -> tuple[Tensor, Tensor]:
    """(N, D) float32 embeddings on the CPU and their (N,) labels, one pass over `batches`."""
    xs, ys = [], []
    for batch in batches:
        labels = label_fn(batch)
        if len(labels) == 0:  # every item of the batch failed to decode
            continue
        xs.append(encode(batch).float().cpu())
        ys.append(labels.cpu())
    if not xs:
        raise ValueError("no examples to embed")
    return torch.cat(xs), torch.cat(ys)


def image_encoder(model: nn.Module) -> Callable[[dict], Tensor]:
    """Batch -> unit joint-space embeddings of its images, by an `ImageTextModule` or its `ImageTextPair` (frozen,
    eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    return lambda batch: model.encode_image(batch["images"].to(device))


def speech_encoder(model: nn.Module) -> Callable[[dict], Tensor]:
    """Batch -> unit joint-space embeddings of its waveforms, by a `SpeechTextModule` (frozen, eval mode)."""
    model.eval()
    device = next(model.parameters()).device
    return lambda batch: model.encode_speech(batch["waveforms"].to(device), batch["wave_lengths"].to(device))


def speaker_labels(speakers: Sequence[int]) -> tuple[Callable[[dict], Tensor], list[int]]:
    """Labels for LibriSpeech batches: the speaker of each utterance, as an index into the sorted speaker ids.

    `speakers[i]` is the speaker of utterance i of the split (`[u.speaker for u in dataset.utterances]`);
    batches name their utterances by `utt_keys`. Returns the label function and the sorted speaker ids.
    """
    ids = sorted(set(speakers))
    index = torch.tensor([ids.index(s) for s in speakers], dtype=torch.long)
    return (lambda batch: index[batch["utt_keys"].cpu()]), ids


# sampling -----------------------------------------------------------------------------------------
def split_per_class(labels: Tensor, counts: Sequence[int], seed: int = 0) -> list[Tensor]:
    """Disjoint index sets, the j-th with exactly `counts[j]` examples of every class, drawn with `seed`.

    Deterministic for a seed, and whatever the order of the classes. Raises when a class has too few examples.
    """
    g = torch.Generator().manual_seed(seed)
    parts: list[list[Tensor]] = [[] for _ in counts]
    need = sum(counts)
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        if len(members) < need:
            raise ValueError(f"class {c} has {len(members)} examples, fewer than the {need} asked for")
        members = members[torch.randperm(len(members), generator=g)]
        start = 0
        for part, n in zip(parts, counts):
            part.append(members[start : start + n])
            start += n
    return [torch.cat(part).sort().values for part in parts]


def few_shot_indices(labels: Tensor, k: int, seed: int = 0) -> Tensor:
    """Indices of exactly `k` examples of every class, drawn with `seed`."""
    return split_per_class(labels, (k,), seed)[0]


# the probe ----------------------------------------------------------------------------------------
class Standardise:
    """Centre on the training mean and scale by the training features' root-mean-square norm: the geometry
    is kept, and one weight-decay grid suits any tower's embedding scale."""

    def __init__(self, x: Tensor) -> None:
        self.mean = x.mean(dim=0)
        self.scale = (x - self.mean).pow(2).sum(dim=1).mean().sqrt().clamp_min(1e-8)

    def __call__(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.scale


def fit_logistic_regression(
    x: Tensor, y: Tensor, num_classes: int, weight_decay: float, max_iter: int = 200
) -> nn.Linear:
    """Multinomial logistic regression: minimises mean cross-entropy + weight_decay / 2 * ||W||^2 (the bias is
    not decayed) over the whole of (x, y) with L-BFGS."""
    classifier = nn.Linear(x.shape[1], num_classes)
    nn.init.zeros_(classifier.weight)
    nn.init.zeros_(classifier.bias)
    opt = torch.optim.LBFGS(
        classifier.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(classifier(x), y) + 0.5 * weight_decay * classifier.weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return classifier.requires_grad_(False)


def accuracy(classifier: nn.Module, x: Tensor, y: Tensor) -> float:
    return (classifier(x).argmax(dim=-1) == y).float().mean().item()


def linear_probe(
    train: tuple[Tensor, Tensor],
    val: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int | None = None,
    k: int | None = None,
    seed: int = 0,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
) -> ProbeResult:
    """Fit a linear classifier on `train` embeddings (all, or k per class), its weight decay chosen on `val`;
    score it on `test`. Each split is (embeddings (N, D), labels (N,))."""
    (x_train, y_train), (x_val, y_val), (x_test, y_test) = train, val, test
    num_classes = num_classes or int(max(y_train.max(), y_val.max(), y_test.max())) + 1
    if k is not None:
        chosen = few_shot_indices(y_train, k, seed)
        x_train, y_train = x_train[chosen], y_train[chosen]
    norm = Standardise(x_train)
    x_train, x_val, x_test = norm(x_train), norm(x_val), norm(x_test)
    best: tuple[float, float, nn.Linear] | None = None
    for wd in sorted(weight_decays, reverse=True):  # ties go to the stronger decay, seen first
        classifier = fit_logistic_regression(x_train, y_train, num_classes, wd)
        val_acc = accuracy(classifier, x_val, y_val)
        if best is None or val_acc > best[0]:
            best = (val_acc, wd, classifier)
    val_acc, wd, classifier = best
    return ProbeResult(accuracy(classifier, x_test, y_test), val_acc, wd, len(y_train), num_classes)


# features on disk ----------------------------------------------------------------------------------
class ImageFeatures(L.LightningModule):
    """`predict` writes the unit image embeddings of a classification DataModule's splits (prediction writer:
    embeddings.parquet), each image's id `<split role>/<label>/<index>`, for `probe_features`."""

    def __init__(
        self, ckpt_path: str | None = None, init_clip: TowerInit | None = None, vocab_size: int | None = None
    ) -> None:
        """
        Args:
            ckpt_path: an `ImageTextModule` checkpoint.
            init_clip: instead, a whole CLIP as published ({source: open_clip, name: ViT-B-32, path: FILE} or
                {source: hf, path: DIR}).
            vocab_size: unused (the CLI links the DataModule's vocabulary size to every model).
        """
        super().__init__()
        self.save_hyperparameters()
        from lightning_modules.image_text_module import image_text_from_checkpoint
        from lightning_modules.zero_shot import load_clip_start

        if bool(ckpt_path) == bool(init_clip):
            raise ValueError("give the model as model.init_args.ckpt_path or init_clip, one of them")
        pair = (
            image_text_from_checkpoint(ckpt_path, "probe")[0] if ckpt_path else load_clip_start(init_clip)[0]
        )
        self.pair = pair.eval().requires_grad_(False)

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        role = self.trainer.datamodule.predict_roles[dataloader_idx]
        ids = [f"{role}/{y}/{i}" for y, i in zip(batch["labels"].tolist(), batch["indices"].tolist())]
        return {"embeddings": {"image": (ids, self.pair.encode_image(batch["images"]))}, "unreadable": []}


def read_features(folder: str | Path) -> dict[str, tuple[Tensor, Tensor]]:
    """{split role: (embeddings (N, D), labels (N,))} of an `ImageFeatures` prediction folder."""
    import pyarrow.parquet as pq

    path = Path(folder) / "embeddings.parquet"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: write the features first (python cli.py predict ...)"
        )
    table = pq.read_table(path).to_pydict()
    rows: dict[str, tuple[list[list[float]], list[int]]] = {}
    for key, emb in zip(table["id"], table["embedding"]):
        role, label, _ = key.split("/")
        xs, ys = rows.setdefault(role, ([], []))
        xs.append(emb)
        ys.append(int(label))
    return {role: (torch.tensor(xs), torch.tensor(ys)) for role, (xs, ys) in rows.items()}


def held_out(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices of a training split and a validation split holding `fraction` of every class, drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        cut = max(1, round(fraction * len(members))) if len(members) > 1 else 0
        val.append(members[:cut])
        train.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def probe_features(argv: list[str], prog: str = "python cli.py") -> ProbeResult:
    """The `probe` command: a linear probe on features written by `predict` (see the module doc)."""
    p = argparse.ArgumentParser(
        prog=f"{prog} probe", description="Linear probe on image features written by predict (ImageFeatures)"
    )
    p.add_argument("--features", required=True, help="the prediction folder (embeddings.parquet)")
    p.add_argument("--k", type=int, default=None, help="few-shot: k training examples per class")
    p.add_argument(
        "--val_fraction", type=float, default=0.1, help="of train, per class, when there is no val"
    )
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    splits = read_features(a.features)
    missing = [role for role in ("train", "test") if role not in splits]
    if missing:
        raise ValueError(
            f"{a.features}: no {' or '.join(missing)} features (set data.train_split / test_split)"
        )
    train = splits["train"]
    if "val" in splits:
        val = splits["val"]
    else:  # the probe's regularisation is chosen on training images it does not fit
        fit, hold = held_out(train[1], a.val_fraction, a.seed)
        train, val = (train[0][fit], train[1][fit]), (train[0][hold], train[1][hold])
    result = linear_probe(train, val, splits["test"], k=a.k, seed=a.seed)
    out = Path(a.features) / "probe.json"
    out.write_text(json.dumps({**asdict(result), "k": a.k, "seed": a.seed}, indent=2) + "\n")
    print(
        f"linear probe: top-1 {100 * result.accuracy:.2f} on {len(splits['test'][1])} test images, weight decay "
        f"{result.weight_decay:g} (val {100 * result.val_accuracy:.2f}), {result.train_size} training examples; "
        f"wrote {out}"
    )
    return result
