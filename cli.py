"""Command line: `python cli.py fit|validate|test|predict --config configs/<task>/<experiment>.yaml`.

A LightningCLI with the omegaconf+ parser: `${trainer.default_root_dir}` style interpolation is resolved on
the merged config, after every `--config` file and command-line override, so a snippet such as
`configs/logger/wandb.yaml` may refer to keys of the experiment config. Tests call `main([...])` in-process.
One extra command, `python cli.py export-hf --ckpt_path C --out DIR`, writes an MLM checkpoint as a Hugging
Face BERT folder.

From the command line, configuration errors (a missing dataset path, an unknown key, a precision the
hardware cannot run) end with one line on stderr and exit status 2; `MMPRETRAIN_DEBUG=1` shows the traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
from pathlib import Path

import jsonargparse
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# the task packages must be importable for class_path resolution
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from lightning_modules.callbacks import MetricCurves
from lightning_modules.resilience import AtomicCheckpoints, PreemptionCheckpoint

# `${trainer.default_root_dir}` in any config file is rewritten relative to where it stands, so it resolves
# under the subcommand (`fit.trainer...`) on the merged config
jsonargparse.set_parsing_settings(
    omegaconf_absolute_to_relative_paths=True,
    docstring_parse_attribute_docstrings=True,  # config dataclasses document their fields as litgpt does
)


class SaveConfig(SaveConfigCallback):
    """Writes `config.yaml` to the log dir (Lightning's behaviour) and also gives the full resolved config to each
    W&B logger as its run config, so a W&B run can be filtered and compared by any setting."""

    def save_config(self, trainer, pl_module, stage: str) -> None:
        # Lightning calls this on global rank 0 only: no collective operation may happen here
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger)]
        if not loggers:
            return
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False, skip_link_targets=False))
        model_args = (config.get("model") or {}).get("init_args")
        if isinstance(model_args, dict):
            # linked arguments (vocab_size, from the tokenizer) are filled in at instantiation: the model knows them
            for key in model_args.keys() & pl_module.hparams.keys():
                model_args[key] = pl_module.hparams[key]
        for logger in loggers:
            logger.experiment.config.update(config, allow_val_change=True)


class PretrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser) -> None:
        # the text tower's vocabulary comes from the tokenizer the DataModule trained or loaded
        parser.link_arguments(
            "data", "model.init_args.vocab_size", compute_fn=lambda dm: dm.vocab_size, apply_on="instantiate"
        )

    def before_instantiate_classes(self) -> None:
        cfg = self.config[self.subcommand] if self.subcommand else self.config
        trainer = cfg.trainer
        if trainer.logger in (None, True):
            # CSV by default, under default_root_dir, so a run needs no account or service
            trainer.logger = {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": trainer.default_root_dir or ".", "name": "csv"},
            }
        check_precision(str(trainer.precision), str(trainer.accelerator))

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks) and _interactive_terminal():
            # Rich in a terminal; in a log file (SLURM, CI) Lightning's tqdm bar, which prints as it goes
            kwargs.setdefault("callbacks", [*callbacks, RichProgressBar()])
        return super().instantiate_trainer(**kwargs)


def _interactive_terminal() -> bool:
    from rich.console import Console

    return Console().is_terminal


def _x86_without_bf16() -> bool:
    if platform.machine() not in ("x86_64", "AMD64"):
        return False  # only x86 is checked
    cpu = torch.cpu
    avx512 = getattr(cpu, "_is_avx512_bf16_supported", lambda: True)()
    return not (avx512 or getattr(cpu, "_is_amx_tile_supported", lambda: False)())


def check_precision(precision: str, accelerator: str) -> None:
    """Say early, in one line, when the hardware cannot run the requested precision (well)."""
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise MisconfigurationException(
            f"trainer.accelerator is {accelerator} but no CUDA GPU is visible: on this machine run with "
            "--trainer.accelerator cpu --trainer.precision 32-true"
        )
    if cuda:
        if precision.startswith("bf16") and not torch.cuda.is_bf16_supported(including_emulation=False):
            rank_zero_warn(
                f"{torch.cuda.get_device_name()} has no native bfloat16: precision {precision} runs emulated and "
                "slowly; use --trainer.precision 16-mixed"
            )
    # on CPU, Lightning itself runs 16-mixed as bf16-mixed (and says so)
    elif precision.startswith(("bf16", "16")) and _x86_without_bf16():
        rank_zero_warn(
            f"this CPU has no native bfloat16 (AVX512-BF16 or AMX): precision {precision} runs emulated and "
            "slowly; use --trainer.precision 32-true"
        )


def export_hf(argv: list[str]) -> Path:
    from datamodules.tokenizer import TextTokenizer
    from lightning_modules.mlm_module import MLMPretrainingModule

    p = argparse.ArgumentParser(
        prog="cli.py export-hf", description="Export an MLM checkpoint to a Hugging Face BERT folder"
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if not Path(a.ckpt_path).is_file():
        raise SystemExit(f"error: checkpoint {a.ckpt_path} does not exist")
    ckpt = torch.load(a.ckpt_path, map_location="cpu", weights_only=True)
    # the architecture comes from the saved hyperparameters; the weights follow
    hparams = {
        k: v for k, v in ckpt["hyper_parameters"].items() if not k.startswith("_") and k != "init_from_hf"
    }
    module = MLMPretrainingModule(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    tokenizer = None
    if "tokenizer_json" in ckpt:
        from tokenizers import Tokenizer

        tokenizer = TextTokenizer(Tokenizer.from_str(ckpt["tokenizer_json"]))
    out = module.export_hf(a.out, tokenizer)
    print(f"wrote {out}")
    return out


def one_line(err: BaseException) -> str:
    """The part of an error message a person acts on, on one line.

    jsonargparse reports a failed class as a union of every type it tried, with the given value dumped; keep
    the reasons and drop the rest.
    """
    kept = []
    for line in str(err).splitlines():
        line = line.strip().removeprefix("- ").strip()
        if not line or line.startswith(
            (
                "Does not validate against any",
                "Subtypes:",
                "Errors:",
                "Given value",
                "Expected a <class 'NoneType'>",
            )
        ):
            continue
        kept.append(line.rstrip(":"))
    return ": ".join(kept) or type(err).__name__


# errors of configuration, not of code: one line is what helps
ACTIONABLE = (
    jsonargparse.ArgumentError,
    FileNotFoundError,
    NotADirectoryError,
    MisconfigurationException,
    ValueError,
)


def _is_wandb_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("wandb.errors")


def main(args: ArgsType = None, friendly_errors: bool | None = None) -> PretrainCLI | None:
    """Run the CLI. `friendly_errors` (default: only when reading sys.argv) turns configuration errors into one
    line on stderr and `SystemExit(2)`; MMPRETRAIN_DEBUG=1 turns that off."""
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export-hf":
        export_hf(argv[1:])
        return None
    friendly = (args is None if friendly_errors is None else friendly_errors) and not os.environ.get(
        "MMPRETRAIN_DEBUG"
    )
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    try:
        cli = PretrainCLI(
            # exit_on_error=False: the parser raises instead of printing its usage, and the message is shortened below
            parser_kwargs={"parser_mode": "omegaconf+", "exit_on_error": not friendly},
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            # appended to the callbacks of any config: PNG curves beside metrics.csv when there is no W&B logger
            # appended too: a last checkpoint on SIGTERM, and checkpoint files written atomically
            trainer_defaults={"callbacks": [MetricCurves(), PreemptionCheckpoint(), AtomicCheckpoints()]},
            args=args,  # None: LightningCLI reads sys.argv itself
        )
    except Exception as err:
        if not friendly or not (isinstance(err, ACTIONABLE) or _is_wandb_error(err)):
            raise
        message = one_line(err)
        if isinstance(err, jsonargparse.ArgumentError):
            message += f" (python cli.py {argv[0] if argv else 'fit'} --help lists the options)"
        elif _is_wandb_error(err):
            message = (
                f"W&B: {message} Or run without an account: WANDB_MODE=offline (upload later with "
                "`wandb sync`) or WANDB_MODE=disabled"
            )
        print(f"error: {message}  [MMPRETRAIN_DEBUG=1 shows the traceback]", file=sys.stderr)
        raise SystemExit(2) from None
    if rank_zero_only.rank == 0 and getattr(cli, "trainer", None) is not None:
        # one command, one W&B run: close it now, so that a next main() in this process starts its own
        for logger in cli.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
    return cli


if __name__ == "__main__":
    main()
