"""Preprocessing for MLM pretraining: documents -> sentences -> token ids -> training instances -> shards, in
parallel and in constant memory, with output that depends on the data and the settings only (never on
`num_proc`), written under a cache key so that an interrupted run never leaves a cache a later run would load.
`prepare_mlm_cache` describes the two stages."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import multiprocessing as mp
import os
import shutil
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from datamodules.text import sentences
from datamodules.text.corpora import (
    iter_bookcorpus,
    iter_multistream_range,
    iter_wikipedia,
    iter_wikipedia_file,
    wikipedia_files,
)
from datamodules.text.documents import Document, ReadStats, resolve_paths
from datamodules.text.multistream import multistream_index, plan_multistream
from datamodules.text.sentences import split_sentences
from datamodules.text.wikiclean import to_plain_text as _to_plain_text
from datamodules.tokenizer import TextTokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bump when the same inputs and settings give other instances (e.g. cleaning changes)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class PrepareSettings:
    max_seq_length: int = 128
    nsp: bool = True
    short_seq_prob: float = 0.1
    nsp_random_prob: float = 0.5
    dupe_factor: int = 1
    val_fraction: float = 0.005
    test_fraction: float = 0.005
    lines_per_document: int = 2000
    seed: int = 12345
    # Stage 2's work units: each split is cut into about `shards` contiguous document ranges of equal token
    # count (at least `min_shard_tokens` each), from the data alone. Packing restarts at every cut.
    shards: int = 64
    min_shard_tokens: int = 2**16
    # the variant whose text language-variant markup keeps (`-{zh-cn:域;zh-tw:體}-`); None: the first written
    variant: str | None = None


# ---------------------------------------------------------------------------------------------
# stage 1: documents -> token ids
# ---------------------------------------------------------------------------------------------
def iter_documents(
    wikipedia: list[str], bookcorpus: list[str], stats: ReadStats, lines_per_document: int
) -> Iterator[Document]:
    if wikipedia:
        yield from iter_wikipedia(wikipedia, stats)
    if bookcorpus:
        yield from iter_bookcorpus(bookcorpus, stats, lines_per_document=lines_per_document)


def split_of(doc: Document, val_fraction: float, test_fraction: float) -> str:
    """Assign a document to a split by a stable hash of its identity, so the split never changes.

    The identity is the file's name (not its folder: moving the corpus must not move documents between splits)
    and the document's id within it."""
    u = zlib.crc32(f"{os.path.basename(doc.source)}\x00{doc.doc_id}".encode()) / 2**32
    return "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"


_WORKER_TOKENIZER: TextTokenizer | None = None


def _init_worker(tokenizer_json: str) -> None:
    from tokenizers import Tokenizer

    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = TextTokenizer(Tokenizer.from_str(tokenizer_json))


_Tokenized = tuple[str, np.ndarray, np.ndarray]  # split, a document's token ids, its sentences' lengths


def _tokenize_documents(docs: list[tuple[str, Document]], variant: str | None = None) -> list[_Tokenized]:
    """Worker: plain text -> sentences -> token ids, one tokenizer call for the whole chunk.

    A document comes back as one flat array and its sentence lengths, not an array a sentence: the main
    process writes it in one call, which keeps it from being the bottleneck with many workers."""
    texts = [split_sentences(_to_plain_text(d, variant)) for _, d in docs]
    flat = [s for sents in texts for s in sents]
    ids = _WORKER_TOKENIZER.encode_batch(flat) if flat else []
    out, k = [], 0
    for (split, _), sents in zip(docs, texts):
        kept = [x for x in ids[k : k + len(sents)] if x]
        k += len(sents)
        tokens = np.fromiter((t for x in kept for t in x), dtype=np.int32)
        out.append((split, tokens, np.asarray([len(x) for x in kept], dtype=np.int64)))
    return out


# Stage 1's work units, consumed in this order so that documents keep the corpus order whatever the
# number of processes: ("streams", StreamRange) a byte range of a multistream dump, ("file", path) a
# Wikipedia file a worker reads whole, ("docs", [(split, Document)]) documents read by this process.
_Unit = tuple[str, object]


