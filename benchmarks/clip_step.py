"""Training-step throughput of our image-text module against open_clip's `CLIP` + `ClipLoss`, side by side.

One full training step (both towers, symmetric InfoNCE, backward, AdamW) at the same configuration for both:

    image  ViT, 224 px, patch 32 (49 patches + class token), 4 layers, width 256, 4 heads, MLP 1024
    text   4 layers, width 256, 4 heads, MLP 1024, context 64, vocabulary 49408 (CLIP's BPE size)
    joint  embed_dim 256; batch 64 image-caption pairs; fp32; CPU; learnable temperature

Same pixels and COCO captions for both; open_clip's text Transformer runs on all 64 positions, ours on the
real tokens. `ratio: X` = our pairs/s / open_clip's (medians of alternating steps). Also timed: one DataLoader
worker's images/s, and with `--locked` the LiT step against the unlocked one.

    python benchmarks/clip_step.py [--steps 10] [--warmup 2] [--threads 1] [--skip-data] [--locked]"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.components.image_tower import ImageTowerConfig  # noqa: E402
from lightning_modules.components.text_tower import TextTowerConfig  # noqa: E402
from lightning_modules.image_text_module import ImageTextModule  # noqa: E402
from lightning_modules.training.optim import build_optimizer  # noqa: E402

IMAGE, PATCH, LAYERS, WIDTH, HEADS = 224, 32, 4, 256, 4
CONTEXT, VOCAB, EMBED, BATCH = 64, 49408, 256, 64
LR, WD, BETAS, EPS = 5e-4, 0.2, (0.9, 0.98), 1e-6
REAL_COCO = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "coco"


def captions(n: int) -> list[str]:
    """n real COCO captions (cycled) from the genuine sample, else synthetic shape captions."""
    ann = REAL_COCO / "annotations" / "captions_val2017.json"
    if ann.is_file():
        texts = [a["caption"] for a in json.loads(ann.read_text(encoding="utf-8"))["annotations"]]
    else:
        from datamodules.synthetic.shapes import generate_shapes_coco

        with tempfile.TemporaryDirectory() as tmp:
            root = generate_shapes_coco(Path(tmp) / "shapes", n_train=4, n_val=n // 5 + 1, image_size=16)
            data = json.loads((root / "annotations" / "captions_val2017.json").read_text(encoding="utf-8"))
            texts = [a["caption"] for a in data["annotations"]]
    return [texts[i % len(texts)] for i in range(n)]


def make_batch() -> dict[str, torch.Tensor]:
    import open_clip

    g = torch.Generator().manual_seed(0)
    clip_ids = open_clip.tokenize(captions(BATCH), context_length=CONTEXT)  # (B, 64), zero-padded
    mask = clip_ids != 0
    width = int(mask.sum(1).max())
    return {
        "images": torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),
        "clip_ids": clip_ids,
        # ours: the same ids, padded to the longest caption of the batch, as our collate function does
        "input_ids": clip_ids[:, :width].contiguous(),
        "attention_mask": mask[:, :width].contiguous(),
        "image_ids": torch.arange(BATCH),
        "caption_ids": torch.arange(BATCH),
        "skipped": 0,
    }


def build_ours(lock_image: bool = False) -> tuple[ImageTextModule, torch.optim.Optimizer]:
    module = ImageTextModule(
        vocab_size=VOCAB,
        embed_dim=EMBED,
        image=ImageTowerConfig(
            "vit_custom", IMAGE, patch_size=PATCH, layers=LAYERS, width=WIDTH, heads=HEADS, lock=lock_image
        ),
        text=TextTowerConfig("mini", layers=LAYERS, hidden=WIDTH, heads=HEADS, max_len=CONTEXT),
    ).train()
    opt = build_optimizer(module, LR, WD, BETAS, EPS, 0, 1000, "constant")["optimizer"]
    return module, opt


def build_theirs():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    vision = CLIPVisionCfg(
        layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE
    )
    text = CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=WIDTH, heads=HEADS, layers=LAYERS)
    model = open_clip.model.CLIP(EMBED, vision_cfg=vision, text_cfg=text).train()

    # as open_clip's training script: no weight decay on gains, biases and the logit scale; default AdamW
    def exclude(n: str, p: torch.Tensor) -> bool:
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS)
    return model, open_clip.loss.ClipLoss(), opt


def ours_step(module: ImageTextModule, opt: torch.optim.Optimizer, b: dict) -> float:
    loss = module.pair.loss(module.embed(b, "train"))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def theirs_step(model, loss_fn, opt: torch.optim.Optimizer, b: dict) -> float:
    image_features, text_features, logit_scale = model(b["images"], b["clip_ids"])
    loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.item()


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def interleaved_medians(runs: dict[str, Callable[[], object]], steps: int, warmup: int) -> dict[str, float]:
    """The median seconds per step of each run: `warmup` steps of each, then `steps` rounds that take one step of
    each, interleaved and alternating who goes first, so drift hits all alike."""
    for _ in range(warmup):
        for fn in runs.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    order = list(runs.items())
    for i in range(steps):
        for name, fn in order if i % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_models(steps: int, warmup: int) -> tuple[float, float]:
    torch.manual_seed(0)
    ours, opt_ours = build_ours()
    theirs, loss_fn, opt_theirs = build_theirs()
    b = make_batch()
    real = int(b["attention_mask"].sum())
    print(
        f"trainable parameters: ours {count(ours) / 1e6:.2f} M, open_clip {count(theirs) / 1e6:.2f} M; "
        f"caption tokens: {real} real of {BATCH} x {CONTEXT} = {BATCH * CONTEXT} "
        f"(ours pads to {b['input_ids'].shape[1]})"
    )
    runs = {
        "ours": functools.partial(ours_step, ours, opt_ours, b),
        "theirs": functools.partial(theirs_step, theirs, loss_fn, opt_theirs, b),
    }
    medians = interleaved_medians(runs, steps, warmup)
    m_ours, m_theirs = medians["ours"], medians["theirs"]
    print(f"ours:      {m_ours:.3f} s/step  {BATCH / m_ours:7.1f} pairs/s")
    print(f"open_clip: {m_theirs:.3f} s/step  {BATCH / m_theirs:7.1f} pairs/s")
    return m_ours, m_theirs


def bench_locked(steps: int, warmup: int) -> tuple[float, float]:
    """Our step with the image tower locked (LiT: no autograd through it, no gradients or AdamW state for it)
    against the same step unlocked, interleaved as above."""
    torch.manual_seed(0)
    runs = {}
    for name, lock in (("unlocked", False), ("locked", True)):
        module, opt = build_ours(lock_image=lock)
        runs[name] = functools.partial(ours_step, module, opt, make_batch())
    medians = interleaved_medians(runs, steps, warmup)
    unlocked, locked = medians["unlocked"], medians["locked"]
    print(f"ours, image tower unlocked: {unlocked:.3f} s/step")
    print(f"ours, image tower locked:   {locked:.3f} s/step (LiT)")
    return unlocked, locked


def _jpeg_root(tmp: Path) -> tuple[Path, str]:
    if (REAL_COCO / "annotations" / "captions_val2017.json").is_file():
        return REAL_COCO, "genuine COCO sample"
    from datamodules.synthetic.shapes import generate_shapes_coco

    return generate_shapes_coco(tmp / "shapes", n_train=4, n_val=20, image_size=512), "generated 512 px JPEGs"


def bench_dataloader(step_time: float) -> None:
    from torch.utils.data import DataLoader

    from datamodules.image.coco import (
        CaptionCollate,
        CocoCaptionsDataset,
        load_coco_captions,
        train_transform,
    )
    from datamodules.tokenizer import TextTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root, source = _jpeg_root(Path(tmp))
        records = load_coco_captions(root / "annotations" / "captions_val2017.json", root / "val2017")
        tokenizer = TextTokenizer.train([c for r in records for c in r.captions], vocab_size=500)
        repeats = max(1, 400 // len(records))  # a few hundred images, however small the sample
        dataset = CocoCaptionsDataset(records * repeats, train_transform(IMAGE), train=True)
        loader = DataLoader(
            dataset,
            batch_size=16,
            shuffle=True,
            num_workers=1,
            collate_fn=CaptionCollate(tokenizer, CONTEXT, IMAGE, train=True),
        )
        n, t0 = 0, None
        for batch in loader:
            if t0 is None:  # start the clock once the worker is up and has sent its first batch
                t0 = time.perf_counter()
                continue
            n += len(batch["image_ids"])
        rate = n / (time.perf_counter() - t0)
    need = BATCH / step_time / rate
    print(
        f"dataloader: {rate:.1f} images/s decoded + augmented by ONE worker ({source}, {IMAGE} px crops); "
        f"the model trains {BATCH / step_time:.1f} pairs/s, so it needs {math.ceil(need)} such worker(s)"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    # One thread by default: on a shared, oversubscribed CPU, OpenMP threads that wait on each other while other
    # processes hold the cores make multi-threaded timings swing by several times from run to run.
    p.add_argument("--threads", type=int, default=1, help="torch threads; 0 keeps torch's default")
    p.add_argument("--skip-data", action="store_true")
    p.add_argument(
        "--locked",
        action="store_true",
        help="instead: our step with a locked image tower (LiT) against unlocked; ratio = unlocked / locked time",
    )
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; ViT {IMAGE}px/{PATCH} {LAYERS}x{WIDTH}, "
        f"text {LAYERS}x{WIDTH} context {CONTEXT}, vocab {VOCAB}, embed {EMBED}, batch {BATCH}, fp32"
    )
    if a.locked:
        unlocked, locked = bench_locked(a.steps, a.warmup)
        print(f"ratio: {unlocked / locked:.2f}")
        return
    m_ours, m_theirs = bench_models(a.steps, a.warmup)
    if not a.skip_data:
        bench_dataloader(m_ours)
    print(f"ratio: {m_theirs / m_ours:.2f}")


if __name__ == "__main__":
    main()
