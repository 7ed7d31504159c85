"""Fixes applied in-process before prediction: N4 bias-field correction.

Resampling to 1 mm is the other fix; it lives in :func:`brainbag.image.preprocess.conform`.

N4 (Tustison et al. 2010, SimpleITK's ``N4BiasFieldCorrectionImageFilter``) estimates a smooth
multiplicative field within the brain mask. For speed the field is fitted on a shrunk copy of the
image (about ``shrink_mm`` voxels), then its B-spline is evaluated on the full-resolution grid and
divided out there. The corrected array stays on the input's own grid with the input's affine, so
every voxel keeps its world position and maps still overlay the original file.

SimpleITK images are built in index space scaled by the voxel sizes (identity direction): N4
needs physical distances for its smoothness, not world orientation. Arrays are ``(i, j, k)``
(brainbag's convention) and transposed to SimpleITK's ``(z, y, x)`` only inside this module.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainbag.errors import InputError

N4_SHRINK_MM = 4.0
N4_ITERATIONS = (50, 50, 50, 50)
ESTIMATE_SHRINK_MM = 6.0
ESTIMATE_ITERATIONS = (50, 50, 50)


@dataclass(frozen=True)
class BiasEstimate:
    """How much a multiplicative field varies across the brain, as N4 estimates it."""

    range: float  # exp(p95 - p5) - 1 of the log field over brain voxels; 0.3 = 30 %
    seconds: float
    shrunk_spacing_mm: tuple[float, float, float]


@dataclass(frozen=True)
class N4Result:
    """A bias-corrected array on the input grid and how it was made."""

    data: np.ndarray
    field_range: float
    seconds: float
    shrink: tuple[int, int, int]
    shrunk_spacing_mm: tuple[float, float, float]
    iterations: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """The record of this fix written to ``prediction.json``."""
        return {
            "name": "n4",
            "description": "N4 bias-field correction within the brain mask "
                           "(SimpleITK; field fitted on a shrunk image, divided out at full "
                           "resolution on the input grid)",
            "field_range_percent": round(100 * self.field_range, 2),
            "shrink_factors": list(self.shrink),
            "shrunk_spacing_mm": [round(s, 4) for s in self.shrunk_spacing_mm],
            "iterations": list(self.iterations),
            "seconds": round(self.seconds, 3),
        }


def _to_sitk(array: np.ndarray, spacing: tuple[float, float, float]) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    return image


def _from_sitk(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return np.ascontiguousarray(sitk.GetArrayFromImage(image).transpose(2, 1, 0))


def _shrink_factors(zooms: tuple[float, float, float], target_mm: float,
                    shape: tuple[int, ...]) -> tuple[int, int, int]:
    f = [max(1, min(int(round(target_mm / z)), n // 4 or 1)) for z, n in zip(zooms, shape,
                                                                           strict=True)]
    return (f[0], f[1], f[2])


def _fit_n4(
    data: np.ndarray, mask: np.ndarray, zooms: tuple[float, float, float], shrink_mm: float,
    iterations: tuple[int, ...],
) -> tuple[Any, Any, Any, np.ndarray, tuple[int, int, int]]:
    """Run N4 on a shrunk copy; returns (filter, full image, shrunk image, shrunk mask, factors)."""
    import SimpleITK as sitk

    brain = np.asarray(mask, dtype=bool) & np.isfinite(data) & (data > 0)
    if brain.sum() < 100:
        raise InputError("N4 needs a brain mask with positive intensities: fewer than 100 "
                         "brain voxels are > 0")
    full = _to_sitk(np.where(np.isfinite(data), data, 0).astype(np.float32), zooms)
    full_mask = _to_sitk(brain.astype(np.uint8), zooms)
    factors = _shrink_factors(zooms, shrink_mm, data.shape)
    small = sitk.Shrink(full, list(factors))
    small_mask = sitk.Shrink(full_mask, list(factors))
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    return n4, full, small, _from_sitk(small_mask) > 0, factors


def _shrink_plan(shape: tuple[int, ...], zooms: tuple[float, float, float],
                 factors: tuple[int, int, int]) -> tuple[tuple[slice, ...], list[float]]:
    """Which voxels ``sitk.Shrink`` keeps of an image of ``shape`` and ``zooms`` (origin 0, as
    :func:`_to_sitk` makes it), as slices of the ``(i, j, k)`` array, and the shrunk image's
    origin. Asked of SimpleITK itself, on one line of voxel indices per axis (its choice of the
    first voxel rounds a centred position), so that a strided view of the array equals its
    output without copying the whole image into SimpleITK."""
    import SimpleITK as sitk

    slices, origin = [], []
    for n, z, f in zip(shape, zooms, factors, strict=True):
        probe = sitk.GetImageFromArray(np.arange(n, dtype=np.float32).reshape(1, 1, n))
        probe.SetSpacing([float(z), 1.0, 1.0])
        line = sitk.Shrink(probe, [int(f), 1, 1])
        first = int(sitk.GetArrayFromImage(line).ravel()[0])
        size = line.GetSize()[0]
        slices.append(slice(first, first + f * (size - 1) + 1, f))
        origin.append(float(line.GetOrigin()[0]))
    return tuple(slices), origin


def _fit_n4_shrunk(
    data: np.ndarray, mask: np.ndarray, zooms: tuple[float, float, float], shrink_mm: float,
    iterations: tuple[int, ...], box: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Any, Any, np.ndarray]:
    """:func:`_fit_n4` for an estimate: N4 gets the same shrunk image and mask, taken as strided
    views of the arrays (only the shrunk voxels are read); the full-resolution image is never
    built. ``box``: the mask's bounding box, when known (the voxel count is taken within it).
    Returns (filter, shrunk image, shrunk brain)."""
    import SimpleITK as sitk

    from brainbag.image.io import bounding_box

    mask = np.asarray(mask, dtype=bool)
    box = bounding_box(mask) if box is None else box
    count = 0
    if box is not None:
        inner = tuple(slice(int(a), int(b)) for a, b in zip(*box, strict=True))
        values = data[inner]
        count = int(np.count_nonzero(mask[inner] & np.isfinite(values) & (values > 0)))
    if count < 100:
        raise InputError("N4 needs a brain mask with positive intensities: fewer than 100 "
                         "brain voxels are > 0")
    factors = _shrink_factors(zooms, shrink_mm, data.shape)
    kept, origin = _shrink_plan(data.shape, zooms, factors)
    values = data[kept]
    brain = mask[kept] & np.isfinite(values) & (values > 0)
    spacing = tuple(float(z) * f for z, f in zip(zooms, factors, strict=True))
    small = _to_sitk(np.where(np.isfinite(values), values, 0).astype(np.float32),
                     (spacing[0], spacing[1], spacing[2]))
    small_mask = _to_sitk(brain.astype(np.uint8), (spacing[0], spacing[1], spacing[2]))
    for image in (small, small_mask):
        image.SetOrigin(origin)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.Execute(small, small_mask)
    return n4, small, brain


def _field_range(log_field: np.ndarray, brain: np.ndarray) -> float:
    values = log_field[brain]
    if values.size == 0:
        return 0.0
    p5, p95 = np.percentile(values, [5, 95])
    return float(np.exp(p95 - p5) - 1.0)


def estimate_bias(
    data: np.ndarray, mask: np.ndarray, zooms: tuple[float, float, float],
    shrink_mm: float = ESTIMATE_SHRINK_MM, iterations: tuple[int, ...] = ESTIMATE_ITERATIONS,
    box: tuple[np.ndarray, np.ndarray] | None = None,
) -> BiasEstimate:
    """Estimate the bias field's variation across the brain with a coarse, quick N4 fit.

    The statistic is ``exp(p95 - p5) - 1`` of N4's log field over brain voxels: the ratio between
    the field's high and low values, ignoring the extreme 5 % at each end. ``box``: the mask's
    bounding box, when the caller has it.
    """
    t0 = time.perf_counter()
    n4, small, small_brain = _fit_n4_shrunk(data, mask, zooms, shrink_mm, iterations, box)
    log_field = _from_sitk(n4.GetLogBiasFieldAsImage(small))
    spacing = tuple(float(s) for s in small.GetSpacing())
    return BiasEstimate(
        range=_field_range(log_field, small_brain),
        seconds=time.perf_counter() - t0,
        shrunk_spacing_mm=(spacing[0], spacing[1], spacing[2]),
    )


def n4_correct(
    data: np.ndarray, mask: np.ndarray, zooms: tuple[float, float, float],
    shrink_mm: float = N4_SHRINK_MM, iterations: tuple[int, ...] = N4_ITERATIONS,
) -> N4Result:
    """N4 bias-field correction of ``data`` within ``mask``, on the same grid.

    The field is fitted on a copy shrunk to about ``shrink_mm`` voxels and evaluated at full
    resolution; ``data / field`` is returned (float32, same shape, so the same affine applies).
    """
    t0 = time.perf_counter()
    n4, full, _small, _small_brain, factors = _fit_n4(data, mask, zooms, shrink_mm, iterations)
    log_field = _from_sitk(n4.GetLogBiasFieldAsImage(full)).astype(np.float32)
    brain = np.asarray(mask, dtype=bool)
    field_range = _field_range(log_field, brain)
    corrected = (data / np.exp(log_field)).astype(np.float32)
    spacing = tuple(float(z) * f for z, f in zip(zooms, factors, strict=True))
    return N4Result(
        data=corrected,
        field_range=field_range,
        seconds=time.perf_counter() - t0,
        shrink=factors,
        shrunk_spacing_mm=(spacing[0], spacing[1], spacing[2]),
        iterations=tuple(iterations),
    )
