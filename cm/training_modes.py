"""The table of training modes: one entry per mode, saying what the mode needs and which loss trains it.

Everything that differs between modes is read from its entry here: the command line (the mode's flag
defaults), the resolved configuration (which flag groups apply, whether the student starts from the
teacher), the training loop (which networks it holds, which loss method it binds once, what it saves) and
sampling (which scalings a checkpoint of the mode needs). No other module compares mode names.

Adding a mode: one entry in TRAINING_MODES, one loss method on KarrasDenoiser (or any object the entry's
`bind_loss` builds), one preset in configs/.
"""

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

from .ect import bind_ect_loss, check_ect_config, create_ect_schedule
from .scm import bind_scm_loss, check_scm_config, scm_schedule
from .trigflow import TrigFlowDenoiser


@dataclass(frozen=True)
class LossContext:
    """What a loss is bound to besides the denoiser: the other networks (None where the mode has none), the EDM
    noise-level sampler, and the values of the mode's own flag groups (`TrainingMode.loss_groups`)."""

    target_model: object = None
    teacher_model: object = None
    teacher_diffusion: object = None
    teacher_solver: str = "heun"
    schedule_sampler: object = None
    options: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved run configuration (cm.config), where the loop has one


def bind_edm_loss(diffusion, context):
    """EDM (Karras et al. 2022, Eq. 2): sigma from the noise-level sampler, then KarrasDenoiser.training_losses."""

    def loss(model, x_start, model_kwargs, num_scales=None):
        sigmas, weights = context.schedule_sampler.sample(x_start.shape[0], x_start.device)
        terms = diffusion.training_losses(model, x_start, sigmas, model_kwargs=model_kwargs)
        terms["sigma"] = sigmas
        return terms, weights

    return loss


def _unweighted(method):
    """A loss method that returns its own weighting inside `loss`: per-sample weights of one."""

    def loss(model, x_start, model_kwargs, num_scales):
        terms = method(model, x_start, num_scales, model_kwargs=model_kwargs)
        return terms, terms["loss"].new_ones(terms["loss"].shape)

    return loss


def bind_consistency_loss(diffusion, context):
    """Consistency distillation (CM paper Alg. 2; teacher given) or training (Alg. 3; no teacher)."""
    return _unweighted(
        partial(
            diffusion.consistency_losses,
            target_model=context.target_model,
            teacher_model=context.teacher_model,
            teacher_diffusion=context.teacher_diffusion,
            teacher_solver=context.teacher_solver,
        )
    )


def bind_progdist_loss(diffusion, context):
    """Progressive distillation (Salimans & Ho 2022): one student step matches two teacher steps."""
    return _unweighted(
        partial(
            diffusion.progdist_losses,
            teacher_model=context.teacher_model,
            teacher_diffusion=context.teacher_diffusion,
        )
    )


def bind_lcm_loss(diffusion, context):
    """Latent consistency distillation (Luo et al. 2023): guided teacher, skipping step k, w-conditioned student;
    with no teacher in the loss, latent consistency fine-tuning (LCF). See cm.lcm."""
    from .lcm import bind_lcm

    return bind_lcm(diffusion, context)


def lcm_denoiser(**denoiser_config):
    """KarrasDenoiser with LCM's boundary-condition scalings (c_skip x + c_out D(x), f(x, sigma_min) = x)."""
    from .karras_diffusion import KarrasDenoiser

    return KarrasDenoiser(**denoiser_config, distillation=True, boundary_scalings="lcm")


def check_lcm_config(config):
    """One-line errors for LCM / LCF configurations that cannot train (cm.lcm.check_lcm_options)."""
    from .lcm import check_lcm_options

    check_lcm_options(config)


def bind_ufogen_loss(diffusion, context):
    """UFOGen (Xu et al. 2023): a diffusion-GAN generator x_t -> x'_0 -> x'_(t-1) against a noise-level-conditioned
    discriminator that the bound loss owns and checkpoints. See cm.ufogen."""
    from .ufogen import bind_ufogen

    return bind_ufogen(diffusion, context)


