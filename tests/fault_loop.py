"""Fault loop: a tiny consistency-training run, SIGKILLed again and again and resumed each time, must end
bit-equal to the same run left alone.

    python tests/fault_loop.py                       # 20 kills over a 40-step run, children forked
    python tests/fault_loop.py --kills 50 --steps 80 --launch exec --seed 3

Each attempt runs the training command (cm.train_cli.main, as scripts/ct_train.py does) in a child process
and kills it with SIGKILL at one random moment of one of four kinds:

* start-up: a random delay after the start (building the networks, reading the checkpoint);
* step: while the run is at a random step (between steps, in a step, or in the checkpoint after it);
* mid-file: halfway through writing a random file of a checkpoint (a truncated temporary file is left);
* between files: after a random file of a checkpoint was renamed into place (a partial set is left).

The next attempt resumes from whatever is on disk. At the end, every tensor and value of the last checkpoint
(model, EMAs, target, optimizer, data position, RNG states; the state file without its recorded config,
which names the log dir) must equal an uninterrupted run's, and no temporary file may remain.

--launch fork (default) forks each child from this process, which has imported torch already: fast, and
what the test suite runs. --launch exec starts every child as a fresh interpreter, like a real restart.
Exit status 0 when the runs agree; the summary goes to stdout.
"""

import argparse
import csv
import io
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

EMA_RATES = "0.9,0.99"
EXTRA_NETWORKS = ("target_model",)
KINDS = ("start-up", "step", "mid-file", "between files")


def training_argv(log_dir, steps, save_interval):
    """Flags of the tiny CT run (8 px digits, l2 distance), its checkpoints every save_interval steps."""
    from helpers import tiny_argv

    return tiny_argv(log_dir=log_dir, total_training_steps=steps, save_interval=save_interval, loss_norm="l2",
                     ema_rate=EMA_RATES)


def files_per_checkpoint():
    return len(EMA_RATES.split(",")) + 3 + len(EXTRA_NETWORKS)  # EMAs, opt, state, model, target


# ----- the child: training, with an optional self-kill inside a checkpoint write -----------------


def kill_self():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def arm_checkpoint_kill(kind, nth):
    """Make this process SIGKILL itself halfway through (mid-file) or right after (between files) the nth
    checkpoint file it writes."""
    import torch

    from cm import checkpoint_io

    count = {"n": 0}
    real_save, real_replace = torch.save, os.replace

    def save(obj, f, *args, **kwargs):
        if ".pt.tmp" not in str(getattr(f, "name", "")):
            return real_save(obj, f, *args, **kwargs)
        count["n"] += 1
        if kind != "mid-file" or count["n"] != nth:
            return real_save(obj, f, *args, **kwargs)
        buffer = io.BytesIO()
        real_save(obj, buffer)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        f.flush()
        kill_self()

    def replace(src, dst):
        real_replace(src, dst)
        if kind == "between files" and ".pt.tmp" in str(src) and count["n"] == nth:
            kill_self()

    checkpoint_io.torch.save = save
    checkpoint_io.os.replace = replace


def child_main(log_dir, steps, save_interval, kind="", nth=0):
    """Train (resuming from log_dir); with kind mid-file / between files, die at the nth checkpoint file."""
    from cm.train_cli import main

    if kind in ("mid-file", "between files"):
        arm_checkpoint_kill(kind, nth)
    main("consistency_training", training_argv(log_dir, steps, save_interval))


# ----- the parent: launching, killing, comparing -------------------------------------------------


