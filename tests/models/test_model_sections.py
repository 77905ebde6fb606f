"""One vocabulary for every system: `model.optimizer` (and `model.encoder` for the BERT systems) as sections,
at most 12 top-level arguments per system, checkpoints with flat hyper-parameters still read, and the two
checkpoint writers every run has coming from the CLI, not from each config."""

from __future__ import annotations

import contextlib
import io
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import lightning
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

from cli import main
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.bert import BertConfig
from lightning_modules.components.bert_finetune import read_mlm_checkpoint
from lightning_modules.finetune_module import SequenceClassificationModule
from lightning_modules.mlm_module import MLMPretrainingModule
from lightning_modules.training.checkpoints import _init_args, _systems
from lightning_modules.training.hparams import (
    FINETUNE_ENCODER,
    FINETUNE_OPTIMIZER,
    FLAT_ENCODER,
    MLM_ENCODER,
    MLM_OPTIMIZER,
    bert_config,
    sections_from_flat,
)
from lightning_modules.training.optim import OptimizerConfig
from tests.builders.alignment import image_text
from tests.builders.files import write_books
from tests.builders.runs import evaluate, fit_checkpoint
from tests.helpers import CONFIGS, cli_args

TASKS = ["mlm/bert_base.yaml", "finetune/sst2.yaml", "clip/quickstart.yaml", "speech/quickstart.yaml"]
TASKS += ["trimodal/quickstart.yaml"]
TRAINING = sorted(
    p.relative_to(CONFIGS).as_posix()
    for p in CONFIGS.glob("*/*.yaml")
    if {"max_steps", "max_epochs"} & ((yaml.safe_load(p.read_text()) or {}).get("trainer") or {}).keys()
)


def printed(config: str, *overrides: str) -> dict:
    """The config `fit --print_config` shows, with `overrides`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / config), *overrides, "--print_config"])
    return yaml.safe_load(out.getvalue())


def with_trainer(module: lightning.LightningModule) -> lightning.LightningModule:
    """What `configure_optimizers` reads of a trainer: the number of steps and the clipping settings."""
    module._trainer = SimpleNamespace(estimated_stepping_batches=10, gradient_clip_val=None)
    return module


# arguments --------------------------------------------------------------------------------------------------
CLI_SYSTEMS = [
    c
    for c in _systems()
    if c.__name__ not in ("ZeroShotClassifier", "CheckpointExtras", "SkipNonFiniteSteps")
]


@pytest.mark.parametrize("system", CLI_SYSTEMS, ids=lambda c: c.__name__)
def test_each_system_has_at_most_12_top_level_arguments(system: type) -> None:
    # the arguments of __init__, following **kwargs to the parent that takes them, as the CLI's parser does
    assert len(_init_args(system)) <= 12, (system.__name__, sorted(_init_args(system)))


def test_bert_systems_keep_their_encoder_defaults() -> None:
    old = BertConfig.from_size("base", dropout=0.1, attention_dropout=0.1, norm_first=False)
    assert bert_config(MLM_ENCODER, 30522) == bert_config(FINETUNE_ENCODER, 30522) == old
    tiny = bert_config({**asdict(MLM_ENCODER), "size": "tiny", "hidden": 64, "intermediate": 100}, 50, 16)
    assert (tiny.num_heads, tiny.intermediate_size, tiny.max_position_embeddings) == (1, 100, 16)


def test_mlm_arguments_are_sections() -> None:
    assert _init_args(MLMPretrainingModule) == {
        "vocab_size",
        "encoder",
        "max_position_embeddings",
        "pad_token_id",
        "init_from_hf",
        "optimizer",
        "gradient_checkpointing",
        "compile",
        "max_nonfinite_in_row",
        "ema",
    }


# --model.optimizer.lr ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "config", [TASKS[0], *(pytest.param(c, marks=pytest.mark.slow) for c in TASKS[1:])]
)  # about 2 s each: the MLM config, the one whose rate was a flat argument, in the default run
def test_optimizer_lr_reaches_every_task(config: str) -> None:
    shown = printed(config, "--model.optimizer.lr=0.123", "--trainer.default_root_dir=/runs/x")
    init = shown["model"]["init_args"]
    assert len(init) <= 12, sorted(init)  # the top-level arguments, as the printed config shows them
    section = OptimizerConfig(**init["optimizer"])
    assert section.lr == 0.123
    opt = section.build(torch.nn.Linear(2, 2), 10, fused=False)["optimizer"]
    assert {g["initial_lr"] for g in opt.param_groups} == {0.123}
    if config == "mlm/bert_base.yaml":
        check_writers(shown)


def check_writers(shown: dict) -> None:
    """bert_base's writers: the CLI's monitor, mode and file name; the config's save_top_k and step interval."""
    best, last = shown["checkpoint"], shown["last_checkpoint"]
    assert best["dirpath"] == last["dirpath"] == "/runs/x/checkpoints"
    assert (best["monitor"], best["mode"], best["save_top_k"], best["filename"]) == (
        "val/loss",
        "min",
        3,
        "best-{step}",
    )
    assert best["every_n_train_steps"] is None  # ranked when validation ends, on that validation's value
    assert (last["save_last"], last["save_top_k"], last["every_n_train_steps"]) == (True, 0, 5000)


