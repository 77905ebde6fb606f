"""Command line: `python cli.py fit|validate|test|predict --config configs/<task>/<experiment>.yaml`.

A LightningCLI with the omegaconf parser (so `${...}` interpolation works in configs). Tests call
`main([...])` in-process. One extra command, `python cli.py export-hf --ckpt_path C --out DIR`, writes an
MLM checkpoint as a Hugging Face BERT folder.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from lightning.pytorch.cli import ArgsType, LightningCLI

# the task packages must be importable for class_path resolution
import datamodules  # noqa: F401
import lightning_modules  # noqa: F401
from lightning_modules.callbacks import MetricCurves


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


def main(args: ArgsType = None) -> PretrainCLI | None:
    argv = list(sys.argv[1:] if args is None else args)
    if argv and argv[0] == "export-hf":
        export_hf(argv[1:])
        return None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_float32_matmul_precision("high")
    return PretrainCLI(
        parser_kwargs={"parser_mode": "omegaconf"},
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        # appended to the callbacks of any config: PNG curves beside metrics.csv when there is no W&B logger
        trainer_defaults={"callbacks": [MetricCurves()]},
        args=args,  # None: LightningCLI reads sys.argv itself
    )


if __name__ == "__main__":
    main()
