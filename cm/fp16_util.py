"""Mixed precision: half-precision network bodies (inference) and the MixedPrecisionTrainer (training)."""

import contextlib

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


INITIAL_LOG_LOSS_SCALE = 20.0


def _device_type(params):
    return params[0].device.type if params else "cpu"


def bf16_is_native(device):
    """True when `device` computes bfloat16 in hardware (CUDA with bf16; a CPU with AVX512-BF16 or AMX).

    Elsewhere bfloat16 autocast is emulated and slower than float32.
    """
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


class MixedPrecisionTrainer:
    """Backward and optimizer steps for fp32, fp16 (dynamic loss scaling) or bf16 training.

    The model's parameters stay float32 and are the master weights; fp16 / bf16 run the forward pass
    under torch.autocast. In fp16 the loss is multiplied by 2^lg_loss_scale; a step whose gradients
    are not finite is skipped and lowers lg_loss_scale by 1, each good step raises it by
    fp16_scale_growth (the reference's rule). In every precision a non-finite gradient skips the step.
    The skip decision stays on the device for fused optimizers (Adam, AdamW); other optimizers read it.

    :param model: the network being trained.
    :param use_fp16: float16 autocast with dynamic loss scaling.
    :param use_bf16: bfloat16 autocast (no loss scaling).
    :param fp16_scale_growth: increase of lg_loss_scale per good fp16 step.
    :param initial_lg_loss_scale: starting log2 loss scale (fp16).
    """

    def __init__(
        self,
        *,
        model,
        use_fp16=False,
        use_bf16=False,
        fp16_scale_growth=1e-3,
        initial_lg_loss_scale=INITIAL_LOG_LOSS_SCALE,
    ):
        if use_fp16 and use_bf16:
            raise ValueError("choose one of use_fp16 and use_bf16")
        self.model = model
        self.precision = "fp16" if use_fp16 else "bf16" if use_bf16 else "fp32"
        self.use_fp16 = use_fp16
        self.fp16_scale_growth = fp16_scale_growth
        trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.param_names = [n for n, _ in trained]  # names of master_params, in order
        self.master_params = [p for _, p in trained]
        device = self.master_params[0].device if self.master_params else torch.device("cpu")
        self.lg_loss_scale = torch.tensor(initial_lg_loss_scale if use_fp16 else 0.0, device=device)
        self.grad_norm = torch.zeros((), device=device)

    def autocast(self):
        """Context for the forward pass: autocast to float16 / bfloat16, or nothing for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.precision == "fp16" else torch.bfloat16
        return torch.autocast(_device_type(self.master_params), dtype=dtype)

    def zero_grad(self):
        for p in self.master_params:
            p.grad = None

    def backward(self, loss):
        """loss.backward(), scaled by 2^lg_loss_scale in fp16."""
        if self.use_fp16:
            loss = loss * torch.exp2(self.lg_loss_scale)
        loss.backward()

    def optimize(self, opt):
        """Unscale, check, step. Returns found_inf, a 0-d device tensor: 1.0 when the step was skipped."""
        grads = [p.grad for p in self.master_params if p.grad is not None]
        scale = torch.exp2(self.lg_loss_scale)
        norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=scale.device)]
        grad_norm = torch.linalg.vector_norm(torch.stack(norms).float())
        if self.use_fp16:
            grad_norm = grad_norm / scale
        found_inf = (~torch.isfinite(grad_norm)).float()
        self.grad_norm = grad_norm
        if getattr(opt, "defaults", {}).get("fused"):
            # the fused kernel divides by grad_scale and skips the whole update when found_inf is 1
            opt.grad_scale = scale if self.use_fp16 else None
            opt.found_inf = found_inf
            opt.step()
        else:
            if self.use_fp16:
                torch._foreach_mul_(grads, 1.0 / scale)
            if not bool(found_inf):
                opt.step()
        if self.use_fp16:
            self.lg_loss_scale = torch.where(
                found_inf > 0, self.lg_loss_scale - 1, self.lg_loss_scale + self.fp16_scale_growth
            )
        return found_inf

    def master_params_to_state_dict(self, master_params):
        """A model state dict whose parameters are `master_params` (e.g. an EMA copy)."""
        state_dict = self.model.state_dict()
        for name, value in zip(self.param_names, master_params):
            state_dict[name] = value.detach()
        return state_dict

    def state_dict_to_master_params(self, state_dict):
        """The parameter tensors of a model state dict, in master_params order."""
        missing = [n for n in self.param_names if n not in state_dict]
        if missing:
            raise ValueError(f"state dict lacks {len(missing)} parameters, e.g. {missing[0]}")
        return [state_dict[n].detach().clone().float() for n in self.param_names]
