"""MeanFlow (cm.modes.meanflow, training_mode meanflow) and flow maps (cm.flowmap): two-time networks that load
one-time checkpoints, the loss at r = t is flow matching, the target is exact at an analytic flow, the samplers,
exact resume from the command line, and a 2-D mixture recovered in one and two jumps."""

import copy

import numpy as np
import pytest
import torch

from cm import logger
from cm.config import resolve_training_config
from cm.flowmap import FlowMapDenoiser, flow_grid, flow_interpolate, sample_flow_map, sigma_to_flow_time
from cm.modes.meanflow import (
    adaptive_weighted,
    average_velocity_jvp,
    meanflow_losses,
    meanflow_schedule,
    meanflow_target,
    sample_times,
)
from cm.networks import create_model
from cm.sampling import karras_sample
from cm.train_cli import create_argparser, main
from cm.train_util import CMTrainLoop

from helpers import TINY_MODEL, load_script, read_progress, state_equal, tiny_argv
from test_toy2d import CENTERS, STD, WEIGHTS, Mixture, mode_statistics

# ----- two-time networks ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["adm", "ncsnpp", "dit"])
def test_second_time_is_off_by_default_and_adds_only_its_own_embedding(model_type):
    kw = dict(image_size=8, num_channels=32, num_res_blocks=1, channel_mult="1,2", attention_resolutions="4",
              model_type=model_type)
    if model_type == "ncsnpp":
        kw.update(fir=True, fir_kernel="1,3,3,1", skip_rescale=True, resblock_type="biggan", progressive="none",
                  progressive_input="residual", progressive_combine="sum", embedding_type="positional",
                  fourier_scale=16.0, init_scale=0.0, resamp_with_conv=True)
    if model_type == "dit":
        kw.update(dit_size="2x64x4/2")
    one, two = create_model(**kw), create_model(**kw, second_time_embed=True)
    keys_one, keys_two = set(one.state_dict()), set(two.state_dict())
    assert keys_one < keys_two
    new = ("second_time_embed", "second_time_mlp", "second_time_embedder")
    assert all(k.split(".")[0] in new for k in keys_two - keys_one)
    # a one-time checkpoint loads into the one-time network unchanged, and into the two-time one but for the new MLP
    one.load_state_dict(create_model(**kw).state_dict())
    missing = two.load_state_dict(one.state_dict(), strict=False).missing_keys
    assert set(missing) == keys_two - keys_one
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([10.0, 500.0])
    with pytest.raises(ValueError, match="second_time_embed"):
        one(x, t, second_time=t)
    with pytest.raises(ValueError, match="second_time_embed"):
        two(x, t)


# ----- the loss ------------------------------------------------------------------------------------------------


class Linear2Time(torch.nn.Module):
    """A small two-time network on 2-D points, MLP of z, t / 1000 and h / 1000 (the FlowMapDenoiser's inputs)."""

    def __init__(self, width=128, dropout=0.0):
        super().__init__()
        self.register_buffer("freqs", 2.0 ** torch.arange(4))
        self.net = torch.nn.Sequential(
            torch.nn.Linear(2 + 18, width), torch.nn.SiLU(), torch.nn.Dropout(dropout),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, width), torch.nn.SiLU(),
            torch.nn.Linear(width, 2),
        )

    def forward(self, z, time, second_time=None, **kwargs):
        t, h = time[:, None] / 1000, second_time[:, None] / 1000
        a, b = t * self.freqs, h * self.freqs
        return self.net(torch.cat([z, t, h, torch.cos(a), torch.sin(a), torch.cos(b), torch.sin(b)], dim=1))


def test_times_are_ordered_and_equal_off_the_ratio():
    torch.manual_seed(0)
    r, t = sample_times(20000, -0.4, 1.0, ratio=0.25)
    assert (r <= t).all() and ((t > 0) & (t < 1)).all()
    assert abs((r < t).float().mean().item() - 0.25) < 0.015
    r, t = sample_times(1000, ratio=0.0)
    assert torch.equal(r, t)
    with pytest.raises(ValueError, match="meanflow_ratio"):
        sample_times(4, ratio=1.5)