def _read_units(
    wikipedia: list[str],
    bookcorpus: list[str],
    stats: ReadStats,
    s: PrepareSettings,
    docs_per_task: int,
    file_unit_bytes: int,
    stream_unit_bytes: int,
) -> Iterator[_Unit]:
    """Who reads what: workers parse multistream ranges and small files themselves; a large plain file
    (a single-stream dump, a big JSONL) is parsed here and fed to the workers in chunks."""
    for path in wikipedia_files(wikipedia) if wikipedia else []:
        if (index := multistream_index(path)) is not None:
            stats.files_read += 1
            for unit in plan_multistream(path, index, stream_unit_bytes):
                yield "streams", unit
        elif path.stat().st_size <= file_unit_bytes:
            yield "file", str(path)
        else:
            docs = (
                (split_of(d, s.val_fraction, s.test_fraction), d) for d in iter_wikipedia_file(path, stats)
            )
            for chunk in _chunks(docs, docs_per_task):
                yield "docs", chunk
    if bookcorpus:
        books = iter_bookcorpus(bookcorpus, stats, lines_per_document=s.lines_per_document)
        docs = ((split_of(d, s.val_fraction, s.test_fraction), d) for d in books)
        for chunk in _chunks(docs, docs_per_task):
            yield "docs", chunk


def _prepare_unit(
    args: tuple[_Unit, float, float, int, str | None],
) -> tuple[list[_Tokenized], ReadStats | None]:
    """Worker: read a unit (unless this process did), then clean and tokenise its documents in order."""
    (kind, what), val_fraction, test_fraction, docs_per_task, variant = args
    if kind == "docs":
        return _tokenize_documents(what, variant), None
    stats = ReadStats()
    if kind == "streams":
        docs: Iterable[Document] = iter_multistream_range(what, stats)
    else:
        docs = iter_wikipedia_file(Path(what), stats)
    out = []
    for chunk in _chunks(((split_of(d, val_fraction, test_fraction), d) for d in docs), docs_per_task):
        out.extend(_tokenize_documents(chunk, variant))
    return out, stats


def _chunks(docs: Iterable[tuple[str, Document]], size: int) -> Iterator[list[tuple[str, Document]]]:
    chunk = []
    for d in docs:
        chunk.append(d)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _SentenceStore:
    """Append-only writer of one split's sentences: tokens.bin, sentence offsets, document offsets."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.dtype = folder, dtype
        self.tokens = open(folder / "tokens.bin", "wb")  # noqa: SIM115 - closed in close()
        self.sent_ends: list[int] = []  # flushed to disk in chunks below
        self.sent_file = open(folder / "sent_ends.bin", "wb")  # noqa: SIM115
        self.doc_ends: list[int] = []
        self.n_tokens = self.n_sents = 0

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """One document: its sentences' token ids end to end, and their lengths."""
        self.tokens.write(tokens.astype(self.dtype).tobytes())
        self.sent_ends.extend((self.n_tokens + np.cumsum(lengths)).tolist())
        self.n_tokens += tokens.size
        self.n_sents += lengths.size
        self.doc_ends.append(self.n_sents)
        if len(self.sent_ends) > 100_000:
            self.sent_file.write(np.asarray(self.sent_ends, dtype=np.int64).tobytes())
            self.sent_ends.clear()

    def discard(self) -> None:
        self.tokens.close()
        self.sent_file.close()

    def close(self) -> dict:
        self.sent_file.write(np.asarray(self.sent_ends, dtype=np.int64).tobytes())
        self.tokens.close()
        self.sent_file.close()
        np.save(self.folder / "doc_ends.npy", np.asarray(self.doc_ends, dtype=np.int64))
        return {"documents": len(self.doc_ends), "sentences": self.n_sents, "tokens": self.n_tokens}


def _map(path: Path, dtype: np.dtype) -> np.ndarray:
    # np.memmap refuses an empty file (an empty split)
    return np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype)


