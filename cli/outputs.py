"""Output files: every path checked before any work, all written at the end, atomically.

A command that writes files (`-o`, `--svg`, `--html`) calls `check_outputs` first,
before it compiles or reads anything, so a typo in an output path costs nothing and is
a usage error (exit 2). It writes through `write_outputs`, which first puts every new
file next to its destination and only then moves them into place: one bad output
means none is written, and readers see the old or the new file, never part of one.

A character device or a FIFO (`-o /dev/null`, `-o /dev/stdout`, a named pipe) is written
as a stream: it is opened and written in place, never replaced by a regular file (which
is what renaming over it would do). Other special files (block devices, sockets) are
refused.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path


class OutputError(ValueError):
    """An output path that cannot be written; the message names the option and the path."""


def check_outputs(outputs: Mapping[str, str | None]) -> None:
    """Check every given output path (option → path; None: not given). Raises OutputError."""
    seen: dict[str, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        if path == "":
            raise OutputError(f"{option}: an empty path")
        key = _identity(path)
        if key in seen:
            raise OutputError(f"{option} {path}: the same file as {seen[key]}")
        seen[key] = f"{option} {path}"
        problem = "names a directory, not a file" if path.endswith(("/", os.sep)) else _problem(Path(path))
        if problem:
            raise OutputError(f"{option} {path}: {problem}")


def _identity(path: str) -> str:
    return os.path.realpath(path)


def _is_stream(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISCHR(mode) or stat.S_ISFIFO(mode)


def _problem(path: Path) -> str | None:
    """Why `path` cannot be written, or None."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):  # the parent's checks below say which
        mode = None
    except OSError as e:
        return e.strerror or str(e)
    if mode is not None:
        if stat.S_ISDIR(mode):
            return "is a directory; give a file name"
        if stat.S_ISCHR(mode) or stat.S_ISFIFO(mode):
            return None if os.access(path, os.W_OK) else "the device is not writable"
        if not stat.S_ISREG(mode):
            return "is not a regular file, a character device or a pipe"
    parent = path.parent
    if not parent.exists():
        return f"the directory {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a directory"
    # The real test: create (and remove) a file where the new one will be made. This
    # sees read-only directories and file systems, ACLs and quotas alike.
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".probe")
    except OSError as e:
        return f"cannot write in {parent}: {e.strerror or e}"
    os.close(fd)
    os.unlink(probe)
    return None


def write_outputs(files: Mapping[Path, str] | Iterable[tuple[Path, str]]) -> None:
    """Write several files: all staged first, then moved into place (streams written as such)."""
    items = list(files.items()) if isinstance(files, Mapping) else list(files)
    staged: list[tuple[str, Path]] = []
    try:
        for path, text in items:
            if not _is_stream(path):
                staged.append((_stage(path, text), path))
        for tmp, path in staged:
            os.replace(tmp, path)
        staged = []
        for path, text in items:
            if _is_stream(path):
                with open(path, "w", encoding="utf-8", newline="") as f:
                    f.write(text)
    finally:
        for tmp, _ in staged:
            Path(tmp).unlink(missing_ok=True)


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` so that readers see the old or the new file, never a part of one."""
    write_outputs([(path, text)])


def _stage(path: Path, text: str) -> str:
    """A complete temporary copy of the new file beside `path`, with the final permissions."""
    if path.exists():
        mode = path.stat().st_mode & 0o7777
    else:  # a new file gets the permissions open() would give it, not mkstemp's 0600
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp
