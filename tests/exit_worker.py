"""Worker for the clean-exit test: under `mpiexec -n 2`, each rank forks ROUNDS children; the children of one
round form a fresh 2-rank gloo world, train a tiny CT run to the end through scripts/cm_train.py's main and leave
through the interpreter's ordinary shutdown, as a finished run does. Each child's exit status is collected. Then
the two MPI ranks themselves train the same run over MPI's start-up and leave as cm_train.py does (process group
torn down, then MPI finalised).

Run as `mpiexec -n 2 python exit_worker.py OUT_DIR ROUNDS`; rank 0 writes OUT_DIR/statuses.json.
"""

import atexit
import importlib
import json
import os
import sys

import mpi4py

mpi4py.rc.finalize = False  # the forked children must not finalise their parent's MPI; the parent does at exit
from mpi4py import MPI  # noqa: E402



def finalize_mpi():
    if not MPI.Is_finalized():
        MPI.Finalize()


atexit.register(finalize_mpi)  # registered before anything else, so it runs last, as mpi4py's own does

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cm import dist_util  # noqa: E402
from cm.train_cli import main  # noqa: E402

from helpers import tiny_argv  # noqa: E402

MPI_VARS = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_PORT", "PMI_ID", "MPI_LOCALRANKID", "MPI_LOCALNRANKS")


def tiny_run(log_dir):
    argv = tiny_argv(training_mode="consistency_training", total_training_steps=3, save_interval=3, loss_norm="l2",
                     num_res_blocks=1, log_dir=log_dir)
    main(None, argv)


def child(out_dir, round_index, port):
    """A fresh rank of a 2-rank torch.distributed job; ends through sys.exit (atexit, then interpreter shutdown)."""
    atexit.unregister(finalize_mpi)  # the parent's MPI is not this process's to finalise
    for name in MPI_VARS:
        os.environ.pop(name, None)
    rank = MPI.COMM_WORLD.rank
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), CM_DIST_TIMEOUT="60")
    tiny_run(os.path.join(out_dir, f"round{round_index}"))
    sys.exit(0)


def preload_modules(log_dir):
    """Import, without running anything, the modules a run imports on the way (scipy, lpips, ...): a forked
    child then starts at once. A one-process run in a forked child names them (the parent must not compute:
    a child forked after an OpenMP parallel region can hang in its first collective)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read_end)
        tiny_run(log_dir)
        os.write(write_end, "\n".join(sorted(sys.modules)).encode())
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as f:
        names = f.read().split()
    os.waitpid(pid, 0)
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - a few private modules refuse a direct import; they are not needed
            pass


def run(out_dir, rounds):
    comm = MPI.COMM_WORLD
    preload_modules(os.path.join(out_dir, f"warm-up{comm.rank}"))
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
    tiny_run(os.path.join(sys.argv[1], "mpi"))
