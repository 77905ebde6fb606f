"""MLM preprocessing: NSP pairs and packed FULL-SENTENCES instances, the same bytes whatever `num_proc`,
the on-disk cache (reuse, new keys, interrupted runs) and the MLM DataModule end to end, on BookCorpus-style
and JSON-lines Wikipedia corpora written to tmp_path."""

from __future__ import annotations

import importlib.metadata
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.text import mlm_prepare, sentences
from datamodules.text.mlm_datamodule import MLMDataModule, MLMInstanceDataset
from datamodules.text.mlm_prepare import (
    InstanceShards,
    PrepareSettings,
    cache_key,
    plan_shards,
    prepare_mlm_cache,
    sentence_splitter,
    truncate_pair,
)
from datamodules.tokenizer import TextTokenizer
from lightning_modules.components.bert import SparseLayout
from tests.helpers import sha256_of_files

COMMON_WORDS = (
    "the a of and to in is was he she it they we you that for on with as his her at by from this had not "
    "but are or have be one all there were when an which their said if do will each about how up out them "
    "then many some so these would other into has more two like him see time could no make than first been "
    "its who now people my made over did down only way find use may water long little very after called"
)
WORDS = COMMON_WORDS.split()
MAX_LEN = 64


def _write_books(path: Path, n_docs: int, sentences: tuple[int, int], seed: int = 0) -> list[list[str]]:
    """A `books_large_*.txt` file: one lowercased sentence a line, documents separated by blank lines."""
    rng = random.Random(seed)
    docs = [
        [" ".join(rng.choices(WORDS, k=rng.randint(6, 14))) + " ." for _ in range(rng.randint(*sentences))]
        for _ in range(n_docs)
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    return docs


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[list[str]], TextTokenizer]:
    """Twelve long documents (~100 sentences of 7-15 tokens each), so document ends are rare."""
    root = tmp_path_factory.mktemp("corpus")
    docs = _write_books(root / "books_large_p1.txt", n_docs=12, sentences=(100, 120))
    tok = TextTokenizer.train([s for d in docs for s in d], vocab_size=500)
    return root / "books_large_p1.txt", docs, tok


def _settings(**kw) -> PrepareSettings:
    return PrepareSettings(**{"max_seq_length": MAX_LEN, "val_fraction": 0.0, "test_fraction": 0.0, **kw})


def _prepare(corpus, cache: Path, num_proc: int = 1, **kw) -> Path:
    path, _, tok = corpus
    return prepare_mlm_cache([], [str(path)], tok, _settings(**kw), cache, num_proc=num_proc, progress=False)


