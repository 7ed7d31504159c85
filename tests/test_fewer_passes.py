"""Issue 26: the checks and ``conform`` do their work in few passes over the image, and what they
compute is what the plain computation gives.

The cost is pinned without timing anything: the peak of the arrays allocated while the checks or
``conform`` run (``tracemalloc``, which numpy reports to), in multiples of the image's own size.
Before issue 26 the checks peaked at 4.7x a 1 mm image and ``conform`` at 4.8-5.0x (transposed
copies for SimpleITK, masked and reoriented copies of the whole array, the full-resolution image
for the bias check's shrunk copy); now under 3x. The shortcuts themselves (statistics of the mask
cut to its bounding box, holes filled by one connected-component pass, the bias check's shrunk
image read as a strided view, ``conform`` on the brain's box only) are compared with the plain
computation they replace.
"""

from __future__ import annotations

import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_affine, rotation, save
from phantom import head

from brainbag.errors import InputError
from brainbag.image import fixes
from brainbag.image.checks import CheckOptions, run_checks
from brainbag.image.io import (
    LoadedImage,
    anchored_grid,
    bounding_box,
    load_image,
    ras_transform,
    reorient,
    resample,
    smooth_gaussian,
    voxel_sizes,
)
from brainbag.image.preprocess import antialias_sigmas, conform, needs_resampling, whiten
from brainbag.image.statistics import (
    _fill_holes,
    border_contact,
    brain_extent_mm,
    component_fractions,
    crop_to_box,
    distinct_at_least,
    skewness_along_world,
    value_range,
)


def _peak(run) -> float:
    tracemalloc.start()
    try:
        run()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.fixture(scope="module")
def head_1mm(tmp_path_factory: pytest.TempPathFactory) -> LoadedImage:
    """A skull-stripped head at 1 mm, stored left-right flipped (LAS)."""
    data, affine, _ = head(shape=(160, 192, 150), affine=make_affine(
        flips=(-1, 1, 1), origin=(80.0, -96.0, -75.0)))
    return load_image(save(data, affine, tmp_path_factory.mktemp("head") / "t1.nii.gz"))


def test_the_checks_allocate_under_3x_the_image(head_1mm: LoadedImage) -> None:
    run_checks(head_1mm.path, CheckOptions(), loaded=head_1mm)  # imports, outside the count
    peak = _peak(lambda: run_checks(head_1mm.path, CheckOptions(), loaded=head_1mm))
    assert peak < 3.0 * head_1mm.image.data.nbytes, peak / head_1mm.image.data.nbytes


@pytest.mark.parametrize("spacing", [1.0, 2.0])
def test_conform_allocates_under_3x_the_image(head_1mm: LoadedImage, spacing: float) -> None:
    conform(head_1mm, spacing=spacing)
    peak = _peak(lambda: conform(head_1mm, spacing=spacing))
    assert peak < 3.0 * head_1mm.image.data.nbytes, peak / head_1mm.image.data.nbytes


