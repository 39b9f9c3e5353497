"""Half-precision network bodies: the convolutions of a network in float16 or bfloat16 for inference, as the
reference's UNet does with convert_to_fp16 (training uses autocast instead: cm.fp16_util)."""

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


class HalfPrecisionBody:
    """convert_to_fp16 / convert_to_bf16 / convert_to_fp32 for a network whose body() lists the parts to convert.

    Like the reference's UNet: only convolutions change dtype (normalisations compute in float32), and
    forward casts its input to self.dtype.
    """

    def convert_to_fp16(self, dtype=torch.float16):
        """Run the body's convolutions in half precision (float16 or bfloat16)."""
        for part in self.body():
            part.apply(lambda m: convert_module_to_f16(m, dtype))
        self.dtype = dtype

    def convert_to_bf16(self):
        """Run the body in bfloat16."""
        self.convert_to_fp16(torch.bfloat16)

    def convert_to_fp32(self):
        """Undo convert_to_fp16 / convert_to_bf16."""
        for part in self.body():
            part.apply(convert_module_to_f32)
        self.dtype = torch.float32

    def body_dtype(self):
        """The dtype of the body's convolutions now; forward casts its input to it (the reference casts to
        self.dtype, which breaks a use_fp16 network not yet converted with convert_to_fp16)."""
        for part in self.body():
            for module in part.modules():
                if isinstance(module, _CONVS):
                    return module.weight.dtype
        return self.dtype
