"""The embedded demo data: scikit-learn's 8x8 handwritten digits as small RGB images, and its fixed split.

The split (a seeded permutation, the same everywhere) keeps the quickstart's numbers honest: generators and the
digits classifier learn from "train" (half); the digits-FID reference set is "reference" and the real-data floor
"floor" (a quarter each), which no model sees.
"""

import numpy as np
import torch

SPLITS = {"train": (0.0, 0.5), "reference": (0.5, 0.75), "floor": (0.75, 1.0)}  # fractions of the permutation
SPLIT_SEED = 0


def split_indices(num, split):
    """Indices of `split` (a name in SPLITS) among num items, from the fixed seeded permutation."""
    if split not in SPLITS:
        raise ValueError(f"unknown digits split {split!r}; allowed: {', '.join(SPLITS)}")
    order = torch.randperm(num, generator=torch.Generator().manual_seed(SPLIT_SEED))
    begin, end = SPLITS[split]
    return order[int(num * begin) : int(num * end)].numpy()


def digits_arrays(image_size, split=None):
    """scikit-learn's 1,797 8x8 digits (or one split of them) as uint8 NHWC RGB images of image_size (bilinear),
    and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.from_numpy(digits.images.astype(np.float32) / 16.0)[:, None]
    if image_size != 8:
        x = torch.nn.functional.interpolate(x, size=image_size, mode="bilinear", align_corners=False)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).repeat(1, 3, 1, 1)
    images, labels = x.permute(0, 2, 3, 1).numpy(), digits.target.astype(np.int64)
    if split is None:
        return images, labels
    keep = split_indices(len(images), split)
    return images[keep], labels[keep]
