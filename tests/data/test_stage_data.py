"""`validate` / `test` / `predict` with a checkpoint on a machine that holds only that stage's data.

For each task `fit` sets up a tiny model on a full data root (the training machine) and saves it after zero steps
(the tokenizer is in the checkpoint all the same); then the CLI evaluates it on a second root that holds only the
evaluation split (the evaluation machine), with a fresh cache, so any read of training data, or any vocabulary
trained anew, would fail. The DataModule must load the tokenizer the checkpoint carries.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from cli import main
from datamodules.synthetic.shapes import generate_shapes_coco
from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.tokenizer import TextTokenizer
from tests.builders.files import sentences, write_books
from tests.builders.runs import evaluate, fit_checkpoint
from tests.helpers import cli_args

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


def assert_checkpoint_tokenizer(cli, ckpt: Path) -> None:
    """The DataModule's tokenizer is the checkpoint's: same vocabulary, same ids, and the model sized by it."""
    saved = Tokenizer.from_str(torch.load(ckpt, weights_only=True, mmap=True)["tokenizer_json"])
    tok = cli.datamodule.tokenizer
    assert tok.source == str(ckpt)
    assert tok.tokenizer.get_vocab() == saved.get_vocab()
    text = "the old castle by the bright harbour"
    assert tok.encode_batch([text]) == [saved.encode(text, add_special_tokens=False).ids]
    assert cli.model.hparams.vocab_size == saved.get_vocab_size()


def save_tokenizer(texts: list[str], folder: Path) -> Path:
    TextTokenizer.train(texts, vocab_size=60, min_frequency=1).save(folder)
    return folder / "tokenizer.json"


def test_coco_test_reads_only_the_test_split(tmp_path: Path) -> None:
    generate_shapes_coco(tmp_path / "train_root", n_train=8, n_val=4, image_size=32)
    small = [
        "--data.images.image_size=32",
        "--model.image.image_size=32",
        "--data.loader.num_workers=0",
        "--data.loader.batch_size=4",
    ]
    small += ["--data.loader.eval_batch_size=4", "--data.generate_if_missing=false"]
    ckpt = fit_checkpoint(
        "clip/quickstart.yaml",
        tmp_path,
        f"--data.root={tmp_path / 'train_root'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'train_cache'}",
        *small,
    )
    # the evaluation machine: only the test split's captions and images
    root = tmp_path / "eval_root"
    (root / "annotations").mkdir(parents=True)
    shutil.copy(
        tmp_path / "train_root/annotations/captions_val2017.json", root / "annotations/captions_test.json"
    )
    shutil.copytree(tmp_path / "train_root/val2017", root / "test")
    cli = evaluate(
        "test",
        "clip/quickstart.yaml",
        ckpt,
        tmp_path,
        f"--data.root={root}",
        "--data.test_split=test",
        f"--data.tokenizer.cache_dir={tmp_path / 'eval_cache'}",
        *small,
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"test"} and len(cli.datamodule.datasets["test"]) == 4
    assert 0.0 <= float(cli.trainer.callback_metrics["test/i2t_R@1"]) <= 1.0
    assert sorted(p.name for p in root.iterdir()) == ["annotations", "test"]  # nothing generated there


def test_librispeech_test_reads_only_the_test_subsets(tmp_path: Path) -> None:
    """The command of the issue: `test --data.root DIR --data.test_subsets '[test-clean]' --ckpt_path C`."""
    generate_tone_librispeech(tmp_path / "train_root", n_train_utts=8, n_val_utts=4)
    common = ["--data.loader.num_workers=0", "--trainer.use_distributed_sampler=false"]
    ckpt = fit_checkpoint(
        "speech/quickstart.yaml",
        tmp_path,
        f"--data.root={tmp_path / 'train_root'}",
        f"--data.tokenizer.cache_dir={tmp_path / 'train_cache'}",
        *common,
    )
    root = tmp_path / "eval_root"
    shutil.copytree(tmp_path / "train_root/LibriSpeech/dev-clean", root / "LibriSpeech/test-clean")
    cli = evaluate(
        "test",
        "speech/quickstart.yaml",
        ckpt,
        tmp_path,
        f"--data.root={root}",
        "--data.test_subsets=[test-clean]",
        f"--data.tokenizer.cache_dir={tmp_path / 'eval_cache'}",
        *common,
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"test"} and len(cli.datamodule.datasets["test"]) == 4
    assert "test/a2t_R@5" in cli.trainer.callback_metrics
    assert sorted(p.name for p in (root / "LibriSpeech").iterdir()) == ["test-clean"]


def test_librispeech_without_training_data_or_checkpoint_says_what_to_pass(tmp_path: Path, capsys) -> None:
    generate_tone_librispeech(tmp_path / "train_root", n_train_utts=8, n_val_utts=4)
    root = tmp_path / "eval_root"
    shutil.copytree(tmp_path / "train_root/LibriSpeech/dev-clean", root / "LibriSpeech/test-clean")
    args = cli_args(
        "test",
        f"--data.root={root}",
        "--data.test_subsets=[test-clean]",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
        config="speech/quickstart.yaml",
        root=tmp_path / "run",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(args, friendly_errors=True)
    assert exit_info.value.code == 2
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert f"LibriSpeech subset(s) train-clean-100 not found under {root}/LibriSpeech" in error
    assert "subsets found: test-clean" in error and "pass --ckpt_path" in error


def test_mlm_test_and_validate_read_only_their_prepared_split(tmp_path: Path) -> None:
    books = tmp_path / "corpus" / "books_large_p1.txt"
    write_books(books, n_docs=40)
    small = [
        "--data.loader.num_workers=0",
        "--data.num_proc=1",
        "--data.loader.batch_size=4",
        "--model.max_position_embeddings=64",
    ]
    ckpt = fit_checkpoint(
        "mlm/quickstart.yaml",
        tmp_path,
        f"--data.bookcorpus=[{books}]",
        "--data.sample_corpus=false",
        "--data.tokenizer.vocab_size=100",
        "--data.examples.max_seq_length=32",
        "--data.examples.val_fraction=0.2",
        "--data.examples.test_fraction=0.2",
        f"--data.tokenizer.cache_dir={tmp_path / 'train_cache'}",
        *small,
    )
    (prepared,) = (tmp_path / "train_cache").glob("mlm-*")
    # the evaluation machine: the prepared test instances, no corpus, no training shards
    eval_prepared = tmp_path / "eval_root" / prepared.name
    eval_prepared.mkdir(parents=True)
    shutil.copy(prepared / "index.json", eval_prepared)
    shutil.copytree(prepared / "test", eval_prepared / "test")
    shutil.rmtree(tmp_path / "corpus")
    cli = evaluate(
        "test",
        "mlm/quickstart.yaml",
        ckpt,
        tmp_path,
        f"--data.prepared={eval_prepared}",
        f"--data.tokenizer.cache_dir={tmp_path / 'eval_cache'}",
        *small,
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"test"}
    assert len(cli.datamodule.datasets["test"]) > 0
    assert float(cli.trainer.callback_metrics["test/loss"]) > 0
    # validate needs the validation instances alone
    shutil.rmtree(eval_prepared / "test")
    shutil.copytree(prepared / "val", eval_prepared / "val")
    cli = evaluate(
        "validate",
        "mlm/quickstart.yaml",
        ckpt,
        tmp_path,
        f"--data.prepared={eval_prepared}",
        f"--data.tokenizer.cache_dir={tmp_path / 'eval_cache'}",
        *small,
    )
    assert set(cli.datamodule.datasets) == {"val"} and len(cli.datamodule.datasets["val"]) > 0
    assert float(cli.trainer.callback_metrics["val/loss"]) > 0
    assert not (tmp_path / "eval_cache").exists()  # no vocabulary trained, no corpus prepared


def test_mlm_prepared_folder_with_another_tokenizer_is_refused(tmp_path: Path) -> None:
    from datamodules.text.mlm_datamodule import MLMDataModule

    books = tmp_path / "books_large_p1.txt"
    write_books(books, n_docs=20)
    dm = MLMDataModule(
        bookcorpus=[str(books)],
        num_proc=1,
        tokenizer={"vocab_size": 100, "cache_dir": str(tmp_path / "c")},
        examples={"max_seq_length": 32},
        loader={"num_workers": 0},
    )
    dm.prepare_data()
    (prepared,) = (tmp_path / "c").glob("mlm-*")
    other = save_tokenizer(sentences(random.Random(5), 50), tmp_path / "other")
    dm = MLMDataModule(
        prepared=str(prepared),
        tokenizer={"path": str(other)},
        loader={"num_workers": 0},
    )
    with pytest.raises(ValueError, match=rf"{prepared} was prepared with another tokenizer .* than {other}"):
        dm.setup("test")
    with pytest.raises(
        ValueError, match=r"needs the tokenizer its instances were made with: pass --ckpt_path"
    ):
        _ = MLMDataModule(prepared=str(prepared)).vocab_size


def write_glue(folder: Path, files: dict[str, int], seed: int = 0) -> list[str]:
    """SST-2-style files (`sentence<TAB>label`; test.tsv `index<TAB>sentence`); returns every sentence."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for name, n in files.items():
        rows = sentences(rng, n)
        texts += rows
        if name == "test.tsv":
            body = "index\tsentence\n" + "".join(f"{i}\t{s}\n" for i, s in enumerate(rows))
        else:
            body = "sentence\tlabel\n" + "".join(f"{s}\t{int('river' in s)}\n" for s in rows)
        (folder / name).write_text(body)
    return texts


