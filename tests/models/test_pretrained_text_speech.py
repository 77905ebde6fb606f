"""Text and speech towers from pretrained local files: Hugging Face encoder folders with their own tokenizers,
a Hugging Face BERT folder into our encoder, wav2vec 2.0 / HuBERT / WavLM from Hugging Face folders and
torchaudio state dicts. Every reference model is tiny, random, built by its own library and saved natively
under tmp_path; nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchaudio
from tokenizers import Tokenizer

from datamodules.synthetic.tones import generate_tone_librispeech
from datamodules.tokenizer import TextTokenizer, TokenizerError
from lightning_modules.components.hf_towers import HFSpeechTower, HFTextTower, TorchaudioSpeechTower
from lightning_modules.components.speech_tower import SpeechTowerConfig, build_speech_tower
from lightning_modules.components.text_tower import TextTower, TextTowerConfig, build_text_tower
from lightning_modules.components.towers import TowerInit, read_state_dict
from tests.builders.pretrained import TEXTS, bert_folder, roberta_folder, speech_folder
from tests.helpers import cli_args, padded_batch

transformers = pytest.importorskip("transformers")

# ours against the reference, other batch shapes or padding: other kernels, fp32 reassociation through the layers
TOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread (tests/helpers.single_thread)


# -- reference folders ----------------------------------------------------------------------------


# -- text -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooling", ["first", "cls", "mean", "eot"])
def test_hf_text_tower_equals_the_reference_forward(tmp_path: Path, kind: str, pooling: str) -> None:
    folder = (bert_folder if kind == "bert" else roberta_folder)(tmp_path)
    tok = TextTokenizer.from_file(folder)  # the folder's own tokenizer
    cfg = TextTowerConfig(pooling=pooling, init=TowerInit(source="hf", path=str(folder)))
    tower = build_text_tower(cfg, tok.vocab_size, embed_dim=8).eval()
    assert isinstance(tower, HFTextTower) and len(tower.blocks) == 2
    batch = tok(TEXTS[:3], max_length=32)
    ref = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        out = ref(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long())
        theirs = out.last_hidden_state
        ours = tower.encode(batch["input_ids"], batch["attention_mask"])
        assert (ours - theirs).abs().max().item() <= TOL
        # padding never changes a pooled text: each row alone gives the batched row's embedding
        pooled = tower(batch["input_ids"], batch["attention_mask"])
        for i, text in enumerate(TEXTS[:3]):
            alone = tok([text], max_length=32)
            assert torch.allclose(
                tower(alone["input_ids"], alone["attention_mask"])[0], pooled[i], atol=TOL, rtol=1e-5
            )
    n = int(batch["attention_mask"][0].sum())
    firsts = {"first": theirs[0, 0], "cls": out.pooler_output[0]}
    expected = {**firsts, "mean": theirs[0, :n].mean(0), "eot": theirs[0, n - 1]}[pooling]
    assert torch.allclose(pooled[0], tower.proj(expected), atol=TOL, rtol=1e-5)


def test_context_length_is_checked_against_the_folder_position_table(tmp_path: Path) -> None:
    folder = roberta_folder(tmp_path)  # 66 position rows, 2 of them before the first position of text
    cfg = TextTowerConfig(max_len=16, init=TowerInit(source="hf", path=str(folder)))
    cfg.check_data({"context_length": 64}, "data")
    with pytest.raises(
        ValueError, match=r"data.context_length \(65\) exceeds the position table of .*roberta \(64\)"
    ):
        cfg.check_data({"context_length": 65}, "data")


def test_hf_tokenizer_folder_tokenizes_as_transformers_does(tmp_path: Path) -> None:
    """RoBERTa's BPE: <s> text </s> with <pad> padding, from tokenizer.json and from vocab.json + merges.txt."""
    folder = roberta_folder(tmp_path)
    ref = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    expected = ref(TEXTS[:3], padding=True)["input_ids"]
    tok = TextTokenizer.from_file(folder)
    assert (tok.cls_id, tok.sep_id, tok.pad_id) == (0, 2, 1)
    assert tok(TEXTS[:3], max_length=64)["input_ids"].tolist() == expected
    Tokenizer.from_file(str(folder / "tokenizer.json")).model.save(str(folder))  # vocab.json, merges.txt
    (folder / "tokenizer.json").unlink()  # transformers converts vocab.json + merges.txt
    assert TextTokenizer.from_file(folder)(TEXTS[:3], max_length=64)["input_ids"].tolist() == expected
    # a checkpoint keeps the tokenizer as tokenizer.json text; RoBERTa's special tokens are found again
    ckpt = tmp_path / "with_tokenizer.ckpt"
    torch.save({"tokenizer_json": tok.tokenizer.to_str()}, ckpt)
    again = TextTokenizer.from_checkpoint(ckpt)
    assert (again.cls_id, again.sep_id, again.pad_id, again.mask_id) == (0, 2, 1, 4)
    assert again(TEXTS[:3], max_length=64)["input_ids"].tolist() == expected
    for name in ("vocab.json", "merges.txt"):
        (folder / name).unlink()
    with pytest.raises(TokenizerError, match="holds no vocabulary: give a folder with tokenizer.json"):
        TextTokenizer.from_file(folder)


