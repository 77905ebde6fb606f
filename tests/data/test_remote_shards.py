"""Remote WebDataset shards: HTTP through fsspec from a server on 127.0.0.1, `pipe:` commands, retries of shards
that fail or are cut short, and the one-line error when none can be read."""

from __future__ import annotations

import functools
import http.server
import logging
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from torch.utils.data import DataLoader

import datamodules.image.shards.members as shard_members
from datamodules.image.coco import eval_transform
from datamodules.image.coco_datamodule import CocoCaptionsDataModule
from datamodules.image.shards.listing import expand_shards
from datamodules.image.shards.members import iter_tar_samples
from datamodules.image.shards.remote import ShardUnreadable
from datamodules.image.shards.stream import ShardLoader, ShardStream
from datamodules.image.shards.write import coco_to_shards
from datamodules.synthetic.shapes import generate_shapes_coco
from tests.helpers import free_port

pytest.importorskip("fsspec")
pytest.importorskip("aiohttp")

LOGGER = "datamodules.image.shards"
TRANSFORM = eval_transform(16)
BRACES = "coco-{000000..000004}.tar"


@pytest.fixture(scope="module")
def coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_shapes_coco(
        tmp_path_factory.mktemp("shapes") / "coco", n_train=24, n_val=2, image_size=32
    )


@pytest.fixture(scope="module")
def shards(coco: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 images in shards of 5: four of 5 and one of 4, with `_info.json` and `sizes.json` beside them."""
    out = tmp_path_factory.mktemp("shards")
    coco_to_shards(coco, "train2017", out, max_samples_per_shard=5)
    return out


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the shard folder; a file named in `server.cuts` is sent with the Content-Length of the whole file
    but only its first half, then, a moment later, the connection is closed (`cuts` holds how many requests of
    the file are cut; -1: every one)."""

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/")
        self.server.requests.append(name)  # type: ignore[attr-defined]
        cuts = self.server.cuts  # type: ignore[attr-defined]
        if cuts.get(name, 0) == 0:
            super().do_GET()
            return
        cuts[name] -= cuts[name] > 0
        data = (Path(self.directory) / name).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        time.sleep(0.05)  # the client reads what came before it sees the connection close
        self.close_connection = True


class Server:
    def __init__(self, folder: Path) -> None:
        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_Handler, directory=str(folder))
        )
        self.httpd.requests, self.httpd.cuts = [], {}  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    @property
    def requests(self) -> list[str]:
        return self.httpd.requests  # type: ignore[attr-defined]

    @property
    def cuts(self) -> dict[str, int]:
        return self.httpd.cuts  # type: ignore[attr-defined]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/{name}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def server(shards: Path) -> Iterator[Server]:
    serving = Server(shards)
    yield serving
    serving.close()


@pytest.fixture
def no_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shard_members, "RETRY_DELAY", 0.0)


def ids(data: ShardStream, epoch: int, workers: int = 0) -> list[list[int | None]]:
    """Image ids (None for an item that did not decode) of each batch of `epoch`."""
    data.set_epoch(epoch)
    loader = DataLoader(data, batch_size=data.batch_size, num_workers=workers, collate_fn=list)
    return [[item and item["image_id"] for item in batch] for batch in loader]


def local(shards: Path, **kwargs) -> ShardStream:
    return ShardStream(expand_shards(str(shards / BRACES)), TRANSFORM, **kwargs)


def test_http_shards_stream_exactly_like_local_ones(shards: Path, server: Server) -> None:
    urls = expand_shards(server.url(BRACES))
    assert urls == [server.url(f"coco-{i:06d}.tar") for i in range(5)]
    assert expand_shards(server.url("")) == urls  # a folder URL, listed through fsspec
    listed = len(server.requests)
    split = {"batch_size": 2, "num_workers": 2, "rank": 1, "world_size": 2}
    data = ShardStream(urls, TRANSFORM, **split)
    assert data.sizes == [5, 5, 5, 5, 4]
    # The counts come from the index file beside the shards; only the first shard is opened (a probe).
    assert server.requests[listed:] == ["_info.json", "coco-000000.tar"]
    remote = ids(data, 1, workers=2)
    assert remote == ids(local(shards, **split), 1, workers=2) and len(remote) == 6