FRESH_TINY = [
    "--model.encoder.size=tiny",
    "--model.max_position_embeddings=64",
    "--data.max_length=32",
    "--data.loader.batch_size=8",
]


def test_glue_test_and_predict_read_only_their_file(tmp_path: Path) -> None:
    texts = write_glue(tmp_path / "train_root", {"train.tsv": 16, "dev.tsv": 8})
    tokenizer = save_tokenizer(texts, tmp_path / "tokenizer")
    args = [f"--data.root={tmp_path / 'train_root'}", f"--data.tokenizer.path={tokenizer}"]
    ckpt = fit_checkpoint("finetune/sst2.yaml", tmp_path, *args, *FRESH_TINY)
    shutil.rmtree(tmp_path / "tokenizer")  # the checkpoint carries it
    # test scores dev.tsv (GLUE's test labels are not public): a root with only that file
    write_glue(tmp_path / "dev_root", {"dev.tsv": 12}, seed=1)
    cli = evaluate(
        "test", "finetune/sst2.yaml", ckpt, tmp_path, f"--data.root={tmp_path / 'dev_root'}", *FRESH_TINY
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"val"} and len(cli.datamodule.datasets["val"]) == 12
    assert 0.0 <= float(cli.trainer.callback_metrics["test/acc"]) <= 1.0
    # predict runs on test.tsv alone
    write_glue(tmp_path / "test_root", {"test.tsv": 5}, seed=2)
    cli = evaluate(
        "predict", "finetune/sst2.yaml", ckpt, tmp_path, f"--data.root={tmp_path / 'test_root'}", *FRESH_TINY
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"predict"}
    index = torch.cat([b["index"] for b in cli.trainer.predict_loop.predictions]).tolist()
    assert index == [0, 1, 2, 3, 4]


