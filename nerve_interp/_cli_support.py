"""What the ``nerve-interp`` command needs besides its commands: errors in one line, warnings
without source lines, and the checks that run before a model loads.

* :class:`CLIGroup` (the typer app's group class) turns a library error
  (:class:`~nerve_interp.errors.NerveInterpError`, and the ``ValueError`` / ``TypeError`` /
  ``OSError`` of argument checks) into ``Error: <message>`` on stderr and exit code 2;
  ``--debug`` anywhere on the command line (or ``NERVE_INTERP_DEBUG=1``) shows the traceback
  instead. Warnings print as ``warning: <Category>: <message>``, without the source line.
* :func:`check_out_folder` and :func:`claim_out_folder`: ``--out`` is a folder this user can
  write, held by one run at a time (:class:`nerve_interp._io.FolderLock`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperGroup

from .errors import NerveInterpError, OutputFolderError

USER_ERRORS = (NerveInterpError, ValueError, TypeError, OSError, KeyError)
"""What a mistake of the user raises; anything else is a bug and keeps its traceback."""

EXIT_USER_ERROR = 2


def _show_warning(message: Any, category: type, filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    typer.echo(f"warning: {category.__name__}: {message}", err=True)


class CLIGroup(TyperGroup):
    """The app's group: ``--debug`` taken out of the arguments, user errors as one line,
    and the resources a command claims (:func:`claim_out_folder`) released when it ends."""

    debug = False
    resources: contextlib.ExitStack | None = None  # of the command running now

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        args = list(sys.argv[1:] if args is None else args)
        end = args.index("--") if "--" in args else len(args)
        CLIGroup.debug = "--debug" in args[:end] or os.environ.get("NERVE_INTERP_DEBUG") == "1"
        args = [a for i, a in enumerate(args) if not (a == "--debug" and i < end)]
        return super().main(args, *rest, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with warnings.catch_warnings(), contextlib.ExitStack() as stack:
            warnings.showwarning = _show_warning
            CLIGroup.resources = stack
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                if CLIGroup.debug:
                    raise
                typer.echo("\nInterrupted. Rerun the same command to resume from its "
                           "checkpoint (spectra), or add --fresh to start again.", err=True)
                raise typer.Exit(130) from None
            except USER_ERRORS as err:
                if CLIGroup.debug or type(err).__module__.startswith(("typer", "click")):
                    raise
                typer.echo(f"Error: {_message(err)}", err=True)
                typer.echo("(add --debug to see where it was raised)", err=True)
                raise typer.Exit(EXIT_USER_ERROR) from None
            finally:
                CLIGroup.resources = None


def _message(err: BaseException) -> str:
    if isinstance(err, KeyError) and len(err.args) == 1:  # KeyError quotes its message
        return str(err.args[0])
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}."
    return str(err) or type(err).__name__


def check_out_folder(out: Path, option: str = "--out") -> Path:
    """``out`` as a folder this user can create or write into, or an OutputFolderError."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"{option} {out} is a file; {option} names a folder (created "
                                f"if needed), e.g. {option} {out.with_suffix('')}_results.")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(f"{option} {out}: {parent} is a file, so no folder can be "
                                f"created under it; choose another {option}.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(f"{option} {out}: cannot write into {parent} (permission "
                                f"denied); choose a folder you can write, e.g. {option} "
                                f"~/nerve_interp_results/{out.name}.")
    return out


def claim_out_folder(out: Path, command: str) -> Path:
    """Check ``out`` and hold its lock until the command ends (a second run into it is
    refused at its start, naming this one)."""
    from ._io import FolderLock

    out = check_out_folder(out)
    lock = FolderLock(out, command)
    if CLIGroup.resources is None:  # called outside a command: held until the process exits
        import atexit

        lock.__enter__()
        atexit.register(lock.__exit__)
    else:
        CLIGroup.resources.enter_context(lock)
    if lock.took_over:
        typer.echo(f"note: took over the lock of {out} left by pid "
                   f"{lock.took_over.get('pid')} (no longer running).", err=True)
    return out


def check_choices(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    """Comma-separated values of ``option``, each one of ``allowed`` and at least one."""
    values = [v for v in text.replace(" ", "").split(",") if v]
    bad = [v for v in values if v not in allowed]
    if bad or not values:
        raise ValueError(
            f"{option} {text!r}: " + (f"unknown {', '.join(map(repr, bad))}; " if bad else
                                      "nothing given; ")
            + f"choose from {','.join(allowed)} (comma-separated).")
    return values


__all__ = ["CLIGroup", "check_choices", "check_out_folder", "claim_out_folder"]
