"""Every CUDA path once, then the GPU benchmark rows, in one table (one GPU, under 8 minutes, no network access).

    python benchmarks/gpu_check.py                                             # one CUDA GPU
    python benchmarks/gpu_check.py --reference /path/to/consistency_models     # plus the reference's fp16 CD step
    python benchmarks/gpu_check.py --device cpu                                # smoke run: same code, tiny shapes

Checks (each prints ok / FAIL / n/a with what it measured): a training step with a float16 body and loss scaling;
one under bfloat16 autocast; the fused SDPA flash and memory-efficient kernels on the networks' attention (forward
and backward, against float32 math); the Triton attention JVP kernel (cm.attention_jvp) against math attention's
JVP (error, time, peak memory); a one-process DDP step (NCCL; gloo on CPU); a one-process FSDP2 step
(torch.distributed.fsdp.fully_shard, where it exists); regional compilation (cm.compile) against eager (compile
seconds, speed-up). Benchmarks (benchmarks/bench_reference.py and bench_scm.py do the building and timing): the
ImageNet-64 CD step (ours in bf16 autocast; with --reference, the reference's fp16 step and the ratio), the sCD step
(one JVP) against the CT step of the same network and batch, and one-step sampling, each with achieved TFLOP/s and
the fraction of this device's measured matrix-product peak. The CPU smoke run uses a tiny network (8 px) at
batch 2 on one thread, Triton's interpreter, and compiles with aot_eager (inductor's C++ build takes minutes on a
small CPU); its numbers mean nothing beyond "it runs". Exits 1 when a check fails.
"""

import argparse
import copy
import os
import sys
import tempfile
import time
import traceback


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cuda (the check) or cpu (smoke run)")
    p.add_argument("--reference", default="", help="checkout of openai/consistency_models for the reference row")
    p.add_argument("--batch", type=int, default=0, help="ImageNet-64 images per step (0: 64 on CUDA, 2 on CPU)")
    p.add_argument("--repeats", type=int, default=0, help="timed calls per benchmark (0: 5 on CUDA, 1 on CPU)")
    p.add_argument("--compile_backend", default="", help="torch.compile backend (default: inductor on CUDA, "
                   "aot_eager on CPU)")
    return p.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    # Triton picks interpreter or compiler at import: the CPU smoke run interprets the attention JVP kernel
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import bench_reference as br  # noqa: E402
import bench_scm  # noqa: E402
from timing import interleaved_seconds, time_call  # noqa: E402

from cm import attention_jvp, logger  # noqa: E402
from cm.compile import compile_blocks  # noqa: E402
from cm.nn import math_attention, math_attention_tangent, scaled_dot_product_attention  # noqa: E402
from cm.sampling import karras_sample  # noqa: E402


# the smoke run's network (bench_reference.NETWORKS["tiny"]) as training-script flags
TINY_FLAGS = ["--image_size", "8", "--num_channels", "32", "--channel_mult", "1,2", "--attention_resolutions", "4",
              "--num_head_channels", "16"]


class Sizes:
    """Shapes and counts of one run: the GPU's (ImageNet-64) or the CPU smoke run's (digits, tiny)."""

    def __init__(self, args):
        cuda = args.device == "cuda"
        self.device = torch.device(args.device)
        self.cuda = cuda
        self.network = "imagenet64" if cuda else "tiny"
        self.batch = args.batch or (64 if cuda else 2)
        self.repeats = args.repeats or (5 if cuda else 1)
        self.compile_backend = args.compile_backend or ("inductor" if cuda else "aot_eager")
        # attention JVP: TVM's comparison point (24 heads, length 4096, head width 64) on the GPU
        self.attention = (1, 24, 4096, 64) if cuda else (1, 2, 40, 16)
        # network flags of the training loops built from the digits presets (CT, sCD, and sCD's EDM teacher)
        self.loop_network = bench_scm.IMAGENET64[:-2] if cuda else TINY_FLAGS
        self.scm_extra = self.loop_network + ["--batch_size", str(self.batch)]
        self.half = torch.bfloat16 if cuda or torch.backends.mkldnn.is_available() else torch.float32


# ----- checks: each returns (status, detail) -----------------------------------------------------------------


