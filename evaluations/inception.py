"""The FID Inception-v3 network (TensorFlow graph of 2015-12-05) in PyTorch, without TensorFlow.

It reproduces the three tensors the reference evaluator reads from `classify_image_graph_def.pb`:
`pool_3` (2048-d, for FID, precision and recall), the first 7 channels of `mixed_6/conv` (17x17x7,
flattened in NHWC order, for sFID) and the logits of `softmax/logits/MatMul` (no bias, for IS).
Layer names are torchvision's, so pytorch-fid's converted weights file
(`pt_inception-2015-12-05-6726825d.pth`) loads with strict=True. The graph's quirks are kept:
bilinear resizing to 299 with TensorFlow 1's pixel alignment, inputs mapped by (x - 128) / 128,
average pools that ignore padding, and a max pool in the last block.
"""

import os

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import inception as tv_inception

from cm.safe_load import check_torch_load_is_safe, verify_known_weights

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256 = {"6726825d": FID_WEIGHTS_NAME}  # pytorch-fid's release: SHA256 prefix in its name
OPENAI_WEIGHTS_URL = "https://openaipublic.blob.core.windows.net/consistency/inception/inception-2015-12-05.pt"
INCEPTION_WEIGHTS_ENV = "CM_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
NUM_CLASSES = 1008
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS


def _legacy_bilinear_coords(in_size, out_size, device):
    """Source rows for TF1 `resize_bilinear(align_corners=False)`: src = dst * in / out, no half-pixel shift.

    :param in_size: input length along the axis.
    :param out_size: output length along the axis.
    :param device: device of the returned tensors.
    :return: (lower index, upper index, float32 weight of the upper index), each of length out_size.
    """
    scale = torch.tensor(np.float32(in_size) / np.float32(out_size), dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    lower = torch.floor(src)
    upper = torch.clamp(torch.ceil(src), max=in_size - 1)
    lerp = src - lower
    return lower.long().to(device), upper.long().to(device), lerp.to(device)


def resize_bilinear_tf1(x, size=INPUT_SIZE):
    """Bilinear resize as TensorFlow 1's ResizeBilinear op: interpolate along width, then height.

    :param x: float tensor [N, C, H, W].
    :param size: output height and width in pixels.
    :return: float tensor [N, C, size, size].
    """
    height, width = x.shape[-2:]
    if (height, width) == (size, size):
        return x
    w0, w1, w_lerp = _legacy_bilinear_coords(width, size, x.device)
    h0, h1, h_lerp = _legacy_bilinear_coords(height, size, x.device)
    left, right = x[..., w0], x[..., w1]
    x = left + (right - left) * w_lerp.to(x.dtype)
    top, bottom = x[..., h0, :], x[..., h1, :]
    return top + (bottom - top) * h_lerp.to(x.dtype)[:, None]


def _avg_pool_same(x):
    """TF's 3x3 stride-1 SAME average pool: padded positions are not counted."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x):
    """TF's 3x3 stride-1 SAME max pool."""
    return F.max_pool2d(x, kernel_size=3, stride=1, padding=1)


class FIDInceptionA(tv_inception.InceptionA):
    """35x35 block (`mixed`, `mixed_1`, `mixed_2`), average pool without padded zeros."""

    def _forward(self, x):
        branch5x5 = self.branch5x5_2(self.branch5x5_1(x))
        branch3x3dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return [self.branch1x1(x), branch5x5, branch3x3dbl, self.branch_pool(_avg_pool_same(x))]


class FIDInceptionC(tv_inception.InceptionC):
    """17x17 block (`mixed_4` .. `mixed_7`); `_forward(x)[0]` is the block's `conv` output."""

    def _forward(self, x):
        branch7x7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4):
            dbl = layer(dbl)
        branch7x7dbl = self.branch7x7dbl_5(dbl)
        return [self.branch1x1(x), branch7x7, branch7x7dbl, self.branch_pool(_avg_pool_same(x))]


