"""Side by side with the reference (openai/consistency_models): same network, batch and math, timed in turns.

    git clone https://github.com/openai/consistency_models /path/to/consistency_models
    python benchmarks/bench_reference.py --reference /path/to/consistency_models                  # CPU: 32 px net
    python benchmarks/bench_reference.py --reference /path/to/consistency_models --device cuda    # ImageNet-64 net

Cases: a CD training step (Heun teacher, l2), a CT training step (l2), one-step and two-step (ts 0,22,39)
sampling of one batch, and scripts/image_sample.py end to end against the reference's image_sample.py (separate
processes, npz written; on CPU the digits network with the reference's defaults --num_samples 10000,
--batch_size 16, --generator determ, so that the work around the network shows). Each case prints the speed of
both, the ratio ours / reference (above 1: ours is faster), the FLOPs of one call (torch.utils.flop_counter, both
sides) and the FLOP/s each reaches against this machine's matrix-product peak, measured here. Asserts nothing.

The reference is imported from the path given (as package `reference_cm`, so it does not clash with `cm`).
Packages it imports that are missing here are replaced in sys.modules before the import, and the output says
which: flash_attn (v1, CUDA only) by a module computing the same attention with torch's fused
scaled_dot_product_attention; einops by a rearrange for the patterns the reference uses; piq by an LPIPS that
refuses to compute (the cases use l2; the reference's sampling script builds one and never calls it); mpi4py by a
one-process communicator. With the stand-in, the reference's attention is the computation ours does (SDPA, in
the body's dtype); like flash_attn, it packs qkv contiguously first.

CPU: both run in float32 (the 32 px comparison net of bench_train.py, batch 8), ours in channels_last as the
library trains and samples by default (--channels_last 0: contiguous); --bf16 1 times ours under bfloat16 autocast
instead, which the quickstart picks on a CPU with AVX512-BF16 / AMX. CUDA: the reference as its
launch commands run it (use_fp16: float16 body, fp32 master weights, loss scaling; flash attention), ours in
bfloat16 autocast with channels_last; ImageNet-64 net at the paper's per-GPU batch (2048 over 8 GPUs: 256).
torch.set_flush_denormal, which our training loop sets on CPU, is process-wide and so speeds up both. The
reference's training loop fails in float32 (its target update mixes flattened and unflattened parameters); on CPU
the harness replaces that one method by the same EMA (fp32_target_update) and says so.
"""

import argparse
import copy
import importlib
import importlib.util
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from timing import interleaved_seconds, time_call

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NETWORKS = {
    # the comparison net of bench_train.py: 32 px, 64 channels, attention at 16 and 8 px (head width 32)
    "small": dict(image_size=32, num_channels=64, num_res_blocks=2, attention_resolutions="16,8", channel_mult="1,2,2",
                  num_heads=4, num_head_channels=-1, use_scale_shift_norm=True, resblock_updown=False,
                  class_cond=False, dropout=0.0),
    # the digits presets' network (configs/digits_edm.yaml, digits_sct.yaml, ...): 16 px, 32 channels, attention at 4 px
    "digits": dict(image_size=16, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,2,2",
                   num_heads=4, num_head_channels=32, use_scale_shift_norm=True, resblock_updown=False,
                   class_cond=False, dropout=0.0),
    # a tiny ADM UNet for smoke runs (8 px, 32 channels, attention at 4 px)
    "tiny": dict(image_size=8, num_channels=32, num_res_blocks=1, attention_resolutions="4", channel_mult="1,2",
                 num_heads=4, num_head_channels=16, use_scale_shift_norm=True, resblock_updown=False,
                 class_cond=False, dropout=0.0),
    # the released ImageNet-64 consistency models (scripts/launch.sh of the reference)
    "imagenet64": dict(image_size=64, num_channels=192, num_res_blocks=3, attention_resolutions="32,16,8",
                       channel_mult="", num_heads=4, num_head_channels=64, use_scale_shift_norm=True,
                       resblock_updown=True, class_cond=True, dropout=0.0),
}
EMA_RATES = "0.999,0.9999,0.9999432189950708"  # the reference's ImageNet-64 launch commands
# (target_ema_mode, start_ema, scale_mode, start_scales, end_scales, total_steps, distill_steps_per_iter)
SCHEDULES = {"cd": ("fixed", 0.95, "fixed", 40, 40, 600000, 50000),
             "ct": ("adaptive", 0.95, "progressive", 2, 200, 800000, 50000)}
