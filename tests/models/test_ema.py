"""The exponential moving average of the weights (`model.ema`, lightning_modules/training/ema.py).

Default run: the average equals one computed by hand from the weights after each step (start step and update
interval included); a run interrupted by a checkpoint and resumed ends with the same average, bit for bit, as
an unbroken one; validation scores the averaged weights when asked and the raw ones stay the model's; `export
--ema` writes the average; every system takes the section; under FSDP2 (a gloo world of one) the averages are
DTensors sharded as the parameters. Slow: two gloo processes under DDP keep identical averages, and two under
FSDP2 checkpoint theirs shard by shard, resume and consolidate them to one process's average.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.multiprocessing as mp
from lightning.pytorch.strategies import DDPStrategy
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

from cli import consolidate, export
from lightning_modules.contrastive_module import OptimizerConfig
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.training.checkpoints import read_checkpoint
from lightning_modules.training.ema import EMACallback, EMAConfig, averaged_tensors, ema_of
from lightning_modules.training.strategies import FSDP2Strategy, apply_fsdp2
from tests.builders.alignment import IMAGE, SPEECH, TEXT, VOCAB, image_text_batches
from tests.builders.runs import quickstart
from tests.helpers import fit_batches, free_port, quiet_trainer, world_of_one

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
EMA = EMAConfig(decay=0.6, start_step=1, every_n_steps=2)  # steps 1: copy, 2: none, 3: average, 4: none


def _system(ema: EMAConfig | None = EMA) -> ImageTextModule:
    torch.manual_seed(0)
    module = ImageTextModule(IMAGE, TEXT, vocab_size=VOCAB, embed_dim=16, ema=ema)
    # a large eps: Adam would turn the float noise of a gradient that is zero in exact arithmetic (the attention
    # keys' bias) into steps as large as lr, which differ between one process and two
    module.optimizer_config = OptimizerConfig(lr=1e-2, eps=1e-3, warmup_steps=0, schedule="constant")
    return module


def _batches(rank: int = 0, world: int = 1) -> list[dict]:
    out = []
    for step in range(STEPS):
        batch = image_text_batches(torch.Generator().manual_seed(100 + step))[0]
        lo, hi = rank * 4 // world, (rank + 1) * 4 // world
        out.append({k: v[lo:hi] if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return out


class RecordWeights(L.Callback):
    """The averaged tensors' values after every optimizer step."""

    def __init__(self) -> None:
        self.after_step: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.after_step.append({k: v.detach().clone() for k, v in averaged_tensors(pl_module).items()})


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory: pytest.TempPathFactory, one_thread_module: None) -> dict:
    """STEPS steps in one go, the weights after each and the last checkpoint (on one thread, as the tests that
    compare with it: thread counts change float sums)."""
    root = tmp_path_factory.mktemp("ema_unbroken")
    module, record = _system(), RecordWeights()
    trainer = fit_batches(module, _batches(), STEPS, root, callbacks=[record])
    trainer.save_checkpoint(root / "last.ckpt")
    return {"module": module, "weights": record.after_step, "ckpt": root / "last.ckpt"}


def test_the_average_is_the_hand_computed_one(unbroken: dict) -> None:
    w = unbroken["weights"]
    d = EMA.decay
    # step 1 <= start_step: the weights; step 3 = start + 2: one update; steps 2 and 4: not due
    expected = {k: d * w[0][k].double() + (1 - d) * w[2][k].double() for k in w[0]}
    module = unbroken["module"]
    ema = ema_of(module)
    assert ema.last_step == STEPS
    average = dict(zip(ema.names, ema.average))
    assert average.keys() == expected.keys()
    assert any(not torch.equal(w[0][k], w[2][k]) for k in expected)  # the weights moved between the two
    for key, value in expected.items():
        # one float32 lerp against the float64 formula
        torch.testing.assert_close(average[key].double(), value, rtol=1e-6, atol=1e-7, msg=key)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable <= average.keys()
    # the checkpoint: the raw weights as state_dict, the average beside them
    ckpt = read_checkpoint(unbroken["ckpt"])
    assert ckpt["hyper_parameters"]["ema"] == {
        "decay": 0.6,
        "start_step": 1,
        "every_n_steps": 2,
        "evaluate": True,
    }
    for key, value in average.items():
        assert torch.equal(ckpt["ema"][key], value), key
        assert torch.equal(ckpt["state_dict"][key], w[-1][key]), key


