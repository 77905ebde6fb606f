"""Command line: `multimodal-pretrain fit|validate|test|predict --config configs/<task>/<experiment>.yaml`
(the console script of `pip install .`), or `python cli.py ...` from a clone.

A LightningCLI with the omegaconf+ parser, so `${...}` interpolation resolves on the merged config; tests call
`main([...])` in-process. Extra commands (`COMMANDS`): `export-hf`, `export`, `consolidate`, `probe` and
`curate`. Configuration and input errors found before the first batch end with one line on stderr and exit
status 2 (`MMPRETRAIN_DEBUG=1` shows the traceback); see `docs/usage.md`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Any

import jsonargparse
import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException

# the task packages must be importable for class_path resolution
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from datamodules.image.shards.remote import ShardUnreadable
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components import clip_import, hf_export
from lightning_modules.curation import curate
from lightning_modules.image_text_module import image_text_from_checkpoint
from lightning_modules.linear_probe import probe_features
from lightning_modules.mlm_module import MLMPretrainingModule
from lightning_modules.speech_text_module import speech_text_from_checkpoint
from lightning_modules.training.callbacks import LossRichProgressBar, LossTQDMProgressBar, MetricCurves
from lightning_modules.training.checkpoint_io import AtomicCheckpointIO, AtomicCheckpoints
from lightning_modules.training.checkpoint_writers import BEST, LAST, CheckpointWriter

# the checkpoint reader lives in the library (every loader uses it); these names stay importable from here
from lightning_modules.training.checkpoints import (  # noqa: F401
    CheckpointError,
    check_system,
    read_checkpoint,
    read_sharded_model,
    resolve_class,
)
from lightning_modules.training.ema import add_ema_switch, move_sharded_ema, use_ema_weights
from lightning_modules.training.lightning_private import parse_ckpt_path_into_sections
from lightning_modules.training.preemption import PreemptionCheckpoint
from lightning_modules.training.throughput import Throughput

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


# the two checkpoint writers of every run, configured by the top-level sections `checkpoint` and `last_checkpoint`
WRITERS = {"checkpoint": BEST, "last_checkpoint": LAST}


class PretrainCLI(LightningCLI):
    def parse_arguments(self, parser, args: ArgsType) -> None:
        # rewritten where they came from: Lightning warns when given both args and sys.argv
        if args is None:
            sys.argv[1:] = section_nulls_as_dicts(sys.argv[1:])
        elif isinstance(args, (list, tuple)):
            args = section_nulls_as_dicts(list(args))
        super().parse_arguments(parser, args)
        # Lightning reads the hyper-parameters of --ckpt_path right after parsing: a file that is no checkpoint
        # of this framework, or one of another system, is named here, before it is unpickled
        if self.config.get("subcommand"):
            cfg = self.config[self.config.subcommand]
            model = cfg.get("model")
            check_checkpoint(cfg.get("ckpt_path"), getattr(model, "class_path", None), "the config")

    def _parse_ckpt_path(self) -> None:
        """Lightning reads the hyper-parameters of `--ckpt_path` into the config; those of checkpoints with flat
        arguments (`lr`, `hidden_size`, ...) are read into the model's sections first (`upgrade_hparams`)."""
        parse_ckpt_path_into_sections(self)

    def add_arguments_to_parser(self, parser) -> None:
        # trainer.callbacks, set or appended to (`callbacks+`), come besides the writers
        for key, default in WRITERS.items():
            parser.add_class_arguments(CheckpointWriter, key, default=default, sub_configs=True)
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
        if self.subcommand in ("validate", "test", "predict"):
            self._tokenizer_from_checkpoint(cfg)

    @staticmethod
    def _tokenizer_from_checkpoint(cfg) -> None:
        """Evaluating a checkpoint, the DataModule loads the tokenizer the checkpoint carries: the one the model was
        trained with, and the only way to know the vocabulary without the training data, which the machine may not
        hold (a trained vocabulary would otherwise be rebuilt from the training captions, transcripts or corpora)."""
        ckpt = Path(str(cfg.get("ckpt_path") or ""))
        init_args = (cfg.get("data") or {}).get("init_args") or {}
        section = init_args.get("tokenizer")
        if not ckpt.is_file() or section is None:
            return  # no checkpoint file ("best", "last" or none), or a DataModule without a tokenizer section
        try:
            saved = TextTokenizer.from_checkpoint(ckpt)
        except Exception as err:  # whether the checkpoint loads at all is for Lightning to report
            rank_zero_warn(f"no tokenizer read from {ckpt} ({err}): the DataModule loads or trains its own")
            return
        given = section.get("path")
        if given and str(given) != str(ckpt):
            logging.getLogger(__name__).info(
                "%s: using the checkpoint's tokenizer (%d tokens) instead of data.tokenizer.path %s",
                ckpt,
                saved.vocab_size,
                given,
            )
        section["path"] = str(ckpt)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except ValueError as err:
            # jsonargparse wraps an error of a link's compute_fn (the DataModule reading its data to know the
            # vocabulary) in one that dumps the whole DataModule; the original names the file and the problem
            if str(err).startswith("Call to compute_fn") and isinstance(err.__cause__, Exception):
                raise err.__cause__ from None
            raise

    def instantiate_trainer(self, **kwargs):
        trainer = self._get(self.config_init, "trainer", default={})
        callbacks = trainer.get("callbacks") or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if trainer.get("enable_checkpointing") is not False:  # false: no checkpoint at all, as in Lightning
            callbacks = [*callbacks, *(self._get(self.config_init, key).build() for key in WRITERS)]
        wants_bar = trainer.get("enable_progress_bar") is not False
        if wants_bar and not any(isinstance(c, ProgressBar) for c in callbacks):
            # Rich in a terminal; in a log file (SLURM, CI) tqdm, which prints as it goes; both show the loss of
            # the last logging step (a progress-bar metric would be read from the device after every batch)
            callbacks.append(LossRichProgressBar() if _interactive_terminal() else LossTQDMProgressBar())
        kwargs.setdefault("callbacks", callbacks)
        trainer = super().instantiate_trainer(**kwargs)
        # a Throughput of the config (its own peak_tflops) replaces the default one
        default = [c for c in self.trainer_defaults.get("callbacks", []) if isinstance(c, Throughput)]
        if sum(isinstance(c, Throughput) for c in trainer.callbacks) > 1:
            trainer.callbacks = [c for c in trainer.callbacks if not any(c is d for d in default)]
        return trainer


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