def write_conll(path: Path, n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines, texts = ["-DOCSTART- -X- -X- O", ""], []
    for text in sentences(rng, n):
        words = [*text.split(), "Oslo"]
        texts.append(" ".join(words))
        lines += [f"{w} NN I-NP {'I-LOC' if w == 'Oslo' else 'O'}" for w in words] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    return texts


def test_conll_test_and_validate_read_only_their_file(tmp_path: Path) -> None:
    texts = write_conll(tmp_path / "train_root/train.txt", 16)
    texts += write_conll(tmp_path / "train_root/valid.txt", 8, seed=1)
    tokenizer = save_tokenizer(texts, tmp_path / "tokenizer")
    args = [f"--data.root={tmp_path / 'train_root'}", f"--data.tokenizer.path={tokenizer}"]
    ckpt = fit_checkpoint("finetune/conll2003.yaml", tmp_path, *args, *FRESH_TINY)
    write_conll(tmp_path / "test_root/test.txt", 6, seed=2)
    cli = evaluate(
        "test",
        "finetune/conll2003.yaml",
        ckpt,
        tmp_path,
        f"--data.root={tmp_path / 'test_root'}",
        *FRESH_TINY,
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"test"} and len(cli.datamodule.datasets["test"]) == 6
    assert 0.0 <= float(cli.trainer.callback_metrics["test/f1"]) <= 1.0
    # validate reads the validation file alone
    write_conll(tmp_path / "val_root/valid.txt", 5, seed=3)
    cli = evaluate(
        "validate",
        "finetune/conll2003.yaml",
        ckpt,
        tmp_path,
        f"--data.root={tmp_path / 'val_root'}",
        *FRESH_TINY,
    )
    assert_checkpoint_tokenizer(cli, ckpt)
    assert set(cli.datamodule.datasets) == {"val"} and len(cli.datamodule.datasets["val"]) == 5
    assert 0.0 <= float(cli.trainer.callback_metrics["val/f1"]) <= 1.0


def test_cli_hands_the_checkpoint_tokenizer_only_when_there_is_one(tmp_path: Path) -> None:
    from jsonargparse import Namespace

    from cli import PretrainCLI

    def config(ckpt: Path, **init_args) -> Namespace:
        return Namespace(
            ckpt_path=str(ckpt), data=Namespace(class_path="dm", init_args=Namespace(**init_args))
        )

    with_tokenizer, without = tmp_path / "new.ckpt", tmp_path / "old.ckpt"
    tok = TextTokenizer.train(sentences(random.Random(0), 30), vocab_size=60, min_frequency=1)
    torch.save({"state_dict": {}, "tokenizer_json": tok.tokenizer.to_str()}, with_tokenizer)
    torch.save({"state_dict": {}}, without)

    cfg = config(with_tokenizer, tokenizer=Namespace(path="vocab.txt"))
    PretrainCLI._tokenizer_from_checkpoint(cfg)
    assert cfg.data.init_args.tokenizer.path == str(with_tokenizer)
    cfg = config(without, tokenizer=Namespace(path="vocab.txt"))
    with pytest.warns(UserWarning, match=rf"no tokenizer read from {without} \(.*holds no tokenizer"):
        PretrainCLI._tokenizer_from_checkpoint(cfg)
    assert cfg.data.init_args.tokenizer.path == "vocab.txt"  # the configured one stays
    cfg = config(with_tokenizer, root="images")  # a DataModule without a tokenizer section
    PretrainCLI._tokenizer_from_checkpoint(cfg)
    assert "tokenizer" not in cfg.data.init_args
    cfg = config(tmp_path / "best", tokenizer=Namespace(path=None))  # not a file: nothing to read
    PretrainCLI._tokenizer_from_checkpoint(cfg)
    assert cfg.data.init_args.tokenizer.path is None
