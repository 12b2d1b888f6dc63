"""Atomic file writes: a reader never sees half a file, and a crash never loses the old one."""
from __future__ import annotations

import functools
import io
import itertools
import json
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from utils.errors import UserError


class WriteError(UserError):
    """The operating system refused a write (disk full, permission denied, read-only folder)."""

    @classmethod
    def of(cls, path: Path | str, error: OSError) -> WriteError:
        return cls(f"cannot write '{path}': {error.strerror or error}; the files written before it are intact")


@functools.cache
def _new_file_mode() -> int:
    """What open() would give a new file: 0o666 less the umask (read once: os.umask can only be read by setting it)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _file_mode(path: Path) -> int:
    """The mode the written file keeps: the old file's, else a new file's (mkstemp's 0600 would lock out a service
    account that reads the model or the results)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return _new_file_mode()


def is_special_file(path: Path | str) -> bool:
    """True for an existing FIFO, character or block device or socket (``/dev/stdout``, ``/dev/null``, a named pipe):
    such a file is written through, never replaced by a regular one."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode)


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds.

    An OSError of the write becomes one WriteError naming ``path``; the old file stays as it was. The file keeps
    its mode, and a symlink is written through (its target is replaced, the link stays: a shared results table).
    A special file (a FIFO, ``/dev/stdout``, ``/dev/full``) is yielded itself: it is streamed to, never replaced.
    """
    path = Path(path)
    if is_special_file(path):
        try:
            yield path
        except OSError as error:
            raise WriteError.of(path, error) from None
        return
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise WriteError.of(path, error) from None
    try:
        yield Path(tmp)
        os.chmod(tmp, _file_mode(target))
        os.replace(tmp, target)
    except OSError as error:
        raise WriteError.of(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs) -> Iterator[IO]:
    """``open`` for writing through ``atomic_path``; a regular file is synced to disk before it replaces the old one."""
    with atomic_path(path) as tmp:
        try:
            with open(tmp, mode, **kwargs) as handle:
                yield handle
                handle.flush()
                if not is_special_file(tmp):  # a pipe or a device cannot be fsync'ed (EINVAL)
                    os.fsync(handle.fileno())
        except OSError as error:  # raised inside atomic_path's own handler would name the error twice
            raise WriteError.of(path, error) from None


def write_serialised(path: Path | str, serialise: Callable[[IO[bytes]], None]) -> None:
    """``serialise(buffer)`` in memory (torch.save, torch.jit.save, torch.export.save), then the bytes written
    atomically by Python: torch's own zip writer reports a full disk as "enforce fail at inline_container.cc", a
    Python write as the OSError that names it ("No space left on device"); the previous file stays intact."""
    buffer = io.BytesIO()
    serialise(buffer)
    with atomic_open(path, "wb") as handle:
        handle.write(buffer.getbuffer())


def make_unique_dir(parent: Path, name: str) -> Path:
    """Create ``parent/name`` (or ``name-2``, ``name-3``, ...): mkdir claims the name atomically, so runs
    started in the same second by several processes never share a folder."""
    for suffix in itertools.count(1):
        folder = parent / (name if suffix == 1 else f"{name}-{suffix}")
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            continue
        except OSError as error:
            raise WriteError.of(folder, error) from None
    raise AssertionError("unreachable")


def save_json(data: object, path: Path | str) -> None:
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2)
