"""Batched, seeded image augmentations written as tensor ops (no torchvision).

All functions take a float batch ``(N, C, H, W)`` and a ``torch.Generator`` so results are
deterministic under a seed.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def random_crop(x: Tensor, pad: int, gen: torch.Generator) -> Tensor:
    """Zero-pad by ``pad`` and crop back to the original size at a random offset per image."""
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=x.device).view(1, h))  # n, h
    cols = (dx.view(n, 1) + torch.arange(w, device=x.device).view(1, w))  # n, w
    idx_n = torch.arange(n, device=x.device).view(n, 1, 1)
    out = padded.permute(0, 2, 3, 1)[idx_n, rows.view(n, h, 1), cols.view(n, 1, w)]  # n,h,w,c
    return out.permute(0, 3, 1, 2).contiguous()


def random_hflip(x: Tensor, gen: torch.Generator, p: float = 0.5) -> Tensor:
    """Flip each image horizontally with probability ``p``."""
    flip = (torch.rand(x.shape[0], generator=gen) < p).to(x.device)
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)


def random_rotation(x: Tensor, degrees: float, gen: torch.Generator) -> Tensor:
    """Rotate each image by a uniform angle in [-degrees, degrees] (bilinear, zero fill)."""
    if degrees <= 0:
        return x
    n = x.shape[0]
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_brightness(x: Tensor, amount: float, gen: torch.Generator) -> Tensor:
    """Scale each image by a factor in [1 - amount, 1 + amount] (input assumed in [0, 1])."""
    if amount <= 0:
        return x
    factor = 1 + (torch.rand(x.shape[0], generator=gen) * 2 - 1) * amount
    return (x * factor.to(x.device, x.dtype).view(-1, 1, 1, 1)).clamp(0, 1)


def random_contrast(x: Tensor, amount: float, gen: torch.Generator) -> Tensor:
    """Scale each image's deviation from its mean by a factor in [1 - amount, 1]."""
    if amount <= 0:
        return x
    factor = 1 - torch.rand(x.shape[0], generator=gen) * amount
    factor = factor.to(x.device, x.dtype).view(-1, 1, 1, 1)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (mean + (x - mean) * factor).clamp(0, 1)


def random_blend(x: Tensor, pool: Tensor, max_weight: float, gen: torch.Generator) -> Tensor:
    """Blend each image with a random image of ``pool``: ``(1 - a) * x + a * pool[j]``.

    ``a`` is uniform in ``[0, max_weight]`` per image. Blending a feature with images that
    lack it gives fainter instances of the feature (a half-faded stripe is still a stripe).
    """
    if max_weight <= 0 or len(pool) == 0:
        return x
    n = x.shape[0]
    other = torch.randint(0, len(pool), (n,), generator=gen).to(pool.device)
    a = (torch.rand(n, 1, 1, 1, generator=gen) * max_weight).to(x.device, x.dtype)
    return (1 - a) * x + a * pool[other].to(x.device, x.dtype)


def augment(x: Tensor, gen: torch.Generator, pad: int = 4, hflip: bool = True,
            degrees: float = 0.0, brightness: float = 0.0, contrast: float = 0.0) -> Tensor:
    """The training augmentation: crop with padding, optional flip, rotation and brightness.

    Shape:
        x: ``(N, C, H, W)`` float in [0, 1] (before normalisation).
    """
    x = random_crop(x, pad, gen)
    if hflip:
        x = random_hflip(x, gen)
    x = random_rotation(x, degrees, gen)
    x = random_brightness(x, brightness, gen)
    return random_contrast(x, contrast, gen)


# The family of natural variations of :func:`natural_variation`: each copy draws every
# parameter at random (log-uniform factors; shifts and angles uniform).
VARIATION_INTENSITY = (0.45, 1.35)  # factor on pixel intensity (a dark or bright object)
VARIATION_GAMMA = (0.6, 1.6)        # exponent on [0, 1] pixels (contrast of the shading)
VARIATION_ZOOM = (0.75, 1.3)        # scale of the content about the centre (a small or large object)
VARIATION_ASPECT = (0.75, 1.3)      # horizontal over vertical scale (a wide or narrow object)
VARIATION_SHIFT = 3.0               # pixels on each axis (an off-centre object)
VARIATION_DEGREES = 10.0            # rotation
VARIATION_BLUR = 0.3                # probability of a 3x3 box blur (a smooth object)


def _log_uniform(n: int, lo: float, hi: float, gen: torch.Generator) -> Tensor:
    return torch.exp(math.log(lo) + torch.rand(n, generator=gen) * (math.log(hi) - math.log(lo)))


def natural_variation(x: Tensor, gen: torch.Generator) -> Tensor:
    """One randomly varied copy of each image: intensity, gamma, zoom, aspect ratio, shift,
    rotation and blur, each drawn per image from the ranges above.

    The properties a semantic subgroup of a class is likely to differ in from the rest of it
    (darker, larger, wider, smoother, off-centre); docs/repair.md. No attack is known to it.

    Shape:
        x: ``(N, C, H, W)`` float in [0, 1] (before normalisation); returns the same.
    """
    n, c, h, w = x.shape
    dev, dt = x.device, x.dtype
    x = (x * _log_uniform(n, *VARIATION_INTENSITY, gen).to(dev, dt).view(-1, 1, 1, 1)).clamp(0, 1)
    x = x ** _log_uniform(n, *VARIATION_GAMMA, gen).to(dev, dt).view(-1, 1, 1, 1)
    zoom, aspect = _log_uniform(n, *VARIATION_ZOOM, gen), _log_uniform(n, *VARIATION_ASPECT, gen)
    sx, sy = zoom * aspect.sqrt(), zoom / aspect.sqrt()
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(VARIATION_DEGREES)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * VARIATION_SHIFT
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)  # output -> input coordinates: the inverse of scale, rotate, shift
    theta[:, 0, 0], theta[:, 0, 1] = cos / sx, sin / sx
    theta[:, 1, 0], theta[:, 1, 1] = -sin / sy, cos / sy
    theta[:, 0, 2], theta[:, 1, 2] = -shift[:, 0] * 2 / w, -shift[:, 1] * 2 / h
    grid = F.affine_grid(theta.to(dev, dt), [n, c, h, w], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    blur = (torch.rand(n, generator=gen) < VARIATION_BLUR).to(dev)
    if blur.any():
        k = torch.full((c, 1, 3, 3), 1 / 9, dtype=dt, device=dev)
        x[blur] = F.conv2d(F.pad(x[blur], (1, 1, 1, 1), mode="replicate"), k, groups=c)
    return x.clamp(0, 1)