def test_pipe_cat_shards_stream_exactly_like_local_ones(shards: Path) -> None:
    urls = expand_shards(f"pipe:cat '{shards / BRACES}'")
    assert len(urls) == 5 and urls[4] == f"pipe:cat '{shards}/coco-000004.tar'"
    data = ShardStream(urls, TRANSFORM, batch_size=2)
    assert data.sizes == [5, 5, 5, 5, 4]  # from _info.json beside the tar the command names
    got = ids(data, 0)
    assert got == ids(local(shards, batch_size=2), 0) and len({i for b in got for i in b}) == 24


def test_http_stream_resumes_mid_epoch_with_the_next_unseen_batch(shards: Path, server: Server) -> None:
    def loader() -> ShardLoader:
        data = ShardStream(expand_shards(server.url(BRACES)), TRANSFORM, batch_size=2)
        return ShardLoader(data, batch_size=2, collate_fn=list)

    full = [[item["image_id"] for item in batch] for batch in loader()]
    interrupted = iter(loader())
    taken = [[item["image_id"] for item in next(interrupted)] for _ in range(5)]
    resumed = loader()
    resumed.load_state_dict({"epoch": 0, "batches": 5, "world_size": 1, "num_workers": 1})
    rest = [[item["image_id"] for item in batch] for batch in resumed]
    assert taken + rest == full and len(full) == 12


def test_connection_dropped_half_way_is_retried_without_duplicates(
    shards: Path, server: Server, no_delay: None, caplog: pytest.LogCaptureFixture
) -> None:
    server.cuts["coco-000001.tar"] = 1
    data = ShardStream(expand_shards(server.url(BRACES)), TRANSFORM, batch_size=2)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = [i for batch in ids(data, 0) for i in batch]
    assert sorted(got) == sorted(i for batch in ids(local(shards, batch_size=2), 0) for i in batch)
    assert len(set(got)) == 24 and None not in got
    assert server.requests.count("coco-000001.tar") == 2 and data.skipped_shards == 0
    (retry,) = [r.getMessage() for r in caplog.records if "retry 1 of 2" in r.getMessage()]
    assert retry.startswith(f"shard {server.url('coco-000001.tar')} failed after")
    assert "Not enough data to satisfy content length" in retry


def test_shard_cut_short_goes_on_after_the_samples_it_gave(
    shards: Path, tmp_path: Path, no_delay: None, caplog: pytest.LogCaptureFixture
) -> None:
    tar = shards / "coco-000000.tar"
    with tarfile.open(tar) as t:
        cut = t.getmembers()[6].offset_data + 100  # inside the image of the third sample
    # Cut short the first two times it runs: the probe of the stream, then its first read.
    runs = tmp_path / "runs"
    shard = (
        f"pipe:echo >> {runs}; if [ $(wc -l < {runs}) -gt 2 ]; then cat {tar}; else head -c {cut} {tar}; fi"
    )
    data = ShardStream([shard], TRANSFORM, batch_size=1, sizes=[5])
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        got = [i for batch in ids(data, 0) for i in batch]
    assert sorted(got) == sorted(int(s["__key__"]) for s in iter_tar_samples(str(tar)))
    (retry,) = [r.getMessage() for r in caplog.records if "retry 1 of 2" in r.getMessage()]
    assert retry.startswith(f"shard {shard} failed after 2 samples (ReadError")


