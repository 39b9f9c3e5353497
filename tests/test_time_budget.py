"""Training to a time budget (--time_budget_minutes): the planning arithmetic, the re-planning loop, resume."""

import glob
import shutil
import time

import pytest
import torch

from cm import time_budget
from cm.config import resolve_training_config
from cm.time_budget import TimeBudget, next_replan, planned_lengths, run_length, scaled_steps, steps_in_budget
from cm.train_cli import build_loop, create_argparser, main

from helpers import state_equal, tiny_argv

CT_SCHEDULE = dict(scale_mode="exponential", target_ema_mode="fixed", start_ema=0.0, start_scales=2, end_scales=8,
                   loss_norm="l2")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


# ----- the arithmetic -----------------------------------------------------------------------------


def test_steps_in_budget_divides_the_time_left_by_the_step_time_with_its_margin():
    assert steps_in_budget(100, 60.0, 0.1, margin=1.0) == 700
    assert steps_in_budget(100, 60.0, 0.125, margin=2.0) == 340
    assert steps_in_budget(100, 60.0, 0.1) == 100 + int(60.0 / (0.1 * time_budget.STEP_TIME_MARGIN))
    assert steps_in_budget(100, -5.0, 0.1) == 100  # over budget: end now


def test_next_replan_halves_what_is_left_until_the_final_stretch():
    assert next_replan(100, 1000, final_stretch=300) == 550
    assert next_replan(700, 1000, final_stretch=300) is None
    assert next_replan(699, 1000, final_stretch=300) == 849


def test_planned_lengths_scale_the_run_and_its_lr_decay_together():
    assert run_length(1700, 1700) == 1700 and run_length(0, 1500) == 1500 and run_length(1000, 500) == 500
    assert run_length(0, 0) == 0
    assert planned_lengths(1700, 1700, 613) == (613, 613)  # the digits presets: lr reaches 0 at the planned end
    assert planned_lengths(1000, 500, 250) == (500, 250)  # lr decay ends the run: it still ends at the plan
    assert planned_lengths(1000, 0, 250) == (250, 0)  # constant lr stays constant
    assert planned_lengths(0, 1500, 900) == (900, 900)  # EDM preset: no total, decay over 1500
    assert planned_lengths(0, 0, 400) == (400, 0)  # "until interrupted" ends at the plan
    assert scaled_steps(0, 10, 20) == 0 and scaled_steps(3, 1, 1000) == 1


def test_the_budget_replans_from_the_measured_speed_and_ends_on_time():
    clock = FakeClock()
    budget = TimeBudget(100.0, clock=clock)
    budget.timing_steps, budget.final_stretch = 10, 20
    budget.start(0, 1000)
    step, plans = 0, []
    while not budget.final:
        step += 1
        clock.now += 0.5  # 0.5 s per step: 200 steps fit in the budget
        if budget.due(step):
            total = budget.plan(step)
            budget.accept(step, total)
            plans.append((step, total))
    assert plans[0][0] == 10  # after the timing steps
    assert [s for s, _ in plans] == sorted(s for s, _ in plans) and len(plans) > 2  # re-planned halfway each time
    assert 190 <= plans[-1][1] <= 200  # the margin keeps the plan inside the budget
    assert plans[-1][1] - plans[-1][0] <= 20  # final once the final stretch is left


def test_slow_steps_plan_after_a_tenth_of_the_budget_and_the_first_step_is_not_timed():
    clock = FakeClock()
    budget = TimeBudget(100.0, clock=clock)
    budget.start(0, 1000)
    clock.now = 30.0  # the first step sets things up
    assert not budget.due(1)
    clock.now = 40.0  # the next one took a tenth of the budget
    assert budget.due(2)
    assert budget.plan(2) == 2 + int(60 / (10 * time_budget.STEP_TIME_MARGIN))


def test_the_first_plan_comes_before_the_provisional_end():
    budget = TimeBudget(100.0, clock=FakeClock())
    budget.start(0, 30)
    assert budget.next_check == 29


def test_spent_time_carries_over_sessions_and_the_safety_stop_follows_it():
    clock = FakeClock()
    budget = TimeBudget(10.0, spent=12.0, clock=clock)
    budget.start(0, 100)
    clock.now = 2.0
    assert budget.elapsed() == 14.0 and not budget.overrun()
    clock.now = 3.5
    assert budget.overrun()  # past 1.5 x the budget
    budget.stop()
    assert budget.state_dict() == {"seconds": 10.0, "spent": 15.5, "final": False}


def test_the_flag_resolves_to_seconds_and_refuses_negative_values():
    parse = create_argparser("consistency_training").parse_args
    assert resolve_training_config(parse(tiny_argv(time_budget_minutes=2.5)))["loop"]["time_budget"] == 150.0
    assert resolve_training_config(parse(tiny_argv()))["loop"]["time_budget"] == 0.0
    with pytest.raises(ValueError, match="time_budget_minutes must be 0"):
        resolve_training_config(parse(tiny_argv(time_budget_minutes=-1)))


