"""Small layers and tensor helpers shared by the networks, losses and samplers."""

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint as _torch_checkpoint


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input dtype (stable under fp16/bf16)."""

    def forward(self, x):
        if x.dtype == torch.float32:
            return super().forward(x)
        return super().forward(x.float()).type(x.dtype)


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
def update_ema(target_params, source_params, rate=0.99):
    """EMA in place: target <- rate * target + (1 - rate) * source, one fused call for all tensors.

    `rate` may be a 0-d device tensor (e.g. 1 for a skipped step), which keeps the update free of host syncs.
    """
    targets = [t.detach() for t in target_params]
    sources = [s.detach() for s in source_params]
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
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def checkpoint(func, inputs, params, flag):
    """Run func(*inputs), recomputing activations in backward when flag is set (gradient checkpointing).

    `params` is accepted for the reference's signature; autograd finds the parameters itself.
    """
    del params
    if flag and torch.is_grad_enabled():
        return _torch_checkpoint(func, *inputs, use_reentrant=False)
    return func(*inputs)