@pytest.fixture(scope="module")
def nsp_cache(corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _prepare(corpus, tmp_path_factory.mktemp("nsp-cache"))


def test_nsp_instances_have_bert_layout(corpus, nsp_cache: Path) -> None:
    _, _, tok = corpus
    shards = InstanceShards(nsp_cache, "train")
    data = MLMInstanceDataset(nsp_cache, "train")
    assert len(shards) == len(data) > 250
    assert len(InstanceShards(nsp_cache, "val")) == 0  # val_fraction=0
    labels = []
    for i in range(len(shards)):
        tokens, a_len, is_random = shards[i]
        n = tokens.size
        assert n <= MAX_LEN
        assert tokens[0] == tok.cls_id and (tokens[1:] != tok.cls_id).all()
        seps = np.flatnonzero(tokens == tok.sep_id).tolist()
        assert seps == [a_len - 1, n - 1]  # [CLS] A [SEP] B [SEP], neither segment empty
        assert 3 <= a_len <= n - 2
        sample = data[i]
        assert sample["token_type_ids"].tolist() == [0] * a_len + [1] * (n - a_len)
        assert sample["nsp_label"] == is_random and sample["index"] == i and sample["epoch"] == 0
        assert np.array_equal(sample["input_ids"], tokens)
        labels.append(is_random)
    assert set(labels) == {0, 1}
    assert 0.4 <= np.mean(labels) <= 0.6

    data.set_epoch(3)
    assert data[0]["epoch"] == 3


def _short_fraction(folder: Path) -> float:
    shards = InstanceShards(folder, "train")
    return float(np.mean([shards[i][0].size < MAX_LEN - 4 for i in range(len(shards))]))


def test_short_sequences_follow_short_seq_prob(corpus, nsp_cache: Path, tmp_path: Path) -> None:
    # A full-target pair is truncated to exactly MAX_LEN tokens, except at the rare document ends; a short
    # target (uniform in [2, MAX_LEN - 3]) almost always gives fewer.
    never = _prepare(corpus, tmp_path, short_seq_prob=0.0)
    often = _prepare(corpus, tmp_path, short_seq_prob=0.5)
    assert _short_fraction(never) < 0.04
    assert 0.05 <= _short_fraction(nsp_cache) <= 0.17  # short_seq_prob=0.1
    assert 0.35 <= _short_fraction(often) <= 0.6


def test_packed_instances_are_near_full_and_keep_token_order(corpus, tmp_path: Path) -> None:
    path, docs, tok = corpus
    max_len = 128
    folder = _prepare(
        corpus, tmp_path, num_proc=2, nsp=False, max_seq_length=max_len, shards=3, min_shard_tokens=1
    )
    shards = InstanceShards(folder, "train")
    assert len(shards.shards) == 3  # as many as `shards` asks, whatever num_proc; packing restarts at each
    lengths, stream = [], []
    for i in range(len(shards)):
        tokens, a_len, label = shards[i]
        assert tokens.size <= max_len and (a_len, label) == (0, 0)
        assert tokens[0] == tok.cls_id and tokens[-1] == tok.sep_id
        lengths.append(tokens.size)
        stream.extend(tokens[1:-1].tolist())
    last_of_shard = set((shards.cum[1:] - 1).tolist())
    body = [n for i, n in enumerate(lengths) if i not in last_of_shard]
    assert np.mean(body) > 0.9 * max_len
    # every sentence's tokens, in corpus order, with a [SEP] between documents (none after the last of a
    # shard, and a [SEP] that would overflow an instance is left out)
    expected = [t for d in docs for t in [*sum(tok.encode_batch(d), []), tok.sep_id]]
    assert [t for t in stream if t != tok.sep_id] == [t for t in expected if t != tok.sep_id]
    # a boundary [SEP] that would end an instance is dropped (it would double the closing [SEP])
    assert len(docs) - len(lengths) <= stream.count(tok.sep_id) <= len(docs)

    data = MLMInstanceDataset(folder, "train")
    sample = data[0]
    assert "nsp_label" not in sample
    assert sample["token_type_ids"].tolist() == [0] * lengths[0]


def test_second_call_reuses_the_cache(corpus, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _prepare(corpus, tmp_path)
    index = first / "index.json"
    stamp = index.stat().st_mtime_ns
    meta = json.loads(index.read_text())
    assert meta["settings"]["max_seq_length"] == MAX_LEN and meta["vocab_size"] == corpus[2].vocab_size
    assert not (first / "sentences").exists()  # the intermediate sentence store is dropped

    def no_reading(*args, **kwargs):
        raise AssertionError("the corpus was read again")

    monkeypatch.setattr(mlm_prepare, "iter_documents", no_reading)
    monkeypatch.setattr(mlm_prepare, "_read_units", no_reading)
    assert _prepare(corpus, tmp_path) == first
    assert index.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_changed_settings_or_inputs_give_a_new_folder(corpus, tmp_path: Path) -> None:
    first = _prepare(corpus, tmp_path)
    other = _prepare(corpus, tmp_path, short_seq_prob=0.2)
    assert other != first and (other / "index.json").is_file() and (first / "index.json").is_file()

    # an edited corpus file (new size and mtime) is a new key too
    copy = tmp_path / "books" / "books_large_p2.txt"
    _write_books(copy, n_docs=4, sentences=(10, 12))
    _, _, tok = corpus
    a = prepare_mlm_cache([], [str(copy)], tok, _settings(), tmp_path, num_proc=1, progress=False)
    with copy.open("a", encoding="utf-8") as f:
        f.write("\none more sentence about water .\n")
    b = prepare_mlm_cache([], [str(copy)], tok, _settings(), tmp_path, num_proc=1, progress=False)
    assert a != b
    assert sum(s["instances"] for s in json.loads((a / "index.json").read_text())["shards"]["train"]) > 0


def test_plan_shards_cuts_at_equal_token_counts() -> None:
    uniform = np.arange(1, 101) * 10  # 100 documents of 10 tokens
    assert plan_shards(uniform, _settings(shards=4, min_shard_tokens=1)) == [
        (0, 25),
        (25, 50),
        (50, 75),
        (75, 100),
    ]
    # min_shard_tokens keeps small splits from being cut into slivers: 1000 tokens by 400
    assert plan_shards(uniform, _settings(shards=4, min_shard_tokens=400)) == [(0, 40), (40, 80), (80, 100)]
    # a document longer than a share takes the shares it covers
    skewed = np.cumsum([10, 10, 10, 10, 460, 10, 10])
    assert plan_shards(skewed, _settings(shards=4, min_shard_tokens=1)) == [(0, 5), (5, 7)]
    assert plan_shards(np.zeros(0, np.int64), _settings()) == []


def test_truncate_pair_trims_the_longer_segment_from_both_ends() -> None:
    fronts = backs = 0
    for seed in range(20):
        a, b = list(range(10)), list(range(100, 103))
        truncate_pair(a, b, 8, np.random.default_rng(seed))
        assert b == [100, 101, 102] and len(a) == 5 and a == list(range(a[0], a[0] + 5))
        fronts, backs = fronts + a[0], backs + 5 - a[0]
        a, b = list(range(6)), list(range(100, 106))
        truncate_pair(a, b, 8, np.random.default_rng(seed))
        assert len(a) == len(b) == 4 and a == list(range(a[0], a[0] + 4)) and b == list(range(b[0], b[0] + 4))
    assert fronts > 10 and backs > 10  # both ends are cut, at random


def _write_wiki_jsonl(path: Path, n_docs: int, seed: int) -> None:
    """JSON lines with capitalised multi-sentence paragraphs, so that the sentence splitter has work."""
    rng = random.Random(seed)
    lines = []
    for k in range(n_docs):
        paragraphs = [
            " ".join(" ".join(rng.choices(WORDS, k=rng.randint(5, 12))).capitalize() + "." for _ in range(4))
            for _ in range(rng.randint(3, 8))
        ]
        lines.append(json.dumps({"id": str(k), "title": f"Article {k}", "text": "\n".join(paragraphs)}))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@pytest.mark.parametrize("nsp", [True, False])
def test_instances_do_not_depend_on_num_proc(corpus, tmp_path: Path, nsp: bool) -> None:
    _, _, tok = corpus
    books = tmp_path / "books"
    for i in range(3):
        _write_books(books / f"book_{i}.txt", n_docs=5, sentences=(8, 30), seed=10 + i)
    wiki = tmp_path / "wiki.jsonl"
    _write_wiki_jsonl(wiki, n_docs=30, seed=3)
    settings = _settings(nsp=nsp, dupe_factor=2, val_fraction=0.2, shards=6, min_shard_tokens=1)
    folders = [
        prepare_mlm_cache(
            [str(wiki)], [str(books)], tok, settings, tmp_path / f"c{n}", num_proc=n, progress=False
        )
        for n in (1, 3)
    ]
    assert folders[0].name == folders[1].name  # one cache key
    one, three = (sha256_of_files(f) for f in folders)
    assert one == three
    index = json.loads((folders[0] / "index.json").read_text())
    assert len(index["shards"]["train"]) > 3 and index["shards"]["val"]  # more shards than processes
    assert len(one) == 1 + 4 * sum(len(v) for v in index["shards"].values())
    assert index["toolchain"]["sentence_splitter"] == sentence_splitter()


def test_cache_key_changes_with_the_sentence_splitter(corpus, monkeypatch: pytest.MonkeyPatch) -> None:
    path, _, tok = corpus
    real_version = importlib.metadata.version

    def key(splitter, blingfire_version: str = "0.1.8") -> str:
        monkeypatch.setattr(sentences, "_blingfire", splitter)
        monkeypatch.setattr(
            importlib.metadata,
            "version",
            lambda d: blingfire_version if d == "blingfire" else real_version(d),
        )
        return cache_key([path], tok, _settings())

    blingfire = key(lambda text: text)
    assert sentence_splitter() == "blingfire 0.1.8"
    assert key(lambda text: text) == blingfire  # nothing changed, same key
    fallback = key(None)
    assert sentence_splitter() == "regex fallback"
    newer = key(lambda text: text, "0.1.9")
    assert len({blingfire, fallback, newer}) == 3


def _instances(folder: Path) -> list[tuple[list[int], int, int]]:
    shards = InstanceShards(folder, "train")
    return [(t.tolist(), a, n) for t, a, n in (shards[i] for i in range(len(shards)))]


def _fail_in_worker(args: tuple) -> dict:
    raise RuntimeError("interrupted while building instances")


@pytest.mark.parametrize("stage", ["tokenizing", "instances"])
def test_interrupted_run_leaves_nothing_loadable(
    corpus, nsp_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    cache = tmp_path / "cache"
    with monkeypatch.context() as m:
        if stage == "tokenizing":

            def fail(self):
                raise RuntimeError("interrupted while tokenizing")

            m.setattr(mlm_prepare._SentenceStore, "close", fail)
        else:
            m.setattr(mlm_prepare, "_write_shard", _fail_in_worker)
        with pytest.raises(RuntimeError, match="interrupted"):
            _prepare(corpus, cache)
    assert not list(cache.glob("*/index.json")) and not list(cache.glob(".*/index.json"))
    assert not list(cache.glob("mlm-*"))

    # a stale temporary folder from another process, complete with an index, is never picked up
    stale = cache / f".tmp-{nsp_cache.name}-99999"
    stale.mkdir()
    (stale / "index.json").write_text('{"shards": {"train": []}}')

    folder = _prepare(corpus, cache)
    assert folder.name == nsp_cache.name and (folder / "index.json").is_file()
    assert _instances(folder) == _instances(nsp_cache)


def test_incomplete_final_folder_is_replaced(corpus, nsp_cache: Path, tmp_path: Path) -> None:
    stale = tmp_path / nsp_cache.name  # e.g. an interrupted `rm -rf` of an old cache
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "shard-00000.tokens.bin").write_bytes(b"")
    folder = _prepare(corpus, tmp_path)
    assert (folder / "index.json").is_file()
    assert _instances(folder) == _instances(nsp_cache)


def _datamodule(tmp_path: Path, books: list[str], **kw) -> MLMDataModule:
    return MLMDataModule(
        bookcorpus=books,
        num_proc=1,
        **kw,
        tokenizer={"vocab_size": 500, "cache_dir": str(tmp_path / "c")},
        examples={"max_seq_length": MAX_LEN, "val_fraction": 0.2},
        loader={"num_workers": 0, "batch_size": 8},
    )


def test_datamodule_end_to_end(tmp_path: Path) -> None:
    books = tmp_path / "books" / "books_large_p1.txt"
    _write_books(books, n_docs=30, sentences=(20, 30), seed=1)
    dm = _datamodule(tmp_path, [str(books)])
    dm.prepare_data()
    (cache,) = (tmp_path / "c").glob("mlm-*")
    stamp = (cache / "index.json").stat().st_mtime_ns
    dm.setup("fit")
    assert dm.folder == cache and (cache / "index.json").stat().st_mtime_ns == stamp
    assert len(list((tmp_path / "c" / "tokenizers").glob("wordpiece-*"))) == 1
    tok = dm.tokenizer
    assert dm.vocab_size == tok.vocab_size <= 500 and dm.pad_id == tok.pad_id
    assert len(dm.datasets["train"]) > 8 and len(dm.datasets["val"]) > 0

    batch = next(iter(dm.train_dataloader()))
    plain = {"input_ids", "token_type_ids", "attention_mask", "labels", "index", "nsp_labels"}
    assert set(batch) == plain | set(SparseLayout._fields)
    b, n = batch["input_ids"].shape
    assert b == 8 and n <= MAX_LEN
    assert (batch["input_ids"][:, 0] == tok.cls_id).all()
    assert batch["nsp_labels"].shape == (8,) and set(batch["nsp_labels"].tolist()) <= {0, 1}
    chosen = batch["labels"] != -100
    assert chosen.any() and not (chosen & ~batch["attention_mask"]).any()
    assert (batch["input_ids"][~batch["attention_mask"]] == tok.pad_id).all()
    assert (batch["token_type_ids"][~batch["attention_mask"]] == 0).all()
    assert (batch["token_type_ids"].sum(1) > 0).all()  # every pair has a segment B
    # the masks of the same instances change with the epoch
    idx = batch["index"].tolist()
    ds = dm.datasets["train"]
    collate = dm.collator()
    again = collate([ds[i] for i in idx])
    assert torch.equal(again["labels"], batch["labels"])
    dm.set_epoch(1)
    assert not torch.equal(collate([ds[i] for i in idx])["labels"], batch["labels"])


def test_datamodule_missing_path_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_books.txt"
    with pytest.raises(FileNotFoundError, match="no_such_books.txt"):
        _datamodule(tmp_path, [str(missing)])