def test_shard_that_always_breaks_is_skipped_named_and_counted(
    coco: Path, server: Server, no_delay: None, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def datamodule() -> CocoCaptionsDataModule:
        return CocoCaptionsDataModule(
            str(coco),
            train_split="unannotated",  # the vocabulary is trained on the shards' captions, over HTTP
            shards={"urls": server.url(BRACES), "retries": 1},
            loader={"batch_size": 4, "num_workers": 0},
            images={"image_size": 16},
            context_length=16,
            tokenizer={"vocab_size": 100, "cache_dir": str(tmp_path / "cache")},
        )

    dm = datamodule()
    assert "circle" in dm.tokenizer.decode(dm.tokenizer(["a red circle"], 16)["input_ids"][0].tolist())
    broken = "coco-000002.tar"
    server.cuts[broken] = -1
    before = len(server.requests)  # the vocabulary read every shard once
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        batches = list(dm.train_dataloader())
    assert len(batches) == 6  # the steps of 24 samples in batches of 4, as if nothing broke
    seen = [i for b in batches for i in b["image_ids"].tolist()]
    lost = sum(b["skipped"] for b in batches)
    # the samples the broken shard gave before its cut (how many depends on timing) are kept, the rest lost
    assert len(seen) + lost == 24 and len(set(seen)) == len(seen) and 0 < lost <= 5
    assert dm.skipped_shards == 1
    assert server.requests[before:].count(broken) == 2  # one try and one retry
    (skipped,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert skipped.startswith(f"skipping shard {server.url(broken)}: ClientPayloadError")
    # A vocabulary without the broken shard's captions could differ between ranks: it is not trained.
    with pytest.raises(
        ShardUnreadable, match=f"one cannot be read: {server.url(broken)}: .* data.tokenizer.path"
    ):
        _ = datamodule().tokenizer


def test_failing_command_is_not_taken_for_a_whole_shard(shards: Path, no_delay: None) -> None:
    # cat gives every byte, then the command fails: the shard's last sample is not trusted.
    shard = f"pipe:cat {shards / 'coco-000004.tar'}; exit 3"
    data = ShardStream([shard], TRANSFORM, batch_size=1, sizes=[4], retries=1)
    got = [i for batch in ids(data, 0) for i in batch]
    assert len(got) == 4 and got.count(None) == 1 and data.skipped_shards == 1
    with pytest.raises(ShardUnreadable, match="exited with status 3"):
        list(shard_members.read_shard(shard, retries=0))


def test_shard_cut_between_members_is_not_taken_for_a_whole_shard(shards: Path, tmp_path: Path) -> None:
    with tarfile.open(shards / "coco-000000.tar") as tar:
        members = tar.getmembers()
    assert [m.name.split(".")[1] for m in members[6:9]] == ["jpg", "txt", "json"]
    cut = tmp_path / "cut.tar"  # ends at a header boundary, inside the third sample: tarfile sees no error
    cut.write_bytes((shards / "coco-000000.tar").read_bytes()[: members[7].offset])
    for shard in (str(cut), f"pipe:cat {cut}"):
        given = []
        with pytest.raises(tarfile.ReadError, match="cut short"):
            for sample in iter_tar_samples(shard):
                given.append(sample)
        assert len(given) == 2 and {"jpg", "txt", "json"} <= set(given[1])


def test_unreachable_shards_give_one_line_errors(tmp_path: Path) -> None:
    urls = expand_shards(f"http://127.0.0.1:{free_port()}/coco-{{000000..000002}}.tar")
    with pytest.raises(
        FileNotFoundError, match=r"^3 remote shards have no sample counts .* data\.shards\.num_samples$"
    ):
        ShardStream(urls, TRANSFORM)
    with pytest.raises(ShardUnreadable) as err:
        ShardStream(urls, TRANSFORM, num_samples=15)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"none of the 3 shards can be read; the first: {urls[0]}: FileNotFoundError")


def test_shards_without_sizes_files_use_train_num_samples(shards: Path, tmp_path: Path) -> None:
    bare = tmp_path / "bare"  # shards of another tool: no _info.json, no sizes.json
    bare.mkdir()
    for i in range(5):
        (bare / f"coco-{i:06d}.tar").write_bytes((shards / f"coco-{i:06d}.tar").read_bytes())
    urls = expand_shards(f"pipe:cat {bare}/{BRACES}")
    with pytest.raises(FileNotFoundError, match="5 remote shards have no sample counts"):
        ShardStream(urls, TRANSFORM)
    with pytest.raises(ValueError, match="train_num_samples=3 leaves 3 samples for the 5 shards"):
        ShardStream(urls, TRANSFORM, num_samples=3)
    data = ShardStream(urls, TRANSFORM, batch_size=2, num_samples=24)
    assert data.sizes == [5, 5, 5, 5, 4]  # spread evenly, which is how these shards are filled
    assert ids(data, 0) == ids(local(shards, batch_size=2), 0)
    # A glob character in a URL's query (a signed URL) is not taken for a pattern to list.
    assert expand_shards("https://example.org/x.tar?sig=a*b") == ["https://example.org/x.tar?sig=a*b"]
