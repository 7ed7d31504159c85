"""Preprocessing: brain mask, conforming to 1 mm RAS+, and whitening within the mask.

The network expects what it was trained on: a skull-stripped T1 on a 1 mm isotropic grid, every
voxel outside the brain at raw intensity 0, then whitened with the mean and standard deviation of
the brain voxels. Whitening is applied to the whole array (as in the seed code), so background
voxels take the value ``-mean / std``; window padding uses that same value, which makes padding
indistinguishable from more background.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from brainbag.errors import InputError
from brainbag.image.io import (
    MAX_VOXELS,
    Image,
    LoadedImage,
    anchored_grid,
    format_mm,
    load_image,
    ras_transform,
    reorient,
    resample,
    same_grid,
    smooth_gaussian,
    voxel_sizes,
)

TARGET_SPACING_MM = 1.0
SPACING_TOLERANCE_MM = 0.01


@dataclass(frozen=True)
class WhiteningStats:
    """Statistics used to whiten one image (over brain-mask voxels)."""

    mean: float
    std: float
    mask_voxels: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "std": self.std, "mask_voxels": self.mask_voxels}


@dataclass(frozen=True)
class Conformed:
    """A whitened volume on the conformed grid, ready for the network.

    ``to_input`` maps conformed indices to indices of the input file's array, so the affine of any
    array derived from this grid is ``input_affine @ to_input @ T_derived``.
    """

    image: Image
    mask: np.ndarray
    to_input: np.ndarray
    whitening: WhiteningStats
    background: float
    resampled: bool
    warnings: list[str] = field(default_factory=list)


def whiten(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, WhiteningStats]:
    """Return ``(data - mean) / std`` with mean and std taken over ``mask`` voxels.

    Pure function: ``data`` is not modified. Raises :class:`InputError` for an empty mask or a
    brain of constant intensity.
    """
    mask = np.asarray(mask, dtype=bool)
    count = int(mask.sum())
    if count == 0:
        raise InputError("the brain mask is empty: no voxel to whiten")
    values = data[mask].astype(np.float64)
    mean = float(values.mean())
    std = float(values.std())
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        raise InputError(
            f"the brain has constant intensity ({mean:g}) over {count} voxels: "
            "nothing to predict from; check the image and the mask"
        )
    out = ((data.astype(np.float64) - mean) / std).astype(np.float32)
    return out, WhiteningStats(mean=mean, std=std, mask_voxels=count)


def load_mask(path: Path, image: LoadedImage) -> np.ndarray:
    """Read a brain mask that must share ``image``'s voxel grid; voxels > 0 are brain."""
    mask = load_image(path, what="mask")
    if not same_grid(mask.shape, mask.image.affine, image.shape, image.image.affine):
        raise InputError(
            f"mask {path} is on another grid than {image.path} "
            f"(mask {mask.shape} at {format_mm(mask.zooms)}, image {image.shape} at "
            f"{format_mm(image.zooms)}, or different affines); "
            "resample the mask onto the image grid (nearest neighbour) first"
        )
    return mask.image.data > 0


def needs_resampling(zooms: tuple[float, float, float],
                     spacing: float = TARGET_SPACING_MM) -> bool:
    return any(abs(z - spacing) > SPACING_TOLERANCE_MM for z in zooms)


def antialias_sigmas(zooms: tuple[float, float, float], spacing: float) -> list[float]:
    """Gaussian sigma (in voxels of each axis) to apply before resampling to ``spacing`` mm.

    An axis that gets coarser is smoothed so that its resolution (FWHM) becomes ``spacing``:
    ``sigma_mm = sqrt(spacing^2 - zoom^2) / 2.3548``; axes that keep or refine their spacing are
    not smoothed. Without it, linear interpolation to a coarser grid aliases fine detail.
    """
    return [math.sqrt(max(spacing**2 - z**2, 0.0)) / 2.3548 / z for z in zooms]