def test_each_systems_optimizer_takes_its_section() -> None:
    tiny = {"size": "tiny", "layers": 1, "hidden": 32, "heads": 2}
    systems = [
        MLMPretrainingModule(
            vocab_size=50, max_position_embeddings=16, encoder=tiny, optimizer={"lr": 0.123}
        ),
        SequenceClassificationModule(
            vocab_size=50, encoder=tiny, optimizer={"lr": 0.123, "layer_decay": 0.5}
        ),
        image_text(lr=0.123),
    ]
    for module in systems:
        opt = with_trainer(module).configure_optimizers()["optimizer"]
        # the heads' group (the last) at the full rate; with layer_decay the encoder's below it
        assert opt.param_groups[-1]["initial_lr"] == pytest.approx(0.123)
    rates = sorted({g["initial_lr"] for g in systems[1].configure_optimizers()["optimizer"].param_groups})
    assert rates[0] == pytest.approx(0.123 * 0.5**2) and rates[-1] == pytest.approx(0.123)  # 1 block: d^(1+1)
    # the fields not given keep the task's defaults
    assert systems[0].optimizer_config.warmup_steps == MLM_OPTIMIZER.warmup_steps
    assert systems[1].optimizer_config.weight_decay == FINETUNE_OPTIMIZER.weight_decay


def test_alignment_systems_refuse_layer_decay() -> None:
    with pytest.raises(ValueError, match="layer_decay applies to the one BERT encoder"):
        image_text(layer_decay=0.8)


# checkpoints with flat hyper-parameters ---------------------------------------------------------------------
FLAT_MLM = {
    "size": "tiny",
    "vocab_size": 40,
    "num_layers": 1,
    "hidden_size": 32,
    "num_heads": 2,
    "intermediate_size": None,
    "max_position_embeddings": 16,
    "dropout": 0.1,
    "attention_dropout": 0.0,
    "norm_first": False,
    "pad_token_id": 0,
    "init_from_hf": None,
    "lr": 3e-4,
    "weight_decay": 0.05,
    "betas": (0.9, 0.98),
    "eps": 1e-8,
    "warmup_steps": 7,
    "schedule": "cosine",
    "gradient_checkpointing": False,
    "compile": False,
    "max_nonfinite_in_row": 20,
}


def flat_mlm_checkpoint(path: Path) -> dict:
    """An MLM checkpoint as the system wrote it with flat arguments, from the CLI (`_class_path`)."""
    torch.manual_seed(0)
    module = MLMPretrainingModule(
        vocab_size=40,
        max_position_embeddings=16,
        encoder={
            "size": "tiny",
            "layers": 1,
            "hidden": 32,
            "heads": 2,
            "attention_dropout": 0.0,
        },
    )
    ckpt = {
        "state_dict": module.state_dict(),
        "hyper_parameters": {
            **FLAT_MLM,
            "_class_path": "lightning_modules.mlm_module.MLMPretrainingModule",
            "_instantiator": "lightning.pytorch.cli.instantiate_module",
        },
        "pytorch-lightning_version": lightning.__version__,
    }
    torch.save(ckpt, path)
    return ckpt


def test_flat_hyperparameters_map_to_sections() -> None:
    h = sections_from_flat(FLAT_MLM, MLM_ENCODER, MLM_OPTIMIZER)
    assert h["encoder"] == {
        "size": "tiny",
        "layers": 1,
        "hidden": 32,
        "heads": 2,
        "dropout": 0.1,
        "attention_dropout": 0.0,
        "intermediate": None,
        "norm_first": False,
    }
    assert h["optimizer"] == {
        "lr": 3e-4,
        "weight_decay": 0.05,
        "betas": (0.9, 0.98),
        "eps": 1e-8,
        "warmup_steps": 7,
        "schedule": "cosine",
        "layer_decay": None,
    }
    assert not {"lr", "size", "hidden_size", "dropout"} & h.keys() and h["vocab_size"] == 40
    assert sections_from_flat(h) == h  # sections already: unchanged
    # a field the flat checkpoint lacks takes the system's default, not the dataclass's
    assert sections_from_flat({"lr": 1.0})["optimizer"]["warmup_steps"] == MLM_OPTIMIZER.warmup_steps


