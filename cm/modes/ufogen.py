"""UFOGen (Xu et al. 2023, "UFOGen: You Forward Once Large Scale Text-to-Image Generation via Diffusion GANs") on our
EDM noise levels: a one-step generator trained as a diffusion GAN, initialised from an EDM teacher.

Notation: the VE process x_s = x_0 + s z; on the N-point Karras grid t = t_n and s = t_(n+k) < t ("x_(t-1)").
One training step, per sample:

    x_s ~ q(x_s | x_0),  x_t ~ q(x_t | x_s)                       real pair
    x'_0 = G(x_t, t)                                              the generator: an EDM denoiser D_theta
    x'_s ~ q(x_s | x'_0)            (UFOGen's generator step)    or  q(x_s | x_t, x'_0)  (DDGAN / SIDDM posterior)
    discriminator D_phi(x_s, s, y):  softplus(-D_phi(x_s)) + softplus(D_phi(x'_s))    (one Adam step)
    generator:  adv * softplus(-D_phi(x'_s)) + rec * gamma_t ||x_0 - x'_0||^2

The discriminator is conditioned on the noise level of its input (and the label) and starts from the encoder half
of the teacher's UNet; it and its optimizer belong to the bound loss, which hands them to the training loop's
checkpoints (`extra_checkpoints`). Sampling is one step, x_0 = G(sigma_max z, sigma_max) (--sampler onestep), or
LCM-style multistep (--sampler lcm: denoise, re-noise with q(x_s | x'_0), repeat).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import dist_util, logger
from ..flags import flag_rows
from ..networks import create_model
from ..nn import append_dims, linear, mean_flat, noise_conditioning, normalization, timestep_embedding, zero_module
from .base import TrainingMode, unweighted
from .consistency import consistency_schedule
from .lcm import sample_skip_sigmas

UFOGEN_STEPS = ("marginal", "posterior")
DISC_GRAD_CLIP = 1.0  # UFOGen's code clips the discriminator's gradient norm to 1
DISC_BETAS = (0.0, 0.999)  # and runs Adam with beta1 = 0 for it


# ----- the forward process and the generator's step ----------------------------------------------------------------


def forward_marginal(x0, sigma, noise):
    """x_s ~ q(x_s | x_0) = N(x_0, s^2 I): the VE forward process (UFOGen's generator step, from x'_0)."""
    return x0 + append_dims(sigma, x0.ndim) * noise


def forward_transition(x_s, s, t, noise):
    """x_t ~ q(x_t | x_s) = N(x_s, (t^2 - s^2) I), t > s."""
    return x_s + append_dims((t**2 - s**2).sqrt(), x_s.ndim) * noise


def posterior_mean_std(x_t, x0, t, s):
    """q(x_s | x_t, x_0) of the VE process, s < t: mean x_0 + (s^2 / t^2)(x_t - x_0), std s sqrt(t^2 - s^2) / t."""
    ratio = append_dims(s**2 / t**2, x_t.ndim)
    std = append_dims(s * (t**2 - s**2).sqrt() / t, x_t.ndim)
    return x0 + ratio * (x_t - x0), std


def posterior_sample(x_t, x0, t, s, noise):
    """x_s ~ q(x_s | x_t, x_0) (DDPM's forward-process posterior in VE form; DDGAN's generator step)."""
    mean, std = posterior_mean_std(x_t, x0, t, s)
    return mean + std * noise


def generator_step(step, x_t, x0, t, s, noise):
    """x'_s from the generator's x'_0: marginal q(x_s | x'_0) (UFOGen) or posterior q(x_s | x_t, x'_0)."""
    if step == "marginal":
        return forward_marginal(x0, s, noise)
    if step == "posterior":
        return posterior_sample(x_t, x0, t, s, noise)
    raise ValueError(f"unknown ufogen_step {step!r}; allowed: {', '.join(UFOGEN_STEPS)}")


# ----- the discriminator -------------------------------------------------------------------------------------------


class NoiseLevelDiscriminator(nn.Module):
    """D_phi(x_s, s, y): the encoder half of an ADM UNet (time and label embeddings, input blocks, middle block, with
    the UNet's parameter names, so a teacher's weights load into it) and a head: group norm, SiLU, global average
    pooling, a linear logit plus a projection term <embed(y), h> for labels (Miyato & Koyama 2018). The head starts
    at zero, as UFOGen's code zero-initialises the discriminator's last layer.

    :param unet: a cm.unet.UNetModel of the generator's configuration; its encoder modules are taken over.
    """

    def __init__(self, unet):
        super().__init__()
        self.model_channels = unet.model_channels
        self.time_embed = unet.time_embed
        self.label_emb = getattr(unet, "label_emb", None)
        self.input_blocks = unet.input_blocks
        self.middle_block = unet.middle_block
        ch = int(unet.channel_mult[-1] * unet.model_channels)
        self.head = nn.Sequential(normalization(ch), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.logit = zero_module(linear(ch, 1))
        self.class_proj = zero_module(nn.Embedding(self.label_emb.num_embeddings, ch)) if self.label_emb else None

    def forward(self, x, c_noise, y=None):
        """Logits [N] of x [N, C, H, W] (already scaled by c_in) at noise conditioning c_noise [N], labels y [N]."""
        emb = self.time_embed(timestep_embedding(c_noise, self.model_channels))
        if self.label_emb is not None:
            emb = emb + self.label_emb(y)
        h = x
        for module in self.input_blocks:
            h = module(h, emb)
        h = self.head(self.middle_block(h, emb).float())
        logits = self.logit(h).squeeze(1)
        if self.class_proj is not None:
            logits = logits + (self.class_proj(y) * h).sum(dim=1)
        return logits


def build_discriminator(network):
    """The discriminator of a generator with these network flags (ADM UNet only; no dropout)."""
    if network.get("model_type", "adm") != "adm":
        raise ValueError("UFOGen's discriminator is the encoder of the ADM UNet; use --model_type adm")
    unet = create_model(**{**network, "dropout": 0.0, "guidance_embed": False, "logvar_channels": 0})
    return NoiseLevelDiscriminator(unet)


def load_encoder_weights(discriminator, path):
    """Copy the parameters the discriminator shares with a UNet checkpoint (same names and shapes); returns how many."""
    source = dist_util.load_state_dict(path, map_location="cpu")
    own = discriminator.state_dict()
    shared = {k: v for k, v in source.items() if k in own and own[k].shape == v.shape}
    if not shared:
        raise ValueError(f"{path} shares no parameters with the discriminator (not a UNet of these network flags)")
    discriminator.load_state_dict({**own, **shared})
    return len(shared)


# ----- the loss ----------------------------------------------------------------------------------------------------


class UFOGenLoss:
    """The UFOGen step bound to a discriminator and its optimizer: called as loss(model, x_0, model_kwargs, N) (once
    per micro-batch) it updates the discriminator once and returns the generator's terms and per-sample weights of
    one.

    :param diffusion: the generator's KarrasDenoiser (EDM scalings).
    :param discriminator: a NoiseLevelDiscriminator on the training device.
    :param optimizer: its optimizer.
    :param step: "marginal" (UFOGen) or "posterior" (DDGAN) generator step.
    :param t_skip: grid points k between t and s.
    :param adv_weight: weight of the generator's adversarial term.
    :param rec_weight: weight of the reconstruction term gamma_t ||x_0 - x'_0||^2 (gamma_t: diffusion.loss_weights).
    """

    def __init__(self, diffusion, discriminator, optimizer, step="marginal", t_skip=1, adv_weight=1.0, rec_weight=1.0):
        if step not in UFOGEN_STEPS:
            raise ValueError(f"unknown ufogen_step {step!r}; allowed: {', '.join(UFOGEN_STEPS)}")
        self.diffusion = diffusion
        self.discriminator = discriminator.requires_grad_(False)
        self.optimizer = optimizer
        self.step = step
        self.t_skip = t_skip
        self.adv_weight = adv_weight
        self.rec_weight = rec_weight

    @property
    def extra_checkpoints(self):
        """(file prefix, object with state_dict / load_state_dict) pairs the training loop saves and resumes."""
        return [("discriminator", self.discriminator), ("discriminator_opt", self.optimizer)]

    def discriminate(self, x, sigma, model_kwargs):
        """D_phi on x at noise level sigma [N]: the network sees c_in(sigma) x and c_noise(sigma), as the UNet does."""
        c_in = append_dims(self.diffusion.get_scalings(sigma)[2], x.ndim).to(x.dtype)
        return self.discriminator(c_in * x, noise_conditioning(sigma), y=model_kwargs.get("y"))

    def update_discriminator(self, real, fake, sigma, model_kwargs):
        """One discriminator step on softplus(-D(real)) + softplus(D(fake)), in float32; returns its loss."""
        self.discriminator.requires_grad_(True)
        with torch.autocast(real.device.type, enabled=False):
            loss = F.softplus(-self.discriminate(real.float(), sigma.float(), model_kwargs)).mean()
            loss = loss + F.softplus(self.discriminate(fake.float(), sigma.float(), model_kwargs)).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        params = [p for p in self.discriminator.parameters() if p.grad is not None]
        if dist_util.get_world_size() > 1:
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad.div_(dist_util.get_world_size())
        torch.nn.utils.clip_grad_norm_(params, DISC_GRAD_CLIP)
        self.optimizer.step()
        self.discriminator.requires_grad_(False)
        return loss.detach()

    def __call__(self, model, x_start, model_kwargs, schedule):
        batch, num_scales = x_start.shape[0], schedule["num_scales"]
        # a real pair: x_s ~ q(x_s | x_0), x_t ~ q(x_t | x_s), s k grid points below t
        t, s = sample_skip_sigmas(self.diffusion, num_scales, self.t_skip, batch, x_start.device, x_start.dtype)
        x_s = forward_marginal(x_start, s, torch.randn_like(x_start))
        x_t = forward_transition(x_s, s, t, torch.randn_like(x_start))
        # the generator predicts x'_0 and steps to x'_s
        x0 = self.diffusion.denoise(model, x_t, t, **model_kwargs)[1]
        fake = generator_step(self.step, x_t, x0, t, s, torch.randn_like(x_start))
        # the discriminator learns to tell x_s from x'_s at noise level s
        disc_loss = self.update_discriminator(x_s, fake.detach(), s, model_kwargs)
        # the generator: fool it, and stay close to the data
        adv = F.softplus(-self.discriminate(fake, s, model_kwargs).float())
        rec = self.diffusion.loss_weights(t) * mean_flat((x0 - x_start) ** 2).float()
        loss = self.adv_weight * adv + self.rec_weight * rec
        terms = {"loss": loss, "adv": adv, "rec": rec, "disc_loss": disc_loss.expand(batch), "sigma": t}
        return unweighted(terms)


def bind_ufogen_loss(diffusion, context):
    """The UFOGen loss of a run: its discriminator built from the run's network flags (from the teacher's encoder
    with disc_init teacher) on this rank's device, the same on every rank, and its Adam optimizer."""
    config = context.config
    if not config:
        raise ValueError("ufogen builds its discriminator from the run's resolved configuration (cm.config); "
                         "train it through cm.train_cli")
    options = context.options
    discriminator = build_discriminator(config["network"])
    if options["disc_init"] == "teacher":
        count = load_encoder_weights(discriminator, config["teacher"]["model_path"])
        logger.log(f"ufogen: discriminator starts from {count} tensors of the teacher's encoder")
    discriminator.to(dist_util.dev())
    dist_util.sync_params(discriminator.parameters())
    optimizer = torch.optim.Adam(discriminator.parameters(), lr=options["disc_lr"], betas=DISC_BETAS)
    return UFOGenLoss(
        diffusion, discriminator, optimizer, step=options["ufogen_step"], t_skip=options["ufogen_t_skip"],
        adv_weight=options["ufogen_adv_weight"], rec_weight=options["ufogen_rec_weight"],
    )


# ----- flags and the mode ------------------------------------------------------------------------------------------

FLAGS = flag_rows(
    "ufogen",
    ("ufogen_step", "marginal", "UFOGen generator step to x'_(t-1): marginal q(x_(t-1) | x'_0) (UFOGen) or "
     "posterior q(x_(t-1) | x_t, x'_0) (DDGAN / SIDDM)", UFOGEN_STEPS),
    ("ufogen_t_skip", 1, "UFOGen: grid points between x_t and x_(t-1)", None),
    ("ufogen_adv_weight", 1.0, "UFOGen: weight of the generator's adversarial term", None),
    ("ufogen_rec_weight", 1.0, "UFOGen: weight of the reconstruction term gamma_t ||x_0 - x'_0||^2, gamma_t "
     "the --weight_schedule weight of sigma_t (snr: the epsilon loss of UFOGen's code; karras: EDM's loss)", None),
    ("disc_lr", 1e-4, "UFOGen: discriminator learning rate (Adam, betas 0 and 0.999, gradients clipped to 1)", None),
    ("disc_init", "teacher", "UFOGen discriminator start: teacher (the encoder half of --teacher_model_path, "
     "as UFOGen starts from the diffusion model) or random", ("teacher", "random")),
)

MODES = (
    TrainingMode(
        name="ufogen",
        description="UFOGen (Xu et al. 2023): a one-step diffusion-GAN generator initialised from an EDM teacher "
        "(cm.modes.ufogen)",
        bind_loss=bind_ufogen_loss,
        loss_groups=("ufogen",),
        teacher="required",  # the EDM checkpoint generator (and discriminator encoder) start from
        uses_distance=False,
        make_schedule=consistency_schedule,
        samplers=("onestep", "lcm"),
    ),
)
