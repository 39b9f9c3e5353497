"""Align Your Flow (cm.modes.ayf, training_mode ayf): the EMD loss against flow matching and a hand computation, the
EDM teacher as a flow velocity against a Gaussian's closed form, autoguidance, the configuration checks, exact resume
and sampling from the command line, and a 2-D mixture distilled from its exact EDM denoiser."""

import copy

import numpy as np
import pytest
import torch

from cm import logger
from cm.config import resolve_training_config
from cm.flowmap import FlowMapDenoiser
from cm.karras_diffusion import KarrasDenoiser
from cm.modes.ayf import autoguided, ayf_losses, edm_teacher_velocity, emd_tangent, sample_times
from cm.modes.scm import scm_schedule
from cm.nn import finite_difference_jvp
from cm.sampling import karras_sample
from cm.train_cli import create_argparser, main
from cm.train_util import CMTrainLoop

from helpers import TINY_MODEL, load_script, read_progress, resumes_bit_exactly, tiny_argv
from test_meanflow import Linear2Time, composition_error, sliced_wasserstein
from test_toy2d import CENTERS, STD, WEIGHTS, Mixture

# ----- analytic EDM teachers ---------------------------------------------------------------------------------------


class AnalyticEDMNetwork(torch.nn.Module):
    """The network F(c_in x, c_noise) whose KarrasDenoiser output c_skip x + c_out F is a given exact denoiser
    D(x, sigma) [B, 2] (computed in float64): F = (D - c_skip x) / c_out, sigma = exp(c_noise / 250)."""

    def __init__(self, denoised, edm):
        super().__init__()
        self.denoised, self.edm = denoised, edm

    def forward(self, x_in, c_noise, **kwargs):
        sigma = torch.exp(c_noise.double() / 250)
        c_skip, c_out, c_in = [c[:, None] for c in self.edm.get_scalings(sigma)]
        x = x_in.double() / c_in
        return ((self.denoised(x, sigma[:, None]) - c_skip * x) / c_out).to(x_in.dtype)


def gaussian_denoiser(s):
    """D(x, sigma) = s^2 / (s^2 + sigma^2) x of data N(0, s^2 I)."""
    return lambda x, sigma: s**2 / (s**2 + sigma**2) * x


def mixture_denoiser(x, sigma):
    """E[x | x + sigma e] of the four-Gaussian mixture: the components' posterior means, weighted by their
    responsibilities under N(mu_k, (STD^2 + sigma^2) I)."""
    centers, var = CENTERS.double(), STD**2 + sigma**2
    diff = x[:, None, :] - centers[None]
    responsibility = torch.softmax(torch.log(WEIGHTS.double())[None] - diff.pow(2).sum(-1) / (2 * var), dim=1)
    means = centers[None] + (STD**2 / var)[:, :, None] * diff
    return (responsibility[:, :, None] * means).sum(dim=1)


def test_an_edm_denoiser_is_the_flow_velocity_of_the_linear_path():
    """Data N(0, s^2 I): z_t = (1 - t) x + t e has the velocity E[e - x | z_t] = (t - (1 - t) s^2) / ((1 - t)^2 s^2 +
    t^2) z_t; the EDM teacher (a network under EDM's preconditioning, sigma = t / (1 - t), input z_t / (1 - t)) gives
    it, near t = 0 and t = 1 too."""
    s, edm = 0.7, KarrasDenoiser(sigma_data=0.5)
    velocity = edm_teacher_velocity(AnalyticEDMNetwork(gaussian_denoiser(s), edm), edm)
    z = torch.randn(6, 2, dtype=torch.float64)
    t = torch.tensor([1e-3, 0.1, 0.3, 0.5, 0.9, 1 - 1e-5], dtype=torch.float64)
    exact = ((t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2))[:, None] * z
    torch.testing.assert_close(velocity(z, t), exact, rtol=1e-6, atol=1e-6)


# ----- the loss ----------------------------------------------------------------------------------------------------


def teacher_field(z, t, **kwargs):
    """A smooth stand-in teacher velocity v(z, t)."""
    return torch.tanh(z) * t[:, None] - 0.3 * z.flip(1)