SAMPLERS = {"onestep": dict(sampler="onestep", ts=None), "multistep": dict(sampler="multistep", ts=(0, 22, 39))}
CASES = ("cd", "ct", "onestep", "multistep", "image_sample")


# ----- stand-ins for the reference's imports ------------------------------------------------------------------


class FlashAttention(torch.nn.Module):
    """flash_attn v1's FlashAttention interface, computed by torch's fused scaled_dot_product_attention.

    qkv [B, S, 3, H, D] -> ([B, S, H, D], None); softmax scale 1/sqrt(D) unless given.
    """

    def __init__(self, softmax_scale=None, attention_dropout=0.0, device=None, dtype=None):
        super().__init__()
        self.softmax_scale = softmax_scale
        self.dropout_p = attention_dropout

    def forward(self, qkv, key_padding_mask=None, causal=False, cu_seqlens=None, max_s=None, need_weights=False):
        if key_padding_mask is not None or cu_seqlens is not None:
            raise ValueError("the SDPA stand-in for flash_attn takes neither key_padding_mask nor cu_seqlens")
        # flash_attn packs qkv contiguously before its kernel; SDPA's fused kernels also need unit-stride heads
        q, k, v = (t.transpose(1, 2) for t in qkv.contiguous().unbind(2))
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout_p if self.training else 0.0,
                                             is_causal=causal, scale=self.softmax_scale)
        return out.transpose(1, 2), None


def _groups(side):
    """'b (three h d) s' -> [['b'], ['three', 'h', 'd'], ['s']]."""
    groups, current = [], None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            current = []
        elif token == ")":
            groups.append(current)
            current = None
        elif current is not None:
            current.append(token)
        else:
            groups.append([token])
    return groups


def rearrange(tensor, pattern, **sizes):
    """einops.rearrange for patterns of named axes and (groups) without ellipsis, as the reference uses."""
    left, right = (_groups(side) for side in pattern.split("->"))
    sizes = dict(sizes)
    for group, dim in zip(left, tensor.shape):
        unknown = [a for a in group if a not in sizes]
        if len(unknown) > 1:
            raise ValueError(f"rearrange stand-in: cannot infer {unknown} in {pattern!r}")
        if unknown:
            sizes[unknown[0]] = dim // math.prod(sizes[a] for a in group if a in sizes)
    axes = [a for group in left for a in group]
    x = tensor.reshape([sizes[a] for a in axes]).permute([axes.index(a) for group in right for a in group])
    return x.reshape([math.prod(sizes[a] for a in group) for group in right])


class _Lpips:
    """piq.LPIPS for a reference that builds it without using it (its sampling script builds one per denoiser)."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        raise RuntimeError("piq is not installed; the harness runs the reference with loss_norm l2 only")


class _OneProcessComm:
    """mpi4py's COMM_WORLD for a single process."""

    rank, size = 0, 1

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def bcast(self, obj, root=0):
        return obj

    def allgather(self, obj):
        return [obj]

    def Barrier(self):
        pass


