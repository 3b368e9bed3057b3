"""File helpers shared by results files and checkpoints."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import ResultsFileError


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


@contextlib.contextmanager
def open_safetensors(path: Path, file_format: str, *, kind: str, other_format: str,
                     unreadable: str, remedy: str) -> Iterator[tuple[Any, dict[str, str]]]:
    """Open a nerve_interp safetensors file; yield ``(handle, header metadata)``.

    A file whose header ``"format"`` is not ``file_format`` raises ``ResultsFileError``:
    ``"<path> is not <kind> (its format is <found>); <other_format>"``. Any other failure
    while the file is open, in safetensors, json or the caller's parsing, is a damaged file:
    ``"<unreadable> (<error>); it is corrupt or truncated. <remedy>"``. A
    ``ResultsFileError`` raised by the caller passes through unchanged.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != file_format:
                raise ResultsFileError(f"{path} is not {kind} (its format is "
                                       f"{header.get('format')!r}); {other_format}")
            yield f, header
    except ResultsFileError:
        raise
    except Exception as err:  # safetensors and json raise many types on damaged files
        raise ResultsFileError(
            f"{unreadable} ({type(err).__name__}: {err}); it is corrupt or truncated. {remedy}"
        ) from None
