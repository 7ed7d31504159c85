"""Intensity augmentation for training: contrast, bias field, blur and noise inside the brain.

The network must not tell sites apart by their intensity statistics (a scanner that "looks
young"), so every training view may get, inside its brain mask, on the view's intensities mapped
back to a raw scale (raw 0 = the view's background, 1 = its brightest brain voxel):

* a **gamma** contrast change, ``u ** g`` with ``log g`` uniform in ``[-0.47, 0.47] * s``
  (``g`` in [0.63, 1.6] at strength 1);
* a smooth multiplicative **bias field**, ``exp(a * f)`` with ``f`` a 4x4x4 Gaussian lattice
  upsampled trilinearly and normalised to unit SD, ``a`` uniform in ``[0, 0.3 * s]``;
* with probability 1/2 a Gaussian **blur** of SD uniform in ``[0, s]`` voxels (skipped below
  0.1);
* Gaussian **noise** of SD uniform in ``[0, 0.05 * s]`` of the brain's range;

and is then whitened again exactly as ``predict`` whitens its input
(:func:`brainbag.image.preprocess.whiten` after the raw voxels outside the mask were set to 0):
brain voxels get mean 0 and SD 1, voxels outside the brain the whitened raw zero,
``-mean / SD``, the value ``predict`` gives its background. ``s`` is the recipe's ``augment``
strength (0 = off: the view is returned unchanged). All draws come from the step's generator, so a
resumed run makes the same views.

The views are whitened over the whole brain before this; a view that holds only part of the brain
(random crops) is re-whitened over the part it holds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

#: log-gamma half-range, bias-field amplitude, blur SD (voxels), noise SD (fraction of range)
GAMMA_LOG = 0.47
BIAS_AMPLITUDE = 0.3
BLUR_SIGMA = 1.0
NOISE_SD = 0.05
#: blurs narrower than this (voxels) are skipped
MIN_BLUR = 0.1


def rewhiten(u: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Whiten each sample of raw intensities ``u`` ``(B, 1, X, Y, Z)`` as ``predict`` does:
    ``(u * m - mean) / sd`` with the mean and SD over the mask ``m`` (same shape, 0/1), so brain
    voxels get mean 0 and SD 1 and voxels outside the mask ``-mean / sd``."""
    dims = (1, 2, 3, 4)
    raw = u * m
    n = m.sum(dim=dims).clamp_min(1)
    mean = raw.sum(dim=dims) / n
    var = (((raw - mean.view(-1, 1, 1, 1, 1)) * m) ** 2).sum(dim=dims) / n
    sd = var.sqrt().clamp_min(1e-6)
    return (raw - mean.view(-1, 1, 1, 1, 1)) / sd.view(-1, 1, 1, 1, 1)


def gaussian_blur(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``(1, 1, X, Y, Z)`` with SD ``sigma`` voxels (kernel radius
    ``ceil(2.5 sigma)``, edges replicated)."""
    r = max(1, math.ceil(2.5 * sigma))
    t = torch.arange(-r, r + 1, dtype=u.dtype, device=u.device)
    k = torch.exp(-(t**2) / (2 * sigma * sigma))
    k = k / k.sum()
    for axis in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = 2 * r + 1
        pad = [0, 0, 0, 0, 0, 0]  # F.pad runs from the last axis backwards
        pad[2 * (2 - axis)] = r
        pad[2 * (2 - axis) + 1] = r
        u = F.conv3d(F.pad(u, pad, mode="replicate"), k.view(shape))
    return u


def augment_intensity(x: torch.Tensor, m: torch.Tensor, background: torch.Tensor,
                      generator: torch.Generator | Sequence[torch.Generator], strength: float
                      ) -> torch.Tensor:
    """An augmented copy of a batch of whitened views.

    ``x`` ``(B, 1, X, Y, Z)``: views whitened as ``predict`` whitens (brain voxels, and the
    whitened raw zero ``background[i]`` outside the brain); ``m``: their brain masks (same shape,
    float 0/1); ``background`` ``(B,)``. Each view is mapped back to a raw scale on which the
    background is 0 (``u = (x - background) / (max over the brain - background)``), augmented
    (module docstring) and whitened again within its mask. ``strength`` 0 returns ``x`` itself.
    ``generator`` draws for every sample in turn, or give one generator per sample.
    """
    if strength <= 0:
        return x
    gens = [generator] * x.shape[0] if isinstance(generator, torch.Generator) else generator
    if len(gens) != x.shape[0]:
        raise ValueError(f"{len(gens)} generators for {x.shape[0]} views")
    out = []
    for i, gen in enumerate(gens):
        xi, mi = x[i : i + 1].float(), m[i : i + 1].float()
        brain = mi > 0
        if not bool(brain.any()):
            out.append(xi)
            continue
        zero = float(background[i])
        top = float(xi[brain].max())
        u = ((xi - zero) / max(top - zero, 1e-6)).clamp(0, 1)
        draws = torch.rand(5, generator=gen).tolist()
        u = u ** math.exp(strength * GAMMA_LOG * (2 * draws[0] - 1))
        field = torch.randn((1, 1, 4, 4, 4), generator=gen)
        field = F.interpolate(field, size=tuple(xi.shape[2:]), mode="trilinear",
                              align_corners=True).to(u.device)
        u = u * torch.exp(strength * BIAS_AMPLITUDE * draws[1] * field
                          / field.std().clamp_min(1e-6))
        sigma = strength * BLUR_SIGMA * draws[3]
        if draws[2] < 0.5 and sigma > MIN_BLUR:
            u = gaussian_blur(u, sigma)
        noise = torch.randn(tuple(u.shape), generator=gen).to(u.device)
        u = u + strength * NOISE_SD * draws[4] * noise
        out.append(rewhiten(u, mi))
    return torch.cat(out).to(x.dtype)
