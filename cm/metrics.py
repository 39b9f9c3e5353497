"""Distance functions d(x, y) for the consistency and distillation losses; each returns one value per sample."""

import math
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .nn import mean_flat
from .safe_load import check_torch_load_is_safe, verify_known_weights

LOSS_NORMS = ("l1", "l2", "l2-32", "lpips", "pseudo-huber", "huber")
LPIPS_VGG_ENV = "CM_LPIPS_VGG_PATH"
VGG16_FILENAME = "vgg16-397923af.pth"
VGG16_SHA256 = {"397923af": VGG16_FILENAME}  # torchvision's published file: SHA256 prefix in its name


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


LCM_HUBER_C = 0.001  # LCM's huber_c


def huber(x, y, c=LCM_HUBER_C):
    """LCM's Huber distance: the mean over elements of sqrt((x - y)^2 + c^2) - c, c = 0.001 (Luo et al. 2023)."""
    return mean_flat(torch.sqrt((x - y) ** 2 + c**2) - c)


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


def verified_vgg16_path(vgg_path=None):
    """The VGG16 weights file to use (_vgg16_path), checked to be torchvision's published one by its SHA256;
    CM_ALLOW_UNVERIFIED_WEIGHTS=1 accepts another file with a warning."""
    path = _vgg16_path(vgg_path)
    verify_known_weights(path, VGG16_SHA256, "torchvision VGG16 ImageNet weights for LPIPS")
    return path


def load_vgg16_into_lpips(lpips_model, path):
    """Copy torchvision VGG16 `features.N.*` weights into an LPIPS model's `net.sliceK.N.*` layers."""
    check_torch_load_is_safe(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    with torch.no_grad():
        for name, param in lpips_model.net.named_parameters():
            _, index, kind = name.split(".")
            key = f"features.{index}.{kind}"
            if key not in state:
                raise ValueError(f"{path} is not a torchvision VGG16 state dict: it has no {key}")
            param.copy_(state[key])


# piq's LPIPS standardises [0, 1] images with the ImageNet statistics (equal to lpips' ScalingLayer on [-1, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def replace_max_pooling(module):
    """Swap every MaxPool2d for AvgPool2d(2, 2) in place, recursively (piq's `replace_pooling=True`, as the reference)."""
    for name, child in module.named_children():
        if isinstance(child, nn.MaxPool2d):
            setattr(module, name, nn.AvgPool2d(kernel_size=2, stride=2, padding=0))
        else:
            replace_max_pooling(child)
    return module


def unit_normalize(features, eps=1e-10):
    """Scale each feature vector (over channels) to unit length, as LPIPS does (Zhang et al. 2018, Eq. 1)."""
    return features / (features.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


class LPIPSDistance(nn.Module):
    """The reference's LPIPS: piq `LPIPS(replace_pooling=True, reduction="none")` on images in [-1, 1].

    VGG16 with every max-pool replaced by a 2x2 average pool, features relu1_2 .. relu5_3 unit-normalised
    over channels, squared differences weighted by the LPIPS linear heads, averaged over space and
    summed over layers; one value per sample. Images smaller than 256 px are first resized bilinearly
    to 224 (as the reference). Computed in float32 outside autocast, as the reference did.

    :param vgg_path: torchvision VGG16 weights file; default from CM_LPIPS_VGG_PATH or the torch hub cache. Its
        SHA256 must start with 397923af (torchvision's vgg16-397923af.pth) unless CM_ALLOW_UNVERIFIED_WEIGHTS=1.
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
            load_vgg16_into_lpips(self.model, verified_vgg16_path(vgg_path))
        replace_max_pooling(self.model.net)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.model.eval().requires_grad_(False)

    def train(self, mode=True):
        return super().train(False)

    def features(self, x01):
        """The five VGG16 feature maps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3) of images in [0, 1]."""
        return self.model.net((x01 - self.mean) / self.std)

    def forward(self, x, y):
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float(), y.float()
            if x.shape[-1] < 256:
                x = F.interpolate(x, size=224, mode="bilinear")
                y = F.interpolate(y, size=224, mode="bilinear")
            total = 0.0
            for fx, fy, lin in zip(self.features((x + 1) / 2), self.features((y + 1) / 2), self.model.lins):
                diff = (unit_normalize(fx) - unit_normalize(fy)) ** 2
                total = total + lin(diff).mean(dim=(2, 3))
            return total.flatten()


def check_loss_norm(loss_norm):
    """Raise a ValueError naming the allowed values when loss_norm is unknown."""
    if loss_norm not in LOSS_NORMS:
        raise ValueError(f"unknown loss_norm {loss_norm!r}; allowed: {', '.join(LOSS_NORMS)}")


def get_distance_fn(loss_norm, lpips_vgg_path=None, lpips_pretrained=True):
    """The distance d(x, y) -> [B] named by loss_norm (LPIPS builds its network here)."""
    check_loss_norm(loss_norm)
    if loss_norm == "lpips":
        return LPIPSDistance(vgg_path=lpips_vgg_path, pretrained=lpips_pretrained)
    return {"l1": l1, "l2": l2, "l2-32": l2_32, "pseudo-huber": pseudo_huber, "huber": huber}[loss_norm]
