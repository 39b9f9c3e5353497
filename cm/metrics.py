"""Distance functions d(x, y) for the consistency and distillation losses; each returns one value per sample."""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import mean_flat

LOSS_NORMS = ("l1", "l2", "l2-32", "lpips", "pseudo-huber")
LPIPS_VGG_ENV = "CM_LPIPS_VGG_PATH"
VGG16_FILENAME = "vgg16-397923af.pth"


def l1(x, y):
    """Mean absolute difference per sample."""
    return mean_flat((x - y).abs())


def l2(x, y):
    """Mean squared difference per sample."""
    return mean_flat((x - y) ** 2)


def l2_32(x, y):
    """Mean squared difference after bilinear resizing to 32x32 (the paper's l2-32 metric)."""
    x = F.interpolate(x, size=32, mode="bilinear")
    y = F.interpolate(y, size=32, mode="bilinear")
    return l2(x, y)


def pseudo_huber_c(num_dims):
    """iCT's pseudo-Huber constant c = 0.00054 * sqrt(d) for data of dimension d (Song & Dhariwal 2023)."""
    return 0.00054 * math.sqrt(num_dims)


def pseudo_huber(x, y, c=None):
    """Pseudo-Huber distance sqrt(||x - y||^2 + c^2) - c per sample (iCT, Sec. 3.3)."""
    diff = (x - y).flatten(1)
    if c is None:
        c = pseudo_huber_c(diff.shape[1])
    return torch.sqrt(diff.pow(2).sum(dim=1) + c**2) - c


def default_vgg16_path():
    """Where torchvision would cache the ImageNet VGG16 weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", VGG16_FILENAME)


def _vgg16_path(vgg_path):
    for path in (vgg_path, os.environ.get(LPIPS_VGG_ENV), default_vgg16_path()):
        if path and os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"LPIPS needs the torchvision VGG16 ImageNet weights ({VGG16_FILENAME}, from "
        f"https://download.pytorch.org/models/{VGG16_FILENAME}); copy the file to this machine and pass "
        f"--lpips_vgg_path FILE, set {LPIPS_VGG_ENV}=FILE, or put it at {default_vgg16_path()}."
    )


def load_vgg16_into_lpips(lpips_model, path):
    """Copy torchvision VGG16 `features.N.*` weights into an LPIPS model's `net.sliceK.N.*` layers."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, param in lpips_model.net.named_parameters():
            _, index, kind = name.split(".")
            key = f"features.{index}.{kind}"
            if key not in state:
                raise ValueError(f"{path} is not a torchvision VGG16 state dict: it has no {key}")
            param.copy_(state[key])


class LPIPSDistance(nn.Module):
    """LPIPS(VGG) between images in [-1, 1], resized bilinearly to 224 when smaller than 256 (as the reference).

    :param vgg_path: torchvision VGG16 weights file; default from CM_LPIPS_VGG_PATH or the torch hub cache.
    :param pretrained: False gives a randomly initialised backbone (tests only: the distance is then
        not perceptual).
    """

    def __init__(self, vgg_path=None, pretrained=True):
        super().__init__()
        import lpips

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
        if pretrained:
            load_vgg16_into_lpips(self.model, _vgg16_path(vgg_path))
        self.model.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def forward(self, x, y):
        if x.shape[-1] < 256:
            x = F.interpolate(x, size=224, mode="bilinear")
            y = F.interpolate(y, size=224, mode="bilinear")
        return self.model((x + 1) / 2.0, (y + 1) / 2.0, normalize=True).flatten()


def check_loss_norm(loss_norm):
    """Raise a ValueError naming the allowed values when loss_norm is unknown."""
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss_norm {loss_norm!r}; allowed: {', '.join(LOSS_NORMS)}")


def get_distance_fn(loss_norm, lpips_vgg_path=None, lpips_pretrained=True):
    """The distance d(x, y) -> [B] named by loss_norm (LPIPS builds its network here)."""
    check_loss_norm(loss_norm)
    if loss_norm == "lpips":
        return LPIPSDistance(vgg_path=lpips_vgg_path, pretrained=lpips_pretrained)
    return {"l1": l1, "l2": l2, "l2-32": l2_32, "pseudo-huber": pseudo_huber}[loss_norm]
