"""Trained WordPiece vocabularies are the same bytes in every process: `tokenizer.json`, `vocab.txt` and the MLM
shards prepared with them, whatever the process, its hash seed or `num_proc`. Each run is a separate Python
process, since the trainer's order changes from one process to the next, never within one."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from datamodules.tokenizer import SPECIAL_TOKENS, TextTokenizer
from tests.helpers import REPO, sha256_of_files

STEMS = [
    "river",
    "town",
    "north",
    "south",
    "mill",
    "bridge",
    "station",
    "church",
    "market",
    "school",
    "harbour",
    "castle",
    "valley",
    "forest",
    "lake",
    "road",
    "garden",
    "tower",
    "meadow",
    "island",
]
VOCAB_SIZE = 120  # the merges stop amid pairs of equal count, where the trainer's tie-breaking decides

TRAIN = (
    "import sys\n"
    "from pathlib import Path\n"
    "from datamodules.tokenizer import TextTokenizer\n"
    "texts = Path(sys.argv[1]).read_text(encoding='utf-8').splitlines()\n"
    "TextTokenizer.train(iter(texts), vocab_size=int(sys.argv[3])).save(sys.argv[2])\n"
)
PREPARE = (
    "import sys\n"
    "from datamodules.text.mlm_datamodule import MLMDataModule\n"
    "dm = MLMDataModule(bookcorpus=[sys.argv[1]], num_proc=int(sys.argv[3]),\n"
    "    tokenizer={'cache_dir': sys.argv[2], 'vocab_size': 300},\n"
    "    examples={'max_seq_length': 64, 'val_fraction': 0.2}, loader={'num_workers': 0})\n"
    "dm.prepare_data()\n"
)


def _texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = [s + rng.choice(("", "s", "ing", "ed", "er")) for s in STEMS]
    return [" ".join(rng.choices(words, k=12)).capitalize() + "." for _ in range(n)]


def _start(code: str, *args: str | Path, hash_seed: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONHASHSEED": str(hash_seed)}
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(proc: subprocess.Popen) -> None:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out


def test_trained_vocabulary_is_byte_identical_across_processes(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(_texts(400)) + "\n", encoding="utf-8")
    folders = [tmp_path / f"run{seed}" for seed in range(3)]
    # at once: three processes, three hash seeds, three orders of the trainer's hash maps
    procs = [_start(TRAIN, corpus, f, VOCAB_SIZE, hash_seed=seed) for seed, f in enumerate(folders)]
    for proc in procs:
        _wait(proc)
    first, *others = (sha256_of_files(f) for f in folders)
    assert set(first) == {"tokenizer.json", "vocab.txt"}
    assert all(other == first for other in others)
    assert len((folders[0] / "vocab.txt").read_text(encoding="utf-8").splitlines()) == VOCAB_SIZE


def test_trained_vocabulary_has_bert_layout(tmp_path: Path) -> None:
    texts = _texts(400)
    trained = TextTokenizer.train(texts, vocab_size=VOCAB_SIZE)
    trained.save(tmp_path)
    tokens = (tmp_path / "vocab.txt").read_text(encoding="utf-8").splitlines()
    chars = [t for t in tokens if len(t) == 1]
    pieces = [t for t in tokens if len(t) == 3 and t.startswith("##")]
    # special tokens, the characters, the continuation characters (each in code point order), then the merges
    assert tokens[: len(SPECIAL_TOKENS)] == list(SPECIAL_TOKENS)
    assert tokens[len(SPECIAL_TOKENS) : len(SPECIAL_TOKENS) + len(chars)] == sorted(chars)
    start = len(SPECIAL_TOKENS) + len(chars)
    assert tokens[start : start + len(pieces)] == sorted(pieces)
    # every character that follows another within a word ("." is a word of its own)
    assert pieces == sorted(
        {"##" + c for t in texts for word in t.lower().rstrip(".").split() for c in word[1:]}
    )
    assert len(tokens) == VOCAB_SIZE > start + len(pieces)
    # the same tokenizer as its vocab.txt gives: the pieces the trainer took as special tokens are plain ones
    assert TextTokenizer.from_file(tmp_path / "vocab.txt").tokenizer.to_str() == trained.tokenizer.to_str()
    added = trained.tokenizer.get_added_tokens_decoder().values()
    assert sorted(t.content for t in added) == sorted(SPECIAL_TOKENS)
    assert trained.encode_batch(["Gardens."]) == [[tokens.index(t) for t in ("garden", "##s", ".")]]
    assert trained.unk_id not in {i for ids in trained.encode_batch(texts) for i in ids}


@pytest.mark.slow
def test_mlm_datamodule_prepares_identical_bytes_with_num_proc_1_and_3(tmp_path: Path) -> None:
    books = tmp_path / "books" / "books_large_p1.txt"
    books.parent.mkdir()
    docs = [_texts(40, seed) for seed in range(12)]
    books.write_text("\n\n".join("\n".join(d) for d in docs) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"  # one path for both runs: the cache keys name the corpus's path
    runs = {}
    for num_proc in (1, 3):
        _wait(_start(PREPARE, books, cache, num_proc, hash_seed=num_proc))
        runs[num_proc] = cache.rename(tmp_path / f"num_proc{num_proc}")
    one, three = (sha256_of_files(f) for f in runs.values())
    assert one == three
    assert sum(name.endswith("tokenizer.json") for name in one) == 1
    assert sum(name.endswith(".tokens.bin") for name in one) >= 2
