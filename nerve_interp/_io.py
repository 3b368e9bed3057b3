"""File helpers shared by results files and checkpoints."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import OutputFolderError, ResultsFileError

DIGEST_KEY = "sha256"
"""Header key of the checksum over every tensor (and the rest of the header) of a file."""


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
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; the user's umask decides
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tensor_digest(tensors: dict[str, Any], header: dict[str, str]) -> str:
    """SHA-256 over every tensor (name, dtype, shape, bytes, in name order) and every other
    header entry: any changed byte of a file changes it."""
    import torch

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    rest = {k: v for k, v in header.items() if k != DIGEST_KEY}
    h.update(json.dumps(rest, sort_keys=True).encode())
    return h.hexdigest()


def object_digest(obj: Any) -> str:
    """SHA-256 of a nested structure of dicts, lists, tuples, tensors and plain values (a
    ``torch.save`` payload), in its iteration order: tensors by name, dtype, shape and bytes,
    everything else by ``repr``."""
    import torch

    h = hashlib.sha256()

    def walk(x: Any, path: str) -> None:
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k!r}")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"{path}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        else:
            h.update(f"{path}={x!r}|".encode())

    walk(obj, "")
    return h.hexdigest()


def save_safetensors(tensors: dict[str, Any], path: Path, header: dict[str, str]) -> Path:
    """Write ``tensors`` with ``header`` and its checksum (:func:`tensor_digest`) atomically."""
    from safetensors.torch import save_file

    header = {**header, DIGEST_KEY: tensor_digest(tensors, header)}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=header)
    return path


class _Loaded:
    """The tensors of a verified file, read like a ``safe_open`` handle."""

    def __init__(self, tensors: dict[str, Any]) -> None:
        self._tensors = tensors

    def keys(self) -> list[str]:
        return list(self._tensors)

    def get_tensor(self, key: str) -> Any:
        return self._tensors[key]


def check_format_version(path: Path, found: Any, supported: int, *, kind: str,
                         writer: Any = None) -> int:
    """``found`` as an int <= ``supported``, or a ``ResultsFileError`` saying what to do."""
    from . import __version__

    try:
        version = int(found)
    except (TypeError, ValueError):
        raise ResultsFileError(f"{path} has no valid format version ({found!r}); it is not "
                               f"{kind} written by nerve_interp, or it is damaged.") from None
    if version > supported:
        raise ResultsFileError(
            f"{path} is {kind} of format version {version}"
            + (f" (written by nerve_interp {writer})" if writer else "")
            + f"; this nerve_interp ({__version__}) reads versions up to {supported}. "
            "Upgrade nerve_interp (pip install -U nerve-interp) to read it.")
    return version


@contextlib.contextmanager
def open_safetensors(path: Path, file_format: str, *, kind: str, other_format: str,
                     unreadable: str, remedy: str, supported: int,
                     version_of: Callable[[dict[str, str]], tuple[Any, Any]]
                     ) -> Iterator[tuple[Any, dict[str, str]]]:
    """Open a nerve_interp safetensors file; yield ``(handle, header metadata)``.

    A file whose header ``"format"`` is not ``file_format`` raises ``ResultsFileError``:
    ``"<path> is not <kind> (its format is <found>); <other_format>"``. Any other failure
    while the file is open, in safetensors, json or the caller's parsing, is a damaged file:
    ``"<unreadable> (<error>); it is corrupt or truncated. <remedy>"``. A
    ``ResultsFileError`` raised by the caller passes through unchanged. Then the format
    version (``version_of(header)``: the version and the nerve_interp that wrote it) must be
    at most ``supported`` (:func:`check_format_version`), and the checksum must match
    (files written before checksums have none and are read as they are).
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if header.get("format") != file_format:
                raise ResultsFileError(f"{path} is not {kind} (its format is "
                                       f"{header.get('format')!r}); {other_format}")
            check_format_version(path, *version_of(header)[:1], supported, kind=kind,
                                 writer=version_of(header)[1])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        _verify(path, tensors, header, remedy)
        yield _Loaded(tensors), header
    except ResultsFileError:
        raise
    except Exception as err:  # safetensors and json raise many types on damaged files
        raise ResultsFileError(
            f"{unreadable} ({type(err).__name__}: {err}); it is corrupt or truncated. {remedy}"
        ) from None


def _verify(path: Path, tensors: dict[str, Any], header: dict[str, str], remedy: str) -> None:
    """Refuse a file whose checksum does not match (files written before checksums pass)."""
    want = header.get(DIGEST_KEY)
    if want is not None and tensor_digest(tensors, header) != want:
        raise ResultsFileError(f"{path} is damaged: its contents do not match the SHA-256 "
                               f"checksum written with it, so nothing in it is trusted. {remedy}")


LOCK_NAME = ".nerve-interp.lock"


def _age(path: Path) -> float:
    """Seconds since ``path`` was last modified (0 when it is gone)."""
    import time

    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


class FolderLock:
    """An exclusive claim on an output folder by one run (``<folder>/.nerve-interp.lock``).

    The lock file holds the holder's pid, host, command and start time. A second run is
    refused with an :class:`~nerve_interp.errors.OutputFolderError` naming the holder; a lock
    left by a dead process of this host is taken over. Use as a context manager.
    """

    def __init__(self, folder: Path, command: str = "") -> None:
        self.path, self.command, self.took_over = Path(folder) / LOCK_NAME, command, None

    def __enter__(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command,
              "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                self._take_over_or_refuse()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise OutputFolderError(f"{self.path.parent} is locked by runs that keep replacing "
                                f"{self.path}; wait for them or choose another --out.")

    def _take_over_or_refuse(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
            pid, host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError, KeyError, TypeError):  # being written, or a crash then
            holder, pid, host = {}, 0, socket.gethostname()
        if host == socket.gethostname() and pid != os.getpid() and (
                not _pid_alive(pid) if pid > 0 else _age(self.path) > 10):
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.took_over = holder
            return
        raise OutputFolderError(
            f"{self.path.parent} is in use by another run: pid {pid} on host {host}"
            + (f" ({holder.get('command')}, started {holder.get('started')})"
               if holder.get("command") else "")
            + f". Wait for it to finish or choose another --out; if that process is gone, "
            f"delete {self.path}.")

    def __exit__(self, *exc: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
