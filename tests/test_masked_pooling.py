"""Masked pooling, brain-centred views and the world-anchored grid: the global prediction does
not depend on the background or on the scanner's field of view."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainbag.image.io import load_image
from brainbag.image.preprocess import antialias_sigmas, conform
from brainbag.network.inference import InferenceSettings, brain_view, cut_view, predict_maps
from brainbag.network.model import BagNet3D, BagNetConfig, cell_weights
from brainbag.run.outputs import brain_cells


def _brute_cell_weights(mask: np.ndarray, stride: int, offset: float, shape) -> np.ndarray:
    out = np.zeros(shape)
    lo = int(np.floor(offset - stride / 2))
    for i in np.ndindex(*shape):
        box = tuple(slice(max(0, stride * k + lo), max(0, stride * k + lo + stride)) for k in i)
        out[i] = mask[box].sum() / stride**3
    return out


@pytest.mark.parametrize("offset", [0.0, 4.0, 16.0])
def test_cell_weights_are_the_brain_fraction_of_each_cell(offset: float) -> None:
    rng = np.random.default_rng(0)
    mask = rng.random((27, 35, 20)) > 0.6
    shape = (4, 5, 3)
    got = cell_weights(torch.from_numpy(mask)[None], 8, offset, shape)[0].numpy()
    np.testing.assert_allclose(got, _brute_cell_weights(mask, 8, offset, shape), atol=1e-6)
    # brain_cells (the NaN mask of the written maps) is the same rule
    assert np.array_equal(brain_cells(mask, 8, offset, shape), got > 0)


def test_masked_pooling_is_the_brain_weighted_mean_of_the_local_map() -> None:
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).double().eval()
    x = torch.randn(2, 1, 32, 40, 24, dtype=torch.float64)
    mask = torch.zeros(2, 32, 40, 24, dtype=torch.bool)
    mask[0, 4:20, 6:30, 3:18] = True
    mask[1, 10:31, 2:22, 8:24] = True
    sizes = [model.map_size(n) for n in x.shape[2:]]
    cells = cell_weights(mask, 8, model.map_offset, sizes).double()
    with torch.no_grad():
        pooled = model.pooled(x, cells)
        local = model(x)
    weighted = (local * cells[:, None]).sum(dim=(2, 3, 4)) / cells.sum(dim=(1, 2, 3))[:, None]
    torch.testing.assert_close(pooled, weighted, rtol=1e-10, atol=1e-10)
    # and not the plain mean over all cells
    assert not torch.allclose(pooled, local.mean(dim=(2, 3, 4)), atol=1e-3)


def test_brain_view_is_centred_on_the_brain_and_ignores_the_field_of_view() -> None:
    mask = np.zeros((60, 70, 50), dtype=bool)
    mask[20:41, 15:60, 10:30] = True
    start, size = brain_view(mask, (32, 40, 24))
    assert size == (32, 48, 24)  # y: the 45-voxel brain is larger than 40 -> grown to 48
    for a, (lo, hi) in enumerate([(20, 41), (15, 60), (10, 30)]):
        assert start[a] <= lo and start[a] + size[a] >= hi
        assert abs((start[a] + size[a] / 2) - (lo + hi) / 2) <= 0.5
    padded = np.pad(mask, ((7, 3), (0, 11), (13, 0)))
    start2, size2 = brain_view(padded, (32, 40, 24))
    assert size2 == size and np.array_equal(np.subtract(start2, start), (7, 0, 13))
    view = cut_view(np.ones(mask.shape, np.float32), (-5, 0, 40), (16, 16, 16), -1.0)
    assert view.shape == (16, 16, 16) and (view[:5] == -1).all() and (view[5:, :, :10] == 1).all()


def test_predict_maps_with_a_view_equals_the_network_on_the_cut_view() -> None:
    torch.manual_seed(1)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).eval()
    rng = np.random.default_rng(1)
    volume = rng.standard_normal((50, 56, 44)).astype(np.float32)
    mask = np.zeros(volume.shape, dtype=bool)
    mask[8:40, 10:50, 5:35] = True
    volume[~mask] = -0.5
    result = predict_maps(model, volume, -0.5, InferenceSettings(device="cpu"), mask=mask,
                          pooling="brain", view=(40, 48, 32))
    assert result.mode == "full"  # auto: whole-brain views are seen whole
    start, size = brain_view(mask, (40, 48, 32))
    assert result.start == start
    x = torch.from_numpy(cut_view(volume, start, size, -0.5))[None, None]
    cells = cell_weights(torch.from_numpy(cut_view(mask, start, size, False))[None], 8, 0.0,
                         [model.map_size(n) for n in size])
    with torch.no_grad():
        expected = model.pooled(x, cells)[0].numpy()
    np.testing.assert_allclose(result.global_outputs(), expected, rtol=1e-4, atol=1e-5)
    # sliding windows as large as the view give exactly the full result
    sliding = predict_maps(model, volume, -0.5, InferenceSettings(mode="sliding", device="cpu"),
                           mask=mask, pooling="brain", view=(40, 48, 32))
    assert len(sliding.windows) == 1
    np.testing.assert_allclose(sliding.maps, result.maps, rtol=1e-5, atol=1e-5)


def test_antialias_sigma_gives_the_target_resolution() -> None:
    s = antialias_sigmas((1.0, 0.5, 2.0), 2.0)
    assert s[0] == pytest.approx(np.sqrt(3) / 2.3548)
    assert s[1] == pytest.approx(np.sqrt(4 - 0.25) / 2.3548 / 0.5)
    assert s[2] == 0.0


@pytest.mark.parametrize("pad", [(0, 0, 0, 0, 0, 0), (40, 40, 0, 0, 0, 0), (3, 0, 17, 1, 0, 9)])
def test_conform_to_2mm_samples_the_anatomy_at_the_same_world_points(tmp_path: Path, pad) -> None:
    """The 2 mm grid is anchored in the world: padding the input (which changes its field of
    view, not its anatomy) gives the same conformed values at the same world points."""
    rng = np.random.default_rng(0)
    shape = (45, 52, 41)
    data = np.zeros(shape, np.float32)
    data[8:38, 9:45, 6:35] = rng.uniform(50, 150, (30, 36, 29)).astype(np.float32)
    affine = np.array([[-1.0, 0, 0, 30.3], [0, 1.0, 0, -41.7], [0, 0, 1.0, -12.2], [0, 0, 0, 1]])
    base = tmp_path / "base.nii.gz"
    nib.save(nib.Nifti1Image(data, affine), base)
    p = pad
    padded = np.pad(data, ((p[0], p[1]), (p[2], p[3]), (p[4], p[5])))
    shifted = affine.copy()
    shifted[:3, 3] -= affine[:3, :3] @ np.array([p[0], p[2], p[4]], dtype=float)
    other = tmp_path / "padded.nii.gz"
    nib.save(nib.Nifti1Image(padded, shifted), other)
    a = conform(load_image(base), spacing=2.0)
    b = conform(load_image(other), spacing=2.0)
    assert a.image.zooms == pytest.approx((2.0, 2.0, 2.0))
    # the index offset between the two grids is an integer: same world lattice
    offset = np.linalg.solve(b.image.affine, a.image.affine)
    np.testing.assert_allclose(offset[:3, :3], np.eye(3), atol=1e-9)
    k = offset[:3, 3]
    np.testing.assert_allclose(k, np.round(k), atol=1e-6)
    k = np.round(k).astype(int)
    assert np.array_equal(b.mask[k[0]:k[0] + a.mask.shape[0], k[1]:k[1] + a.mask.shape[1],
                                 k[2]:k[2] + a.mask.shape[2]], a.mask)
    got = b.image.data[k[0]:k[0] + a.mask.shape[0], k[1]:k[1] + a.mask.shape[1],
                       k[2]:k[2] + a.mask.shape[2]]
    np.testing.assert_allclose(got[a.mask], a.image.data[a.mask], atol=1e-4)