@dataclass(frozen=True)
class TrainingMode:
    """What one training mode needs.

    :param name: the --training_mode value.
    :param description: one line for --help and logs.
    :param bind_loss: (diffusion, LossContext) -> loss(model, x, model_kwargs, num_scales) returning (terms with
        "loss" and "sigma", per-sample weights); bound once when the loop is built.
    :param loss_groups: flag groups of cm.flags whose values the binder gets as LossContext.options.
    :param teacher: "required", "optional" (only to initialise the student) or "none".
    :param teacher_in_loss: the loss runs the teacher network (CD, progdist); else it is only a weight source.
    :param target: the loop keeps a target network theta- updated by EMA mu(k).
    :param uses_distance: the loss applies the denoiser's loss_norm distance (built, LPIPS loaded, at start-up).
    :param boundary_condition: f(x, sigma_min) = x scalings (CM paper App. C) instead of EDM's.
    :param schedule: "ema_and_scales" (step -> (mu(k), N(k))) or "schedule_sampler" (EDM sigma sampler).
    :param schedule_groups: flag groups that configure the mu(k), N(k) schedule (plus total_steps).
    :param make_schedule: builds step -> (mu(k), N(k)) from those values (None: cm.schedules.create_ema_and_scales_fn).
    :param schedule_in_images: the schedule also gets images_per_step (the global batch), for stages in images.
    :param promotes_student: at each change of N the student becomes the teacher (progressive distillation).
    :param flag_defaults: defaults of this mode's own script (e.g. ct_train.py); cm_train.py keeps the table's.
    :param denoiser_groups: flag groups whose values build the mode's denoiser (its keyword arguments).
    :param make_denoiser: the class (or factory) of the denoiser whose `denoise` the mode's checkpoints need, in
        training and sampling (None: KarrasDenoiser with the boundary_condition choice).
    :param samplers: names in cm.sampling of the (one-step, two-step) samplers of the mode's checkpoints.
    :param check_config: resolved configuration -> None, raising ValueError in one line for a combination the mode
        cannot train (None: no check).
    :param teacher_network: network flags in which the teacher differs from the student (an LCM student's guidance
        embedding, which its EDM teacher lacks).
    """

    name: str
    description: str
    bind_loss: Callable
    loss_groups: tuple = ()
    teacher: str = "none"
    teacher_in_loss: bool = False
    target: bool = False
    uses_distance: bool = True
    boundary_condition: bool = False
    schedule: str = "ema_and_scales"
    schedule_groups: tuple = ("schedule",)
    make_schedule: Callable = None
    schedule_in_images: bool = False
    promotes_student: bool = False
    flag_defaults: dict = field(default_factory=dict)
    denoiser_groups: tuple = ("denoiser",)
    make_denoiser: Callable = None
    samplers: tuple = ("onestep", "multistep")
    check_config: Callable = None
    teacher_network: dict = field(default_factory=dict)

    def build_denoiser(self, denoiser_config):
        """The denoiser of this mode's networks (training and sampling) from its resolved configuration."""
        if self.make_denoiser is not None:
            return self.make_denoiser(**denoiser_config)
        from .karras_diffusion import KarrasDenoiser

        return KarrasDenoiser(**denoiser_config)

    def schedule_fn(self, schedule_config):
        """step -> (mu(k), N(k)) from the resolved schedule group."""
        if self.make_schedule is not None:
            return self.make_schedule(**schedule_config)
        from .schedules import create_ema_and_scales_fn

        return create_ema_and_scales_fn(**schedule_config)

    @property
    def consistency_model(self):
        """Checkpoints of this mode are consistency functions f(x, t) (sampled with onestep / multistep)."""
        return self.boundary_condition

    @property
    def saved_networks(self):
        """File prefixes of the networks a checkpoint holds besides the model and its EMAs."""
        names = ("target_model",) if self.target else ()
        return names + (("teacher_model",) if self.promotes_student else ())


# what sct and scd share: the loss of cm.scm, TrigFlow's denoiser and samplers, the tangent warm-up as schedule
SCM_ENTRY = dict(
    bind_loss=bind_scm_loss,
    loss_groups=("scm_loss",),
    uses_distance=False,
    schedule_groups=("scm_schedule",),
    make_schedule=scm_schedule,
    denoiser_groups=("trigflow",),
    make_denoiser=TrigFlowDenoiser,
    samplers=("trigflow_onestep", "trigflow_twostep"),
    check_config=check_scm_config,
)

