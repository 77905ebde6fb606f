"""Watching a run: an offline W&B run (config, metrics, example tables), PNG curves without W&B, the progress
bar, and configuration errors that end in one line."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import RichProgressBar

import cli
from cli import main
from lightning_modules.training.callbacks import join_wordpieces, plot_metrics_csv
from tests.builders.runs import fails
from tests.helpers import REPO, cli_args, cli_env

MLM = "mlm/quickstart.yaml"
WANDB = "logger/wandb.yaml"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One prepared sample corpus for the module's MLM runs."""
    return str(tmp_path_factory.mktemp("mlm_cache"))


def _mlm_args(cache_dir: str, root: Path, *extra: str, config: tuple[str, ...] = ()) -> list[str]:
    """`fit` of the MLM quickstart (then the `config` files) on the module's prepared corpus, under `root`."""
    return cli_args(
        "fit",
        f"--data.init_args.tokenizer.cache_dir={cache_dir}",
        "--data.init_args.loader.num_workers=0",
        "--data.init_args.num_proc=1",
        *extra,
        config=[MLM, *config],
        root=root,
    )


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var in (
        "WANDB_DATA_DIR",
        "WANDB_CACHE_DIR",
        "WANDB_CONFIG_DIR",
    ):  # artifact staging, caches, settings
        monkeypatch.setenv(var, str(tmp_path / "wandb_dir" / var.lower()))
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


