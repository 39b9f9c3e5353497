"""Worker for the clean-exit test: tiny 2-rank programs that join the process group as training does
(cm.dist_util.setup_dist), end with a broadcast that gloo's worker thread is still tearing down, and leave through
the interpreter's ordinary shutdown, as a finished run does.

The abort it guards against: gloo's worker thread drops the last reference to a finished broadcast, whose tensors
belong to Python, so it must take the GIL to release them. When the main thread has meanwhile started the
interpreter's finalisation, taking the GIL ends the worker thread (pthread_exit) inside a C++ destructor, and the
process aborts: "terminate called without an active exception", exit code 6 under mpiexec. In a training run the
window is the few microseconds after the last collective (a busy machine widens it); here the window is held open
on purpose: the broadcast's handle is dropped at once, the main thread keeps the GIL (long switch interval) until
the broadcast is done, then exits, and the shutdown runs Python code long enough for the worker to get the GIL.
With cm.dist_util's teardown (a barrier, then destroy_process_group, at exit) the worker finishes before.

Run as `mpiexec -n 2 python exit_worker.py OUT_DIR ROUNDS`: each MPI rank forks ROUNDS children, the children of
one round form a fresh 2-rank world (torchrun-style variables); then the MPI ranks themselves run the program over
MPI's start-up and leave as cm_train.py does (process group torn down, then MPI finalised). Rank 0 writes the
children's exit statuses to OUT_DIR/statuses.json; every program that reached its end writes OUT_DIR/NAME.rankR.
"""

import atexit
import json
import os
import sys
import time

import mpi4py

mpi4py.rc.finalize = False  # the forked children must not finalise their parent's MPI; the parent does at exit
from mpi4py import MPI  # noqa: E402


def finalize_mpi():
    if not MPI.Is_finalized():
        MPI.Finalize()


atexit.register(finalize_mpi)  # registered before anything else, so it runs last, as mpi4py's own does

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from cm import dist_util  # noqa: E402

MPI_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMI_ID", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")
HOLD_SECONDS = 0.1  # the main thread keeps the GIL this long after starting the broadcast
SHUTDOWN_SECONDS = 0.5  # Python code run during the interpreter's finalisation


class SlowShutdown:
    """Released while the interpreter finalises (module globals are cleared): runs Python code for a while, so a
    thread waiting for the GIL gets it during the finalisation, as it would during a long shutdown."""

    def __del__(self):
        end = time.perf_counter() + SHUTDOWN_SECONDS
        while time.perf_counter() < end:
            pass


def finished_program(out_dir, name):
    """Join the process group, sync parameters (a broadcast, as training starts), end with a broadcast whose
    teardown the worker thread still owes, mark the end, and return to exit."""
    global _shutdown
    dist_util.setup_dist()
    params = [torch.zeros(3)]
    dist_util.sync_params(params)
    dist.broadcast(params[0], 0, async_op=True)  # the handle is dropped: gloo's worker holds the last reference
    sys.setswitchinterval(2 * HOLD_SECONDS)  # the worker waits this long for the GIL before asking for it
    end = time.perf_counter() + HOLD_SECONDS
    while time.perf_counter() < end:
        pass
    open(os.path.join(out_dir, f"{name}.rank{dist_util.get_rank()}"), "w").close()
    _shutdown = SlowShutdown()


def child(out_dir, round_index, port):
    """A fresh rank of a 2-rank torch.distributed job; ends through sys.exit (atexit, then interpreter shutdown)."""
    atexit.unregister(finalize_mpi)  # the parent's MPI is not this process's to finalise
    for name in MPI_VARS:
        os.environ.pop(name, None)
    rank = MPI.COMM_WORLD.rank
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CM_DIST_TIMEOUT="60")
    finished_program(out_dir, f"round{round_index}")
    sys.exit(0)


def run(out_dir, rounds):
    comm = MPI.COMM_WORLD
    statuses = []
    for i in range(rounds):
        port = comm.bcast(dist_util._free_port() if comm.rank == 0 else None, root=0)
        pid = os.fork()
        if pid == 0:
            child(out_dir, i, port)
        _, status = os.waitpid(pid, 0)
        statuses.append(os.waitstatus_to_exitcode(status))
    everyone = comm.gather(statuses, root=0)
    if comm.rank == 0:
        with open(os.path.join(out_dir, "statuses.json"), "w") as f:
            json.dump(everyone, f)


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]))
    finished_program(sys.argv[1], "mpi")