def test_hf_bert_folder_into_our_encoder(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path)
    tok = TextTokenizer.from_file(folder)
    cfg = TextTowerConfig(pooling="first", init=TowerInit(source="hf_bert", path=str(folder)))
    tower = build_text_tower(cfg, tok.vocab_size, embed_dim=8).eval()
    assert isinstance(tower, TextTower) and len(tower.blocks) == 2
    batch = tok(TEXTS[:3], max_length=32)
    ref = transformers.BertModel.from_pretrained(folder, local_files_only=True).eval()
    with torch.no_grad():
        theirs = ref(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()
        ).last_hidden_state
        ours = tower.bert(batch["input_ids"], batch["attention_mask"])
    mask = batch["attention_mask"]
    assert (ours - theirs)[mask].abs().max().item() <= TOL  # padded positions are nobody's output


@pytest.mark.parametrize("source", ["hf", "hf_bert"])
def test_a_tokenizer_of_another_size_is_refused_in_one_line(tmp_path: Path, source: str) -> None:
    folder = bert_folder(tmp_path)
    size = TextTokenizer.from_file(folder).vocab_size
    cfg = TextTowerConfig(init=TowerInit(source=source, path=str(folder)))
    with pytest.raises(
        ValueError, match=rf"has {size + 5} tokens but the text tower from .* has {size}"
    ) as err:
        build_text_tower(cfg, size + 5, embed_dim=8)
    assert "\n" not in str(err.value) and f"data.tokenizer.path={folder}" in str(err.value)


@pytest.mark.parametrize("source", ["hf", "hf_bert"])
def test_a_folder_without_config_json_is_refused(tmp_path: Path, source: str) -> None:
    (tmp_path / "empty").mkdir()
    cfg = TextTowerConfig(init=TowerInit(source=source, path=str(tmp_path / "empty")))
    with pytest.raises(FileNotFoundError, match="config.json") as err:
        build_text_tower(cfg, 100, embed_dim=8)
    assert "\n" not in str(err.value)


# -- speech ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm"])
def test_hf_speech_tower_equals_the_reference_and_ignores_padding(tmp_path: Path, kind: str) -> None:
    folder = speech_folder(tmp_path, kind)
    cfg = SpeechTowerConfig(init=TowerInit(source="hf", path=str(folder)))
    tower = build_speech_tower(cfg, embed_dim=8).eval()
    assert isinstance(tower, HFSpeechTower) and len(tower.blocks) == 2
    assert tower.per_utterance == (kind != "hubert")  # GroupNorm feature encoders run one utterance at a time
    ref = transformers.AutoModel.from_pretrained(folder, local_files_only=True).eval()
    batch, lengths = padded_batch([8000, 5000, 6200])
    with torch.no_grad():
        hidden, mask = tower.encode(batch, lengths)
        for i, n in enumerate(lengths.tolist()):  # each utterance as the reference sees it alone
            theirs = ref(batch[i : i + 1, :n]).last_hidden_state[0]
            assert mask[i].sum().item() == theirs.shape[0]
            assert (hidden[i, : theirs.shape[0]] - theirs).abs().max().item() <= TOL
        pooled = tower(batch, lengths)
        more_padding = torch.nn.functional.pad(batch, (0, 1500))
        assert torch.allclose(tower(more_padding, lengths), pooled, atol=TOL, rtol=1e-5)
        alone = tower(batch[1:2, :5000], lengths[1:2])
        assert torch.allclose(alone[0], pooled[1], atol=TOL, rtol=1e-5)


