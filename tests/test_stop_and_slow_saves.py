"""Two ranks on gloo (torchrun): a checkpoint write slower than CM_DIST_TIMEOUT is waited for (CM_SAVE_TIMEOUT), and
a stop request (SIGTERM to one rank, or --max_minutes running out on one rank first) stops every rank at the same
step soon after, with a checkpoint of that step."""

import os
import shutil
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "stop_worker.py")
LONG_RUN = 3000  # stop_worker.LONG_RUN


def launch(out_dir, modes, dist_timeout, **extra_env):
    """Run stop_worker.py's MODES (comma-separated: one after the other in one process group) on 2 ranks."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           str(out_dir), modes]
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", CM_DIST_TIMEOUT=str(dist_timeout),
               **extra_env)
    env.pop("CM_DEBUG", None)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    return result.returncode, result.stdout + result.stderr


def final_steps(out_dir):
    return [int((out_dir / f"rank{r}_step").read_text()) for r in range(2)]


def test_a_checkpoint_write_slower_than_the_collective_timeout_is_waited_for(tmp_path):
    code, output = launch(tmp_path, "slow_save", dist_timeout=2)  # the step-2 write takes 3 s on rank 0
    assert code == 0, output[-3000:]
    assert final_steps(tmp_path) == [3, 3]
    names = set(os.listdir(tmp_path / "log"))
    assert {"model000002.pt", "model000003.pt", "state000003.pt"} <= names, names


@pytest.mark.parametrize("mode", ["sigterm", "max_minutes"])
def test_a_stop_on_one_rank_stops_every_rank_at_the_same_step(stopped_runs, mode):
    code, output, out_dir = stopped_runs
    assert code == 0, output[-3000:]
    tmp_path = out_dir / mode
    steps = final_steps(tmp_path)
    assert steps[0] == steps[1] < LONG_RUN, (steps, output[-3000:])
    if mode == "sigterm":
        assert steps[0] == 4, steps  # the signal came during step 3; every rank stops after the next one
    log = (tmp_path / "log" / "log.txt").read_text()
    assert f"another rank stopped: checkpointing step {steps[0]}" in log, log[-2000:]  # rank 0's log
    assert f"model{steps[0]:06d}.pt" in os.listdir(tmp_path / "log")


def fake_scontrol(directory):
    """A stand-in `scontrol` on PATH that records its arguments in directory/scontrol_args."""
    path = directory / "bin" / "scontrol"
    path.parent.mkdir()
    path.write_text(f'#!/bin/sh\necho "$@" > {directory / "scontrol_args"}\n')
    path.chmod(0o755)
    return f"{path.parent}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture(scope="module")
def stops(tmp_path_factory):
    """The three stop modes, one after the other in one 2-rank launch under a SLURM job id, with a stand-in
    scontrol: (exit status, output, folder of the modes). Only sigusr1 runs with --requeue true."""
    out_dir = tmp_path_factory.mktemp("stops")
    (out_dir / "sigusr1").mkdir()
    code, output = launch(out_dir, "sigterm,max_minutes,sigusr1", dist_timeout=60, SLURM_JOB_ID="4242",
                          PATH=fake_scontrol(out_dir / "sigusr1"))
    return code, output, out_dir


@pytest.fixture(scope="module")
def stopped_runs(stops):
    """The sigterm and max_minutes runs: (exit status, output, folder of the modes)."""
    return stops


@pytest.fixture(scope="module")
def preempted(stops):
    """The 2-rank run whose rank 1 got SIGUSR1 during step 3, under a SLURM job id with --requeue true."""
    code, output, out_dir = stops
    out = out_dir / "sigusr1"
    if code == 0:
        shutil.copytree(out / "log", out / "log_at_step4")  # for the test of an unreadable file
    return out, code, output


def test_the_preemption_warning_on_one_rank_checkpoints_every_rank_at_one_step_and_requeues(preempted):
    out, code, output = preempted
    assert code == 0, output[-3000:]
    assert final_steps(out) == [4, 4]  # the warning came during step 3; every rank stops after the next one
    log = (out / "log" / "log.txt").read_text()
    assert "another rank got the pre-emption warning (SIGUSR1): checkpointing step 4" in log, log[-2000:]
    assert "requeued SLURM job 4242" in log, log[-2000:]
    assert (out / "scontrol_args").read_text().split() == ["requeue", "4242"]
    assert {"model000002.pt", "model000004.pt", "opt000004.pt", "state000004.pt"} <= set(os.listdir(out / "log"))


def test_every_rank_resumes_rank_0s_choice_when_rank_1_sees_another_listing(preempted):
    """Rank 1's listing lacks model000004.pt (it alone would resume from step 2): both resume from step 4."""
    out, code, _ = preempted
    assert code == 0
    code, output = launch(out, "other_view", dist_timeout=60)
    assert code == 0, output[-3000:]
    assert [(out / f"rank{r}_resumed").read_text() for r in range(2)] == ["4", "4"]
    assert final_steps(out) == [6, 6]


def test_a_rank_that_cannot_read_the_chosen_checkpoint_stops_every_rank_in_one_line(tmp_path, preempted):
    """Rank 1 cannot read opt000004.pt of the checkpoint rank 0 chose: every rank stops with the same line."""
    assert preempted[1] == 0
    shutil.copytree(preempted[0] / "log_at_step4", tmp_path / "log")
    code, output = launch(tmp_path, "unreadable", dist_timeout=60)
    assert code != 0
    wanted = f"rank 1 cannot read {tmp_path / 'log' / 'opt000004.pt'} (Permission denied)"
    errors = [line for line in output.splitlines() if "error:" in line]
    assert errors and all(wanted in line for line in errors), output[-3000:]
    assert not (tmp_path / "rank0_step").exists()