TRAINING_MODES = {
    mode.name: mode
    for mode in (
        TrainingMode(
            name="edm",
            description="EDM denoiser (Karras et al. 2022): the teacher of distillation",
            bind_loss=bind_edm_loss,
            uses_distance=False,
            schedule="schedule_sampler",
            flag_defaults=dict(total_training_steps=0),
        ),
        TrainingMode(
            name="consistency_distillation",
            description="consistency distillation from an EDM teacher (CM paper Alg. 2)",
            bind_loss=bind_consistency_loss,
            teacher="required",
            teacher_in_loss=True,
            target=True,
            boundary_condition=True,
        ),
        TrainingMode(
            name="consistency_training",
            description="consistency training from data alone (CM paper Alg. 3)",
            bind_loss=bind_consistency_loss,
            teacher="optional",
            target=True,
            boundary_condition=True,
            flag_defaults=dict(
                target_ema_mode="adaptive",
                scale_mode="progressive",
                start_ema=0.95,
                start_scales=2,
                end_scales=200,
                total_training_steps=800000,
            ),
        ),
        TrainingMode(
            name="progdist",
            description="progressive distillation (Salimans & Ho 2022) on the Karras grid",
            bind_loss=bind_progdist_loss,
            teacher="required",
            teacher_in_loss=True,
            promotes_student=True,
        ),
        TrainingMode(
            name="consistency_tuning",
            description="easy consistency tuning (ECT, Geng et al. 2025) of a pretrained EDM network (cm.ect)",
            bind_loss=bind_ect_loss,
            loss_groups=("ect", "ect_schedule"),
            teacher="required",  # the EDM checkpoint the student starts from; no teacher network runs in the loss
            uses_distance=False,
            boundary_condition=True,
            schedule_groups=("ect_schedule",),
            make_schedule=create_ect_schedule,
            schedule_in_images=True,
            check_config=check_ect_config,
            flag_defaults=dict(  # ECT's CIFAR-10 run (locuslab/ect run_ecm.sh): batch 128, 200k steps, and with
                weight_schedule="ict",  # the table's 8 stages over the run, 3.2M images per stage
                global_batch_size=128,
                lr=1e-4,
                total_training_steps=200000,
            ),
        ),
        TrainingMode(
            name="sct",
            description="continuous-time consistency training, sCT (Lu & Song 2024): TrigFlow, the tangent by one JVP",
            teacher="optional",
            **SCM_ENTRY,
            flag_defaults=dict(adaptive_double_norm=True, logvar_channels=128, total_training_steps=400000),
        ),
        TrainingMode(
            name="scd",
            description="continuous-time consistency distillation, sCD (Lu & Song 2024), from an EDM teacher",
            teacher="required",
            teacher_in_loss=True,
            **SCM_ENTRY,
            # the student from scratch: the EDM teacher's weights expect its time input (--time_conditioning edm)
            flag_defaults=dict(init_from_teacher="false", logvar_channels=128, total_training_steps=400000),
        ),
        TrainingMode(
            name="lcm",
            description="latent consistency distillation (Luo et al. 2023): a guided EDM teacher jumps k grid steps, "
            "the student takes the guidance scale w (cm.lcm)",
            bind_loss=bind_lcm_loss,
            loss_groups=("lcm",),
            teacher="required",
            teacher_in_loss=True,
            target=True,
            boundary_condition=True,
            make_denoiser=lcm_denoiser,
            samplers=("onestep", "lcm"),
            check_config=check_lcm_config,
            teacher_network=dict(guidance_embed=False),
            flag_defaults=dict(start_ema=0.95, weight_schedule="uniform", loss_norm="huber", teacher_solver="euler"),
        ),
        TrainingMode(
            name="lcf",
            description="latent consistency fine-tuning (Luo et al. 2023): the LCM given as --teacher_model_path trained "
            "on new data by the same consistency loss, without a teacher (cm.lcm)",
            bind_loss=bind_lcm_loss,
            loss_groups=("lcm",),
            teacher="required",  # the trained LCM the student starts from; no teacher runs in the loss
            target=True,
            boundary_condition=True,
            make_denoiser=lcm_denoiser,
            samplers=("onestep", "lcm"),
            check_config=check_lcm_config,
            flag_defaults=dict(start_ema=0.95, weight_schedule="uniform", loss_norm="huber"),
        ),
        TrainingMode(
            name="ufogen",
            description="UFOGen (Xu et al. 2023): a one-step diffusion-GAN generator initialised from an EDM teacher "
            "(cm.ufogen)",
            bind_loss=bind_ufogen_loss,
            loss_groups=("ufogen",),
            teacher="required",  # the EDM checkpoint generator (and discriminator encoder) start from
            uses_distance=False,
            samplers=("onestep", "lcm"),
        ),
    )
}


def get_training_mode(name):
    """The table entry of a mode, or a ValueError naming the modes there are."""
    if isinstance(name, TrainingMode):
        return name
    try:
        return TRAINING_MODES[name]
    except KeyError:
        raise ValueError(f"unknown training_mode {name!r}; allowed: {', '.join(TRAINING_MODES)}") from None


def uses_boundary_condition(name):
    """Whether checkpoints of training mode `name` need the consistency-model scalings."""
    return get_training_mode(name).boundary_condition
