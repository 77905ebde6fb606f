"""What the command line says when something is wrong: one `error:` line with exit status 2 for configuration
and input (a bad --ckpt_path named with its problem, a data error met while the vocabulary is linked), and the
whole traceback for an error raised once the first batch has started."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path

import lightning as L
import pytest
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cli
from cli import CheckpointError, check_system, main, read_checkpoint
from lightning_modules.contrastive_module import ContrastiveModule
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.mlm_module import MLMPretrainingModule
from lightning_modules.training.checkpoints import SYSTEM_CLASS_KEY
from tests.builders.runs import CLIP, fails
from tests.helpers import cli_args

MLM = "mlm/quickstart.yaml"


# A system and data small enough to run a CLI fit in a second ----------------------------------------------
class TinyData(L.LightningDataModule):
    """Eight random rows; each error argument raises FileNotFoundError with that message at one moment."""

    def __init__(self, vocab_error: str | None = None, setup_error: str | None = None) -> None:
        super().__init__()
        self.vocab_error, self.setup_error = vocab_error, setup_error

    @property
    def vocab_size(self) -> int:
        if self.vocab_error:
            raise FileNotFoundError(self.vocab_error)
        return 5

    def setup(self, stage: str) -> None:
        if self.setup_error:
            raise FileNotFoundError(self.setup_error)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=4)


class TinySystem(L.LightningModule):
    def __init__(self, vocab_size: int = 2, fail_at_step: int = -1) -> None:
        super().__init__()
        self.fail_at_step = fail_at_step
        self.layer = nn.Linear(4, vocab_size)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_step == self.fail_at_step:
            raise ValueError(f"a value went wrong at step {self.global_step}")
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _tiny_args(root: Path, *extra: str) -> list[str]:
    return cli_args(
        "fit",
        f"--model={__name__}.TinySystem",
        f"--data={__name__}.TinyData",
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        *extra,
        root=root,
    )


# Before and after the first batch --------------------------------------------------------------------------
def test_tiny_fit_runs_smoke(tmp_path: Path) -> None:
    cli_ = main(_tiny_args(tmp_path), friendly_errors=True)
    assert cli_.trainer.global_step == 3


def test_error_in_the_data_setup_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # raised inside trainer.fit, but before the first batch: an input error
    error = fails(
        _tiny_args(tmp_path, "--data.setup_error=split file /data/train.tsv does not exist"), capsys
    )
    assert error == "error: split file /data/train.tsv does not exist"


def test_error_during_training_keeps_its_traceback(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(ValueError, match="a value went wrong at step 1") as raised:
        main(_tiny_args(tmp_path, "--model.fail_at_step=1"), friendly_errors=True)
    # the exception itself leaves main, so Python prints its traceback down to the training step
    assert any(entry.name == "training_step" for entry in raised.traceback)
    assert "error:" not in capsys.readouterr().err


def test_error_while_linking_the_vocabulary_shows_the_original_message(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    error = fails(_tiny_args(tmp_path, "--data.vocab_error=corpus /data/books.txt does not exist"), capsys)
    assert error == "error: corpus /data/books.txt does not exist"


def test_coco_root_without_annotations_names_the_file_not_the_link(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # the COCO DataModule finds the missing file while training its tokenizer, for the model's vocab_size
    root = tmp_path / "coco"
    root.mkdir()
    args = cli_args(
        "fit",
        f"--data.init_args.root={root}",
        "--data.init_args.generate_if_missing=false",
        f"--data.init_args.tokenizer.cache_dir={tmp_path / 'cache'}",
        config=CLIP,
        root=tmp_path / "run",
    )
    error = fails(args, capsys)
    assert error.startswith(f"error: COCO captions file {root}/annotations/captions_train2017.json not found")
    assert "compute_fn" not in error and "dataloader" not in error


# Checkpoints that cannot be used ---------------------------------------------------------------------------
def _lightning_like(path: Path) -> Path:
    """A zip-format torch file shaped like a Lightning checkpoint, about 70 kB."""
    torch.save({"state_dict": {"w": torch.randn(128, 128)}, "hyper_parameters": {}}, path)
    return path


def _truncated(tmp_path: Path) -> Path:
    whole = _lightning_like(tmp_path / "whole.ckpt").read_bytes()
    path = tmp_path / "last.ckpt"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _text(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 1234\n")
    return path


def _jpeg(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    Image.new("RGB", (8, 8), (200, 30, 30)).save(path, format="JPEG")
    return path


def _plain_pickle(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    path.write_bytes(pickle.dumps({"state_dict": {"w": [1.0, 2.0]}, "epoch": 3}))
    return path


@pytest.mark.parametrize(
    "make, problem",
    [
        (_truncated, "truncated ("),
        (_text, "not a checkpoint of this framework (a text file)"),
        (_jpeg, "not a checkpoint of this framework (a JPEG image)"),
        (_plain_pickle, "not a checkpoint of this framework (a plain pickle)"),
    ],
    ids=["truncated", "text", "jpeg", "plain-pickle"],
)
def test_bad_checkpoint_is_named_in_one_line(make, problem: str, tmp_path: Path, capsys) -> None:
    ckpt = make(tmp_path)
    error = fails(cli_args("test", f"--ckpt_path={ckpt}", config=MLM), capsys)
    assert error.startswith(f"error: {ckpt}: {problem}"), error


def test_truncated_checkpoint_says_how_much_is_left(tmp_path: Path) -> None:
    ckpt = _truncated(tmp_path)
    with pytest.raises(CheckpointError, match=rf"truncated \({ckpt.stat().st_size} bytes"):
        read_checkpoint(ckpt)


def test_missing_checkpoint_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "runs" / "last.ckpt"
    error = fails(cli_args("validate", f"--ckpt_path={missing}", config=MLM), capsys)
    assert error == f"error: checkpoint {missing} does not exist"


class Opaque:
    """A class that weights_only refuses to unpickle."""


@pytest.mark.parametrize(
    "write, problem",
    [
        (lambda p: p.write_bytes(b""), "(an empty file)"),
        (lambda p: Image.new("L", (4, 4)).save(p, format="PNG"), "(a PNG image)"),
        (lambda p: torch.save({"w": torch.zeros(2)}, p), "(a torch file with bare weights, without the"),
        (lambda p: torch.save({"epoch": 3}, p), "(a torch file with no state_dict)"),
        (lambda p: zipfile.ZipFile(p, "w").close(), "(a zip archive that torch.save did not write)"),
        (
            lambda p: torch.save({"state_dict": {}, "extra": Opaque()}, p),
            f"(it holds Python objects, such as {__name__}.Opaque, which are not loaded",
        ),
        (
            lambda p: torch.save({"w": torch.zeros(2)}, p, _use_new_zipfile_serialization=False),
            "(a torch file in the format before torch 1.6)",
        ),
    ],
    ids=["empty", "png", "bare-state-dict", "no-state-dict", "other-zip", "python-objects", "legacy-torch"],
)
def test_what_the_file_is_instead(write, problem: str, tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    write(path)
    with pytest.raises(CheckpointError) as raised:
        read_checkpoint(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: not a checkpoint of this framework {problem}"), message
    assert "weights_only" not in message


def test_checkpoint_contents_are_read(tmp_path: Path) -> None:
    ckpt = read_checkpoint(_lightning_like(tmp_path / "ok.ckpt"))
    assert ckpt["state_dict"]["w"].shape == (128, 128) and ckpt["hyper_parameters"] == {}


def _zero_shot(path: Path) -> None:
    from lightning_modules.zero_shot import load_image_text

    load_image_text(path)


def _fine_tuning_encoder(path: Path) -> None:
    from lightning_modules.components.bert_finetune import pretrained_bert

    pretrained_bert(init_ckpt=str(path), init_from_hf=None)


def _text_tower_mlm_start(path: Path) -> None:
    from lightning_modules.components.text_tower import TextTowerConfig, build_text_tower
    from lightning_modules.components.towers import TowerInit

    shape = dict(size="tiny", layers=1, hidden=32, heads=1, max_len=8)
    build_text_tower(TextTowerConfig(**shape, init=TowerInit("ours", str(path))), 10, embed_dim=4)


def _tokenizer_of_checkpoint(path: Path) -> None:
    from datamodules.tokenizer import TextTokenizer

    TextTokenizer.from_checkpoint(path)


@pytest.mark.parametrize(
    "make, problem",
    [(_truncated, "truncated ("), (_text, "not a checkpoint of this framework (a text file)")],
    ids=["truncated", "text"],
)
@pytest.mark.parametrize(
    "load",
    [_zero_shot, _fine_tuning_encoder, _text_tower_mlm_start, _tokenizer_of_checkpoint],
    ids=["zero-shot", "fine-tuning", "text-tower", "tokenizer"],
)
def test_every_loader_reads_through_the_diagnosing_reader(load, make, problem: str, tmp_path: Path) -> None:
    """Zero-shot, fine-tuning's encoder, the text tower's MLM start and the tokenizer of a checkpoint refuse a bad
    file in one line naming it, as the command line does (no traceback of torch.load)."""
    path = make(tmp_path)
    with pytest.raises(CheckpointError) as raised:
        load(path)
    message = str(raised.value)
    assert message.startswith(f"{path}: {problem}") and "\n" not in message, message
    missing = tmp_path / "gone.ckpt"
    with pytest.raises(FileNotFoundError, match=f"^checkpoint {missing} does not exist$"):
        load(missing)


# A checkpoint of another system ------------------------------------------------------------------------------
@pytest.fixture
def clip_ckpt(tiny_clip: dict) -> Path:
    """The shared tiny CLIP's checkpoint (written by trainer.save_checkpoint, from Python)."""
    return tiny_clip["ckpt"]