def test_at_r_equal_t_the_loss_is_flow_matching():
    """r = t: u_tgt = v and the loss with p = 0 is ||F(z_t, t, 0) - (e - x)||^2 exactly."""
    torch.manual_seed(0)
    model, denoiser = Linear2Time(), FlowMapDenoiser()
    x, e = torch.randn(64, 2), torch.randn(64, 2)
    t = torch.rand(64)
    terms = meanflow_losses(denoiser, model, x, r=t, t=t, noise=e, p=0.0)
    z = (1 - t[:, None]) * x + t[:, None] * e
    flow_matching = (model(z, 1000 * t, second_time=torch.zeros(64)) - (e - x)).pow(2).sum(dim=1)
    torch.testing.assert_close(terms["loss"], flow_matching, rtol=1e-6, atol=1e-6)


def test_the_adaptive_weight_is_a_stopped_gradient():
    err = torch.tensor([0.5, 4.0], requires_grad=True)
    loss = adaptive_weighted(err, p=0.75, eps=1e-3)
    loss.sum().backward()
    torch.testing.assert_close(err.grad, (err.detach() + 1e-3) ** -0.75)


class PointMassFlow(torch.nn.Module):
    """The exact average velocity of data at one point x0: z_t = (1 - t) x0 + t e, so e = (z - (1 - t) x0) / t,
    z_r = (1 - r) x0 + r e, u = (z_t - z_r) / (t - r) = (z - x0) / t, for every r < t (and v = u at r = t)."""

    def __init__(self, x0):
        super().__init__()
        self.register_buffer("x0", x0)

    def forward(self, z, time, second_time=None, **kwargs):
        t = time[:, None] / 1000
        return (z - self.x0) / t


def test_the_target_at_an_analytic_flow_is_the_average_velocity():
    """At the exact u of a point mass, the JVP's du/dt and the target v - (t - r) du/dt give u itself (MeanFlow
    Eq. 6), for r < t and r = t, and the loss is zero."""
    torch.manual_seed(0)
    x0 = torch.tensor([0.3, -0.7])
    model, denoiser = PointMassFlow(x0), FlowMapDenoiser()
    x, e = x0.expand(32, 2), torch.randn(32, 2)
    t = 0.2 + 0.8 * torch.rand(32)
    r = torch.where(torch.arange(32) % 2 == 0, t * torch.rand(32), t)
    z = flow_interpolate(x, e, t)
    v = e - x
    u, du_dt = average_velocity_jvp(denoiser, model, z, r, t, v)
    # d/dt (z_t - x0) / t along the path = (v t - (z - x0)) / t^2, computed by hand
    torch.testing.assert_close(du_dt, (v * t[:, None] - (z - x0)) / t[:, None] ** 2, rtol=1e-5, atol=1e-5)
    z_r = flow_interpolate(x, e, r)
    exact = torch.where((t > r)[:, None], (z - z_r) / (t - r).clamp(min=1e-12)[:, None], v)
    torch.testing.assert_close(meanflow_target(v, du_dt, r, t), exact, rtol=1e-4, atol=1e-4)
    terms = meanflow_losses(denoiser, model, x, r=r, t=t, noise=e, p=0.0)
    assert terms["loss"].max() < 1e-8


def test_the_jvp_pass_replays_the_online_dropout_and_only_the_online_pass_has_gradients():
    torch.manual_seed(0)
    model, denoiser = Linear2Time(dropout=0.5).train(), FlowMapDenoiser()
    x = torch.randn(16, 2)
    t = torch.rand(16)
    r = t * torch.rand(16)
    seen = []

    def hook(module, inputs, output):
        seen.append((output.detach().clone(), torch.is_grad_enabled()))

    model.net[2].register_forward_hook(hook)
    terms = meanflow_losses(denoiser, model, x, r=r, t=t, p=0.0)
    (online, grad_online), (jvp_value, grad_jvp) = seen
    assert grad_online and not grad_jvp
    torch.testing.assert_close((online == 0), (jvp_value == 0))  # the same dropout mask
    terms["loss"].mean().backward()
    assert all(p.grad is not None for p in model.parameters())


