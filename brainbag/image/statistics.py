"""Image statistics the checks measure: the voxel values' range, the head object's volume, the
brain mask's bounding box and connected components, its asymmetry along the anterior-posterior
axis, the obliquity of the affine, the mask's contact with the image border and its extent in
millimetres. Plain functions of arrays and affines; the thresholds that judge them are in
:mod:`brainbag.image.checks`.

Cost: a check runs on every scan of a batch, so each statistic reads the full array as few times
as it can. Arrays go to SimpleITK without transposing: SimpleITK reads a C-ordered ``(i, j, k)``
array as ``(z, y, x)``, so voxel sizes and per-axis factors are given to it reversed, and what it
returns is again ``(i, j, k)``. Statistics of the brain mask take the mask cut to its bounding
box (:func:`crop_to_box`): the voxels outside it are all False.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from brainbag.image.io import bounding_box, voxel_sizes

Box = tuple[np.ndarray, np.ndarray]


def _sitk(array: np.ndarray, spacing: Sequence[float]) -> Any:
    """A SimpleITK image of an ``(i, j, k)`` array, without a transposing copy."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    image.SetSpacing([float(s) for s in reversed(spacing)])
    return image


def _array(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image)


@dataclass(frozen=True)
class ValueRange:
    """What several checks ask of the voxel values, from one or two passes over them."""

    non_finite: int  # NaN or infinite voxels
    lo: float  # smallest finite value (nan when none is finite)
    hi: float  # largest finite value

    @property
    def finite(self) -> bool:
        return self.non_finite == 0


def value_range(data: np.ndarray) -> ValueRange:
    """Count of non-finite voxels and the finite range. The common case (all finite) costs a
    min and a max: either is NaN or infinite exactly when some voxel is."""
    lo, hi = float(data.min()), float(data.max())
    if np.isfinite(lo) and np.isfinite(hi):
        return ValueRange(0, lo, hi)
    finite = np.isfinite(data)
    count = int(finite.sum())
    if count == 0:
        return ValueRange(int(data.size), float("nan"), float("nan"))
    values = data[finite]
    return ValueRange(int(data.size) - count, float(values.min()), float(values.max()))


