"""Arguments and calls of CLI runs shared by several test modules: the MLM quickstart on a prepared corpus,
the DDP/FSDP2 runs, zero-step fits saved for evaluation, and a call that must fail with one error line."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli import main
from tests.helpers import cli_args

STEPS = 6


# two gloo processes under FSDP2, float32 so that the runs compare exactly
FSDP2 = (
    "--trainer.strategy=lightning_modules.training.strategies.FSDP2Strategy",
    "--trainer.strategy.param_dtype=float32",
    "--trainer.devices=2",
)


def fit_args(cache: str, root: Path, batch_size: int, *extra: str) -> list[str]:
    """`cli.py fit` of the MLM quickstart, 2 layers without dropout, STEPS steps each logged, no validation."""
    return cli_args(
        "fit",
        f"--data.init_args.tokenizer.cache_dir={cache}",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.num_proc=1",
        f"--data.init_args.loader.batch_size={batch_size}",
        "--model.init_args.encoder.dropout=0",
        "--model.init_args.encoder.attention_dropout=0",
        "--model.init_args.encoder.layers=2",
        "--trainer.limit_val_batches=0",
        "--trainer.log_every_n_steps=1",
        f"--trainer.max_steps={STEPS}",
        *extra,
        config="mlm/quickstart.yaml",
        root=root,
    )


NO_STEPS = ["--trainer.max_steps=0", "--trainer.limit_val_batches=0"]


def fit_checkpoint(config: str, tmp_path: Path, *args: str) -> Path:
    """Run `fit` for zero steps through the CLI and save a checkpoint: it carries the DataModule's tokenizer."""
    cli = main(cli_args("fit", *NO_STEPS, *args, config=config, root=tmp_path / "train_run"))
    assert cli.trainer.global_step == 0
    ckpt = tmp_path / "model.ckpt"
    cli.trainer.save_checkpoint(ckpt)
    return ckpt


def evaluate(subcommand: str, config: str, ckpt: Path, tmp_path: Path, *args: str):
    return main(cli_args(subcommand, *args, f"--ckpt_path={ckpt}", config=config, root=tmp_path / "eval_run"))


CLIP = "clip/quickstart.yaml"


def fails(args: list[str], capsys: pytest.CaptureFixture) -> str:
    """The one `error:` line of a CLI call that must end with exit status 2."""
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    # torch's advice for files weights_only refuses must never reach the user
    assert "weights_only" not in err
    hint = "  [MMPRETRAIN_DEBUG=1 shows the traceback]"  # how to see the traceback, said on the error line
    assert errors[0].endswith(hint), errors[0]
    return errors[0].removesuffix(hint)


def quickstart(command: str, cache_dir: str, root: Path, *extra: str) -> list[str]:
    """`cli.py <command>` of configs/mlm/quickstart.yaml on the module's prepared corpus, writing under `root`."""
    return cli_args(
        command,
        f"--data.init_args.tokenizer.cache_dir={cache_dir}",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.num_proc=1",
        *extra,
        config="mlm/quickstart.yaml",
        root=root,
    )
