"""Mixed precision in training: the MixedPrecisionTrainer (fp32 master weights, fp16 loss scaling, bf16), the
reference's master-parameter helpers, and the half-precision body helpers re-exported from cm.half_precision."""

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from .nn import local_shard
from .sharding import is_sharded
from .half_precision import (  # noqa: F401  (the reference's location of the network-side helpers)
    HalfPrecisionBody,
    convert_module_to_f16,
    convert_module_to_f32,
)

INITIAL_LOG_LOSS_SCALE = 20.0


# ----- the reference's flattened fp32 master parameters ----------------------------------------------
# MixedPrecisionTrainer keeps float32 parameters and autocasts instead; these helpers convert between a
# model's parameters and the reference's layout (one flat tensor for the <= 1-D parameters, shape -1,
# and one for the matrices, shape (1, -1)), e.g. to read or write its fp16 training state.


def get_param_groups_and_shapes(named_model_params):
    """[(named <= 1-D parameters, -1), (named matrices, (1, -1))]: the reference's two master groups and their shapes."""
    named = list(named_model_params)
    vectors = [(n, p) for n, p in named if p.ndim <= 1]
    matrices = [(n, p) for n, p in named if p.ndim > 1]
    return [(vectors, (-1)), (matrices, (1, -1))]


def _flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors]) if tensors else torch.zeros(0)


def make_master_params(param_groups_and_shapes):
    """One float32 nn.Parameter per group: its parameters flattened and concatenated, viewed as the group's shape."""
    masters = []
    for group, shape in param_groups_and_shapes:
        flat = _flat([p.detach().float() for _, p in group]).view(shape)
        masters.append(nn.Parameter(flat, requires_grad=True))
    return masters


def param_grad_or_zeros(param):
    """The parameter's gradient (detached), or zeros shaped like it when it has none."""
    return param.grad.detach() if param.grad is not None else torch.zeros_like(param)


def model_grads_to_master_grads(param_groups_and_shapes, master_params):
    """Set each master's .grad to its group's gradients, flattened (zeros for parameters without one)."""
    for master, (group, shape) in zip(master_params, param_groups_and_shapes):
        master.grad = _flat([param_grad_or_zeros(p).float() for _, p in group]).view(shape)


def unflatten_master_params(param_group, master_param):
    """Split a flat master tensor into views shaped like the group's parameters."""
    sizes = [p.numel() for _, p in param_group]
    pieces = master_param.reshape(-1).split(sizes)
    return [piece.view(p.shape) for piece, (_, p) in zip(pieces, param_group)]


def master_params_to_model_params(param_groups_and_shapes, master_params):
    """Copy the master values back into the model's parameters (cast to their dtype)."""
    for master, (group, _) in zip(master_params, param_groups_and_shapes):
        for (_, param), value in zip(group, unflatten_master_params(group, master)):
            param.detach().copy_(value)


def master_params_to_state_dict(model, param_groups_and_shapes, master_params, use_fp16):
    """model.state_dict() with its parameters replaced by master_params (flat groups when use_fp16, else a list)."""
    state_dict = model.state_dict()
    if use_fp16:
        for master, (group, _) in zip(master_params, param_groups_and_shapes):
            for (name, _), value in zip(group, unflatten_master_params(group, master)):
                state_dict[name] = value
    else:
        for (name, _), value in zip(model.named_parameters(), master_params):
            state_dict[name] = value
    return state_dict


def state_dict_to_master_params(model, state_dict, use_fp16):
    """Master parameters from a state dict: flat float32 groups when use_fp16, else the tensors in parameter order."""
    if use_fp16:
        named = [(name, state_dict[name]) for name, _ in model.named_parameters()]
        return make_master_params(get_param_groups_and_shapes(named))
    return [state_dict[name] for name, _ in model.named_parameters()]


def zero_master_grads(master_params):
    """Drop the masters' gradients."""
    for param in master_params:
        param.grad = None


def zero_grad(model_params):
    """Zero the gradients of model parameters in place (those that have one)."""
    for param in model_params:
        if param.grad is not None:
            param.grad.detach_()
            param.grad.zero_()


def check_overflow(value):
    """True when value is +inf, -inf or NaN (the fp16 loss-scale test)."""
    return value == float("inf") or value == -float("inf") or value != value


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


def global_grad_norm(grads, device):
    """The L2 norm of all gradients; of sharded ones (fsdp), over every rank's shards (one all-reduce), so each
    rank takes the same skip decision."""
    if grads and any(is_sharded(g) for g in grads):
        norms = torch._foreach_norm([local_shard(g) for g in grads])
        squares = torch.stack(norms).float().square().sum()
        dist.all_reduce(squares)
        return squares.sqrt()
    norms = torch._foreach_norm(grads) if grads else [torch.zeros((), device=device)]
    return torch.linalg.vector_norm(torch.stack(norms).float())


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
        self.found_inf = torch.zeros((), device=device)  # 1.0 after a skipped step (non-finite gradients)

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
        """Unscale, check, step. Returns True when the step was taken (the reference's meaning) as a 0-d bool
        device tensor, read only when used as a bool; self.found_inf holds 1.0 (float) when it was skipped."""
        grads = [p.grad for p in self.master_params if p.grad is not None]
        scale = torch.exp2(self.lg_loss_scale)
        grad_norm = global_grad_norm(grads, scale.device)
        if self.use_fp16:
            grad_norm = grad_norm / scale
        found_inf = (~torch.isfinite(grad_norm)).float()
        self.grad_norm = grad_norm
        self.found_inf = found_inf
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
        return found_inf == 0

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
