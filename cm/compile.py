"""Regional compilation: torch.compile applied to each residual, attention or transformer block of a network
(--compile).

Each block is compiled in place (`nn.Module.compile`); blocks of one class and input shape share one compiled
graph (parameters are graph inputs), so compile time grows with the number of distinct block shapes, not with
depth, and what lies between the blocks (embeddings, concatenations, the output head) stays eager. Parameters,
state dicts and checkpoints are unchanged. Under forward-mode AD (the JVP modes' tangent pass) a block runs its
eager forward: compiled graphs carry no forward-mode derivatives.
"""

import types

import torch

from .dit import DiTBlock
from .ncsnpp import AttnBlock, ResnetBlock
from .nn import has_tangent
from .unet import AttentionBlock, ResBlock

BLOCK_TYPES = (ResBlock, AttentionBlock, ResnetBlock, AttnBlock, DiTBlock)
BACKENDS = ("inductor", "aot_eager", "eager")


_COMPILED = {}  # (block class, backend, dynamic, mode) -> the compiled class forward


def _compiled_forward(cls, backend, dynamic, mode):
    """torch.compile of cls.forward, made once per class and settings: instances are inputs (inlined nn modules),
    so every block of a class shares its graphs."""
    key = (cls, backend, dynamic, mode)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(cls.forward, backend=backend, dynamic=dynamic, mode=mode)
    return _COMPILED[key]


def _dispatching_forward(self, *args, **kwargs):
    """A compiled block's forward: the compiled graph, or the eager forward when an input carries a tangent."""
    if has_tangent(*args, *kwargs.values()):
        return type(self).forward(self, *args, **kwargs)
    return _compiled_forward(type(self), *self._cm_compile_settings)(self, *args, **kwargs)


def compile_blocks(model, backend="inductor", dynamic=False, mode=None):
    """Compile every residual / attention block of `model` in place (regional compilation); returns `model`.

    :param backend: torch.compile backend: inductor (fused kernels), aot_eager (tracing only, for tests) or eager.
    :param dynamic: compile for dynamic shapes (False: one graph per input shape, recompiled on a new batch size).
    :param mode: torch.compile mode (None, "reduce-overhead", "max-autotune").
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown compile backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    blocks = [m for m in model.modules() if isinstance(m, BLOCK_TYPES)]
    if not blocks:
        raise ValueError(
            f"--compile found no residual or attention block in {type(model).__name__}; it compiles the "
            "blocks of the ADM UNet, NCSN++ and DiT"
        )
    for block in blocks:
        block._cm_compile_settings = (backend, dynamic, mode)
        # a bound method: deepcopy (EMA / target copies) binds it to the copy
        block.forward = types.MethodType(_dispatching_forward, block)
    return model


def compiled_block_count(model):
    """How many blocks of `model` compile_blocks has compiled."""
    return sum(hasattr(m, "_cm_compile_settings") for m in model.modules())