def test_an_interrupted_run_resumes_the_average_exactly(unbroken: dict, tmp_path: Path) -> None:
    first = fit_batches(_system(), _batches(), 3, tmp_path / "first")  # stops after step 3, the update
    first.save_checkpoint(tmp_path / "step3.ckpt")
    resumed = _system()
    fit_batches(resumed, _batches(), STEPS, tmp_path / "resumed", ckpt=tmp_path / "step3.ckpt")
    ema, reference = ema_of(resumed), ema_of(unbroken["module"])
    assert ema.names == reference.names
    for name, mine, theirs in zip(ema.names, ema.average, reference.average):
        assert torch.equal(mine, theirs), name
    for name, value in unbroken["module"].state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name


def _val_loss(module: L.LightningModule, evaluate: bool) -> float:
    ema = ema_of(module)
    ema.config.evaluate = evaluate
    val = image_text_batches(torch.Generator().manual_seed(7))[1]
    trainer = quiet_trainer()
    return trainer.validate(module, DataLoader([val], batch_size=None), verbose=False)[0]["val/loss"]


def test_validation_scores_the_average_and_keeps_the_raw_weights(unbroken: dict) -> None:
    module = unbroken["module"]
    raw = {k: v.clone() for k, v in module.state_dict().items()}
    on_average = _val_loss(module, evaluate=True)
    assert all(torch.equal(module.state_dict()[k], v) for k, v in raw.items())  # swapped back
    on_raw = _val_loss(module, evaluate=False)
    assert on_average != on_raw
    ema = ema_of(module)
    ema.swap()  # the average as the model's weights, evaluated without the callback's swap
    try:
        assert _val_loss(module, evaluate=False) == on_average
    finally:
        ema.swap()
        ema.config.evaluate = True
    assert all(torch.equal(module.state_dict()[k], v) for k, v in raw.items())
    saved = read_checkpoint(unbroken["ckpt"])["ema"]
    assert all(torch.equal(saved[k], v) for k, v in zip(ema.names, ema.average))
    assert any(isinstance(c, EMACallback) for c in module.configure_callbacks())
    assert _system(ema=None).configure_callbacks() == []


def test_export_writes_the_average_and_refuses_a_checkpoint_without_one(
    unbroken: dict, tmp_path: Path
) -> None:
    ema = ema_of(unbroken["module"])
    out = export(
        [
            "--ckpt_path",
            str(unbroken["ckpt"]),
            "--out",
            str(tmp_path / "image.pt"),
            "--what",
            "image",
            "--ema",
        ]
    )
    written = torch.load(out, weights_only=True)
    prefix = "pair.image.backbone."
    averaged = {n.removeprefix(prefix): t for n, t in zip(ema.names, ema.average) if n.startswith(prefix)}
    assert averaged and averaged.keys() <= written.keys()
    for key, value in averaged.items():
        assert torch.equal(written[key], value), key
    plain = tmp_path / "plain.ckpt"
    trainer = fit_batches(_system(ema=None), _batches(), 1, tmp_path / "plain")
    trainer.save_checkpoint(plain)
    with pytest.raises(ValueError, match="holds no EMA weights"):
        export(["--ckpt_path", str(plain), "--out", str(tmp_path / "x.pt"), "--ema"])