def _module(name, **attrs):
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _importable(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def install_standins():
    """Put stand-ins for the reference's missing imports into sys.modules; returns one note per stand-in."""
    notes = []
    if not _importable("flash_attn.flash_attention"):
        sys.modules["flash_attn"] = _module("flash_attn")
        sys.modules["flash_attn.flash_attention"] = _module("flash_attn.flash_attention", FlashAttention=FlashAttention)
        sys.modules["flash_attn"].flash_attention = sys.modules["flash_attn.flash_attention"]
        notes.append("flash_attn v1 not installed: the reference's flash attention runs torch's fused SDPA instead")
    if not _importable("einops"):
        sys.modules["einops"] = _module("einops", rearrange=rearrange)
        notes.append("einops not installed: a rearrange for the reference's patterns stands in")
    if not _importable("piq"):
        sys.modules["piq"] = _module("piq", LPIPS=_Lpips)
        notes.append("piq not installed: LPIPS unavailable to the reference (the cases use l2; its image_sample.py "
                     "then skips loading VGG16 for the LPIPS it builds and never uses)")
    if not _importable("mpi4py"):
        sys.modules["mpi4py"] = _module("mpi4py", MPI=_module("mpi4py.MPI", COMM_WORLD=_OneProcessComm()))
        notes.append("mpi4py not installed: a one-process communicator stands in")
    return notes


def load_reference(checkout):
    """The reference's cm package from `checkout`, imported as reference_cm (with the submodules the cases use)."""
    package_dir = os.path.join(checkout, "cm")
    if not os.path.isfile(os.path.join(package_dir, "karras_diffusion.py")):
        raise SystemExit(f"error: {checkout} is not a checkout of openai/consistency_models (no cm/karras_diffusion.py)")
    spec = importlib.util.spec_from_file_location(
        "reference_cm", os.path.join(package_dir, "__init__.py"), submodule_search_locations=[package_dir]
    )
    package = importlib.util.module_from_spec(spec)
    sys.modules["reference_cm"] = package
    spec.loader.exec_module(package)
    for name in ("logger", "nn", "script_util", "karras_diffusion", "train_util", "resample", "random_util"):
        setattr(package, name, importlib.import_module(f"reference_cm.{name}"))
    return package


# ----- the machine --------------------------------------------------------------------------------------------


def describe_machine(device):
    """One line: the processor (and AVX512-BF16), or the GPU."""
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model, bf16 = platform.processor() or "unknown CPU", False
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        names = [line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")]
        model, bf16 = (names[0] if names else model), "avx512_bf16" in info
    return (f"{model}, {os.cpu_count()} logical CPUs, {torch.get_num_threads()} torch threads, "
            f"AVX512-BF16 {'yes' if bf16 else 'no'}, torch {torch.__version__}")


def matmul_peak(device, dtype, repeats=8):
    """FLOP/s of the fastest square matrix product in `dtype` (two sizes, `repeats` each): this machine's practical
    peak (a lower bound on a busy machine)."""
    best = 0.0
    for n in ((4096, 8192) if torch.device(device).type == "cuda" else (1024, 2048)):
        a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
        time_call(lambda: a @ b, device)
        best = max(best, 2 * n**3 / min(time_call(lambda: a @ b, device) for _ in range(repeats)))
    return best


def _cpu_attention_flops():
    """FLOP formulas for the CPU fused attention kernels, which torch's counter does not list."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, q, k, v)

    names = ("_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward")
    if not all(hasattr(aten, n) for n in names):
        return {}
    return {getattr(aten, names[0]): forward, getattr(aten, names[1]): backward}


def count_flops(fn):
    """FLOPs of one call of fn (matrix products, convolutions and attention, forward and backward)."""
    counter = FlopCounterMode(display=False, custom_mapping=_cpu_attention_flops())
    with counter:
        fn()
    return counter.get_total_flops()


def init_one_process_group(device):
    """A one-process group: the reference's training loop and generators read the world size from it."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if torch.device(device).type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


# ----- the two sides ------------------------------------------------------------------------------------------


class Setup:
    """The case settings both sides share: device, network flags, batch, precision, data."""

    def __init__(self, args, ref, network):
        self.ref = ref
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.net = dict(NETWORKS[network])
        self.batch = args.batch
        self.channels_last = bool(args.channels_last)
        self.bf16 = bool(args.bf16)
        g = torch.Generator().manual_seed(0)
        size = self.net["image_size"]
        self.x = (torch.rand(self.batch, 3, size, size, generator=g) * 2 - 1).to(self.device)
        self.cond = {"y": torch.randint(0, 1000, (self.batch,), generator=g).to(self.device)} if self.net["class_cond"] else {}

    def ours(self, distillation):
        """(our network, denoiser) with this setup's flags, fp32, on the device."""
        from cm.script_util import create_model_and_diffusion, model_and_diffusion_defaults

        kw = model_and_diffusion_defaults()
        kw.update(self.net, weight_schedule="uniform")
        model, diffusion = create_model_and_diffusion(**kw, distillation=distillation, loss_norm="l2")
        fill_zero_parameters(model)
        return model.to(self.device), diffusion

    def reference(self, ours_model, distillation):
        """The reference's (network, denoiser) with our network's weights copied in (strict)."""
        r = self.ref.script_util
        kw = {k: v for k, v in self.net.items() if k != "class_cond"}
        model = r.create_model(**kw, class_cond=self.net["class_cond"], use_fp16=self.cuda)
        model.load_state_dict(ours_model.state_dict(), strict=True)
        diffusion = self.ref.karras_diffusion.KarrasDenoiser(
            sigma_data=0.5, sigma_max=80.0, sigma_min=0.002, distillation=distillation, weight_schedule="uniform",
            loss_norm="l2",
        )
        return model.to(self.device), diffusion


@torch.no_grad()
def fill_zero_parameters(model, seed=1):
    """Give the zero-initialised layers (output convolutions) small random weights, so the network's output
    depends on every layer and the two sides' outputs can be compared."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if not p.any():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


class Batches:
    """The same (images, cond) batch forever (the loops' data argument; run_step is called directly)."""

    def __init__(self, x, cond):
        self.x, self.cond = x, cond

    def __iter__(self):
        return self

    def __next__(self):
        return self.x, self.cond


def our_train_step(s, mode):
    """A step function of our CMTrainLoop (CD with a Heun teacher, or CT), and its model for the reference's copy."""
    from cm import logger
    from cm.schedules import create_ema_and_scales_fn
    from cm.train_util import CMTrainLoop

    logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    torch.manual_seed(0)
    model, diffusion = s.ours(distillation=True)
    teacher = teacher_diffusion = None
    if mode == "cd":
        teacher, teacher_diffusion = s.ours(distillation=False)
        teacher.eval()
    fmt = torch.channels_last if s.channels_last else torch.contiguous_format
    for net in (model, teacher):
        if net is not None:
            net.to(memory_format=fmt)
    loop = CMTrainLoop(
        model=model, diffusion=diffusion, target_model=copy.deepcopy(model), teacher_model=teacher,
        teacher_diffusion=teacher_diffusion,
        training_mode="consistency_distillation" if mode == "cd" else "consistency_training",
        ema_scale_fn=create_ema_and_scales_fn(*SCHEDULES[mode]), total_training_steps=SCHEDULES[mode][5],
        data=Batches(s.x, s.cond), batch_size=s.batch, microbatch=-1, lr=1e-4, ema_rate=EMA_RATES,
        log_interval=10**9, save_interval=-1, resume_checkpoint="", optimizer="radam", use_bf16=s.bf16,
        channels_last=s.channels_last, progress=False, teacher_solver="heun",
    )
    return (lambda r: loop.run_step(s.x, s.cond)), model, teacher


def reference_train_step(s, mode, ours_model, ours_teacher):
    """A step function of the reference's CMTrainLoop, built as its cm_train.py builds it."""
    r = s.ref
    r.logger.configure(dir=tempfile.mkdtemp(), format_strs=[])
    model, diffusion = s.reference(ours_model, distillation=True)
    teacher = teacher_diffusion = None
    if mode == "cd":
        teacher, teacher_diffusion = s.reference(ours_teacher, distillation=False)
        teacher.eval()
    target, _ = s.reference(ours_model, distillation=True)
    if s.cuda:  # as cm_train.py with --use_fp16 True
        for net in (model, teacher, target):
            if net is not None:
                net.convert_to_fp16()
    loop = r.train_util.CMTrainLoop(
        model=model, target_model=target, teacher_model=teacher, teacher_diffusion=teacher_diffusion,
        training_mode="consistency_distillation" if mode == "cd" else "consistency_training",
        ema_scale_fn=r.script_util.create_ema_and_scales_fn(*SCHEDULES[mode]),
        total_training_steps=SCHEDULES[mode][5], diffusion=diffusion, data=Batches(s.x, s.cond),
        batch_size=s.batch, microbatch=-1, lr=1e-4, ema_rate=EMA_RATES, log_interval=10**9, save_interval=-1,
        resume_checkpoint="", use_fp16=s.cuda, schedule_sampler=r.resample.UniformSampler(diffusion),
        weight_decay=0.0, lr_anneal_steps=0,
    )
    if not s.cuda:
        fp32_target_update(loop, r.nn.update_ema)
    return lambda i: loop.run_step(s.x, s.cond)


def fp32_target_update(loop, update_ema):
    """Let the reference's CMTrainLoop run in float32. Its target update pairs the flattened master copies of the
    target (made for fp16) with the online network's own parameters, which are not flattened without fp16, and
    fails; this is the same EMA with its update_ema over the two parameter lists (as it updates its EMA models)."""

    def update_target_ema():
        target_ema, _ = loop.ema_scale_fn(loop.global_step)
        with torch.no_grad():
            update_ema(list(loop.target_model.parameters()), loop.mp_trainer.master_params, rate=target_ema)

    loop._update_target_ema = update_target_ema


def sample_steps(s, sampler):
    """(ours, reference) functions sampling one batch as each image_sample.py does (determ generator, uint8)."""
    from cm.image_util import to_uint8
    from cm.random_util import get_generator
    from cm.sampling import karras_sample

    torch.manual_seed(0)
    model, diffusion = s.ours(distillation=True)
    ref_model, ref_diffusion = s.reference(model, distillation=True)
    if s.channels_last:
        model.to(memory_format=torch.channels_last)
    if s.cuda:  # --use_fp16 True, the reference's sampling commands
        model.convert_to_fp16()
        ref_model.convert_to_fp16()
    model.eval().requires_grad_(False)
    ref_model.eval()
    size = s.net["image_size"]
    shape = (s.batch, 3, size, size)
    kw = dict(steps=40, model_kwargs=dict(s.cond), device=s.device, **SAMPLERS[sampler])

    cpu_bf16 = s.bf16 and not s.cuda  # on CUDA ours samples with the reference's float16 body

    def ours(seed, uint8=True):
        with torch.inference_mode(), torch.autocast("cpu", torch.bfloat16, enabled=cpu_bf16):
            x = karras_sample(diffusion, model, shape, generator=get_generator("determ", s.batch, seed), **kw)
            return to_uint8(x) if uint8 else x

    def reference(seed, uint8=True):
        g = s.ref.random_util.get_generator("determ", s.batch, seed)
        x = s.ref.karras_diffusion.karras_sample(ref_diffusion, ref_model, shape, generator=g, **kw)
        return ((x + 1) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous() if uint8 else x

    return ours, reference


# ----- cases --------------------------------------------------------------------------------------------------


def time_pair(calls, repeats, device):
    """Seconds per call of each of {name: fn(r)}, timed in turns after two untimed rounds."""
    seconds = interleaved_seconds(calls, repeats, device, warmup=2)
    return {name: total / repeats for name, total in seconds.items()}


def train_case(s, mode, repeats):
    ours, model, teacher = our_train_step(s, mode)
    reference = reference_train_step(s, mode, model, teacher)
    flops = {"ours": count_flops(lambda: ours(0)), "reference": count_flops(lambda: reference(0))}
    return time_pair({"ours": ours, "reference": reference}, repeats, s.device), flops, None


def sample_case(s, sampler, repeats):
    ours, reference = sample_steps(s, sampler)
    diff = (ours(0, uint8=False).float() - reference(0, uint8=False).float()).abs().max().item()
    flops = {"ours": count_flops(lambda: ours(0)), "reference": count_flops(lambda: reference(0))}
    return time_pair({"ours": ours, "reference": reference}, repeats, s.device), flops, f"max |ours - ref| {diff:.1e}"


def write_checkpoint(s, directory):
    """A random consistency model's state dict (our initialisation) that both sampling scripts load."""
    torch.manual_seed(0)
    model, _ = s.ours(distillation=True)
    path = os.path.join(directory, "model.pt")
    torch.save({k: v.cpu() for k, v in model.state_dict().items()}, path)
    return path


def sample_flags(s, sampler, ckpt, num_samples, batch):
    """The reference's image_sample.py flags (which ours takes too) for this network and sampler."""
    flags = dict(s.net, training_mode="consistency_distillation", generator="determ", sampler=sampler,
                 steps=40, num_samples=num_samples, batch_size=batch, model_path=ckpt, seed=42,
                 weight_schedule="uniform", use_fp16=s.cuda)
    if SAMPLERS[sampler]["ts"]:
        flags["ts"] = ",".join(map(str, SAMPLERS[sampler]["ts"]))
    return [f"--{k}={v}" for k, v in flags.items()]


def run_script(command, env, log_dir):
    """Wall-clock seconds of one sampling process and the npz it wrote."""
    start = time.perf_counter()
    out = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if out.returncode:
        raise RuntimeError(f"{' '.join(command[:3])} ... failed:\n{out.stderr[-3000:]}")
    npz = [f for f in os.listdir(log_dir) if f.endswith(".npz")]
    with np.load(os.path.join(log_dir, npz[0])) as data:
        return seconds, data["arr_0"]


def script_commands(s, sampler, ckpt, args, work):
    """{name: fn(r) -> (seconds, images)} running ours, the reference and any --baseline checkout end to end."""
    flags = sample_flags(s, sampler, ckpt, args.e2e_samples, args.e2e_batch)
    device_flag = [f"--device={s.device.type}"]
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}

    def ours_at(root, name):
        def run(r):
            log_dir = tempfile.mkdtemp(dir=work)
            env = dict(os.environ, PYTHONPATH=root, **threads)
            command = [sys.executable, os.path.join(root, "scripts", "image_sample.py"), *flags, *device_flag,
                       "--grid=none", f"--log_dir={log_dir}"]
            return run_script(command, env, log_dir)
        return name, run

    def reference(r):
        log_dir = tempfile.mkdtemp(dir=work)
        script = os.path.join(args.reference, "scripts", "image_sample.py")
        launcher = (f"import sys, runpy; sys.path[:0] = [{HERE!r}, {args.reference!r}]; import bench_reference; "
                    f"bench_reference.install_standins(); sys.argv = [{script!r}] + {flags!r}; "
                    f"runpy.run_path({script!r}, run_name='__main__')")
        env = dict(os.environ, OPENAI_LOGDIR=log_dir, OPENAI_LOG_FORMAT="log", **threads)
        env.pop("PYTHONPATH", None)
        return run_script([sys.executable, "-c", launcher], env, log_dir)

    commands = dict([ours_at(ROOT, "ours")])
    commands["reference"] = reference
    if args.baseline:
        commands.update([ours_at(os.path.abspath(args.baseline), "baseline")])
    return commands


def uint8_difference(a, b):
    """'equal', or how many uint8 values differ and by how much at most."""
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return "equal" if not diff.any() else f"{np.count_nonzero(diff)} of {diff.size} values differ (max {diff.max()})"


def script_case(s, sampler, args):
    """image_sample.py end to end: images/s over the whole process (start-up, model load, sampling, npz)."""
    with tempfile.TemporaryDirectory() as work:
        ckpt = write_checkpoint(s, work)
        commands = script_commands(s, sampler, ckpt, args, work)
        seconds = dict.fromkeys(commands, 0.0)
        images = {}
        for r in range(args.e2e_repeats):
            for name, run in commands.items():
                t, images[name] = run(r)
                seconds[name] += t
    per_run = {k: v / args.e2e_repeats for k, v in seconds.items()}
    b = args.e2e_batch
    note = f"first batch: {uint8_difference(images['ours'][:b], images['reference'][:b])}"
    if "baseline" in images:
        note += f"; all images equal to baseline: {np.array_equal(images['ours'], images['baseline'])}"
    return per_run, note


# ----- output -------------------------------------------------------------------------------------------------


def row(name, seconds, unit_count, unit, flops, peak, note):
    """A markdown table row: time or rate of both, ratio, FLOPs, FLOP/s and share of the peak."""
    rate = {k: unit_count / v for k, v in seconds.items()}
    cells = [name, f"{rate['ours']:.2f} {unit}", f"{rate['reference']:.2f} {unit}",
             f"**{rate['ours'] / rate['reference']:.2f}x**"]
    if "baseline" in rate:
        cells.append(f"baseline {rate['baseline']:.2f} {unit}, ours / baseline {rate['ours'] / rate['baseline']:.2f}x")
    elif flops:
        gflop = flops["ours"] / 1e9
        achieved = {k: flops[k] / seconds[k] for k in ("ours", "reference")}
        cells.append(f"{gflop:.1f} GFLOP (ref {flops['reference'] / 1e9:.1f}); ours {achieved['ours'] / 1e9:.0f} "
                     f"GFLOP/s = {100 * achieved['ours'] / peak['ours']:.0f}% of peak, ref "
                     f"{achieved['reference'] / 1e9:.0f} GFLOP/s = {100 * achieved['reference'] / peak['reference']:.0f}%")
    if note:
        cells.append(note)
    return "| " + " | ".join(cells) + " |"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, help="path of a checkout of openai/consistency_models")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--network", choices=sorted(NETWORKS), default=None,
                        help="small (default on CPU) or imagenet64 (default on CUDA)")
    parser.add_argument("--batch", type=int, default=0, help="images per step (0: 8 on CPU, 256 on CUDA)")
    parser.add_argument("--repeats", type=int, default=0, help="timed calls per side (0: 6 on CPU, 10 on CUDA)")
    parser.add_argument("--channels_last", type=int, default=1, help="ours in channels_last (1, the library's "
                        "default for training and sampling; 0: contiguous, as the reference)")
    parser.add_argument("--bf16", type=int, default=None, help="ours under bfloat16 autocast (default: on CUDA; on a "
                        "CPU with AVX512-BF16 / AMX, what the quickstart picks; 0 compares equal float32 math)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads, also of the sampling processes (0: torch's "
                        "default)")
    parser.add_argument("--e2e_network", choices=sorted(NETWORKS), default=None,
                        help="network of the image_sample.py runs (default: digits on CPU, imagenet64 on CUDA)")
    parser.add_argument("--e2e_samples", type=int, default=0, help="image_sample.py --num_samples (0: 10000, the "
                        "reference's default, on CPU; 50000 on CUDA)")
    parser.add_argument("--e2e_batch", type=int, default=0, help="image_sample.py --batch_size (0: 16 on CPU, the "
                        "reference's default; 256 on CUDA)")
    parser.add_argument("--e2e_repeats", type=int, default=2, help="runs of each script, in turns")
    parser.add_argument("--baseline", default="", help="another checkout of this project to time image_sample.py "
                        "of (e.g. before a change)")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.network = args.network or ("imagenet64" if cuda else "small")
    args.batch = args.batch or (256 if cuda else 8)
    args.repeats = args.repeats or (10 if cuda else 6)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    args.e2e_network = args.e2e_network or ("imagenet64" if cuda else "digits")
    args.e2e_samples = args.e2e_samples or (50000 if cuda else 10000)
    args.e2e_batch = args.e2e_batch or (256 if cuda else 16)
    args.reference = os.path.abspath(args.reference)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    notes = install_standins()
    ref = load_reference(args.reference)
    init_one_process_group(args.device)
    s = Setup(args, ref, args.network)
    body = {"ours": torch.bfloat16 if s.bf16 else torch.float32,
            "reference": torch.float16 if s.cuda else torch.float32}
    peaks = {dtype: matmul_peak(s.device, dtype) for dtype in set(body.values())}
    peak = {k: peaks[dtype] for k, dtype in body.items()}
    print(f"machine: {describe_machine(s.device)}")
    print(f"matrix-product peak: " + ", ".join(f"{k} {str(body[k]).replace('torch.', '')} {v / 1e9:.0f} GFLOP/s"
                                                for k, v in peak.items()))
    print(f"network {args.network}, batch {s.batch}; ours {'bf16 autocast' if s.bf16 else 'fp32'}"
          f"{', channels_last' if s.channels_last else ''}; reference {'fp16 body' if s.cuda else 'fp32'}")
    if not s.cuda:
        notes.append("reference in fp32: its CMTrainLoop._update_target_ema fails there; replaced by the same EMA "
                     "(fp32_target_update)")
    for note in notes:
        print(f"note: {note}")
    print("\n| case | ours | reference | ours / reference | work |\n|---|---|---|---|---|")
    for case in args.cases.split(","):
        if case in ("cd", "ct"):
            seconds, flops, note = train_case(s, case, args.repeats)
            name = "CD step (Heun teacher, l2)" if case == "cd" else "CT step (l2)"
            print(row(name, seconds, 1, "steps/s", flops, peak, note), flush=True)
        elif case in SAMPLERS:
            seconds, flops, note = sample_case(s, case, args.repeats)
            name = f"{'one-step' if case == 'onestep' else 'two-step (ts 0,22,39)'} sampling, batch {s.batch}"
            print(row(name, seconds, s.batch, "img/s", flops, peak, note), flush=True)
        elif case == "image_sample":
            e2e = Setup(args, ref, args.e2e_network)
            for sampler in SAMPLERS:
                seconds, note = script_case(e2e, sampler, args)
                name = f"image_sample.py {sampler}, {args.e2e_network} net, {args.e2e_samples} samples, batch {args.e2e_batch}"
                print(row(name, seconds, args.e2e_samples, "img/s", None, peak, note), flush=True)
        else:
            raise SystemExit(f"error: unknown case {case!r}; allowed: {', '.join(CASES)}")


if __name__ == "__main__":
    main()
