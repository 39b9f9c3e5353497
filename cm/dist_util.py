"""A thin distributed shim: one code path for `mpiexec -n K`, `torchrun` and a plain single process.

* mpiexec: rank, size and local rank come from mpi4py; rank 0 picks the rendezvous address and a free
  port and broadcasts them over MPI. Set CM_MASTER_ADDR (or MASTER_ADDR) to choose the address.
* torchrun: the usual RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT variables.
* single process: no process group at all; every helper here still works.

Backend: nccl on CUDA (one GPU per local rank), gloo on CPU. Start-up and collectives time out after
CM_DIST_TIMEOUT seconds (default 600) instead of hanging; the ranks other than 0 first wait for the rendezvous
address to answer (`wait_for_rendezvous`), so a wrong address or a first node that never started is one line. Work that rank 0 does alone (a checkpoint write, through
`run_on_rank0`) is awaited outside any collective, for up to CM_SAVE_TIMEOUT seconds (default 3600), so a slow
write is not taken for a lost rank. Failures end every rank within seconds: rank 0
shares the outcome of what it does alone (`share_outcome`, e.g. locking the log dir), and a failing rank
exits at once (cm.errors), so the others' collectives fail on the closed connection.
"""

import atexit
import contextlib
import datetime
import itertools
import os
import socket
import time

import blobfile as bf
import torch
import torch.distributed as dist

from . import checkpoint_io
from .errors import CheckpointError, PeerFailure, SetupError, first_line

_MPI_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MPI_LOCALRANKID")
_LOCAL_RANK = 0
_TEARDOWN_REGISTERED = False

# The reference's module constants, kept importable: it gave rank r the GPU r % GPUS_PER_NODE and never read
# SETUP_RETRY_COUNT; here a rank takes the GPU of its local rank, whatever the node size.
GPUS_PER_NODE = 8
SETUP_RETRY_COUNT = 3


def _timeout():
    return datetime.timedelta(seconds=float(os.environ.get("CM_DIST_TIMEOUT", "600")))


def _launched_by_mpi():
    return any(v in os.environ for v in _MPI_RANK_VARS)


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _reachable_address(same_host):
    """The address other ranks should dial: loopback on one host, else this host's first non-loopback IPv4."""
    override = os.environ.get("CM_MASTER_ADDR") or os.environ.get("MASTER_ADDR")
    if override:
        return override
    if same_host:
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; this only selects the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())


def _mpi_environment():
    """Fill RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from MPI (rank 0 chooses and broadcasts)."""
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as e:
        raise SetupError(
            f'launched by mpiexec but no MPI library could be loaded ({type(e).__name__}: {e}); install one with '
            'pip install -e ".[mpi]" (or pip install mpi4py to use the cluster\'s own MPI)'
        ) from None

    comm = MPI.COMM_WORLD
    local_rank = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
    hosts = comm.allgather(socket.gethostname())
    addr, port = (_reachable_address(len(set(hosts)) == 1), _free_port()) if comm.rank == 0 else (None, None)
    addr, port = comm.bcast((addr, port), root=0)
    os.environ.update(
        RANK=str(comm.rank),
        WORLD_SIZE=str(comm.size),
        LOCAL_RANK=str(local_rank),
        MASTER_ADDR=addr,
        MASTER_PORT=str(os.environ.get("CM_MASTER_PORT", port)),
    )


def setup_dist(backend=None):
    """Join the process group of this launch (mpiexec, torchrun) or stay a single process."""
    global _LOCAL_RANK
    if dist.is_initialized():
        return
    if "RANK" not in os.environ and _launched_by_mpi():
        _mpi_environment()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _LOCAL_RANK = int(os.environ.get("LOCAL_RANK", "0"))
    if world_size <= 1:
        return
    use_cuda = torch.cuda.is_available() and os.environ.get("CM_DEVICE", "") != "cpu"
    if use_cuda:
        torch.cuda.set_device(_LOCAL_RANK % torch.cuda.device_count())
    backend = backend or ("nccl" if use_cuda else "gloo")
    address = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
    if int(os.environ.get("RANK", "0")) != 0:
        wait_for_rendezvous(os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), _timeout().total_seconds())
    try:
        dist.init_process_group(backend=backend, init_method="env://", timeout=_timeout())
    except Exception as e:  # noqa: BLE001 - turn any rendezvous failure into one sentence
        raise SetupError(
            f"rank {os.environ.get('RANK')} could not join the process group at {address} within "
            f"{_timeout().total_seconds():.0f} s ({type(e).__name__}: {e}); set CM_MASTER_ADDR to an address "
            "every node can reach, or raise CM_DIST_TIMEOUT"
        ) from None
    _register_teardown()