def _plain_conform(loaded: LoadedImage, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """conform as the plain sequence of whole-array steps (the code before issue 26)."""
    data = loaded.image.data
    brain = data > 0
    data = np.where(brain, data, np.float32(0.0)).astype(np.float32)
    ornt, to_input = ras_transform(loaded.image.affine, loaded.shape)
    data, brain = reorient(data, ornt), reorient(brain, ornt)
    affine = loaded.image.affine @ to_input
    if needs_resampling(loaded.zooms, spacing):
        sigmas = antialias_sigmas(voxel_sizes(affine), spacing)
        pad = int(math.ceil(4 * max(sigmas))) + 2
        shape, to_grid = anchored_grid(data.shape, affine, spacing)
        lift = np.eye(4)
        lift[:3, 3] = pad
        padded = np.pad(data, pad)
        if max(sigmas) > 0.05:
            padded = smooth_gaussian(padded, sigmas)
        data = resample(padded, lift @ to_grid, shape, "linear", fill=0.0, extrapolate=True)
        brain = resample(np.pad(brain, pad).astype(np.uint8), lift @ to_grid, shape,
                         "nearest") > 0
        data = np.where(brain, data, np.float32(0.0)).astype(np.float32)
    return whiten(data, brain)[0], brain


@pytest.mark.parametrize("zooms, flips, rot, spacing", [
    ((1.0, 1.0, 1.0), (-1, 1, 1), np.eye(3), 1.0),  # reoriented only
    ((1.0, 1.0, 1.0), (1, -1, 1), np.eye(3), 2.0),  # coarsened; half-voxel ties everywhere
    ((0.94, 0.94, 1.2), (-1, 1, 1), rotation(0, 12), 2.0),  # oblique, anisotropic (IXI-like)
    ((1.33, 1.0, 1.0), (1, 1, -1), np.eye(3), 1.0),  # refined along x, like the Beijing scan
    ((4.0, 4.0, 4.0), (1, 1, 1), np.eye(3), 2.0),  # refined: a tie on every other voxel
])
def test_conform_gives_what_the_plain_sequence_gives(tmp_path: Path, zooms, flips, rot,
                                                     spacing: float) -> None:
    """The same brain mask, voxel for voxel (nearest-neighbour ties included: on a grid centred
    on world 0 they are everywhere), and the same values up to float rounding."""
    shape = tuple(int(round(n / z)) for n, z in zip((168, 200, 150), zooms, strict=True))
    affine = make_affine(zooms=zooms, flips=flips, rot=rot)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    data, affine, _ = head(shape=shape, affine=affine)  # type: ignore[arg-type]
    loaded = load_image(save(data, affine, tmp_path / "t1.nii.gz"))
    fast = conform(loaded, spacing=spacing)
    plain, plain_brain = _plain_conform(loaded, spacing)
    assert fast.image.shape == plain.shape
    np.testing.assert_array_equal(fast.mask, plain_brain)
    np.testing.assert_allclose(fast.image.data, plain, atol=2e-5)


def test_fill_holes_is_simpleitks_binary_fillhole() -> None:
    skull, _, _ = head(shape=(60, 70, 56), skull=True)
    rng = np.random.default_rng(3)
    blobs = rng.random((40, 44, 36)) > 0.55  # many cavities, some open to the border
    for tissue in (skull > 0.1 * np.percentile(skull[skull > 0], 99), blobs):
        expected = sitk.GetArrayFromImage(sitk.BinaryFillhole(
            sitk.GetImageFromArray(tissue.astype(np.uint8)))) > 0
        np.testing.assert_array_equal(_fill_holes(tissue), expected)


def test_statistics_of_the_cropped_mask_equal_those_of_the_whole() -> None:
    _, affine, brain = head()
    brain = brain.copy()
    brain[:, :3, :] = True  # reaches the posterior face
    brain[70:72, 60:62, 5:7] = True  # a second piece
    box = bounding_box(brain)
    crop, start = crop_to_box(brain, box)
    assert crop.size < brain.size
    assert component_fractions(crop) == _plain_components(brain)
    full = _plain_skewness(brain, affine)
    np.testing.assert_allclose(skewness_along_world(crop, affine, start=start), full,
                               atol=1e-12)
    assert border_contact(brain, affine, box) == border_contact(brain, affine)
    assert border_contact(brain, affine)["posterior"] > 0
    assert brain_extent_mm(brain, affine, box) == brain_extent_mm(brain, affine)


def _plain_components(mask: np.ndarray) -> tuple[int, float]:
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(
        sitk.GetImageFromArray(mask.astype(np.uint8)), True))
    sizes = np.bincount(labels.ravel())[1:]
    return int(sizes.size), float(sizes.max() / sizes.sum())