def small_loop(z, precision):
    """A CT training loop (digits preset, its unconditional UNet) from the command line, with --use_fp16 or --use_bf16, batch 4."""
    args = argparse.Namespace(device=z.device.type, bf16=precision == "bf16", extra=[
        "--model_type", "adm", "--class_cond", "false", *(TINY_FLAGS if not z.cuda else []), "--batch_size", "4", "--use_fp16", str(precision == "fp16").lower()])
    return bench_scm.build("digits_ct.yaml", "consistency_training", args, None)


def check_fp16_loss_scaling(z):
    loop = small_loop(z, "fp16")
    x, cond = next(loop.data)
    for _ in range(3):
        loop.run_step(x, cond)
    scale = float(loop.mp_trainer.lg_loss_scale)
    finite = all(torch.isfinite(p).all() for p in loop.model.parameters())
    ok = finite and loop.mp_trainer.precision == "fp16"
    return ok, (f"float16 autocast, 3 steps, lg_loss_scale 20 -> {scale:.3f} (-1 per skipped step), fp32 master "
                f"parameters finite {finite}")


def check_bf16_autocast(z):
    loop = small_loop(z, "bf16")
    x, cond = next(loop.data)
    for _ in range(3):
        loop.run_step(x, cond)
    finite = all(torch.isfinite(p).all() for p in loop.model.parameters())
    return finite, f"3 steps under bf16 autocast, parameters finite {finite}"


def check_sdpa_kernels(z):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    g = torch.Generator().manual_seed(0)
    shape = (4, 4, 256, 64) if z.cuda else (1, 2, 16, 16)
    q, k, v = (torch.randn(shape, generator=g).to(z.device, z.half).requires_grad_() for _ in range(3))
    want = math_attention(*(t.detach().float() for t in (q, k, v)))
    parts, ok = [], True
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                out = scaled_dot_product_attention(q, k, v)
                out.float().square().sum().backward()
        except RuntimeError as e:
            if z.cuda:
                ok = False
            parts.append(f"{name}: not available ({str(e).splitlines()[0][:60]})")
            continue
        err = ((out.float() - want).norm() / want.norm()).item()
        ok &= err < 2e-2
        parts.append(f"{name}: rel. error {err:.1e}")
    return ok, f"{z.half} {tuple(shape)}; " + "; ".join(parts)


def peak_memory(fn, device):
    """(result, peak bytes allocated during fn) on CUDA; (result, None) elsewhere."""
    if device.type != "cuda":
        return fn(), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = fn()
    torch.cuda.synchronize(device)
    return out, torch.cuda.max_memory_allocated(device) - base


def check_triton_jvp(z):
    if not attention_jvp.available(z.device):
        return None, "Triton not installed"
    g = torch.Generator().manual_seed(0)
    parts, ok = [], True
    for dtype, tolerance in ((torch.float32, 1e-4), (z.half, 2e-2)):
        q, k, v, dq, dk, dv = (torch.randn(z.attention, generator=g).to(z.device, dtype) for _ in range(6))
        with torch.no_grad():
            kernel = lambda: attention_jvp.attention_jvp(q, k, v, dq, dk, dv)  # noqa: E731
            (_, tangent, _), kernel_bytes = peak_memory(kernel, z.device)
            out = F.scaled_dot_product_attention(q, k, v)
            want, math_bytes = peak_memory(lambda: math_attention_tangent(q, k, v, out, dq, dk, dv), z.device)
            exact = math_attention_tangent(*(t.double() for t in (q, k, v, out, dq, dk, dv)))
            seconds = {
                "kernel": time_call(lambda: attention_jvp.attention_jvp(q, k, v, dq, dk, dv), z.device),
                "math": time_call(lambda: math_attention_tangent(q, k, v, out, dq, dk, dv), z.device),
            }
        err = ((tangent.double() - exact).norm() / exact.norm()).item()
        ok &= err < tolerance
        mem = f", memory {kernel_bytes / 2**20:.0f} MiB vs {math_bytes / 2**20:.0f} MiB" if kernel_bytes else ""
        math_err = ((want.double() - exact).norm() / exact.norm()).item()
        parts.append(f"{str(dtype)[6:]}: rel. error {err:.1e} (math {math_err:.1e}), "
                     f"{seconds['kernel'] * 1e3:.2f} ms vs math {seconds['math'] * 1e3:.2f} ms{mem}")
    return ok, f"{tuple(z.attention)} " + "; ".join(parts)