class LabelVelocity(torch.nn.Module):
    """u(z, r, t | y) = a[y], a constant per label (label 3 the null one), so du/dt = 0 and u_tgt = v or v_g."""

    null_label = 3

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-1.0, 1.0], [0.5, 0.5]]))

    def forward(self, z, time, second_time=None, y=None):
        return self.a[y].expand_as(z)


def test_guidance_is_trained_into_the_target_on_labelled_samples_inside_its_interval():
    """v_g = w v + k u(z, t, t | c) + (1 - w - k) u(z, t, t | null) where y != null and t in [t_min, t_max]; the
    plain v elsewhere (MeanFlow's guided target)."""
    torch.manual_seed(0)
    model, denoiser = LabelVelocity(), FlowMapDenoiser()
    x, e = torch.randn(6, 2), torch.randn(6, 2)
    t = torch.tensor([0.3, 0.5, 0.9, 0.5, 0.2, 0.6])
    y = torch.tensor([0, 1, 2, 3, 0, 1])  # sample 3 has the null label; 2 and 4 lie outside [0.25, 0.8]
    guidance = dict(w=2.0, k=0.5, t_min=0.25, t_max=0.8)
    terms = meanflow_losses(denoiser, model, x, r=t * 0.5, t=t, noise=e, model_kwargs={"y": y}, p=0.0,
                            guidance=guidance)
    a, v = model.a.detach(), e - x
    guided = 2.0 * v + 0.5 * a[y] + (1 - 2.0 - 0.5) * a[3]
    inside = torch.tensor([True, True, False, False, False, True])
    target = torch.where(inside[:, None], guided, v)
    torch.testing.assert_close(terms["loss"], (a[y] - target).pow(2).sum(dim=1))
    with pytest.raises(ValueError, match="null"):
        args = create_argparser("meanflow").parse_args(tiny_argv(meanflow_cfg_w=2.0))
        resolve_training_config(args)


# ----- samplers --------------------------------------------------------------------------------------------------


def test_flow_grids_and_the_sampler_walk_exact_jumps():
    assert sigma_to_flow_time(flow_grid(2)).tolist() == [1.0, 0.5, 0.0]
    assert sigma_to_flow_time(flow_grid(4, ts=(0, 3))).tolist() == [1.0, 0.25, 0.0]
    with pytest.raises(ValueError, match="increasing"):
        flow_grid(4, ts=(1, 3))
    # the point mass's flow map sends every noise to x0 in one jump, and in two
    x0 = torch.tensor([0.3, -0.7])
    model, denoiser = PointMassFlow(x0), FlowMapDenoiser()
    for steps in (1, 2, 3):
        out = karras_sample(denoiser, model, (8, 2), steps=steps, sampler="meanflow", clamp=False,
                            device="cpu")
        torch.testing.assert_close(out, x0.expand(8, 2), rtol=1e-5, atol=1e-5)
    out = karras_sample(denoiser, model, (8, 2), steps=5, sampler="meanflow_onestep", clamp=False, device="cpu")
    torch.testing.assert_close(out, x0.expand(8, 2), rtol=1e-5, atol=1e-5)
    # EDM's samplers see the one-jump data estimate D(x, sigma) = x0
    out = karras_sample(denoiser, model, (8, 2), steps=4, sampler="euler", clamp=False, sigma_max=80.0,
                       device="cpu")
    torch.testing.assert_close(out, x0.expand(8, 2), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="flow_map"):
        sample_flow_map(None, torch.randn(2, 2), flow_grid(1))


# ----- the training mode from the command line ---------------------------------------------------------------------


