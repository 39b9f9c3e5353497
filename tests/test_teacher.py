"""The teacher as the reference runs it: eval mode unless asked, the student's start logged, and a stochastic
teacher's dropout never replayed by the next step."""

import pytest
import torch

from cm.karras_diffusion import KarrasDenoiser
from cm.random_util import DeviceRNG
from cm.train_cli import build_loop, create_argparser, main

from helpers import clone, state_equal, tiny_argv, tiny_model_and_diffusion


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    log_dir = tmp_path_factory.mktemp("edm")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=2, dropout=0.1))
    return str(log_dir / "model000002.pt")


def cd_loop(tmp_path, teacher_path, **flags):
    flags = dict(log_dir=tmp_path, teacher_model_path=teacher_path, total_training_steps=1, loss_norm="l2",
                 teacher_dropout=0.1, **flags)
    return main("consistency_distillation", tiny_argv(**flags))


def test_the_teacher_runs_in_eval_mode_as_the_reference(tmp_path, teacher_path, capsys):
    loop = cd_loop(tmp_path, teacher_path)
    assert not loop.teacher_model.training
    assert "eval mode, no dropout, as the reference" in capsys.readouterr().out


def test_a_stochastic_teacher_is_an_explicit_choice(tmp_path, teacher_path, capsys):
    loop = cd_loop(tmp_path, teacher_path, teacher_stochastic="true")
    assert loop.teacher_model.training
    assert "dropout 0.1 active (--teacher_stochastic true)" in capsys.readouterr().out


def build(mode, **flags):
    return build_loop(create_argparser(mode).parse_args(tiny_argv(loss_norm="l2", **flags)))


def test_consistency_training_with_a_teacher_path_starts_from_the_teacher(tmp_path, teacher_path, capsys):
    loop = build("consistency_training", log_dir=tmp_path, teacher_model_path=teacher_path)
    assert loop.teacher_model is None  # consistency training never runs the teacher
    assert "the reference's behaviour for --teacher_model_path" in capsys.readouterr().out
    scratch = build("consistency_training", log_dir=tmp_path / "scratch", teacher_model_path=teacher_path,
                    init_from_teacher="false")
    teacher = torch.load(teacher_path, weights_only=True)
    assert state_equal(loop.model.state_dict(), teacher) and not state_equal(scratch.model.state_dict(), teacher)
    assert "student starts from a random initialisation" in capsys.readouterr().out


class RecordingRNG(DeviceRNG):
    """DeviceRNG that remembers the first state it handed out (the state before the online pass)."""

    def __init__(self, device):
        super().__init__(device)
        self.first = None

    def get_state(self):
        state = super().get_state()
        if self.first is None:
            self.first = state
        return state


def test_the_next_step_does_not_replay_a_stochastic_teachers_dropout():
    torch.manual_seed(0)
    model, _ = tiny_model_and_diffusion(dropout=0.0)  # the online and target passes draw nothing
    teacher, teacher_diffusion = tiny_model_and_diffusion(dropout=0.5)
    teacher.train()
    diffusion = KarrasDenoiser(distillation=True, loss_norm="l2")
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    rng = RecordingRNG("cpu")
    diffusion.consistency_losses(model, x, 10, target_model=clone(model), teacher_model=teacher,
                                 teacher_diffusion=teacher_diffusion, rng=rng)
    # the teacher drew dropout masks after the snapshot: the stream must continue past them
    assert not torch.equal(torch.get_rng_state(), rng.first["cpu"])
