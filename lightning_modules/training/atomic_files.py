"""The file-system pieces of atomic checkpoint writes, shared by the single-file writer (checkpoint_io.py's
`AtomicCheckpointIO`) and the sharded one (strategies.py's `FSDP2Strategy`): the temporary name a writer uses,
whether its process still lives, and the fsync that makes a rename durable."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path


def temporary_name(target: Path) -> Path:
    """Where `target` is written before it is renamed into place: a hidden file beside it that names the writer's
    host and process, so a later start on the same host can tell a dead writer's leftover from a live one's."""
    return target.with_name(f".{target.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def pid_is_alive(pid: int) -> bool:
    """Whether a process `pid` exists on this host."""
    try:
        os.kill(pid, 0)  # signal 0: existence and permission check only
    except ProcessLookupError:
        return False
    except PermissionError:  # a live process of another user
        return True
    return True


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable: without it a power loss can bring back the old directory entry."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except (
        OSError
    ) as err:  # some file systems (a few network ones) cannot fsync a directory: nothing more to do
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
