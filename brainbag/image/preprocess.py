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
    bounding_box,
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


def whitening_stats(values: np.ndarray) -> WhiteningStats:
    """Mean and standard deviation of the brain voxels' ``values`` (in float64).

    Raises :class:`InputError` for no values or a brain of constant intensity.
    """
    count = int(values.size)
    if count == 0:
        raise InputError("the brain mask is empty: no voxel to whiten")
    values = values.astype(np.float64, copy=False)
    mean = float(values.mean())
    std = float(values.std())
    if not np.isfinite(std) or std <= 1e-12 * max(1.0, abs(mean)):
        raise InputError(
            f"the brain has constant intensity ({mean:g}) over {count} voxels: "
            "nothing to predict from; check the image and the mask"
        )
    return WhiteningStats(mean=mean, std=std, mask_voxels=count)


def whiten(data: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, WhiteningStats]:
    """Return ``(data - mean) / std`` with mean and std taken over ``mask`` voxels.

    Pure function: ``data`` is not modified. Raises :class:`InputError` for an empty mask or a
    brain of constant intensity.
    """
    stats = whitening_stats(data[np.asarray(mask, dtype=bool)])
    out = ((data.astype(np.float64) - stats.mean) / stats.std).astype(np.float32)
    return out, stats


def _as_input(ras: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """A view of an array in RAS+ order (made by :func:`reorient` with ``ornt``) in the input's
    axis order: writing into it fills the RAS+ array, with no reorienting copy."""
    view = ras.transpose([int(a) for a in ornt[:, 0]])
    flips = tuple(axis for axis in range(3) if ornt[axis, 1] < 0)
    return np.flip(view, axis=flips) if flips else view


def _whitened(shape: tuple[int, ...], box: tuple[slice, ...], data: np.ndarray,
              brain: np.ndarray, ornt: np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray, WhiteningStats, float]:
    """The array :func:`whiten` gives for an array of ``shape`` that is zero outside ``box``
    and the brain: ``data`` and ``brain`` are the box's contents. Only the box is read; the rest
    is filled with the background ``-mean / std``. With ``ornt``, ``shape`` and ``box`` are in
    the input's axis order and the arrays returned are reoriented to RAS+ by it. Returns
    (whitened, full brain mask, stats, background)."""
    values = data[brain].astype(np.float64)
    stats = whitening_stats(values)
    background = float((0.0 - stats.mean) / stats.std)
    if ornt is not None:
        ras_shape = [0, 0, 0]
        for axis in range(3):
            ras_shape[int(ornt[axis, 0])] = shape[axis]
        shape = tuple(ras_shape)
    out = np.full(shape, np.float32(background), dtype=np.float32)
    full = np.zeros(shape, dtype=bool)
    view, full_view = (out, full) if ornt is None else (_as_input(out, ornt),
                                                        _as_input(full, ornt))
    values -= stats.mean  # in place: the same arithmetic as (values - mean) / std
    values /= stats.std
    view[box][brain] = values.astype(np.float32)
    full_view[box] = brain
    return out, full, stats, background


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


def _padded_box(values: np.ndarray, brain: np.ndarray, lo: np.ndarray, hi: np.ndarray,
                pad: int, ornt: np.ndarray, dtype: type, whole_r: bool = False,
                ) -> tuple[np.ndarray, list[int]]:
    """The brain's box ``lo``..``hi`` of ``values``, one voxel more (for interpolation), zero
    outside ``brain``, with ``pad`` zeros around it, reoriented to RAS+ (one box-sized copy and
    its reorienting copy); and the RAS+ index of its first voxel in the whole array padded with
    ``pad`` zeros. ``whole_r``: along the axis that becomes R, the box spans that padded array."""
    shape = values.shape
    start, stop = lo - 1 - pad, hi + 1 + pad  # input indices; the padded array: -pad..n+pad
    if whole_r:
        along_r = int(np.flatnonzero(ornt[:, 0] == 0)[0])
        if ornt[along_r, 1] > 0:
            start[along_r] = -pad
        else:
            stop[along_r] = shape[along_r] + pad
    box: np.ndarray = np.zeros(tuple(int(b - a) for a, b in zip(start, stop, strict=True)),
                               dtype=dtype)
    src = tuple(slice(int(max(a - 1, 0)), int(min(b + 1, n)))
                for a, b, n in zip(lo, hi, shape, strict=True))
    dst = tuple(slice(s.start - int(a), s.stop - int(a)) for s, a in zip(src, start, strict=True))
    np.copyto(box[dst], values[src], where=brain[src])
    first = [0, 0, 0]
    for axis in range(3):
        first[int(ornt[axis, 0])] = pad + int(start[axis] if ornt[axis, 1] > 0 else
                                              shape[axis] - stop[axis])
    return reorient(box, ornt), first


def conform(
    loaded: LoadedImage, mask: np.ndarray | None = None, allow_resample: bool = True,
    spacing: float = TARGET_SPACING_MM,
) -> Conformed:
    """Mask, reorient to RAS+, resample to ``spacing`` mm isotropic when needed, and whiten.

    Without ``mask``, brain = voxels > 0 (the input is assumed skull-stripped). ``spacing`` is the
    voxel size the network was trained at (1 mm unless its weights say otherwise); an axis made
    coarser is smoothed first (:func:`antialias_sigmas`).

    The result is that of the plain sequence (zero outside the brain, reorient, pad, smooth,
    resample, mask again, whiten the whole array), computed in fewer passes: only the brain's
    bounding box (and the margin smoothing and interpolation reach) is copied, masked,
    reoriented, smoothed and resampled onto the part of the output grid that can hold brain,
    and everything else is filled with the background value at once. Without resampling, the
    whitened brain is written through a reoriented view of the output: no reorienting copy.
    """
    warnings: list[str] = []
    data = loaded.image.data
    brain = (data > 0) if mask is None else np.asarray(mask, dtype=bool)
    box = bounding_box(brain)
    if box is None:
        what = "the mask" if mask is not None else "no voxel is > 0 (brain = voxels > 0)"
        raise InputError(f"{loaded.path}: the brain mask is empty ({what}); pass --mask")
    lo, hi = box

    ornt, to_input = ras_transform(loaded.image.affine, loaded.shape)
    affine = loaded.image.affine @ to_input
    zooms = loaded.zooms
    if not needs_resampling(zooms, spacing):
        inner = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
        whitened, brain, stats, background = _whitened(loaded.shape, inner, data[inner],
                                                       brain[inner], ornt)
        return Conformed(image=Image(whitened, affine), mask=brain, to_input=to_input,
                         whitening=stats, background=background, resampled=False,
                         warnings=warnings)

    if not allow_resample:
        raise InputError(
            f"{loaded.path} has {format_mm(zooms)} voxels; the model expects "
            f"{spacing:g} mm isotropic: drop --no-resample to let brainbag resample it, "
            "or resample it yourself"
        )
    sigmas = antialias_sigmas(voxel_sizes(affine), spacing)  # per RAS+ axis
    # Pad with background first, so that smoothing and interpolation near the array's border
    # see the zeros that lie beyond it, as they would in a scan with a larger field of view:
    # a scan cropped tightly around the brain then conforms like the uncropped one.
    pad = int(math.ceil(4 * max(sigmas))) + 2
    # counted in floats from the voxel sizes: integer grid sizes of a giant grid overflow
    # (int64) and look small
    needed = int(min(2.0**62, max(
        math.prod(n * z / spacing + 1.0 for n, z in zip(loaded.shape, zooms, strict=True)),
        math.prod(float(n + 2 * pad) for n in loaded.shape))))
    if needed > MAX_VOXELS:
        raise InputError(
            f"{loaded.path}: resampling its {format_mm(zooms)} voxels to {spacing:g} mm "
            f"would need a grid of {needed:,} "
            f"voxels, more than brainbag accepts ({MAX_VOXELS:,}); the header's voxel "
            "sizes are implausible for a brain scan: check them (e.g. fslhd) and fix the "
            "header")
    ras_shape = [0, 0, 0]
    for axis in range(3):
        ras_shape[int(ornt[axis, 0])] = loaded.shape[axis]
    shape, to_ras_grid = anchored_grid((ras_shape[0], ras_shape[1], ras_shape[2]), affine,
                                       spacing)
    grid_to_input = to_input @ to_ras_grid

    # The output voxels that can be brain: those whose nearest input voxel is in the box.
    corners = np.array([[a, b] for a, b in zip(lo - 0.5, hi - 0.5, strict=True)])
    points = np.array(np.meshgrid(*corners, indexing="ij")).reshape(3, -1)
    inverse = np.linalg.inv(grid_to_input)
    reach = inverse[:3, :3] @ points + inverse[:3, 3:4]
    out_lo = np.maximum(np.floor(reach.min(axis=1)).astype(int) - 1, 0)
    out_hi = np.minimum(np.ceil(reach.max(axis=1)).astype(int) + 2, shape)
    # whole along the first axis: SimpleITK steps along it from each line's first voxel, so
    # every sample (and every nearest-neighbour tie) is the whole grid's (see ``resample``)
    out_lo[0], out_hi[0] = 0, shape[0]
    out_box = tuple(slice(int(a), int(b)) for a, b in zip(out_lo, out_hi, strict=True))
    out_shape = (int(out_hi[0] - out_lo[0]), int(out_hi[1] - out_lo[1]),
                 int(out_hi[2] - out_lo[2]))

    # What the padded whole array holds near the brain, cut out: the data smoothed and
    # interpolated, the mask on the whole R axis (SimpleITK steps along it from each line's
    # first voxel: so every nearest-neighbour sample, ties included, is the whole array's).
    work, first = _padded_box(data, brain, lo, hi, pad, ornt, np.float32)
    work_brain, first_brain = _padded_box(brain, brain, lo, hi, pad, ornt, np.uint8,
                                          whole_r=True)
    lift = np.eye(4)
    lift[:3, 3] = pad
    to_padded = lift @ to_ras_grid
    if max(sigmas) > 0.05:
        work = smooth_gaussian(work, sigmas)
    values = resample(work, to_padded, out_shape, "linear", fill=0.0, extrapolate=True,
                      data_start=first, out_start=out_lo)
    inside = resample(work_brain, to_padded, out_shape, "nearest", data_start=first_brain,
                      out_start=out_lo) > 0
    to_input = grid_to_input
    affine = loaded.image.affine @ to_input
    # Coarsening finer voxels to a coarser network grid is the expected path for such weights
    # (recorded as a fix, not a warning); refining coarse voxels, or any change of voxel size
    # for a 1 mm network, is worth a warning.
    if spacing <= TARGET_SPACING_MM + SPACING_TOLERANCE_MM or any(
            z > spacing + SPACING_TOLERANCE_MM for z in zooms):
        warnings.append(
            f"{loaded.path.name}: {format_mm(zooms)} voxels resampled to {spacing:g} mm "
            f"isotropic ({loaded.shape} -> {shape}, linear interpolation)"
        )
    if not inside.any():
        raise InputError(
            f"{loaded.path}: the brain mask is empty after resampling to {spacing:g} mm")
    whitened, brain, stats, background = _whitened(shape, out_box, values, inside)
    return Conformed(
        image=Image(whitened, affine),
        mask=brain,
        to_input=to_input,
        whitening=stats,
        background=background,
        resampled=True,
        warnings=warnings,
    )
