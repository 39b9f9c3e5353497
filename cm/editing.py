"""Zero-shot image editing with a consistency model (CM paper, Sec. 6.3, Alg. 4 and App. D).

Inpainting, colorization and super-resolution are one loop (Alg. 4): denoise with one consistency step,
put the known part of the reference image y back, re-noise to the next level, and repeat over decreasing
noise levels. The known part is given by an orthogonal linear map A and a 0/1 mask of the coordinates of
A y that are known; putting it back is x <- A^-1[(A y) * known + (A x) * (1 - known)]:

    inpaint    A = identity                                   known = the kept pixels (1 - Omega)
    colorize   A = per-pixel rotation, first axis luminance   known = the luminance axis
    superres   A = per-patch basis, first vector the average  known = the patch averages

Interpolation decodes spherical interpolants of two noise tensors with one step each; stroke-guided
generation (SDEdit) and denoising run the same loop, without a constraint, from an image noised to a chosen
level. Noise levels are points of the Karras grid from cm.sampling.sigmas_from_ts. Images are [-1, 1] NCHW.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from . import sampling
from .sampling import _batch_sigma, sigmas_from_ts

TASKS = ("inpaint", "colorize", "superres", "interpolate", "stroke", "denoise")
MASKS = ("box", "half", "strokes")
LUMA = (0.2989, 0.5870, 0.1140)


def check_task(task):
    """ValueError naming the allowed tasks unless `task` is one of them."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; allowed: {', '.join(TASKS)}")


# ----- noise levels ------------------------------------------------------------------------------


def editing_sigmas(ts, steps, sigma_min, sigma_max, rho=7.0):
    """Noise levels t_1 > ... > t_N of Alg. 4: the `steps`-point Karras grid at indices `ts`, without sigma_min.

    A level equal to sigma_min would be a denoising step that changes nothing (f(x, eps) = x), so the
    last index of a reference-style ts such as (0, 22, 39) only closes the grid, as in the reference.
    """
    sigmas = sigmas_from_ts(ts, steps, sigma_min, sigma_max, rho)
    return sigmas[sigmas > sigma_min]


def levels_from(start, sigmas, sigma_min):
    """[start] followed by the levels of `sigmas` strictly between sigma_min and start (a loop entered at start)."""
    below = [float(s) for s in sigmas if sigma_min < float(s) < start]
    return torch.tensor([float(start)] + below, dtype=torch.float64)


def check_sigma(sigma, sigma_min, sigma_max):
    """ValueError unless sigma_min < sigma <= sigma_max."""
    if not sigma_min < sigma <= sigma_max:
        raise ValueError(f"sigma must be in ({sigma_min}, {sigma_max}], got {sigma}")


# ----- linear constraints ------------------------------------------------------------------------


def orthogonal_basis(first):
    """Orthogonal float64 matrix whose first column is first / |first| and whose other columns complete it (QR)."""
    v = torch.as_tensor(first, dtype=torch.float64)
    m = torch.eye(len(v), dtype=torch.float64)
    m[:, 0] = v / v.norm()
    q, _ = torch.linalg.qr(m)
    return -q if q[:, 0] @ v < 0 else q


class LinearConstraint:
    """The known part of an image in the coordinates of an orthogonal map A (CM paper Alg. 4).

    :param forward: x -> A x.
    :param inverse: z -> A^-1 z.
    :param known: 0/1 tensor broadcasting against A x: 1 where the coordinate of A y is kept (1 - Omega).
    :param group_min: elementwise tensor -> its minimum over each group of pixels that A mixes (a pixel's
        channels, a patch), broadcast back; None: A mixes nothing (elementwise).
    :param anchor: y -> an image in [-1, 1] with the known part of y (default: the projection of y).
    """

    def __init__(self, forward, inverse, known, group_min=None, anchor=None):
        self.forward = forward
        self.inverse = inverse
        self.known = known
        self.group_min = group_min or (lambda t: t)
        self.anchor = anchor or self.project

    def project(self, y):
        """A^-1[(A y) * known]: y with its unknown coordinates zeroed (Alg. 4, line 2)."""
        return self.inverse(self.forward(y) * self.known.to(y))

    def replace(self, x, y):
        """A^-1[(A y) * known + (A x) * (1 - known)]: x with the known part of y put back (Alg. 4, lines 5 and 9)."""
        return self.replacer(y)(x)

    def replacer(self, y):
        """x -> replace(x, y), with the fixed known part (A y) * known computed once (for the editing loop)."""
        known = self.known.to(y)
        fixed = self.forward(y) * known
        return lambda x: self.inverse(fixed + self.forward(x) * (1 - known))

    def fit_range(self, x, y, lo=-1.0, hi=1.0):
        """x brought into [lo, hi] with its known part unchanged.

        x = a + u with a = anchor(y) in range and u free of known coordinates; u is scaled, per group, by the
        largest c in [0, 1] that keeps every pixel of the group in range. Only a colour or detail that would
        be clipped anyway is toned down; clamping instead would change the known part (e.g. the luminance).
        """
        a = self.anchor(y)
        u = x - a
        room = torch.where(u > 0, (hi - a) / u, torch.where(u < 0, (lo - a) / u, torch.full_like(u, math.inf)))
        return a + self.group_min(room).clamp(0, 1) * u


