"""Wall-clock timing shared by the benchmarks: complete on CUDA (synchronised), interleaved on shared machines."""

import time

import torch


def synchronize(device):
    """Wait for queued kernels so that wall-clock times are complete."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device):
    """Seconds one call of `fn` takes on `device`."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleaved_seconds(calls, repeats, device, warmup=1):
    """Total seconds of `repeats` calls of each fn in {name: fn(r)}, timed in turn so machine load hits all alike.

    Each fn receives the repeat index r (e.g. as a seed); `warmup` untimed rounds run first.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn(0)
    seconds = dict.fromkeys(calls, 0.0)
    for r in range(repeats):
        for name, fn in calls.items():
            seconds[name] += time_call(lambda: fn(r), device)
    return seconds