def distinct_at_least(values: np.ndarray, enough: int, first: int = 100_000) -> int:
    """Number of distinct ``values``, counted exactly when fewer than ``enough``.

    Counted first on an evenly spaced subset of about ``first`` of them: a subset holds no more
    distinct values than the whole, so when it already holds ``enough`` that count is returned
    (a lower bound); otherwise all ``values`` are counted.
    """
    subset = values[:: max(1, values.size // first)]
    found = int(np.unique(subset).size)
    if found >= enough or subset.size == values.size:
        return found
    return int(np.unique(values).size)


def _fill_holes(tissue: np.ndarray) -> np.ndarray:
    """``tissue`` with every enclosed cavity filled: the background that is not face-connected
    to the image border becomes tissue (what SimpleITK's BinaryFillhole does, at the cost of one
    connected-component pass)."""
    import SimpleITK as sitk

    labels = _array(sitk.ConnectedComponent(_sitk((~tissue).astype(np.uint8), (1, 1, 1))))
    outside = np.zeros(int(labels.max()) + 1, dtype=bool)
    for axis in range(3):
        for end in (0, -1):
            outside[np.take(labels, end, axis=axis)] = True
    outside[0] = False  # label 0 is tissue
    return ~outside[labels]


def head_object_litres(data: np.ndarray, zooms: tuple[float, float, float],
                       finite: bool = False) -> float:
    """Volume in litres of the largest bright object with its holes filled.

    On a copy block-averaged to about 2 mm: voxels above 10 % of the 99th percentile of the
    positive voxels are tissue; tissue with every enclosed cavity filled (ventricles; the dark
    skull and CSF inside a scalp), largest connected piece. That is the brain in a skull-stripped
    scan and the whole head in a scan with skull and scalp. ``finite``: the caller knows every
    voxel is finite (else a min and a max tell; a cleaned copy is made only when one is not).
    """
    import SimpleITK as sitk

    # at most the axis length: BinShrink refuses a bin larger than the image
    factors = [min(n, max(1, int(round(2.0 / z)))) for n, z in zip(data.shape, zooms, strict=True)]
    if not finite:  # a min and a max tell whether any voxel is NaN or infinite
        finite = bool(np.isfinite(data.min()) and np.isfinite(data.max()))
    clean = data if finite else np.where(np.isfinite(data), data, 0)
    small = sitk.BinShrink(_sitk(clean.astype(np.float32, copy=False), zooms), factors[::-1])
    values = _array(small)
    positive = values[values > 0]
    if positive.size == 0:
        return 0.0
    tissue = values > 0.1 * float(np.percentile(positive, 99))
    if not tissue.any():
        return 0.0
    # fill before choosing the largest object: a scalp enclosing a dark skull encloses the brain
    filled = _fill_holes(tissue)
    labels = _array(sitk.ConnectedComponent(_sitk(filled.astype(np.uint8), (1, 1, 1))))
    largest = int(np.bincount(labels.ravel())[1:].max())
    return float(largest * np.prod(small.GetSpacing()) / 1e6)


def crop_to_box(mask: np.ndarray, box: Box | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``mask`` cut to its bounding box (a view) and the index of the box's first voxel; an empty
    mask is returned whole."""
    box = bounding_box(mask) if box is None else box
    if box is None:
        return mask, np.zeros(3, dtype=int)
    lo, hi = box
    return mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]], np.asarray(lo)


def component_fractions(mask: np.ndarray) -> tuple[int, float]:
    """Number of 26-connected components of ``mask`` and the largest one's share of its voxels.
    (The mask may be cut to its bounding box: the components are the same.)"""
    import SimpleITK as sitk

    labels = _array(sitk.ConnectedComponent(_sitk(mask.astype(np.uint8), (1, 1, 1)), True))
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return 0, 0.0
    return int(sizes.size), float(sizes.max() / sizes.sum())


def skewness_along_world(mask: np.ndarray, affine: np.ndarray, max_points: int = 400_000,
                         start: Sequence[int] | np.ndarray = (0, 0, 0)) -> np.ndarray:
    """Skewness of the world x, y, z coordinates of the mask's voxels (every n-th voxel in array
    order, at most ``max_points``). ``mask`` may be cut from a larger array whose voxel
    ``start`` is its first: the voxels and their order are those of the whole array."""
    flat = np.flatnonzero(mask)
    step = max(1, len(flat) // max_points)
    ijk = np.unravel_index(flat[::step], mask.shape)
    del flat
    moments = np.zeros((2, 3))
    for axis in range(3):  # one world axis at a time: a few arrays of one coordinate each
        world = np.full(len(ijk[0]), affine[axis, 3] + affine[axis, :3] @ np.asarray(
            start, dtype=np.float64))
        for a in range(3):
            world += affine[axis, a] * ijk[a]
        centred = world - world.mean()
        squared = centred * centred  # products, not ** 3: numpy's power is many times slower
        moments[:, axis] = squared.mean(), (squared * centred).mean()
    m2, m3 = moments
    return np.asarray(m3 / np.maximum(m2, 1e-12) ** 1.5)


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and the world axis closest to it."""
    import nibabel as nib

    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(affine)))))


_FACE_NAMES = {(0, 1): "right", (0, -1): "left", (1, 1): "anterior", (1, -1): "posterior",
               (2, 1): "superior", (2, -1): "inferior"}


def border_contact(mask: np.ndarray, affine: np.ndarray, box: Box | None = None
                   ) -> dict[str, float]:
    """Brain area (cm^2) on each face of the image box, keyed by anatomical direction. With the
    mask's bounding ``box``, only the faces it reaches are read."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = voxel_sizes(affine)
    contact: dict[str, float] = {}
    for axis in range(3):
        world, sign = int(ornt[axis, 0]), int(ornt[axis, 1])
        others = [zooms[a] for a in range(3) if a != axis]
        pixel_cm2 = others[0] * others[1] / 100.0
        for end, direction in ((0, -sign), (mask.shape[axis] - 1, sign)):
            reached = box is None or int(box[0][axis]) <= end < int(box[1][axis])
            face = int(np.count_nonzero(np.take(mask, end, axis=axis))) if reached else 0
            contact[_FACE_NAMES[(world, direction)]] = float(face) * pixel_cm2
    return contact


def brain_extent_mm(mask: np.ndarray, affine: np.ndarray, box: Box | None = None
                    ) -> tuple[float, float, float]:
    """Bounding box of the mask along the conformed (closest R, A, S) axes, in mm (``box``: the
    mask's bounding box, when known)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = voxel_sizes(affine)
    extent = [0.0, 0.0, 0.0]
    box = bounding_box(mask) if box is None else box
    if box is not None:
        for axis in range(3):
            extent[int(ornt[axis, 0])] = float(box[1][axis] - box[0][axis]) * zooms[axis]
    return (extent[0], extent[1], extent[2])