def export_hf(argv: list[str], prog: str = "python cli.py") -> Path:
    p = argparse.ArgumentParser(
        prog=f"{prog} export-hf", description="Export an MLM checkpoint to a Hugging Face BERT folder"
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out", required=True)
    add_ema_switch(p)
    a = p.parse_args(argv)
    ckpt = read_checkpoint(a.ckpt_path, needs=("state_dict", "hyper_parameters"))
    check_system(a.ckpt_path, ckpt, MLMPretrainingModule, "export-hf")
    # the architecture comes from the saved hyperparameters; the weights follow
    hparams = MLMPretrainingModule.upgrade_hparams(ckpt["hyper_parameters"])
    hparams = {k: v for k, v in hparams.items() if not k.startswith("_") and k != "init_from_hf"}
    module = MLMPretrainingModule(**hparams)
    module.load_state_dict(ckpt["state_dict"])
    if a.ema:
        use_ema_weights(module, ckpt, a.ckpt_path)
    out = module.export_hf(a.out, TextTokenizer.carried_by(ckpt, str(a.ckpt_path)))
    print(f"wrote {out}")
    return out


def export(argv: list[str], prog: str = "python cli.py") -> Path:
    """Write an image-text or speech-text checkpoint as folders the reference libraries load: a whole-CLIP start
    (model.init_clip) back to open_clip or Hugging Face CLIP, any other image-text model as a transformers
    `VisionTextDualEncoderModel` or encoder-pair folder, a speech-text model as an encoder-pair folder
    (components/hf_export.py); `--what image`: the image tower's backbone as a torchvision state dict."""
    p = argparse.ArgumentParser(
        prog=f"{prog} export",
        description="Export an image-text or speech-text checkpoint: a whole CLIP back to open_clip or Hugging "
        "Face CLIP, any other model as transformers folders, or the image tower as a torchvision state dict",
    )
    p.add_argument("--ckpt_path", required=True)
    p.add_argument("--out", required=True, help="a new file (open_clip, image) or folder")
    p.add_argument("--what", choices=("auto", "image"), default="auto", help="image: only the image tower")
    p.add_argument(
        "--form",
        choices=("auto", "dual", "pair"),
        default="auto",
        help="an image-text model other than a whole CLIP: dual (one VisionTextDualEncoderModel), pair (two "
        "encoder folders and the projections) or auto (dual where the towers' pooling allows)",
    )
    add_ema_switch(p)
    a = p.parse_args(argv)
    speech = "speech" in (read_checkpoint(a.ckpt_path, needs=("hyper_parameters",))["hyper_parameters"])
    if speech:
        pair, ckpt = speech_text_from_checkpoint(a.ckpt_path, "export")
    else:
        pair, ckpt = image_text_from_checkpoint(a.ckpt_path, "export")
    if a.ema:  # the core's weights are the system's under `pair.`
        use_ema_weights(pair, ckpt, a.ckpt_path, prefix="pair.")
    init = ckpt["hyper_parameters"].get("init_clip") or {}
    tokenizer = TextTokenizer.carried_by(ckpt, str(a.ckpt_path))
    data = ckpt.get("datamodule_hyper_parameters") or {}
    context_length = int(
        data.get("context_length") or ckpt["hyper_parameters"].get("text", {}).get("max_len", 77)
    )
    if speech:
        out = hf_export.export_speech_text(pair, tokenizer, context_length, a.out)
    elif a.what == "image":
        out = clip_import.export_image_backbone(pair.image.backbone, a.out)
    elif init.get("source", "scratch") == "scratch":
        out = hf_export.export_image_text(pair, tokenizer, context_length, a.out, a.form)
    elif init["source"] == "open_clip":
        out = clip_import.export_open_clip(pair.image.backbone, pair.text, pair.log_scale, a.out)
    else:
        out = clip_import.export_hf_clip(pair.image.backbone, pair.text, pair.log_scale, a.out, init["path"])
    print(f"wrote {out}")
    return out


def consolidate(argv: list[str], prog: str = "python cli.py") -> Path:
    """Write a sharded checkpoint folder (FSDP2's, torch.distributed.checkpoint) as one Lightning checkpoint file
    with the model's full state_dict and the run's hyper-parameters, for `test`, `export-hf` and fine-tuning. The
    optimizer state is neither read nor written: resuming a run reads the folder itself."""
    p = argparse.ArgumentParser(
        prog=f"{prog} consolidate",
        description="Write a sharded checkpoint folder (FSDP2) as one checkpoint file",
    )
    p.add_argument("--ckpt_path", required=True, help="the sharded checkpoint folder")
    p.add_argument("--out", required=True, help="the checkpoint file to write (must not exist)")
    a = p.parse_args(argv)
    folder, out = Path(a.ckpt_path), Path(a.out)
    if folder.is_file():
        raise CheckpointError(f"{folder} is a checkpoint file already, not a sharded checkpoint folder")
    if not folder.is_dir():
        raise CheckpointError(f"sharded checkpoint folder {folder} does not exist")
    if not (folder / ".metadata").is_file():
        raise CheckpointError(
            f"{folder}: not a sharded checkpoint folder (it has no .metadata file of torch.distributed.checkpoint)"
        )
    if out.exists():
        raise CheckpointError(
            f"{out} exists: consolidate writes a new file and never replaces one; choose another --out"
        )
    # Lightning's meta.pt: everything of the checkpoint but the tensors of the model and optimizers
    meta = folder / "meta.pt"
    ckpt = read_checkpoint(meta, needs=()) if meta.is_file() else {}
    ckpt["state_dict"] = read_sharded_model(folder)  # the model only: the optimizer state is not read
    move_sharded_ema(ckpt)  # model.ema's averages: to the file's `ema` entry
    AtomicCheckpointIO().save_checkpoint(ckpt, out)  # makes the folder of `out` too
    print(f"wrote {out}")
    return out


# Checkpoints --------------------------------------------------------------------------------------------------
def check_checkpoint(ckpt_path: str | Path | None, model_class_path: str | None, asked_by: str) -> None:
    """Check a `--ckpt_path` before Lightning loads it: an existing checkpoint file of this framework, written by
    the system of `model_class_path`. Lightning's own names (best, last, hpc, registry), remote paths and
    sharded checkpoint folders (FSDP, DeepSpeed) are left to Lightning."""
    if not ckpt_path:
        return
    ckpt_path = str(ckpt_path)
    if ckpt_path in ("best", "last", "hpc", "registry") or ckpt_path.startswith("registry:"):
        return
    if "://" in ckpt_path or Path(ckpt_path).is_dir():
        return
    ckpt = read_checkpoint(ckpt_path)
    expected = resolve_class(model_class_path) if model_class_path else None
    if expected is not None:
        check_system(ckpt_path, ckpt, expected, asked_by)


# Errors -------------------------------------------------------------------------------------------------------
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
    ShardUnreadable,  # raised only before the run: a wrong address, or files that are not tars
)


