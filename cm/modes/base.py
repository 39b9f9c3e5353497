"""What a training method module is made of, and the pieces its losses share.

A method module (cm/modes/*.py) reads top to bottom: a math header with the paper's equations, its flag rows
(`FLAGS`, cm.flags.Flag), its schedule, its loss, its configuration check and its binder, and last its entries
of the mode table (`MODES`, TrainingMode). cm.training_modes collects the modules; nothing else lists them.

A bound loss is called once per micro-batch as ``loss(model, x_start, model_kwargs, schedule)`` and returns
(terms with "loss" and "sigma" per sample, per-sample weights); `schedule` holds the named values of the mode's
schedule at this step (e.g. {"target_ema": mu(k), "num_scales": N(k)}).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn.parallel import DistributedDataParallel


@dataclass(frozen=True)
class LossContext:
    """What a loss is bound to besides the denoiser: the other networks (None where the mode has none), the EDM
    noise-level sampler, and the values of the mode's own flag groups (`TrainingMode.loss_groups`)."""

    target_model: object = None
    teacher_model: object = None
    teacher_diffusion: object = None
    teacher_solver: str = None  # None: the mode's default step
    schedule_sampler: object = None
    options: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)  # the resolved run configuration (cm.config), where the loop has one


def teacher_guidance_scale(context):
    """The classifier-free guidance scale of the loss's teacher (--teacher_guidance_scale; 1: unguided)."""
    return float((context.config.get("teacher") or {}).get("guidance_scale", 1.0))


@dataclass(frozen=True)
class QuickstartPlan:
    """How scripts/quickstart.py runs a method on the embedded digits.

    :param name: the quickstart's --mode value.
    :param stages: (label, preset in configs/, training mode) per stage; each stage's EMA model is the teacher of
        the next, and the stages share the time budget.
    """

    name: str
    stages: tuple


@dataclass(frozen=True)
class TrainingMode:
    """What one training mode needs.

    :param name: the --training_mode value.
    :param description: one line for --help and logs.
    :param bind_loss: (diffusion, LossContext) -> loss(model, x, model_kwargs, schedule) returning (terms with
        "loss" and "sigma", per-sample weights); bound once when the loop is built.
    :param loss_groups: flag groups whose values the binder gets as LossContext.options.
    :param teacher: "required", "optional" (only to initialise the student) or "none".
    :param teacher_in_loss: the loss runs the teacher network (CD, progdist); else it is only a weight source.
    :param teacher_ode_steps: the loss steps the teacher's PF-ODE with --teacher_solver (sCD only reads its velocity).
    :param guided_teacher: the loss can run its teacher with classifier-free guidance at --teacher_guidance_scale.
    :param target: the loop keeps a target network theta- updated by EMA with the schedule's "target_ema".
    :param uses_distance: the loss applies the denoiser's loss_norm distance (built, LPIPS loaded, at start-up).
    :param boundary_condition: f(x, sigma_min) = x scalings (CM paper App. C) instead of EDM's.
    :param schedule_groups: flag groups that configure the schedule (plus total_steps when make_schedule is set).
    :param make_schedule: builds step -> {name: value} from those values (None: no step schedule; the groups then
        configure the EDM noise-level sampler).
    :param schedule_in_images: the schedule also gets images_per_step (the global batch), for stages in images.
    :param promotes_student: at each change of the schedule's "num_scales" the student becomes the teacher
        (progressive distillation).
    :param flag_defaults: defaults of this mode's own script (e.g. ct_train.py); cm_train.py keeps the table's.
    :param denoiser_groups: flag groups whose values build the mode's denoiser (its keyword arguments).
    :param make_denoiser: the class (or factory) of the denoiser whose `denoise` the mode's checkpoints need, in
        training and sampling (None: KarrasDenoiser with the boundary_condition choice).
    :param samplers: names in cm.sampling.SAMPLERS of the (one-step, two-step) samplers of the mode's checkpoints.
    :param check_config: resolved configuration -> None, raising ValueError in one line for a combination the mode
        cannot train (None: no check).
    :param teacher_network: network flags in which the teacher differs from the student (an LCM student's guidance
        embedding, which its EDM teacher lacks).
    :param quickstart: the mode's QuickstartPlan on the digits, or None (not in scripts/quickstart.py).
    :param companion_network: file prefix of a frozen network that sampling needs beside the model, saved next to
        each checkpoint as PREFIXNNNNNN.pt (TCM's stage-1 model), or None.
    :param attach_companion: (the mode's denoiser, the companion network) -> the denoiser samplers run.
    :param takes_jvp: the loss takes a forward-mode JVP through the network (kept in float32 weights under fsdp).
    """

    name: str
    description: str
    bind_loss: Callable
    loss_groups: tuple = ()
    teacher: str = "none"
    teacher_in_loss: bool = False
    teacher_ode_steps: bool = True
    guided_teacher: bool = False
    target: bool = False
    uses_distance: bool = True
    boundary_condition: bool = False
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
    quickstart: QuickstartPlan = None
    companion_network: str = None
    attach_companion: Callable = None
    takes_jvp: bool = False

    @property
    def has_step_schedule(self):
        """Whether the mode's loss follows a step -> values schedule (else it draws EDM noise levels)."""
        return self.make_schedule is not None

    def schedule_fn(self, schedule_config):
        """step -> {name: value} from the resolved schedule group."""
        return self.make_schedule(**schedule_config)

    @property
    def saved_networks(self):
        """File prefixes of the networks a checkpoint holds besides the model and its EMAs."""
        names = ("target_model",) if self.target else ()
        return names + (("teacher_model",) if self.promotes_student else ())


# ----- pieces the losses share ---------------------------------------------------------------------------------


def unwrap_ddp(model):
    """The network inside a DistributedDataParallel wrapper (or the network itself): a pass without gradients
    needs no gradient synchronisation."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def unit_weights(loss):
    """Per-sample weights of one, for losses that apply their own weighting inside "loss"."""
    return torch.ones_like(loss)


def unweighted(terms):
    """(terms, weights of one): what a bound loss returns when its terms already hold the weighting."""
    return terms, unit_weights(terms["loss"])


def consistency_pair(rng, online, target, target_input=None):
    """The two passes of a consistency-style loss: `online()` with gradients, then, without gradients,
    `target(target_input())` (or `target()`) with the online pass's random draws replayed, so both passes see the
    same dropout masks. `target_input` runs between them, its own draws (a stochastic teacher's) not replayed; the
    RNG then continues past every draw of the step.

    :param rng: a cm.random_util.DeviceRNG of the device the networks run on.
    :return: (online value, target value).
    """
    state = rng.get_state()
    online_value = online()
    with torch.no_grad():
        args = () if target_input is None else (target_input(),)
        with rng.replaying(state):
            target_value = target(*args)
    return online_value, target_value
