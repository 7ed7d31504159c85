"""N4 bias-field correction: removes the field it should, where it should, on the input grid."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_affine, rotation, world_coords
from phantom import WM, egg_radius, head, world_bias

from brainbag.errors import InputError
from brainbag.image.fixes import estimate_bias, n4_correct


def _oblique_head(strength: float):
    zooms = (2.2, 1.8, 2.5)
    affine = make_affine(zooms=zooms, flips=(-1, 1, 1), rot=rotation(2, 20) @ rotation(0, -10))
    shape = tuple(int(np.ceil(250 / z)) for z in zooms)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)  # head centred on the grid
    data, affine, brain = head(shape=shape, affine=affine,  # type: ignore[arg-type]
                               bias=world_bias(strength) if strength else None, noise=1.0)
    return data, affine, brain, zooms


def test_n4_removes_the_field_at_its_world_position() -> None:
    data, affine, brain, zooms = _oblique_head(0.5)
    result = n4_correct(data, brain, zooms, shrink_mm=6.0, iterations=(40, 40, 40))
    assert result.data.shape == data.shape and result.data.dtype == np.float32
    assert result.seconds > 0 and result.shrink == (3, 3, 2)
    # the field N4 divided out, compared with the true field evaluated at each voxel's world
    # position (through the oblique, flipped, anisotropic affine)
    xyz = world_coords(data.shape, affine)
    radius = egg_radius(xyz, affine[:3, :3] @ ((np.array(data.shape) - 1) / 2) + affine[:3, 3])
    inner = brain & (radius < 0.9)
    found = np.log(data[inner] / result.data[inner])
    truth = np.log(world_bias(0.5)(xyz)[inner])
    flip_x = np.array([-1.0, 1.0, 1.0]).reshape(3, 1, 1, 1)
    mirrored = np.log(world_bias(0.5)(xyz * flip_x)[inner])
    found, truth, mirrored = (v - v.mean() for v in (found, truth, mirrored))
    assert np.corrcoef(found, truth)[0, 1] > 0.97
    assert np.corrcoef(found, mirrored)[0, 1] < 0.5  # a field placed in the wrong world
    assert np.sqrt(np.mean((found - truth) ** 2)) < 0.2 * truth.std()
    # white matter is uniform again
    labels, _, _ = head(shape=data.shape, affine=affine, noise=0.0)
    wm = labels == WM
    before = data[wm].std() / data[wm].mean()
    after = result.data[wm].std() / result.data[wm].mean()
    assert after < before / 4, (before, after)
    assert abs(result.field_range - estimate_bias(data, brain, zooms).range) < 0.1


def test_n4_leaves_a_flat_image_flat() -> None:
    data, _, brain, zooms = _oblique_head(0.0)
    result = n4_correct(data, brain, zooms, shrink_mm=6.0, iterations=(40, 40, 40))
    assert result.field_range < 0.03
    np.testing.assert_allclose(result.data[brain], data[brain], rtol=0.03)


def test_n4_needs_a_brain() -> None:
    with pytest.raises(InputError, match="fewer than 100"):
        n4_correct(np.zeros((20, 20, 20), np.float32), np.ones((20, 20, 20), bool),
                   (1.0, 1.0, 1.0))
