"""Predictions to disk (lightning_modules/training/prediction.py): what the writer puts in its files, for every kind of
system, on one process and merged from two."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pyarrow.parquet as pq
import pytest
import torch

from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.synthetic.shapes import generate_shapes_coco
from lightning_modules.components.image_tower import ImageTowerConfig
from lightning_modules.components.text_tower import TextTowerConfig
from lightning_modules.image_text_module import ImageTextModule
from lightning_modules.training.prediction import PredictionWriter
from tests.builders.alignment import TINY
from tests.builders.files import shapes_with_speech
from tests.helpers import cli_args, quiet_trainer

N_VAL = 6


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=N_VAL, image_size=32)


def _clip_data(root: Path, tmp: Path, tokenizer: str | None = None, **predict) -> CocoCaptionsDataModule:
    """The test set's DataModule; `predict` holds the predict section's fields (split, images, texts)."""
    return CocoCaptionsDataModule(
        str(root),
        context_length=32,
        images={"image_size": 32},
        loader={"eval_batch_size": 4, "num_workers": 0},
        tokenizer={"path": tokenizer, "vocab_size": 120, "cache_dir": str(tmp / "cache")},
        predict=predict,
    )


def _clip(vocab_size: int) -> ImageTextModule:
    torch.manual_seed(0)
    return ImageTextModule(
        vocab_size=vocab_size,
        embed_dim=16,
        image=ImageTowerConfig("vit_tiny", image_size=32, layers=1),
        text=TextTowerConfig("tiny", heads=2, layers=1, max_len=32),
    ).eval()


def _predict(module: L.LightningModule, dm: L.LightningDataModule, out: Path) -> dict:
    trainer = quiet_trainer(callbacks=[PredictionWriter(str(out))])
    trainer.predict(module, dm, return_predictions=False)
    return json.loads((out / "metadata.json").read_text())


def test_clip_embeddings_of_a_split_a_folder_and_a_caption_file(shapes: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    images = sorted((shapes / "val2017").iterdir())
    for i, image in enumerate(images[:3]):
        (folder / ("sub" if i else "") / image.name).write_bytes(image.read_bytes())
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    texts = tmp_path / "captions.txt"
    texts.write_text("a red circle on the left\n\na blue square\n", encoding="utf-8")
    dm = _clip_data(shapes, tmp_path, split="val2017", images=str(folder), texts=str(texts))
    module = _clip(dm.vocab_size)
    meta = _predict(module, dm, tmp_path / "out")

    table = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pylist()
    keys = [(r["kind"], r["id"]) for r in table]
    assert len(keys) == len(set(keys))  # every id once
    annotations = json.loads((shapes / "annotations" / "captions_val2017.json").read_text())
    image_ids = {str(i["id"]) for i in annotations["images"]}
    caption_ids = {str(a["id"]) for a in annotations["annotations"]}
    folder_keys = {images[0].name, *(f"sub/{p.name}" for p in images[1:3])}
    assert {i for k, i in keys if k == "image"} == image_ids | folder_keys
    lines = {"captions.txt:1", "captions.txt:3"}  # the blank line 2 left out
    assert {i for k, i in keys if k == "caption"} == caption_ids | lines
    emb = torch.tensor([r["embedding"] for r in table])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(table)), atol=1e-5, rtol=0)

    # rows equal the model's own embeddings of the same inputs, alone rather than batched: other kernels
    by_key = dict(zip(keys, emb))
    tokens = dm.tokenizer(["a blue square"], 32)
    with torch.no_grad():
        direct = module.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
    torch.testing.assert_close(by_key[("caption", "captions.txt:3")], direct, atol=1e-5, rtol=1e-4)
    split = dm.predict_dataloader()[0].dataset
    item = split[0]
    with torch.no_grad():
        direct_image = module.encode_image(item["image"][None])[0]
    torch.testing.assert_close(by_key[("image", item["image_key"])], direct_image, atol=1e-5, rtol=1e-4)

    assert meta["system"] == "ImageTextModule" and meta["output"] == "embeddings"
    assert meta["unreadable"] == [str(folder / "broken.jpg")] and meta["skipped"] == 1
    assert meta["counts"] == {"image": N_VAL + 3, "caption": len(caption_ids) + 2}
    assert not list((tmp_path / "out").glob("rank-*"))  # parts merged and removed


def test_writer_refuses_a_folder_of_other_files_and_replaces_its_own(shapes: Path, tmp_path: Path) -> None:
    texts = tmp_path / "captions.txt"
    texts.write_text("a red circle\n")
    dm = _clip_data(shapes, tmp_path, texts=str(texts))
    module = _clip(dm.vocab_size)
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _predict(module, dm, out)
    assert (
        sorted(p.name for p in out.iterdir()) == ["notes.txt"]
        and (out / "notes.txt").read_text() == "keep me"
    )

    ours = tmp_path / "ours"
    _predict(module, dm, ours)
    (ours / "rank-0").mkdir()  # the part folder of a run interrupted before its merge
    (ours / "rank-0" / "records.jsonl").write_text("")
    texts.write_text("a red circle\na blue square\n")
    meta = _predict(module, dm, ours)  # its own folder: the files are replaced
    assert meta["counts"] == {"caption": 2}
    assert sorted(p.name for p in ours.iterdir()) == ["embeddings.parquet", "metadata.json"]


def test_predict_without_inputs_is_one_clear_error(shapes: Path, tmp_path: Path) -> None:
    dm = _clip_data(shapes, tmp_path)
    with pytest.raises(ValueError, match="nothing to predict: set --data.predict.split"):
        _predict(_clip(dm.vocab_size), dm, tmp_path / "out")


# text systems --------------------------------------------------------------------------------------------
WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", "park", "john", "lives", "in", "paris", "."]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vocab") / "vocab.txt"
    path.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    return path


def test_glue_submission_tsv_has_the_label_names_and_every_index_once(vocab: Path, tmp_path: Path) -> None:
    from datamodules.text.glue_datamodule import GlueDataModule
    from lightning_modules.finetune_module import SequenceClassificationModule

    task = tmp_path / "RTE"
    task.mkdir()
    rows = ["index\tsentence1\tsentence2", *(f"{i}\tthe cat sat\t{WORDS[i]} ran" for i in range(7))]
    (task / "test.tsv").write_text("\n".join(rows) + "\n")
    dm = GlueDataModule(
        str(task),
        task="rte",
        tokenizer={"path": str(vocab)},
        loader={"batch_size": 3},
    )
    torch.manual_seed(0)
    module = SequenceClassificationModule(
        vocab_size=dm.vocab_size, encoder={"size": "tiny", "layers": 1}
    ).eval()
    meta = _predict(module, dm, tmp_path / "out")

    lines = (tmp_path / "out" / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and meta["files"] == ["RTE.tsv"]
    index, labels = zip(*(line.split("\t") for line in lines[1:]))
    assert list(index) == [str(i) for i in range(7)]
    dm.setup("predict")
    batch = dm.collator()([dm.datasets["predict"][i] for i in range(7)])
    with torch.no_grad():
        expected = module(batch).argmax(-1).tolist()
    assert list(labels) == [("entailment", "not_entailment")[c] for c in expected]


def test_conll_predictions_add_a_tag_column_to_the_input_file(vocab: Path, tmp_path: Path) -> None:
    from datamodules.text.conll_datamodule import CoNLLDataModule
    from lightning_modules.finetune_module import TokenClassificationModule

    text = "-DOCSTART- -X- -X- O\n\njohn NNP B-NP I-PER\nlives VBZ B-VP O\n\nthe DT B-NP O\ncat NN I-NP O\nsat VBD O O\n"
    (tmp_path / "test.txt").write_text(text)
    dm = CoNLLDataModule(
        str(tmp_path),
        tokenizer={"path": str(vocab)},
        loader={"batch_size": 1},
    )
    torch.manual_seed(0)
    module = TokenClassificationModule(vocab_size=dm.vocab_size, encoder={"size": "tiny", "layers": 1}).eval()
    _predict(module, dm, tmp_path / "out")

    written = (tmp_path / "out" / "predictions.conll").read_text().splitlines()
    original = text.splitlines()
    assert len(written) == len(original)
    dm.setup("predict")
    batch = dm.collator()([dm.datasets["test"][i] for i in range(2)])
    with torch.no_grad():
        tags = module.predict_step(batch, 0)["tags"]
    token_lines = [n for n, line in enumerate(original) if line and not line.startswith("-DOCSTART-")]
    for n, tag in zip(token_lines, [t for sentence in tags for t in sentence]):
        assert written[n] == f"{original[n]} {tag}" and tag in module.labels
    assert written[0] == original[0] and written[1] == ""  # the rest of the file as it was


def test_mlm_fill_mask_gives_the_top_k_of_the_model(vocab: Path, tmp_path: Path) -> None:
    from datamodules.text.mlm_datamodule import MLMDataModule
    from lightning_modules.mlm_module import MLMPretrainingModule

    masked = tmp_path / "masked.txt"
    masked.write_text("the [MASK] sat on the mat .\n\nno masks here\njohn [MASK] in [MASK] .\n")
    dm = MLMDataModule(
        tokenizer={"path": str(vocab)},
        predict={"texts": str(masked), "top_k": 3},
        loader={"batch_size": 2, "num_workers": 0},
    )
    torch.manual_seed(0)
    module = MLMPretrainingModule(vocab_size=dm.vocab_size, encoder={"size": "tiny", "layers": 1}).eval()
    meta = _predict(module, dm, tmp_path / "out")

    rows = [json.loads(line) for line in (tmp_path / "out" / "fill_mask.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 3, 4] and meta["counts"] == {"rows": 3}
    assert [len(r["masks"]) for r in rows] == [1, 0, 2]
    # line 1 as the model sees it, [MASK] at position 2: [CLS] the [MASK] sat on the mat . [SEP]
    tokens = [dm.tokenizer.cls_id, 5, dm.tokenizer.mask_id, 7, 8, 5, 9, 18, dm.tokenizer.sep_id]
    assert dm.tokenizer.encode_batch(["the cat sat on the mat ."])[0] == [5, 6, 7, 8, 5, 9, 18]
    with torch.no_grad():
        hidden = module.model(torch.tensor([tokens]), torch.ones(1, len(tokens), dtype=torch.bool))[0]
    probs, top = hidden[0, 2].softmax(-1).topk(3)
    first = rows[0]["masks"][0]
    assert [m["id"] for m in first] == top.tolist()
    assert [m["token"] for m in first] == [dm.tokenizer.tokenizer.id_to_token(i) for i in top.tolist()]
    # batched prediction against this one sequence: other shapes, fp32 reassociation
    torch.testing.assert_close(torch.tensor([m["score"] for m in first]), probs, atol=1e-5, rtol=0)


def test_speech_embeddings_of_subsets_and_an_audio_folder(tmp_path: Path) -> None:
    from datamodules.speech.librispeech_datamodule import LibriSpeechDataModule
    from datamodules.synthetic.tones import generate_tone_librispeech
    from lightning_modules.components.speech_tower import SpeechTowerConfig
    from lightning_modules.speech_text_module import SpeechTextModule

    base = generate_tone_librispeech(tmp_path / "tones", n_train_utts=20, n_val_utts=5)
    audio = tmp_path / "clips"
    audio.mkdir()
    flacs = sorted((base / "dev-clean").rglob("*.flac"))
    (audio / flacs[0].name).write_bytes(flacs[0].read_bytes())
    (audio / "empty.flac").write_bytes(b"")
    dm = LibriSpeechDataModule(
        str(tmp_path / "tones"),
        context_length=32,
        loader={"num_workers": 0},
        tokenizer={"vocab_size": 120, "cache_dir": str(tmp_path / "cache")},
        predict={"subsets": ["dev-clean"], "audio": str(audio), "batch_size": 4},
    )
    torch.manual_seed(0)
    module = SpeechTextModule(
        vocab_size=dm.vocab_size,
        embed_dim=16,
        speech=SpeechTowerConfig("tiny", layers=1, hidden=64, heads=2, conv_channels=8),
        text=TextTowerConfig("tiny", layers=1, hidden=64, heads=2, max_len=32),
    ).eval()
    meta = _predict(module, dm, tmp_path / "out")

    table = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pylist()
    utterance_ids = {p.name.removesuffix(".flac") for p in flacs}
    assert [r["id"] for r in table if r["kind"] == "utterance"] == sorted(
        utterance_ids
    )  # folder's clip = same id
    assert {r["id"] for r in table if r["kind"] == "transcript"} == utterance_ids
    assert meta["counts"] == {"utterance": len(flacs), "transcript": len(flacs)}
    assert meta["unreadable"] == [str(audio / "empty.flac")]
    emb = torch.tensor([r["embedding"] for r in table])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(table)), atol=1e-5, rtol=0)
    from datamodules.speech.librispeech import load_audio

    wave = load_audio(flacs[0], 16000)
    with torch.no_grad():
        direct = module.encode_speech(wave[None], torch.tensor([wave.numel()]))[0]
    row = next(
        r for r in table if r["kind"] == "utterance" and r["id"] == flacs[0].name.removesuffix(".flac")
    )
    # batched and padded against this utterance alone: other kernels through the speech tower
    torch.testing.assert_close(torch.tensor(row["embedding"]), direct, atol=1e-4, rtol=1e-4)


DDP_SCRIPT = """
import sys, torch
sys.path.insert(0, {repo!r})
from tests.helpers import quiet_trainer
from tests.cli.test_predict import _clip, _clip_data
from lightning_modules.training.prediction import PredictionWriter
from pathlib import Path