RENDEZVOUS_POLL_SECONDS = 0.5


def wait_for_rendezvous(host, port, seconds, rank=None):
    """Return once something listens at host:port (rank 0's rendezvous store), trying for up to `seconds`; else a
    SetupError in one line. Probing with a plain socket first keeps torch's own retry messages (C++ stack traces
    on stderr) out of a failure that only means the address is wrong or the first node is not up."""
    rank = os.environ.get("RANK") if rank is None else rank
    deadline, reason = time.monotonic() + seconds, "no address given"
    while host and port:
        try:
            with socket.create_connection((host, int(port)), timeout=max(0.1, min(5.0, seconds))):
                return
        except (OSError, ValueError) as e:
            reason = (e.strerror if isinstance(e, OSError) else None) or str(e) or type(e).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(min(RENDEZVOUS_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
    raise SetupError(
        f"rank {rank} could not reach the rendezvous at {host}:{port} within {seconds:.0f} s ({reason}); start rank 0 "
        "(the first node) and give every node its address (CM_MASTER_ADDR, or torchrun's --rdzv_endpoint / "
        "--master_addr), or raise CM_DIST_TIMEOUT"
    )


def _register_teardown():
    """Tear the process group down at interpreter exit, once: atexit runs it while Python is fully alive and
    before mpi4py finalises MPI (atexit is last-in first-out and mpi4py registered first). Without it, a gloo
    worker thread that releases a finished broadcast (whose tensors Python owns) after the interpreter began to
    finalise must take the GIL there, which ends the thread inside a C++ destructor: the finished run aborts
    ("terminate called without an active exception", exit code 6 under mpiexec; tests/exit_worker.py)."""
    global _TEARDOWN_REGISTERED
    if not _TEARDOWN_REGISTERED:
        atexit.register(teardown_dist)
        _TEARDOWN_REGISTERED = True


def teardown_dist():
    """Leave the process group together, then destroy it (idempotent). The barrier keeps rank 0, which hosts the
    rendezvous store, alive until every rank is done with it (e.g. its last look at run_on_rank0's outcome).
    Ranks that fail leave through os._exit (cm.errors) and never get here."""
    if not is_distributed():
        return
    dist.barrier()
    dist.destroy_process_group()


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_distributed() else 0


def get_world_size():
    return dist.get_world_size() if is_distributed() else 1


def barrier():
    if is_distributed():
        dist.barrier()


def share_outcome(error, what):
    """Tell every rank whether rank 0's solo work (`what`, e.g. writing a checkpoint) failed; use after it
    instead of a barrier. Rank 0 passes the exception it caught, or None; the other ranks raise PeerFailure
    when it failed, so all ranks stop at once rather than after the distributed time-out."""
    if not is_distributed():
        return
    message = broadcast_object(None if error is None else first_line(error))
    if message is not None and get_rank() != 0:
        raise PeerFailure(f"rank 0 failed {what}: {message}")


SOLO_POLL_SECONDS = 0.5  # the longest pause between two looks at the outcome of rank 0's solo work
SOLO_ACK_SECONDS = 10.0  # how long a failing rank 0 waits for the others to read its message before it exits
_solo_calls = itertools.count()


def save_timeout():
    """Seconds the other ranks wait for rank 0's solo work (CM_SAVE_TIMEOUT, default 3600)."""
    return float(os.environ.get("CM_SAVE_TIMEOUT", "3600"))


def _wait_for_key(store, key, seconds, what):
    """The value of `key` in the rendezvous store once rank 0 has set it; PeerFailure after `seconds`."""
    start, pause = time.monotonic(), 0.01
    while not store.check([key]):
        if time.monotonic() - start > seconds:
            raise PeerFailure(
                f"rank 0 did not finish {what} within CM_SAVE_TIMEOUT={seconds:.0f} s; raise CM_SAVE_TIMEOUT for "
                "slow storage"
            )
        time.sleep(pause)
        pause = min(2 * pause, SOLO_POLL_SECONDS)
    return store.get(key).decode()


def run_on_rank0(work, what):
    """work() on rank 0 alone; the other ranks wait for its outcome through the process group's rendezvous store
    (polling, outside any collective), for up to CM_SAVE_TIMEOUT seconds rather than CM_DIST_TIMEOUT: a
    checkpoint write slower than the collective time-out (a big model on a network file system) is not a lost
    rank. When work() fails, rank 0 raises its exception and the others PeerFailure naming it (`what`, e.g. "to
    write the checkpoint of step 4"), all at once. Returns work()'s result on rank 0, None elsewhere."""
    if not is_distributed():
        return work()
    key = f"cm/rank0/{next(_solo_calls)}"
    store = dist.distributed_c10d._get_default_store()
    if get_rank() != 0:
        message = _wait_for_key(store, key, save_timeout(), what)
        if message:
            store.add(f"{key}/read", 1)
            raise PeerFailure(f"rank 0 failed {what}: {message}")
        return None
    try:
        result = work()
    except Exception as e:
        store.set(key, first_line(e) or type(e).__name__)
        deadline = time.monotonic() + SOLO_ACK_SECONDS  # exiting ends the store, so let the others read it first
        while store.add(f"{key}/read", 0) < get_world_size() - 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        raise
    store.set(key, "")
    return result


def dev():
    """This rank's device: CM_DEVICE if set, else its local GPU, else the CPU."""
    forced = os.environ.get("CM_DEVICE", "")
    if forced and forced != "auto":
        return torch.device(forced)
    if torch.cuda.is_available():
        return torch.device("cuda", _LOCAL_RANK % torch.cuda.device_count())
    return torch.device("cpu")


def broadcast_object(obj, src=0):
    """obj from rank `src` on every rank (pickled through the process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=dev() if dist.get_backend() == "nccl" else None)
    return box[0]


def all_reduce_sum(values):
    """The element-wise sum over ranks of a list of ints (the list itself in a single process)."""
    if not is_distributed():
        return [int(v) for v in values]
    total = torch.tensor([int(v) for v in values], dtype=torch.int64,
                         device=dev() if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(total)
    return [int(v) for v in total.tolist()]


def all_gather_object(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_object(obj, dst=0):
    """[obj of rank 0, obj of rank 1, ...] on rank `dst`; None on the other ranks."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size() if get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def load_state_dict(path, **kwargs):
    """torch.load a (blobfile) path read once on rank 0 and broadcast; always weights_only=True; a .pt file
    is refused on a torch older than 2.6 (cm.checkpoint_io.torch_load_bytes)."""
    kwargs["weights_only"] = True
    data = None
    if get_rank() == 0:
        try:
            with bf.BlobFile(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = FileNotFoundError(f"checkpoint {path} does not exist")
        except OSError as e:
            data = CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}")
    data = broadcast_object(data)
    if isinstance(data, Exception):
        raise data
    if checkpoint_io.is_safetensors(path):
        return checkpoint_io.load_safetensors_bytes(data, kwargs.get("map_location"))
    return checkpoint_io.torch_load_bytes(data, path, **kwargs)


@torch.no_grad()
def sync_params(params):
    """Copy rank 0's tensors to every rank."""
    if not is_distributed():
        return
    for p in params:
        dist.broadcast(p, 0)


def ddp_sync(module, sync):
    """Context for one micro-batch: gradients all-reduce (DDP) or reduce-scatter (FSDP) only when `sync` (the last
    micro-batch)."""
    if hasattr(module, "set_requires_gradient_sync"):  # an FSDP2 module
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def launch_world_size():
    """The number of ranks this process was launched with (torchrun or mpiexec), before setup_dist."""
    if is_distributed():
        return get_world_size()
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return 1
