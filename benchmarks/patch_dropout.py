"""Training-step time of the image-text system with patch dropout (FLIP, `model.image.patch_dropout: 0.5`)
against the same system without it (0.0), side by side.

Two `ImageTextModule`s with the same weights and batch, differing only in `patch_dropout`, run full training
steps interleaved after warm-up; `ratio: X` = median step time at 0.0 / at 0.5 (> 1: patch dropout is
cheaper). The default is a CPU size (ViT 64 px, patch 8, 4 layers, width 128, batch 32, one thread); `--vit-b`
uses ViT-B/16 at 224 px, the size FLIP reports on, in bf16 autocast with `--device cuda`.

    python benchmarks/patch_dropout.py [--steps 10] [--warmup 2] [--threads 1]
    python benchmarks/patch_dropout.py --vit-b --device cuda [--batch 128]"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.clip_step import interleaved_medians  # noqa: E402
from lightning_modules.components.image_tower import ImageTowerConfig  # noqa: E402
from lightning_modules.components.text_tower import TextTowerConfig  # noqa: E402
from lightning_modules.image_text_module import ImageTextModule  # noqa: E402
from lightning_modules.training.optim import build_optimizer  # noqa: E402

VOCAB, CONTEXT, EMBED = 1000, 32, 256


def image_config(vit_b: bool, p: float) -> ImageTowerConfig:
    if vit_b:
        return ImageTowerConfig("vit_b_16", 224, patch_dropout=p)
    return ImageTowerConfig("vit_tiny", 64, patch_size=8, layers=4, width=128, heads=4, patch_dropout=p)


def build(vit_b: bool, p: float, device: torch.device) -> tuple[ImageTextModule, torch.optim.Optimizer]:
    torch.manual_seed(0)  # the same weights at every p
    text = TextTowerConfig("mini", layers=2, hidden=256, heads=4, max_len=CONTEXT)
    module = ImageTextModule(image_config(vit_b, p), text, vocab_size=VOCAB, embed_dim=EMBED)
    module = module.to(device).train()
    opt = build_optimizer(module, 5e-4, 0.2, (0.9, 0.98), 1e-6, 0, 1000, "constant")["optimizer"]
    return module, opt


def make_batch(batch: int, size: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, CONTEXT + 1, (batch,), generator=g)
    return {
        "images": torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g).to(device),
        "input_ids": torch.randint(5, VOCAB, (batch, CONTEXT), generator=g).to(device),
        "attention_mask": (torch.arange(CONTEXT)[None, :] < lengths[:, None]).to(device),
        "image_ids": torch.arange(batch, device=device),
        "caption_ids": torch.arange(batch, device=device),
        "skipped": 0,
    }


def step(module: ImageTextModule, opt: torch.optim.Optimizer, batch: dict, device: torch.device) -> None:
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    )
    with autocast:
        loss = module.pair.loss(module.embed(batch, "train"))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads on CPU; 0 keeps torch's default")
    ap.add_argument("--vit-b", action="store_true", help="ViT-B/16 at 224 px instead of the CPU size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (32 on CPU, 128 on a GPU)")
    ap.add_argument("--p", type=float, default=0.5, help="the patch dropout compared with 0.0")
    a = ap.parse_args()
    device = torch.device(a.device)
    if a.threads and device.type == "cpu":
        torch.set_num_threads(a.threads)
    batch_size = a.batch or (128 if device.type == "cuda" else 32)
    size = 224 if a.vit_b else 64
    batch = make_batch(batch_size, size, device)
    runs = {}
    for p in (0.0, a.p):
        module, opt = build(a.vit_b, p, device)
        runs[p] = functools.partial(step, module, opt, batch, device)
    patches = (size // image_config(a.vit_b, 0.0).vit.patch_size) ** 2
    kept = round((1 - a.p) * patches)
    where = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU, {torch.get_num_threads()} threads"
    )
    print(
        f"{'ViT-B/16' if a.vit_b else 'ViT 64 px'}: {patches} patches, {kept} kept at {a.p}; batch {batch_size}; {where}"
    )
    medians = interleaved_medians(runs, a.steps, a.warmup)
    for p, seconds in medians.items():
        print(f"patch_dropout {p}: {seconds:.3f} s/step  {batch_size / seconds:8.1f} pairs/s")
    print(f"ratio: {medians[0.0] / medians[a.p]:.2f}")


if __name__ == "__main__":
    main()