dm = _clip_data(Path({shapes!r}), Path({tmp!r}), images={images!r}, texts={texts!r},
                tokenizer={tokenizer!r})
module = _clip(dm.vocab_size)
module.load_state_dict(torch.load({weights!r}))
trainer = quiet_trainer(strategy="ddp", devices=2, callbacks=[PredictionWriter({out!r})])
trainer.predict(module, dm, return_predictions=False)
"""


@pytest.mark.slow  # about 8 s; the one-process writer tests stay in the default run
def test_two_processes_write_what_one_process_writes(shapes: Path, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    texts = tmp_path / "captions.txt"
    texts.write_text("".join(f"caption number {i}\n" for i in range(7)))  # odd: the sampler pads a rank
    images = str(shapes / "val2017")  # N_VAL images, with the eval batch of 4: ranks get 2 batches and 1
    dm = _clip_data(shapes, tmp_path, images=images, texts=str(texts))
    module = _clip(dm.vocab_size)
    _predict(module, dm, tmp_path / "one")
    torch.save(module.state_dict(), tmp_path / "weights.pt")
    script = tmp_path / "ddp_predict.py"
    script.write_text(
        DDP_SCRIPT.format(
            repo=str(REPO),
            shapes=str(shapes),
            tmp=str(tmp_path),
            images=images,
            texts=str(texts),
            tokenizer=str(dm.tokenizer.source),
            weights=str(tmp_path / "weights.pt"),
            out=str(tmp_path / "two"),
        )
    )
    env = cli_env(PL_DISABLE_FORK="1")
    result = subprocess.run(
        [sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]

    one = pq.read_table(tmp_path / "one" / "embeddings.parquet").to_pylist()
    two = pq.read_table(tmp_path / "two" / "embeddings.parquet").to_pylist()
    assert [(r["kind"], r["id"]) for r in two] == [(r["kind"], r["id"]) for r in one]  # padding rows dropped
    assert len(one) == N_VAL + 7
    # two processes embed other batches (other shapes) than one: fp32 reassociation
    torch.testing.assert_close(
        torch.tensor([r["embedding"] for r in two]),
        torch.tensor([r["embedding"] for r in one]),
        atol=1e-5,
        rtol=1e-4,
    )
    meta = json.loads((tmp_path / "two" / "metadata.json").read_text())
    assert meta["world_size"] == 2 and meta["counts"] == {"image": N_VAL, "caption": 7}
    assert sorted(os.listdir(tmp_path / "two")) == ["embeddings.parquet", "metadata.json"]


def test_cli_predict_with_the_config_snippet(
    shapes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli import main

    monkeypatch.chdir(tmp_path)  # the snippet writes to predictions/clip_val, under the working folder
    tiny = [
        "--model.embed_dim=16",
        "--model.image.image_size=32",
        "--model.image.layers=1",
        "--model.text.layers=1",
        f"--data.root={shapes}",
        "--data.images.image_size=32",
        "--data.loader.num_workers=0",
        "--data.loader.eval_batch_size=4",
        f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
    ]
    # a checkpoint as users have them: one training step through the CLI
    run = main(
        cli_args(
            "fit",
            *tiny,
            "--data.loader.batch_size=8",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=0",
            config="clip/quickstart.yaml",
            root=tmp_path / "run",
        )
    )
    ckpt = tmp_path / "clip.ckpt"
    run.trainer.save_checkpoint(ckpt)
    module = run.model.eval()
    snippet = ["clip/quickstart.yaml", "predict/clip_val.yaml"]
    main(cli_args("predict", *tiny, f"--ckpt_path={ckpt}", config=snippet))
    out = tmp_path / "predictions" / "clip_val"
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["checkpoint"] == str(ckpt) and meta["counts"]["image"] == N_VAL
    table = pq.read_table(out / "embeddings.parquet")
    assert table.column("kind").to_pylist().count("image") == N_VAL
    # the checkpoint's weights, not a fresh model's: the first image's row equals this module's embedding
    item = _clip_data(shapes, tmp_path, split="val2017").predict_dataloader()[0].dataset[0]
    with torch.no_grad():
        direct = module.encode_image(item["image"][None])[0]
    row = next(r for r in table.to_pylist() if r["id"] == item["image_key"] and r["kind"] == "image")
    # batched against alone: other shapes, fp32 reassociation
    torch.testing.assert_close(torch.tensor(row["embedding"]), direct, atol=1e-5, rtol=1e-4)


def test_trimodal_embeds_all_four_kinds_in_one_space(tmp_path: Path) -> None:
    from datamodules.trimodal_datamodule import TriModalDataModule
    from lightning_modules.trimodal_module import TriModalModule

    shapes_with_speech(tmp_path, n_train=12, n_val=3)
    image_text = dict(
        root=str(tmp_path / "shapes"),
        images={"image_size": 32},
        loader={"eval_batch_size": 4, "num_workers": 0},
        context_length=32,
        predict={"split": "val2017"},
    )
    speech_text = dict(
        root=str(tmp_path / "speech"),
        loader={"num_workers": 0},
        context_length=32,
        predict={"subsets": ["dev-clean"]},
    )
    dm = TriModalDataModule(
        image_text,
        speech_text,
        tokenizer={"vocab_size": 120, "cache_dir": str(tmp_path / "cache")},
    )
    torch.manual_seed(0)
    module = TriModalModule(vocab_size=dm.vocab_size, **TINY).eval()
    meta = _predict(module, dm, tmp_path / "out")

    table = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pylist()
    utterances = dm.speech_text.datasets["predict"].utterances
    assert meta["counts"] == {
        "image": 3,
        "caption": 15,  # the shapes set's five captions per image
        "utterance": len(utterances),
        "transcript": len(utterances),
    }
    assert {r["id"] for r in table if r["kind"] == "utterance"} == {u.key for u in utterances}
    row = next(r for r in table if r["kind"] == "transcript" and r["id"] == utterances[0].key)
    text = dm.speech_text.datasets["predict"].texts[0]
    tokens = dm.tokenizer([text], 32)
    with torch.no_grad():
        direct = module.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
    # batched against alone: other shapes, fp32 reassociation
    torch.testing.assert_close(torch.tensor(row["embedding"]), direct, atol=1e-5, rtol=1e-4)


def test_an_unreadable_image_of_the_split_is_listed_and_its_captions_left_out(tmp_path: Path) -> None:
    root = generate_shapes_coco(tmp_path / "shapes", n_train=10, n_val=2, image_size=32)
    broken, kept = sorted((root / "val2017").iterdir())
    dm = _clip_data(root, tmp_path, split="val2017")
    module = _clip(dm.vocab_size)
    broken.write_bytes(broken.read_bytes()[:40])  # cut short after the vocabulary is trained
    meta = _predict(module, dm, tmp_path / "out")

    assert meta["unreadable"] == [str(broken)] and meta["skipped"] == 1
    annotations = json.loads((root / "annotations" / "captions_val2017.json").read_text())
    kept_id = next(i["id"] for i in annotations["images"] if i["file_name"] == kept.name)
    kept_captions = {str(a["id"]) for a in annotations["annotations"] if a["image_id"] == kept_id}
    table = pq.read_table(tmp_path / "out" / "embeddings.parquet").to_pylist()
    assert [r["id"] for r in table if r["kind"] == "image"] == [str(kept_id)]
    assert {r["id"] for r in table if r["kind"] == "caption"} == kept_captions


def test_a_folder_of_unreadable_images_gives_an_empty_table_and_lists_them(
    shapes: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n cut short")
    dm = _clip_data(shapes, tmp_path, images=str(folder))
    meta = _predict(_clip(dm.vocab_size), dm, tmp_path / "out")
    assert sorted(Path(p).name for p in meta["unreadable"]) == ["a.png", "b.png"] and meta["skipped"] == 2
    assert pq.read_table(tmp_path / "out" / "embeddings.parquet").num_rows == 0