def test_every_system_takes_the_section() -> None:
    from lightning_modules.components.towers import EncoderShape
    from lightning_modules.finetune_module import SequenceClassificationModule
    from lightning_modules.mlm_module import MLMPretrainingModule
    from lightning_modules.speech_text_module import SpeechTextModule
    from lightning_modules.trimodal_module import TriModalModule

    systems = [
        MLMPretrainingModule(VOCAB, EncoderShape("tiny", layers=1, hidden=64, heads=2), ema=EMAConfig()),
        SequenceClassificationModule(
            encoder=EncoderShape("tiny", layers=1, hidden=64), vocab_size=VOCAB, ema=EMAConfig()
        ),
        SpeechTextModule(SPEECH, TEXT, vocab_size=VOCAB, embed_dim=16, ema=EMAConfig()),
        TriModalModule(IMAGE, SPEECH, TEXT, vocab_size=VOCAB, embed_dim=16, ema=EMAConfig()),
    ]
    for module in systems:
        ema = ema_of(module)
        trainable = {p.data_ptr() for p in module.parameters() if p.requires_grad}
        assert trainable <= {t.data_ptr() for t in ema.live}, type(module).__name__
        assert isinstance(module.hparams["ema"], dict)  # a checkpoint of it loads with weights_only
    with pytest.raises(ValueError, match="decay must be in"):
        EMAConfig(decay=1.0)


def test_fsdp2_averages_are_dtensors_sharded_as_the_parameters(tmp_path: Path) -> None:
    module = _system()
    with world_of_one(tmp_path) as mesh:
        apply_fsdp2(module, mesh, param_dtype=None, reduce_dtype=None)
        ema = ema_of(module)
        params = {n: p for n, p in module.named_parameters()}
        for name, average in zip(ema.names, ema.average):
            if name in params:
                assert isinstance(average, DTensor) and average.placements == params[name].placements, name
        full = {
            n: (t.full_tensor() if isinstance(t, DTensor) else t).clone()
            for n, t in averaged_tensors(module).items()
        }
        with torch.no_grad():
            ema.average[0].add_(1.0)  # average and weights differ in one tensor: the swap exchanges them
        ema.swap()
        swapped = averaged_tensors(module)[ema.names[0]]
        assert torch.equal(swapped.full_tensor(), full[ema.names[0]] + 1.0)
        assert torch.equal(ema.state()[ema.names[0]], full[ema.names[0]])
        ema.swap()
        with torch.no_grad():
            ema.average[0].sub_(1.0)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
        assert ema.update(1)  # step 1 <= start_step: the weights themselves
        state = ema.state()
        for name, old in full.items():
            expected = old + 1.0 if name in params else old
            torch.testing.assert_close(state[name], expected, rtol=0, atol=0, msg=name)
        with torch.no_grad():
            for p in module.parameters():
                p.add_(1.0)
        assert not ema.update(STEPS)  # past start_step, (4 - 1) % 2 != 0: not due ...
        assert ema.update(5)  # ... step 5 is: 0.6 average + 0.4 (average + 1)
        for name, value in ema.state().items():
            expected = state[name] + 0.4 if name in params else state[name]
            # float32 lerp against adding 0.4: a rounding of the operands' size
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-6, msg=name)


# two processes ---------------------------------------------------------------------------------------------------
DEADLINE_S = 300


def _rank(rank: int, kind: str, root: str, port: int) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    batches = _batches(rank, 2)
    out = Path(root)

    def strategy():
        if kind == "ddp":
            return DDPStrategy(process_group_backend="gloo")
        return FSDP2Strategy(param_dtype="float32", process_group_backend="gloo")

    def fit(steps: int, ckpt: Path | None) -> L.LightningModule:
        module = _system()
        trainer = fit_batches(
            module, batches, steps, out, ckpt, use_distributed_sampler=False, strategy=strategy(), devices=2
        )
        trainer.save_checkpoint(out / f"{kind}_{steps}.ckpt")
        return module

    module = fit(2, None)
    module = fit(STEPS, out / f"{kind}_2.ckpt")
    state = ema_of(module).state()
    torch.save(state, out / f"{kind}_rank{rank}.pt")


def _two_processes(kind: str, root: Path) -> None:
    start = time.monotonic()
    context = mp.start_processes(
        _rank, args=(kind, str(root), free_port()), nprocs=2, join=False, start_method="spawn"
    )
    while not context.join(timeout=1):
        if time.monotonic() - start > DEADLINE_S:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{kind} on 2 processes did not finish in {DEADLINE_S} s")


