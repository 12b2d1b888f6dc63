"""Atomic writes keep what a deployment relies on: the file's mode and a symlinked shared table."""
from __future__ import annotations

import os
import stat
from pathlib import Path

from utils.io import atomic_open
from utils.results import append_result, read_rows


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_new_file_gets_the_umask_mode_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        with atomic_open(tmp_path / "new.txt") as handle:
            handle.write("x")
        assert mode(tmp_path / "new.txt") == 0o644  # readable by a Pi's service account, as open() would make it
        (tmp_path / "kept.txt").write_text("old")
        os.chmod(tmp_path / "kept.txt", 0o640)
        with atomic_open(tmp_path / "kept.txt") as handle:
            handle.write("new")
        assert mode(tmp_path / "kept.txt") == 0o640 and (tmp_path / "kept.txt").read_text() == "new"
    finally:
        os.umask(old_umask)


def test_a_results_table_that_is_a_symlink_gets_the_row_and_stays_a_link(tmp_path: Path) -> None:
    shared = tmp_path / "shared" / "results.csv"
    append_result(shared, {"run_id": "first", "model": "m", "test_acc": 0.5})
    link = tmp_path / "runs" / "results.csv"
    link.parent.mkdir()
    link.symlink_to(shared)
    append_result(link, {"run_id": "second", "model": "m", "test_acc": 0.6})
    assert link.is_symlink() and [row["run_id"] for row in read_rows(shared)] == ["first", "second"]