class FIDInceptionE(tv_inception.InceptionE):
    """8x8 block (`mixed_9`, `mixed_10`); the graph's `mixed_10` pools with max instead of average.

    :param in_channels: input channels (1280 or 2048).
    :param max_pool: True for `mixed_10`.
    """

    def __init__(self, in_channels, max_pool=False):
        super().__init__(in_channels)
        self.pool = _max_pool_same if max_pool else _avg_pool_same

    def _forward(self, x):
        branch3x3 = self.branch3x3_1(x)
        branch3x3dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        return [
            self.branch1x1(x),
            self.branch3x3_2a(branch3x3),
            self.branch3x3_2b(branch3x3),
            self.branch3x3dbl_3a(branch3x3dbl),
            self.branch3x3dbl_3b(branch3x3dbl),
            self.branch_pool(self.pool(x)),
        ]


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID graph: images in [0, 255] -> (pool_3, mixed_6/conv[..., :7]), softmax for IS.

    Weights are random (torchvision's defaults) until `load_state_dict` or `random_init_` is called;
    use `load_inception` to build a ready network.
    """

    def __init__(self):
        super().__init__()
        conv = tv_inception.BasicConv2d
        self.Conv2d_1a_3x3 = conv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = conv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = conv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = conv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = conv(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = tv_inception.InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = tv_inception.InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    @staticmethod
    def preprocess(images):
        """The graph's input ops: resize to 299 (TF1 bilinear), then (x - 128) / 128.

        :param images: float tensor [N, 3, H, W] with values in [0, 255].
        :return: float tensor [N, 3, 299, 299] in [-1, 1).
        """
        return (resize_bilinear_tf1(images, INPUT_SIZE) - 128.0) * (1.0 / 128.0)

    def forward(self, images):
        """Features of a batch.

        :param images: float tensor [N, 3, H, W] with values in [0, 255], any H and W.
        :return: (pool [N, 2048], spatial [N, 2023]); spatial is mixed_6/conv's first 7 channels, NHWC-flattened.
        """
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images.shape)}")
        x = self.preprocess(images.float())
        if self.Conv2d_1a_3x3.conv.weight.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous(memory_format=torch.channels_last)
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(x)))
        branches = self.Mixed_6d._forward(x)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(len(x), -1)
        x = self.Mixed_6e(torch.cat(branches, 1))
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
        pool = x.mean(dim=(2, 3))
        return pool, spatial

    def logits(self, pool):
        """IS logits as the reference computes them: pool_3 @ W of softmax/logits/MatMul (no bias).

        :param pool: float tensor [N, 2048].
        :return: float tensor [N, 1008].
        """
        return F.linear(pool, self.fc.weight)

    def softmax(self, pool):
        """Class probabilities for the Inception Score: softmax(pool_3 @ W).

        :param pool: float tensor [N, 2048].
        :return: float tensor [N, 1008], rows summing to 1.
        """
        return torch.softmax(self.logits(pool), dim=1)


def random_init_(model, seed=0):
    """Deterministic He-normal weights (for tests and timing): activations stay O(1) through the network.

    :param model: an FIDInceptionV3, changed in place.
    :param seed: seed of the generator that draws the weights.
    :return: the model.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                fan_in = module.weight[0].numel()
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / fan_in) ** 0.5)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
            elif isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) / module.in_features**0.5)
                module.bias.zero_()
    return model


