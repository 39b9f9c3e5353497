"""A stop request: SIGINT / SIGTERM while training ask the loop to checkpoint and stop, and so does the pre-emption
warning (`--preempt_signal`, SIGUSR1 by default, which SLURM sends ahead of the kill when a job asks with
`#SBATCH --signal=USR1@120`); with several ranks, every rank stops at the same step, whichever rank (or ranks) got
the signal. After a pre-emption warning, `--requeue true` under SLURM puts the job back in the queue
(`requeue_slurm_job`), and the requeued job resumes from that checkpoint.

The ranks agree through one all-reduce (MAX) of a one-element flag per step, started without waiting
(`async_op`) and read one step later, when it has long finished: on CUDA the flag goes through pinned host
memory and an event, so agreeing costs no host synchronisation; on CPU (gloo) it is a few microseconds. A
signal during step k therefore stops every rank after step k + 1; a single process stops after step k.
The flag is a code (NO_STOP < TIME_UP < STOPPED < PREEMPTED), so its maximum also tells every rank whether any
rank got the pre-emption warning.
"""

import os
import signal
import subprocess

import torch
import torch.distributed as dist

# a rank's wish at a step; the all-reduce keeps the largest, so a pre-emption warning on any rank wins
NO_STOP, TIME_UP, STOPPED, PREEMPTED = 0, 1, 2, 3
PREEMPT_SIGNALS = ("USR1", "USR2", "none")  # --preempt_signal values: SIGUSR1, SIGUSR2, or no warning signal
REQUEUE_TIMEOUT_SECONDS = 60


def preempt_signal_number(name):
    """The signal number of a --preempt_signal value ("USR1" -> SIGUSR1), None for "none"."""
    if name in (None, "", "none"):
        return None
    if name not in PREEMPT_SIGNALS:
        raise ValueError(f"unknown preempt_signal {name!r}; allowed: {', '.join(PREEMPT_SIGNALS)}")
    return int(getattr(signal, f"SIG{name}"))


def stop_message(agreed, own_signal, own_time_up, preempt_signal, step):
    """The log line of a stop at `step`: this rank's own reason, else what the agreed code says of the others.

    :param agreed: the agreed code (TIME_UP, STOPPED or PREEMPTED).
    :param own_signal: the signal number this rank received, or None.
    :param own_time_up: whether this rank's time limit (or budget) ran out.
    :param preempt_signal: the pre-emption warning's signal number, or None.
    """
    if own_signal is not None:
        what = "pre-emption warning" if own_signal == preempt_signal else "stop requested"
        reason = f"{what} ({signal.Signals(own_signal).name})"
    elif agreed == PREEMPTED:
        reason = f"another rank got the pre-emption warning ({signal.Signals(preempt_signal).name})"
    elif own_time_up:
        reason = "time limit reached"
    else:
        reason = "another rank stopped"
    return f"{reason}: checkpointing step {step}"


def requeue_slurm_job(run=subprocess.run, environ=os.environ):
    """Put this SLURM job back in the queue (`scontrol requeue $SLURM_JOB_ID`); returns the log line saying what
    happened. Failing to requeue is a warning, never an error: the checkpoint is already written.

    :param run: subprocess.run (a stand-in in tests).
    :param environ: the environment to read SLURM_JOB_ID from.
    """
    job = environ.get("SLURM_JOB_ID")
    if not job:
        return "warning: --requeue true, but this is not a SLURM job (no SLURM_JOB_ID): not requeued"
    command = ["scontrol", "requeue", job]
    try:
        result = run(command, capture_output=True, text=True, timeout=REQUEUE_TIMEOUT_SECONDS)
    except FileNotFoundError:
        return f"warning: scontrol not found on this node: SLURM job {job} was not requeued"
    except (OSError, subprocess.SubprocessError) as e:
        return f"warning: scontrol requeue {job} failed ({type(e).__name__}: {e}): not requeued"
    if result.returncode != 0:
        said = (result.stderr or result.stdout or "").strip().splitlines()
        detail = said[0] if said else f"exit status {result.returncode}"
        return f"warning: scontrol requeue {job} failed ({detail}): not requeued"
    return f"requeued SLURM job {job} (scontrol requeue); it resumes from this checkpoint"


class StopRequest:
    """Turns SIGINT / SIGTERM (and the pre-emption warning signal) into a request to checkpoint and stop; `agreed`
    makes every rank stop alike.

    :param device: the device of the ranks' collectives (the model's device; CUDA with nccl, else CPU).
    :param preempt_signal: the signal number of the pre-emption warning (e.g. signal.SIGUSR1), or None.
    """

    def __init__(self, device=None, preempt_signal=None):
        self.requested = False
        self.received = None  # the number of the first signal this rank got
        self.preempt_signal = preempt_signal
        self._previous = {}
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        on_cuda = self._distributed and dist.get_backend() == "nccl"
        self._device = torch.device(device) if on_cuda and device is not None else torch.device("cpu")
        pinned = self._device.type == "cuda"
        self._host = [torch.zeros(1, dtype=torch.int32, pin_memory=pinned) for _ in range(4)]  # 2 sent, 2 read
        self._pending = None
        self._casts = 0

    def __enter__(self):
        signals = (signal.SIGINT, signal.SIGTERM) + ((self.preempt_signal,) if self.preempt_signal else ())
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if signum == self.preempt_signal:  # a repeated warning changes nothing: the checkpoint is on its way
            self.requested = True
            self.received = self.received or signum
            return
        if self.requested and self.received != self.preempt_signal:  # a second SIGINT / SIGTERM stops at once
            raise KeyboardInterrupt
        self.requested = True
        self.received = self.received or signum

    def wish(self, time_up=False):
        """This rank's wish at this step: PREEMPTED, STOPPED (SIGINT / SIGTERM), TIME_UP or NO_STOP."""
        if self.requested:
            return PREEMPTED if self.received == self.preempt_signal else STOPPED
        return TIME_UP if time_up else NO_STOP

    def agreed(self, wish):
        """Cast this step's wish (a code, or a bool: stop or not); returns the largest wish of any rank one step
        earlier (the same answer on every rank at the same step; 0: go on). A single process gets its own wish
        back at once."""
        if not self._distributed:
            return int(wish)
        slot = self._casts % 2
        self._casts += 1
        sent, read = self._host[slot], self._host[2 + slot]
        sent.fill_(int(wish))
        flag = sent.to(self._device, non_blocking=True) if self._device.type == "cuda" else sent.clone()
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self._device.type == "cuda":
            work.wait()  # the current stream waits for the all-reduce; the host does not
            read.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        previous, self._pending = self._pending, (work, flag, read, event)
        return self._outcome(previous) if previous is not None else NO_STOP

    @staticmethod
    def _outcome(pending):
        work, flag, read, event = pending
        if event is None:
            work.wait()
            return int(flag.item())
        event.synchronize()
        return int(read.item())

    def finish(self):
        """Wait for the last vote (every rank casts the same number), so no collective is left running."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._outcome(pending)

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.finish()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False
