"""Image-text retrieval of a model as it is, without training: COCO 5k and Flickr30k 1k (Karpathy test splits,
every caption), scored by the project's one retrieval metric (components/retrieval.py) with CLIP_benchmark's
definitions: a query is a hit at K when any of its matches ranks among its K most similar items.

    python cli.py test --config configs/eval/coco_retrieval.yaml --data.root /data/coco \\
        --data.karpathy_json /data/coco/dataset_coco.json --model.init_args.init_clip.path ViT-B-32-openai.pt

The model is a checkpoint of this framework (`ckpt_path`; give the DataModule its tokenizer with
`--data.tokenizer.path <the same checkpoint>`) or a whole CLIP (`init_clip`; the DataModule's tokenizer is CLIP's,
`open_clip:NAME` or the Hugging Face folder). Logs `test/i2t_R@K` (image -> text), `test/t2i_R@K`, `test/R@mean`.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch

from lightning_modules.components.contrastive import as_config
from lightning_modules.components.retrieval import mean_recall
from lightning_modules.components.towers import TowerInit
from lightning_modules.image_text_module import ImageTextPair, image_text_from_checkpoint
from lightning_modules.zero_shot import load_clip_start


class RetrievalEvaluator(L.LightningModule):
    """A frozen image-text model's retrieval Recall@K in both directions; test or validate only."""

    def __init__(
        self,
        ckpt_path: str | None = None,
        init_clip: TowerInit | None = None,
        ks: list[int] | None = None,
        vocab_size: int | None = None,
    ) -> None:
        """
        Args:
            ckpt_path: an `ImageTextModule` checkpoint.
            init_clip: instead, a whole CLIP as published: {source: open_clip, name: ViT-B-32, path: FILE} or
                {source: hf, path: DIR}.
            ks: the cut-offs K (CLIP's tables: 1, 5, 10).
            vocab_size: the DataModule tokenizer's vocabulary (linked by the CLI): must be the model's.
        """
        super().__init__()
        self.save_hyperparameters()
        if bool(ckpt_path) == bool(init_clip):
            raise ValueError(
                "give the model to evaluate as model.init_args.ckpt_path or init_clip, one of them"
            )
        self.source: dict[str, Any]
        if ckpt_path:
            pair, ckpt = image_text_from_checkpoint(ckpt_path, "retrieval")
            model_vocab = ckpt["hyper_parameters"]["vocab_size"]
            self.source = {"kind": "checkpoint", "path": str(ckpt_path)}
        else:
            init = as_config(TowerInit, init_clip)
            pair, tokenizer, _, preprocess = load_clip_start(init)
            model_vocab = tokenizer.vocab_size
            self.source = {"kind": init.source, "name": init.name, "path": str(init.path), **preprocess}
        if vocab_size is not None and vocab_size != model_vocab:
            raise ValueError(
                f"the DataModule's tokenizer has {vocab_size} tokens but the model's {model_vocab}: give data.tokenizer "
                "the model's (the checkpoint itself, or open_clip:NAME / the CLIP folder)"
            )
        self.pair: ImageTextPair = pair.eval().requires_grad_(False)
        if ks:
            for metric in self.pair.retrieval.values():
                metric.ks = tuple(ks)

    def train(self, mode: bool = True) -> RetrievalEvaluator:
        super().train(mode)
        self.pair.eval()  # frozen
        return self

    def protocol(self) -> dict[str, Any]:
        from lightning_modules.zero_shot import path_sha256

        source = dict(self.source)
        if source.get("path"):
            source["sha256"] = path_sha256(source["path"])
        tower = self.pair.image
        return {
            "model": source,
            "normalisation": {
                "mean": [round(float(v), 8) for v in tower.pixel_mean.flatten()],
                "std": [round(float(v), 8) for v in tower.pixel_std.flatten()],
            },
            "ks": list(self.pair.retrieval["test"].ks),
        }

    def _step(self, batch: dict, stage: str) -> None:
        with torch.no_grad():
            self.pair.evaluate(batch, stage)

    def _end(self, stage: str) -> None:
        metric = self.pair.retrieval[stage]
        recalls = metric.compute()
        counts = metric.counts()
        self.counted = {"images": counts["a"], "captions": counts["b"]}
        self.log_dict(
            {**{f"{stage}/{k}": v for k, v in recalls.items()}, f"{stage}/R@mean": mean_recall(recalls)}
        )
        metric.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._end("test")

    def configure_optimizers(self) -> None:
        return None  # nothing is trained
