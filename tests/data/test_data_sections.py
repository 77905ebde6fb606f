"""The DataModules' config vocabulary: shared `loader` / `tokenizer` sections, at most 12 top-level arguments,
every config's data section parses, overrides of a section reach the loaders, and the readers of saved DataModule
hyperparameters understand both the nested spelling and the flat one of DataModules without sections."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning.pytorch import LightningDataModule

import cli  # noqa: F401  (its jsonargparse settings: attribute docstrings)
import datamodules
from datamodules.sections import LoaderConfig, TokenizerConfig, data_setting, flat_hparams
from lightning_modules.image_text_module import recorded_statistics
from tests.helpers import REPO

MAX_ARGS = 12


def datamodule_classes() -> list[type[LightningDataModule]]:
    """Every LightningDataModule defined in the `datamodules` package: what `--data CLASS` can name."""
    found = {}
    for info in pkgutil.walk_packages(datamodules.__path__, "datamodules."):
        module = importlib.import_module(info.name)
        for obj in vars(module).values():
            if (
                inspect.isclass(obj)
                and issubclass(obj, LightningDataModule)
                and obj.__module__ == module.__name__
                and "__init__" in vars(obj)
            ):
                found[f"{obj.__module__}.{obj.__qualname__}"] = obj
    return [found[name] for name in sorted(found)]


def data_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    return parser


def test_every_datamodule_has_at_most_12_arguments_and_the_shared_sections() -> None:
    classes = datamodule_classes()
    assert len(classes) >= 7  # COCO, ImageFolder, LibriSpeech, MLM, GLUE, CoNLL, tri-modal
    for cls in classes:
        params = [p for p in inspect.signature(cls.__init__).parameters.values() if p.name != "self"]
        assert len(params) <= MAX_ARGS, f"{cls.__name__}: {len(params)} arguments {[p.name for p in params]}"
        names = {p.name: p for p in params}
        flat = names.keys() & {"batch_size", "num_workers", "tokenizer_vocab_size", "lowercase", "cache_dir"}
        assert not flat, f"{cls.__name__} takes {sorted(flat)} flat instead of in its sections"
        if "loader" in names:
            assert names["loader"].annotation in (LoaderConfig, "LoaderConfig")
        if "tokenizer" in names:
            assert names["tokenizer"].annotation in (TokenizerConfig, "TokenizerConfig")


def configs_with_a_datamodule() -> list[Path]:
    return [
        p
        for p in sorted((REPO / "configs").rglob("*.yaml"))
        if "class_path" in str(yaml.safe_load(p.read_text()).get("data"))
    ]


@pytest.mark.parametrize("path", configs_with_a_datamodule(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_data_section_of_every_config_parses(path: Path) -> None:
    """Parsed against the DataModule's signature (the whole configs are printed by test_docs_commands); an
    interpolation such as `${model.init_args.init_ckpt}` is a string here."""
    parsed = data_parser().parse_object({"data": yaml.safe_load(path.read_text())["data"]})
    init = parsed.data.init_args
    for section in ("loader", "tokenizer", "images"):
        if section in init:
            assert not isinstance(init[section], str), f"{path}: data.{section} is a section, not a value"


def test_loader_override_reaches_the_loaders_and_keeps_the_other_defaults(tmp_path: Path) -> None:
    (tmp_path / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "good", "film"])
    )
    rows = "".join(f"a good film\t{i % 2}\n" for i in range(10))
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + rows)
    (tmp_path / "dev.tsv").write_text("sentence\tlabel\n" + rows)
    parser = data_parser()
    args = ["--data", "datamodules.text.glue_datamodule.GlueDataModule", f"--data.root={tmp_path}"]
    args += [f"--data.tokenizer.path={tmp_path / 'vocab.txt'}", "--data.loader.batch_size=3"]
    dm = parser.instantiate_classes(parser.parse_args(args)).data
    assert (dm.loader_config.batch_size, dm.loader_config.seed, dm.loader_config.num_workers) == (
        3,
        12345,
        0,
    )  # GLUE's own defaults
    dm.setup("fit")
    assert [len(b["labels"]) for b in dm.train_dataloader()] == [3, 3, 3, 1]
    assert len(next(iter(dm.val_dataloader()))["labels"]) == 3  # eval_batch_size None: batch_size
    assert dm.hparams["loader"] == {
        "batch_size": 3,
        "eval_batch_size": None,
        "num_workers": 0,
        "seed": 12345,
        "pin_memory": None,
    }  # a plain dict: checkpoints load with weights_only=True

    # a DataModule's section default other than the class's: overriding one field keeps the others
    coco = [
        "--data",
        "datamodules.image.coco_datamodule.CocoCaptionsDataModule",
        "--data.loader.eval_batch_size=16",
    ]
    dm = parser.instantiate_classes(parser.parse_args(coco)).data
    assert (dm.batch_size, dm.eval_batch_size, dm.tokenizer_config.vocab_size) == (64, 16, 8192)
    assert dm.tokenizer_config.cache_dir is None  # $XDG_CACHE_HOME/mmpretrain, never under the data root


FLAT = {"image_size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "tokenizer": "vocab.txt"}
FLAT |= {"tokenizer_vocab_size": 300, "context_length": 32, "predict_split": "val2017", "batch_size": 8}
NESTED = {
    "images": {"image_size": 16, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "resize": "tensor"},
    "tokenizer": {"path": "vocab.txt", "vocab_size": 300, "lowercase": True},
    "loader": {"batch_size": 8},
    "predict": {"split": "val2017"},
    "context_length": 32,
}


@pytest.mark.parametrize("hparams", [FLAT, NESTED], ids=["flat", "nested"])
def test_saved_datamodule_settings_read_in_either_spelling(hparams: dict) -> None:
    assert data_setting(hparams, "images", "mean") == [0.5, 0.4, 0.3]
    assert data_setting(hparams, "tokenizer", "path") == "vocab.txt"
    assert data_setting(hparams, "tokenizer", "vocab_size") == 300
    assert data_setting(hparams, "predict", "split") == "val2017"
    assert data_setting(hparams, "loader", "batch_size") == 8
    assert data_setting(hparams, "loader", "seed", 7) == 7  # absent: the default
    flat = flat_hparams(hparams)
    assert {k: flat[k] for k in FLAT} == FLAT
    # the readers of checkpoints: the normalisation a run's DataModule named, what the towers check
    assert recorded_statistics({"mean": None}, hparams) == {"mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2)}
    assert recorded_statistics({"mean": [0.1, 0.1, 0.1]}, hparams) == {"std": (0.2, 0.2, 0.2)}


def test_image_tower_checks_the_nested_datamodule_settings() -> None:
    from lightning_modules.components.image_tower import ImageTowerConfig

    config = ImageTowerConfig(arch="vit_tiny", image_size=32, patch_size=16, layers=1, width=32)
    config.check_data({"images": {"image_size": 32}}, "data")
    with pytest.raises(ValueError, match="image_size"):
        config.check_data({"images": {"image_size": 16}}, "data")
    with pytest.raises(ValueError, match="image_size"):
        config.check_data({"image_size": 16}, "data")
