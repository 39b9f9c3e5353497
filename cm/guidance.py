"""Classifier-free guidance (Ho & Salimans 2022) for class-conditional denoisers.

A model built with `null_class` has one more label, the null label `num_classes`, which training puts in place
of the true label with probability `class_dropout_prob` (the unconditional model). The guided denoiser is

    D_w(x, sigma, y) = D(x, sigma, null) + w (D(x, sigma, y) - D(x, sigma, null)),

written as D_c + (w - 1)(D_c - D_u) so that w = 1 gives the conditional model bit for bit (and with a number
w = 1 the unconditional pass is skipped). LCM's guidance scale omega is w - 1 in this convention.
"""

import torch

from .nn import append_dims

NULL_CLASS_ERROR = (
    "classifier-free guidance needs a class-conditional model with a null class: train it with --class_cond true "
    "--null_class true --class_dropout_prob 0.1"
)


def unwrap(model):
    """The network inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def null_label(model):
    """The null label of a model built with null_class, or a ValueError saying how to get one."""
    label = getattr(unwrap(model), "null_label", None)
    if label is None:
        raise ValueError(NULL_CLASS_ERROR)
    return label


def takes_guidance(model):
    """Whether the network takes a guidance scale as input (built with guidance_embed)."""
    return bool(getattr(unwrap(model), "guidance_embed", False))


def drop_labels(y, prob, null, generator=None):
    """Label dropout for classifier-free guidance: each label becomes `null` with probability `prob`."""
    if prob <= 0:
        return y
    keep = torch.rand(y.shape, device=y.device, generator=generator) >= prob
    return torch.where(keep, y, torch.full_like(y, null))


def guidance_mix(cond, uncond, w):
    """D_c + (w - 1)(D_c - D_u) (classifier-free guidance; w a number or per-sample [B])."""
    w = append_dims(w.to(cond.dtype), cond.ndim) if torch.is_tensor(w) and w.ndim else w
    return cond + (w - 1) * (cond - uncond)


def with_guidance(denoise, model, w):
    """`denoise(x, sigma, **model_kwargs)` -> the guided D_w with the same signature, from the model's null label (a
    teacher of distillation guided at a fixed scale). w is a number or a per-sample [B] tensor; the number 1 returns
    `denoise` itself."""
    if not torch.is_tensor(w) and w == 1:
        return denoise
    null = null_label(model)

    def guided(x, sigma, **model_kwargs):
        if "y" not in model_kwargs:
            raise ValueError(NULL_CLASS_ERROR)
        cond = denoise(x, sigma, **model_kwargs)
        uncond = denoise(x, sigma, **{**model_kwargs, "y": torch.full_like(model_kwargs["y"], null)})
        return guidance_mix(cond, uncond, w)

    return guided


def guided_denoiser(denoise, model, model_kwargs, w):
    """(x, sigma) -> D_w(x, sigma, y) from `denoise(x, sigma, **model_kwargs)` and the model's null label.

    w is a number or a per-sample [B] tensor; the number 1 returns the conditional denoiser itself.
    """
    guided = with_guidance(denoise, model, w)
    return lambda x, sigma: guided(x, sigma, **model_kwargs)