def meanflow_argv(log_dir, steps, **extra):
    flags = dict(log_dir=log_dir, total_training_steps=steps, save_interval=3, dropout=0.1, ema_rate="0.9,0.99",
                 meanflow_ratio=0.75, meanflow_adaptive_p=0.75)
    return tiny_argv(**{**flags, **extra})


def test_configuration_needs_the_two_time_network():
    args = create_argparser("meanflow").parse_args(tiny_argv(second_time_embed="false"))
    with pytest.raises(ValueError, match="--second_time_embed true"):
        resolve_training_config(args)
    config = resolve_training_config(create_argparser("meanflow").parse_args(tiny_argv()))
    assert config["network"]["second_time_embed"] and config["loss"]["meanflow_ratio"] == 0.25
    assert meanflow_schedule(10)(3) == {}


def test_resume_mid_run_is_bit_exact(tmp_path):
    straight = main("meanflow", meanflow_argv(tmp_path / "a", 4))
    assert isinstance(straight.diffusion, FlowMapDenoiser)
    main("meanflow", meanflow_argv(tmp_path / "b", 3))
    torch.manual_seed(12345)  # a restarted process has other RNG states until resume restores them
    resumed = main("meanflow", meanflow_argv(tmp_path / "b", 4))
    assert resumed.step == 4
    assert state_equal(straight.model.state_dict(), resumed.model.state_dict())
    for a, b in zip(straight.ema_params, resumed.ema_params):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    rows_a, rows_b = read_progress(tmp_path / "a"), read_progress(tmp_path / "b")
    assert [r["loss"] for r in rows_a[3:]] == [r["loss"] for r in rows_b[-1:]]
    assert {"mse", "t", "r"} <= set(rows_a[0])


def test_image_sample_draws_a_checkpoint_in_one_and_two_jumps(tmp_path):
    main("meanflow", meanflow_argv(tmp_path / "run", 1, save_interval=-1))
    image_sample = load_script("image_sample")
    checkpoint = str(tmp_path / "run" / "ema_0.9_000001.pt")
    flags = [f"--{k}={v}" for k, v in TINY_MODEL.items()]
    flags += ["--second_time_embed=true", "--training_mode=meanflow", "--model_path", checkpoint]
    images = {}
    for sampler, steps in (("meanflow", 2), ("meanflow", 1), ("meanflow_onestep", 1)):
        out = tmp_path / f"{sampler}{steps}"
        path = image_sample.main(flags + ["--sampler", sampler, "--steps", str(steps), "--num_samples", "3",
                                          "--log_dir", str(out)])
        assert (out / "samples_grid.png").exists()
        with np.load(path) as data:
            images[sampler, steps] = data["arr_0"]
            assert data["arr_0"].shape == (3, 8, 8, 3)
    assert (images["meanflow", 1] == images["meanflow_onestep", 1]).all()


# ----- 2-D mixture ---------------------------------------------------------------------------------------------


def mixture_samples(n, seed):
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(WEIGHTS, n, replacement=True, generator=g)
    return CENTERS[k] + STD * torch.randn(n, 2, generator=g)


def sliced_wasserstein(samples, projections=64, seed=0):
    """Sliced 1-Wasserstein distance from 4000 fresh mixture samples: mean over random unit directions of the mean
    gap between sorted projections (equal sample sizes); two mixture draws of 4000 give about 0.004."""
    reference = mixture_samples(len(samples), seed=77)
    directions = torch.randn(2, projections, generator=torch.Generator().manual_seed(seed))
    directions = directions / directions.norm(dim=0)
    a, b = (samples @ directions).sort(dim=0).values, (reference @ directions).sort(dim=0).values
    return (a - b).abs().mean().item()