def tiny_network(z):
    """The benchmark network (fp32, zero-initialised layers filled) on the device, and one (x, t, kwargs) batch."""
    s = setup(z)
    model, _ = s.ours(distillation=True)
    return model.train(), s.x, torch.rand(z.batch, device=z.device) * 10, dict(s.cond)


def train_once(model, x, t, kwargs, z):
    """Loss of one bf16-autocast forward / backward / SGD step."""
    with torch.autocast(z.device.type, dtype=z.half, enabled=z.half != torch.float32):
        loss = model(x, t, **kwargs).float().square().mean()
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p.add_(p.grad, alpha=-1e-4)
                p.grad = None
    return loss.item()


def check_ddp(z):
    from torch.nn.parallel import DistributedDataParallel

    br.init_one_process_group(z.device)
    model, x, t, kwargs = tiny_network(z)
    ddp = DistributedDataParallel(model, device_ids=[z.device.index or 0] if z.cuda else None)
    loss = train_once(ddp, x, t, kwargs, z)
    return bool(torch.isfinite(torch.tensor(loss))), f"{dist.get_backend()} world 1, loss {loss:.4f}"


def check_fsdp(z):
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        return None, f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard"
    br.init_one_process_group(z.device)
    model, x, t, kwargs = tiny_network(z)
    reference = train_once(copy.deepcopy(model), x, t, kwargs, z)
    for block in model.input_blocks + model.output_blocks:
        fully_shard(block)
    fully_shard(model)
    loss = train_once(model, x, t, kwargs, z)
    ok = abs(loss - reference) <= 1e-2 * abs(reference) + 1e-6
    return ok, f"{dist.get_backend()} world 1, loss {loss:.4f} (unsharded {reference:.4f})"


def check_compile(z):
    model, x, t, kwargs = tiny_network(z)
    model.eval()
    compiled = compile_blocks(copy.deepcopy(model), backend=z.compile_backend)
    with torch.no_grad(), torch.autocast(z.device.type, dtype=z.half, enabled=z.half != torch.float32):
        start = time.perf_counter()
        out = compiled(x, t, **kwargs)
        compile_seconds = time.perf_counter() - start
        want = model(x, t, **kwargs)
        calls = {"eager": lambda r: model(x, t, **kwargs), "compiled": lambda r: compiled(x, t, **kwargs)}
        seconds = interleaved_seconds(calls, z.repeats, z.device)
    err = ((out.float() - want.float()).norm() / want.float().norm()).item()
    ok = err < (2e-2 if z.half != torch.float32 else 1e-4)
    return ok, (f"backend {z.compile_backend}, first call {compile_seconds:.1f} s, forward eager/compiled "
                f"{seconds['eager'] / seconds['compiled']:.2f}x, rel. difference {err:.1e}")


CHECKS = {
    "fp16 loss scaling": check_fp16_loss_scaling,
    "bf16 autocast": check_bf16_autocast,
    "SDPA flash / efficient": check_sdpa_kernels,
    "Triton attention JVP": check_triton_jvp,
    "DDP step": check_ddp,
    "FSDP2 step": check_fsdp,
    "--compile": check_compile,
}


# ----- benchmarks: each returns (status, detail) -------------------------------------------------------------

_SETUP = {}


def setup(z):
    """bench_reference's Setup for this run's network and batch (ours in bf16 autocast, channels_last)."""
    if "s" not in _SETUP:
        args = argparse.Namespace(device=z.device.type, batch=z.batch, channels_last=1, bf16=z.half == torch.bfloat16)
        _SETUP["s"] = br.Setup(args, None, z.network)
    return _SETUP["s"]


def peak(z, dtype):
    """This device's matrix-product FLOP/s in `dtype` (bench_reference.matmul_peak; one 256-wide product in the
    smoke run, where a CPU without native bfloat16 would spend minutes on the large ones)."""
    key = ("peak", dtype)
    if key not in _SETUP:
        if z.cuda:
            _SETUP[key] = br.matmul_peak(z.device, dtype, repeats=4)
        else:
            a = torch.randn(256, 256, dtype=dtype)
            _SETUP[key] = 2 * 256**3 / min(time_call(lambda: a @ a, z.device) for _ in range(3))
    return _SETUP[key]


def rate(flops, seconds, z, dtype):
    share = 100 * flops / seconds / peak(z, dtype)
    return f"{flops / seconds / 1e12:.2f} TFLOP/s = {share:.0f}% of {str(dtype)[6:]} peak"


