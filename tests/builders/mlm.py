"""A tiny masked-LM system, random MLM batches and a resumable loader over them, and a system whose loss
turns NaN on chosen training calls: the MLM set-up of the training tests."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

from datamodules.loading import ResumableDataLoader, ResumableSampler
from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule

VOCAB, LENGTH = 64, 16


class RandomMLMBatches(Dataset):
    """Fixed random token sequences with 15% of positions to predict: enough for a model to take steps."""

    def __init__(self, n: int = 48, seed: int = 0, nsp: bool = False) -> None:
        self.nsp = nsp
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
        self.chosen = torch.rand(n, LENGTH, generator=g) < 0.15
        self.chosen[:, 1] = True

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        labels = torch.where(self.chosen[i], self.ids[i], IGNORE_INDEX)
        nsp = {"nsp_labels": torch.tensor(i % 2)} if self.nsp else {}
        return nsp | {
            "input_ids": torch.where(self.chosen[i], 4, self.ids[i]),
            "attention_mask": torch.ones(LENGTH, dtype=torch.long),
            "token_type_ids": torch.zeros(LENGTH, dtype=torch.long),
            "labels": labels,
            "index": i,
        }


def tiny_mlm(
    cls: type = MLMPretrainingModule,
    dropout: float = 0.1,
    attention_dropout: float = 0.1,
    num_layers: int | None = None,
    **kwargs,
) -> MLMPretrainingModule:
    encoder = {
        "size": "tiny",
        "layers": num_layers,
        "dropout": dropout,
        "attention_dropout": attention_dropout,
    }
    defaults = dict(
        vocab_size=VOCAB,
        max_position_embeddings=LENGTH,
        encoder=encoder,
        optimizer={"lr": 1e-3, "warmup_steps": 0, "schedule": "constant"},
    )
    return cls(**{**defaults, **kwargs})


def loader(dataset: Dataset, batch_size: int = 4) -> ResumableDataLoader:
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=3)
    return ResumableDataLoader(dataset, sampler=sampler, batch_size=batch_size)


class NaNOutputs:
    """Stands in for the model's `pretraining_outputs` and makes the summed MLM loss NaN on chosen training calls
    (counted from 0) of chosen ranks, as a bad batch would: before the step's all-reduce, which must see it. A class,
    not a closure, so ddp_spawn can pickle it."""

    def __init__(self, module: MLMPretrainingModule, nan_calls: set[int], rank: int | None = None) -> None:
        self.module, self.nan_calls, self.rank = module, nan_calls, rank
        self.original = module.model.pretraining_outputs
        self.calls = -1

    def __call__(self, *args, **kwargs):
        out = self.original(*args, **kwargs)
        if self.module.training:
            self.calls += 1
            if self.calls in self.nan_calls and self.rank in (None, self.module.global_rank):
                out = out._replace(mlm_loss_sum=out.mlm_loss_sum * float("nan"))
        return out


class NaNAtCalls(MLMPretrainingModule):
    """Turns the loss of chosen training calls (counted from 0) into NaN."""

    def __init__(self, nan_calls: set[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.model.pretraining_outputs = NaNOutputs(self, nan_calls)
