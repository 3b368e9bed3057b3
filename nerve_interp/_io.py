"""File helpers shared by results files and checkpoints."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _tmp_prefix(path: Path) -> str:
    """``.<name>.<host>.`` : the start of every temporary file written for ``path``."""
    return f".{path.name}.{socket.gethostname()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(path: Path) -> list[Path]:
    """Delete temporary files of ``path`` left by killed writers on this host.

    A writer killed with SIGKILL (or by the out-of-memory killer) cannot clean up, and a
    checkpoint's temporary file can be as large as the checkpoint (8·D² bytes per point).
    Files are named ``.<name>.<host>.<pid>.<random>.tmp``; those of this host whose process
    no longer exists are removed. Files of other hosts (a shared file system) and of live
    processes are left alone. Returns the removed paths.
    """
    prefix = _tmp_prefix(path)
    removed = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f"{prefix}*.tmp"):
        pid = tmp.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            removed.append(tmp)
    return removed


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[str]:
    """Yield a temporary file name next to ``path``; write to it inside the block.

    On success the file replaces ``path`` atomically (``os.replace``), so a crash never
    leaves half a results file or checkpoint; on an error the temporary file is removed.
    Temporary files that killed writers left behind are removed first
    (:func:`remove_stale_temporaries`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{_tmp_prefix(path)}{os.getpid()}.",
                               suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
