"""Wikipedia preparation throughput with 1 and 2 processes, from a multistream dump.

Builds `enwiki-bench-pages-articles-multistream.xml.bz2` and its `-index.txt.bz2` from the genuine sample in
`../shared/data/real/wikipedia` (its pages replicated under generated titles and ids up to `--mb` MB of
wikitext, 100 pages a bz2 stream as Wikimedia writes them), runs `prepare_mlm_cache` on it (reading,
cleaning, sentence splitting, tokenisation, NSP instances) with each process count, and prints MB of
wikitext per second, the scaling `ratio:` and the projected hours for the 22 GB enwiki dump.

    python benchmarks/wiki_prep.py [--mb 200] [--procs 1,2]
"""

from __future__ import annotations

import argparse
import bz2
import html
import os
import re
import resource
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SAMPLE = (
    Path(__file__).resolve().parents[1].parent
    / "shared/data/real/wikipedia/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
ENWIKI_COMPRESSED_GB = 22.0
COMPRESSION_RATIO = 4.5  # enwiki pages-articles: ~22 GB of bz2 hold ~100 GB of XML, nearly all wikitext
NODE_CORES = 32

_PAGE = re.compile(r"<page>.*?</page>", re.DOTALL)
_TEXT = re.compile(r"<text\b[^>]*>(.*?)</text>", re.DOTALL)


def write_multistream(
    folder: Path, name: str, header: str, pages: Sequence[str], pages_per_stream: int = 100
) -> tuple[Path, Path]:
    """Write `<name>.xml.bz2` as Wikimedia's multistream dumps are laid out (a header stream, streams of
    `pages_per_stream` `<page>` elements, a closing stream) and `<name>-index.txt.bz2` listing
    `offset:page_id:title` for every page. `header` is everything before the first `<page>`."""
    folder.mkdir(parents=True, exist_ok=True)
    dump, index = folder / f"{name}.xml.bz2", folder / f"{name}-index.txt.bz2"
    lines = []
    with open(dump, "wb") as f:
        f.write(bz2.compress(header.encode()))
        for start in range(0, len(pages), pages_per_stream):
            offset = f.tell()
            for page in pages[start : start + pages_per_stream]:
                page_id = re.search(r"<id>(\d+)</id>", page).group(1)
                title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
                lines.append(f"{offset}:{page_id}:{title}\n")
            f.write(bz2.compress("".join(pages[start : start + pages_per_stream]).encode()))
        f.write(bz2.compress(b"</mediawiki>\n"))
    index.write_bytes(bz2.compress("".join(lines).encode()))
    return dump, index


def replicate_sample(mb: float) -> tuple[str, list[str], int]:
    """The sample's header and its pages repeated (new titles and ids) until their wikitext reaches `mb` MB;
    returns the header, the pages and the wikitext bytes."""
    xml = bz2.decompress(SAMPLE.read_bytes()).decode()
    header = xml[: xml.index("<page>")]
    sample = _PAGE.findall(xml)
    pages, size, copy = [], 0, 0
    while size < mb * 1e6:
        for page in sample:
            new = re.sub(r"<title>(.*?)</title>", rf"<title>\1 (copy {copy})</title>", page, count=1)
            new = re.sub(r"<id>\d+</id>", f"<id>{len(pages) + 1}</id>", new, count=1)
            pages.append(new)
            size += sum(len(t.encode()) for t in _TEXT.findall(page))
            if size >= mb * 1e6:
                break
        copy += 1
    return header, pages, size


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="MB of wikitext in the generated dump")
    parser.add_argument("--procs", default="1,2", help="process counts to time, comma-separated")
    args = parser.parse_args(argv)
    if not SAMPLE.is_file():
        sys.exit(f"the Wikipedia sample {SAMPLE} is missing")

    from datamodules.text.mlm_prepare import PrepareSettings, prepare_mlm_cache
    from datamodules.tokenizer import TextTokenizer

    procs = [int(p) for p in args.procs.split(",")]
    root = Path(tempfile.mkdtemp(prefix="wiki-prep-bench-"))
    try:
        header, pages, wikitext = replicate_sample(args.mb)
        dump, _ = write_multistream(root / "dump", "enwiki-bench-pages-articles-multistream", header, pages)
        texts = [t for p in pages[:200] for t in _TEXT.findall(p)]
        tokenizer = TextTokenizer.train(texts, vocab_size=30522)
        print(
            f"{len(pages)} pages, {wikitext / 1e6:.1f} MB of wikitext, dump {dump.stat().st_size / 1e6:.1f} MB"
        )
        rates, cpus = {}, {}
        # other jobs on the machine take cores from the workers: the load shows how far to trust the ratio,
        # and the CPU seconds where the work ran (the workers, not the main process)
        print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
        for n in procs:
            main0, kids0 = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
            start = time.perf_counter()
            prepare_mlm_cache(
                [str(dump)], [], tokenizer, PrepareSettings(), root / f"cache-{n}", n, progress=False
            )
            seconds = time.perf_counter() - start
            main_cpu, kids_cpu = _cpu(resource.RUSAGE_SELF) - main0, _cpu(resource.RUSAGE_CHILDREN) - kids0
            rates[n] = wikitext / 1e6 / seconds
            cpus[n] = main_cpu, kids_cpu
            print(
                f"{n} process{'es' if n > 1 else ''}: {seconds:.1f} s, {rates[n]:.2f} MB of wikitext/s "
                f"(CPU: main process {main_cpu:.1f} s, workers {kids_cpu:.1f} s)"
            )
        if len(procs) > 1:
            lo, hi = procs[0], procs[-1]
            print(f"ratio: {rates[hi] / rates[lo]:.2f} ({hi} processes vs {lo})")
        # From CPU seconds, not wall time, so that other jobs on this machine do not skew it: the workers'
        # MB per CPU-second times the node's cores, unless the main process (which stores what they
        # return) cannot keep up. Assumes num_proc=32 and as many free cores.
        worker_rate = wikitext / 1e6 / max(cpu[1] for cpu in cpus.values())
        main_cap = wikitext / 1e6 / max(cpu[0] for cpu in cpus.values())
        total_mb = ENWIKI_COMPRESSED_GB * 1e3 * COMPRESSION_RATIO
        rate = min(NODE_CORES * worker_rate, main_cap)
        print(
            f"projected: {total_mb / rate / 3600:.1f} h for a {ENWIKI_COMPRESSED_GB:.0f} GB enwiki dump "
            f"(~{total_mb / 1e3:.0f} GB of wikitext at {COMPRESSION_RATIO}x) on {NODE_CORES} cores, num_proc="
            f"{NODE_CORES}: {worker_rate:.2f} MB/s a worker CPU, the main process keeps up to {main_cap:.0f} MB/s"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
