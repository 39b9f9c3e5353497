"""benchmarks/gpu_check.py's CPU smoke run: every check and benchmark row runs (tiny network, batch 2, one thread,
Triton's interpreter, aot_eager compilation) and none fails."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"
ROWS = ("fp16 loss scaling", "bf16 autocast", "SDPA flash / efficient", "Triton attention JVP", "DDP step",
        "FSDP2 step", "--compile", "ImageNet-64 CD step", "JVP step (sCD) vs CT", "one-step sampling")


def test_cpu_smoke_run_exercises_every_row():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], env=env, capture_output=True, text=True,
                         timeout=900)  # fmt: skip
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in run.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| check")}  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert set(ROWS) <= set(rows), rows
    assert all(rows[name] in ("ok", "n/a") for name in ROWS), rows
    # the rows that must run on any machine with this torch
    assert all(rows[name] == "ok" for name in ("bf16 autocast", "DDP step", "--compile", "ImageNet-64 CD step")), rows
