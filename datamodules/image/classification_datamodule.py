"""Labelled image sets for zero-shot evaluation and linear probes, one `dataset` choice each: any ImageFolder
(root/<split>/<class>/<image>, class names from the folders), ImageNet-1k or CIFAR-10/100 in their distributed
layouts (readers: classification_sets.py). Every split gets the evaluation transform of the image-text DataModule,
so a model sees what it saw in validation; batches are {images (B, 3, S, S) uint8, labels (B,), indices (B,) into
the split, skipped: undecodable images dropped}, and `protocol(role)` describes what was read (set, split, counts,
file fingerprints) for results.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from datamodules.image.classification_sets import (
    CifarDataset,
    ImageFolderDataset,
    ImageNetDataset,
    LabelledImageCollate,
    file_sha256,
    listing_sha256,
)
from datamodules.image.coco import eval_transform
from datamodules.sections import ImagesConfig, LoaderConfig, as_section, plain_sections
from datamodules.synthetic.shapes_folder import generate_shapes_imagefolder

ClassificationSet = Literal["imagefolder", "imagenet", "cifar10", "cifar100"]
# defaults of the sections (each DataModule works on copies of its own)
_IMAGES = ImagesConfig()
_LOADER = LoaderConfig(batch_size=256)


class ClassificationDataModule(LightningDataModule):
    """One classification set's splits, evaluation-transformed (see the module doc)."""

    def __init__(
        self,
        dataset: ClassificationSet = "imagefolder",
        root: str = "data/imagefolder",
        test_split: str = "test",
        train_split: str | None = None,
        val_split: str | None = None,
        labels_file: str | None = None,
        images: ImagesConfig = _IMAGES,
        loader: LoaderConfig = _LOADER,
        generate_if_missing: bool = False,
    ) -> None:
        """
        Args:
            dataset: imagefolder (root/<split>/<class>/<image>), imagenet (wnid folders, or a flat folder with
                `labels_file`) or cifar10 / cifar100 (torchvision's pickled batches under root).
            root: the dataset folder.
            test_split: the split evaluated: a sub-folder of root (an ImageFolder's test, ImageNet's val; "." is
                root itself, root/<class>/<image>), or CIFAR's test.
            train_split: the split linear probes train on (an ImageFolder's or CIFAR's train); None for none.
            val_split: the split linear probes choose their weight decay on, and `validate` reads; None for none.
            labels_file: labels of a flat ImageNet folder: LOC_val_solution.csv, or `<file> <wnid or index>` lines.
            images: the centre crop's side (the image tower's image_size), the reference pipeline images are
                resized and cropped with (tensor: Hugging Face CLIP, pil: open_clip, torchvision: its
                ImageClassification preset; see datamodules/image/coco.py) and the normalisation (None: the image
                tower's; batches are uint8 and the tower normalises). The training crop scale is unused here.
            loader: batch sizes and workers (loader.eval_batch_size, or batch_size, per batch of every split; the
                loaders are not shuffled).
            generate_if_missing: write the synthetic coloured-shapes classes (train / val / test) into root when
                it does not exist (quickstart; imagefolder only).
        """
        super().__init__()
        if dataset not in get_args(ClassificationSet):
            raise ValueError(f"data.dataset {dataset!r}: one of {', '.join(get_args(ClassificationSet))}")
        if generate_if_missing and dataset != "imagefolder":
            raise ValueError(
                f"data.generate_if_missing writes the synthetic ImageFolder set: not for data.dataset {dataset}"
            )
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
        self.generate_if_missing = generate_if_missing
        self.datasets: dict[str, Dataset] = {}
        self.skipped_images = 0  # undecodable images met in batches on this process (counted from `skipped`)

    def prepare_data(self) -> None:
        if self.generate_if_missing and not self.root.exists():
            generate_shapes_imagefolder(self.root, image_size=self.image_size)

    def dataset(self, role: str) -> Dataset:
        """The dataset of "train", "val" or "test", read on first use; every split must hold the same classes."""
        if role not in self.datasets:
            split = self.splits[role]
            if split is None:
                raise ValueError(f"data.{role}_split is not set: no {role} images")
            if self.name in ("cifar10", "cifar100"):
                dataset: Dataset = CifarDataset(self.root, self.name, split, self.transform)
            elif self.name == "imagenet":
                labels = self.labels_file if role == "test" else None
                dataset = ImageNetDataset(self.root / split, self.transform, labels)
            else:
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
        """Class names in label order, those the zero-shot prompts are made from."""
        return list(self.dataset("test").class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def vocab_size(self) -> None:
        """None: no text here. The CLI links every DataModule's `vocab_size` to its model; a zero-shot model's
        vocabulary comes with its checkpoint."""
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
        else:
            out["images_listing_sha256"] = listing_sha256(ds.root, [p for p, _ in ds.samples])
            if isinstance(ds, ImageNetDataset) and ds.labels_file is not None:
                out["files_sha256"] = {ds.labels_file.name: file_sha256(ds.labels_file)}
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
        """An unshuffled loader of one split, in file order: the probes embed every image once. Its workers end
        with each pass (no persistent workers): an evaluation loader idle between runs would hold shared memory."""
        cfg = self.loader_config
        return DataLoader(
            self.dataset(role),
            batch_size=cfg.eval_size,
            num_workers=cfg.num_workers,
            persistent_workers=False,
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
