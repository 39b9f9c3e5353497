"""--compile (regional compilation, cm.compile) against eager: a training step (forward, backward, Adam), a JVP step
(sCT's tangent pass, then a training step) and one-step sampling of a network, timed in turns, plus the compile
seconds the first calls pay.

    python benchmarks/bench_compile.py                        # the digits presets' net (digits_edm.yaml), batch 32
    python benchmarks/bench_compile.py --network small        # the 32 px comparison net, batch 8
    python benchmarks/bench_compile.py --backend aot_eager    # Dynamo + AOT autograd only (no code generation)

Prints steps/s and images/s of both and the ratio compiled / eager; asserts nothing.
"""

import argparse
import copy
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_reference import NETWORKS, describe_machine, fill_zero_parameters  # noqa: E402
from timing import interleaved_seconds, time_call  # noqa: E402

from cm.compile import compile_blocks  # noqa: E402
from cm.nn import network_jvp  # noqa: E402
from cm.script_util import create_model  # noqa: E402

BATCH = {"digits": 32, "small": 8, "tiny": 8, "imagenet64": 64}


def train_step(model, x, t, opt):
    """One forward / backward / Adam step of a regression loss on the network's output."""
    opt.zero_grad(set_to_none=True)
    model(x, t).square().mean().backward()
    opt.step()


def jvp_step(model, x, t, v, opt):
    """sCT's passes on the network: a forward-mode tangent along (v, 1) without gradient (compiled blocks run eager
    under forward AD, cm.compile), then a training step."""
    with torch.no_grad():
        network_jvp(model, (x, t), (v, torch.ones_like(t)))
    train_step(model, x, t, opt)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--network", choices=sorted(NETWORKS), default="digits")
    p.add_argument("--backend", default="inductor")
    p.add_argument("--batch", type=int, default=0)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    torch.manual_seed(0)
    batch = args.batch or BATCH[args.network]
    net = {k: v for k, v in NETWORKS[args.network].items()}
    eager = create_model(**net).to(args.device)
    fill_zero_parameters(eager)
    compiled = compile_blocks(copy.deepcopy(eager), backend=args.backend)
    size = net["image_size"]
    x, t = torch.randn(batch, 3, size, size, device=args.device), torch.rand(batch, device=args.device) * 10
    opts = {name: torch.optim.Adam(m.parameters(), lr=1e-5) for name, m in (("eager", eager), ("compiled", compiled))}
    print(f"machine: {describe_machine(args.device)}")
    print(f"network {args.network}, batch {batch}, backend {args.backend}, {args.repeats} timed repeats")

    first = time_call(lambda: train_step(compiled, x, t, opts["compiled"]), args.device)
    print(f"compile: first training step {first:.1f} s (forward and backward graphs)")
    networks = {"eager": eager, "compiled": compiled}

    def compare_steps(label, step):
        """Time step(model, optimizer) eager against compiled, in turns, and print steps/s and the ratio."""
        calls = {name: (lambda r, m=m, o=opts[name]: step(m, o)) for name, m in networks.items()}
        seconds = interleaved_seconds(calls, args.repeats, args.device)
        print(f"{label}: eager {args.repeats / seconds['eager']:.2f} steps/s, compiled "
              f"{args.repeats / seconds['compiled']:.2f} steps/s, compiled / eager "
              f"{seconds['eager'] / seconds['compiled']:.2f}x")

    compare_steps("training step", lambda m, o: train_step(m, x, t, o))
    v = torch.randn_like(x)
    compare_steps("JVP step (sCT's tangent pass, then a training step)", lambda m, o: jvp_step(m, x, t, v, o))

    with torch.inference_mode():
        start = time.perf_counter()
        compiled(x, t)
        print(f"compile: first inference forward {time.perf_counter() - start:.1f} s")
        seconds = interleaved_seconds({"eager": lambda r: eager(x, t), "compiled": lambda r: compiled(x, t)},
                                      args.repeats, args.device)
    print(f"one-step sampling forward: eager {batch * args.repeats / seconds['eager']:.1f} images/s, compiled "
          f"{batch * args.repeats / seconds['compiled']:.1f} images/s, compiled / eager "
          f"{seconds['eager'] / seconds['compiled']:.2f}x")


if __name__ == "__main__":
    main()
