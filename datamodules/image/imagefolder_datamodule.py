"""Image classification sets in ImageFolder layout, for zero-shot evaluation and linear probes.

    root/<split>/<class>/<image>        e.g. root/test/red_circle/00001.jpg; a split of "." is root itself

Class ids follow the sorted folder names (torchvision's rule); class names are the folder names with `_` read as
a space ("red_circle" -> "red circle"), which is what zero-shot prompts are made from. Images get the evaluation
transform of the image-text DataModule (resize and centre crop of the `resize` mode), so a model sees what it saw
in validation.

Batches: images (B, 3, H, W) uint8 (the image tower scales and normalises them on the device), labels (B,) long,
skipped: int = images of this batch that failed to decode.
A file that cannot be decoded never ends a run: it is warned about once, dropped and counted, as in the COCO
DataModule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from datamodules.image.coco import eval_transform, read_rgb
from datamodules.sections import ImagesConfig, LoaderConfig, as_section, plain_sections
from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder

log = logging.getLogger(__name__)


def class_name(folder: str) -> str:
    """The readable class name of a class folder: underscores are spaces."""
    return " ".join(folder.replace("_", " ").split())


class ImageFolderDataset(Dataset):
    """root/<class>/<image> files with integer labels. An undecodable image gives None (warned once per file and
    process); `LabelledImageCollate` drops it and counts it."""

    def __init__(self, root: str | Path, transform: Callable[[Tensor], Tensor]) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist (expected {self.root}/<class>/<image>)"
            )
        self.folders, class_to_idx = find_classes(self.root)
        self.samples: list[tuple[str, int]] = make_dataset(self.root, class_to_idx, extensions=IMG_EXTENSIONS)
        self.transform = transform
        self._warned: set[str] = set()

    @property
    def class_names(self) -> list[str]:
        return [class_name(f) for f in self.folders]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        path, label = self.samples[index]
        try:
            pixels = read_rgb(path)
        except Exception as err:  # any failure of one file, whatever library raised it, must not end the run
            if path not in self._warned:
                self._warned.add(path)
                log.warning("skipping unreadable image %s: %s", path, err)
            return None
        return {"image": self.transform(pixels), "label": label, "index": index}


class LabelledImageCollate:
    """Drops undecodable items and stacks the rest; `skipped` counts the dropped."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, items: list[dict[str, Any] | None]) -> dict[str, Tensor | int]:
        kept = [item for item in items if item is not None]
        images = (
            torch.stack([item["image"] for item in kept])
            if kept
            else torch.empty(0, 3, self.image_size, self.image_size, dtype=torch.uint8)
        )
        return {
            "images": images,
            "labels": torch.tensor([item["label"] for item in kept], dtype=torch.long),
            "indices": torch.tensor([item["index"] for item in kept], dtype=torch.long),
            "skipped": len(items) - len(kept),
        }


# defaults of the sections (each DataModule works on copies of its own)
_IMAGES = ImagesConfig()
_LOADER = LoaderConfig(batch_size=256)


class ImageFolderDataModule(LightningDataModule):
    """Labelled images in ImageFolder layout, evaluation-transformed, for zero-shot tests and probes."""

    def __init__(
        self,
        root: str = "data/imagefolder",
        train_split: str | None = "train",
        val_split: str | None = "val",
        test_split: str = "test",
        images: ImagesConfig = _IMAGES,
        loader: LoaderConfig = _LOADER,
        generate_if_missing: bool = False,
    ) -> None:
        """
        Args:
            root: dataset folder: root/<split>/<class>/<image>.
            train_split: sub-folder of root with the training images (linear probes); None for none.
            val_split: sub-folder of root with the validation images (probe regularisation); None for none.
            test_split: sub-folder of root with the test images; "." is root itself (root/<class>/<image>).
            images: the centre crop's size (the image-text model's image_size), the normalisation (None: the image
                tower's) and the resize mode; every split gets the evaluation transform (`min_scale` is not used).
            loader: images per batch (`batch_size`; the loaders are not shuffled) and DataLoader workers.
            generate_if_missing: write the synthetic coloured-shapes classes (train / val / test) into root when
                it does not exist (quickstart).
        """
        super().__init__()
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.images = as_section(ImagesConfig, images)
        self.loader_config = as_section(LoaderConfig, loader)
        self.image_size = self.images.image_size
        self.transform = eval_transform(self.image_size, self.images.resize)
        self.batch_size = self.loader_config.batch_size
        self.num_workers = self.loader_config.num_workers
        self.generate_if_missing = generate_if_missing
        self.datasets: dict[str, ImageFolderDataset] = {}
        self.skipped_images = 0  # undecodable images met in batches on this process (counted from `skipped`)

    def prepare_data(self) -> None:
        if self.generate_if_missing and not self.root.exists():
            generate_shapes_imagefolder(self.root, image_size=self.image_size)

    def dataset(self, role: str) -> ImageFolderDataset:
        """The dataset of "train", "val" or "test", read on first use."""
        if role not in self.datasets:
            split = self.splits[role]
            if split is None:
                raise ValueError(f"data.{role}_split is not set: no {role} images")
            self.prepare_data()
            dataset = ImageFolderDataset(self.root / split, self.transform)
            for other in self.datasets.values():
                if other.folders != dataset.folders:
                    raise ValueError(
                        f"{dataset.root} and {other.root} hold different class folders: "
                        f"{dataset.folders} vs {other.folders}"
                    )
            self.datasets[role] = dataset
        return self.datasets[role]

    @property
    def class_names(self) -> list[str]:
        """Readable class names in label order ("red circle", ...), from the test split's folders."""
        return self.dataset("test").class_names

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> None:
        """None: no text here. The CLI links every DataModule's `vocab_size` to its model; a zero-shot model's
        vocabulary comes with its checkpoint."""
        return None

    def setup(self, stage: str | None = None) -> None:
        roles = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for role in roles.get(stage or "", ()):
            self.dataset(role)

    def loader(self, role: str) -> DataLoader:
        """An unshuffled loader of one split: the probes embed every image once, in file order. Its workers end
        with each pass (no persistent workers): an evaluation loader idle between runs would hold shared memory."""
        return DataLoader(
            self.dataset(role),
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=False,
            pin_memory=self.loader_config.pin,
            collate_fn=LabelledImageCollate(self.image_size),
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self.loader("test")

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        self.skipped_images += int(batch["skipped"])
        return batch