def test_checkpoint_names_its_system(clip_ckpt: Path) -> None:
    ckpt = read_checkpoint(clip_ckpt)
    assert ckpt[SYSTEM_CLASS_KEY] == "lightning_modules.image_text_module.ImageTextModule"
    check_system(clip_ckpt, ckpt, ImageTextModule, "the config")  # its own system
    check_system(clip_ckpt, ckpt, ContrastiveModule, "the config")  # a parent of it


def test_image_text_checkpoint_given_to_the_mlm_config(
    clip_ckpt: Path, capsys: pytest.CaptureFixture
) -> None:
    error = fails(cli_args("test", f"--ckpt_path={clip_ckpt}", config=MLM), capsys)
    assert error == f"error: {clip_ckpt}: holds ImageTextModule, the config asks for MLMPretrainingModule"


def test_export_hf_refuses_another_system(clip_ckpt: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "hf"
    error = fails(["export-hf", f"--ckpt_path={clip_ckpt}", f"--out={out}"], capsys)
    assert error == f"error: {clip_ckpt}: holds ImageTextModule, export-hf asks for MLMPretrainingModule"
    assert not out.exists()


def test_export_hf_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    error = fails(["export-hf", f"--ckpt_path={tmp_path / 'nope.ckpt'}", f"--out={tmp_path}"], capsys)
    assert error == f"error: checkpoint {tmp_path / 'nope.ckpt'} does not exist"


def test_older_checkpoint_without_the_record_is_told_by_its_hyperparameters(
    clip_ckpt: Path, tmp_path: Path
) -> None:
    ckpt = torch.load(clip_ckpt, map_location="cpu", weights_only=True)
    del ckpt[SYSTEM_CLASS_KEY]
    older = tmp_path / "older.ckpt"
    torch.save(ckpt, older)
    ckpt = read_checkpoint(older)
    with pytest.raises(
        CheckpointError, match=r"holds ImageTextModule, the config asks for MLMPretrainingModule"
    ):
        check_system(older, ckpt, MLMPretrainingModule, "the config")
    check_system(older, ckpt, ImageTextModule, "the config")
    # hyper-parameters that no system takes are listed
    ckpt["hyper_parameters"] = {"n_experts": 8, "router": "top2"}
    with pytest.raises(
        CheckpointError, match=r"holds a system with hyper-parameters .*\(n_experts, router\)"
    ):
        check_system(older, ckpt, MLMPretrainingModule, "the config")


# The console script ----------------------------------------------------------------------------------------
def test_console_script_exits_0_after_a_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # console scripts call sys.exit(run()): main's PretrainCLI there would be printed and exit with status 1
    monkeypatch.setattr(cli, "main", lambda: object())
    assert cli.run() == 0


def test_help_hint_uses_the_command_typed(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    monkeypatch.setattr("sys.argv", ["/venv/bin/multimodal-pretrain", "fit", "--trainer.not_a_key", "1"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    assert "(multimodal-pretrain fit --help lists the options)" in capsys.readouterr().err
