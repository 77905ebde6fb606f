"""ClassificationDataModule's ImageFolder choice: the generated quickstart classes, one class list across splits,
and one predict loader per split that is set."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from datamodules.image.classification_datamodule import ClassificationDataModule


def folder_dm(root: Path, **kwargs) -> ClassificationDataModule:
    return ClassificationDataModule(
        "imagefolder", str(root), images={"image_size": 32}, loader={"num_workers": 0}, **kwargs
    )


def test_generate_if_missing_writes_the_shape_classes_and_predict_reads_every_split_set(
    tmp_path: Path,
) -> None:
    root = tmp_path / "shapes"
    dm = folder_dm(root, train_split="train", generate_if_missing=True)
    assert dm.predict_roles == ["train", "test"]
    loaders = dm.predict_dataloader()  # reads (and so first writes) the train and test splits
    assert len(loaders) == 2 and (root / "val").is_dir()
    assert "red circle" in dm.class_names and dm.num_classes == len(list((root / "test").iterdir()))
    batch = next(iter(loaders[1]))
    assert batch["images"].shape[1:] == (3, 32, 32) and batch["skipped"] == 0
    with pytest.raises(
        FileNotFoundError, match=r"missing/test does not exist \(expected .*<class>/<image>\)"
    ):
        folder_dm(tmp_path / "missing").dataset("test")
    with pytest.raises(ValueError, match="generate_if_missing writes the synthetic ImageFolder set"):
        ClassificationDataModule("cifar10", str(root), generate_if_missing=True)


def test_splits_with_other_class_folders_are_refused_by_name(tmp_path: Path) -> None:
    for split, classes in (("train", ("cat", "dog")), ("test", ("cat", "fox"))):
        for name in classes:
            (tmp_path / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / split / name / "0.png")
    dm = folder_dm(tmp_path, train_split="train")
    assert dm.class_names == ["cat", "fox"]
    with pytest.raises(ValueError, match=r"train and .*test hold different class folders: \['cat', 'dog'\]"):
        dm.dataset("train")
