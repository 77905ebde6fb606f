"""What every experiment config does with checkpoints: the best one ranked at validation on a fresh value (a
retrieval score for the alignment tasks, not the batch-size-dependent in-batch loss), and `last.ckpt` in
`<default_root_dir>/checkpoints/` from early on, so a run killed before its first validation can resume. The two
writers are the CLI's `checkpoint` and `last_checkpoint` sections; a config sets only what differs."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import yaml

from cli import WRITERS, main
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.trimodal_datamodule import generate_spoken_captions
from lightning_modules.components.retrieval import mean_recall
from tests.helpers import CONFIGS, cli_args

FOLDER = "${..trainer.default_root_dir}/checkpoints"  # the trainer's folder, from the writer's section
TRAINING = {
    "clip/coco_lit.yaml",
    "clip/coco_openclip_vit_b32.yaml",
    "clip/coco_shards_vit_b16.yaml",
    "clip/coco_vit_b16.yaml",
    "clip/pairs.yaml",
    "clip/quickstart.yaml",
    "finetune/conll2003.yaml",
    "finetune/mrpc.yaml",
    "finetune/sst2.yaml",
    "mlm/bert_base.yaml",
    "mlm/bert_small.yaml",
    "mlm/quickstart.yaml",
    "speech/clotho.yaml",
    "speech/librispeech_base.yaml",
    "speech/librispeech_hubert.yaml",
    "speech/manifest.yaml",
    "speech/quickstart.yaml",
    "trimodal/quickstart.yaml",
}
RETRIEVAL = {name for name in TRAINING if name.split("/")[0] in ("clip", "speech", "trimodal")}


def _load(name: str) -> dict:
    return yaml.safe_load((CONFIGS / name).read_text())


def _checkpoint_callbacks(config: dict) -> list[dict]:
    """The config's writers: the CLI's defaults with the config's sections over them, the best first."""
    return [{**asdict(default), **(config.get(key) or {})} for key, default in WRITERS.items()]


def test_training_configs_are_the_ones_with_a_model_and_a_length() -> None:
    """The rule below picks the configs the other tests check: a new experiment config is checked too."""
    found = set()
    for path in CONFIGS.rglob("*.yaml"):
        trainer = _load(str(path.relative_to(CONFIGS))).get("trainer") or {}
        if "max_steps" in trainer or "max_epochs" in trainer:
            found.add(path.relative_to(CONFIGS).as_posix())
    assert found == TRAINING


@pytest.mark.parametrize("name", sorted(TRAINING))
def test_checkpoint_callbacks_of_each_config(name: str) -> None:
    config = _load(name)
    trainer = config["trainer"]
    callbacks = _checkpoint_callbacks(config)
    assert callbacks and all(c.get("dirpath") == FOLDER for c in callbacks), name
    monitored = [c for c in callbacks if c.get("monitor")]
    periodic = [c for c in callbacks if not c.get("monitor")]

    # the best: saved when validation ends, ranked on that validation's value; a step or time trigger would
    # rank on the value of the validation before, and a monitored last.ckpt is rewritten only on improvement
    assert len(monitored) == 1, name
    best = monitored[0]
    assert best["every_n_train_steps"] is None and not best["save_last"], name
    # first in the list: `trainer.checkpoint_callback`, whose best_model_path the fine-tuning test reads
    assert _checkpoint_callbacks(config)[0] == best
    if name in RETRIEVAL:
        assert (best["monitor"], best["mode"]) == ("val/R@mean", "max"), name

    # last.ckpt alone (save_top_k 0), early: before the first step-based validation, or within 30 minutes
    assert len(periodic) == 1, name
    last = periodic[0]
    assert last.get("save_last") is True and last.get("save_top_k") == 0, name
    every = last["every_n_train_steps"]
    val_every = trainer.get("val_check_interval")
    step_based = isinstance(val_every, int) and trainer.get("check_val_every_n_epoch", 1) is None
    assert 0 < every < (val_every if step_based else 1001), name


def test_mean_recall_is_the_mean_of_every_recall_both_ways() -> None:
    recalls = {"i2t_R@1": torch.tensor(0.25), "i2t_R@5": torch.tensor(0.5), "t2i_R@1": torch.tensor(1.0)}
    assert mean_recall({**recalls, "loss": torch.tensor(9.0)}).item() == pytest.approx(1.75 / 3)
    with pytest.raises(ValueError, match="no R@K value"):
        mean_recall({"loss": torch.tensor(1.0)})


# the quickstarts, 2 steps each -----------------------------------------------------------------------------


