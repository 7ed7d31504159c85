from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_affine, save

from brainbag.errors import InputError
from brainbag.image.io import load_image
from brainbag.image.preprocess import conform, load_mask, whiten


def _brain(shape=(30, 34, 28), value_range=(50.0, 150.0), seed=0):
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    inner = tuple(slice(5, n - 5) for n in shape)
    data[inner] = rng.uniform(*value_range, size=[n - 10 for n in shape])
    return data


def test_whiten_is_pure_and_standardises_the_mask() -> None:
    data = _brain()
    mask = data > 0
    before = data.copy()
    out, stats = whiten(data, mask)
    np.testing.assert_array_equal(data, before)
    assert stats.mask_voxels == int(mask.sum())
    assert abs(out[mask].mean()) < 1e-5 and abs(out[mask].std() - 1) < 1e-5
    np.testing.assert_allclose(out[~mask], -stats.mean / stats.std, rtol=1e-6)
    np.testing.assert_allclose(stats.mean, data[mask].mean(), rtol=1e-6)


def test_whiten_refuses_empty_masks_and_constant_brains() -> None:
    data = _brain()
    with pytest.raises(InputError, match="empty"):
        whiten(data, np.zeros_like(data, bool))
    with pytest.raises(InputError, match="constant"):
        whiten(np.full((5, 5, 5), 7.0, np.float32), np.ones((5, 5, 5), bool))


def test_mask_sets_everything_outside_to_background(tmp_path: Path) -> None:
    data = _brain() + 10.0  # "skull on": no zero background
    affine = make_affine()
    img = save(data, affine, tmp_path / "t1.nii.gz")
    mask = np.zeros(data.shape, np.uint8)
    mask[8:20, 8:22, 8:18] = 1
    mpath = save(mask, affine, tmp_path / "mask.nii.gz")
    loaded = load_image(img)
    c = conform(loaded, load_mask(mpath, loaded))
    assert c.mask.sum() == mask.sum()
    assert np.allclose(c.image.data[~c.mask], c.background)
    assert c.whitening.mask_voxels == int(mask.sum())
    np.testing.assert_allclose(c.whitening.mean, data[mask > 0].mean(), rtol=1e-5)
    assert not c.resampled and c.warnings == []


def test_mask_on_another_grid_is_refused(tmp_path: Path) -> None:
    data = _brain()
    img = save(data, make_affine(), tmp_path / "t1.nii.gz")
    shifted = make_affine(origin=(-39.0, -50.0, -30.0))
    m1 = save(data > 0, shifted, tmp_path / "shifted_mask.nii.gz")
    m2 = save(np.ones((10, 10, 10)), make_affine(), tmp_path / "small_mask.nii.gz")
    loaded = load_image(img)
    for m in (m1, m2):
        with pytest.raises(InputError, match="another grid") as info:
            load_mask(m, loaded)
        assert str(m) in str(info.value) and "\n" not in str(info.value)


def test_off_1mm_inputs_are_resampled_with_a_warning_or_refused(tmp_path: Path) -> None:
    data = _brain()
    img = save(data, make_affine(zooms=(1.2, 0.9375, 1.0), flips=(-1, 1, 1)), tmp_path / "a.nii")
    loaded = load_image(img)
    c = conform(loaded)
    assert c.resampled and c.image.zooms == pytest.approx((1.0, 1.0, 1.0))
    assert c.image.shape == (37, 33, 29)  # the world-anchored grid has one more voxel per axis
    assert "resampled to 1 mm" in c.warnings[0]
    with pytest.raises(InputError, match="--no-resample"):
        conform(loaded, allow_resample=False)


def test_empty_image_is_refused(tmp_path: Path) -> None:
    img = save(np.zeros((20, 20, 20)), make_affine(), tmp_path / "zero.nii.gz")
    with pytest.raises(InputError, match="empty"):
        conform(load_image(img))
