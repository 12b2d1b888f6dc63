"""The code's shape is checked like its behaviour: import layers (import-linter) and lint (ruff)."""
from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_imports_follow_the_layers():
    """utils is the floor; data and models use only it; engine and deploy use those; no cycles (pyproject.toml)."""
    # the running interpreter's import-linter, so `.venv/bin/python -m pytest` works without an activated environment
    result = subprocess.run([sys.executable, "-c", "from importlinter.cli import lint_imports_command; lint_imports_command()",
                             "--no-cache"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
    assert "broken" in result.stdout and "0 broken" in result.stdout


def test_ruff_is_clean():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:]
