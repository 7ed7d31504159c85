"""Image statistics the checks measure: the head object's volume, the brain mask's connected
components, its asymmetry along the anterior-posterior axis, the obliquity of the affine, the mask's
contact with the image border and its extent in millimetres. Plain functions of arrays and affines;
the thresholds that judge them are in :mod:`brainbag.image.checks`."""

from __future__ import annotations

from typing import Any

import numpy as np

from brainbag.image.io import bounding_box, voxel_sizes


def _sitk(array: np.ndarray, spacing: tuple[float, ...]) -> Any:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing([float(s) for s in spacing])
    return image


def _array(image: Any) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).transpose(2, 1, 0)


def head_object_litres(data: np.ndarray, zooms: tuple[float, float, float]) -> float:
    """Volume in litres of the largest bright object with its holes filled.

    On a copy block-averaged to about 2 mm: voxels above 10 % of the 99th percentile of the
    positive voxels are tissue; tissue with every enclosed cavity filled (ventricles; the dark
    skull and CSF inside a scalp), largest connected piece. That is the brain in a skull-stripped
    scan and the whole head in a scan with skull and scalp.
    """
    import SimpleITK as sitk

    # at most the axis length: BinShrink refuses a bin larger than the image
    factors = [min(n, max(1, int(round(2.0 / z)))) for n, z in zip(data.shape, zooms, strict=True)]
    clean = np.where(np.isfinite(data), data, 0).astype(np.float32)
    small = sitk.BinShrink(_sitk(clean, zooms), factors)
    values = _array(small)
    positive = values[values > 0]
    if positive.size == 0:
        return 0.0
    tissue = values > 0.1 * float(np.percentile(positive, 99))
    if not tissue.any():
        return 0.0
    # fill before choosing the largest object: a scalp enclosing a dark skull encloses the brain
    filled = sitk.BinaryFillhole(_sitk(tissue.astype(np.uint8), small.GetSpacing()))
    components = sitk.ConnectedComponent(filled)
    largest = _array(sitk.RelabelComponent(components, sortByObjectSize=True)) == 1
    return float(largest.sum() * np.prod(small.GetSpacing()) / 1e6)


def component_fractions(mask: np.ndarray) -> tuple[int, float]:
    """Number of 26-connected components of ``mask`` and the largest one's share of its voxels."""
    import SimpleITK as sitk

    labels = _array(sitk.ConnectedComponent(_sitk(mask.astype(np.uint8), (1.0, 1.0, 1.0)), True))
    sizes = np.bincount(labels.ravel())[1:]
    sizes = sizes[sizes > 0]
    if sizes.size == 0:
        return 0, 0.0
    return int(sizes.size), float(sizes.max() / sizes.sum())


def skewness_along_world(mask: np.ndarray, affine: np.ndarray, max_points: int = 400_000
                         ) -> np.ndarray:
    """Skewness of the world x, y, z coordinates of the mask's voxels."""
    idx = np.argwhere(mask)
    step = max(1, len(idx) // max_points)
    ijk = idx[::step].T.astype(np.float64)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    centred = xyz - xyz.mean(axis=1, keepdims=True)
    m2 = (centred**2).mean(axis=1)
    m3 = (centred**3).mean(axis=1)
    return np.asarray(m3 / np.maximum(m2, 1e-12) ** 1.5)


def obliquity_degrees(affine: np.ndarray) -> float:
    """Largest angle between a voxel axis and the world axis closest to it."""
    import nibabel as nib

    return float(np.degrees(np.max(np.abs(nib.affines.obliquity(affine)))))


_FACE_NAMES = {(0, 1): "right", (0, -1): "left", (1, 1): "anterior", (1, -1): "posterior",
               (2, 1): "superior", (2, -1): "inferior"}


def border_contact(mask: np.ndarray, affine: np.ndarray) -> dict[str, float]:
    """Brain area (cm^2) on each face of the image box, keyed by anatomical direction."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = voxel_sizes(affine)
    contact: dict[str, float] = {}
    for axis in range(3):
        world, sign = int(ornt[axis, 0]), int(ornt[axis, 1])
        others = [zooms[a] for a in range(3) if a != axis]
        pixel_cm2 = others[0] * others[1] / 100.0
        for end, direction in ((0, -sign), (mask.shape[axis] - 1, sign)):
            face = np.take(mask, end, axis=axis)
            contact[_FACE_NAMES[(world, direction)]] = float(face.sum()) * pixel_cm2
    return contact


def brain_extent_mm(mask: np.ndarray, affine: np.ndarray) -> tuple[float, float, float]:
    """Bounding box of the mask along the conformed (closest R, A, S) axes, in mm."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(affine)
    zooms = voxel_sizes(affine)
    extent = [0.0, 0.0, 0.0]
    box = bounding_box(mask)
    if box is not None:
        for axis in range(3):
            extent[int(ornt[axis, 0])] = float(box[1][axis] - box[0][axis]) * zooms[axis]
    return (extent[0], extent[1], extent[2])