def parameter_gradients(model, loss):
    model.zero_grad()
    loss.backward()
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("warmup", [0.0, 1.0])
def test_at_s_equal_t_the_gradient_is_flow_matching_to_the_teacher(warmup):
    """s = t: g = v_teacher - F, so the loss's gradient is that of ||F - v_teacher||^2 (raw tangent), or of the
    same loss weighted per sample by 1 / (||g|| + c) (normalised tangent); the warm-up factor does not enter."""
    torch.manual_seed(0)
    model, denoiser = Linear2Time(), FlowMapDenoiser()
    x, e, t = torch.randn(32, 2), torch.randn(32, 2), 0.05 + 0.9 * torch.rand(32)
    z = (1 - t[:, None]) * x + t[:, None] * e

    def flow_matching():
        return (model(z, 1000 * t, second_time=torch.zeros(32)) - teacher_field(z, t)).pow(2).sum(dim=1)

    expected = parameter_gradients(model, flow_matching().sum())
    terms = ayf_losses(denoiser, model, x, teacher_field, s=t, t=t, noise=e, warmup=warmup, tangent_norm_c=None)
    for got, want in zip(parameter_gradients(model, terms["loss"].sum()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    squared = flow_matching().detach()
    torch.testing.assert_close(terms["tangent_norm"] ** 2, squared, rtol=1e-5, atol=1e-6)

    expected = parameter_gradients(model, (flow_matching() / (squared.sqrt() + 0.1)).sum())
    terms = ayf_losses(denoiser, model, x, teacher_field, s=t, t=t, noise=e, warmup=warmup, tangent_norm_c=0.1)
    for got, want in zip(parameter_gradients(model, terms["loss"].sum()), expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


class TimeRamp(torch.nn.Module):
    """F(z, t, s) = a t: dF/dt = a (no z dependence), d loss / d a = -2 g_hat t per sample."""

    def __init__(self, a):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))

    def forward(self, z, time, second_time=None, **kwargs):
        return self.a * (time[:, None] / 1000)


def test_the_normalised_tangent_by_hand():
    """F = a t, a = (1, -2), teacher b = (3, 4), t = 0.5, s = 0.1, warm-up 0.5: F = (0.5, -1), dF/dt = (1, -2),
    g = b - F - 0.5 (t - s) dF/dt = (2.3, 5.4), ||g|| = sqrt(34.45); loss = (||g|| / (||g|| + 0.1))^2 and
    d loss / d a = -2 t g / (||g|| + 0.1)."""
    model = TimeRamp([1.0, -2.0])
    terms = ayf_losses(FlowMapDenoiser(), model, torch.zeros(1, 2), lambda z, t: torch.tensor([[3.0, 4.0]]),
                       s=torch.tensor([0.1]), t=torch.tensor([0.5]), warmup=0.5, tangent_norm_c=0.1)
    norm = 34.45**0.5
    torch.testing.assert_close(terms["tangent_norm"], torch.tensor([norm]))
    torch.testing.assert_close(terms["loss"], torch.tensor([(norm / (norm + 0.1)) ** 2]))
    terms["loss"].sum().backward()
    torch.testing.assert_close(model.a.grad, -2 * 0.5 * torch.tensor([2.3, 5.4]) / (norm + 0.1))
    g = emd_tangent(torch.tensor([[3.0, 4.0]]), torch.tensor([[0.5, -1.0]]), torch.tensor([[1.0, -2.0]]),
                    torch.tensor([0.1]), torch.tensor([0.5]), warmup=0.5)
    torch.testing.assert_close(g, torch.tensor([[2.3, 5.4]]))


def test_the_jvp_pass_replays_the_online_dropout_and_only_the_online_pass_has_gradients():
    torch.manual_seed(0)
    model = Linear2Time(dropout=0.5).train()
    seen = []
    model.net[2].register_forward_hook(lambda m, i, out: seen.append((out.detach().clone(), torch.is_grad_enabled())))
    t = torch.rand(16)
    terms = ayf_losses(FlowMapDenoiser(), model, torch.randn(16, 2), teacher_field, s=t * torch.rand(16), t=t)
    (online, grad_online), (jvp_value, grad_jvp) = seen
    assert grad_online and not grad_jvp
    torch.testing.assert_close(online == 0, jvp_value == 0)
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_finite_difference_jvp_gives_the_same_tangent():
    """--jvp finite_difference: dF/dt from two forwards (step relative to t) agrees with forward-mode AD."""
    torch.manual_seed(0)
    model = Linear2Time().double()
    x, e = torch.randn(2, 16, 2, dtype=torch.float64)
    t = 0.2 + 0.7 * torch.rand(16, dtype=torch.float64)
    common = dict(s=t * torch.rand(16, dtype=torch.float64), t=t, noise=e, tangent_norm_c=None)
    exact = ayf_losses(FlowMapDenoiser(), model, x, teacher_field, **common)
    differences = ayf_losses(FlowMapDenoiser(), model, x, teacher_field, jvp_fn=finite_difference_jvp, **common)
    torch.testing.assert_close(differences["tangent_norm"], exact["tangent_norm"], rtol=1e-4, atol=1e-5)


def test_times_are_ordered_below_one_for_both_samplers():
    torch.manual_seed(0)
    for sampler in ("pair", "gap"):
        s, t = sample_times(20000, -0.8, 1.0, sampler)
        assert (s <= t).all() and (s >= 0).all() and (t < 1).all() and (t > 0).all()
    s, t = sample_times(20000, -0.8, 1.0, "gap")
    gap = torch.logit(t - s)
    assert abs(gap.mean().item() + 0.8) < 0.03 and abs(gap.std().item() - 1.0) < 0.03
    with pytest.raises(ValueError, match="ayf_time_sampler"):
        sample_times(2, sampler="uniform")


def test_autoguidance_extrapolates_from_the_weak_teacher():
    strong, weak = (lambda z, t: z + 1.0), (lambda z, t: z - 1.0)
    z, t = torch.randn(3, 2), torch.rand(3)
    torch.testing.assert_close(autoguided(strong, weak, 2.5)(z, t), weak(z, t) + 2.5 * (strong(z, t) - weak(z, t)))
    torch.testing.assert_close(autoguided(strong, weak, 1.0)(z, t), strong(z, t))


# ----- the mode from the command line ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    """A two-step EDM checkpoint of the tiny digits network (one time input)."""
    log_dir = tmp_path_factory.mktemp("edm")
    main("edm", tiny_argv(log_dir=log_dir, total_training_steps=2, save_interval=1))
    return str(log_dir / "model000002.pt")


def test_configuration_checks():
    config = resolve_training_config(create_argparser("ayf").parse_args(tiny_argv(teacher_model_path="t.pt")))
    assert config["network"]["second_time_embed"] and not config["teacher"]["network"]["second_time_embed"]
    assert config["student_init"] == "random" and config["schedule"]["tangent_warmup_steps"] == 10000
    assert config["teacher"]["solver"] is None and config["teacher"]["denoiser"]["distillation"] is False
    assert config["loss"]["ayf_time_mean"] == -0.8 and config["loss"]["ayf_tangent_norm_c"] == 0.1
    for flags, message in ((dict(second_time_embed="false"), "--second_time_embed true"),
                           (dict(init_from_teacher="true"), "--init_from_teacher false"),
                           (dict(ayf_guidance_w=2.0), "--weak_teacher_model_path"),
                           (dict(weak_teacher_model_path="weak.pt"), "--ayf_guidance_w"),
                           (dict(ayf_time_std=0.0), "ayf_time_std")):
        args = create_argparser("ayf").parse_args(tiny_argv(teacher_model_path="t.pt", **flags))
        with pytest.raises(ValueError, match=message):
            resolve_training_config(args)
    with pytest.raises(ValueError, match="--teacher_model_path"):
        resolve_training_config(create_argparser("ayf").parse_args(tiny_argv()))


def test_resume_mid_run_is_bit_exact(tmp_path, teacher_path):
    same, names = resumes_bit_exactly("ayf", tmp_path, teacher_model_path=teacher_path, dropout=0.1,
                                      tangent_warmup_steps=2, ema_rate="0.9,0.99")
    assert same and "model000002.pt" in names and "opt000002.pt" in names


def test_autoguidance_runs_the_weak_teacher_and_a_missing_one_stops_with_one_line(tmp_path, teacher_path, capsys):
    """One step, same seed: the teacher guided by itself (w = 2) gives the unguided loss; guided by its step-1
    checkpoint, another loss."""
    def first_loss(name, **flags):
        # the per-rank draws of seed 0, on which the weaker guide moves the one-step loss by 1.7% (on other draws of
        # this batch of 4, by 0.03-0.25%)
        main("ayf", tiny_argv(log_dir=tmp_path / name, total_training_steps=1, teacher_model_path=teacher_path,
                              sample_indexed_rng="false", **flags))
        return float(read_progress(tmp_path / name)[0]["loss"])

    plain = first_loss("plain")
    by_itself = first_loss("itself", weak_teacher_model_path=teacher_path, ayf_guidance_w=2.0)
    by_weaker = first_loss("weaker", weak_teacher_model_path=teacher_path.replace("000002", "000001"),
                           ayf_guidance_w=2.0)
    assert by_itself == pytest.approx(plain, rel=1e-4) and by_weaker != pytest.approx(plain, rel=1e-2)
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main("ayf", tiny_argv(log_dir=tmp_path / "missing", total_training_steps=1, teacher_model_path=teacher_path,
                              weak_teacher_model_path=str(tmp_path / "nothing.pt"), ayf_guidance_w=2.0))
    assert info.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: weak teacher checkpoint") and "does not exist" in err


def test_image_sample_draws_an_ayf_checkpoint_with_the_flow_map_samplers(tmp_path, teacher_path):
    main("ayf", tiny_argv(log_dir=tmp_path / "run", total_training_steps=1, teacher_model_path=teacher_path))
    image_sample = load_script("image_sample")
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    checkpoint = str(tmp_path / "run" / "model000001.pt")
    flags += ["--second_time_embed=true", "--training_mode=ayf", "--model_path", checkpoint]
    images = {}
    for sampler, steps in (("meanflow", 2), ("meanflow_onestep", 1)):
        path = image_sample.main(flags + ["--sampler", sampler, "--steps", str(steps), "--num_samples", "3",
                                          "--log_dir", str(tmp_path / sampler)])
        with np.load(path) as data:
            images[sampler] = data["arr_0"]
    assert images["meanflow"].shape == images["meanflow_onestep"].shape == (3, 8, 8, 3)
    assert not (images["meanflow"] == images["meanflow_onestep"]).all()


# ----- 2-D mixture -------------------------------------------------------------------------------------------------

# (t, s) spread wider than AYF's image setting (-0.8, 1.0), so that these few steps see long jumps
AYF_OPTIONS = dict(ayf_time_sampler="pair", ayf_time_mean=0.0, ayf_time_std=1.6, ayf_tangent_norm_c=0.1,
                   weak_teacher_model_path="", ayf_guidance_w=1.0)


def distil(model, steps, schedule_fn, tmp_path, lr=3e-3):
    """AYF on the mixture from its exact EDM denoiser, continuing from `model`'s weights; returns the EMA network."""
    logger.configure(dir=str(tmp_path), format_strs=[])
    edm = KarrasDenoiser()
    loop = CMTrainLoop(model=model, diffusion=FlowMapDenoiser(), data=Mixture(256), batch_size=256, microbatch=-1,
                       lr=lr, ema_rate="0.99", log_interval=10**9, save_interval=-1, resume_checkpoint="",
                       optimizer="adam", total_training_steps=steps, lr_anneal_steps=steps, progress=False,
                       channels_last=False, target_model=None, teacher_model=AnalyticEDMNetwork(mixture_denoiser, edm),
                       teacher_diffusion=edm, training_mode="ayf", schedule_fn=schedule_fn, loss_options=AYF_OPTIONS)
    loop.run_loop()
    ema = copy.deepcopy(model)
    ema.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return ema


def test_a_2d_mixture_is_distilled_into_a_flow_map_that_composes(tmp_path):
    """From the mixture's exact EDM denoiser: AYF brings one and two jumps far closer to the mixture (sliced
    Wasserstein distance) than the untrained network, and shrinks the composition error |f(f(z, t, s), s, u) -
    f(z, t, u)| (relative to the jump) of the warm-up's start (w = 0: flow matching to the teacher, whose jumps are
    Euler steps). The untrained network composes by accident: its nearly constant output is a constant field's map."""
    torch.manual_seed(0)
    model = Linear2Time()
    untrained = copy.deepcopy(model)
    velocity = distil(model, 150, lambda step: {"tangent_warmup": 0.0}, tmp_path / "flow_matching")
    flow_map = distil(model, 350, scm_schedule(50, 350), tmp_path / "ayf")
    denoiser = FlowMapDenoiser()
    for jumps in (1, 2):
        distance = {}
        for name, network in (("untrained", untrained), ("flow_map", flow_map)):
            torch.manual_seed(123)
            samples = karras_sample(denoiser, network, (4000, 2), steps=jumps, sampler="meanflow", clamp=False)
            distance[name] = sliced_wasserstein(samples)
        assert distance["flow_map"] < 0.7 * distance["untrained"], (jumps, distance)
    assert composition_error(denoiser, flow_map) < 0.8 * composition_error(denoiser, velocity)
