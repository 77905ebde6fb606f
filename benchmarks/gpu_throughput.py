"""Training throughput and MFU on one GPU, ours beside the reference implementations, in one process.

BERT-Base MLM+NSP (seq 128) against `transformers.BertForPreTraining`, and CLIP ViT-B/16 against open_clip's
ViT-B-16 with our text tower in its shape; each eager and compiled, on random data of the real shapes, the two
sides timed in alternating rounds after warm-up. Each line ends in `ratio:` (ours / theirs, > 1 = ours faster)
and says what work each side skips. FLOPs are counted by `FlopCounterMode` on the step as run; MFU = FLOPs x
steps/s / the GPU's dense bf16 peak. `--smoke` runs tiny models on CPU so the script does not rot. See
`docs/performance.md`.

    python benchmarks/gpu_throughput.py                       # both models, defaults for an 80-141 GB GPU
    python benchmarks/gpu_throughput.py --model bert --batch 256 --compile
    python benchmarks/gpu_throughput.py --smoke                # tiny sizes on CPU, seconds"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamodules.masking import sparse_layout  # noqa: E402
from lightning_modules.components.hf_interop import config_to_hf  # noqa: E402
from lightning_modules.components.image_tower import ImageTowerConfig  # noqa: E402
from lightning_modules.components.text_tower import TextTowerConfig  # noqa: E402
from lightning_modules.image_text_module import ImageTextModule  # noqa: E402
from lightning_modules.mlm_module import IGNORE_INDEX, MLMPretrainingModule  # noqa: E402
from lightning_modules.training.throughput import peak_tflops_of  # noqa: E402

Step = Callable[[], None]


def peak_flops(device: torch.device, override: float | None) -> float | None:
    tflops = override or peak_tflops_of(device)
    return tflops * 1e12 if tflops else None


def bert_batch(args: argparse.Namespace, device: torch.device, vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    b, n = args.batch, args.seq
    ids = torch.randint(5, vocab, (b, n), generator=g)
    chosen = torch.rand(b, n, generator=g) < 0.15
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones(b, n, dtype=torch.long),
        "token_type_ids": (torch.arange(n) >= n // 2).long().expand(b, n).contiguous(),
        "labels": torch.where(chosen, ids, IGNORE_INDEX),
        "nsp_labels": torch.randint(0, 2, (b,), generator=g),
    }
    # the host-side layout MLMCollator adds, so the step reads no shape from the device, as in training
    batch.update(sparse_layout(batch["attention_mask"].bool().numpy(), batch["labels"].numpy()))
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(device: torch.device, bf16: bool, params, loss_of: Callable[[], torch.Tensor]) -> Step:
    opt = torch.optim.AdamW(list(params), lr=1e-4, fused=device.type in ("cuda", "cpu"))

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def bert_pair(args: argparse.Namespace, device: torch.device, compiled: bool) -> tuple[Step, Step, str]:
    """Ours (the framework's MLM system) and transformers' BertForPreTraining of the same shape, same batch."""
    from transformers import BertConfig as HFConfig
    from transformers import BertForPreTraining as HFBert

    ours = MLMPretrainingModule(
        vocab_size=30522, max_position_embeddings=512, encoder={"size": args.size, "dropout": 0.1}
    )
    ours.to(device).train()
    cfg = ours.model.cfg
    # the export's config mapping, so both sides have the same shape, activation, dropout and norm epsilon
    theirs = HFBert(HFConfig(**config_to_hf(cfg), attn_implementation="sdpa")).to(device)
    theirs.train()
    batch = bert_batch(args, device, cfg.vocab_size)
    if compiled:
        ours.model.bert.compile(backend=args.backend)  # as the module's compile switch does
        theirs.compile(backend=args.backend)

    def their_loss() -> torch.Tensor:
        out = theirs(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
            labels=batch["labels"],
            next_sentence_label=batch["nsp_labels"],
        )
        return out.loss

    masked = (batch["labels"] != IGNORE_INDEX).float().mean().item()
    computes = (
        f"ours: MLM head (fused with its cross-entropy) and the last block's queries, feed-forward and norms on "
        f"the {masked:.0%} masked rows + [CLS] only, a real saving of the model; transformers: the same shapes, "
        f"head and last block on all {args.seq} positions"
    )
    return (
        train_step(device, args.bf16, ours.parameters(), lambda: ours.model_step(batch, "train")),
        train_step(device, args.bf16, theirs.parameters(), their_loss),
        computes,
    )


def clip_pair(args: argparse.Namespace, device: torch.device, compiled: bool) -> tuple[Step, Step, str]:
    """Ours (ImageTextModule: ViT-B/16 + a text tower of open_clip's shape) and open_clip's ViT-B-16 (no weights:
    nothing is downloaded) at the same batch of 224 px images and 77-token captions."""
    import open_clip

    if args.smoke:
        image = ImageTowerConfig("vit_custom", 32, patch_size=16, layers=2, width=64, heads=2, mlp_dim=128)
        size, context, vocab, embed = 32, 16, 1000, 64
        text_cfg = {"context_length": context, "vocab_size": vocab, "width": 64, "heads": 2, "layers": 2}
        theirs = open_clip.CLIP(
            embed_dim=embed,
            vision_cfg={"image_size": size, "patch_size": 16, "layers": 2, "width": 64},
            text_cfg=text_cfg,
        )
    else:
        image, size, embed = ImageTowerConfig("vit_b_16", 224), 224, 512
        theirs = open_clip.create_model("ViT-B-16", pretrained=None)
        t = theirs.transformer
        text_cfg = {
            "context_length": theirs.context_length,
            "vocab_size": theirs.vocab_size,
            "width": t.width,
            "heads": t.resblocks[0].attn.num_heads,
            "layers": t.layers,
        }
        context, vocab = text_cfg["context_length"], text_cfg["vocab_size"]
    # our text tower in open_clip's shape: layers, width, heads (feed-forward 4 x width in both), vocabulary,
    # positions, and the last real token pooled as open_clip pools its EOT token
    text = TextTowerConfig(
        "base",
        layers=text_cfg["layers"],
        hidden=text_cfg["width"],
        heads=text_cfg["heads"],
        max_len=context,
        pooling="eot",
    )
    ours = ImageTextModule(vocab_size=vocab, embed_dim=embed, image=image, text=text).to(device).train()
    theirs = theirs.to(device).train()
    their_loss_fn = open_clip.ClipLoss()
    g = torch.Generator().manual_seed(0)
    b = args.clip_batch
    lengths = torch.randint(4, context - 1, (b,), generator=g)
    mask = (torch.arange(context)[None, :] < lengths[:, None]).long()
    ids = torch.randint(5, vocab, (b, context), generator=g) * mask
    batch = {
        "images": torch.randn(b, 3, size, size, generator=g),
        "input_ids": ids,
        "attention_mask": mask,
        "image_ids": torch.arange(b),
        "caption_ids": torch.arange(b),
    }
    batch = {k: v.to(device) for k, v in batch.items()}
    if compiled:
        ours.pair.image.compile(backend=args.backend)
        ours.pair.text.compile(backend=args.backend)
        theirs.compile(backend=args.backend)

    def their_loss() -> torch.Tensor:
        image_features, text_features, scale = theirs(batch["images"], batch["input_ids"])
        return their_loss_fn(image_features, text_features, scale)

    computes = (
        f"ours: the ViT on {size} px + a text tower of open_clip's shape, bidirectional attention over the real "
        f"tokens only (unpadded: {mask.sum().item() / b:.1f} of {context} per caption on average); open_clip: the "
        f"same shapes, causal attention over all {context} positions"
    )
    return (
        train_step(device, args.bf16, ours.parameters(), lambda: ours.pair.loss(ours.embed(batch, "train"))),
        train_step(device, args.bf16, theirs.parameters(), their_loss),
        computes,
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(steps: tuple[Step, Step], device: torch.device, warmup: int, rounds: int, per_round: int):
    """Seconds per step of each side: warm-up (compilation) first, then alternating rounds of `per_round`
    steps; the median round of each side."""
    for step in steps:
        for _ in range(warmup):
            step()
    sync(device)
    times: list[list[float]] = [[], []]
    for _ in range(rounds):
        for side, step in enumerate(steps):
            start = time.perf_counter()
            for _ in range(per_round):
                step()
            sync(device)
            times[side].append((time.perf_counter() - start) / per_round)
    return [sorted(t)[len(t) // 2] for t in times]


def count_flops(step: Step) -> int:
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
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-bf16", dest="bf16", action="store_false")
    p.add_argument("--modes", default="eager,compiled", help="eager, compiled or both (comma-separated)")
    p.add_argument("--backend", default="inductor", help="torch.compile backend")
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's dense bf16 peak")
    p.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: checks that the script runs")
    args = p.parse_args()
    if args.smoke:
        args.device, args.size, args.seq, args.batch, args.clip_batch = "cpu", "tiny", 16, 2, 2
        args.rounds, args.per_round, args.warmup, args.bf16, args.backend = 1, 1, 1, False, "eager"
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    peak = peak_flops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; bf16 autocast: {args.bf16}; peak: {peak and peak / 1e12} TFLOP/s", flush=True)
    jobs = {"bert": (bert_pair, f"BERT-{args.size} seq {args.seq}", "tokens", args.batch * args.seq)}
    clip_title = "CLIP ViT-B/16, text 512 wide" if not args.smoke else "CLIP tiny"
    jobs["clip"] = (clip_pair, clip_title, "pairs", args.clip_batch)
    chosen = ["bert", "clip"] if args.model == "both" else [args.model]
    for key in chosen:
        build, title, unit, units = jobs[key]
        for mode in args.modes.split(","):
            *steps, computes = build(args, device, compiled=False)
            flops = [count_flops(s) for s in steps]  # eager: the counter does not see inside compiled graphs
            if mode == "compiled":
                del steps
                *steps, computes = build(args, device, compiled=True)
            seconds = interleaved(steps, device, args.warmup, args.rounds, args.per_round)
            cells = []
            for who, f, sec in zip(("ours", "theirs"), flops, seconds):
                cell = f"{who} {units / sec:,.0f} {unit}/s"
                cell += f" MFU {f / sec / peak:.1%}" if peak else f" {f / sec / 1e12:.2f} TFLOP/s"
                cells.append(cell)
            ratio = seconds[1] / seconds[0]
            print(f"{title} {mode}: {' | '.join(cells)} | ratio: {ratio:.2f} ({computes})", flush=True)
            del steps
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
