"""Remote shards: URLs read through fsspec (`https://`, `s3://`, `gs://`) and `pipe:` commands whose output is
a shard, as byte streams, with the errors a flaky source raises (`READ_ERRORS`) named once for every reader."""

from __future__ import annotations

import lzma
import re
import subprocess
import tarfile
import tempfile
import zlib
from typing import Any

URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class ShardUnreadable(OSError):
    """A shard that could not be opened or read to its end, after its retries."""


def is_remote(shard: str) -> bool:
    """Whether `shard` is a URL (`https://`, `s3://`, `gs://`, ...) or a `pipe:` command, not a local path."""
    return shard.startswith("pipe:") or URL_SCHEME.match(shard) is not None


def fsspec_module() -> Any:
    try:
        import fsspec
    except ImportError:
        raise ImportError(
            "shard URLs are read through fsspec: pip install -e .[remote] (fsspec, aiohttp, s3fs, gcsfs)"
        ) from None
    return fsspec


def open_url(url: str, mode: str = "rb", **kwargs: Any) -> Any:
    try:
        return fsspec_module().open(url, mode, **kwargs).open()
    except ImportError as err:  # fsspec's own message names the missing backend (s3fs, gcsfs, aiohttp)
        raise ImportError(f"cannot read {url}: {err} (pip install -e .[remote] installs them)") from None


def _read_errors() -> tuple[type[BaseException], ...]:
    # What a flaky source raises: OSError (fsspec reports refused connections and 404 as FileNotFoundError),
    # tar errors for a stream cut inside a member, the decompressors' errors for corrupt compressed data (tarfile
    # passes them on as they are from a member's data or a seek), and aiohttp's errors (a body shorter than its
    # Content-Length).
    errors: list[type[BaseException]] = [OSError, EOFError, tarfile.TarError, zlib.error, lzma.LZMAError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    return tuple(errors)


READ_ERRORS = _read_errors()


class RemoteBytes:
    """The bytes of a remote shard as a stream: a URL through fsspec, or the output of a `pipe:` command."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._proc: subprocess.Popen | None = None
        if url.startswith("pipe:"):
            # stderr to a file, not a pipe: a chatty command must not block on a pipe nobody reads
            self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 (closed in close())
            self._proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=self._stderr)
            assert self._proc.stdout is not None
            self._file: Any = self._proc.stdout
        else:
            # block_size=0: one streaming GET; fsspec's default asks HTTP servers for byte ranges
            kwargs = {"block_size": 0} if url.startswith(("http://", "https://")) else {}
            self._file = open_url(url, "rb", **kwargs)

    def read(self, size: int = -1) -> bytes:
        return self._file.read(size)

    def check_exit(self) -> None:
        """Raise when the command that wrote the shard failed (its output may look complete)."""
        if self._proc is None:
            return
        code = self._proc.wait()
        if code != 0:
            self._stderr.seek(0)
            why = " ".join(self._stderr.read()[-300:].decode(errors="replace").split())
            raise OSError(f"`{self.url[5:]}` exited with status {code}: {why}")

    def close(self) -> None:
        self._file.close()
        if self._proc is not None:
            if self._proc.poll() is None:  # stopped early (a sample limit, an error): the rest is not wanted
                self._proc.kill()
            self._proc.wait()
            self._stderr.close()
