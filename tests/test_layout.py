"""The shape of the package: the import graph of cm/ is a tree, every training method is one module the registry
collects, and every keyword default that shares a name with a flag is the flag's default (written once)."""

import ast
import inspect
import os

import pytest

from cm import image_datasets, karras_diffusion, networks, sampling, schedules, script_util, train_util, trigflow
from cm import training_modes
from cm.modes import consistency, ect, lcm, scm, ufogen

CM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cm")


def module_name(path):
    """cm.x.y of a file under cm/ (a package's __init__.py is the package)."""
    parts = os.path.relpath(path, os.path.dirname(CM))[: -len(".py")].split(os.sep)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def cm_modules():
    """{module name: parsed file} of every module of the package."""
    found = {}
    for folder, _, files in os.walk(CM):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    found[module_name(path)] = (path, ast.parse(f.read()))
    return found


def imported_modules(node, me, is_package, known):
    """The cm modules one import statement names (a `from pkg import module` counts as the module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    package = me if is_package else me.rsplit(".", 1)[0]
    if node.level:
        base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
    else:
        source = node.module or ""
    names = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
    return [n for n in names if n in known and n != me]


def import_graph():
    """({module: modules it imports at module level}, [(module, line, imported) of imports inside functions])."""
    modules = cm_modules()
    graph, nested = {}, []
    for me, (path, tree) in modules.items():
        is_package = path.endswith("__init__.py")
        graph[me] = set()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = imported_modules(node, me, is_package, modules)
            if node in tree.body:
                graph[me].update(targets)
            else:
                nested += [(me, node.lineno, t) for t in targets]
    return graph, nested


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan), each a sorted list."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_import_graph_of_cm_has_no_cycle():
    graph, _ = import_graph()
    assert len(graph) > 30 and "cm.modes.consistency" in graph["cm.karras_diffusion"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_of_cm_imports_another_inside_a_function():
    _, nested = import_graph()
    assert nested == []


def test_networks_and_samplers_import_no_training_code():
    graph, _ = import_graph()
    training = {"cm.train_util", "cm.training_modes", "cm.train_cli", "cm.config"} | {
        m for m in graph if m.startswith("cm.modes")}

    def reach(module, seen=None):
        seen = set() if seen is None else seen
        for w in graph[module] - seen:
            seen.add(w)
            reach(w, seen)
        return seen

    for module in ("cm.unet", "cm.ncsnpp", "cm.networks", "cm.sampling", "cm.trigflow", "cm.nn", "cm.flags"):
        assert not (reach(module) & (training - {"cm.modes.consistency", "cm.modes.edm", "cm.modes.base"})), module
    assert not reach("cm.sampling") & training
    assert not reach("cm.networks") & training


def test_every_method_module_declares_flags_modes_and_nothing_else_lists_them():
    for method in training_modes.METHODS:
        assert method.MODES and all(isinstance(mode, training_modes.TrainingMode) for mode in method.MODES)
        for flag in method.FLAGS:
            assert training_modes.FLAGS[flag.name] is flag
    assert list(training_modes.TRAINING_MODES) == [m.name for method in training_modes.METHODS for m in method.MODES]
    # the shared table names no method's flag
    from cm import flags

    assert not set(training_modes.method_flags()) & set(flags.SHARED_FLAGS)


def test_the_quickstart_offers_the_modes_that_declare_a_digits_plan():
    plans = training_modes.quickstart_plans()
    assert set(plans) == {"ct", "cd", "ect", "sct", "scd", "meanflow", "ayf", "cmt", "tcm"}
    for stages in plans.values():
        for _, preset, mode in stages:
            assert mode in training_modes.TRAINING_MODES
            assert os.path.exists(os.path.join(os.path.dirname(CM), "configs", preset))


# ----- defaults written once ------------------------------------------------------------------------------------

# public factories and loops, each with the training mode whose defaults apply to it (None: the table's)
FACTORIES = {
    "KarrasDenoiser": (karras_diffusion.KarrasDenoiser.__init__, None),
    "KarrasDenoiser.consistency_losses": (karras_diffusion.KarrasDenoiser.consistency_losses, None),
    "TrainLoop": (train_util.TrainLoop.__init__, "edm"),
    "CMTrainLoop": (train_util.CMTrainLoop.__init__, None),
    "create_model": (networks.create_model, None),
    "create_model_and_diffusion": (script_util.create_model_and_diffusion, None),
    "create_ema_and_scales_fn": (schedules.create_ema_and_scales_fn, None),
    "load_data": (image_datasets.load_data, None),
    "TrigFlowDenoiser": (trigflow.TrigFlowDenoiser.__init__, "sct"),
    "create_ect_schedule": (ect.create_ect_schedule, "consistency_tuning"),
    "scm_schedule": (scm.scm_schedule, "sct"),
    "scm_losses": (scm.scm_losses, "sct"),
    "karras_sample": (sampling.karras_sample, None),
    "consistency_losses": (consistency.consistency_losses, None),
    "lcm_losses": (lcm.lcm_losses, "lcm"),
    "ect_losses": (ect.ect_losses, "consistency_tuning"),
    "UFOGenLoss": (ufogen.UFOGenLoss.__init__, "ufogen"),
    "make_optimizer": (train_util.make_optimizer, None),
}
# the reference's own create_model signature (openai/consistency_models script_util.create_model), kept for its
# callers; its defaults differ from its model_and_diffusion_defaults() there too
REFERENCE_SIGNATURE_DEFAULTS = {("create_model", "attention_resolutions"), ("create_model", "num_heads"),
                                ("create_model", "use_scale_shift_norm")}


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_keyword_defaults_that_share_a_flag_name_are_the_flags_defaults(name):
    function, mode = FACTORIES[name]
    defaults = training_modes.script_defaults("train", mode) if mode else training_modes.defaults_of(
        training_modes.FLAGS)
    differing = [
        f"{p.name}={p.default!r} (flag: {defaults[p.name]!r})"
        for p in inspect.signature(function).parameters.values()
        if p.name in defaults and p.default is not inspect.Parameter.empty and p.default is not None
        and p.default != defaults[p.name] and (name, p.name) not in REFERENCE_SIGNATURE_DEFAULTS
    ]
    assert differing == []


def test_the_defaults_check_sees_a_drifted_default():
    def factory(teacher_dropout=0.0, lr=None):
        return teacher_dropout, lr

    defaults = training_modes.defaults_of(training_modes.FLAGS)
    drifted = [p.name for p in inspect.signature(factory).parameters.values()
               if p.default is not None and p.default != defaults[p.name]]
    assert drifted == ["teacher_dropout"]