def _fit(config: str, root: Path, *overrides: str):
    return main(
        cli_args(
            "fit",
            "--trainer.max_steps=2",
            "--trainer.num_sanity_val_steps=0",
            *overrides,
            config=config,
            root=root,
        )
    )


def _assert_last_in_root(root: Path, step: int = 2) -> None:
    last = root / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == step
    # nowhere else: not in the CSV logger's version folder
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.ckpt")) == [
        p.relative_to(root).as_posix() for p in sorted((root / "checkpoints").glob("*.ckpt"))
    ]


def _assert_best_by_mean_recall(cli, root: Path, prefixes: tuple[str, ...]) -> None:
    metrics = cli.trainer.callback_metrics
    recalls = [metrics[f"val/{p}_R@{k}"].item() for p in prefixes for k in (1, 5, 10)]
    assert metrics["val/R@mean"].item() == pytest.approx(sum(recalls) / len(recalls), abs=1e-6)
    best = cli.trainer.checkpoint_callback
    assert Path(best.best_model_path) == root / "checkpoints" / "best-step=2.ckpt"
    assert best.best_model_score.item() == pytest.approx(metrics["val/R@mean"].item())


@pytest.mark.slow  # test_image_text's CLI smoke test checks last.ckpt there too; the speech case covers R@mean
def test_clip_quickstart_writes_last_and_best_in_root(tmp_path: Path) -> None:
    generate_shapes_coco(tmp_path / "shapes", n_train=16, n_val=8, image_size=32)
    root = tmp_path / "run"
    cli = _fit(
        "clip/quickstart.yaml",
        root,
        f"--data.root={tmp_path / 'shapes'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.loader.batch_size=8",
        "--trainer.val_check_interval=2",
    )
    _assert_last_in_root(root)
    _assert_best_by_mean_recall(cli, root, ("i2t", "t2i"))


def test_speech_quickstart_writes_last_and_best_in_root(tmp_path: Path) -> None:
    generate_tone_librispeech(tmp_path / "tones", n_train_utts=16, n_val_utts=6)
    root = tmp_path / "run"
    cli = _fit(
        "speech/quickstart.yaml",
        root,
        f"--data.root={tmp_path / 'tones'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.loader.num_workers=0",
        "--data.batching.max_duration=6",  # 2 or 3 utterances a batch: fast steps
        "--data.batching.max_batch_seconds=8",
        "--trainer.val_check_interval=2",
    )
    _assert_last_in_root(root)
    _assert_best_by_mean_recall(cli, root, ("a2t", "t2a"))


@pytest.mark.slow  # about 20 s; test_trimodal runs this config too (without these checks)
def test_trimodal_quickstart_writes_last_and_best_in_root(tmp_path: Path) -> None:
    generate_shapes_coco(tmp_path / "shapes", n_train=16, n_val=4, image_size=32)
    generate_spoken_captions(tmp_path / "shapes", tmp_path / "speech", (1, 1))
    data = "--data.init_args"
    root = tmp_path / "run"
    cli = _fit(
        "trimodal/quickstart.yaml",
        root,
        f"{data}.tokenizer.cache_dir={tmp_path / 'cache'}",
        f"{data}.image_text.root={tmp_path / 'shapes'}",
        # a dict argument: the override replaces the config's whole loader section of image_text
        f'{data}.image_text.loader={{"batch_size": 4, "num_workers": 0}}',
        f"{data}.speech_text.root={tmp_path / 'speech'}",
        f'{data}.speech_text.batching={{"max_duration": 6, "max_batch_seconds": 8, "num_buckets": 4}}',
        f"{data}.speech_text.loader.num_workers=0",
        "--trainer.val_check_interval=2",
    )
    _assert_last_in_root(root)
    # the emergent image<->speech R@K are logged but not in the mean: only the two trained pairs are
    assert "val/i2a_R@5" in cli.trainer.callback_metrics
    _assert_best_by_mean_recall(cli, root, ("i2t", "t2i", "a2t", "t2a"))


@pytest.mark.slow  # test_experience's W&B run checks last.ckpt there too
def test_mlm_quickstart_writes_last_in_root_without_validating(tmp_path: Path) -> None:
    root = tmp_path / "run"
    _fit(
        "mlm/quickstart.yaml",
        root,
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.num_proc=1",
        "--model.init_args.encoder.size=tiny",
        "--model.init_args.encoder.hidden=32",
        "--model.init_args.encoder.layers=1",
    )
    _assert_last_in_root(root)
    assert not list((root / "checkpoints").glob("best-*"))  # no validation yet, so no best
