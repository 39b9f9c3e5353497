"""Pre-emption and long runs on shared clusters: the pre-emption warning signal and SLURM requeue
(cm.stop_request), checkpoint retention (cm.retention) and the one resume decision of every rank
(cm.checkpoint_choice). The 2-rank runs are in test_stop_and_slow_saves.py, the multi-node start in
test_distributed.py."""

import os
import signal
import subprocess

import pytest
import torch

from cm import logger
from cm.checkpoint_choice import check_every_rank_can_read, first_disagreement, read_problem, resume_files
from cm.checkpoint_io import checkpoint_files
from cm.errors import CheckpointError
from cm.retention import check_keep, complete_steps, files_by_step, prefixes_of, steps_to_delete
from cm.stop_request import (NO_STOP, PREEMPTED, STOPPED, TIME_UP, StopRequest, preempt_signal_number,
                             requeue_slurm_job, stop_message)
from cm.train_util import TrainLoop

from dist_worker import loop_kwargs
from helpers import tiny_model_and_diffusion

# ----- the pre-emption warning -----------------------------------------------------------------------------------


def test_preempt_signal_names():
    assert preempt_signal_number("USR1") == signal.SIGUSR1
    assert preempt_signal_number("USR2") == signal.SIGUSR2
    assert preempt_signal_number("none") is None
    with pytest.raises(ValueError, match="allowed: USR1, USR2, none"):
        preempt_signal_number("KILL")


def test_the_warning_signal_requests_a_stop_and_repeats_of_it_change_nothing():
    with StopRequest(preempt_signal=signal.SIGUSR1) as stop:
        assert stop.wish(time_up=False) == NO_STOP and stop.wish(time_up=True) == TIME_UP
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM may warn again: no KeyboardInterrupt
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's kill after the warning: the checkpoint goes on
        assert stop.requested and stop.received == signal.SIGUSR1
        assert stop.wish() == PREEMPTED and stop.agreed(stop.wish()) == PREEMPTED
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # the previous handler is back


def test_a_second_sigterm_still_stops_at_once():
    with StopRequest(preempt_signal=signal.SIGUSR1) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wish() == STOPPED
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)


def test_without_a_warning_signal_sigusr1_is_not_caught():
    with StopRequest(preempt_signal=None):
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_the_agreed_code_keeps_the_largest_wish():
    assert NO_STOP < TIME_UP < STOPPED < PREEMPTED  # the all-reduce MAX lets a warning on any rank win
    assert max(TIME_UP, PREEMPTED, NO_STOP) == PREEMPTED


def test_stop_messages_name_the_signal_and_the_step():
    usr1 = int(signal.SIGUSR1)
    assert stop_message(PREEMPTED, usr1, False, usr1, 7) == "pre-emption warning (SIGUSR1): checkpointing step 7"
    assert stop_message(PREEMPTED, None, False, usr1, 7) == (
        "another rank got the pre-emption warning (SIGUSR1): checkpointing step 7")
    assert stop_message(STOPPED, int(signal.SIGTERM), False, usr1, 3) == "stop requested (SIGTERM): checkpointing step 3"
    assert stop_message(TIME_UP, None, True, usr1, 3) == "time limit reached: checkpointing step 3"
    assert stop_message(STOPPED, None, False, usr1, 3) == "another rank stopped: checkpointing step 3"


def completed(returncode, stdout="", stderr=""):
    return subprocess.CompletedProcess([], returncode, stdout, stderr)


def test_requeue_runs_scontrol_for_the_slurm_job():
    calls = []
    line = requeue_slurm_job(lambda cmd, **kw: calls.append(cmd) or completed(0), {"SLURM_JOB_ID": "77"})
    assert calls == [["scontrol", "requeue", "77"]]
    assert line.startswith("requeued SLURM job 77")


def test_requeue_problems_are_one_warning_line():
    def missing(cmd, **kw):
        raise FileNotFoundError(2, "No such file or directory", "scontrol")

    refused = lambda cmd, **kw: completed(1, stderr="scontrol: error: Requested operation is presently disabled\n")  # noqa: E731
    assert requeue_slurm_job(missing, {"SLURM_JOB_ID": "77"}) == (
        "warning: scontrol not found on this node: SLURM job 77 was not requeued")
    assert requeue_slurm_job(refused, {"SLURM_JOB_ID": "77"}) == (
        "warning: scontrol requeue 77 failed (scontrol: error: Requested operation is presently disabled): not requeued")
    assert requeue_slurm_job(lambda cmd, **kw: pytest.fail("ran scontrol"), {}).startswith(
        "warning: --requeue true, but this is not a SLURM job")


# ----- retention ---------------------------------------------------------------------------------------------------


def test_keep_zero_keeps_everything():
    assert steps_to_delete([1, 2, 3, 4], [1, 2, 3, 4], keep=0) == []


def test_the_newest_k_complete_checkpoints_stay():
    assert steps_to_delete([10, 20, 30, 40, 50], [10, 20, 30, 40, 50], keep=3) == [10, 20]