def test_checkpoint_with_flat_hyperparameters_loads(tmp_path: Path) -> None:
    path = tmp_path / "flat.ckpt"
    ckpt = flat_mlm_checkpoint(path)
    module = MLMPretrainingModule.load_from_checkpoint(path, map_location="cpu")
    cfg = module.model.cfg
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.norm_first) == (1, 32, 2, False)
    assert (cfg.dropout, cfg.attention_dropout) == (0.1, 0.0)
    assert module.optimizer_config == OptimizerConfig(3e-4, 0.05, (0.9, 0.98), 1e-8, 7, "cosine")
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(module.state_dict()[key], value), key
    # fine-tuning reads the encoder of the flat MLM checkpoint
    encoder_cfg, _ = read_mlm_checkpoint(path)
    assert encoder_cfg == cfg
    tuned = SequenceClassificationModule(init_ckpt=str(path), vocab_size=40)
    assert torch.equal(tuned.model.bert.embeddings.word.weight, module.model.bert.embeddings.word.weight)
    # and the Hugging Face export
    main(["export-hf", "--ckpt_path", str(path), "--out", str(tmp_path / "hf")])
    config = yaml.safe_load((tmp_path / "hf" / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"]) == (1, 32)


# checkpoint writers -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("config", TRAINING)
def test_no_config_repeats_the_checkpoint_writers(config: str) -> None:
    """The configs leave the writers to the CLI's `checkpoint` and `last_checkpoint` sections."""
    raw = yaml.safe_load((CONFIGS / config).read_text())
    callbacks = (raw.get("trainer") or {}).get("callbacks") or []
    assert not [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")], config


@pytest.mark.parametrize(
    "callbacks",
    [
        "--trainer.callbacks+=LearningRateMonitor",
        pytest.param("--trainer.callbacks=[]", marks=pytest.mark.slow),
    ],
)
def test_a_callback_given_on_the_command_line_keeps_the_writers(callbacks: str, tmp_path: Path) -> None:
    generate_shapes_coco(tmp_path / "shapes", n_train=8, n_val=4, image_size=32)
    root = tmp_path / "run"
    # the config's monitor and step interval, one changed on the command line
    cli = main(
        cli_args(
            "fit",
            "--trainer.max_steps=0",
            "--trainer.num_sanity_val_steps=0",
            f"--data.root={tmp_path / 'shapes'}",
            f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
            "--data.loader.num_workers=0",
            "--model.image.layers=1",
            "--model.text.layers=1",
            "--last_checkpoint.every_n_train_steps=7",
            callbacks,
            config="clip/quickstart.yaml",
            root=root,
        )
    )
    writers = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    shown = [(w.monitor, w.mode, w.save_last, w._every_n_train_steps) for w in writers]
    assert shown == [("val/R@mean", "max", None, 0), (None, "min", True, 7)], callbacks
    assert cli.trainer.checkpoint_callback is writers[0]
    assert all(Path(w.dirpath) == root / "checkpoints" for w in writers)
    monitors = sum(isinstance(c, LearningRateMonitor) for c in cli.trainer.callbacks)
    assert monitors == (2 if "+=" in callbacks else 0), callbacks  # the config's and the added one


@pytest.mark.slow  # a zero-step fit and a test run of the MLM quickstart, about 20 s
def test_cli_test_reads_a_checkpoint_with_flat_hyperparameters(tmp_path: Path) -> None:
    """`test --ckpt_path` reads the checkpoint's hyper-parameters into the config (Lightning's `_parse_ckpt_path`):
    flat ones come in as the sections."""
    books = tmp_path / "corpus" / "books_large_p1.txt"
    write_books(books, n_docs=40)
    data = [
        f"--data.bookcorpus=[{books}]",
        "--data.sample_corpus=false",
        "--data.tokenizer.vocab_size=100",
        "--data.examples.max_seq_length=32",
        "--data.examples.val_fraction=0.2",
        "--data.examples.test_fraction=0.2",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.num_proc=1",
        "--data.loader.batch_size=4",
    ]
    tiny = ["--model.encoder.size=tiny", "--model.encoder.layers=1", "--model.max_position_embeddings=64"]
    ckpt = torch.load(fit_checkpoint("mlm/quickstart.yaml", tmp_path, *data, *tiny), weights_only=True)
    hparams = dict(ckpt["hyper_parameters"])
    encoder, optimizer = hparams.pop("encoder"), hparams.pop("optimizer")
    flat_names = {field: flat for flat, field in FLAT_ENCODER.items()}
    hparams.update({flat_names[k]: v for k, v in encoder.items() if k in flat_names})
    hparams.update({k: v for k, v in optimizer.items() if k != "layer_decay"})
    assert "encoder" not in hparams and hparams["num_layers"] == 1 and hparams["lr"] == 1e-3
    flat = tmp_path / "flat.ckpt"
    torch.save({**ckpt, "hyper_parameters": hparams}, flat)
    # the config's own shape (base) differs: the checkpoint's is the one the model is built with
    cli = evaluate("test", "mlm/quickstart.yaml", flat, tmp_path, *data)
    assert cli.model.model.cfg.num_layers == 1 and cli.model.optimizer_config.lr == 1e-3
    assert float(cli.trainer.callback_metrics["test/loss"]) > 0
