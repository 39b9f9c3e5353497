"""Small layers and tensor helpers shared by the networks, losses and samplers."""

import contextlib
import math
import warnings

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from . import attention_jvp
from .random_util import DeviceRNG


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 (stable under fp16/bf16; float64 stays float64)."""

    def forward(self, x):
        if x.dtype not in (torch.float16, torch.bfloat16):
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


class SiLU(nn.SiLU):
    """x * sigmoid(x), under the reference's name (torch's nn.SiLU)."""

    def forward(self, x):
        return super().forward(x)


def normalization(channels):
    """The UNet's normalisation layer: 32-group GroupNorm in float32."""
    return GroupNorm32(32, channels)


def conv_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D convolution."""
    layers = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in layers:
        raise ValueError(f"unsupported dims {dims!r}; allowed: 1, 2, 3")
    return layers[dims](*args, **kwargs)


def avg_pool_nd(dims, *args, **kwargs):
    """A 1-D, 2-D or 3-D average pooling."""
    layers = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in layers:
        raise ValueError(f"unsupported dims {dims!r}; allowed: 1, 2, 3")
    return layers[dims](*args, **kwargs)


def linear(*args, **kwargs):
    """A linear layer (named like the other factories for symmetry with the reference)."""
    return nn.Linear(*args, **kwargs)


def zero_module(module):
    """Zero a module's parameters in place and return it."""
    for p in module.parameters():
        p.detach().zero_()
    return module


def scale_module(module, scale):
    """Scale a module's parameters in place and return it."""
    for p in module.parameters():
        p.detach().mul_(scale)
    return module


@torch.no_grad()
def local_shard(tensor):
    """This rank's shard of a DTensor (FSDP; its local tensor shares the storage), or the tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def update_ema(target_params, source_params, rate=0.99):
    """EMA in place: target <- rate * target + (1 - rate) * source, one fused call for all tensors. Sharded tensors
    (FSDP) are updated shard by shard, each rank its own, with no communication: both sides must be sharded alike.

    `rate` may be a 0-d device tensor (e.g. 1 for a skipped step), which keeps the update free of host syncs.
    """
    targets = [local_shard(t.detach()) for t in target_params]
    sources = [local_shard(s.detach()) for s in source_params]
    if len(targets) != len(sources):
        raise ValueError(f"EMA needs matching parameter lists, got {len(targets)} and {len(sources)}")
    if not targets:
        return
    if not torch.is_tensor(rate) and rate == 0.0:
        torch._foreach_copy_(targets, sources)
    else:
        torch._foreach_lerp_(targets, sources, 1.0 - rate)


def mean_flat(tensor):
    """Mean over all but the batch dimension."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def pixel_norm(x, dim=1, eps=1e-8):
    """x / sqrt(mean(x^2 over `dim`) + eps): unit root-mean-square feature vectors (Karras et al. 2018, Eq. 2)."""
    return x * torch.rsqrt(x.pow(2).mean(dim=dim, keepdim=True) + eps)


def append_dims(x, target_dims):
    """Append trailing singleton dimensions until x has target_dims dimensions."""
    missing = target_dims - x.ndim
    if missing < 0:
        raise ValueError(f"input has {x.ndim} dims but target_dims is {target_dims}, which is less")
    return x[(...,) + (None,) * missing]


def append_zero(x):
    """Append a trailing 0 to a 1-D tensor (the final sigma of a sampling grid)."""
    return torch.cat([x, x.new_zeros([1])])


def timestep_embedding(timesteps, dim, max_period=10000):
    """Sinusoidal embedding [cos(t f), sin(t f)] with f_i = max_period^(-i / (dim / 2)) (ADM)."""
    half = dim // 2
    dtype = torch.float64 if timesteps.dtype == torch.float64 else torch.float32
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps[:, None].to(dtype) * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def float32_time_embedding(enabled, device):
    """Context in which, when `enabled`, autocast is off so the time embedding (sinusoidal features and the MLP
    after them) runs in float32 under mixed precision; the float32 embedding then meets the half-precision body
    (NVlabs/rcm#10: sCM's gradient-norm spikes under bf16 went away with a float32 time embedding)."""
    return torch.autocast(torch.device(device).type, enabled=False) if enabled else contextlib.nullcontext()


