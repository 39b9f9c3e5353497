"""The registry of training methods: it collects each method module of cm/modes/ (its modes, its flags) and joins
the methods' flags to the shared table of cm.flags. Nothing else lists the methods or compares mode names.

Everything that differs between modes is read from a mode's entry (cm.modes.base.TrainingMode): the command line
(the mode's flag defaults and its module's flags), the resolved configuration (which flag groups apply, whether
the student starts from the teacher), the training loop (which networks it holds, which loss it binds once, what
its schedule gives, what it saves), sampling (the denoiser and samplers a checkpoint of the mode needs) and the
quickstart (the mode's plan on the digits).

Adding a method: one module in cm/modes/ (flags, schedule, loss, check, binder, MODES), its name in METHODS (or
`register(module)` from outside the package), one preset in configs/ and one test.
"""

from dataclasses import replace

from . import flags as shared
from .karras_diffusion import KarrasDenoiser
from .modes import ayf, cmt, consistency, ect, edm, lcm, meanflow, scm, tcm, ufogen
from .modes.base import LossContext, QuickstartPlan, TrainingMode  # noqa: F401  (the types of its entries)

METHODS = (edm, consistency, ect, scm, lcm, ufogen, meanflow, cmt, tcm, ayf)

TRAINING_MODES = {}
FLAGS = dict(shared.SHARED_FLAGS)  # the shared flags, then each method's own
# --training_mode's choices are the registered modes
FLAGS["training_mode"] = replace(FLAGS["training_mode"], choices=TRAINING_MODES)


def register(method):
    """Add a method module's modes (`MODES`) and flags (`FLAGS`) to the registry, refusing a name taken already."""
    for flag in method.FLAGS:
        if flag.name in FLAGS:
            raise ValueError(f"flag --{flag.name} of {method.__name__} is declared twice")
    for mode in method.MODES:
        if mode.name in TRAINING_MODES:
            raise ValueError(f"training_mode {mode.name} of {method.__name__} is registered already")
    FLAGS.update((flag.name, flag) for flag in method.FLAGS)
    TRAINING_MODES.update((mode.name, mode) for mode in method.MODES)


for _method in METHODS:
    register(_method)


def get_training_mode(name):
    """The table entry of a mode, or a ValueError naming the modes there are."""
    if isinstance(name, TrainingMode):
        return name
    try:
        return TRAINING_MODES[name]
    except KeyError:
        raise ValueError(f"unknown training_mode {name!r}; allowed: {', '.join(TRAINING_MODES)}") from None


def build_denoiser(mode, denoiser_config):
    """The denoiser of a mode's networks (training and sampling) from its resolved configuration."""
    make = get_training_mode(mode).make_denoiser or KarrasDenoiser
    return make(**denoiser_config)


def quickstart_plans():
    """{quickstart --mode: stages} of the modes that declare a plan on the digits, in registry order."""
    return {mode.quickstart.name: mode.quickstart.stages for mode in TRAINING_MODES.values() if mode.quickstart}


# ----- flags of the joined table --------------------------------------------------------------------------------


def names_in(*groups):
    """Flag names of the given groups, in table order."""
    return tuple(name for name, flag in FLAGS.items() if flag.group in groups)


def method_flags():
    """Names of the flags the methods declare (those not in the shared table)."""
    return tuple(name for name in FLAGS if name not in shared.SHARED_FLAGS)


def script_flags(script):
    """The flags of a script ("train", "sample", "edit", "search") besides the network and denoiser ones."""
    return shared.SCRIPT_FLAGS[script] + tuple(name for name in method_flags() if script in FLAGS[name].scripts)


def defaults_of(names, overrides=None):
    """{name: default} for the named flags, with `overrides` applied."""
    values = {name: FLAGS[name].default for name in names}
    values.update(overrides or {})
    return values


def script_defaults(script, training_mode=None):
    """Every flag of a script with its default there (training scripts: plus the mode's own defaults)."""
    names = script_flags(script) + shared.MODEL_AND_DIFFUSION_FLAGS
    overrides = dict(shared.SCRIPT_DEFAULTS[script])
    if training_mode is not None:
        overrides["training_mode"] = training_mode
        overrides.update(get_training_mode(training_mode).flag_defaults)
    return defaults_of(names, overrides)


def flag_help():
    """{name: help text} of every flag."""
    return {name: flag.help for name, flag in FLAGS.items()}


def flag_choices():
    """{name: allowed values} of the enum flags."""
    return {name: flag.choices for name, flag in FLAGS.items() if flag.choices is not None}
