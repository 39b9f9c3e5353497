"""The embedded demo data: scikit-learn's 8x8 handwritten digits as small RGB images."""

import numpy as np
import torch


def digits_arrays(image_size):
    """scikit-learn's 1,797 8x8 digits as uint8 NHWC RGB images of image_size (bilinear), and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    return x.permute(0, 2, 3, 1).numpy(), digits.target.astype(np.int64)