def at_least_float32(x):
    """x in float32 unless it is float64 (the time embedding's input dtype under fp32_time_embedding)."""
    return x if x.dtype == torch.float64 else x.float()


def checkpoint(func, inputs, params, flag):
    """Run func(*inputs), recomputing activations in backward when flag is set (gradient checkpointing).

    `params` is accepted for the reference's signature; autograd finds the parameters itself.
    """
    del params
    # recomputation in backward does not replay forward-mode tangents, so a JVP pass runs unchecked
    if flag and torch.is_grad_enabled() and not has_tangent(*inputs):
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)


class CheckpointFunction(torch.autograd.Function):
    """The reference's gradient checkpointing as an autograd Function: CheckpointFunction.apply(fn, n, *inputs, *params).

    Forward runs fn on the first n arguments without recording a graph; backward runs it again with
    gradients on and differentiates with respect to the inputs and the parameters that follow them.
    (`checkpoint` above uses torch.utils.checkpoint instead.)
    """

    @staticmethod
    def forward(ctx, run_function, length, *args):
        ctx.run_function = run_function
        ctx.input_tensors = list(args[:length])
        ctx.input_params = list(args[length:])
        with torch.no_grad():
            return run_function(*ctx.input_tensors)

    @staticmethod
    def backward(ctx, *output_grads):
        inputs = [t.detach().requires_grad_(True) for t in ctx.input_tensors]
        with torch.enable_grad():
            # views, so an in-place first op of run_function does not modify the detached leaves
            outputs = ctx.run_function(*[t.view_as(t) for t in inputs])
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        grads = torch.autograd.grad(outputs, inputs + ctx.input_params, output_grads, allow_unused=True)
        del ctx.input_tensors, ctx.input_params
        return (None, None) + tuple(grads)


# ----- forward-mode derivatives (JVP) ------------------------------------------------------------