def default_weights_path():
    """Where pytorch-fid (through torch.hub) caches the FID Inception weights."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", FID_WEIGHTS_NAME)


def find_inception_weights(path=None):
    """The weights file to use: `path`, else $CM_INCEPTION_WEIGHTS, else the torch hub cache.

    :param path: explicit file path, or None.
    :return: an existing file path.
    :raises FileNotFoundError: with one sentence saying which file is needed and where to put it.
    """
    if path:
        if os.path.isfile(path):
            return path
        where = f"{path} does not exist"
    else:
        path = os.environ.get(INCEPTION_WEIGHTS_ENV)
        if path and os.path.isfile(path):
            return path
        if os.path.isfile(default_weights_path()):
            return default_weights_path()
        where = "no weights file was found"
    raise FileNotFoundError(
        f"The FID Inception weights are needed and {where}: download {FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL} "
        f"and pass --inception_weights FILE, set {INCEPTION_WEIGHTS_ENV}=FILE, or put it at {default_weights_path()}."
    )


# The reference's own PyTorch port (evaluations/inception_v3.py, weights at OPENAI_WEIGHTS_URL) names the
# graph's layers after TensorFlow; these tables translate its keys into torchvision's names.
_OPENAI_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
                "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3", "output": "fc"}
_OPENAI_BLOCKS = {
    "mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d", "mixed_3": "Mixed_6a",
    "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c", "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e",
    "mixed_8": "Mixed_7a", "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c",
}
_OPENAI_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2", "tower_1.conv_2": "branch3x3dbl_3",
          "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1", "tower_1.conv_1": "branch7x7dbl_2",
          "tower_1.conv_2": "branch7x7dbl_3", "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2", "tower_1.conv": "branch7x7x3_1",
          "tower_1.conv_1": "branch7x7x3_2", "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1", "tower_1_conv_1": "branch3x3dbl_2",
          "tower_1_mixed_conv": "branch3x3dbl_3a", "tower_1_mixed_conv_1": "branch3x3dbl_3b",
          "tower_2_conv": "branch_pool"},
}
_OPENAI_BLOCK_KIND = {"Mixed_5": "A", "Mixed_6a": "B", "Mixed_6": "C", "Mixed_7a": "D", "Mixed_7": "E"}
_OPENAI_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def _block_kind(block):
    """Inception block type (A-E) of a torchvision block name such as Mixed_6b."""
    return _OPENAI_BLOCK_KIND.get(block, _OPENAI_BLOCK_KIND[block[:7]])


def convert_openai_state_dict(state):
    """Rename the reference's `inception-2015-12-05.pt` state dict (layers.mixed_6.conv.weight, ...) to ours.

    Its batch norms have no scale (gamma = 1, as in the TensorFlow graph), so bn.weight is filled with ones.

    :param state: dict of tensors with keys `layers.*` and `output.*`.
    :return: dict of tensors with FIDInceptionV3's keys.
    """
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "output":
            out[f"fc.{parts[1]}"] = value
            continue
        if parts[0] != "layers" or len(parts) < 3:
            raise ValueError(f"unexpected key {key!r} in the reference's Inception state dict")
        layer, param = ".".join(parts[1:-1]), parts[-1]
        if layer in _OPENAI_STEM:
            name = _OPENAI_STEM[layer]
        else:
            block_key, branch = layer.split(".", 1)
            block = _OPENAI_BLOCKS[block_key]
            name = f"{block}.{_OPENAI_BRANCHES[_block_kind(block)][branch]}"
        out[f"{name}.{_OPENAI_PARAMS[param]}"] = value
        if param == "beta":
            out[f"{name}.bn.weight"] = torch.ones_like(value)
    return out


def load_inception(weights_path=None, device="cpu", pretrained=True, seed=0, allow_unverified=None):
    """The FID Inception network in eval mode, fp32.

    :param weights_path: pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, checked by its SHA256 (prefix
        6726825d); None looks in $CM_INCEPTION_WEIGHTS, then the torch hub cache. Another file (such as the
        reference's `inception-2015-12-05.pt`, which has no published hash) needs allow_unverified.
    :param device: torch device for the network.
    :param pretrained: False gives deterministic random weights (tests and timing only; the numbers are meaningless).
    :param seed: seed of the random weights when pretrained is False.
    :param allow_unverified: use a weights file of another hash, with a warning (None: $CM_ALLOW_UNVERIFIED_WEIGHTS).
    :return: an FIDInceptionV3.
    """
    model = FIDInceptionV3()
    if pretrained:
        path = find_inception_weights(weights_path)
        verify_known_weights(path, FID_WEIGHTS_SHA256, "FID Inception weights", allow_unverified,
                             "--allow_unverified_weights")
        check_torch_load_is_safe(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict):
            raise ValueError(f"{path} is not a state dict of the FID Inception network")
        if any(key.startswith("layers.") for key in state):
            state = convert_openai_state_dict(state)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ValueError(f"{path} does not hold the FID Inception weights ({FID_WEIGHTS_NAME}): {err}") from None
    else:
        random_init_(model, seed)
    return model.to(device).eval()
