"""Per-rank memory of a run's training state under --parallel ddp and fsdp, from the sharded networks themselves.

    python benchmarks/fsdp_memory.py [--ranks 8] [--configs configs/imagenet64_cd_lpips.yaml ...]

Starts `--ranks` CPU processes (gloo), builds each preset's networks on the meta device (no memory, no
weights), shards them with the same `cm.sharding.shard_network` training uses and reads every rank's local shard
sizes; the table gives the largest rank's bytes. Counted: parameters (float32 masters), the optimizer's state
(Adam / AdamW / RAdam keep two tensors shaped as each parameter), each EMA copy, the target network and the frozen
teacher, as the preset's training mode holds them. Activations, gradients (freed after each step under fsdp;
under ddp a parameter-sized bucket) and the LPIPS network are not in it.
"""

import argparse
import os
import queue
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cm.config import resolve_training_config  # noqa: E402
from cm.networks import create_model  # noqa: E402
from cm.script_util import parse_args_with_config  # noqa: E402
from cm.sharding import shard_network, sharded_bytes  # noqa: E402
from cm.train_cli import create_argparser  # noqa: E402
from cm.train_util import parse_ema_rates  # noqa: E402
from cm.training_modes import get_training_mode  # noqa: E402

DEFAULT_CONFIGS = ("configs/imagenet64_cd_lpips.yaml", "configs/imagenet64_scd.yaml",
                   "configs/imagenet256_dit_xl2_edm.yaml")
GIB = 2**30


def held_networks(config_path):
    """(label, network flags, EMA count, target?, teacher network flags or None) of a preset."""
    argv = ["--config", config_path]
    if get_training_mode(parse_args_with_config(create_argparser(), argv).training_mode).teacher != "none":
        argv += ["--teacher_model_path", "teacher.pt"]  # a name only: nothing is loaded
    args = parse_args_with_config(create_argparser(), argv)
    config = resolve_training_config(args, 1)
    mode = get_training_mode(config["training_mode"])
    teacher = config["teacher"]["network"] if config.get("teacher") and config["teacher"].get("in_loss") else None
    return (os.path.basename(config_path), config["network"], len(parse_ema_rates(config["loop"]["ema_rate"])),
            mode.target, teacher)


def local_bytes(network_flags, shard):
    """Largest rank's bytes of one float32 network's parameters (sharded or whole)."""
    with torch.device("meta"):
        network = create_model(**network_flags).float()
    if shard:
        shard_network(network)
    mine = torch.tensor([sharded_bytes(network.parameters())], dtype=torch.float64)
    dist.all_reduce(mine, op=dist.ReduceOp.MAX)
    return mine.item()


def rows(config_paths, shard):
    """One row per preset: (label, parameters, optimizer, EMAs, target, teacher, total) in bytes."""
    table = []
    for path in config_paths:
        label, network, emas, target, teacher = held_networks(path)
        params = local_bytes(network, shard)
        teacher_bytes = local_bytes(teacher, shard) if teacher is not None else 0.0
        parts = [params, 2 * params, emas * params, params if target else 0.0, teacher_bytes]
        table.append((label, *parts, sum(parts)))
    return table


def worker(rank, world, port, config_paths, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    table = {parallel: rows(config_paths, parallel == "fsdp") for parallel in ("ddp", "fsdp")}
    if rank == 0:
        out.put(table)
    dist.barrier()
    dist.destroy_process_group()


def markdown(table, world):
    lines = [f"| preset | parallel | params | optimizer | EMAs | target | teacher | total per rank ({world} ranks) |",
             "|---|---|---|---|---|---|---|---|"]
    for parallel, entries in table.items():
        for label, *parts in entries:
            cells = " | ".join(f"{p / GIB:.2f} GiB" if p else "-" for p in parts)
            lines.append(f"| {label} | {parallel} | {cells} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=8)
    parser.add_argument("--configs", nargs="+", default=list(DEFAULT_CONFIGS))
    args = parser.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, port, args.configs, out)) for r in range(args.ranks)]
    for p in procs:
        p.start()
    table = None
    while table is None:
        try:
            table = out.get(timeout=5)
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed:
                raise SystemExit(f"a worker process failed (exit code {failed[0]}); see its message above")
    for p in procs:
        p.join()
    print(markdown(table, args.ranks))
    return table


if __name__ == "__main__":
    main()