def has_tangent(*tensors):
    """True when any tensor carries a forward-mode tangent (inside torch.func.jvp or a forward_ad dual level)."""
    return any(torch.is_tensor(t) and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def math_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v on [..., T, D] with plain matrix products (softmax in at least float32)."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    return probs.to(v.dtype) @ v


def math_attention_tangent(q, k, v, out, dq, dk, dv):
    """Tangent of o = softmax(S) v, S = q k^T / sqrt(d), with P = softmax(S) materialised (O(T^2) memory).

    dS = (dq k^T + q dk^T) / sqrt(d) and do = (P * dS) v - rowsum(P * dS) o + P dv; None tangents count as zero.
    """
    scale = q.shape[-1] ** -0.5
    scores = (q @ k.transpose(-1, -2)) * scale
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    d_scores = torch.zeros_like(scores)
    if dq is not None:
        d_scores = d_scores + (dq @ k.transpose(-1, -2)) * scale
    if dk is not None:
        d_scores = d_scores + (q @ dk.transpose(-1, -2)) * scale
    weighted = probs * d_scores
    d_out = weighted @ v - weighted.sum(-1, keepdim=True) * out
    if dv is not None:
        d_out = d_out + probs @ dv
    return d_out.to(out.dtype)


def flash_tangent_usable(q, k, v, dq, dk, dv):
    """True when the tiled Triton kernel (cm.attention_jvp) gives the tangent: Triton on a CUDA device (or its CPU
    interpreter), a dtype it takes, and a tangent that needs no gradient (the kernel has no backward)."""
    if not attention_jvp.available(q.device) or q.dtype not in attention_jvp.DTYPES:
        return False
    tensors = [t for t in (q, k, v, dq, dk, dv) if t is not None]
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def flash_attention_tangent(q, k, v, dq, dk, dv):
    """Tangent of attention from the tiled Triton kernel (O(T d) memory); None tangents count as zero."""
    dq, dk, dv = (torch.zeros_like(p) if t is None else t.to(p.dtype) for p, t in ((q, dq), (k, dk), (v, dv)))
    return attention_jvp.attention_jvp(q, k, v, dq, dk, dv)[1]


class _AttentionWithJVP(torch.autograd.Function):
    """Attention whose value comes from the fused SDPA kernel and whose tangent has an explicit rule.

    The tangent comes from the tiled Triton kernel where it runs and needs no gradient (sCM's tangent under
    torch.no_grad()), else from `math_attention_tangent`. Backward differentiates the value only: through the
    fused SDPA kernel on CUDA (flash / memory-efficient backward), through math_attention elsewhere.
    """

    @staticmethod
    def forward(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_forward(*inputs, output)
        ctx.save_for_backward(*inputs)

    @staticmethod
    def jvp(ctx, dq, dk, dv):
        q, k, v, out = ctx.saved_tensors
        if flash_tangent_usable(q, k, v, dq, dk, dv):
            return flash_attention_tangent(q, k, v, dq, dk, dv).to(out.dtype)
        return math_attention_tangent(q, k, v, out, dq, dk, dv)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        attend = F.scaled_dot_product_attention if q.is_cuda else math_attention
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out)


# Up to this many tokens, the CPU's fused attention forward + backward is faster in float32 than in bfloat16
# (benchmarks/bench_attention.py on a 2-core Intel Xeon with AMX-BF16: 5x at 64 tokens, 1.6x at 256 with 32-wide
# heads; bfloat16 wins from 1024 on);
# its forward alone is faster in bfloat16.
CPU_FP32_ATTENTION_MAX_TOKENS = 256


def _cpu_backward_faster_in_fp32(q, k, v):
    """True for short bfloat16 CPU sequences whose attention will be differentiated (training)."""
    if q.device.type != "cpu" or q.dtype != torch.bfloat16 or q.shape[-2] > CPU_FP32_ATTENTION_MAX_TOKENS:
        return False
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def scaled_dot_product_attention(q, k, v):
    """softmax(q k^T / sqrt(d)) v on [B, H, T, D]: the fused SDPA kernel, with an explicit JVP rule under forward AD.

    PyTorch's fused attention kernels have no forward-mode derivative; this is the networks' one attention call.
    In training on a CPU, short bfloat16 sequences are attended in float32 (faster there) and returned in bfloat16.
    """
    if has_tangent(q, k, v):
        return _AttentionWithJVP.apply(q, k, v)
    if _cpu_backward_faster_in_fp32(q, k, v):
        with torch.autocast("cpu", enabled=False):
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def network_jvp(fn, primals, tangents):
    """(fn(*primals), J_fn(primals) tangents): forward-mode derivative of a network call.

    Dropout draws its masks once and applies them to value and tangent alike; attention uses the JVP rule above
    (the Triton kernel on CUDA) and gradient checkpointing is skipped. Wrap the call in torch.no_grad() when the
    tangent needs no gradient. Runs on torch.autograd.forward_ad dual tensors, so custom rules see plain tensors
    (torch.func.jvp would hand them functorch wrappers, which a Triton kernel cannot read).
    """
    primals, tangents = tuple(primals), tuple(tangents)
    _check_primals_and_tangents(primals, tangents)
    with fwAD.dual_level():
        with warnings.catch_warnings():
            # torch's first make_dual loads its own JVP decompositions through torch.jit.script, which warns that
            # torch.jit.script is deprecated (torch's code, nothing a user can change)
            warnings.filterwarnings("ignore", message=TORCH_JIT_DEPRECATION, category=FutureWarning)
            duals = [fwAD.make_dual(p, t.to(p.dtype)) for p, t in zip(primals, tangents)]
        return _split_duals(fn(*duals))


TORCH_JIT_DEPRECATION = r"`torch.jit.script` is deprecated"


def _split_duals(out):
    """(values, tangents) of a tensor or tuple of dual tensors; an output that does not depend on the inputs gets a
    zero tangent."""
    if isinstance(out, (tuple, list)):
        pairs = [_split_duals(o) for o in out]
        return type(out)(p for p, _ in pairs), type(out)(t for _, t in pairs)
    value, tangent = fwAD.unpack_dual(out)
    return value, torch.zeros_like(value) if tangent is None else tangent


def _check_primals_and_tangents(primals, tangents):
    """One tangent per primal, of its shape."""
    if len(primals) != len(tangents):
        raise ValueError(f"jvp needs one tangent per primal, got {len(primals)} and {len(tangents)}")
    for p, t in zip(primals, tangents):
        if p.shape != t.shape:
            raise ValueError(f"tangent shape {tuple(t.shape)} does not match its primal's {tuple(p.shape)}")


def finite_difference_step(t, dtype, relative_step=None, min_time=1e-2):
    """Per-sample step h = relative_step * max(|t|, min_time) of a central difference (relative to the time t).

    The default relative_step eps^(1/3) of `dtype` balances the O(h^2) truncation error against the O(eps / h)
    rounding error of a central difference (about 5e-3 for float32, 6e-6 for float64).
    """
    if relative_step is None:
        relative_step = torch.finfo(dtype).eps ** (1 / 3)
    if relative_step <= 0 or min_time <= 0:
        raise ValueError(f"relative_step and min_time must be > 0, got {relative_step} and {min_time}")
    return relative_step * t.detach().abs().to(torch.float64).clamp(min=min_time)


def finite_difference_jvp(fn, primals, tangents, time_argnum=-1, relative_step=None, min_time=1e-2, exact_value=False):
    """(value, tangent) like `network_jvp`, from two forwards: the central difference
    (fn(p + h dp) - fn(p - h dp)) / 2h combined in float64, and the value (fn(p + h dp) + fn(p - h dp)) / 2
    (or, with exact_value, a third forward fn(p)).

    Every forward draws the same dropout masks (DeviceRNG replay) and the RNG then goes on as after one forward. The
    step h (`finite_difference_step`) is per sample, relative to |t| = |primals[time_argnum]| (a [B] or scalar
    tensor). Truncation error is O(h^2) for tangent and midpoint value; use it for networks or parallel wrappers
    forward-mode AD cannot pass through.
    """
    primals, tangents = tuple(primals), tuple(tangents)
    _check_primals_and_tangents(primals, tangents)
    t = primals[time_argnum]
    if t.ndim > 1:
        raise ValueError(
            f"the time primal (argument {time_argnum}) must be [B] or a scalar, got {tuple(t.shape)}"
        )
    if any(p.ndim < t.ndim or (t.ndim and p.shape[0] != t.shape[0]) for p in primals):
        raise ValueError(f"every primal must lead with the time's batch dim {tuple(t.shape)}; got "
                         f"{[tuple(p.shape) for p in primals]}")  # fmt: skip
    h = finite_difference_step(t, primals[0].dtype, relative_step, min_time)

    def shifted(sign):
        return tuple(p + sign * append_dims(h, p.ndim).to(p.dtype) * d.to(p.dtype) for p, d in zip(primals, tangents))

    rng = DeviceRNG(primals[0].device)
    state = rng.get_state()
    plus = fn(*shifted(1.0))
    with rng.replaying(state):
        minus = fn(*shifted(-1.0))
    value, tangent = _combine_central(plus, minus, h)
    if exact_value:
        with rng.replaying(state):
            value = fn(*primals)
    return value, tangent


def _combine_central(plus, minus, h):
    """((plus + minus) / 2, (plus - minus) / 2h) in float64, returned in the outputs' dtype; tuples element-wise."""
    if isinstance(plus, (tuple, list)):
        pairs = [_combine_central(a, b, h) for a, b in zip(plus, minus)]
        return type(plus)(v for v, _ in pairs), type(plus)(d for _, d in pairs)
    a, b = plus.double(), minus.double()
    step = append_dims(h, a.ndim) if h.ndim else h
    return ((a + b) / 2).to(plus.dtype), ((a - b) / (2 * step)).to(plus.dtype)


JVP_METHODS = {"exact": network_jvp, "finite_difference": finite_difference_jvp}


C_NOISE_SCALE = 1000.0  # the reference's rescaled time: c_noise = C_NOISE_SCALE * 0.25 * log(sigma)


def noise_conditioning(sigmas):
    """The networks' noise-level input c_noise(sigma) = 1000 * 0.25 * log(sigma) (the reference's rescaled_t)."""
    return C_NOISE_SCALE * 0.25 * torch.log(sigmas + 1e-44)