# Reading an offline run ------------------------------------------------------------------------------------
def wandb_records(run_dir: Path):
    """The protobuf records of an offline run's `.wandb` file (a LevelDB-style log: 7-byte header, 32 KiB
    blocks, each record chunk with a 7-byte header of crc, length and type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    raw = next(run_dir.glob("*.wandb")).read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", raw[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    block, pos, parts = 32768, 7, b""
    while pos + 7 <= len(raw):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        data, pos = raw[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        parts = data if kind in (1, 2) else parts + data
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def read_offline_run(run_dir: Path) -> tuple[dict, list[dict], object, list]:
    """(run config, history rows, run record, artifact records) of an offline run."""
    config, history, run, artifacts = {}, [], None, []
    for record in wandb_records(run_dir):
        kind = record.WhichOneof("record_type")
        if kind == "config":
            for item in record.config.update:
                config[item.key or ".".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            history.append(
                {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            )
        elif kind == "run":
            run = record.run
        elif kind == "artifact":
            artifacts.append(record.artifact)
    return config, history, run, artifacts


def logged_tables(history: list[dict], artifacts: list, key: str) -> list[tuple[int, dict, dict[str, Path]]]:
    """(step, table JSON, {path in the table: staged file}) of each table logged under `key`.

    A run table is staged as an artifact (the table JSON with its media files) until upload; W&B shows that.
    """
    steps = [row["trainer/global_step"] for row in history if row.get(f"{key}/_type") == "table-file"]
    name = key.replace("/", "")
    staged = []
    for artifact in artifacts:
        if artifact.type == "run_table" and name in artifact.name:
            files = {e.path: Path(e.local_path) for e in artifact.manifest.contents}
            table = next(path for path in files if path.endswith(".table.json"))
            staged.append((json.loads(files[table].read_text()), files))
    assert len(staged) == len(steps)
    return [(step, table, files) for step, (table, files) in zip(steps, staged)]


@pytest.mark.slow  # about 9 s; the offline W&B retrieval-table runs stay in the default run
# W&B ------------------------------------------------------------------------------------------------------
def test_wandb_offline_run_holds_config_metrics_and_fill_mask_table(
    cache_dir: str, offline_wandb: Path
) -> None:
    root = offline_wandb
    args = _mlm_args(
        cache_dir,
        root,
        # the snippet appends WandbExamples to the experiment's callbacks; this sets it (the last in the list)
        "--trainer.callbacks.init_args.every_n_val_epochs=2",
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=1",
        "--trainer.limit_val_batches=2",
        "--trainer.logger.init_args.name=experience-test",
        "--trainer.logger.init_args.tags=[quickstart, test]",
        config=(WANDB,),
    )
    cli_ = main(args)
    assert cli_.trainer.progress_bar_callback is None
    # save_dir is ${trainer.default_root_dir}, resolved after the command-line override
    (run_dir,) = (root / "wandb").glob("offline-run-*")
    config, history, run, artifacts = read_offline_run(run_dir)
    assert run.display_name == "experience-test" and list(run.tags) == ["quickstart", "test"]

    # the resolved config: classes, command-line overrides, interpolations, the vocabulary linked from the data
    assert config["model"]["class_path"] == "lightning_modules.mlm_module.MLMPretrainingModule"
    assert config["model"]["init_args"]["vocab_size"] == cli_.datamodule.vocab_size != 30522
    assert config["trainer"]["max_steps"] == 4
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == str(root)
    assert config["last_checkpoint"]["dirpath"] == f"{root}/checkpoints"
    assert (root / "config.yaml").is_file() and (root / "checkpoints" / "last.ckpt").is_file()

    # the metrics: 4 validations, the last equal to what the trainer holds
    val_acc = [row["val/mlm_acc"] for row in history if "val/mlm_acc" in row]
    assert len(val_acc) == 4 and all(0.0 <= v <= 1.0 for v in val_acc)
    assert val_acc[-1] == pytest.approx(cli_.trainer.callback_metrics["val/mlm_acc"].item(), abs=1e-6)

    tables = logged_tables(history, artifacts, "val/examples/fill_mask")
    assert [step for step, _, _ in tables] == [2, 4]  # every second validation
    _, table, _ = tables[-1]
    assert table["columns"] == ["input", "top-5", "truth", "top1_acc"]
    assert len(table["data"]) == 8
    for text, predictions, truth, acc in table["data"]:
        n = len(re.findall(r"\[\d+\]", truth))  # "[1] tok [2] tok ..."
        assert n >= 1 and [int(m) for m in re.findall(r"\[(\d+)(?::[^\]]*)?\]", text)] == list(
            range(1, n + 1)
        )
        lines = predictions.split("\n")
        assert len(lines) == n and all(line.count("%") == 5 for line in lines)
        assert 0.0 <= acc <= 1.0
    # W&B draws the curves: no PNGs
    assert not list(root.rglob("curves_*.png"))


def test_error_wandb_log_model_with_offline_flag(cache_dir: str, tmp_path: Path, capsys):
    # Lightning refuses log_model with offline=True; the message comes out as one line
    with pytest.raises(SystemExit) as exit_info:
        main(
            _mlm_args(
                cache_dir,
                tmp_path,
                "--trainer.logger.init_args.offline=true",
                "--trainer.logger.init_args.log_model=true",
                config=(WANDB,),
            ),
            friendly_errors=True,
        )
    assert exit_info.value.code == 2
    error = _one_error_line(capsys.readouterr().err)
    assert "log_model=True and offline=True" in error


@pytest.mark.parametrize("task", ["speech", "clip"])
def test_wandb_retrieval_tables(task: str, offline_wandb: Path) -> None:
    from datamodules.synthetic.shapes import generate_shapes_coco
    from datamodules.synthetic.tones import generate_tone_librispeech

    root = offline_wandb
    if task == "speech":
        generate_tone_librispeech(root / "data", n_train_utts=24, n_val_utts=8)
        extra, key, media = [], "val/examples/a2t", "audio"
    else:
        generate_shapes_coco(root / "data", n_train=32, n_val=12)
        extra, key, media = (
            ["--data.loader.batch_size=8", "--data.loader.eval_batch_size=12"],
            "val/examples/i2t",
            "image",
        )
    cli_ = main(
        cli_args(
            "fit",
            f"--data.root={root / 'data'}",
            f"--data.tokenizer.cache_dir={root / 'cache'}",
            "--data.loader.num_workers=0",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            "--trainer.limit_val_batches=1",
            *extra,
            config=[f"{task}/quickstart.yaml", WANDB],
            root=root / "run",
        )
    )
    (run_dir,) = (root / "run" / "wandb").glob("offline-run-*")
    tables = []
    for _ in range(20):  # W&B's service process may still be closing the run file on a busy machine
        _, history, _, artifacts = read_offline_run(run_dir)
        tables = logged_tables(history, artifacts, key)
        if tables:
            break
        time.sleep(0.5)
    assert len(tables) == 1, f"no {key} table among the logged keys {sorted({k for r in history for k in r})}"
    ((_, table, files),) = tables
    assert table["columns"] == [media, "truth", "top-5 in batch", "hit@1", "hit@5"]
    assert 1 <= len(table["data"]) <= 8
    for item, truth, retrieved, hit1, hit5 in table["data"]:
        assert item["_type"] == f"{media}-file" and files[item["path"]].stat().st_size > 100
        lines = retrieved.split("\n")
        assert 1 <= len(lines) <= 5 and all(line[0] in "✓✗" for line in lines)
        assert hit1 == lines[0].startswith("✓") and hit5 == any(line.startswith("✓") for line in lines)
        scores = [float(line.split(" ")[1]) for line in lines]
        assert scores == sorted(scores, reverse=True) and all(-1.0 <= s <= 1.0 for s in scores)
        assert truth  # the item's own caption / transcript
    assert cli_.trainer.global_step == 2


# Without W&B ----------------------------------------------------------------------------------------------
def test_csv_run_draws_png_curves_and_uses_rich_in_a_terminal(
    cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import matplotlib.image

    monkeypatch.setattr(cli, "_interactive_terminal", lambda: True)
    cli_ = main(
        _mlm_args(
            cache_dir,
            tmp_path,
            "--trainer.enable_progress_bar=true",  # the progress bar this test is about
            "--trainer.max_steps=4",
            "--trainer.val_check_interval=2",
            "--trainer.log_every_n_steps=1",
        )
    )
    assert isinstance(cli_.trainer.progress_bar_callback, RichProgressBar)
    csv_dir = next(tmp_path.rglob("metrics.csv")).parent
    for stage in ("train", "val"):
        png = csv_dir / f"curves_{stage}.png"
        pixels = matplotlib.image.imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.std() > 0.01  # a picture, not a blank


def test_plot_metrics_csv_one_png_per_stage(tmp_path: Path) -> None:
    csv = tmp_path / "metrics.csv"
    csv.write_text(
        "epoch,lr,step,train/loss,val/acc\n0,0.1,0,2.0,\n0,0.1,1,1.5,\n0,,1,,0.4\n0,0.05,2,1.0,\n0,,3,,0.6\n"
    )
    written = plot_metrics_csv(csv)
    assert sorted(p.name for p in written) == ["curves_other.png", "curves_train.png", "curves_val.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_join_wordpieces() -> None:
    assert join_wordpieces(["the", "tann", "##ers", "[1]", "##s", "."]) == "the tanners [1]s ."


# One-line errors ------------------------------------------------------------------------------------------
def _one_error_line(err: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "MMPRETRAIN_DEBUG=1" in errors[0]
    return errors[0]


def test_error_missing_dataset_path(cache_dir: str, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "enwiki-latest-pages-articles.xml.bz2"
    error = fails(_mlm_args(cache_dir, tmp_path, f"--data.init_args.wikipedia=[{missing}]"), capsys)
    assert f"input path {missing} does not exist" in error


def test_error_unknown_keys(cache_dir: str, tmp_path: Path, capsys) -> None:
    error = fails(_mlm_args(cache_dir, tmp_path, "--model.init_args.hiden_size=64"), capsys)
    assert "Option 'hiden_size' is not accepted" in error and "MLMPretrainingModule" in error
    typo = tmp_path / "typo.yaml"
    typo.write_text("trainer:\n  max_stepz: 3\n")
    error = fails(_mlm_args(cache_dir, tmp_path, config=(str(typo),)), capsys)
    assert "trainer.max_stepz" in error and "--help" in error


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_error_gpu_config_on_a_cpu_machine(cache_dir: str, tmp_path: Path, capsys) -> None:
    error = fails(_mlm_args(cache_dir, tmp_path, "--trainer.accelerator=gpu"), capsys)
    assert "--trainer.accelerator cpu" in error


def test_precision_warnings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "_x86_without_bf16", lambda: True)
    with pytest.warns(UserWarning, match="no native bfloat16.*--trainer.precision 32-true"):
        cli.check_precision("bf16-mixed", "cpu")
    with pytest.warns(UserWarning, match="precision 16-mixed runs emulated"):
        cli.check_precision("16-mixed", "cpu")  # Lightning runs it as bf16-mixed on CPU
    monkeypatch.setattr(cli, "_x86_without_bf16", lambda: False)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cli.check_precision("bf16-mixed", "cpu")
        cli.check_precision("32-true", "cpu")


def test_debug_env_keeps_the_exception(
    cache_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MMPRETRAIN_DEBUG", "1")
    with pytest.raises(ValueError, match="does not exist"):
        main(_mlm_args(cache_dir, tmp_path, "--data.init_args.wikipedia=[/nope.xml]"), friendly_errors=True)


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """`python cli.py *args` with no input to read (a W&B login prompt would wait for one); any exit status."""
    return subprocess.run(
        [sys.executable, str(REPO / "cli.py"), *args],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow  # a subprocess run, about 7 s; test_cli_errors checks the one-line errors in-process
def test_command_line_error_is_one_line() -> None:
    done = _run_cli(cli_args("fit", "--trainer.not_a_key", "1", config=MLM), cli_env())
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: unrecognized arguments: --trainer.not_a_key 1 (python cli.py fit --help lists the options)  "
        "[MMPRETRAIN_DEBUG=1 shows the traceback]"
    ]


@pytest.mark.slow  # a subprocess run, about 8 s; the in-process offline W&B run stays in the default run
def test_command_line_wandb_without_an_account(cache_dir: str, tmp_path: Path) -> None:
    # no W&B settings at all (cli_env's WANDB_MODE included) and a home without a login
    env = {k: v for k, v in cli_env().items() if not k.startswith("WANDB_")}
    env.update(
        HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"), WANDB_CONFIG_DIR=str(tmp_path / "wandb_config")
    )
    done = _run_cli(_mlm_args(cache_dir, tmp_path, config=(WANDB,)), env)
    assert done.returncode == 2, done.stderr[-2000:]
    error = _one_error_line(done.stderr)
    assert "W&B" in error and "WANDB_MODE=offline" in error


def test_examples_callback_runs_the_same_forwards_on_every_rank_and_logs_on_rank_zero() -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.plugins.precision import Precision

    from datamodules.tokenizer import TextTokenizer
    from lightning_modules.mlm_module import MLMPretrainingModule
    from lightning_modules.training.callbacks import WandbExamples

    class RecordingLogger(WandbLogger):  # never starts a W&B run
        def __init__(self) -> None:
            super().__init__(project="test")
            self.logged = []

        def log_metrics(self, metrics, step=None) -> None:
            self.logged.append((step, metrics))

    tok = TextTokenizer.train(["the cat sat on the mat", "a dog sat on a log"] * 20, vocab_size=60)
    torch.manual_seed(0)
    module = MLMPretrainingModule(
        vocab_size=tok.vocab_size, max_position_embeddings=16, encoder={"size": "tiny", "heads": 2}
    )
    module.eval()
    enc = tok(["the cat sat on the mat", "a dog sat on a log"], max_length=16)
    labels = torch.full_like(enc["input_ids"], -100)
    labels[:, 2] = enc["input_ids"][:, 2]
    ids = enc["input_ids"].clone()
    ids[:, 2] = tok.mask_id
    batch = {**enc, "input_ids": ids, "token_type_ids": torch.zeros_like(ids), "labels": labels}

    forwards = {}
    loggers = {}
    for rank in (0, 1):
        calls = []
        real_forward = module.forward
        module.forward = lambda b, calls=calls, real=real_forward: calls.append(1) or real(b)
        loggers[rank] = RecordingLogger()
        trainer = SimpleNamespace(
            sanity_checking=False,
            loggers=[loggers[rank]],
            is_global_zero=rank == 0,
            precision_plugin=Precision(),
            datamodule=SimpleNamespace(tokenizer=tok),
            global_step=7,
        )
        callback = WandbExamples(every_n_val_epochs=2, num_examples=1, top_k=3)
        for _ in range(2):  # two validation runs of two batches each; only the second run is due
            callback.on_validation_epoch_start(trainer, module)
            for batch_idx in range(2):
                callback.on_validation_batch_end(trainer, module, None, batch, batch_idx)
            callback.on_validation_epoch_end(trainer, module)
        del module.forward
        forwards[rank] = len(calls)
    assert forwards == {0: 1, 1: 1}  # the same forward passes everywhere: sharded strategies need that
    assert loggers[1].logged == []
    ((step, metrics),) = loggers[0].logged
    table = metrics["val/examples/fill_mask"]
    assert step == 7 and table.columns == ["input", "top-3", "truth", "top1_acc"] and len(table.data) == 1
    text, predictions, truth, _ = table.data[0]
    assert text.startswith("the [1] sat") and truth == "[1] cat" and predictions.count("%") == 3