@pytest.mark.slow  # 2 gloo processes x 2 runs per strategy, ~1 min each on 2 cores
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_processes_keep_one_average_and_resume_it(kind: str, unbroken: dict, tmp_path: Path) -> None:
    _two_processes(kind, tmp_path)
    ranks = [torch.load(tmp_path / f"{kind}_rank{r}.pt", weights_only=True) for r in range(2)]
    reference = dict(zip(ema_of(unbroken["module"]).names, ema_of(unbroken["module"]).average))
    assert ranks[0].keys() == ranks[1].keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(ranks[0][key], ranks[1][key]), key  # the same average on both ranks
        # two half-batches and a reduce in another order than one whole batch: fp32 reassociation
        torch.testing.assert_close(ranks[0][key], value, rtol=1e-4, atol=1e-5, msg=key)
    last = tmp_path / f"{kind}_{STEPS}.ckpt"
    if kind == "fsdp2":  # a folder of shards, the average among them; consolidate puts it in the file's `ema`
        assert last.is_dir()
        last = consolidate(["--ckpt_path", str(last), "--out", str(tmp_path / "consolidated.ckpt")])
    ckpt = read_checkpoint(last)
    assert not any(k.startswith("ema.") for k in ckpt["state_dict"])
    for key, value in ranks[0].items():
        assert torch.equal(ckpt["ema"][key], value), key
    print(json.dumps({"kind": kind, "tensors": len(reference)}))


@pytest.mark.slow  # the MLM quickstart's corpus prepared, 4 steps, a validation, a test and an export: ~30 s
def test_mlm_cli_trains_validates_and_exports_the_average(tmp_path: Path) -> None:
    """Through the CLI: `--model.init_args.ema.*` parses, the checkpoint holds the average, validate and test of
    the checkpoint score it, and `export-hf --ema` writes it."""
    from cli import main

    def args(command: str, *extra: str) -> list[str]:
        return quickstart(
            command, str(tmp_path / "cache"), tmp_path, "--model.init_args.ema.decay=0.5", *extra
        )

    main(args("fit", "--trainer.max_steps=4", "--trainer.limit_val_batches=0"))
    ckpt_path = next(tmp_path.rglob("last.ckpt"))
    ckpt = read_checkpoint(ckpt_path)
    assert ckpt["hyper_parameters"]["ema"]["decay"] == 0.5
    assert ckpt["ema"].keys() <= ckpt["state_dict"].keys()
    assert any(not torch.equal(v, ckpt["state_dict"][k]) for k, v in ckpt["ema"].items())
    # LightningCLI takes the model's arguments of --ckpt_path from the checkpoint: variants of it say what to score
    raw = dict(
        ckpt,
        hyper_parameters={
            **ckpt["hyper_parameters"],
            "ema": {**ckpt["hyper_parameters"]["ema"], "evaluate": False},
        },
    )
    # the average under every name of a tensor: the MLM head's decoder is the word embedding, saved once
    state = ckpt["state_dict"]
    first_name = {state[k].data_ptr(): k for k in reversed(list(state)) if k in ckpt["ema"]}
    averaged_state = {k: ckpt["ema"].get(first_name.get(v.data_ptr(), k), v) for k, v in state.items()}
    averaged = dict(raw, state_dict=averaged_state)
    losses = {}
    for name, variant in (("ema", None), ("raw", raw), ("averaged", averaged)):
        path = ckpt_path
        if variant is not None:
            path = tmp_path / f"{name}.ckpt"
            torch.save(variant, path)
        cli = main(args("validate", f"--ckpt_path={path}"))
        losses[name] = float(cli.trainer.callback_metrics["val/loss"])
    assert losses["ema"] != losses["raw"]
    assert losses["ema"] == losses["averaged"]  # validation scored the average
    out = tmp_path / "hf"
    main(["export-hf", f"--ckpt_path={ckpt_path}", f"--out={out}", "--ema"])
    from safetensors.torch import load_file

    written = load_file(out / "model.safetensors")
    qkv = "model.bert.encoder.blocks.0.attention.qkv.weight"
    width = ckpt["ema"][qkv].shape[1]
    query = written["bert.encoder.layer.0.attention.self.query.weight"]
    assert torch.equal(query, ckpt["ema"][qkv][:width])
    assert not torch.equal(query, ckpt["state_dict"][qkv][:width])
