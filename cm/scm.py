"""sCT and sCD (sCM: Lu & Song 2024) as training modes of the table in cm.training_modes.

The mathematics is in cm.trigflow (`scm_losses`, `TrigFlowDenoiser`); this module binds it to a training loop:

* the loss, bound once: the online network against its own stop-gradient value (no target network), the tangent
  from the data (sCT) or from an EDM teacher's PF-ODE (sCD), the learned adaptive weighting;
* the schedule: step k -> (0, r(k)), the tangent warm-up factor in the place of the discrete modes' N(k);
* the log-variance head u(t) of the adaptive weighting, an optional submodule `logvar_head` of the network
  (network flag --logvar_channels), so the model's optimizer trains it, every checkpoint and EMA holds it, and
  DistributedDataParallel averages its gradients like the network's;
* the configuration check.
"""

from torch.nn.parallel import DistributedDataParallel

from .trigflow import LogVarianceHead, scm_losses, tangent_warmup, velocity_from_denoiser


def add_logvar_head(network, channels):
    """The network with sCM's log-variance head u(t) as submodule `logvar_head` (channels 0: unchanged, so its
    state-dict keys stay the reference's)."""
    if channels < 0:
        raise ValueError(f"logvar_channels must be 0 (no head) or positive, got {channels}")
    if channels:
        network.logvar_head = LogVarianceHead(channels)
    return network


def unwrap(model):
    """The network inside a DistributedDataParallel wrapper (or the network itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def scm_schedule(tangent_warmup_steps, total_steps):
    """step k -> (0, r(k)): no target EMA, and the tangent warm-up factor r(k) = min(1, k / H) (sCM Alg. 1).

    :param tangent_warmup_steps: H, steps over which r rises from 0 to 1 (0: r = 1 from the start).
    :param total_steps: K (the warm-up does not depend on it).
    """
    del total_steps
    if tangent_warmup_steps < 0:
        raise ValueError(f"tangent_warmup_steps must be >= 0, got {tangent_warmup_steps}")

    def schedule(step):
        return 0.0, tangent_warmup(step, tangent_warmup_steps)

    return schedule


def teacher_velocity(context, sigma_data):
    """sCD's teacher: the PF-ODE v(x_t, t) of the EDM teacher (TrigFlow coordinates), or None for sCT."""
    if context.teacher_model is None:
        return None
    teacher, edm = context.teacher_model, context.teacher_diffusion
    return velocity_from_denoiser(lambda x, sigma, **kw: edm.denoise(teacher, x, sigma, **kw)[1], sigma_data)


def bind_scm_loss(diffusion, context):
    """sCT / sCD (sCM Alg. 1) bound to a TrigFlowDenoiser and the loop's teacher; the loss's fourth argument is
    the schedule's r(k). Options (flag group scm_loss): tangent_norm_c (negative: raw tangent), scm_p_mean, scm_p_std.
    """
    options = context.options
    teacher = teacher_velocity(context, diffusion.sigma_data)
    c = options["tangent_norm_c"]

    def loss(model, x_start, model_kwargs, warmup):
        network = unwrap(model)
        terms = scm_losses(
            diffusion.network(model),
            x_start,
            teacher=teacher,
            model_kwargs=model_kwargs,
            logvar_head=getattr(network, "logvar_head", None),
            sigma_data=diffusion.sigma_data,
            c_noise_scale=diffusion.c_noise_scale,
            warmup=warmup,
            tangent_norm_c=c if c >= 0 else None,
            p_mean=options["scm_p_mean"],
            p_std=options["scm_p_std"],
            target_model=diffusion.network(network),
        )
        return terms, terms["loss"].new_ones(terms["loss"].shape)

    return loss


def check_scm_config(config):
    """One line for an sCM configuration that cannot train as meant: a student started from an EDM checkpoint
    needs EDM's time conditioning (the weights expect its c_noise and output sign)."""
    if config["student_init"] == "teacher" and config["denoiser"]["time_conditioning"] != "edm":
        raise ValueError(
            "the student starts from an EDM checkpoint, whose weights expect EDM's time conditioning: pass "
            "--time_conditioning edm, or --init_from_teacher false to train from scratch"
        )