class SentenceStore:
    """Read side of `_SentenceStore`, memory-mapped: a worker opens it once, whatever the corpus size."""

    def __init__(self, folder: Path, dtype: np.dtype) -> None:
        # plain ndarray views of the maps: slicing an np.memmap costs ten times more
        self.tokens = np.asarray(_map(folder / "tokens.bin", dtype))
        self.sent_ends = np.asarray(_map(folder / "sent_ends.bin", np.dtype(np.int64)))
        self.doc_ends = np.load(folder / "doc_ends.npy")

    @property
    def num_docs(self) -> int:
        return self.doc_ends.size

    def sentence_range(self, d: int) -> tuple[int, int]:
        """First and one-past-last sentence of document `d`."""
        return int(self.doc_ends[d - 1]) if d else 0, int(self.doc_ends[d])

    def sentence(self, k: int) -> np.ndarray:
        return self.tokens[self.sent_ends[k - 1] if k else 0 : self.sent_ends[k]]

    def document(self, d: int) -> list[np.ndarray]:
        s0, s1 = self.sentence_range(d)
        ends = self.sent_ends[s0:s1].tolist()
        starts = [int(self.sent_ends[s0 - 1]) if s0 else 0, *ends[:-1]]
        return [self.tokens[a:b] for a, b in zip(starts, ends)]

    def document_token_ends(self) -> np.ndarray:
        """Cumulative token count at the end of each document (every stored document has a sentence)."""
        return self.sent_ends[self.doc_ends - 1] if self.num_docs else np.zeros(0, np.int64)


# ---------------------------------------------------------------------------------------------
# stage 2: sentences -> instances
# ---------------------------------------------------------------------------------------------
def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator) -> None:
    """Trim the longer segment first, one token at a time from the front or back at random (as in BERT),
    in place. The coin flips are drawn at once and the lists cut once: token-by-token deletion with a
    random draw each costs a third of the time spent building NSP instances."""
    excess = len(a) + len(b) - max_tokens
    if excess <= 0:
        return
    lengths = [len(a), len(b)]
    cuts = [[0, 0], [0, 0]]  # per segment: tokens off the front, off the back
    for back in (rng.random(excess) >= 0.5).tolist():
        longer = 0 if lengths[0] > lengths[1] else 1
        lengths[longer] -= 1
        cuts[longer][back] += 1
    for seg, (front, back) in zip((a, b), cuts):
        del seg[len(seg) - back :]
        del seg[:front]


def nsp_instances(
    store: SentenceStore, doc: int, s: PrepareSettings, cls_id: int, sep_id: int, rng: np.random.Generator
) -> Iterator[tuple[list[int], int, int]]:
    """(tokens, length of [CLS] A [SEP], is_random_next) for one document, as in BERT's data creation."""
    document = store.document(doc)
    max_tokens = s.max_seq_length - 3
    target = max_tokens if rng.random() >= s.short_seq_prob else int(rng.integers(2, max_tokens + 1))
    chunk: list[np.ndarray] = []
    length, i = 0, 0
    while i < len(document):
        chunk.append(document[i])
        length += document[i].size
        if i == len(document) - 1 or length >= target:
            if chunk:
                a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
                a = [t for seg in chunk[:a_end] for t in seg.tolist()]
                b: list[int] = []
                random_next = len(chunk) == 1 or rng.random() < s.nsp_random_prob
                if random_next and store.num_docs > 1:
                    target_b = max(1, target - len(a))
                    other = int(rng.integers(0, store.num_docs - 1))
                    other += other >= doc  # any document but this one
                    # read only the sentences used: a BookCorpus document has 2000 of them
                    first, end = store.sentence_range(other)
                    for k in range(int(rng.integers(first, end)), end):
                        b.extend(store.sentence(k).tolist())
                        if len(b) >= target_b:
                            break
                    i -= len(chunk) - a_end  # the unused segments go back into the stream
                else:
                    random_next = False
                    b = [t for seg in chunk[a_end:] for t in seg.tolist()]
                truncate_pair(a, b, max_tokens, rng)
                if a and b:
                    tokens = [cls_id, *a, sep_id, *b, sep_id]
                    yield tokens, len(a) + 2, int(random_next)
            chunk, length = [], 0
            target = max_tokens if rng.random() >= s.short_seq_prob else int(rng.integers(2, max_tokens + 1))
        i += 1


def packed_instances(
    store: SentenceStore, docs: range, s: PrepareSettings, cls_id: int, sep_id: int
) -> Iterator[tuple[list[int], int, int]]:
    """FULL-SENTENCES: whole sentences packed to max_seq_length - 2, crossing document boundaries."""
    budget = s.max_seq_length - 2
    cur: list[int] = []
    for d in docs:
        for sent in store.document(d):
            sent = sent.tolist()
            while sent:
                if cur and len(cur) + len(sent) > budget:
                    yield [cls_id, *_strip_sep(cur, sep_id), sep_id], 0, 0
                    cur = []
                take = sent[:budget]  # a sentence longer than the budget is split
                cur.extend(take)
                sent = sent[budget:]
        if cur and len(cur) < budget:
            cur.append(sep_id)  # document boundary
    if cur:
        yield [cls_id, *_strip_sep(cur, sep_id), sep_id], 0, 0


