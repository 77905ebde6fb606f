"""MLM end to end: the CLI in-process, exact resume, and a model that learns."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from cli import main
from datamodules.text.mlm_datamodule import MLMDataModule
from lightning_modules.mlm_module import MLMPretrainingModule
from tests.builders.runs import quickstart
from tests.helpers import quiet_trainer


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    """One prepared sample corpus for the module's tests (tokenizer training and sharding happen once)."""
    return str(tmp_path_factory.mktemp("mlm_cache"))


def test_cli_fit_validate_test_smoke(cache_dir: str, tmp_path: Path) -> None:
    cli = main(
        quickstart("fit", cache_dir, tmp_path, "--trainer.max_steps=4", "--trainer.val_check_interval=2")
    )
    assert cli.trainer.global_step == 4
    metrics = cli.trainer.callback_metrics
    for key in ("train/loss", "val/loss", "val/mlm_acc", "val/perplexity", "val/nsp_acc"):
        assert key in metrics, key
    assert torch.isfinite(metrics["val/loss"])
    ckpt = next((tmp_path / "csv").rglob("last.ckpt"), None) or next(tmp_path.rglob("last.ckpt"))
    csv = next(tmp_path.rglob("metrics.csv"))
    assert "val/mlm_acc" in csv.read_text().splitlines()[0]

    cli = main(quickstart("validate", cache_dir, tmp_path, f"--ckpt_path={ckpt}"))
    assert "val/mlm_acc" in cli.trainer.callback_metrics
    cli = main(quickstart("test", cache_dir, tmp_path, f"--ckpt_path={ckpt}"))
    test_metrics = cli.trainer.callback_metrics
    assert {"test/loss", "test/mlm_acc", "test/perplexity", "test/nsp_acc"} <= set(test_metrics)
    # perplexity is exp of the masked-token cross-entropy
    assert torch.isclose(test_metrics["test/perplexity"], test_metrics["test/mlm_loss"].exp(), rtol=1e-4)


def test_cli_rejects_unknown_key(cache_dir: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main(quickstart("fit", cache_dir, tmp_path, "--model.init_args.not_a_field=3"))
    assert "not_a_field" in capsys.readouterr().err


def test_cli_export_hf(cache_dir: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    main(quickstart("fit", cache_dir, tmp_path, "--trainer.max_steps=2", "--trainer.limit_val_batches=0"))
    ckpt = next(tmp_path.rglob("last.ckpt"))
    out = tmp_path / "hf"
    main(["export-hf", f"--ckpt_path={ckpt}", f"--out={out}"])
    assert (out / "vocab.txt").is_file() and (out / "config.json").is_file()
    hf = transformers.BertForPreTraining.from_pretrained(out).eval()
    ours = MLMPretrainingModule.load_from_checkpoint(
        ckpt, map_location="cpu", weights_only=False
    ).model.eval()
    tok = transformers.BertTokenizerFast(vocab_file=str(out / "vocab.txt"))
    enc = tok(["the town of arlen lies on the banks of the ash."], return_tensors="pt")
    with torch.no_grad():
        theirs = hf(**enc).prediction_logits
        mine, _ = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    assert (theirs - mine).abs().max() < 1e-4


class StopAfter(L.Callback):
    """Ends fit after `n` optimizer steps, as an interruption would; the schedule still spans max_steps."""

    def __init__(self, n: int) -> None:
        self.n = n

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step >= self.n:
            trainer.should_stop = True


def _fit(
    dm_kwargs: dict,
    steps: int,
    ckpt_dir: Path,
    resume: str | None = None,
    seed: int = 7,
    stop: int | None = None,
) -> MLMPretrainingModule:
    L.seed_everything(seed)
    dm = MLMDataModule(**dm_kwargs)
    model = MLMPretrainingModule(
        vocab_size=dm.vocab_size,
        max_position_embeddings=64,
        encoder={"size": "tiny"},
        optimizer={"lr": 1e-3, "warmup_steps": 2},
    )
    trainer = quiet_trainer(
        max_steps=steps,
        limit_train_batches=4,
        limit_val_batches=0,
        default_root_dir=ckpt_dir,
        callbacks=[
            L.pytorch.callbacks.ModelCheckpoint(dirpath=ckpt_dir, save_last=True, every_n_train_steps=1),
            *([StopAfter(stop)] if stop else []),
        ],
    )
    trainer.fit(model, datamodule=dm, ckpt_path=resume)
    return model


def test_resume_matches_uninterrupted_run(cache_dir: str, tmp_path: Path) -> None:
    """6 steps straight == 3 steps, stop mid-epoch, resume from last.ckpt, 3 more (fp32, dropout on).

    Epochs are 4 batches, so the stop falls inside the first epoch and the resumed run must continue with
    its 4th batch (the loader's position is in the checkpoint), then go on into the second epoch."""
    dm_kwargs = dict(
        sample_corpus=True,
        num_proc=1,
        tokenizer={"cache_dir": cache_dir, "vocab_size": 2000},
        examples={
            "max_seq_length": 64,
            "val_fraction": 0.05,
            "test_fraction": 0.05,
            "lines_per_document": 50,
        },
        loader={"batch_size": 8, "num_workers": 0},
    )
    straight = _fit(dm_kwargs, 6, tmp_path / "a")
    _fit(dm_kwargs, 6, tmp_path / "b", stop=3)
    resumed = _fit(dm_kwargs, 6, tmp_path / "b", resume=str(tmp_path / "b" / "last.ckpt"), seed=99)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training did move the weights away from the initialisation
    L.seed_everything(7)
    init = MLMPretrainingModule(
        vocab_size=resumed.hparams.vocab_size, max_position_embeddings=64, encoder={"size": "tiny"}
    )
    assert not torch.equal(
        init.state_dict()["model.bert.encoder.blocks.0.ffn.0.weight"],
        a["model.bert.encoder.blocks.0.ffn.0.weight"],
    )


def test_quickstart_model_learns(cache_dir: str) -> None:
    """Held-out MLM accuracy after a fixed number of steps, against always predicting the most frequent token."""
    L.seed_everything(0)
    dm = MLMDataModule(
        sample_corpus=True,
        num_proc=1,
        tokenizer={"cache_dir": cache_dir, "vocab_size": 1000},
        examples={
            "max_seq_length": 32,
            "val_fraction": 0.05,
            "test_fraction": 0.05,
            "lines_per_document": 50,
        },
        loader={"batch_size": 32, "num_workers": 0},
    )
    model = MLMPretrainingModule(
        vocab_size=dm.vocab_size,
        max_position_embeddings=32,
        encoder={"size": "mini", "hidden": 128, "heads": 2},
        optimizer={"lr": 1e-3, "warmup_steps": 0.05},
    )
    trainer = quiet_trainer(
        max_steps=300,
        enable_checkpointing=False,
        limit_val_batches=0,
    )
    trainer.fit(model, datamodule=dm)
    # baseline: always answer the most frequent target token of the held-out masked positions
    targets = torch.cat([b["labels"][b["labels"] != -100] for b in dm.test_dataloader()])
    majority = torch.bincount(targets).max().item() / targets.numel()
    result = trainer.test(model, datamodule=dm, verbose=False)[0]
    acc = result["test/mlm_acc"]
    print(
        f"held-out MLM accuracy {acc:.3f} vs majority-token baseline {majority:.3f} ({targets.numel()} targets)"
    )
    assert targets.numel() > 200
    # measured here: 0.28 against 0.10 after 300 steps (0.20 after 200: from-scratch BERT first sits on the unigram
    # plateau)
    assert acc > majority + 0.08
    assert acc > 2 * majority
