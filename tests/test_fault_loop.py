"""The fault loop (tests/fault_loop.py) at the suite's size: 10 SIGKILLs over a 20-step CT run, bit-equal at the end."""

import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def test_a_run_killed_ten_times_and_resumed_ends_bit_equal_to_an_uninterrupted_one(tmp_path):
    cmd = [sys.executable, os.path.join(HERE, "fault_loop.py"), "--kills", "10", "--steps", "20", "--save_interval", "2",
           "--seed", "1", "--work_dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "10 kills" in result.stdout and "bit-equal" in result.stdout, result.stdout
