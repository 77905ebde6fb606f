"""The fused, chunked vocabulary cross-entropy and the encoder's CPU dropout against the plain PyTorch ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.encoder import Dropout
from lightning_modules.components.lm_loss import linear_cross_entropy
from tests.builders.mlm import tiny_mlm


def _problem(n: int, vocab: int = 97, d: int = 24, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, requires_grad=True)
    w = (torch.randn(vocab, d, generator=g) * 0.5).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_()
    t = torch.randint(0, vocab, (n,), generator=g)
    return h, w, b, t


@pytest.mark.parametrize(("n", "chunk"), [(50, 16), (50, 50), (50, 64), (1, 8), (33, 1)])
def test_loss_hits_and_gradients_equal_plain_cross_entropy(n: int, chunk: int) -> None:
    h, w, b, t = _problem(n)
    loss, hits = linear_cross_entropy(h, w, b, t, chunk_rows=chunk)
    (loss * 0.3).backward()  # a scaled upstream gradient, as a mean or a loss weight gives
    fused = [x.grad.clone() for x in (h, w, b)]
    for x in (h, w, b):
        x.grad = None
    logits = F.linear(h, w, b)
    plain = F.cross_entropy(logits, t, reduction="sum")
    (plain * 0.3).backward()
    # the fused chunked loss against F.cross_entropy: fp32 reassociation
    assert loss.item() == pytest.approx(plain.item(), rel=1e-6, abs=1e-5)
    assert hits.dtype == torch.bool and hits.tolist() == (logits.argmax(-1) == t).tolist()
    for got, x in zip(fused, (h, w, b)):
        torch.testing.assert_close(got, x.grad, rtol=1e-5, atol=1e-6)


def test_hits_are_counted_and_learning_signal_is_real() -> None:
    """Targets equal to the argmax are hits; a few SGD steps on the fused loss reduce it (the gradient points
    the right way)."""
    h, w, b, _ = _problem(40)
    t = F.linear(h, w, b).argmax(-1)
    _, hits = linear_cross_entropy(h, w, b, t)
    assert bool(hits.all())
    t = torch.randint(0, 97, (40,), generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(20):
        loss, _ = linear_cross_entropy(h, w, b, t, chunk_rows=16)
        losses.append(loss.item())
        loss.backward()
        with torch.no_grad():
            for x in (h, w, b):
                x -= 0.05 * x.grad
                x.grad = None
    assert losses[-1] < 0.5 * losses[0]


def test_without_gradients_it_is_the_plain_computation() -> None:
    h, w, b, t = _problem(30)
    with torch.no_grad():
        loss, hits = linear_cross_entropy(h, w, b, t)
        logits = F.linear(h, w, b)
    # chunked against F.cross_entropy: fp32 reassociation
    assert loss.item() == pytest.approx(F.cross_entropy(logits, t, reduction="sum").item(), rel=1e-6)
    assert hits.tolist() == (logits.argmax(-1) == t).tolist()
    empty = linear_cross_entropy(h[:0], w, b, t[:0])[0]
    assert empty.item() == 0.0


def test_bf16_autocast_is_close_to_plain_autocast() -> None:
    h, w, b, t = _problem(20)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = linear_cross_entropy(h, w, b, t, chunk_rows=8)
        plain = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(plain.item(), rel=2e-2)
    loss.backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_mismatched_rows_and_double_backward_are_refused() -> None:
    h, w, b, t = _problem(10)
    with pytest.raises(ValueError, match="10 hidden rows but 9 targets"):
        linear_cross_entropy(h, w, b, t[:9])
    loss, _ = linear_cross_entropy(h, w, b, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward through the same graph twice"):
        loss.backward()


def test_cpu_dropout_keeps_one_minus_p_scales_and_routes_gradients() -> None:
    torch.manual_seed(0)
    drop = Dropout(0.3).train()
    x = torch.ones(200_000, requires_grad=True)
    y = drop(x)
    kept = y != 0
    assert abs(kept.float().mean().item() - 0.7) < 0.005  # Bernoulli(0.7): sd 0.001
    assert torch.allclose(y[kept], torch.full_like(y[kept], 1 / 0.7))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())  # d y / d x = mask / (1 - p)
    assert torch.equal(drop.eval()(x), x)
    assert torch.equal(Dropout(1.0).train()(x), torch.zeros_like(x))


def test_no_bias_and_frozen_parameters_get_the_plain_gradients() -> None:
    h, w, _, t = _problem(21)
    w.requires_grad_(False)
    loss, _ = linear_cross_entropy(h, w, None, t, chunk_rows=8)
    loss.backward()
    fused = h.grad.clone()
    h.grad = None
    F.cross_entropy(F.linear(h, w), t, reduction="sum").backward()
    torch.testing.assert_close(fused, h.grad, rtol=1e-5, atol=1e-6)  # chunked backward: fp32 reassociation
    assert w.grad is None


def test_fp16_takes_the_plain_path_that_loss_scaling_protects() -> None:
    """Under fp16 the fused path would round softmax - onehot to fp16 before the loss scale applies; the plain
    autograd path (what GradScaler protects) is used instead: the same loss and gradients as writing it out."""
    h, w, b, t = _problem(6, vocab=400)
    with torch.autocast("cpu", dtype=torch.float16):
        loss, _ = linear_cross_entropy(h, w, b, t)
    assert loss.grad_fn is not None and "LinearCrossEntropy" not in type(loss.grad_fn).__name__
    (loss * 1024.0).backward()
    fused = w.grad.clone()
    w.grad = None
    with torch.autocast("cpu", dtype=torch.float16):
        plain = F.cross_entropy(F.linear(h, w, b).float(), t, reduction="sum")
    (plain * 1024.0).backward()
    assert loss.item() == plain.item()
    assert torch.equal(fused, w.grad)


def test_module_mlm_accuracy_weights_every_masked_token_once() -> None:
    """val/mlm_acc over batches with different numbers of masked tokens is hits / masked tokens overall."""
    from lightning_modules.mlm_module import IGNORE_INDEX

    module = tiny_mlm(dropout=0.0, attention_dropout=0.0).eval()
    with torch.no_grad():
        module.model.mlm.bias[7] = 100.0  # the model always predicts token 7
    batches = []
    for n_masked, n_sevens in ((12, 12), (3, 0)):  # batch-wise accuracy 1.0 and 0.0
        ids = torch.randint(8, 64, (2, 16), generator=torch.Generator().manual_seed(n_masked))
        labels = torch.full_like(ids, IGNORE_INDEX)
        where = torch.arange(1, 1 + n_masked)
        labels.view(-1)[where] = 8
        labels.view(-1)[where[:n_sevens]] = 7
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    with torch.no_grad():
        for batch in batches:
            module.model_step(batch, "val")
    acc = module.metrics["val"]["mlm_acc"].compute().item()
    assert acc == pytest.approx(12 / 15)  # not the mean of batch accuracies (0.5), nor weighted twice (0.94)