def test_never_fewer_than_two_stay():
    assert steps_to_delete([10, 20, 30], [10, 20, 30], keep=1) == [10]
    assert steps_to_delete([10], [10], keep=2) == []


def test_a_newer_incomplete_step_and_the_resume_source_stay():
    # 50 is being written (incomplete, newer); 30 is incomplete between kept ones; 10 is the resume source
    present, complete = [10, 20, 30, 40, 45, 50], [10, 20, 40, 45]
    assert steps_to_delete(present, complete, keep=2, protected=[10]) == [20, 30]


def test_nothing_goes_while_fewer_than_k_checkpoints_are_complete():
    assert steps_to_delete([10, 20, 30], [20, 30], keep=3) == []


def test_keep_must_be_zero_or_at_least_two():
    check_keep(0)
    check_keep(5)
    for bad in (1, -1):
        with pytest.raises(ValueError, match="must be 0 .* or at least 2"):
            check_keep(bad)


def names_of(step, fmt):
    return checkpoint_files(step, [0.9, 0.99], ("target_model",), fmt)


def test_files_are_grouped_by_step_and_completeness_follows_the_file_set():
    names = names_of(4, "pt") + names_of(8, "safetensors") + names_of(12, "pt")[:-1]  # step 12 lacks its model
    names += ["model000004.pt.tmp123", "log.txt", "progress.csv", "config.json", "run.lock", "ema_0.5_000004.pt"]
    by_step = files_by_step(names, prefixes_of(names_of))
    assert sorted(by_step) == [4, 8, 12]
    assert sorted(by_step[4]) == sorted(names_of(4, "pt"))  # not the temporary file nor another run's EMA
    assert sorted(complete_steps(by_step, names_of)) == [4, 8]


def test_a_run_with_keep_checkpoints_ends_with_exactly_k_steps_and_keeps_its_resume_source(tmp_path):
    def loop(total, keep):
        logger.configure(dir=str(tmp_path), format_strs=["csv"])
        torch.manual_seed(0)
        model, diffusion = tiny_model_and_diffusion()
        return TrainLoop(**loop_kwargs(model, diffusion, lr=1e-3, save_interval=1, total_training_steps=total,
                                       keep_checkpoints=keep))

    def steps_on_disk():
        return sorted(files_by_step(os.listdir(tmp_path), ["model", "opt", "state", "ema_0.9_"]))

    loop(4, keep=3).run_loop()
    assert steps_on_disk() == [2, 3, 4]
    assert sorted(n for n in os.listdir(tmp_path) if n.endswith(".pt")) == sorted(
        n for s in (2, 3, 4) for n in checkpoint_files(s, [0.9]))
    resumed = loop(7, keep=2)
    assert resumed.resumed_step == 4
    resumed.run_loop()
    assert steps_on_disk() == [4, 6, 7]  # 4, the step it resumed from, stays


# ----- one resume decision ---------------------------------------------------------------------------------------


def test_a_rank_that_cannot_read_a_required_file_is_named_with_the_file():
    paths = ["/log/model000004.pt", "/log/opt000004.pt"]
    problems = [[None, None], [None, "Permission denied"]]
    line = first_disagreement(paths, problems, [True, True])
    assert line.startswith("rank 1 cannot read /log/opt000004.pt (Permission denied), a file of the checkpoint that "
                           "rank 0 chose to resume from; every rank must see the log dir alike")
    assert first_disagreement(paths, [[None, None], [None, None]], [True, True]) is None


def test_optional_files_must_be_seen_alike():
    paths = ["/x/model.pt", "/x/opt000000.pt"]
    absent = "it does not exist there"
    assert first_disagreement(paths, [[None, absent], [None, absent]], [True, False]) is None  # absent everywhere
    assert first_disagreement(paths, [[None, None], [None, absent]], [True, False]).startswith(
        "rank 1 cannot read /x/opt000000.pt (it does not exist there), which rank 0 reads to resume")
    assert first_disagreement(paths, [[None, absent], [None, None]], [True, False]).startswith(
        "rank 1 sees /x/opt000000.pt, which rank 0 cannot read (it does not exist there)")


def test_one_process_checks_its_own_reads(tmp_path):
    present = tmp_path / "model000002.pt"
    present.write_bytes(b"x")
    assert read_problem(present) is None
    assert read_problem(tmp_path / "gone.pt") == "it does not exist there"
    check_every_rank_can_read([str(present)])
    with pytest.raises(CheckpointError, match=r"^rank 0 cannot read .*gone\.pt \(it does not exist there\)"):
        check_every_rank_can_read([str(present), str(tmp_path / "gone.pt")])


def test_resume_files_of_a_found_checkpoint_are_all_required():
    names = checkpoint_files(4, [0.9])
    required, optional = resume_files("/log/model000004.pt", "/log/model000004.pt", names)
    assert sorted(required) == sorted(f"/log/{n}" for n in names) and optional == []
    required, optional = resume_files("/ref/model000004.pt", None, names)
    assert required == ["/ref/model000004.pt"] and len(optional) == len(names) - 1