# ----- the loop ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["consistency_training", "edm"])
def test_a_budgeted_run_ends_within_its_budget_with_schedules_replanned(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(time_budget, "TIMING_STEPS", 5)
    monkeypatch.setattr(time_budget, "FINAL_STRETCH", 10)
    budget_s = 3.0
    flags = dict(log_dir=tmp_path, time_budget_minutes=budget_s / 60, total_training_steps=5000, lr_anneal_steps=5000,
                 log_interval=10)
    if mode != "edm":
        flags.update(CT_SCHEDULE)
    started = time.time()
    loop = main(mode, tiny_argv(**flags))
    assert time.time() - started < budget_s + 60  # start-up included; the loop's own clock below
    assert loop.budget.elapsed() <= 1.5 * budget_s
    assert loop.budget.final
    assert 5 < loop.step == loop.total_training_steps == loop.lr_anneal_steps < 5000
    assert loop.opt.param_groups[0]["lr"] == 0.0  # the decay ended with the planned run
    if mode != "edm":
        scales = [loop.schedule_fn(k)["num_scales"] for k in (0, loop.step // 2, loop.step - 1)]
        assert scales[0] == 3 and scales[2] == CT_SCHEDULE["end_scales"] + 1
        assert scales[1] < CT_SCHEDULE["end_scales"] + 1  # doubling over the planned run
    log = (tmp_path / "log.txt").read_text()
    assert "time budget: step" in log and "final plan" in log
    state = torch.load(tmp_path / f"state{loop.step:06d}.pt", weights_only=False)
    assert state["plan"]["total_training_steps"] == loop.step and state["plan"]["budget"]["final"]


def test_a_run_without_a_budget_stores_no_plan(tmp_path):
    loop = main("consistency_training", tiny_argv(log_dir=tmp_path, total_training_steps=2, **CT_SCHEDULE))
    assert loop.budget is None and loop.total_training_steps == 2
    assert torch.load(tmp_path / "state000002.pt", weights_only=False)["plan"] is None


def budgeted_loop(log_dir):
    """A 12 s budget in which every step takes 1 s of the loop's (fake) clock: plans at steps 4, 7 and 9 end at 11."""
    argv = tiny_argv(log_dir=log_dir, time_budget_minutes=0.2, total_training_steps=100, lr_anneal_steps=100,
                     save_interval=5, **CT_SCHEDULE)
    loop = build_loop(create_argparser("consistency_training").parse_args(argv))
    loop.progress = False
    loop.budget.clock = lambda: float(loop.step)
    return loop


@pytest.mark.parametrize("resume_at", [5, 10])
def test_a_resumed_budgeted_run_continues_its_plan_exactly(tmp_path, monkeypatch, resume_at):
    monkeypatch.setattr(time_budget, "TIMING_STEPS", 4)
    monkeypatch.setattr(time_budget, "FINAL_STRETCH", 3)
    monkeypatch.setattr(time_budget, "TIMING_FRACTION", 1.0)
    straight = budgeted_loop(tmp_path / "a")
    straight.run_loop()
    assert straight.step == 11 and straight.budget.final

    (tmp_path / "b").mkdir()
    for path in glob.glob(str(tmp_path / "a" / f"*{resume_at:06d}.pt")):  # killed after this checkpoint
        shutil.copy(path, tmp_path / "b")
    torch.manual_seed(12345)
    resumed = budgeted_loop(tmp_path / "b")
    assert resumed.step == resume_at and resumed.total_training_steps == resumed.lr_anneal_steps == 11
    assert resumed.budget.spent == resume_at and resumed.budget.final == (resume_at == 10)
    resumed.run_loop()
    assert resumed.step == 11 and resumed.budget.elapsed() == 11
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert state_equal(straight.target_model.state_dict(), resumed.target_model.state_dict())
    assert "time budget: resuming the plan of 11 steps" in (tmp_path / "b" / "log.txt").read_text()


def test_resuming_a_budgeted_checkpoint_without_a_budget_follows_the_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(time_budget, "TIMING_STEPS", 4)
    monkeypatch.setattr(time_budget, "FINAL_STRETCH", 3)
    monkeypatch.setattr(time_budget, "TIMING_FRACTION", 1.0)
    budgeted_loop(tmp_path).run_loop()
    again = main("consistency_training", tiny_argv(log_dir=tmp_path, total_training_steps=12, lr_anneal_steps=12,
                                                   allow_config_change="true", **CT_SCHEDULE))
    assert again.step == 12 and again.budget is None
    assert "this run has no --time_budget_minutes" in (tmp_path / "log.txt").read_text()
