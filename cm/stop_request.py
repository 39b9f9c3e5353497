"""A stop request: SIGINT / SIGTERM while training ask the loop to checkpoint and stop; with several ranks, every
rank stops at the same step, whichever rank (or ranks) got the signal.

The ranks agree through one all-reduce (MAX) of a one-element flag per step, started without waiting
(`async_op`) and read one step later, when it has long finished: on CUDA the flag goes through pinned host
memory and an event, so agreeing costs no host synchronisation; on CPU (gloo) it is a few microseconds. A
signal during step k therefore stops every rank after step k + 1; a single process stops after step k.
"""

import signal

import torch
import torch.distributed as dist


class StopRequest:
    """Turns SIGINT / SIGTERM into a request to checkpoint and stop; `agreed` makes every rank stop alike.

    :param device: the device of the ranks' collectives (the model's device; CUDA with nccl, else CPU).
    """

    def __init__(self, device=None):
        self.requested = False
        self._previous = {}
        self._distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        on_cuda = self._distributed and dist.get_backend() == "nccl"
        self._device = torch.device(device) if on_cuda and device is not None else torch.device("cpu")
        pinned = self._device.type == "cuda"
        self._host = [torch.zeros(1, dtype=torch.int32, pin_memory=pinned) for _ in range(4)]  # 2 sent, 2 read
        self._pending = None
        self._casts = 0

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal stops at once
            raise KeyboardInterrupt
        self.requested = True

    def agreed(self, wish):
        """Cast this step's wish to stop (bool); returns whether any rank wished so one step earlier (the
        same answer on every rank at the same step). A single process gets its own wish back at once."""
        if not self._distributed:
            return bool(wish)
        slot = self._casts % 2
        self._casts += 1
        sent, read = self._host[slot], self._host[2 + slot]
        sent.fill_(int(bool(wish)))
        flag = sent.to(self._device, non_blocking=True) if self._device.type == "cuda" else sent.clone()
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True)
        event = None
        if self._device.type == "cuda":
            work.wait()  # the current stream waits for the all-reduce; the host does not
            read.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        previous, self._pending = self._pending, (work, flag, read, event)
        return previous is not None and self._outcome(previous)

    @staticmethod
    def _outcome(pending):
        work, flag, read, event = pending
        if event is None:
            work.wait()
            return bool(flag.item())
        event.synchronize()
        return bool(read.item())

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
