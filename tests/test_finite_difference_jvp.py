"""The finite-difference JVP option (cm.nn.finite_difference_jvp) against the exact JVP (cm.nn.network_jvp) through
the ADM UNet and NCSN++ with dropout on, at TrigFlow times."""

import pytest
import torch
from test_jvp import NETWORKS, build, float64, point, relative_error, replay

from cm.nn import JVP_METHODS, finite_difference_jvp, finite_difference_step, network_jvp

# relative errors against the float64 exact JVP, measured on a 2-core AMD EPYC (AVX2): float64 tangent 3-5e-10,
# value 6e-11-2e-10; float32 tangent 2.3-3.5e-4 (the exact JVP in float32: 1.5-2.6e-6), midpoint value
# 4e-5-1.3e-4, exact value (a third forward) as a plain float32 forward, about 1e-6
TOLERANCE = {torch.float64: (1e-8, 1e-9), torch.float32: (1e-3, 5e-4)}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", NETWORKS)
def test_error_against_the_exact_jvp(name, dtype):
    model = build(name)
    x, t, dx, dt = point()
    state = torch.get_rng_state()
    value, exact = replay(state, network_jvp, float64(model), (x, t), (dx, dt))
    net = float64(model) if dtype == torch.float64 else model
    fd_value, fd = replay(state, finite_difference_jvp, net, (x.to(dtype), t.to(dtype)), (dx.to(dtype), dt.to(dtype)))
    tangent_error, value_error = relative_error(fd, exact), relative_error(fd_value, value)
    print(f"{name} {dtype}: tangent {tangent_error:.2e}, value {value_error:.2e}")
    assert fd.dtype == fd_value.dtype == dtype
    assert tangent_error < TOLERANCE[dtype][0] and value_error < TOLERANCE[dtype][1]
    torch.set_rng_state(state)
    primals, tangents = (x.to(dtype), t.to(dtype)), (dx.to(dtype), dt.to(dtype))
    exact_value, _ = finite_difference_jvp(net, primals, tangents, exact_value=True)
    assert relative_error(exact_value, value) < (1e-12 if dtype == torch.float64 else 1e-5)


def test_both_forwards_share_dropout_masks_and_the_rng_goes_on_as_after_one():
    model = build("unet")
    x, t, dx, dt = (v.float() for v in point())
    state = torch.get_rng_state()
    _, exact = replay(state, network_jvp, model, (x, t), (dx, dt))
    after_exact = torch.get_rng_state()
    _, fd = replay(state, finite_difference_jvp, model, (x, t), (dx, dt))
    assert torch.equal(torch.get_rng_state(), after_exact)
    assert relative_error(fd, exact.double()) < 3e-3
    # without the replay the two forwards draw other masks and the difference quotient is dominated by them
    torch.set_rng_state(state)
    plus = model(x + 1e-2 * dx, t + 1e-2 * dt)
    minus = model(x - 1e-2 * dx, t - 1e-2 * dt)
    assert relative_error((plus - minus) / 2e-2, exact.double()) > 1.0


def test_step_is_relative_to_time_with_a_floor():
    t = torch.tensor([0.0, 0.001, 0.5, -1.2])
    h = finite_difference_step(t, torch.float32, relative_step=1e-3, min_time=1e-2)
    torch.testing.assert_close(h, torch.tensor([1e-5, 1e-5, 5e-4, 1.2e-3], dtype=torch.float64))
    assert finite_difference_step(t[2:3], torch.float32).item() == pytest.approx(0.5 * (2**-23) ** (1 / 3))
    with pytest.raises(ValueError, match="must be > 0"):
        finite_difference_step(t, torch.float32, relative_step=0.0)


def test_tuple_outputs_and_the_same_contract_as_network_jvp():
    def fn(x, s):
        return x * s[:, None].exp(), (x**2).sum(-1)

    x, s = torch.randn(3, 4, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    dx, ds = torch.randn_like(x), torch.randn_like(s)
    exact = JVP_METHODS["exact"](fn, (x, s), (dx, ds))
    fd = JVP_METHODS["finite_difference"](fn, (x, s), (dx, ds))
    for a, b in zip(exact, fd):
        for u, w in zip(a, b):
            torch.testing.assert_close(w, u, rtol=1e-8, atol=1e-9)
    with pytest.raises(ValueError, match="one tangent per primal"):
        finite_difference_jvp(fn, (x, s), (dx,))
    with pytest.raises(ValueError, match="time primal"):
        finite_difference_jvp(fn, (x, x), (dx, dx))
