"""Mixed precision: half-precision conversion of network bodies."""

import torch
import torch.nn as nn

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def convert_module_to_f16(module, dtype=torch.float16):
    """Cast a convolution's weight and bias to half precision (float16 or bfloat16); other modules stay."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.to(dtype)
        if module.bias is not None:
            module.bias.data = module.bias.data.to(dtype)


def convert_module_to_f32(module):
    """Undo convert_module_to_f16."""
    if isinstance(module, _CONVS):
        module.weight.data = module.weight.data.float()
        if module.bias is not None:
            module.bias.data = module.bias.data.float()