def _end_progress_bars() -> None:
    """Close the tqdm bars an error left open (reading documents, tokenizing), so that their line ends and
    the error starts a line of its own instead of following the bar's last `\\r`-drawn state."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # tqdm's registry of open bars
        bar.close()


def _is_wandb_error(err: BaseException) -> bool:
    return type(err).__module__.startswith("wandb.errors")


class RunStarted(L.Callback):
    """Marks the first batch of any loop (sanity check included). Errors before it come from the configuration
    and the input: they get one line. Errors after it come from the run, maybe hours in: they keep their
    traceback."""

    started = False

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self.started = True

    on_train_batch_start = on_validation_batch_start = on_test_batch_start = on_predict_batch_start = _start


# the commands besides LightningCLI's, each with its own argparse parser: (argv after the name, prog) -> the output
COMMANDS = {
    "export-hf": export_hf,
    "export": export,
    "consolidate": consolidate,
    "probe": probe_features,
    "curate": curate,
}


YAML_NULLS = ("null", "Null", "NULL", "~")


def section_nulls_as_dicts(argv: list[str]) -> list[str]:
    """`--data.tokenizer.path=null` (a field of a section of the model or the DataModule set to None) as
    `--data={"init_args": {"tokenizer": {"path": null}}}`, merged field by field like the dotted form. jsonargparse
    re-reads such a dotted override of a subclass argument from the text `--key={value}`, which makes None the
    string "None" (and an error for `int | None`); tests/cli/test_cli_overrides.py fails once it no longer does."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        key, eq, value = arg.partition("=")
        spaced = not eq and i + 1 < len(argv) and argv[i + 1] in YAML_NULLS
        parts = key[2:].split(".") if key.startswith("--") else []
        fields = parts[2:] if parts[1:2] == ["init_args"] else parts[1:]
        if (
            parts[:1] in (["model"], ["data"])
            and len(fields) >= 2
            and (value in YAML_NULLS if eq else spaced)
        ):
            nested: Any = None
            for name in reversed(fields):
                nested = {name: nested}
            out.append(f"--{parts[0]}={json.dumps({'init_args': nested})}")
            i += 2 if spaced else 1
            continue
        out.append(arg)
        i += 1
    return out