def _plain_skewness(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    idx = np.argwhere(mask)
    ijk = idx[:: max(1, len(idx) // 400_000)].T.astype(np.float64)
    xyz = affine[:3, :3] @ ijk + affine[:3, 3:4]
    centred = xyz - xyz.mean(axis=1, keepdims=True)
    return np.asarray((centred**3).mean(axis=1) / (centred**2).mean(axis=1) ** 1.5)


def test_value_range_counts_what_isfinite_counts() -> None:
    data = np.arange(24, dtype=np.float32).reshape(2, 3, 4) - 5
    found = value_range(data)
    assert (found.non_finite, found.lo, found.hi) == (0, -5.0, 18.0) and found.finite
    data[0, 0, 0], data[1, 2, 3], data[1, 0, 0] = np.nan, np.inf, -np.inf
    found = value_range(data)
    finite = data[np.isfinite(data)]
    assert (found.non_finite, found.lo, found.hi) == (3, finite.min(), finite.max())
    nothing = value_range(np.full((2, 2, 2), np.nan, np.float32))
    assert nothing.non_finite == 8 and np.isnan(nothing.lo)


def test_distinct_values_are_exact_below_the_minimum() -> None:
    labels = np.repeat(np.arange(7, dtype=np.float32), 50_000)
    labels[-1] = 99.0  # a value the first, sparser count does not see
    assert distinct_at_least(labels, 10) == 8
    varied = np.random.default_rng(0).random(1_000_000).astype(np.float32)
    assert distinct_at_least(varied, 10) >= 10


@pytest.mark.parametrize("shape, zooms", [((120, 121, 90), (2.0, 2.0, 2.0)),
                                          ((41, 40, 31), (1.0, 1.33, 0.94)),
                                          ((7, 9, 11), (1.5, 1.0, 4.0))])
def test_the_bias_checks_shrunk_image_is_simpleitks_shrink(shape, zooms) -> None:
    data = np.random.default_rng(1).random(shape).astype(np.float32)
    factors = fixes._shrink_factors(zooms, fixes.ESTIMATE_SHRINK_MM, shape)
    kept, origin = fixes._shrink_plan(shape, zooms, factors)
    shrunk = sitk.Shrink(fixes._to_sitk(data, zooms), list(factors))
    np.testing.assert_array_equal(data[kept], fixes._from_sitk(shrunk))
    assert tuple(origin) == shrunk.GetOrigin()


class _CountingInflate:
    """A zlib decompressor that adds up what it inflates (everything else is the real one's)."""

    inflated = 0

    def __init__(self, inner) -> None:
        self._inner = inner

    def decompress(self, data, max_length=0):
        out = self._inner.decompress(data, max_length)
        _CountingInflate.inflated += len(out)
        return out

    def __getattr__(self, name: str):
        return getattr(self._inner, name)


def test_a_gzip_nifti_is_inflated_once_and_its_crc_still_checked(tmp_path: Path,
                                                                 monkeypatch) -> None:
    """Loading used to inflate a .nii.gz twice (once to check its CRC to the end, once to read
    the voxels); now the voxels are read from a stream that is then read to its end."""
    import gzip
    import zlib

    import nibabel as nib

    data = np.random.default_rng(2).integers(0, 1000, (60, 70, 50)).astype(np.int16)
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(data, make_affine()), str(path))
    raw_size = len(gzip.decompress(path.read_bytes()))
    real = zlib.decompressobj
    monkeypatch.setattr(zlib, "decompressobj", lambda *a, **k: _CountingInflate(real(*a, **k)))
    _CountingInflate.inflated = 0
    loaded = load_image(path)
    assert _CountingInflate.inflated < 1.2 * raw_size, _CountingInflate.inflated / raw_size
    np.testing.assert_array_equal(loaded.image.data, data)
    assert loaded.image.data.flags.c_contiguous
    monkeypatch.undo()
    damaged = bytearray(path.read_bytes())
    damaged[-6] ^= 0xFF  # the CRC, after every voxel
    (tmp_path / "bad.nii.gz").write_bytes(bytes(damaged))
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(tmp_path / "bad.nii.gz")