@torch.no_grad()
def composition_error(denoiser, model, n=2000):
    """Mean |f(f(z, t, s), s, u) - f(z, t, u)| over the mixture's path at sorted uniform times u < s < t, relative to
    the mean jump |f(z, t, u) - z| (0: the flow map composes, as an exact one does)."""
    g = torch.Generator().manual_seed(5)
    u, s, t = torch.sort(torch.rand(n, 3, generator=g), dim=1).values.unbind(dim=1)
    z = flow_interpolate(mixture_samples(n, seed=9), torch.randn(n, 2, generator=g), t)
    two_jumps = denoiser.flow_map(model, denoiser.flow_map(model, z, s, t), u, s)
    one_jump = denoiser.flow_map(model, z, u, t)
    return ((two_jumps - one_jump).norm(dim=1).mean() / (one_jump - z).norm(dim=1).mean()).item()



MEANFLOW_OPTIONS = dict(meanflow_time_mean=-0.4, meanflow_time_std=1.0, meanflow_adaptive_p=0.0, meanflow_eps=1e-3,
                        meanflow_cfg_w=1.0, meanflow_cfg_k=0.0, meanflow_cfg_t_min=0.0, meanflow_cfg_t_max=1.0)


def train_meanflow(model, steps, ratio, log_dir):
    """MeanFlow on the mixture (r != t on a `ratio` share of the samples, lr 2e-3 decaying to 0); returns the EMA
    (0.99) of the network."""
    logger.configure(dir=log_dir, format_strs=[])
    loop = CMTrainLoop(model=model, diffusion=FlowMapDenoiser(), data=Mixture(256), batch_size=256, microbatch=-1,
                       lr=2e-3, ema_rate="0.99", log_interval=10**9, save_interval=-1, resume_checkpoint="",
                       optimizer="adam", total_training_steps=steps, lr_anneal_steps=steps, progress=False,
                       channels_last=False, target_model=None, teacher_model=None, teacher_diffusion=None,
                       training_mode="meanflow", schedule_fn=meanflow_schedule(steps),
                       loss_options=dict(MEANFLOW_OPTIONS, meanflow_ratio=ratio))
    loop.run_loop()
    ema = copy.deepcopy(model)
    ema.load_state_dict(loop.mp_trainer.master_params_to_state_dict(loop.ema_params[0]))
    return ema


@pytest.fixture(scope="module")
def mixture_meanflow(tmp_path_factory):
    """MeanFlow from scratch on the four-Gaussian mixture: 1,500 steps, r != t on half the samples, plain squared l2
    (the adaptive weighting down-weights the large-t samples that decide the modes' weights, which these few steps
    cannot afford). Trained once for the tests below."""
    torch.manual_seed(0)
    return train_meanflow(Linear2Time(), 1500, 0.5, str(tmp_path_factory.mktemp("meanflow")))


def test_a_2d_mixture_is_recovered_in_one_and_two_jumps(mixture_meanflow):
    """One and two jumps of the MeanFlow network give the modes' weights, two jumps their places; more jumps land
    closer."""
    near = {}
    for jumps in (1, 2, 4):
        torch.manual_seed(123)
        with torch.inference_mode():
            samples = karras_sample(FlowMapDenoiser(), mixture_meanflow, (4000, 2), steps=jumps, sampler="meanflow",
                                    clamp=False, device="cpu")
        weights, offsets = mode_statistics(samples)
        assert torch.allclose(weights, WEIGHTS, atol=0.05), (jumps, weights)
        near[jumps] = (torch.cdist(samples, CENTERS).min(dim=1).values < 0.15).float().mean().item()
        if jumps > 1:
            assert (offsets < 0.15).all(), (jumps, offsets)
    assert near[1] < near[2] < near[4], near


def test_the_meanflow_map_composes_where_its_flow_matching_start_does_not(tmp_path):
    """MeanFlow at r = t only (flow matching: its jumps are Euler steps of the velocity), then with r != t on half the
    samples: the composition error |f(f(z, t, s), s, u) - f(z, t, u)| (relative to the jump) shrinks."""
    torch.manual_seed(0)
    model = Linear2Time()
    errors = [composition_error(FlowMapDenoiser(), train_meanflow(model, steps, ratio, str(tmp_path / str(ratio))))
              for ratio, steps in ((0.0, 200), (0.5, 400))]  # fmt: skip
    assert errors[1] < 0.6 * errors[0], errors
