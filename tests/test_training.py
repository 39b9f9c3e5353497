import os

import pytest
import torch

from cm import checkpoint_io, train_util
from cm.fp16_util import MixedPrecisionTrainer
from cm.image_datasets import load_data
from cm.schedules import create_ema_and_scales_fn
from cm.train_cli import main
from cm.train_util import CMTrainLoop, TrainLoop, find_resume_checkpoint

from helpers import clone, quiet_logger, read_progress, state_equal, tiny_argv, tiny_model_and_diffusion


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A few-step EDM teacher checkpoint of the tiny digits model."""
    log_dir = tmp_path_factory.mktemp("edm")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=2))
    return str(log_dir / "model000002.pt")


def cm_loop(log_dir, steps, mode="consistency_training", teacher=None, sched=None, **kw):
    quiet_logger(str(log_dir))
    torch.manual_seed(0)
    model, diffusion = tiny_model_and_diffusion(distillation=True, loss_norm=kw.pop("loss_norm", "l2"))
    sched = sched or dict(target_ema_mode="adaptive", start_ema=0.9, scale_mode="progressive", start_scales=2, end_scales=20)
    return CMTrainLoop(
        model=model,
        diffusion=diffusion,
        target_model=clone(model),
        teacher_model=teacher,
        teacher_diffusion=None,
        training_mode=mode,
        ema_scale_fn=create_ema_and_scales_fn(**sched, total_steps=steps, distill_steps_per_iter=0),
        total_training_steps=steps,
        data=load_data(data_dir="digits", batch_size=4, image_size=8, seed=kw.pop("seed", 0)),
        batch_size=4,
        microbatch=kw.pop("microbatch", -1),
        lr=1e-3,
        ema_rate="0.9,0.99",
        log_interval=1,
        save_interval=kw.pop("save_interval", -1),
        resume_checkpoint="",
        optimizer=kw.pop("optimizer", "adam"),
        progress=False,
        **kw,
    )


@pytest.mark.parametrize("mode", ["consistency_distillation", "consistency_training", "progdist"])
def test_every_training_mode_runs_from_the_command_line(tmp_path, teacher_path, mode):
    extra = dict(total_training_steps=2, loss_norm="l2")
    if mode != "consistency_training":
        extra["teacher_model_path"] = teacher_path
    if mode == "progdist":
        extra.update(scale_mode="progdist", start_scales=4, distill_steps_per_iter=1)
    loop = main(mode, tiny_argv(log_dir=tmp_path, **extra))
    assert loop.step == 2
    names = set(os.listdir(tmp_path))
    assert {"model000002.pt", "opt000002.pt", "state000002.pt", "ema_0.9999_000002.pt", "config.json"} <= names
    assert ("target_model000002.pt" in names) == (mode != "progdist")
    assert ("teacher_model000002.pt" in names) == (mode == "progdist")
    ckpt = torch.load(tmp_path / "model000002.pt", weights_only=True)
    assert set(ckpt) == set(loop.model.state_dict())


def test_progdist_halves_n_and_promotes_the_student(tmp_path, teacher_path):
    loop = main(
        "progdist",
        tiny_argv(log_dir=tmp_path, teacher_model_path=teacher_path, total_training_steps=3, scale_mode="progdist",
                  start_scales=4, distill_steps_per_iter=1, loss_norm="l2"),
    )
    rows = read_progress(tmp_path)
    assert [int(r["num_scales"]) for r in rows] == [4, 2, 2]
    # at step 2 (N 4 -> 2) the teacher became the student of step 1; the student moved on once since
    assert not state_equal(loop.teacher_model.state_dict(), loop.model.state_dict())


NORM_SOLVER_CASES = [
    (norm, solver)
    for norm in ("l1", "l2", "l2-32", "pseudo-huber", "lpips")
    for solver in ("heun", "euler", None)
    if not (norm == "lpips" and solver == "euler")  # LPIPS is slow; heun and CT cover its paths
]


@pytest.mark.parametrize("loss_norm,solver", NORM_SOLVER_CASES)
def test_consistency_losses_for_every_norm_and_teacher_solver(loss_norm, solver):
    model, diffusion = tiny_model_and_diffusion(distillation=True, loss_norm=loss_norm)
    diffusion.lpips_pretrained = False
    teacher, teacher_diffusion = tiny_model_and_diffusion()
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    terms = diffusion.consistency_losses(
        model, x, 10, target_model=clone(model),
        teacher_model=teacher if solver else None, teacher_diffusion=teacher_diffusion, teacher_solver=solver or "heun",
    )
    assert terms["loss"].shape == (2,) and torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_edm_loss_falls_on_digits(tmp_path):
    main("edm", tiny_argv(log_dir=tmp_path, total_training_steps=100, batch_size=16, lr=2e-3))
    losses = [float(r["loss"]) for r in read_progress(tmp_path)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.6 * first, (first, last)


def test_target_ema_and_num_scales_follow_the_schedule(tmp_path):
    loop = cm_loop(tmp_path, 6)
    target = clone(loop.target_model)
    online_before = [p.detach().clone() for p in loop.model.parameters()]
    loop.run_loop()
    fn = loop.ema_scale_fn
    rows = read_progress(tmp_path)
    assert [int(r["num_scales"]) for r in rows] == [fn(k)[1] for k in range(6)]
    assert [float(r["target_ema"]) for r in rows] == pytest.approx([fn(k)[0] for k in range(6)])
    assert fn(0)[1] == 2 and fn(5)[1] > 2
    # the target moved towards the online network but is not equal to it
    assert not state_equal(target.state_dict(), loop.target_model.state_dict())
    assert not all(torch.equal(a, b) for a, b in zip(online_before, loop.model.parameters()))


def test_target_follows_mu_exactly_for_one_step(tmp_path):
    sched = dict(target_ema_mode="fixed", start_ema=0.75, scale_mode="fixed", start_scales=10, end_scales=10)
    loop = cm_loop(tmp_path, 1, sched=sched)
    before = [p.detach().clone() for p in loop.target_model.parameters()]
    loop.run_loop()
    for b, t, p in zip(before, loop.target_model.parameters(), loop.model.parameters()):
        assert torch.allclose(t, 0.75 * b + 0.25 * p, atol=1e-6)


def test_resume_continues_the_same_trajectory(tmp_path):
    straight = cm_loop(tmp_path / "a", 6, save_interval=3)
    straight.run_loop()

    first = cm_loop(tmp_path / "b", 6, save_interval=3)
    first.total_training_steps = 3  # killed after the checkpoint of step 3
    first.run_loop()
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = cm_loop(tmp_path / "b", 6, save_interval=3)
    assert resumed.step == 3
    resumed.run_loop()

    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())
    assert state_equal(straight.target_model.state_dict(), resumed.target_model.state_dict())
    for a, b in zip(straight.ema_params, resumed.ema_params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    sa, sb = straight.opt.state_dict()["state"], resumed.opt.state_dict()["state"]
    assert all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)


def test_a_checkpoint_interrupted_mid_write_is_never_resumed_from(tmp_path, monkeypatch):
    loop = cm_loop(tmp_path, 4, save_interval=2)
    real_replace = os.replace

    def crash_on_second_model_file(src, dst):
        if os.path.basename(dst) == "model000004.pt":
            raise KeyboardInterrupt("killed while writing")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint_io.os, "replace", crash_on_second_model_file)
    with pytest.raises(KeyboardInterrupt):
        loop.run_loop()
    monkeypatch.setattr(checkpoint_io.os, "replace", real_replace)
    assert "state000004.pt" in os.listdir(tmp_path)  # companions of step 4 were written ...
    assert find_resume_checkpoint(str(tmp_path), [0.9, 0.99], ("target_model",)).endswith("model000002.pt")
    resumed = cm_loop(tmp_path, 4)
    assert resumed.step == 2


class QueuedSigmas:
    """Hands out a fixed sequence of noise levels, chunk by chunk."""

    def __init__(self, sigmas):
        self.sigmas = sigmas

    def sample(self, n, device):
        out, self.sigmas = self.sigmas[:n], self.sigmas[n:]
        return out, torch.ones(n)


def test_microbatch_gradients_average_like_the_full_batch(tmp_path):
    """EDM loss with noise and sigmas fixed per sample: accumulating 2 chunks equals one pass over 4."""
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    grads = []
    for micro in (-1, 2):
        quiet_logger(str(tmp_path / str(micro)))
        torch.manual_seed(0)
        model, diffusion = tiny_model_and_diffusion()
        real = diffusion.training_losses
        diffusion.training_losses = lambda m, x, s, model_kwargs=None, noise=None: real(m, x, s, model_kwargs, torch.sin(1000 * x))
        loop = TrainLoop(model=model, diffusion=diffusion, data=None, batch_size=4, microbatch=micro, lr=1e-3,
                         ema_rate="0.9", log_interval=1, save_interval=-1, resume_checkpoint="", optimizer="adam",
                         schedule_sampler=QueuedSigmas(torch.linspace(0.1, 5.0, 4)), progress=False)
        loop.forward_backward(x, {})
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-4)


def test_fp16_inf_gradient_skips_the_step_and_lowers_the_loss_scale():
    model = torch.nn.Linear(3, 2)
    trainer = MixedPrecisionTrainer(model=model, use_fp16=True, initial_lg_loss_scale=10.0)
    for name in ("adam", "radam"):
        opt = train_util.make_optimizer(name, trainer.master_params, 0.1, 0.0)
        before = [p.detach().clone() for p in model.parameters()]
        trainer.zero_grad()
        trainer.backward(model(torch.randn(4, 3)).sum())
        model.weight.grad[0, 0] = float("inf")
        scale = float(trainer.lg_loss_scale)
        took_step = trainer.optimize(opt)  # the reference's meaning: False for a skipped step
        assert not took_step and float(trainer.found_inf) == 1.0
        assert float(trainer.lg_loss_scale) == scale - 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        # a good step afterwards moves the weights and grows the scale by fp16_scale_growth
        trainer.zero_grad()
        trainer.backward(model(torch.randn(4, 3)).sum())
        assert trainer.optimize(opt) and float(trainer.found_inf) == 0.0
        assert float(trainer.lg_loss_scale) == pytest.approx(scale - 1 + 1e-3)
        assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))

def test_adam_betas_reach_the_optimizer_and_bad_pairs_are_one_line(tmp_path):
    assert train_util.parse_betas("0.9,0.95") == (0.9, 0.95)
    for bad in ("0.9", "0.9,1.0", "a,b", "0.9,0.95,0.99"):
        with pytest.raises(ValueError, match="--adam_betas must be two numbers"):
            train_util.parse_betas(bad)
    loop = main("edm", tiny_argv(log_dir=tmp_path, total_training_steps=1, optimizer="adam", adam_betas="0.9,0.95"))
    assert loop.opt.param_groups[0]["betas"] == (0.9, 0.95)
    default = train_util.make_optimizer("radam", [torch.nn.Parameter(torch.zeros(2))], 1e-4, 0.0)
    assert default.param_groups[0]["betas"] == (0.9, 0.999)  # the reference's RAdam



def test_fp16_gradients_are_unscaled_before_the_update():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 3)
    for model, fp16 in ((a, False), (b, True)):
        trainer = MixedPrecisionTrainer(model=model, use_fp16=fp16)
        opt = torch.optim.SGD(trainer.master_params, lr=0.1)
        trainer.backward(model(x).square().sum())
        trainer.optimize(opt)
    assert torch.allclose(a.weight, b.weight, atol=1e-6)


def test_nan_loss_is_skipped_then_stops_with_one_error_and_an_intact_checkpoint(tmp_path):
    loop = cm_loop(tmp_path, 20, save_interval=2, max_consecutive_skips=3)
    forward = loop.model.forward
    calls = {"n": 0}

    def poisoned(x, t, **kw):
        calls["n"] += 1
        out = forward(x, t, **kw)
        return out * float("nan") if loop.step >= 2 else out

    loop.model.forward = poisoned
    with pytest.raises(FloatingPointError, match="NaN/inf for 3 consecutive steps"):
        loop.run_loop()
    assert all(torch.isfinite(p).all() for p in loop.model.parameters())
    rows = read_progress(tmp_path)
    assert float(rows[-1]["skipped"]) == 1.0
    ckpt = torch.load(tmp_path / "model000004.pt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in ckpt.values())


def test_bf16_autocast_trains(tmp_path):
    loop = cm_loop(tmp_path, 2, use_bf16=True)
    loop.run_loop()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in loop.model.parameters())


def test_learning_rate_warms_up_then_decays(tmp_path):
    loop = cm_loop(tmp_path, 6, lr_warmup_steps=3, lr_anneal_steps=6)
    seen = []
    for _ in range(6):
        seen.append(loop.opt.param_groups[0]["lr"])
        loop.run_step(*next(loop.data))
    expected = [1e-3 * min(1, (k + 1) / 3) * (1 - k / 6) for k in range(6)]
    assert seen == pytest.approx(expected)
