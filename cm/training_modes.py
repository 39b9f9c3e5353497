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
    :param promotes_student: at each change of N the student becomes the teacher (progressive distillation).
    :param flag_defaults: defaults of this mode's own script (e.g. ct_train.py); cm_train.py keeps the table's.
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
    promotes_student: bool = False
    flag_defaults: dict = field(default_factory=dict)

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