def conform(
    loaded: LoadedImage, mask: np.ndarray | None = None, allow_resample: bool = True,
    spacing: float = TARGET_SPACING_MM,
) -> Conformed:
    """Mask, reorient to RAS+, resample to ``spacing`` mm isotropic when needed, and whiten.

    Without ``mask``, brain = voxels > 0 (the input is assumed skull-stripped). ``spacing`` is the
    voxel size the network was trained at (1 mm unless its weights say otherwise); an axis made
    coarser is smoothed first (:func:`antialias_sigmas`).
    """
    warnings: list[str] = []
    data = loaded.image.data
    brain = (data > 0) if mask is None else np.asarray(mask, dtype=bool)
    if not brain.any():
        what = "the mask" if mask is not None else "no voxel is > 0 (brain = voxels > 0)"
        raise InputError(f"{loaded.path}: the brain mask is empty ({what}); pass --mask")
    data = np.where(brain, data, np.float32(0.0)).astype(np.float32)

    ornt, to_input = ras_transform(loaded.image.affine, loaded.shape)
    data = reorient(data, ornt)
    brain = reorient(brain, ornt)
    affine = loaded.image.affine @ to_input

    resampled = False
    zooms = loaded.zooms
    if needs_resampling(zooms, spacing):
        if not allow_resample:
            raise InputError(
                f"{loaded.path} has {format_mm(zooms)} voxels; the model expects "
                f"{spacing:g} mm isotropic: drop --no-resample to let brainbag resample it, "
                "or resample it yourself"
            )
        sigmas = antialias_sigmas(voxel_sizes(affine), spacing)
        # Pad with background first, so that smoothing and interpolation near the array's border
        # see the zeros that lie beyond it, as they would in a scan with a larger field of view:
        # a scan cropped tightly around the brain then conforms like the uncropped one.
        pad = int(math.ceil(4 * max(sigmas))) + 2
        # counted in floats from the voxel sizes: integer grid sizes of a giant grid overflow
        # (int64) and look small
        sizes = voxel_sizes(affine)
        needed = int(min(2.0**62, max(
            math.prod(n * z / spacing + 1.0 for n, z in zip(data.shape, sizes, strict=True)),
            math.prod(float(n + 2 * pad) for n in data.shape))))
        if needed > MAX_VOXELS:
            raise InputError(
                f"{loaded.path}: resampling its {format_mm(zooms)} voxels to {spacing:g} mm "
                f"would need a grid of {needed:,} "
                f"voxels, more than brainbag accepts ({MAX_VOXELS:,}); the header's voxel "
                "sizes are implausible for a brain scan: check them (e.g. fslhd) and fix the "
                "header")
        shape, to_ras_grid = anchored_grid(data.shape, affine, spacing)
        lift = np.eye(4)
        lift[:3, 3] = pad
        padded = np.pad(data, pad)
        if max(sigmas) > 0.05:
            padded = smooth_gaussian(padded, sigmas)
        data = resample(padded, lift @ to_ras_grid, shape, "linear", fill=0.0, extrapolate=True)
        brain = resample(np.pad(brain, pad).astype(np.uint8), lift @ to_ras_grid, shape,
                         "nearest") > 0
        data = np.where(brain, data, np.float32(0.0)).astype(np.float32)
        to_input = to_input @ to_ras_grid
        affine = loaded.image.affine @ to_input
        resampled = True
        # Coarsening finer voxels to a coarser network grid is the expected path for such weights
        # (recorded as a fix, not a warning); refining coarse voxels, or any change of voxel size
        # for a 1 mm network, is worth a warning.
        if spacing <= TARGET_SPACING_MM + SPACING_TOLERANCE_MM or any(
                z > spacing + SPACING_TOLERANCE_MM for z in zooms):
            warnings.append(
                f"{loaded.path.name}: {format_mm(zooms)} voxels resampled to {spacing:g} mm "
                f"isotropic ({loaded.shape} -> {shape}, linear interpolation)"
            )
        if not brain.any():
            raise InputError(
                f"{loaded.path}: the brain mask is empty after resampling to {spacing:g} mm")

    whitened, stats = whiten(data, brain)
    background = float((0.0 - stats.mean) / stats.std)
    return Conformed(
        image=Image(whitened, affine),
        mask=brain,
        to_input=to_input,
        whitening=stats,
        background=background,
        resampled=resampled,
        warnings=warnings,
    )
