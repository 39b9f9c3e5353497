"""Training to a wall-clock budget (--time_budget_minutes): the run sets its own length from its measured speed.

A budgeted run starts on its configured step count. After TIMING_STEPS steps, or a tenth of the budget if that
comes first, it measures its speed (the first step of a session, which sets everything up, is not timed) and
re-plans: the step count that fits the time left becomes its length, and
everything planned over that length follows (the learning-rate decay, scaled with it, and the mode's mu(k) / N(k)
or stage schedule, rebuilt for the new total_steps). Halfway through what is left it measures and re-plans again,
until at most FINAL_STRETCH steps are left; that plan is final, so the end of the schedule stays put. A run that
still overruns (the machine slowed down after the final plan) checkpoints and stops at SAFETY_FACTOR times the
budget. The budget counts training time only, start-up excluded, summed over the sessions of a resumed run.
"""

import time

TIMING_STEPS = 100  # steps timed before the first plan
TIMING_FRACTION = 0.1  # ... or this fraction of the budget, whichever comes first
FINAL_STRETCH = 300  # steps: with at most this many left, the plan is final
STEP_TIME_MARGIN = 1.03  # plans assume steps this much slower than measured
SAFETY_FACTOR = 1.5  # stop (and checkpoint) at this multiple of the budget whatever the plan


def steps_in_budget(step, seconds_left, seconds_per_step, margin=STEP_TIME_MARGIN):
    """The step at which a run now at `step` ends when seconds_left remain at seconds_per_step (times margin)."""
    per_step = max(seconds_per_step, 1e-9) * margin
    return step + max(0, int(seconds_left / per_step))


def next_replan(step, total_steps, final_stretch=FINAL_STRETCH):
    """The step of the next re-plan (halfway through what is left), or None when the plan is final."""
    left = total_steps - step
    return None if left <= final_stretch else step + left // 2


def run_length(total_training_steps, lr_anneal_steps):
    """Steps a run trains for: the first of total_training_steps and lr_anneal_steps that is set (0: no end)."""
    ends = [s for s in (total_training_steps, lr_anneal_steps) if s > 0]
    return min(ends) if ends else 0


def scaled_steps(steps, planned, configured):
    """A configured step count stretched with the run: round(steps * planned / configured); 0 (off) stays 0."""
    if steps <= 0 or configured <= 0:
        return steps
    return max(1, round(steps * planned / configured))


def planned_lengths(total_training_steps, lr_anneal_steps, planned):
    """(total_training_steps, lr_anneal_steps) of a configuration re-planned to end at step `planned`.

    Both scale by planned / run_length, so the run ends at `planned` and the lr decay keeps its shape (a decay over
    the whole run still ends with it). A run configured without an end (both 0) ends at `planned`, lr constant.
    """
    configured = run_length(total_training_steps, lr_anneal_steps)
    if configured == 0:
        return planned, 0
    total = scaled_steps(total_training_steps, planned, configured) if total_training_steps > 0 else planned
    return total, scaled_steps(lr_anneal_steps, planned, configured)


class TimeBudget:
    """When a budgeted run re-plans, and for how many steps (see the module docstring).

    :param seconds: the budget, in seconds of training.
    :param spent: seconds trained by earlier sessions of the run (restored from a checkpoint).
    :param final: the plan is final: no more re-planning.
    :param clock: time source in seconds (monotonic; tests pass their own).
    """

    def __init__(self, seconds, spent=0.0, final=False, clock=time.monotonic):
        if not seconds > 0:
            raise ValueError(f"a time budget must be positive, got {seconds} s")
        self.seconds = float(seconds)
        self.spent = float(spent)
        self.final = bool(final)
        self.clock = clock
        self.timing_steps = TIMING_STEPS
        self.timing_fraction = TIMING_FRACTION
        self.final_stretch = FINAL_STRETCH
        self.margin = STEP_TIME_MARGIN
        self.safety_factor = SAFETY_FACTOR
        self.seconds_per_step = None  # the speed the latest plan used
        self._session = None  # clock time this session began
        self._mark = None  # (clock time, step) the speed is measured from (None: not yet, the first step is warm-up)
        self._check_at = None  # step of the next re-plan (None: final)
        self._first = False  # the session has not planned yet

    def start(self, step, end):
        """Begin a session at `step`, the run currently planned to end at step `end` (0: no end)."""
        self._session, self._mark, self._first = self.clock(), None, True
        first = step + self.timing_steps
        if end > step + 1:
            first = min(first, end - 1)  # plan before the provisional end stops the run
        self._check_at = None if self.final else first

    def stop(self):
        """End a session: its time counts as spent."""
        if self._session is not None:
            self.spent += self.clock() - self._session
            self._session = None

    def elapsed(self):
        """Seconds trained so far, this session included."""
        return self.spent + (self.clock() - self._session if self._session is not None else 0.0)

    def due(self, step):
        """Whether to re-plan now, after `step` steps; the first call of a session starts the timing instead."""
        if self._check_at is None:
            return False
        if self._mark is None:
            self._mark = (self.clock(), step)
            return False
        if step >= self._check_at:
            return True
        since, from_step = self._mark
        return self._first and step > from_step and self.clock() - since >= self.timing_fraction * self.seconds

    def plan(self, step):
        """The step count that fits the budget, at the speed measured since the last plan (or the session's start)."""
        since, from_step = self._mark
        self.seconds_per_step = (self.clock() - since) / max(step - from_step, 1)
        return steps_in_budget(step, self.seconds - self.elapsed(), self.seconds_per_step, self.margin)

    def accept(self, step, total_steps):
        """Adopt a plan made at `step` (this rank's or rank 0's): time afresh from here, re-plan halfway to its end."""
        self._mark, self._first = (self.clock(), step), False
        self._check_at = next_replan(step, total_steps, self.final_stretch)
        self.final = self._check_at is None

    @property
    def next_check(self):
        """Step of the next re-plan (None when the plan is final)."""
        return self._check_at

    def overrun(self):
        """The run has trained SAFETY_FACTOR times its budget: stop whatever the plan."""
        return self.elapsed() > self.safety_factor * self.seconds

    def state_dict(self):
        """What a resumed run needs: the budget, the seconds spent and whether the plan is final."""
        return {"seconds": self.seconds, "spent": self.elapsed(), "final": self.final}
