"""Truncated consistency models (TCM: Lee et al., "Truncated consistency models", ICLR 2025; code NVlabs/TCM).

Stage 1 is a consistency model f_1 of this library (ECT by default, cm.modes.ect). Stage 2 trains a copy of it only
on the truncated time range t >= t' and takes its boundary values from the frozen f_1; the model it samples with is

    f(x, t) = f_2(x, t) for t >= t',   f_1(x, t) for t < t'                     (TCM Eq. 7, NVlabs/TCM TCMPrecond)

(TruncatedDenoiser). Stage 2 is ECT's loss on that composed model, so the target switches to the frozen f_1 exactly
where r < t':

    log t ~ Student-t(df, mu, sigma) truncated to [log t', log sigma_max]       (TCM: df 0.01, mu 0, sigma 0.2)
    r = ECT's r(t),   loss = w(t, r) d(f_2(x + t z, t), sg[f(x + r z, r)]),

and a share of each batch (25%) sits at t = t' + 1e-8, whose loss enters with its own weight (0.1):
total = mean(loss over the rest) + w_b mean(loss at the boundary). Sampling composes both networks (one step:
f(x_T, 80); TCM's two steps: times 80, t' = 1.0, 0, --sampler tcm_twostep). A run directory holds the pair: the
stage-2 files (modelNNNNNN.pt, ema_RATE_NNNNNN.pt) beside stage1_modelNNNNNN.pt, the frozen f_1 they need.
"""

import copy
import math

import numpy as np
import torch
from scipy import special
from torch.distributed.fsdp import FSDPModule

from ..flags import flag_rows
from ..karras_diffusion import KarrasDenoiser
from ..nn import append_dims
from ..sampling import Sampler, register_sampler, stochastic_iterative_sampler
from .base import QuickstartPlan, TrainingMode
from .ect import ECT_SCHEDULE_ENTRY, create_ect_schedule, ect_losses

STAGE1_FILE = "stage1_model"  # the prefix of the frozen stage-1 network's file beside the stage-2 checkpoint
BOUNDARY_OFFSET = 1e-8  # the boundary samples' t = t' + 1e-8 (NVlabs/TCM); in float32 that is t' itself


class TruncatedDenoiser(KarrasDenoiser):
    """The consistency denoiser of a TCM pair: denoise(model, x, sigma) is the stage-2 `model` where sigma >= t' and
    the frozen stage-1 network below (without gradients); without a stage-1 network it is the plain consistency
    denoiser. Both networks see the whole batch, as in NVlabs/TCM, so the stage-2 pass draws the same dropout
    masks whichever samples it keeps.

    :param transition_t: t', the truncation time (TCM: 1.0).
    :param stage1_model: the stage-1 network (None: set it with with_stage1).
    Other arguments as KarrasDenoiser (the boundary-condition scalings always).
    """

    def __init__(self, transition_t=1.0, stage1_model=None, **kwargs):
        super().__init__(**{**kwargs, "distillation": True})
        if not self.sigma_min < transition_t < self.sigma_max:
            raise ValueError(f"tcm_transition_t must lie between sigma_min and sigma_max, got {transition_t}")
        self.transition_t = transition_t
        self.stage1_model = stage1_model

    def with_stage1(self, stage1_model):
        """A copy of this denoiser that composes `stage1_model` below t'."""
        composed = copy.copy(self)
        composed.stage1_model = stage1_model
        return composed

    def denoise(self, model, x_t, sigmas, **model_kwargs):
        """(network output, D) of stage 2 where sigma >= t', of the frozen stage 1 elsewhere."""
        stage2 = (sigmas >= self.transition_t) if self.stage1_model is not None else None
        if stage2 is None:
            return super().denoise(model, x_t, sigmas, **model_kwargs)
        # sharded networks (--parallel fsdp) gather their weights in every call, so every rank calls both
        sharded = isinstance(model, FSDPModule) or isinstance(self.stage1_model, FSDPModule)
        if not sharded and bool(stage2.all()):
            return super().denoise(model, x_t, sigmas, **model_kwargs)
        above = super().denoise(model, x_t, sigmas, **model_kwargs) if sharded or bool(stage2.any()) else None
        with torch.no_grad():
            below = super().denoise(self.stage1_model, x_t, sigmas, **model_kwargs)
        if above is None:
            return below
        keep = append_dims(stage2, x_t.ndim)
        return tuple(torch.where(keep, a, b.to(a.dtype)) for a, b in zip(above, below))


