"""Training-step throughput of our BERT against `transformers.BertForPreTraining`, side by side.

Same configuration for both (L=4, H=256, A=4, seq 128, batch 32, vocab 30522, MLM + NSP, fp32, AdamW),
interleaved in one process after warm-up; prints `ratio: X` = our tokens/s / theirs. Also prints how
many batches per second the DataLoader delivers from prepared shards (vs the model's step rate) and the
Wikipedia reader's wikitext throughput per process.

    python benchmarks/mlm_step.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lightning_modules.components.bert import BertConfig, BertForPreTraining  # noqa: E402
from lightning_modules.training.optim import param_groups  # noqa: E402

L_, H, A, SEQ, BATCH, VOCAB = 4, 256, 4, 128, 32, 30522


def make_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (BATCH, SEQ), generator=g)
    ids[:, 0] = 2
    attention = torch.ones(BATCH, SEQ, dtype=torch.long)
    # as BERT's NSP data: most pairs fill the sequence, 10% (short_seq_prob) have a random shorter target
    lengths = torch.full((BATCH,), SEQ)
    short = torch.rand(BATCH, generator=g) < 0.1
    lengths[short] = torch.randint(8, SEQ, (int(short.sum()),), generator=g)
    attention[torch.arange(SEQ)[None] >= lengths[:, None]] = 0
    types = (torch.arange(SEQ)[None] >= (lengths // 2)[:, None]).long() * attention
    chosen = (torch.rand(BATCH, SEQ, generator=g) < 0.15) & attention.bool()
    chosen[:, 0] = False
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    nsp = torch.randint(0, 2, (BATCH,), generator=g)
    return {
        "input_ids": ids,
        "attention_mask": attention,
        "token_type_ids": types,
        "labels": labels,
        "nsp": nsp,
    }


def ours_step(model, opt, b) -> float:
    # what MLMPretrainingModule.model_step computes (one process): masked-only heads, fused vocabulary loss
    out = model.pretraining_outputs(b["input_ids"], b["attention_mask"], b["token_type_ids"], b["labels"])
    loss = out.mlm_loss_sum / out.mlm_targets.numel() + F.cross_entropy(out.nsp_logits, b["nsp"])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def hf_step(model, opt, b) -> float:
    out = model(
        input_ids=b["input_ids"],
        attention_mask=b["attention_mask"],
        token_type_ids=b["token_type_ids"],
        labels=b["labels"],
        next_sentence_label=b["nsp"],
    )
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return out.loss.item()


def bench_models(steps: int, warmup: int) -> tuple[float, float]:
    import transformers

    torch.manual_seed(0)
    ours = BertForPreTraining(BertConfig(vocab_size=VOCAB, hidden_size=H, num_layers=L_, num_heads=A)).train()
    hf_cfg = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=H, num_hidden_layers=L_, num_attention_heads=A, intermediate_size=4 * H
    )
    theirs = transformers.BertForPreTraining(hf_cfg).train()
    opt_ours = torch.optim.AdamW(param_groups(ours, 0.01), lr=1e-4, fused=True)  # as our build_optimizer
    opt_theirs = torch.optim.AdamW(param_groups(theirs, 0.01), lr=1e-4)  # the usual HF / PyTorch default
    batch = make_batch()
    for _ in range(warmup):
        ours_step(ours, opt_ours, batch)
        hf_step(theirs, opt_theirs, batch)
    t_ours, t_theirs = [], []
    for i in range(steps):  # interleaved, alternating who goes first, so drift hits both alike
        pair = [("ours", ours, opt_ours, ours_step), ("theirs", theirs, opt_theirs, hf_step)]
        for name, model, opt, fn in pair if i % 2 == 0 else pair[::-1]:
            t0 = time.perf_counter()
            fn(model, opt, batch)
            (t_ours if name == "ours" else t_theirs).append(time.perf_counter() - t0)
    tokens = int(batch["attention_mask"].sum())
    m_ours, m_theirs = statistics.median(t_ours), statistics.median(t_theirs)
    print(f"tokens per batch (non-padding): {tokens}")
    print(f"ours:         {m_ours:.3f} s/step  {tokens / m_ours:8.0f} tokens/s")
    print(f"transformers: {m_theirs:.3f} s/step  {tokens / m_theirs:8.0f} tokens/s")
    return m_ours, m_theirs


def bench_dataloader(step_time: float, workers: int) -> None:
    from datamodules.text.mlm_datamodule import MLMDataModule

    with tempfile.TemporaryDirectory() as tmp:
        dm = MLMDataModule(
            sample_corpus=True,
            num_proc=2,
            tokenizer={"vocab_size": VOCAB, "cache_dir": tmp},
            examples={"max_seq_length": SEQ},
            loader={"batch_size": BATCH, "num_workers": workers},
        )
        dm.prepare_data()
        dm.setup("fit")
        loader = dm.train_dataloader()
        n, t0 = 0, None
        for _ in range(3):  # several epochs of the small sample
            for _batch in loader:
                if t0 is None:  # start the clock once the workers are up
                    t0 = time.perf_counter()
                    continue
                n += 1
        rate = n / (time.perf_counter() - t0)
    print(
        f"dataloader: {rate:.1f} batches/s with {workers} worker(s); model: {1 / step_time:.2f} steps/s; "
        f"dataloader/model = {rate * step_time:.0f}x"
    )


def bench_reader(path: Path | None) -> None:
    from datamodules.text.corpora import iter_wikipedia
    from datamodules.text.wikiclean import wikitext_to_text

    if path is None or not path.is_file():
        print("wikipedia reader: skipped (no dump found; pass --wiki)")
        return
    docs = list(iter_wikipedia([str(path)]))
    size = sum(len(d.text.encode()) for d in docs) / 1e6
    t0 = time.perf_counter()
    for d in docs:
        wikitext_to_text(d.text)
    dt = time.perf_counter() - t0
    print(
        f"wikipedia reader: {size:.1f} MB wikitext cleaned in {dt:.2f} s = {size / dt:.2f} MB/s per process"
    )


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    default_wiki = Path(__file__).resolve().parents[2] / "shared/data/real/wikipedia"
    p.add_argument(
        "--wiki",
        type=Path,
        default=next(iter(sorted(default_wiki.glob("*.bz2"))), None) if default_wiki.is_dir() else None,
    )
    p.add_argument("--skip-data", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, L={L_} H={H} A={A} seq={SEQ} batch={BATCH}"
    )
    m_ours, m_theirs = bench_models(a.steps, a.warmup)
    if not a.skip_data:
        bench_dataloader(m_ours, a.workers)
        bench_reader(a.wiki)
    print(f"ratio: {m_theirs / m_ours:.2f}")


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
