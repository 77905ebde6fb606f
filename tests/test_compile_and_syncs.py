"""What the GPU path needs from the training loop, checked on CPU: compiled blocks stay compiled after the
`Throughput` callback counted its FLOPs; MFU scales with the work of each batch and is named HFU under activation
checkpointing; no host sync from checkpoint triggers, unpadding or the sparse MLM head when the collate gives the
shapes."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger

from lightning_modules.throughput import Throughput
from tests.helpers import quiet_trainer
from tests.test_resilience import RandomMLMBatches, loader, tiny_mlm


class CountingBackend:
    """A torch.compile backend that runs the captured graph as is and counts compilations and graph calls."""

    def __init__(self) -> None:
        self.compiled = 0
        self.calls = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.compiled += 1

        def run(*args):
            self.calls += 1
            return graph.forward(*args)

        return run


class GraphCallsPerBatch(L.Callback):
    """The backend's graph calls so far, after every training batch."""

    def __init__(self, backend: CountingBackend) -> None:
        self.backend = backend
        self.calls: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.calls.append(self.backend.calls)


def test_compiled_module_is_used_after_the_flop_count(tmp_path: Path) -> None:
    """The first batch is counted with the compiled embeddings forced eager (no graph call, no compilation); every
    later batch runs the compiled graph."""
    torch._dynamo.reset()
    backend = CountingBackend()
    model = tiny_mlm()
    model.model.bert.embeddings.compile(backend=backend)  # user code: Dynamo skips torch.nn modules as frames
    callback, graph_calls = Throughput(peak_tflops=1.0), GraphCallsPerBatch(backend)
    t = quiet_trainer(
        max_steps=3,
        log_every_n_steps=1,
        logger=CSVLogger(tmp_path),
        callbacks=[callback, graph_calls],
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    try:
        t.fit(model, loader(RandomMLMBatches()))
    finally:
        torch._dynamo.reset()
    assert callback.flops_per_batch and "train/mfu" in t.callback_metrics
    calls = graph_calls.calls
    assert calls[0] == 0 and backend.compiled >= 1, calls  # the counted batch ran eagerly
    # the compiled graph ran in each later batch
    assert all(after > before for before, after in zip(calls, calls[1:])), calls
