"""The private Lightning names the framework relies on (lightning_modules/training/lightning_private.py) exist on the
installed Lightning with the signatures it calls them with, Lightning still calls them where the framework expects,
and the guarded functions work on a real Trainer's loop or fail with a one-line error naming the missing name."""

from __future__ import annotations

import inspect

import lightning as L
import pytest
import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loops.training_epoch_loop import _TrainingEpochLoop

from lightning_modules.training.lightning_private import (
    PARSE_CKPT_PATH,
    SIGTERM_BROADCAST,
    parse_ckpt_path_into_sections,
    require_private,
    restore_sigterm_broadcast,
    silence_sigterm_broadcast,
)
from tests.helpers import cli_args, quiet_trainer


def test_the_private_names_exist_with_the_signatures_we_call() -> None:
    # both are called with no argument but self: an added required parameter would break the override and the stand-in
    assert list(inspect.signature(getattr(_TrainingEpochLoop, SIGTERM_BROADCAST)).parameters) == ["self"]
    assert list(inspect.signature(getattr(LightningCLI, PARSE_CKPT_PATH)).parameters) == ["self"]


def test_lightning_still_calls_them_where_we_replace_them() -> None:
    # an override Lightning no longer calls would be skipped silently: the training step and the CLI's parse call them
    assert f"self.{SIGTERM_BROADCAST}()" in inspect.getsource(_TrainingEpochLoop.advance)
    assert f"self.{PARSE_CKPT_PATH}()" in inspect.getsource(LightningCLI)


def test_sigterm_broadcast_is_silenced_and_restored_on_a_real_loop(monkeypatch) -> None:
    broadcasts = []
    monkeypatch.setattr(torch.distributed, "broadcast", lambda tensor, src: broadcasts.append(src))
    trainer = quiet_trainer(devices=1, enable_checkpointing=False)
    loop = trainer.fit_loop.epoch_loop
    loop._broadcast_sigterm_tensor()
    assert broadcasts == [0]  # Lightning's own broadcasts rank 0's flag
    silence_sigterm_broadcast(trainer)
    loop._broadcast_sigterm_tensor()
    assert broadcasts == [0]
    restore_sigterm_broadcast(trainer)
    assert SIGTERM_BROADCAST not in vars(loop)
    loop._broadcast_sigterm_tensor()
    assert broadcasts == [0, 0]
    restore_sigterm_broadcast(trainer)  # restoring twice is harmless


def test_a_missing_private_name_is_a_one_line_error_naming_it_and_the_version(monkeypatch) -> None:
    with pytest.raises(RuntimeError, match=rf"lightning {L.__version__} has no object\._gone,"):
        require_private(object(), "_gone")
    trainer = quiet_trainer(devices=1, enable_checkpointing=False)
    monkeypatch.delattr(_TrainingEpochLoop, SIGTERM_BROADCAST)
    with pytest.raises(RuntimeError, match=rf"no _TrainingEpochLoop\.{SIGTERM_BROADCAST},"):
        silence_sigterm_broadcast(trainer)
    monkeypatch.delattr(LightningCLI, PARSE_CKPT_PATH)
    with pytest.raises(RuntimeError, match=rf"no LightningCLI\.{PARSE_CKPT_PATH},"):
        parse_ckpt_path_into_sections(None)


def test_a_checkpoint_saved_from_python_is_read_into_the_configs_model(tmp_path, monkeypatch) -> None:
    # trainer.save_checkpoint from a notebook records no `_class_path`: Lightning's own parse then reads the
    # hyper-parameters as a bare LightningModule's and fails; ours takes the config's system
    from cli import PretrainCLI, main
    from lightning_modules.speech_text_module import SpeechTextModule

    monkeypatch.setattr(PretrainCLI, "instantiate_classes", lambda self: None)
    monkeypatch.setattr(PretrainCLI, "_run_subcommand", lambda self, subcommand: None)
    model = SpeechTextModule(vocab_size=97, embed_dim=48, speech={"size": "tiny"}, text={"size": "tiny"})
    hparams = {k: v for k, v in model.hparams.items() if not k.startswith("_")}
    assert "_class_path" not in model.hparams  # as saved from Python
    path = tmp_path / "notebook.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": hparams}, path)
    cli = main(
        cli_args("test", "--ckpt_path", str(path), "--trainer.logger=false", config="speech/quickstart.yaml")
    )
    model_cfg = cli.config.test.model
    assert model_cfg.class_path == "lightning_modules.speech_text_module.SpeechTextModule"
    assert (model_cfg.init_args.vocab_size, model_cfg.init_args.embed_dim) == (
        97,
        48,
    )  # the checkpoint's, not the config's
