"""Two ranks on gloo (torchrun): a checkpoint write slower than CM_DIST_TIMEOUT is waited for (CM_SAVE_TIMEOUT), and
a stop request (SIGTERM to one rank, or --max_minutes running out on one rank first) stops every rank at the same
step soon after, with a checkpoint of that step."""

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "stop_worker.py")
LONG_RUN = 3000  # stop_worker.LONG_RUN


def launch(out_dir, mode, dist_timeout):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(out_dir), mode]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", CM_DIST_TIMEOUT=str(dist_timeout))
    env.pop("CM_DEBUG", None)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    return result.returncode, result.stdout + result.stderr


def final_steps(out_dir):
    return [int((out_dir / f"rank{r}_step").read_text()) for r in range(2)]


def test_a_checkpoint_write_slower_than_the_collective_timeout_is_waited_for(tmp_path):
    code, output = launch(tmp_path, "slow_save", dist_timeout=2)  # the step-2 write takes 4 s on rank 0
    assert code == 0, output[-3000:]
    assert final_steps(tmp_path) == [3, 3]
    names = set(os.listdir(tmp_path / "log"))
    assert {"model000002.pt", "model000003.pt", "state000003.pt"} <= names, names


@pytest.mark.parametrize("mode", ["sigterm", "max_minutes"])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, mode):
    code, output = launch(tmp_path, mode, dist_timeout=60)
    assert code == 0, output[-3000:]
    steps = final_steps(tmp_path)
    assert steps[0] == steps[1] < LONG_RUN, (steps, output[-3000:])
    if mode == "sigterm":
        assert steps[0] == 4, steps  # the signal came during step 3; every rank stops after the next one
    log = (tmp_path / "log" / "log.txt").read_text()
    assert f"another rank stopped: checkpointing step {steps[0]}" in log, log[-2000:]  # rank 0's log
    assert f"model{steps[0]:06d}.pt" in os.listdir(tmp_path / "log")
