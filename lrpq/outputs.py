"""Output folders and files that appear whole or not at all, and never replace what the user did not ask to.

Every command that writes (``quantize``'s run directory, ``relevance``'s report, the ``--json`` of ``eval``
and ``bench``) does its work inside ``staged_dir`` or ``staged_file``. The target is checked and a hidden
staging folder or file is created beside it before any work starts, so an unwritable place fails in
seconds rather than after calibration. On success the staging entry is renamed onto the target; on any
failure (an error, Ctrl-C, SIGTERM) it is removed, with the folders that were created for it.

Paths are resolved (symlinks, ``..``) before they are compared or written. Whatever the flags, a folder
that holds the user's work (the current directory and its parents, the home directory and its parents,
a repository root) is never an output folder. The final renames and the clean-up run with Ctrl-C and
SIGTERM held back, so a signal cannot cut them in half.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lrpq.errors import LrpqError

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)

Replaceable = Callable[[Path], bool]


class OutputError(LrpqError):
    """An output path lrpq will not write (it would destroy something) or cannot write."""


def current_umask() -> int:
    """The process umask (only readable by setting it), which every file lrpq writes should follow."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def signals_held() -> Iterator[None]:
    """Deliver Ctrl-C and SIGTERM only when the block ends, so a rename and its undo are never split.

    A deferring Python handler, not a signal mask: the kernel hands a process's signal to any thread that
    does not block it (torch's worker threads do not), and Python then raises in the main thread anyway.
    Handlers can only be set from the main thread; elsewhere the block runs unprotected.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {number: signal.signal(number, lambda received, _: caught.append(received)) for number in _HELD_SIGNALS}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
        if caught:
            signal.raise_signal(caught[0])  # to the handler the signal would have met, now the block is over


def protected_reason(path: Path) -> str | None:
    """Why the resolved ``path`` may never be an output folder, or None: what it would destroy."""
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if path == cwd:
        return "the current directory"
    if path == home:
        return "your home directory"
    if cwd.is_relative_to(path):
        return "a parent of the current directory"
    if home.is_relative_to(path):
        return "a parent of your home directory"
    if (path / ".git").exists():
        return "a repository root (it holds .git)"
    return None


def _is_empty_dir(path: Path, target: str | Path) -> bool:
    try:
        return not any(path.iterdir())
    except OSError as error:
        raise OutputError(f"cannot look inside {target}: {error.strerror or error}") from None


def check_output_dir(
    target: str | Path, *, what: str, overwrite: bool = False, replaceable: Replaceable | None = None
) -> Path:
    """The resolved folder to write ``what`` to, after refusing every target whose loss the user did not ask for.

    A missing folder or an empty one is free. An existing one is replaced only with ``overwrite`` and only
    if ``replaceable`` recognises it as an earlier output of the same kind; ``replaceable=None`` means the
    command has no ``--overwrite``.
    """
    path = Path(target).resolve()
    reason = protected_reason(path)
    if reason is not None:
        raise OutputError(
            f"{target} is {reason}: lrpq never writes a {what} there, whatever the flags; name a new folder"
        )
    if not path.exists():
        return path
    if not path.is_dir():
        raise OutputError(f"{target} is an existing file, not a folder; name a new folder for the {what}")
    if _is_empty_dir(path, target):
        return path
    if replaceable is None:
        raise OutputError(f"{target} already exists and is not empty; name a new folder for the {what}")
    if not overwrite:
        raise OutputError(f"output folder {target} already exists; choose another --out or pass --overwrite")
    if not replaceable(path):
        raise OutputError(
            f"{target} is not a {what}, and --overwrite only replaces a {what} (or an empty folder); "
            "choose another --out"
        )
    return path


def _make_parents(folder: Path, created: list[Path]) -> None:
    """Create ``folder`` and its missing parents, recording each in ``created`` (outermost first) to undo."""
    missing = []
    for ancestor in (folder, *folder.parents):
        if ancestor.exists():
            break
        missing.append(ancestor)
    for ancestor in reversed(missing):
        ancestor.mkdir()
        created.append(ancestor)


def _remove_created(created: list[Path]) -> None:
    """Remove the folders ``_make_parents`` created, innermost first, stopping at one that is not empty."""
    for folder in reversed(created):
        try:
            folder.rmdir()
        except OSError:
            return


@contextmanager
def _staging(path: Path, make: Callable[[Path], Path], target: str | Path) -> Iterator[Path]:
    """``make(folder)`` in ``path``'s folder, made now (the test that ``target`` is writable), removed on failure.

    Missing folders on the way are created, and removed again if the block fails.
    """
    created: list[Path] = []
    staging: Path | None = None
    try:
        with signals_held():
            _make_parents(path.parent, created)
            staging = make(path.parent)
        yield staging
    except BaseException as error:
        with signals_held():
            if staging is not None and staging.is_dir():
                shutil.rmtree(staging, ignore_errors=True)
            elif staging is not None:
                staging.unlink(missing_ok=True)
            _remove_created(created)
        if staging is None and isinstance(error, OSError):
            where = f" ({error.filename})" if error.filename else ""
            raise OutputError(f"cannot write {target}: {error.strerror or error}{where}") from None
        raise


def _apply_umask(folder: Path) -> None:
    """Give staged folders and files the modes the user's umask asks for (mkdtemp makes 0700, safetensors 0600)."""
    mask = current_umask()
    for root, _, files in os.walk(folder):
        os.chmod(root, 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def _publish_dir(staging: Path, path: Path, target: str | Path) -> None:
    """Rename ``staging`` onto ``path``; an existing ``path`` is moved aside first and deleted only after.

    Between the two renames ``path`` is missing for an instant (run with signals held); if the second
    rename fails, the old folder is moved back, so the user always keeps the old folder or the new one.
    """
    try:
        _apply_umask(staging)
        if path.exists() and _is_empty_dir(path, target):
            path.rmdir()
        if not path.exists():
            staging.rename(path)
            return
        aside = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
        path.rename(aside)
        try:
            staging.rename(path)
        except OSError:
            aside.rename(path)
            raise
    except OSError as error:
        raise OutputError(f"cannot write {target}: {error.strerror or error}") from None
    try:
        shutil.rmtree(aside)
    except OSError as error:
        raise OutputError(
            f"wrote {target}, but the folder it replaced, moved aside to {aside}, could not be removed: "
            f"{error.strerror or error}"
        ) from None


@contextmanager
def staged_dir(
    target: str | Path, *, what: str, overwrite: bool = False, replaceable: Replaceable | None = None
) -> Iterator[Path]:
    """A hidden folder beside ``target``, made now, that becomes ``target`` only if the block succeeds.

    ``target`` is checked as ``check_output_dir`` does, before the block and again at its end (the
    user may have put something there meanwhile).
    """
    check = {"what": what, "overwrite": overwrite, "replaceable": replaceable}
    path = check_output_dir(target, **check)
    with _staging(path, lambda folder: Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder)), target) as staging:
        yield staging
        check_output_dir(target, **check)
        with signals_held():
            _publish_dir(staging, path, target)


def _staging_file(folder: Path, name: str) -> Path:
    descriptor, staging = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    os.close(descriptor)
    return Path(staging)


@contextmanager
def staged_file(target: str | Path) -> Iterator[Path]:
    """A hidden file beside ``target``, made now, that replaces ``target`` only if the block succeeds."""
    path = Path(target).resolve()
    if path.is_dir():
        raise OutputError(f"{target} is a folder; name a file to write")
    with _staging(path, lambda folder: _staging_file(folder, path.name), target) as staging:
        yield staging
        with signals_held():
            try:
                os.chmod(staging, 0o666 & ~current_umask())
                os.replace(staging, path)
            except OSError as error:
                raise OutputError(f"cannot write {target}: {error.strerror or error}") from None


def replace_text(target: str | Path, text: str) -> None:
    """Write ``text`` to ``target`` (folders made as needed) through a staged file, so that a reader, a crash
    or Ctrl-C never leaves half of it: results files and docs sections are rewritten this way as runs finish."""
    with staged_file(target) as staging:
        staging.write_text(text)