def _prog(args: ArgsType) -> str:
    """The command as the user typed it, for messages that suggest one: the console script or `python cli.py`."""
    name = Path(sys.argv[0]).name
    return name if args is None and name and not name.endswith(".py") else "python cli.py"


def main(args: ArgsType = None, friendly_errors: bool | None = None) -> PretrainCLI | None:
    """Run the CLI. `friendly_errors` (default: only when reading sys.argv) turns errors of configuration and
    input raised before the first batch into one line on stderr and `SystemExit(2)`; MMPRETRAIN_DEBUG=1 turns
    that off."""
    argv = list(sys.argv[1:] if args is None else args)
    friendly = (args is None if friendly_errors is None else friendly_errors) and not os.environ.get(
        "MMPRETRAIN_DEBUG"
    )
    prog = _prog(args)
    run_started = RunStarted()
    try:
        if argv and argv[0] in COMMANDS:
            COMMANDS[argv[0]](argv[1:], prog)
            return None
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        torch.set_float32_matmul_precision("high")
        cli = PretrainCLI(
            # exit_on_error=False: the parser raises instead of printing its usage, and the message is shortened below
            parser_kwargs={
                "parser_mode": "omegaconf+",
                "exit_on_error": not friendly,
                "description": "Pretraining of text, image-text and speech-text models. One more command: "
                f"`{prog} export-hf` writes an MLM checkpoint as a Hugging Face BERT folder; `{prog} export` an "
                "image-text checkpoint as open_clip / Hugging Face CLIP, or its image tower as a state dict; "
                f"`{prog} consolidate` writes a sharded (FSDP2) checkpoint folder as one file; `{prog} curate` scores "
                "and filters an image-text pool (docs/curation.md).",
            },
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            # appended to the callbacks of any config: PNG curves beside metrics.csv when there is no W&B logger;
            # last.ckpt on SIGTERM or SLURM's requeue signal (and a requeue only on the latter); checkpoint files
            # written atomically in their folder, with dead writers' leftovers removed at start; the mark of the
            # first batch, after which errors keep their traceback; samples/tokens/audio seconds per second and MFU
            trainer_defaults={
                "callbacks": [
                    MetricCurves(),
                    PreemptionCheckpoint(),
                    AtomicCheckpoints(),
                    run_started,
                    Throughput(),
                ]
            },
            args=args,  # None: LightningCLI reads sys.argv itself
        )
    except Exception as err:
        if not friendly or run_started.started or not (isinstance(err, ACTIONABLE) or _is_wandb_error(err)):
            raise
        message = one_line(err)
        if isinstance(err, jsonargparse.ArgumentError):
            message += f" ({prog} {argv[0] if argv else 'fit'} --help lists the options)"
        elif _is_wandb_error(err):
            message = (
                f"W&B: {message} Or run without an account: WANDB_MODE=offline (upload later with "
                "`wandb sync`) or WANDB_MODE=disabled"
            )
        _end_progress_bars()
        print(f"error: {message}  [MMPRETRAIN_DEBUG=1 shows the traceback]", file=sys.stderr)
        raise SystemExit(2) from None
    if rank_zero_only.rank == 0 and getattr(cli, "trainer", None) is not None:
        # one command, one W&B run: close it now, so that a next main() in this process starts its own
        for logger in cli.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.finish()
    return cli


def run() -> int:
    """The `multimodal-pretrain` console script: `main()` on sys.argv. Console scripts hand the return value to
    sys.exit, which would print main's PretrainCLI and exit 1: this returns 0."""
    main()
    return 0


if __name__ == "__main__":
    main()