def bench_cd_step(z):
    ours, model, teacher = br.our_train_step(setup(z), "cd")
    calls = {"ours": ours}
    if ARGS is not None and ARGS.reference:
        s = setup(z)
        br.install_standins()
        s.ref = br.load_reference(os.path.abspath(ARGS.reference))
        br.init_one_process_group(z.device)
        calls["reference"] = br.reference_train_step(s, "cd", model, teacher)
    seconds = br.time_pair(calls, z.repeats, z.device)
    flops = br.count_flops(lambda: ours(0))
    detail = f"{z.network} batch {z.batch}: {1 / seconds['ours']:.2f} steps/s, "
    detail += rate(flops, seconds["ours"], z, z.half)
    if "reference" in seconds:
        detail += (f"; reference fp16 {1 / seconds['reference']:.2f} steps/s, ours / reference "
                   f"{seconds['reference'] / seconds['ours']:.2f}x")
    return True, detail


def bench_jvp_step(z):
    args = argparse.Namespace(device=z.device.type, bf16=z.half == torch.bfloat16, extra=z.scm_extra)
    teacher = bench_scm.teacher_checkpoint(args, args.extra)
    loops = {name: bench_scm.build(config, mode, args, teacher, extra)
             for name, config, mode, extra in bench_scm.CASES if name in ("CT", "sCD")}
    batches = {name: next(loop.data) for name, loop in loops.items()}
    calls = {name: (lambda r, l=loop, b=batches[name]: l.run_step(*b)) for name, loop in loops.items()}
    seconds = br.time_pair(calls, z.repeats, z.device)
    flops = br.count_flops(lambda: calls["sCD"](0))
    ratio = seconds["sCD"] / seconds["CT"]
    return True, (f"sCD {1 / seconds['sCD']:.2f} steps/s = {ratio:.2f}x the CT step (target <= 2x), "
                  f"{rate(flops, seconds['sCD'], z, z.half)}")


def bench_onestep_sampling(z):
    s = setup(z)
    model, diffusion = s.ours(distillation=True)
    model.to(memory_format=torch.channels_last).eval().requires_grad_(False)
    size = s.net["image_size"]

    def sample(r):
        with torch.inference_mode(), torch.autocast(z.device.type, dtype=z.half, enabled=z.half != torch.float32):
            return karras_sample(diffusion, model, (z.batch, 3, size, size), steps=40, sampler="onestep",
                                 model_kwargs=dict(s.cond), device=z.device)

    seconds = br.time_pair({"sample": sample}, z.repeats, z.device)["sample"]
    flops = br.count_flops(lambda: sample(0))
    return True, f"{z.batch / seconds:.1f} images/s (batch {z.batch}), {rate(flops, seconds, z, z.half)}"


BENCHMARKS = {
    "ImageNet-64 CD step": bench_cd_step,
    "JVP step (sCD) vs CT": bench_jvp_step,
    "one-step sampling": bench_onestep_sampling,
}


def run(name, fn, z):
    """One table row: name, status, seconds, detail (a crash is a FAIL row with the error's last line)."""
    start = time.perf_counter()
    try:
        ok, detail = fn(z)
    except Exception as e:  # noqa: BLE001 - a row per failure, the table goes on
        ok, detail = False, f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        traceback.print_exc(file=sys.stderr)
    status = "n/a" if ok is None else ("ok" if ok else "FAIL")
    print(f"| {name} | {status} | {time.perf_counter() - start:.1f} s | {detail} |", flush=True)
    return ok is not False


def main(args):
    z = Sizes(args)
    if z.cuda and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device visible; run with --device cpu for the smoke run")
    if not z.cuda:
        torch.set_num_threads(1)  # tiny shapes: a second thread only waits (and a busy CPU makes it spin)
    torch.manual_seed(0)
    logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    print(f"machine: {br.describe_machine(z.device)}")
    print(f"{'GPU check' if z.cuda else 'CPU smoke run (tiny shapes; numbers mean nothing)'}: {z.network} network, "
          f"batch {z.batch}, {z.repeats} timed repeats, half precision {str(z.half)[6:]}\n")
    print("| check | status | time | detail |\n|---|---|---|---|")
    start = time.perf_counter()
    results = [run(name, fn, z) for name, fn in {**CHECKS, **BENCHMARKS}.items()]
    print(f"\n{sum(results)} of {len(results)} rows ok or n/a in {time.perf_counter() - start:.0f} s")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main(ARGS))