def inpaint_constraint(mask):
    """A = identity; mask [B or 1, 1, H, W] is 1 on the pixels to generate (Omega), 0 on those kept."""
    identity = lambda x: x  # noqa: E731
    return LinearConstraint(identity, identity, 1 - mask)


def _like(t, like):
    """t on the device and in the dtype of the tensor `like` (unchanged when like is None)."""
    return t if like is None else t.to(like)


def colorize_constraint(like=None):
    """A = Q^T per pixel, Q's first column the normalised luminance weights; the luminance axis is known.

    :param like: a tensor whose device and dtype the constraint's tensors take once (default: CPU float32).
    """
    q = _like(orthogonal_basis(LUMA).float(), like)
    forward = lambda x: torch.einsum("bchw,cd->bdhw", x, q.to(x))  # noqa: E731
    inverse = lambda z: torch.einsum("bdhw,cd->bchw", z, q.to(z))  # noqa: E731
    known = _like(torch.tensor([1.0, 0.0, 0.0]).view(1, 3, 1, 1), like)
    gray = lambda y: grayscale(y) / sum(LUMA)  # noqa: E731  (the gray image of the same luminance)
    return LinearConstraint(forward, inverse, known, lambda t: t.amin(dim=1, keepdim=True), gray)


def to_patches(x, factor):
    """[B, C, H, W] -> [B, C, H/f, W/f, f*f]: the pixels of each f x f patch on the last axis."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // factor, factor, w // factor, factor).permute(0, 1, 2, 4, 3, 5)
    return x.reshape(b, c, h // factor, w // factor, factor * factor)


def from_patches(p, factor):
    """Inverse of to_patches."""
    b, c, hp, wp, _ = p.shape
    p = p.reshape(b, c, hp, wp, factor, factor).permute(0, 1, 2, 4, 3, 5)
    return p.reshape(b, c, hp * factor, wp * factor)


def superres_constraint(factor, like=None):
    """A = Q^T on each f x f patch, Q's first column constant (1/f); the first coordinate, f * patch mean, is known.

    :param like: a tensor whose device and dtype the constraint's tensors take once (default: CPU float32).
    """
    q = _like(orthogonal_basis([1.0] * factor * factor).float(), like)
    forward = lambda x: to_patches(x, factor) @ q.to(x)  # noqa: E731
    inverse = lambda z: from_patches(z @ q.to(z).T, factor)  # noqa: E731
    known = torch.zeros(factor * factor)
    known[0] = 1.0
    known = _like(known, like)

    def patch_min(t):
        least = to_patches(t, factor).amin(dim=-1, keepdim=True)
        return from_patches(least.expand(-1, -1, -1, -1, factor * factor), factor)

    return LinearConstraint(forward, inverse, known, patch_min)


def check_factor(factor, image_size):
    """ValueError unless factor >= 2 divides image_size."""
    if factor < 2 or image_size % factor:
        raise ValueError(f"factor must be at least 2 and divide image_size {image_size}, got {factor}")


# ----- masks and simple image maps ---------------------------------------------------------------


def make_mask(kind, image_size, seed=0):
    """A built-in inpainting mask [1, 1, S, S], 1 = pixels to generate.

    :param kind: box (centred square of half the side), half (right half) or strokes (random thick lines).
    :param image_size: side S in pixels.
    :param seed: seed of the strokes.
    """
    if kind not in MASKS:
        raise ValueError(f"unknown mask {kind!r}; allowed: {', '.join(MASKS)} or a mask image file")
    s = image_size
    mask = np.zeros((s, s), np.float32)
    if kind == "box":
        lo, hi = s // 4, s - s // 4
        mask[lo:hi, lo:hi] = 1
    elif kind == "half":
        mask[:, s // 2 :] = 1
    else:
        rng = np.random.default_rng(seed)
        canvas = Image.new("L", (s, s), 0)
        draw = ImageDraw.Draw(canvas)
        for _ in range(4):
            points = [tuple(int(v) for v in rng.integers(0, s, 2)) for _ in range(3)]
            draw.line(points, fill=255, width=max(1, s // 8))
        mask = (np.array(canvas) >= 128).astype(np.float32)
    return torch.from_numpy(mask)[None, None]


def grayscale(images):
    """Luminance 0.2989 R + 0.5870 G + 0.1140 B of RGB images, repeated on 3 channels."""
    luma = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * luma).sum(dim=1, keepdim=True).expand(-1, 3, -1, -1).contiguous()


def downsample(images, factor):
    """Average over f x f patches (the measurement super-resolution keeps)."""
    return F.avg_pool2d(images, factor)


def upsample(images, factor):
    """Nearest-neighbour up-sampling by f."""
    return images.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)


def slerp(z0, z1, alpha):
    """Spherical interpolation between per-sample noise tensors: sin((1-a) w) / sin w z0 + sin(a w) / sin w z1.

    w is the angle between z0 and z1 of each sample; a = 0 and a = 1 give z0 and z1 exactly.
    """
    a, b = z0.flatten(1).double(), z1.flatten(1).double()
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    omega = torch.arccos(cos.clamp(-1, 1))
    sin = torch.sin(omega)
    apart = sin > 1e-6  # nearly parallel noises: linear interpolation
    safe = torch.where(apart, sin, torch.ones_like(sin))
    w0 = torch.where(apart, torch.sin((1 - alpha) * omega) / safe, torch.full_like(sin, 1 - alpha))
    w1 = torch.where(apart, torch.sin(alpha * omega) / safe, torch.full_like(sin, alpha))
    shape = (-1,) + (1,) * (z0.ndim - 1)
    return w0.view(shape).to(z0) * z0 + w1.view(shape).to(z1) * z1


# ----- the editing loop and the tasks ------------------------------------------------------------


make_denoiser = sampling.make_denoiser  # re-exported: x0 = D(x, sigma [B]) of a KarrasDenoiser-wrapped network


@torch.no_grad()
def edit_loop(denoiser, x, sigmas, generator, constraint=None, y=None, sigma_min=0.002, callback=None):
    """CM paper Alg. 4, lines 4-10: at each level denoise, put the known part of y back, re-noise to the next level.

    Without a constraint this is multistep consistency sampling (Alg. 1) entered at sigmas[0].

    :param denoiser: D(x, sigma [B]) -> x0.
    :param x: start [B, C, H, W] at noise level sigmas[0].
    :param sigmas: decreasing noise levels t_1 > ... > t_N > sigma_min (1-D tensor or list).
    :param generator: cm.random_util generator for the re-noising.
    :param constraint: LinearConstraint, or None for no constraint.
    :param y: the reference image whose known part is kept (with a constraint).
    :param sigma_min: eps; re-noising to t adds N(0, t^2 - eps^2) noise.
    :param callback: called with {"i", "sigma", "x", "denoised"} after each denoising.
    """
    sigmas = sigmas.tolist() if torch.is_tensor(sigmas) else [float(s) for s in sigmas]
    put_back = (lambda x0: x0) if constraint is None else constraint.replacer(y)
    for i, t_cur in enumerate(sigmas):
        if i > 0:
            # re-noise to t_cur (line 7)
            x = x + generator.randn_like(x) * math.sqrt(t_cur**2 - sigma_min**2)
        # denoise to x0 (line 8)
        x0 = denoiser(x, _batch_sigma(t_cur, x))
        # put the known part of y back (line 9)
        x = put_back(x0)
        if callback is not None:
            callback({"i": i, "sigma": t_cur, "x": x, "denoised": x0})
    return x


@torch.no_grad()
def zero_shot_edit(denoiser, images, constraint, sigmas, generator, sigma_min=0.002):
    """CM paper Alg. 4: y = the known part of the images (line 2), x ~ N(y, t_1^2 I) (line 3), then the loop.

    The result is brought into [-1, 1] without changing its known part (LinearConstraint.fit_range).
    Returns (edited images, y).
    """
    y = constraint.project(images)
    x = y + generator.randn_like(y) * float(sigmas[0])
    x = edit_loop(denoiser, x, sigmas, generator, constraint, y, sigma_min)
    return constraint.fit_range(x, images), y


def inpaint(denoiser, images, mask, sigmas, generator, sigma_min=0.002):
    """Generate the pixels where mask = 1 and keep the others (Alg. 4, A = I). Returns (edited, masked input)."""
    return zero_shot_edit(denoiser, images, inpaint_constraint(mask.to(images)), sigmas, generator, sigma_min)


def colorize(denoiser, images, sigmas, generator, sigma_min=0.002):
    """Colour images keeping their luminance (Alg. 4, A = luminance + orthogonal complement); (edited, gray input)."""
    edited, _ = zero_shot_edit(denoiser, images, colorize_constraint(images), sigmas, generator, sigma_min)
    return edited, grayscale(images)


def superres(denoiser, low_res, factor, sigmas, generator, sigma_min=0.002):
    """f-times super-resolution of low_res [B, C, H/f, W/f], keeping each patch mean (Alg. 4, A = patch-average basis).

    Returns (edited [B, C, H, W], the nearest-neighbour up-sampled input).
    """
    y = upsample(low_res, factor)
    edited, _ = zero_shot_edit(denoiser, y, superres_constraint(factor, y), sigmas, generator, sigma_min)
    return edited, y


@torch.no_grad()
def interpolate(denoiser, z0, z1, num_frames, sigma_max):
    """One-step decodings f(sigma_max slerp(z0, z1, a), sigma_max) for num_frames a in [0, 1] (CM paper Sec. 6.3).

    :param z0, z1: unit-variance noise [B, C, H, W].
    :return: [B, num_frames, C, H, W]; frames 0 and num_frames - 1 are the one-step samples of z0 and z1.
    """
    if num_frames < 2:
        raise ValueError(f"num_frames must be at least 2, got {num_frames}")
    alphas = torch.linspace(0, 1, num_frames, dtype=torch.float64).tolist()
    frames = torch.stack([slerp(z0, z1, a) for a in alphas], dim=1)
    x = frames.flatten(0, 1) * sigma_max
    out = denoiser(x, _batch_sigma(sigma_max, x))
    return out.view(frames.shape)


def noised_start(images, sigma, sigma_max, generator):
    """SDEdit's start x = y + sigma z; at sigma = sigma_max the prior sample sigma_max z (t0 = 1: y is ignored)."""
    z = generator.randn_like(images)
    return z * sigma_max if sigma >= sigma_max else images + z * sigma


def stroke_guided(denoiser, strokes, sigma, sigmas, generator, sigma_min=0.002, sigma_max=80.0):
    """Stroke-guided generation (SDEdit with a consistency model, CM paper Sec. 6.3).

    The stroke painting is noised to `sigma`, then the editing loop without a constraint runs from sigma
    through the levels of `sigmas` below it.
    """
    check_sigma(sigma, sigma_min, sigma_max)
    x = noised_start(strokes, sigma, sigma_max, generator)
    return edit_loop(denoiser, x, levels_from(sigma, sigmas, sigma_min), generator, sigma_min=sigma_min)


def denoise(denoiser, noisy, sigma, sigmas, generator, sigma_min=0.002, sigma_max=80.0):
    """Remove N(0, sigma^2) noise: f(noisy, sigma), then the levels of `sigmas` below sigma (multistep refinement)."""
    check_sigma(sigma, sigma_min, sigma_max)
    return edit_loop(denoiser, noisy, levels_from(sigma, sigmas, sigma_min), generator, sigma_min=sigma_min)
