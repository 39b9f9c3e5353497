"""FSDP2 sharding of the training networks (--parallel fsdp) and the conversions between full and sharded tensors.

With `--parallel fsdp` every network of a run (student, target, teacher) is split with PyTorch's own
`torch.distributed.fsdp.fully_shard`: one FSDP unit per residual / attention / transformer block and one at the
root, so a rank holds 1/world of each parameter (dim 0, padded where uneven) and gathers a block's weights only
while the block runs. The optimizer state and the EMA copies are made from the sharded parameters and so are
sharded alike: an EMA or target update is a `_foreach_lerp_` on the local shards, with no communication. An FSDP
root keeps its own gathered weights after a forward pass until a backward pass frees them; a network that never
runs backward (the target) must drop them after its shards change (`drop_gathered`).

Mixed precision: in bf16 the gathered weights are bfloat16 and gradients are reduced in float32
(`MixedPrecisionPolicy`); modes that take a JVP (sCM, MeanFlow, AYF) keep float32 weights and run their forward
under autocast as with DDP, so the tangent pass stays float32. fp16 keeps float32 weights, autocast and the loss
scaling.
"""

import torch
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from .dit import DiTBlock
from .ncsnpp import AttnBlock, ResnetBlock
from .nn import local_shard
from .unet import AttentionBlock, ResBlock

PARALLEL = ("ddp", "fsdp")
SHARDED_BLOCKS = (ResBlock, AttentionBlock, ResnetBlock, AttnBlock, DiTBlock)


def is_sharded(tensor):
    """True for a DTensor (a parameter, EMA or optimizer state of an FSDP-sharded network)."""
    return isinstance(tensor, DTensor)


def mixed_precision_policy(param_dtype=None):
    """Gather weights in `param_dtype` (None: as stored, float32), reduce gradients and return outputs in float32."""
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)


def shard_network(module, param_dtype=None):
    """Shard `module` in place with fully_shard: each block of SHARDED_BLOCKS, then the root (which keeps the rest:
    embeddings, input and output layers). Needs the default process group. Returns the module."""
    policy = mixed_precision_policy(param_dtype)
    blocks = [m for m in module.modules() if isinstance(m, SHARDED_BLOCKS) and m is not module]
    for block in blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(module, mp_policy=policy)
    return module


def drop_gathered(module):
    """Forget the gathered weights an FSDP root keeps after a forward pass without backward (a target or teacher
    network), so the next pass gathers the shards again; needed after the shards change in place (EMA update)."""
    if isinstance(module, FSDPModule):
        module.reshard()


def shard_like(full, like):
    """`full` (the whole tensor, the same on every rank) split as `like` is: this rank keeps its own part, no
    communication. A plain `like` gives `full` itself."""
    if not isinstance(like, DTensor):
        return full
    full = full.to(device=like.device, dtype=like.dtype)
    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def gather_full(tensor, to_cpu=True):
    """The whole tensor from a sharded one (a collective: every rank must call it), or the tensor itself."""
    full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
    return full.cpu() if to_cpu else full


def sharded_bytes(tensors):
    """Bytes this rank holds of `tensors` (their local shards)."""
    return sum(local_shard(t).numel() * local_shard(t).element_size() for t in tensors)