@pytest.mark.parametrize("extractor", ["group_norm", "layer_norm"])
def test_torchaudio_speech_tower_from_a_state_dict(tmp_path: Path, extractor: str) -> None:
    """Base models (GroupNorm feature encoder) run per utterance, large ones (LayerNorm) batched with lengths."""
    args = dict(
        extractor_mode=extractor,
        extractor_conv_layer_config=[(16, 10, 5), (16, 3, 4), (16, 3, 4), (16, 3, 4)],
        extractor_conv_bias=False,
        encoder_embed_dim=32,
        encoder_projection_dropout=0.0,
        encoder_pos_conv_kernel=16,
        encoder_pos_conv_groups=2,
        encoder_num_layers=2,
        encoder_num_heads=2,
        encoder_attention_dropout=0.0,
        encoder_ff_interm_features=64,
        encoder_ff_interm_dropout=0.0,
        encoder_dropout=0.0,
        encoder_layer_norm_first=extractor == "layer_norm",
        encoder_layer_drop=0.0,
        aux_num_out=None,
    )
    torch.manual_seed(0)
    ref = torchaudio.models.wav2vec2_model(**args).eval()
    path = tmp_path / "w2v.pt"
    torch.save(ref.state_dict(), path)
    cfg = SpeechTowerConfig(
        init=TowerInit(source="torchaudio", name="wav2vec2_model", path=str(path)), arch_args=args
    )
    tower = build_speech_tower(cfg, embed_dim=8).eval()
    assert isinstance(tower, TorchaudioSpeechTower) and len(tower.blocks) == 2
    assert tower.per_utterance == (extractor == "group_norm")
    batch, lengths = padded_batch([8000, 5600])
    with torch.no_grad():
        hidden, mask = tower.encode(batch, lengths)
        for i, n in enumerate(lengths.tolist()):
            theirs = ref(batch[i : i + 1, :n])[0][0]
            assert mask[i].sum().item() == theirs.shape[0]
            assert (hidden[i, : theirs.shape[0]] - theirs).abs().max().item() <= TOL
        pooled = tower(batch, lengths)
        assert torch.allclose(
            tower(torch.nn.functional.pad(batch, (0, 999)), lengths), pooled, atol=TOL, rtol=1e-5
        )

    # a checkpoint of another size: the first tensor that does not fit, both shapes, the key counts
    wider = {**args, "encoder_embed_dim": 48, "encoder_ff_interm_features": 96}
    with pytest.raises(ValueError) as err:
        build_speech_tower(SpeechTowerConfig(init=cfg.init, arch_args=wider), embed_dim=8)
    msg = str(err.value)
    assert "\n" not in msg and str(path) in msg
    assert (
        "first mismatching tensor encoder.feature_projection.projection.weight: (32, 16) in the checkpoint, (48, 16) in the model"
        in msg
    )
    assert "0 missing and 0 unexpected keys" in msg

    # a pickled whole model is refused by weights_only loading, with what to save instead
    whole = tmp_path / "whole.pt"
    torch.save(torch.nn.Linear(2, 2), whole)  # (torchaudio's weight-normed model cannot be pickled whole)
    with pytest.raises(ValueError, match=r"save `model.state_dict\(\)`") as err:
        build_speech_tower(
            SpeechTowerConfig(init=TowerInit("torchaudio", str(whole), "wav2vec2_model"), arch_args=args), 8
        )
    assert "\n" not in str(err.value)


def test_read_state_dict_refuses_what_is_not_a_state_dict(tmp_path: Path) -> None:
    (tmp_path / "notes.pt").write_text("not a checkpoint")
    torch.save({"state_dict": {"w": torch.ones(2)}}, tmp_path / "wrapped.pt")
    truncated = (tmp_path / "wrapped.pt").read_bytes()[:40]
    (tmp_path / "truncated.pt").write_bytes(truncated)
    torch.save([torch.ones(2)], tmp_path / "list.pt")
    assert read_state_dict(tmp_path / "wrapped.pt")["w"].tolist() == [1.0, 1.0]  # a Lightning-style wrapper
    for name in ("notes.pt", "truncated.pt"):
        with pytest.raises(
            ValueError, match=f"{name} is not a readable torch.save file .*: give a state dict"
        ):
            read_state_dict(tmp_path / name)
    with pytest.raises(ValueError, match="list.pt holds a list, not a state dict of tensors"):
        read_state_dict(tmp_path / "list.pt")