def tcm_denoiser(tcm_transition_t=1.0, **denoiser_config):
    """The TCM denoiser from the resolved configuration (its stage-1 network is attached by the loss or sampler)."""
    return TruncatedDenoiser(transition_t=tcm_transition_t, **denoiser_config)


def attach_stage1(denoiser, stage1_model):
    """The denoiser samplers run for a TCM pair: stage 2 above t', `stage1_model` below."""
    return denoiser.with_stage1(stage1_model)


@torch.no_grad()
def sample_tcm_twostep(denoiser, x, sigmas, generator=None, progress=False, callback=None, t_mid=1.0, t_min=0.002):
    """TCM's two-step sampling (NVlabs/TCM, CIFAR-10: times 80, t' = 1.0, 0): denoise at sigmas[0], re-noise to t_mid,
    denoise there (CM paper Alg. 1 at the levels sigma_max, t_mid)."""
    levels = torch.tensor([float(sigmas[0]), t_mid, t_min], dtype=torch.float64)
    return stochastic_iterative_sampler(denoiser, x, levels, generator, progress=progress, callback=callback,
                                        t_min=t_min, t_max=float(sigmas[0]))


def tcm_twostep_options(settings):
    """The intermediate noise level: karras_sample's t_mid, by default the denoiser's t' (TCM's); the last level
    sigma_min."""
    t_mid = settings["diffusion"].transition_t if settings["t_mid"] is None else settings["t_mid"]
    return dict(t_mid=t_mid, t_min=settings["sigma_min"])


register_sampler("tcm_twostep", Sampler(sample_tcm_twostep, options=tcm_twostep_options))


# ----- the time distribution and the boundary share --------------------------------------------


def truncated_log_student_t(batch_size, df, mu, sigma, t_low, t_high, device, dtype=torch.float32):
    """t with log t ~ mu + sigma Student-t(df) truncated to [log t_low, log t_high] (TCM's p(t), NVlabs/TCM
    misc.truncated_t): the inverse CDF of a uniform draw between the CDF values at the ends, in float64."""
    if df <= 0 or sigma <= 0 or not 0 < t_low < t_high:
        raise ValueError(f"the truncated log-Student-t needs df > 0, sigma > 0 and 0 < t' < sigma_max (got {df}, "
                         f"{sigma}, {t_low}, {t_high})")
    lo, hi = (special.stdtr(df, (math.log(t) - mu) / sigma) for t in (t_low, t_high))
    u = torch.rand(batch_size, device=device, dtype=torch.float64).cpu().numpy()
    log_t = special.stdtrit(df, lo + (hi - lo) * u) * sigma + mu
    t = torch.from_numpy(np.exp(log_t)).clamp(t_low, t_high)
    return t.to(device=device, dtype=dtype)


def boundary_mask(batch_size, share, device):
    """A random int(batch_size * share) of the batch's samples (TCM's boundary samples), as a bool mask."""
    if not 0 <= share <= 1:
        raise ValueError(f"tcm_boundary_share must lie in [0, 1], got {share}")
    mask = torch.zeros(batch_size, dtype=torch.bool, device=device)
    mask[torch.randperm(batch_size, device=device)[: int(batch_size * share)]] = True
    return mask


def boundary_weights(boundary, weight):
    """Per-sample weights whose batch mean of w * loss is mean(loss, rest) + weight * mean(loss, boundary)."""
    n = boundary.numel()
    at_boundary = int(boundary.sum())
    rest = n - at_boundary
    return torch.where(boundary, weight * n / max(at_boundary, 1), n / max(rest, 1)).float()


def tcm_losses(diffusion, model, x_start, num_scales, transition_t, model_kwargs=None, df=0.01, mu=0.0, sigma=0.2,
               boundary_share=0.25, boundary_weight=0.1, ect_options=None, noise=None):
    """TCM's stage-2 loss: t from the truncated log-Student-t on [t', sigma_max], a share at t' + 1e-8, then ECT's
    loss on the composed model `diffusion` (a TruncatedDenoiser holding stage 1). Returns (terms, weights)."""
    batch = x_start.shape[0]
    t = truncated_log_student_t(batch, df, mu, sigma, transition_t, diffusion.sigma_max, x_start.device)
    boundary = boundary_mask(batch, boundary_share, x_start.device)
    t = torch.where(boundary, torch.tensor(transition_t + BOUNDARY_OFFSET, dtype=torch.float64), t.double())
    terms = ect_losses(diffusion, model, x_start, num_scales, model_kwargs, t=t.to(x_start.dtype), noise=noise,
                       **(ect_options or {}))
    return terms, boundary_weights(boundary, boundary_weight)