class Child:
    """One training process (forked, or a fresh interpreter), its output in log_dir/attempts.txt."""

    def __init__(self, launch, log_dir, steps, save_interval, kind="", nth=0):
        self.started = time.time()
        out = open(os.path.join(log_dir, "attempts.txt"), "ab")
        if launch == "exec":
            cmd = [sys.executable, os.path.abspath(__file__), "--child", log_dir, "--steps", str(steps),
                   "--save_interval", str(save_interval), "--kind", kind, "--nth", str(nth)]
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
            self.pid = self.proc.pid
        else:
            self.proc = None
            self.pid = os.fork()
            if self.pid == 0:
                os.dup2(out.fileno(), 1)
                os.dup2(out.fileno(), 2)
                code = 1
                try:
                    child_main(log_dir, steps, save_interval, kind, nth)
                    code = 0
                except SystemExit as e:
                    code = e.code if isinstance(e.code, int) else 1
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
        out.close()

    def poll(self):
        """The exit status (negative: killed by that signal), or None while running."""
        if self.proc is not None:
            return self.proc.poll()
        pid, status = os.waitpid(self.pid, os.WNOHANG)
        return None if pid == 0 else os.waitstatus_to_exitcode(status)

    def kill(self):
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait(self):
        while (code := self.poll()) is None:
            time.sleep(0.002)
        return code


def logged_steps(log_dir):
    """The steps of the rows of progress.csv, oldest first (every session appends its own)."""
    try:
        with open(os.path.join(log_dir, "progress.csv"), newline="") as f:
            rows = list(csv.DictReader(f))
    except (FileNotFoundError, csv.Error):
        return []
    return [int(float(row["step"])) for row in rows if (row.get("step") or "").strip()]


def resume_step(log_dir):
    from cm.train_util import find_resume_checkpoint, parse_ema_rates, parse_resume_step_from_filename

    found = find_resume_checkpoint(log_dir, parse_ema_rates(EMA_RATES), EXTRA_NETWORKS)
    return parse_resume_step_from_filename(found) if found else 0


def saves_left(resumed, steps, save_interval):
    """Checkpoints a run resumed at `resumed` writes before it ends (the last one at `steps`)."""
    return len({s for s in range(resumed + 1, steps + 1) if s % save_interval == 0} | {steps})