def test_speech_folder_of_another_model_type_is_refused(tmp_path: Path) -> None:
    folder = bert_folder(tmp_path)
    with pytest.raises(ValueError, match="model_type 'bert': give a wav2vec2, hubert or wavlm folder"):
        build_speech_tower(SpeechTowerConfig(init=TowerInit(source="hf", path=str(folder))), embed_dim=8)
    cfg = SpeechTowerConfig(init=TowerInit(source="hf", path=str(folder)))
    with pytest.raises(ValueError, match="takes 16 kHz waveforms: set data.sample_rate 16000"):
        cfg.check_data({"sample_rate": 8000}, "data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        FileNotFoundError, match="has no config.json: give a Hugging Face wav2vec 2.0 / HuBERT"
    ):
        build_speech_tower(SpeechTowerConfig(init=TowerInit(source="hf", path=str(tmp_path / "empty"))), 8)


def test_ours_source_is_the_mlm_checkpoint_start_and_init_ckpt_its_older_spelling(tmp_path: Path) -> None:
    from lightning_modules.mlm_module import MLMPretrainingModule

    torch.manual_seed(0)
    mlm = MLMPretrainingModule(
        vocab_size=50, max_position_embeddings=16, encoder={"size": "tiny", "layers": 1, "hidden": 64}
    )
    ckpt = tmp_path / "mlm.ckpt"
    torch.save({"state_dict": mlm.state_dict()}, ckpt)
    shape = dict(size="tiny", layers=1, hidden=64, heads=1, max_len=16)
    new = build_text_tower(TextTowerConfig(**shape, init=TowerInit("ours", str(ckpt))), 50, embed_dim=8)
    old = build_text_tower(TextTowerConfig(**shape, init_ckpt=str(ckpt)), 50, embed_dim=8)
    for k, v in mlm.model.bert.state_dict().items():
        assert torch.equal(new.bert.state_dict()[k], v) and torch.equal(old.bert.state_dict()[k], v), k
    assert len(new.blocks) == 1 and new.blocks[0] is new.bert.encoder.blocks[0]
    with pytest.raises(ValueError, match="both name a start: keep init"):
        TextTowerConfig(init_ckpt=str(ckpt), init=TowerInit("hf", str(tmp_path)))


def test_librispeech_hubert_config_runs_on_cpu(tmp_path: Path) -> None:
    """configs/speech/librispeech_hubert.yaml with tiny HuBERT and RoBERTa folders on the tone corpus: the data
    are tokenized with the text folder's own tokenizer and a couple of steps train both pretrained towers."""
    from cli import main

    hubert, text = speech_folder(tmp_path, "hubert"), roberta_folder(tmp_path)
    generate_tone_librispeech(tmp_path / "tones", n_train_utts=16, n_val_utts=8)
    cli = main(
        cli_args(
            "fit",
            f"--model.speech.init.path={hubert}",
            f"--model.text.init.path={text}",
            "--model.embed_dim=16",
            f"--data.root={tmp_path / 'tones'}",
            f"--data.tokenizer.path={text}",
            f"--data.tokenizer.cache_dir={tmp_path / 'cache'}",
            "--data.loader.num_workers=0",
            "--data.context_length=64",  # the tiny RoBERTa's position table
            "--data.train_subsets=[train-clean-100]",
            "--data.val_subsets=[dev-clean]",
            "--data.batching.max_batch_seconds=8",
            "--data.batching.max_duration=4",
            "--data.batching.num_buckets=2",
            "--trainer.devices=1",
            "--trainer.strategy=auto",
            "--trainer.precision=32-true",
            "--trainer.max_steps=2",
            "--trainer.limit_val_batches=1",
            "--trainer.val_check_interval=2",
            config="speech/librispeech_hubert.yaml",
            root=tmp_path / "run",
        )
    )
    assert cli.trainer.global_step == 2
    pair = cli.model.pair
    assert isinstance(pair.speech, HFSpeechTower) and isinstance(pair.text, HFTextTower)
    assert cli.datamodule.tokenizer.pad_id == 1  # RoBERTa's <pad>, from the folder's tokenizer
    start = transformers.AutoModel.from_pretrained(hubert, local_files_only=True).state_dict()
    trained = pair.speech.model.state_dict()
    assert any(not torch.equal(trained[k], start[k]) for k in start)  # the pretrained tower trained
    assert "val/a2t_R@1" in cli.trainer.callback_metrics
    assert json.loads((text / "config.json").read_text())["vocab_size"] == cli.model.vocab_size
