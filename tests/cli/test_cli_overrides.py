"""Command-line overrides of a section's field: `--data.tokenizer.path=null` sets None, keeps the section's other
fields, and wins over an earlier value, in the `=` and the spaced form."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import yaml
from jsonargparse import ArgumentParser
from lightning import LightningDataModule

from cli import main, section_nulls_as_dicts
from tests.helpers import cli_args


def _printed_config(capsys: pytest.CaptureFixture, *extra: str) -> dict:
    with pytest.raises(SystemExit) as done:
        main(cli_args("fit", *extra, "--print_config", config="clip/coco_lit.yaml"))
    assert done.value.code in (0, None)
    return yaml.safe_load(capsys.readouterr().out)


def test_a_section_field_set_to_null_is_none(capsys: pytest.CaptureFixture) -> None:
    config = _printed_config(
        capsys,
        "--data.tokenizer.vocab_size=77",
        "--data.tokenizer.path=/somewhere/vocab.txt",
        "--data.tokenizer.path=null",
        "--model.image.init.path",
        "null",
        "--data.init_args.tokenizer.cache_dir=~",
    )
    tokenizer = config["data"]["init_args"]["tokenizer"]
    assert tokenizer["path"] is None and tokenizer["cache_dir"] is None
    assert tokenizer["vocab_size"] == 77  # the section's other fields stay as set before
    image = config["model"]["init_args"]["image"]
    assert image["init"] == {"source": "open_clip", "name": "ViT-B-32", "path": None}
    assert image["lock"] is True
    # a value after the null wins over it, as the command line reads left to right
    again = _printed_config(capsys, "--data.tokenizer.path=null", "--data.tokenizer.path=/v/vocab.txt")
    assert again["data"]["init_args"]["tokenizer"]["path"] == "/v/vocab.txt"


def test_only_nulls_of_section_fields_are_rewritten() -> None:
    kept = [
        "--data.tokenizer.path=/v.txt",  # not null
        "--model.ckpt_path=null",  # an argument of the class itself: jsonargparse reads that null as None
        "--trainer.logger.init_args.name=null",  # not a model or DataModule
        "--data.tokenizer.path",
        "nullable",
    ]
    assert section_nulls_as_dicts(kept) == kept
    assert section_nulls_as_dicts(["fit", "--model.init_args.text.init.path", "~", "--x"]) == [
        "fit",
        '--model={"init_args": {"text": {"init": {"path": null}}}}',
        "--x",
    ]


@dataclass
class _Section:
    path: str | None = "given"


_SECTION = _Section()


class _Data(LightningDataModule):
    def __init__(self, section: _Section = _SECTION) -> None:
        super().__init__()


def test_jsonargparse_still_reads_a_dotted_nested_null_as_the_text_none() -> None:
    """The reason for `section_nulls_as_dicts`: when this fails, jsonargparse reads the dotted form right and the
    rewrite in cli.py can go."""
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(LightningDataModule, "data")
    base = [f"--data={__name__}._Data"]
    assert parser.parse_args([*base, "--data.section.path=null"]).data.init_args.section.path == "None"
    rewritten = section_nulls_as_dicts([*base, "--data.section.path=null"])
    assert parser.parse_args(rewritten).data.init_args.section.path is None
