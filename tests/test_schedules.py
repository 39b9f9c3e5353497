import math

import pytest

from cm.schedules import create_ema_and_scales_fn


def paper_n(k, K, s0, s1):
    """CM paper: N(k) = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1) + 1."""
    return math.ceil(math.sqrt(k / K * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1) + 1


def paper_mu(n, s0, mu0):
    """CM paper: mu(k) = exp(s0 log(mu0) / (N(k) - 1))."""
    return math.exp(s0 * math.log(mu0) / (n - 1))


@pytest.mark.parametrize("K, s0, s1, mu0", [(800000, 2, 200, 0.95), (1000000, 2, 150, 0.95), (800000, 2, 150, 0.9)])
def test_adaptive_progressive_schedule_matches_the_paper(K, s0, s1, mu0):
    fn = create_ema_and_scales_fn("adaptive", mu0, "progressive", s0, s1, K, 0)
    for k in (0, 1, K // 2, K - 1):
        mu, n = fn(k)
        assert n == paper_n(k, K, s0, s1), k
        assert mu == pytest.approx(paper_mu(n, s0, mu0), rel=1e-12), k
    # hand-computed ends: N(0) = s0 with mu(0) = mu0^(s0 / (s0 - 1)); N(K) = s1 + 1
    assert fn(0) == pytest.approx((mu0 ** (s0 / (s0 - 1)), s0))
    assert fn(K)[1] == s1 + 1


def test_known_values_of_the_imagenet_ct_schedule():
    fn = create_ema_and_scales_fn("adaptive", 0.95, "progressive", 2, 200, 800000, 0)
    assert fn(0) == pytest.approx((0.9025, 2))
    # k = K/2: sqrt(0.5 * (201^2 - 4) + 4) - 1 = 141.136... -> ceil 142 -> N = 143
    mu, n = fn(400000)
    assert n == 143 and mu == pytest.approx(math.exp(2 * math.log(0.95) / 142))


def test_fixed_schedules():
    assert create_ema_and_scales_fn("fixed", 0.95, "fixed", 40, 40, 600000, 0)(12345) == (0.95, 40)
    fn = create_ema_and_scales_fn("fixed", 0.95, "progressive", 2, 200, 800000, 0)
    assert fn(400000) == (0.95, 143)


def test_exponential_ict_schedule():
    """iCT Eq. 11 with s0 = 10, s1 = 1280, K = 400000: K' = floor(400000 / 8) = 50000."""
    fn = create_ema_and_scales_fn("fixed", 0.0, "exponential", 10, 1280, 400000, 0)
    assert fn(0) == (0.0, 11)
    assert fn(49999) == (0.0, 11)
    assert fn(50000) == (0.0, 21)
    assert fn(7 * 50000) == (0.0, 1281)
    assert fn(399999) == (0.0, 1281)


def test_progdist_halves_the_steps():
    fn = create_ema_and_scales_fn("fixed", 0.0, "progdist", 4096, 4096, 0, 1000)
    assert fn(0) == (1.0, 4096)
    assert fn(999)[1] == 4096 and fn(1000)[1] == 2048 and fn(2000)[1] == 1024
    # stages down to 2 take log2(4096) - 1 = 11 stages; then 2 steps for twice as long, then 1
    assert fn(11 * 1000)[1] == 2
    assert fn(11 * 1000 + 1999)[1] == 2
    assert fn(11 * 1000 + 2000)[1] == 1


@pytest.mark.parametrize(
    "args, needle",
    [
        (("slow", 0.9, "fixed", 40, 40, 10, 0), "target_ema_mode 'slow'"),
        (("fixed", 0.9, "cosine", 40, 40, 10, 0), "scale_mode 'cosine'"),
        (("adaptive", 0.9, "fixed", 40, 40, 10, 0), "needs scale_mode"),
        (("fixed", 0.9, "progdist", 40, 40, 10, 0), "distill_steps_per_iter > 0"),
    ],
)
def test_bad_schedule_arguments(args, needle):
    with pytest.raises(ValueError, match=needle):
        create_ema_and_scales_fn(*args)