def check_tcm_config(config):
    """One-line errors, at resolve time, for TCM options that cannot train."""
    create_ect_schedule(**config["schedule"])
    options, denoiser = config["loss"], config["denoiser"]
    t_prime = denoiser["tcm_transition_t"]
    truncated_log_student_t(1, options["tcm_df"], options["tcm_mu"], options["tcm_sigma"], t_prime,
                            denoiser.get("sigma_max", 80.0), "cpu")
    boundary_mask(1, options["tcm_boundary_share"], "cpu")
    if options["tcm_boundary_weight"] < 0:
        raise ValueError(f"tcm_boundary_weight must be >= 0, got {options['tcm_boundary_weight']}")


def bind_tcm_loss(diffusion, context):
    """TCM stage 2 bound to the frozen stage-1 network (the loop's teacher) and the "tcm" / ECT flag groups; the bound
    loss saves that network beside each checkpoint (stage1_modelNNNNNN.pt)."""
    options = context.options
    composed = attach_stage1(diffusion, context.teacher_model)
    ect_options = dict(mapping=options["ect_mapping"], k=options["ect_k"], b=options["ect_b"], c=options["ect_c"],
                       p=options["ect_adaptive_p"])

    def loss(model, x_start, model_kwargs, schedule):
        return tcm_losses(composed, model, x_start, schedule["num_scales"], diffusion.transition_t, model_kwargs,
                          options["tcm_df"], options["tcm_mu"], options["tcm_sigma"], options["tcm_boundary_share"],
                          options["tcm_boundary_weight"], ect_options)

    loss.extra_checkpoints = [(STAGE1_FILE, context.teacher_model)]
    return loss


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = (
    *flag_rows(
        "tcm",
        ("tcm_df", 0.01, "TCM: degrees of freedom of the truncated log-Student-t p(t) on [t', sigma_max] (TCM: 0.01)",
         None),
        ("tcm_mu", 0.0, "TCM: location of log t (TCM: 0)", None),
        ("tcm_sigma", 0.2, "TCM: scale of log t (TCM: 0.2)", None),
        ("tcm_boundary_share", 0.25, "TCM: share of each batch at t = t' + 1e-8, whose target is stage 1's (TCM: "
         "0.25)", None),
        ("tcm_boundary_weight", 0.1, "TCM: weight of the boundary samples' mean loss beside the others' (TCM: 0.1)",
         None),
    ),
    # sampling composes the two stages at t', so the sampling scripts take it too
    *flag_rows(
        "tcm_denoiser",
        ("tcm_transition_t", 1.0, "TCM: truncation time t'; stage 2 (this model) denoises sigma >= t', the stage-1 "
         "model (--teacher_model_path in training; stage1_modelNNNNNN.pt beside the checkpoint in sampling) below",
         None),
        scripts=("train", "sample"),
    ),
)

MODES = (
    TrainingMode(
        name="tcm",
        description="truncated consistency model stage 2 (TCM, Lee et al. 2025): ECT on t >= t' with the frozen "
        "stage-1 model (--teacher_model_path) below t' (cm.modes.tcm)",
        bind_loss=bind_tcm_loss,
        loss_groups=("ect", "ect_schedule", "tcm"),
        teacher="required",  # the stage-1 consistency model: it initialises the student and gives the targets below t'
        teacher_in_loss=True,
        teacher_ode_steps=False,  # stage 1 is evaluated, not stepped
        denoiser_groups=("denoiser", "tcm_denoiser"),
        make_denoiser=tcm_denoiser,
        companion_network=STAGE1_FILE,
        attach_companion=attach_stage1,
        samplers=("onestep", "tcm_twostep"),
        check_config=check_tcm_config,
        **ECT_SCHEDULE_ENTRY,
        flag_defaults=dict(  # NVlabs/TCM's CIFAR-10 stage 2: batch 1024, RAdam lr 5e-5, 1 / (t - r) weights
            weight_schedule="ict",
            global_batch_size=1024,
            lr=5e-5,
            total_training_steps=200000,
        ),
        quickstart=QuickstartPlan("tcm", (("EDM", "digits_edm.yaml", "edm"), ("ECT", "digits_ect.yaml",
                                                                             "consistency_tuning"),
                                          ("TCM", "digits_tcm.yaml", "tcm"))),
    ),
)
