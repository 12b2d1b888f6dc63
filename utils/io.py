"""Atomic file writes: a reader never sees half a file, and a crash never loses the old one."""
from __future__ import annotations

import itertools
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from utils.errors import UserError


class WriteError(UserError):
    """The operating system refused a write (disk full, permission denied, read-only folder)."""

    @classmethod
    def of(cls, path: Path | str, error: OSError) -> WriteError:
        return cls(f"cannot write '{path}': {error.strerror or error}; the files written before it are intact")


@contextmanager
def atomic_path(path: Path | str) -> Iterator[Path]:
    """Yield a temp path beside ``path``; it replaces ``path`` only if the block succeeds.

    An OSError of the write becomes one WriteError naming ``path``; the old file stays as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as error:
        raise WriteError.of(path, error) from None
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as error:
        raise WriteError.of(path, error) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_open(path: Path | str, mode: str = "w", **kwargs) -> Iterator[IO]:
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


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
