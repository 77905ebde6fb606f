"""Predictions to disk (lightning_modules/prediction.py): what the writer puts in its files, for every kind of
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
from lightning_modules.prediction import PredictionWriter
from tests.helpers import quiet_trainer

N_VAL = 6


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(tmp_path_factory.mktemp("shapes"), n_train=40, n_val=N_VAL, image_size=32)


def _clip_data(root: Path, tmp: Path, **predict) -> CocoCaptionsDataModule:
    return CocoCaptionsDataModule(
        str(root),
        image_size=32,
        eval_batch_size=4,
        num_workers=0,
        tokenizer_vocab_size=120,
        context_length=32,
        cache_dir=str(tmp / "cache"),
        **predict,
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
    dm = _clip_data(
        shapes, tmp_path, predict_split="val2017", predict_images=str(folder), predict_texts=str(texts)
    )
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
    assert {i for k, i in keys if k == "caption"} == caption_ids | {
        "1",
        "3",
    }  # line numbers, blank line left out
    emb = torch.tensor([r["embedding"] for r in table])
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(len(table)), atol=1e-5, rtol=0)

    # rows equal the model's own embeddings of the same inputs
    by_key = dict(zip(keys, emb))
    tokens = dm.tokenizer(["a blue square"], 32)
    with torch.no_grad():
        direct = module.encode_text(tokens["input_ids"], tokens["attention_mask"])[0]
    torch.testing.assert_close(by_key[("caption", "3")], direct, atol=1e-5, rtol=1e-4)
    split = dm.predict_dataloader()[0].dataset
    item = split[0]
    with torch.no_grad():
        direct_image = module.encode_image(item["image"][None])[0]
    torch.testing.assert_close(by_key[("image", item["image_key"])], direct_image, atol=1e-5, rtol=1e-4)

    assert meta["system"] == "ImageTextModule" and meta["output"] == "embeddings"
    assert meta["unreadable"] == [str(folder / "broken.jpg")] and meta["skipped"] == 1
    assert meta["counts"] == {"image": N_VAL + 3, "caption": len(caption_ids) + 2}
    assert not list((tmp_path / "out").glob("rank-*"))  # parts merged and removed


def test_writer_refuses_a_folder_of_other_files(shapes: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    dm = _clip_data(shapes, tmp_path, predict_texts=str(shapes / "annotations" / "captions_val2017.json"))
    with pytest.raises(FileExistsError, match="notes.txt"):
        _predict(_clip(dm.vocab_size), dm, out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_predict_without_inputs_is_one_clear_error(shapes: Path, tmp_path: Path) -> None:
    dm = _clip_data(shapes, tmp_path)
    with pytest.raises(ValueError, match="nothing to predict: set --data.predict_split"):
        _predict(_clip(dm.vocab_size), dm, tmp_path / "out")
