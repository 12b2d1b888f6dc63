"""OpenVINO's tests, run in a pytest process of their own (why: tests/conftest.py, OPENVINO_TESTS)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import OPENVINO_PROCESS, OPENVINO_TESTS, ROOT


@pytest.mark.timeout(900)
def test_openvino_tests_pass_in_their_own_process():
    env = {**os.environ, OPENVINO_PROCESS: "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *OPENVINO_TESTS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1] and "failed" not in done.stdout.splitlines()[-1]
