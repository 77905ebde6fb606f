"""Training throughput and model FLOPs utilisation (MFU) on one GPU: BERT-Base MLM+NSP and CLIP ViT-B/16.

Each model trains on random data of its real shape (BERT: seq 128, 15% of tokens masked, NSP pairs; CLIP:
224 px images, 77-token captions) with the framework's own modules, optimiser (fused AdamW) and bf16 autocast,
so what is timed is the model, not a data pipeline. The FLOPs of one training step (forward + backward) are
counted by `torch.utils.flop_counter.FlopCounterMode` on the step as run (MLM head on masked positions only,
unpadding, attention), not from a formula; MFU = counted FLOPs x steps/s / the GPU's dense bf16 peak.

    python benchmarks/gpu_throughput.py                       # both models, defaults for an 80-141 GB GPU
    python benchmarks/gpu_throughput.py --model bert --batch 256 --compile
    python benchmarks/gpu_throughput.py --device cpu --model bert --size tiny --batch 4 --steps 2   # smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.components.image_tower import ImageTowerConfig  # noqa: E402
from lightning_modules.components.text_tower import TextTowerConfig  # noqa: E402
from lightning_modules.image_text_module import ImageTextModule  # noqa: E402
from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule  # noqa: E402
from lightning_modules.optim import build_optimizer  # noqa: E402

# dense bf16 tensor-core peaks (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0}
PEAK_TFLOPS |= {"A100": 312.0, "L40S": 362.0, "A10G": 70.0, "L4": 121.0, "V100": 125.0}


def peak_flops(device: torch.device, override: float | None) -> float | None:
    if override:
        return override * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def bert_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], None], int, str, list[torch.nn.Module]]:
    module = MLMPretrainingModule(
        size=args.size, vocab_size=30522, max_position_embeddings=512, compile=args.compile
    )
    model = module.model.to(device).train()
    opt = build_optimizer(model, 1e-4, 0.01, (0.9, 0.999), 1e-6, 0, 1000, "constant")["optimizer"]
    g = torch.Generator().manual_seed(0)
    b, n = args.batch, args.seq
    ids = torch.randint(5, 30522, (b, n), generator=g)
    chosen = torch.rand(b, n, generator=g) < 0.15
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(b, n, dtype=torch.long),
        "token_type_ids": (torch.arange(n) >= n // 2).long().expand(b, n).contiguous(),
        "labels": torch.where(chosen, ids, IGNORE_INDEX),
        "nsp_labels": torch.randint(0, 2, (b,), generator=g),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    module.to(device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = module.model_step(batch, "train")
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, b * n, f"BERT-{args.size} MLM+NSP, seq {n}, batch {b}", [module.model]


def clip_step(
    args: argparse.Namespace, device: torch.device
) -> tuple[Callable[[], None], int, str, list[torch.nn.Module]]:
    module = ImageTextModule(
        embed_dim=512, image=ImageTowerConfig("vit_b_16", 224), text=TextTowerConfig("base")
    ).to(device)
    module.train()
    opt = build_optimizer(module, 5e-4, 0.2, (0.9, 0.98), 1e-6, 0, 1000, "constant")["optimizer"]
    g = torch.Generator().manual_seed(0)
    b = args.clip_batch
    lengths = torch.randint(8, 30, (b,), generator=g)
    mask = (torch.arange(77)[None, :] < lengths[:, None]).long()
    batch = {
        "images": torch.randn(b, 3, 224, 224, generator=g),
        "input_ids": torch.randint(5, 30522, (b, 77), generator=g) * mask,
        "attention_mask": mask,
        "image_ids": torch.arange(b),
        "caption_ids": torch.arange(b),
    }
    batch = {k: v.to(device) for k, v in batch.items()}

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = module.pair.loss(module.embed(batch, "train"))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return (
        step,
        b,
        f"CLIP ViT-B/16 + BERT-base text, 224 px, 77 tokens, batch {b}",
        [module.pair.image, module.pair.text],
    )


def measure(step: Callable[[], None], device: torch.device, warmup: int, steps: int) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def count_flops(step: Callable[[], None]) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=["bert", "clip", "both"], default="both")
    p.add_argument("--size", default="base", help="BERT preset")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=256, help="BERT sequences per step")
    p.add_argument("--clip-batch", type=int, default=256, help="CLIP image-caption pairs per step")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--compile", action="store_true", help="torch.compile the models")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    args = p.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"device: {name}; bf16 autocast: {args.bf16}; compile: {args.compile}; peak: {peak and peak / 1e12} TFLOP/s"
    )
    builders = {"bert": bert_step, "clip": clip_step}
    chosen = ["bert", "clip"] if args.model == "both" else [args.model]
    for key in chosen:
        step, units, title, modules = builders[key](args, device)
        flops = count_flops(step)  # on the eager step: the counter does not see inside compiled graphs
        if args.compile:
            for m in modules:
                m.compile()  # in place, as the training modules' own compile option does
        seconds = measure(step, device, args.warmup, args.steps)
        unit = "tokens" if key == "bert" else "pairs"
        line = f"{title}: {seconds * 1e3:.1f} ms/step, {units / seconds:,.0f} {unit}/s, "
        line += f"{flops / 1e9:,.1f} GFLOP/step, {flops / seconds / 1e12:.2f} TFLOP/s"
        if peak:
            line += f", MFU {flops / seconds / peak:.1%}"
        print(line, flush=True)
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
