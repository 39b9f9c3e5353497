"""Discretisation N(k) and target-EMA mu(k) schedules for consistency training and distillation.

The arithmetic follows openai/consistency_models (numpy float64, same rounding and clamping order) so a
run here sees exactly the N(k) and mu(k) that a reference run sees.
"""

import math

import numpy as np

TARGET_EMA_MODES = ("fixed", "adaptive")
SCALE_MODES = ("fixed", "progressive", "progdist", "exponential")


def progressive_scales(step, total_steps, start_scales, end_scales):
    """CM paper Eq. (adaptive N): N(k) - 1 = ceil(sqrt(k/K ((s1 + 1)^2 - s0^2) + s0^2) - 1), at least 1."""
    scales = np.ceil(
        np.sqrt((step / total_steps) * ((end_scales + 1) ** 2 - start_scales**2) + start_scales**2) - 1
    ).astype(np.int32)
    return np.maximum(scales, 1)


def exponential_scales(step, total_steps, start_scales, end_scales):
    """iCT Eq. 11: N(k) - 1 = min(s0 * 2^floor(k / K'), s1), K' = floor(K / (log2 floor(s1 / s0) + 1))."""
    stage_steps = math.floor(total_steps / (math.log2(math.floor(end_scales / start_scales)) + 1))
    return min(start_scales * 2 ** (step // max(stage_steps, 1)), end_scales)


def adaptive_ema(start_ema, start_scales, scales_minus_one):
    """CM paper: mu(k) = exp(s0 log(mu0) / (N(k) - 1))."""
    c = -np.log(start_ema) * start_scales
    return np.exp(-c / scales_minus_one)


def progdist_scales(step, start_scales, distill_steps_per_iter):
    """Progressive distillation: N halves every distill_steps_per_iter steps down to 2, then 1 after twice as long."""
    distill_stage = step // distill_steps_per_iter
    scales = np.maximum(start_scales // (2**distill_stage), 2)
    sub_stage = np.maximum(step - distill_steps_per_iter * (np.log2(start_scales) - 1), 0)
    sub_stage = sub_stage // (distill_steps_per_iter * 2)
    sub_scales = np.maximum(2 // (2**sub_stage), 1)
    return np.where(scales == 2, sub_scales, scales)


def create_ema_and_scales_fn(
    target_ema_mode,
    start_ema,
    scale_mode,
    start_scales,
    end_scales,
    total_steps,
    distill_steps_per_iter,
):
    """Build step -> (mu(k), N(k)).

    :param target_ema_mode: "fixed" (mu = start_ema) or "adaptive" (CM paper's mu(k), needs a growing N).
    :param start_ema: mu0, the target EMA decay (0 makes the target the online network, as iCT).
    :param scale_mode: "fixed" (N = start_scales), "progressive" (CM paper's N(k)), "exponential"
        (iCT's doubling curriculum) or "progdist" (halving for progressive distillation).
    :param start_scales: s0, the initial number of discretisation steps N.
    :param end_scales: s1, the final N for "progressive" / "exponential".
    :param total_steps: K, the number of training steps the schedule spans.
    :param distill_steps_per_iter: steps per halving for "progdist".
    """
    if target_ema_mode not in TARGET_EMA_MODES:
        raise ValueError(f"unknown target_ema_mode {target_ema_mode!r}; allowed: {', '.join(TARGET_EMA_MODES)}")
    if scale_mode not in SCALE_MODES:
        raise ValueError(f"unknown scale_mode {scale_mode!r}; allowed: {', '.join(SCALE_MODES)}")
    if target_ema_mode == "adaptive" and scale_mode not in ("progressive", "exponential"):
        raise ValueError(
            f"target_ema_mode 'adaptive' needs scale_mode 'progressive' or 'exponential', got {scale_mode!r}"
        )
    if scale_mode == "progdist" and target_ema_mode != "fixed":
        raise ValueError("scale_mode 'progdist' works with target_ema_mode 'fixed' only")
    if scale_mode in ("progressive", "exponential") and total_steps <= 0:
        raise ValueError(f"scale_mode {scale_mode!r} needs total_steps > 0, got {total_steps}")
    if scale_mode == "progdist" and distill_steps_per_iter <= 0:
        raise ValueError(f"scale_mode 'progdist' needs distill_steps_per_iter > 0, got {distill_steps_per_iter}")

    def ema_and_scales_fn(step):
        if scale_mode == "fixed":
            return float(start_ema), int(start_scales)
        if scale_mode == "progdist":
            return 1.0, int(progdist_scales(step, start_scales, distill_steps_per_iter))
        if scale_mode == "progressive":
            scales_minus_one = progressive_scales(step, total_steps, start_scales, end_scales)
        else:
            scales_minus_one = exponential_scales(step, total_steps, start_scales, end_scales)
        if target_ema_mode == "adaptive":
            target_ema = adaptive_ema(start_ema, start_scales, scales_minus_one)
        else:
            target_ema = start_ema
        return float(target_ema), int(scales_minus_one + 1)

    return ema_and_scales_fn