def _strip_sep(tokens: list[int], sep_id: int) -> list[int]:
    """A document-boundary [SEP] at the very end would double the closing one."""
    return tokens[:-1] if tokens and tokens[-1] == sep_id else tokens


def plan_shards(doc_token_ends: np.ndarray, s: PrepareSettings) -> list[tuple[int, int]]:
    """Cut a split into contiguous document ranges `[d0, d1)` of about equal token count.

    The cuts depend on the token counts and the settings only (never on the number of processes), so the
    packing restarts, and hence the instances, are the same on every machine."""
    n = doc_token_ends.size
    if n == 0:
        return []
    total = int(doc_token_ends[-1])
    size = max(s.min_shard_tokens, -(-total // s.shards))
    # a range ends with the document that reaches the next multiple of `size` tokens
    thresholds = np.arange(1, -(-total // size), dtype=np.int64) * size
    ends = np.unique(np.r_[np.searchsorted(doc_token_ends, thresholds, side="left") + 1, n]).tolist()
    return list(zip([0, *ends[:-1]], ends))


_WORKER_STORES: dict[str, SentenceStore] = {}


def _open_stores(folder: str, dtype: str) -> None:
    """Pool initializer: every worker maps the sentence stores once, not once per shard."""
    global _WORKER_STORES
    _WORKER_STORES = {sp: SentenceStore(Path(folder) / "sentences" / sp, np.dtype(dtype)) for sp in SPLITS}


def _write_shard(args: tuple) -> dict:
    folder, split, shard, d0, d1, settings, cls_id, sep_id, dtype = args
    s = PrepareSettings(**settings)
    store = _WORKER_STORES[split]
    prefix = Path(folder) / split / f"shard-{shard:05d}"
    prefix.parent.mkdir(parents=True, exist_ok=True)
    ends, a_lens, labels = [], [], []
    n = 0
    split_id = zlib.crc32(split.encode())
    with open(f"{prefix}.tokens.bin", "wb") as f:
        for dupe in range(s.dupe_factor):
            if s.nsp:
                # A stream per document, seeded by its place in the split: its pairs are the same in
                # whichever shard and process it lands.
                gen = (
                    x
                    for d in range(d0, d1)
                    for x in nsp_instances(
                        store, d, s, cls_id, sep_id, np.random.default_rng([s.seed, split_id, dupe, d])
                    )
                )
            else:
                gen = packed_instances(store, range(d0, d1), s, cls_id, sep_id)
            for tokens, a_len, label in gen:
                f.write(np.asarray(tokens, dtype=dtype).tobytes())
                n += len(tokens)
                ends.append(n)
                a_lens.append(a_len)
                labels.append(label)
    np.save(f"{prefix}.ends.npy", np.asarray(ends, dtype=np.int64))
    np.save(f"{prefix}.a_lens.npy", np.asarray(a_lens, dtype=np.int32))
    np.save(f"{prefix}.nsp.npy", np.asarray(labels, dtype=np.int8))
    return {"split": split, "name": prefix.name, "instances": len(ends), "tokens": n}


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------
def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def sentence_splitter() -> str:
    """The splitter `split_sentences` runs in this process: blingfire's model, or the regex fallback where
    its wheel does not load (e.g. Linux arm64). They cut different sentences, hence different instances."""
    return "regex fallback" if sentences._blingfire is None else f"blingfire {_version('blingfire')}"


def toolchain() -> dict[str, str]:
    """What besides the inputs and the settings shapes the instances: the sentence splitter, the wikitext
    parser, the tokenizer library and numpy's random streams (not promised stable across its releases)."""
    return {
        "sentence_splitter": sentence_splitter(),
        "mwparserfromhell": _version("mwparserfromhell"),
        "tokenizers": _version("tokenizers"),
        "numpy": np.__version__,
    }


def cache_key(inputs: list[Path], tokenizer: TextTokenizer, settings: PrepareSettings) -> str:
    """Hash of everything that changes the prepared instances: the input files (path, size, mtime), the
    tokenizer, the settings, `toolchain()` and the format. Not `num_proc`: it does not change them."""
    files = []
    for p in inputs:
        for f in sorted(p.rglob("*")) if p.is_dir() else [p]:
            if f.is_file():
                st = f.stat()
                files.append([str(f.resolve()), st.st_size, int(st.st_mtime)])
    blob = json.dumps(
        [FORMAT_VERSION, files, tokenizer.fingerprint(), asdict(settings), toolchain()], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _available_cpus() -> int:
    # the CPUs this process may run on (a container or `taskset` may allow fewer than the machine has)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def prepare_mlm_cache(
    wikipedia: list[str],
    bookcorpus: list[str],
    tokenizer: TextTokenizer,
    settings: PrepareSettings,
    cache_dir: str | os.PathLike,
    num_proc: int | None = None,
    docs_per_task: int = 64,
    progress: bool = True,
    file_unit_bytes: int = 64 << 20,
    stream_unit_bytes: int = 1 << 18,
) -> Path:
    """Build (or find) the instance shards for these inputs and return the cache folder.

    Stage 1 reads the corpora in worker processes (byte ranges of bz2 streams of a multistream Wikipedia dump,
    or whole files; a large plain file is read by the main process and fed to them), which turn each document
    into plain text, sentences and token ids (batched through the Rust tokenizer); the main process appends
    them, in corpus order, to a per-split sentence store on disk (flat token array + sentence and document
    offsets), so memory stays constant whatever the corpus size.
    Stage 2 builds training instances from document ranges in parallel, one shard per range:

    * with NSP, as Google's `create_pretraining_data.py`: document-aware segment pairs A/B, B the actual next
      segment or (50%) a segment of a random other document, target length `max_seq_length - 3` or, with
      probability `short_seq_prob`, a random shorter one; the longer segment is truncated first;
    * without NSP, RoBERTa's FULL-SENTENCES: whole sentences packed up to `max_seq_length - 2` across
      document boundaries (a [SEP] marks each boundary), so almost no position is padding.

    The output depends on the data and the settings only, never on `num_proc` or on how the input is read:
    stage 1 keeps the corpus order, stage 2's ranges are cut from the token counts (`plan_shards`) and every
    document draws from its own random stream, seeded by its position in the split. The processes only decide
    who builds which shard, so two machines with the same inputs, tokenizer, settings and libraries write
    byte-identical shards under the same cache key (`cache_key`).

    Everything is written into a temporary folder renamed into place at the end: an interrupted run never
    leaves a cache that a later run would load.

    Reading is parallel too: the `num_proc` workers decompress and parse their own byte ranges of a
    multistream dump (its `*-index.txt.bz2` found beside it), of about `stream_unit_bytes` compressed, and
    read Wikipedia files of up to `file_unit_bytes` whole; a larger plain file and BookCorpus are read by
    this process and fed to the workers. None of this changes the instances."""
    inputs = resolve_paths([*wikipedia, *bookcorpus])
    # the index decides how a dump is read, not what is read; keyed all the same, as any input file
    indexes = [i for p in inputs if (i := multistream_index(p)) is not None]
    inputs += [i for i in indexes if i not in inputs]
    key = cache_key(inputs, tokenizer, settings)
    final = Path(cache_dir) / f"mlm-{key}"
    if (final / "index.json").is_file():
        log.info("reusing prepared MLM data in %s", final)
        return final
    num_proc = num_proc or max(1, min(8, _available_cpus()))
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_dir) / f".tmp-mlm-{key}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65535 else np.int32)
    stats = ReadStats()
    stores = {sp: _SentenceStore(tmp / "sentences" / sp, dtype) for sp in SPLITS}
    units = _read_units(
        wikipedia, bookcorpus, stats, settings, docs_per_task, file_unit_bytes, stream_unit_bytes
    )
    tasks = (
        (u, settings.val_fraction, settings.test_fraction, docs_per_task, settings.variant) for u in units
    )
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    n_docs = n_tok = 0
    bar = tqdm(desc="tokenizing documents", unit=" docs", disable=not progress)
    worker_stats = ReadStats()  # merged after the reads of this process, in unit order: the same every run
    try:
        with ctx.Pool(num_proc, initializer=_init_worker, initargs=(tokenizer.tokenizer.to_str(),)) as pool:
            # imap returns the units' results in unit order, hence documents in corpus order
            for result, unit_stats in pool.imap(_prepare_unit, tasks):
                if unit_stats is not None:
                    worker_stats.merge(unit_stats)
                for split, tokens, lengths in result:
                    if lengths.size:
                        stores[split].add(tokens, lengths)
                        n_docs += 1
                        n_tok += tokens.size
                bar.update(len(result))
                bar.set_postfix(tokens=f"{n_tok:,}", kept=n_docs)
    except BaseException:
        # a read that fails (an index that does not fit its dump, a file of unknown format) leaves no debris
        for store in stores.values():
            store.discard()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    bar.close()
    stats.merge(worker_stats)
    stats.log("read")
    sentence_stats = {sp: st.close() for sp, st in stores.items()}
    if sentence_stats["train"]["tokens"] == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"no text found in the inputs {[str(p) for p in inputs]} (reader stats: {stats})")

    tasks = []
    for split in SPLITS:
        store = SentenceStore(tmp / "sentences" / split, dtype)
        for shard, (d0, d1) in enumerate(plan_shards(store.document_token_ends(), settings)):
            args = (str(tmp), split, shard, d0, d1, asdict(settings))
            tasks.append((*args, tokenizer.cls_id, tokenizer.sep_id, dtype.str))
    with ctx.Pool(
        min(num_proc, len(tasks)), initializer=_open_stores, initargs=(str(tmp), dtype.str)
    ) as pool:
        shards = list(
            tqdm(
                pool.imap(_write_shard, tasks),
                total=len(tasks),
                desc="building instances",
                disable=not progress,
            )
        )
    shutil.rmtree(tmp / "sentences")
    index = {
        "format": FORMAT_VERSION,
        "dtype": dtype.str,
        "settings": asdict(settings),
        "tokenizer": tokenizer.fingerprint(),
        "toolchain": toolchain(),
        "vocab_size": tokenizer.vocab_size,
        "inputs": [str(p) for p in inputs],
        "reader_stats": asdict(stats),
        "sentences": sentence_stats,
        "shards": {sp: [s for s in shards if s["split"] == sp] for sp in SPLITS},
    }
    (tmp / "index.json").write_text(json.dumps(index, indent=1))
    if final.exists() and not (final / "index.json").is_file():
        shutil.rmtree(final, ignore_errors=True)  # debris of an interrupted removal; never loaded
    try:
        os.replace(tmp, final)
    except OSError:  # a concurrent run finished first; keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
    counts = {sp: sum(s["instances"] for s in index["shards"][sp]) for sp in SPLITS}
    log.info("prepared %s: %s documents kept, %s tokens, instances %s", final, n_docs, n_tok, counts)
    return final


class InstanceShards:
    """Random access to the instances of one split, memory-mapped lazily (safe across forked workers)."""

    def __init__(self, folder: str | os.PathLike, split: str) -> None:
        self.folder = Path(folder)
        index = json.loads((self.folder / "index.json").read_text())
        self.dtype = np.dtype(index["dtype"])
        self.shards = [s for s in index["shards"][split] if s["instances"]]
        self.split = split
        self.cum = np.cumsum([0] + [s["instances"] for s in self.shards])
        self._maps: dict[int, tuple] = {}

    def __len__(self) -> int:
        return int(self.cum[-1])

    def _shard(self, k: int) -> tuple:
        if k not in self._maps:
            prefix = self.folder / self.split / self.shards[k]["name"]
            ends = np.load(f"{prefix}.ends.npy")
            self._maps[k] = (
                np.memmap(f"{prefix}.tokens.bin", dtype=self.dtype, mode="r"),
                np.r_[0, ends[:-1]],
                ends,
                np.load(f"{prefix}.a_lens.npy"),
                np.load(f"{prefix}.nsp.npy"),
            )
        return self._maps[k]

    def __getitem__(self, i: int) -> tuple[np.ndarray, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = int(np.searchsorted(self.cum, i, side="right") - 1)
        tokens, starts, ends, a_lens, nsp = self._shard(k)
        j = i - self.cum[k]
        return np.asarray(tokens[starts[j] : ends[j]], dtype=np.int64), int(a_lens[j]), int(nsp[j])
