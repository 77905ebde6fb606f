"""Image classification sets for zero-shot evaluation and linear probes: ImageNet-1k, CIFAR-10/100 and any
ImageFolder, in their distributed layouts (readers: classification_sets.py, imagefolder_datamodule.py).

Images get the evaluation transform of the image-text DataModule (shorter side to `image_size`, centre crop, in
the `resize` mode of the model's source); batches are {images (B, 3, S, S) uint8, labels (B,), indices (B,) into
the split, skipped}. `protocol(role)` describes what was evaluated (set, split, counts, file fingerprints) for
results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.image.classification_sets import CifarDataset, ImageNetDataset, file_sha256, listing_sha256
from datamodules.image.coco import eval_transform
from datamodules.image.imagefolder_datamodule import ImageFolderDataset, LabelledImageCollate
from datamodules.sections import ImagesConfig, LoaderConfig, as_section, plain_sections

ClassificationSet = Literal["imagenet", "cifar10", "cifar100", "imagefolder"]
_IMAGES = ImagesConfig()
_LOADER = LoaderConfig(batch_size=256)


class ClassificationDataModule(LightningDataModule):
    """One classification set's splits, evaluation-transformed (see the module doc)."""

    def __init__(
        self,
        dataset: ClassificationSet = "imagefolder",
        root: str = "data/imagenet",
        test_split: str = "val",
        train_split: str | None = None,
        val_split: str | None = None,
        labels_file: str | None = None,
        images: ImagesConfig = _IMAGES,
        loader: LoaderConfig = _LOADER,
    ) -> None:
        """
        Args:
            dataset: imagenet (wnid folders, or a flat folder with `labels_file`), cifar10 / cifar100
                (torchvision's pickled batches under root) or imagefolder (root/<split>/<class>/<image>).
            root: the dataset folder.
            test_split: the split evaluated: a sub-folder of root (ImageNet's val, an ImageFolder's test; "." is
                root itself), or CIFAR's test.
            train_split: the split linear probes train on (ImageNet's train, CIFAR's train); None for none.
            val_split: the split linear probes choose their weight decay on; None for none.
            labels_file: labels of a flat ImageNet folder: LOC_val_solution.csv, or `<file> <wnid or index>` lines.
            images: the centre crop's side (the image tower's image_size), the reference pipeline images are
                resized and cropped with (tensor: Hugging Face CLIP, pil: open_clip, torchvision: its
                ImageClassification preset; see datamodules/image/coco.py) and the normalisation (None: the image
                tower's; batches are uint8 and the tower normalises). The training crop scale is unused here.
            loader: batch sizes and workers (loader.eval_batch_size, or batch_size, per evaluation batch).
        """
        super().__init__()
        self.save_hyperparameters()
        plain_sections(self.hparams)
        self.name = dataset
        self.root = Path(root)
        self.splits = {"train": train_split, "val": val_split, "test": test_split}
        self.labels_file = labels_file
        self.images = as_section(ImagesConfig, images)
        self.image_size, self.resize = self.images.image_size, self.images.resize
        self.transform = eval_transform(self.image_size, self.resize)
        self.loader_config = as_section(LoaderConfig, loader)
        self.datasets: dict[str, Dataset] = {}
        self.skipped_images = 0  # undecodable images met in batches on this process

    def dataset(self, role: str) -> Dataset:
        """The dataset of "train", "val" or "test", read on first use."""
        if role not in self.datasets:
            split = self.splits[role]
            if split is None:
                raise ValueError(f"data.{role}_split is not set: no {role} images")
            if self.name in ("cifar10", "cifar100"):
                dataset: Dataset = CifarDataset(self.root, self.name, split, self.transform)
            elif self.name == "imagenet":
                labels = self.labels_file if role == "test" else None
                dataset = ImageNetDataset(self.root / split, self.transform, labels)
            elif self.name == "imagefolder":
                dataset = ImageFolderDataset(self.root / split, self.transform)
            else:
                raise ValueError(f"data.dataset {self.name!r}: imagenet, cifar10, cifar100 or imagefolder")
            self.datasets[role] = dataset
        return self.datasets[role]

    @property
    def class_names(self) -> list[str]:
        """Class names in label order, those the zero-shot prompts are made from."""
        return list(self.dataset("test").class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> None:
        """None: no text here (the CLI links every DataModule's `vocab_size` to its model)."""
        return None

    def protocol(self, role: str = "test") -> dict[str, Any]:
        """What the evaluation read: set, split, counts and fingerprints of its files."""
        ds = self.dataset(role)
        out: dict[str, Any] = {
            "dataset": self.name,
            "split": self.splits[role],
            "root": str(self.root),
            "images": len(ds),
            "classes": len(ds.class_names),
        }
        if isinstance(ds, CifarDataset):
            out["files_sha256"] = {p.name: file_sha256(p) for p in ds.files()}
        elif isinstance(ds, ImageNetDataset):
            images = [p for p, _ in ds.samples]
            out["images_listing_sha256"] = listing_sha256(ds.root, images)
            if ds.labels_file is not None:
                out["files_sha256"] = {ds.labels_file.name: file_sha256(ds.labels_file)}
        else:
            images = [Path(p) for p, _ in ds.samples]
            out["images_listing_sha256"] = listing_sha256(ds.root, images)
        return out

    def setup(self, stage: str | None = None) -> None:
        roles = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": self.predict_roles,
        }
        for role in roles.get(stage or "", ()):
            self.dataset(role)

    def loader(self, role: str) -> DataLoader:
        """An unshuffled loader of one split, in file order."""
        cfg = self.loader_config
        return DataLoader(
            self.dataset(role),
            batch_size=cfg.eval_size,
            num_workers=cfg.num_workers,
            pin_memory=cfg.pin,
            collate_fn=LabelledImageCollate(self.image_size),
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader("train")

    def val_dataloader(self) -> DataLoader:
        return self.loader("val")

    def test_dataloader(self) -> DataLoader:
        return self.loader("test")

    @property
    def predict_roles(self) -> list[str]:
        """The splits `predict` embeds, one loader each: every one that is set (features for linear probes)."""
        return [role for role in ("train", "val", "test") if self.splits[role] is not None]

    def predict_dataloader(self) -> list[DataLoader]:
        return [self.loader(role) for role in self.predict_roles]

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        self.skipped_images += int(batch["skipped"])
        return batch