def choose_kill(rng, kind, resumed, steps, save_interval, kills_left):
    """(nth checkpoint file, target step) of the next kill of `kind`. Each kill may land up to twice the run's
    remaining steps per remaining kill ahead, so the kills spread over the whole run."""
    remaining = steps - resumed
    reach = min(remaining, max(2 * save_interval, 2 * remaining // (kills_left + 1)))
    target = resumed + rng.randint(1, reach)
    saves = max(1, min(saves_left(resumed, steps, save_interval), reach // save_interval))
    nth = rng.randint(1, saves * files_per_checkpoint()) if kind in ("mid-file", "between files") else 0
    return nth, target


def run_until_killed(child, kind, target, rng, log_dir, startup_s, earlier_rows):
    """Kill the child at a random moment of `kind` (the checkpoint kinds kill themselves); target: the step of
    a "step" kill; earlier_rows: rows of progress.csv written before the child started."""
    if kind == "start-up":
        time.sleep(rng.uniform(0.0, startup_s))
        child.kill()
    elif kind == "step":
        while child.poll() is None and max(logged_steps(log_dir)[earlier_rows:], default=0) < target:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.05))
        child.kill()
    return child.wait()


def kill_loop(log_dir, steps, save_interval, kills, rng, launch, startup_s):
    """Kill and resume until `kills` children died by SIGKILL, then let one finish; returns (kind, resume step)
    of each kill."""
    done, kinds = [], []
    while len(done) < kills:
        kinds = kinds or rng.sample(KINDS, len(KINDS))  # every kind once in each round of four, in random order
        kind = kinds.pop()
        resumed = resume_step(log_dir)
        nth, target = choose_kill(rng, kind, resumed, steps, save_interval, kills - len(done))
        earlier_rows = len(logged_steps(log_dir))
        child = Child(launch, log_dir, steps, save_interval, kind, nth)
        code = run_until_killed(child, kind, target, rng, log_dir, startup_s, earlier_rows)
        if code == -signal.SIGKILL:
            done.append((kind, resumed))
        elif code != 0:
            raise RuntimeError(f"attempt {len(done) + 1} failed with status {code}; see {log_dir}/attempts.txt")
        if resume_step(log_dir) == steps:
            break  # finished before the kill came: nothing left to interrupt
    final = Child(launch, log_dir, steps, save_interval).wait()
    if final != 0:
        raise RuntimeError(f"the final run failed with status {final}; see {log_dir}/attempts.txt")
    return done


def checkpoint_values(log_dir, step):
    """Every file of the step's checkpoint, loaded (the state without its config, which names the log dir)."""
    import torch

    from cm.train_util import checkpoint_files, parse_ema_rates

    values = {}
    for name in checkpoint_files(step, parse_ema_rates(EMA_RATES), EXTRA_NETWORKS):
        value = torch.load(os.path.join(log_dir, name), map_location="cpu", weights_only=True)
        if name.startswith("state"):
            value.pop("config", None)
        values[name] = value
    return values


def differences(a, b, where=""):
    """Paths at which two nested structures of tensors and plain values differ (tensors: bit for bit)."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        same = torch.is_tensor(a) and torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape
        return [] if same and torch.equal(a, b) else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}/{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} length"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [where]


def preload():
    """Import here, once, what every forked child would otherwise import itself (seconds per child)."""
    import sklearn.datasets  # noqa: F401 - the digits data
    import torch._dynamo  # noqa: F401 - imported by the optimizers' constructors
    import tqdm.auto  # noqa: F401

    import cm.train_cli  # noqa: F401
    import helpers  # noqa: F401


def fault_loop(work_dir, kills=20, steps=40, save_interval=2, seed=0, launch="fork"):
    """Run the reference and the killed run in work_dir; returns a summary dict (ok, kills, differences, ...)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    if launch == "fork":
        preload()

    reference, killed = os.path.join(work_dir, "reference"), os.path.join(work_dir, "killed")
    os.makedirs(reference), os.makedirs(killed)
    start = time.time()
    if Child(launch, reference, steps, save_interval).wait() != 0:
        raise RuntimeError(f"the uninterrupted run failed; see {reference}/attempts.txt")
    reference_s = time.time() - start
    startup_s = 0.3 if launch == "fork" else 8.0
    done = kill_loop(killed, steps, save_interval, kills, random.Random(seed), launch, startup_s)
    left_over = [n for n in os.listdir(killed) if ".tmp" in n]
    diffs = differences(checkpoint_values(reference, steps), checkpoint_values(killed, steps))
    return {
        "ok": not diffs and not left_over and len(done) >= kills,
        "kills": done,
        "differences": diffs,
        "temporary_files": left_over,
        "reference_s": reference_s,
        "total_s": time.time() - start,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="SIGKILL a tiny CT run again and again; check it ends bit-equal.")
    parser.add_argument("--kills", type=int, default=20, help="children to kill before the last one may finish")
    parser.add_argument("--steps", type=int, default=40, help="training steps of the run")
    parser.add_argument("--save_interval", type=int, default=2, help="steps between checkpoints")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    parser.add_argument("--launch", choices=("fork", "exec"), default="fork", help="how children start")
    parser.add_argument("--work_dir", default="", help="where the two runs go (default: a new temp dir)")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--kind", default="", help=argparse.SUPPRESS)
    parser.add_argument("--nth", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.steps, args.save_interval, args.kind, args.nth)
    work_dir = args.work_dir or tempfile.mkdtemp(prefix="cm-fault-loop-")
    result = fault_loop(work_dir, args.kills, args.steps, args.save_interval, args.seed, args.launch)
    kinds = {k: sum(1 for kind, _ in result["kills"] if kind == k) for k in KINDS}
    print(f"{len(result['kills'])} kills ({', '.join(f'{n} {k}' for k, n in kinds.items())}) at resume steps "
          f"{[step for _, step in result['kills']]}; uninterrupted run {result['reference_s']:.1f} s, "
          f"all {result['total_s']:.1f} s; runs in {work_dir}")
    if result["ok"]:
        print(f"bit-equal: the killed-and-resumed run ends with the same step-{args.steps} checkpoint")
        return 0
    print(f"MISMATCH: differences {result['differences'][:10]}, temporary files left {result['temporary_files']}, "
          f"{len(result['kills'])} of {args.kills} kills")
    return 1


if __name__ == "__main__":
    sys.exit(main())
