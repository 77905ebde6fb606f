"""BERT on the shared encoder against Hugging Face `transformers` (import, export, old checkpoint names),
the masked-only MLM head, padding invariance, size presets, pre-LN and explicit attention weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

from lightning_modules.components.bert import BertConfig, BertForPreTraining
from lightning_modules.components.encoder import SIZES, EncoderConfig
from lightning_modules.components.hf_interop import load_hf_bert, save_hf_bert

VOCAB, HIDDEN = 500, 64
TOL = 1e-4


def _hf_config(**kw) -> transformers.BertConfig:
    return transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        **kw,
    )


def _perturbed(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Random biases and LayerNorm scales too, so a swapped or dropped tensor shows in the outputs."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three rows of lengths 12, 9, 5 with two segments each; padding is [PAD]=0, mask 0, type 0."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 9:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[0, 6:] = 1
    types[1, 4:9] = 1
    types[2, 3:5] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def hf_pretraining(tmp_path_factory: pytest.TempPathFactory) -> tuple[transformers.BertForPreTraining, Path]:
    model = _perturbed(transformers.BertForPreTraining(_hf_config()))
    folder = tmp_path_factory.mktemp("hf-pretraining")
    model.save_pretrained(folder)
    return model, folder


def _assert_same_outputs(ours: BertForPreTraining, hf: transformers.BertForPreTraining) -> None:
    ids, mask, types = _batch()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        hidden = ours.bert(ids, mask, types)
        mlm, nsp = ours(ids, mask, types)
    real = mask.bool()  # padded positions are ours to leave unspecified; only real ones must agree
    assert (hidden[real] - theirs.hidden_states[-1][real]).abs().max() <= TOL
    assert (mlm[real] - theirs.prediction_logits[real]).abs().max() <= TOL
    assert (nsp - theirs.seq_relationship_logits).abs().max() <= TOL
    assert mlm.shape == (3, 12, VOCAB) and nsp.shape == (3, 2)


def test_bare_bert_model_matches_hugging_face(tmp_path: Path) -> None:
    hf = _perturbed(transformers.BertModel(_hf_config()))
    hf.save_pretrained(tmp_path)
    ours = load_hf_bert(tmp_path).eval()
    ids, mask, types = _batch()
    with torch.no_grad():
        theirs = hf(ids, attention_mask=mask, token_type_ids=types)
        hidden = ours.bert(ids, mask, types)
        pooled = ours.bert.pool(hidden)
        no_types = ours.bert(ids, mask)
        theirs_no_types = hf(ids, attention_mask=mask).last_hidden_state
    real = mask.bool()
    assert (hidden[real] - theirs.last_hidden_state[real]).abs().max() <= TOL
    assert (pooled - theirs.pooler_output).abs().max() <= TOL
    assert (no_types[real] - theirs_no_types[real]).abs().max() <= TOL  # no token types = all segment A
    assert (hidden[real] - no_types[real]).abs().max() > 1e-2  # the segment embeddings do matter
    # a BertModel checkpoint has no heads: strict_heads refuses it
    with pytest.raises(ValueError, match="lacks"):
        load_hf_bert(tmp_path, strict_heads=True)


def test_pretraining_model_matches_hugging_face(hf_pretraining) -> None:
    hf, folder = hf_pretraining
    ours = load_hf_bert(folder, strict_heads=True).eval()
    _assert_same_outputs(ours, hf)
    # the decoder is tied to the input embedding, as in BERT
    assert ours.mlm.embedding.weight.data_ptr() == ours.bert.embeddings.word.weight.data_ptr()


@pytest.mark.parametrize(
    "hidden_act",
    [
        "gelu_new",
        "relu",
    ],
)
def test_other_activations_match_hugging_face(tmp_path: Path, hidden_act: str) -> None:
    hf = _perturbed(transformers.BertForPreTraining(_hf_config(hidden_act=hidden_act)))
    hf.save_pretrained(tmp_path)
    _assert_same_outputs(load_hf_bert(tmp_path).eval(), hf)


def test_pytorch_model_bin_with_gamma_beta_names_loads(tmp_path: Path, hf_pretraining) -> None:
    hf, _ = hf_pretraining
    old = {}
    for k, v in hf.state_dict().items():
        k = k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        old[k] = v.clone()
    assert sum("gamma" in k for k in old) == 2 * 2 + 2  # two per layer, embeddings, MLM transform
    torch.save(old, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(hf.config.to_json_string())
    _assert_same_outputs(load_hf_bert(tmp_path, strict_heads=True).eval(), hf)


def test_export_reloads_in_hugging_face(tmp_path: Path) -> None:
    torch.manual_seed(1)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, max_position_embeddings=32
    )
    ours = _perturbed(BertForPreTraining(cfg), seed=1)
    save_hf_bert(ours, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"]) == (2, 64, 256)
    assert "bert.encoder.layer.1.attention.self.value.bias" in load_file(str(tmp_path / "model.safetensors"))

    hf, info = transformers.BertForPreTraining.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    _assert_same_outputs(ours, hf.eval())
    # and back: our loader restores every tensor exactly
    back = load_hf_bert(tmp_path, strict_heads=True)
    theirs = back.state_dict()
    for k, v in ours.state_dict().items():
        assert torch.equal(theirs[k], v), k


def test_load_errors_name_the_problem(tmp_path: Path, hf_pretraining) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_bert(tmp_path)
    (tmp_path / "config.json").write_text(_hf_config().to_json_string())
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_hf_bert(tmp_path)
    # weights of a different shape than the config says
    _, folder = hf_pretraining
    wide = json.loads((folder / "config.json").read_text()) | {"vocab_size": VOCAB + 1}
    (tmp_path / "config.json").write_text(json.dumps(wide))
    (tmp_path / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="shape"):
        load_hf_bert(tmp_path)


def _small(**kw) -> BertForPreTraining:
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_layers=2, num_heads=4, **kw)
    return BertForPreTraining(cfg).eval()


@pytest.mark.parametrize("variant", ["post_ln", "pre_ln", "no_padding", "checkpointed"])
def test_masked_only_mlm_loss_and_gradients_equal_dense(variant: str) -> None:
    """The masked-only path (MLM head at the masked positions, last block for those and [CLS] only) gives the
    dense path's logits, loss and gradients."""
    ids, mask, types = _batch(seed=3)
    if variant == "no_padding":
        mask = torch.ones_like(mask)
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(4)) < 0.3) & mask.bool()
    chosen[0, 1] = True
    labels[chosen] = ids[chosen]
    nsp_labels = torch.arange(len(ids)) % 2

    kw = {"dropout": 0.0, "attention_dropout": 0.0, "norm_first": variant == "pre_ln"}
    dense_model, sparse_model = _small(**kw), _small(**kw)
    if variant == "checkpointed":
        for m in (dense_model, sparse_model):
            m.train().bert.encoder.gradient_checkpointing = True
    dense_logits, dense_nsp = dense_model(ids, mask, types)
    dense = F.cross_entropy(dense_logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    (dense + F.cross_entropy(dense_nsp, nsp_labels)).backward()
    masked_logits, sparse_nsp = sparse_model(ids, mask, types, masked_positions=labels != -100)
    assert masked_logits.shape == (int(chosen.sum()), VOCAB)
    # row-major order of the masked positions; the last block ran on fewer rows (other matmul shapes): fp32
    # reassociation, ~1e-6 here
    assert torch.allclose(masked_logits, dense_logits[chosen], atol=1e-5, rtol=1e-5)
    assert torch.allclose(sparse_nsp, dense_nsp, atol=1e-6, rtol=1e-5)
    sparse = F.cross_entropy(masked_logits, labels[labels != -100])
    assert sparse.item() == pytest.approx(dense.item(), abs=1e-5)  # the same, through the loss
    (sparse + F.cross_entropy(sparse_nsp, nsp_labels)).backward()
    for (name, p), q in zip(dense_model.named_parameters(), sparse_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        assert torch.allclose(p.grad, q.grad, atol=1e-6, rtol=1e-5), name  # the same, backwards


def test_padding_does_not_change_real_positions() -> None:
    model = _small()
    ids = torch.randint(5, VOCAB, (2, 10), generator=torch.Generator().manual_seed(5))
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    padded_ids = torch.cat([ids, torch.zeros(2, 6, dtype=torch.long)], 1)
    padded_types = torch.cat([types, torch.zeros(2, 6, dtype=torch.long)], 1)
    padded_mask = torch.cat([torch.ones(2, 10), torch.zeros(2, 6)], 1)
    with torch.no_grad():
        plain = model.bert(ids, None, types)
        ones = model.bert(ids, torch.ones(2, 10), types)
        padded = model.bert(padded_ids, padded_mask, padded_types)
        unmasked = model.bert(padded_ids, None, padded_types)  # padding attended to: must differ
        mean_plain = model.bert.pool(plain, torch.ones(2, 10), mode="mean")
        mean_padded = model.bert.pool(padded, padded_mask, mode="mean")
    # no mask and a mask of ones take different attention kernels: fp32 reassociation, ~1e-7 here
    assert torch.allclose(plain, ones, atol=1e-6, rtol=1e-5)
    assert (padded[:, :10] - plain).abs().max() <= 1e-5
    assert (unmasked[:, :10] - plain).abs().max() > 1e-3
    assert (mean_padded - mean_plain).abs().max() <= 1e-5
    # padded and unpadded batches take different kernels: fp32 reassociation (3e-8 at 8.8e-4 on a Xeon)
    assert torch.allclose(model.bert.pool(padded, mode="first"), plain[:, 0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("size", ["tiny", "mini", "small", "medium", "base"])
def test_size_presets_have_paper_shapes(size: str) -> None:
    expected = {"tiny": (2, 128), "mini": (4, 256), "small": (4, 512), "medium": (8, 512), "base": (12, 768)}
    cfg = BertConfig.from_size(size, vocab_size=1000)
    assert isinstance(cfg, BertConfig) and cfg.vocab_size == 1000
    assert (cfg.num_layers, cfg.hidden_size) == expected[size] == SIZES[size]
    assert cfg.num_heads == cfg.hidden_size // 64
    assert cfg.intermediate_size == 4 * cfg.hidden_size
    with torch.device("meta"):
        model = BertForPreTraining(cfg)
    assert len(model.bert.encoder.blocks) == cfg.num_layers
    assert model.bert.encoder.blocks[0].ffn[0].weight.shape == (4 * cfg.hidden_size, cfg.hidden_size)


def test_base_parameter_count_matches_hugging_face() -> None:
    with torch.device("meta"):
        ours = BertForPreTraining(BertConfig.from_size("base"))
        hf = transformers.BertForPreTraining(transformers.BertConfig())
    n_ours = sum(p.numel() for p in ours.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    assert abs(n_ours - n_hf) <= 0.01 * n_hf
    assert 109e6 < n_ours < 111e6  # "110M" in the BERT paper
    assert sum(p.numel() for p in ours.bert.parameters()) == pytest.approx(109.48e6, rel=1e-3)


def test_unknown_size_and_bad_heads_raise() -> None:
    with pytest.raises(ValueError, match="unknown size"):
        EncoderConfig.from_size("huge")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(hidden_size=64, num_heads=5)


def test_pre_ln_runs_and_differs(tmp_path: Path) -> None:
    # weights large enough that the attention and feed-forward branches matter next to the residual
    post = _perturbed(_small(), scale=0.3)
    pre = _small(norm_first=True)
    assert pre.bert.encoder.final_norm is not None and post.bert.encoder.final_norm is None
    missing, unexpected = pre.load_state_dict(post.state_dict(), strict=False)
    assert missing == ["bert.encoder.final_norm.weight", "bert.encoder.final_norm.bias"] and not unexpected
    ids, mask, types = _batch()
    with torch.no_grad():
        h_post, h_pre = post.bert(ids, mask, types), pre.bert(ids, mask, types)
        mlm_pre, _ = pre(ids, mask, types)
    assert torch.isfinite(mlm_pre).all()
    assert (h_pre - h_post)[mask.bool()].abs().mean() > 0.1  # same weights, different block order
    # the final LayerNorm (fresh: unit scale, zero shift) normalises every real position
    real = h_pre[mask.bool()]
    assert real.mean(-1).abs().max() < 1e-4
    assert real.std(-1, unbiased=False).sub(1).abs().max() < 1e-3
    with pytest.raises(ValueError, match="pre-LN"):
        save_hf_bert(pre, tmp_path / "export")


def test_refused_export_writes_nothing(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        save_hf_bert(_small(norm_first=True), tmp_path / "export")
    assert not (tmp_path / "export" / "model.safetensors").exists()


def test_attention_weights_are_distributions_over_real_keys() -> None:
    model = _small()
    ids, mask, types = _batch(seed=6)
    with torch.no_grad():
        fused = model.bert(ids, mask, types)
        hidden, weights = model.bert(ids, mask, types, need_weights=True)
    assert len(weights) == 2
    assert all(w.shape == (3, 4, 12, 12) for w in weights)
    real = mask.bool()
    assert (hidden[real] - fused[real]).abs().max() <= 1e-5
    key_is_pad = ~mask.bool()[:, None, None, :].expand(-1, 4, 12, -1)
    for w in weights:
        # softmax rows sum to 1 up to fp32 rounding
        assert torch.allclose(w.sum(-1), torch.ones(3, 4, 12), atol=1e-5, rtol=0)
        assert (w[key_is_pad] == 0).all()
        assert (w[~key_is_pad] > 0).all()
    # nothing padded: still distributions, and the mask-free path agrees
    with torch.no_grad():
        full, w_full = model.bert(ids[:1], None, types[:1], need_weights=True)
    assert torch.allclose(w_full[0].sum(-1), torch.ones(1, 4, 12), atol=1e-5, rtol=0)
    assert (full - fused[:1]).abs().max() <= 1e-5


@pytest.mark.parametrize("padding", [True, False])
def test_pretraining_outputs_fused_loss_equals_dense(padding: bool) -> None:
    """`pretraining_outputs` (last block on the wanted rows, fused chunked vocabulary loss) gives the dense
    path's MLM loss, top-1 hits and every gradient."""
    ids, mask, types = _batch(seed=7)
    if not padding:
        mask = torch.ones_like(mask)
    labels = torch.full_like(ids, -100)
    chosen = (torch.rand(ids.shape, generator=torch.Generator().manual_seed(8)) < 0.3) & mask.bool()
    labels[chosen] = ids[chosen]
    nsp_labels = torch.arange(len(ids)) % 2
    kw = {"dropout": 0.0, "attention_dropout": 0.0}
    dense_model, fused_model = _small(**kw).train(), _small(**kw).train()
    dense_logits, dense_nsp = dense_model(ids, mask, types)
    dense = F.cross_entropy(dense_logits.view(-1, VOCAB), labels.view(-1), ignore_index=-100)
    (dense + F.cross_entropy(dense_nsp, nsp_labels)).backward()
    out = fused_model.pretraining_outputs(ids, mask, types, labels)
    n = int(chosen.sum())
    assert out.mlm_targets.tolist() == ids[chosen].tolist()
    assert out.mlm_hits.tolist() == (dense_logits[chosen].argmax(-1) == ids[chosen]).tolist()
    # the chunked vocabulary loss and the last block on fewer rows are other kernels: fp32 reassociation
    assert (out.mlm_loss_sum / n).item() == pytest.approx(dense.item(), abs=1e-5)
    torch.testing.assert_close(out.nsp_logits, dense_nsp, atol=1e-6, rtol=0)
    (out.mlm_loss_sum / n + F.cross_entropy(out.nsp_logits, nsp_labels)).backward()
    for (name, p), q in zip(dense_model.named_parameters(), fused_model.parameters()):
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(q.grad, p.grad, atol=2e-6, rtol=1e-4, msg=name)
