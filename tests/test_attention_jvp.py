"""The Triton attention JVP kernel's checks (tests/triton_attention_checks.py) in Triton's CPU interpreter.

Triton picks interpreter or compiler at import, so the checks run in a fresh process with TRITON_INTERPRET=1.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CHECKS = Path(__file__).with_name("triton_attention_checks.py")


def test_triton_attention_jvp_checks_pass_in_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::FutureWarning", str(CHECKS)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "skipped" not in run.stdout
