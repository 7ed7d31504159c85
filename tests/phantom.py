"""A synthetic T1 head defined in world coordinates, for the checks and fixes tests.

The brain is an egg-shaped ellipsoid (broader at the back, like a real brain) with a white-matter
core, a grey-matter shell and two ventricles; optionally a dark skull and a bright scalp around
it, and a smooth multiplicative bias field. Because every tissue is a function of world position,
any affine (flipped, permuted, oblique, anisotropic) gives the same anatomy in the world.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from conftest import make_affine, world_coords

BRAIN_SEMI_AXES = (68.0, 85.0, 60.0)  # mm along x, y, z: about 1.45 L
WM, GM, CSF, SKULL, SCALP = 110.0, 70.0, 25.0, 8.0, 95.0


def egg_radius(xyz: np.ndarray, centre: np.ndarray, taper: float = 0.25) -> np.ndarray:
    """Normalised radius of the brain egg: < 1 inside. Narrower at the front (+y)."""
    d = xyz - centre.reshape(3, *([1] * (xyz.ndim - 1)))
    ax, ay, az = BRAIN_SEMI_AXES
    y = d[1] / ay
    shrink = 1.0 - taper * np.clip(y, -1, 1)
    return np.sqrt((d[0] / (ax * shrink)) ** 2 + y**2 + (d[2] / (az * shrink)) ** 2)


def head(
    shape: tuple[int, int, int] = (96, 116, 88),
    affine: np.ndarray | None = None,
    skull: bool = False,
    bias: Callable[[np.ndarray], np.ndarray] | None = None,
    noise: float = 2.0,
    seed: int = 0,
    centre: tuple[float, float, float] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(data, affine, brain_mask)``; 2 mm voxels and the head centred by default."""
    if affine is None:
        affine = make_affine(zooms=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0))
        affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    xyz = world_coords(shape, affine)
    c = np.array(centre if centre is not None else
                 affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3])
    r = egg_radius(xyz, c)
    brain = r < 1.0
    data = np.zeros(shape, np.float64)
    data[brain] = GM
    data[r < 0.8] = WM
    d = xyz - c.reshape(3, 1, 1, 1)
    for side in (-1, 1):
        vent = ((d[0] - side * 9) / 6) ** 2 + ((d[1] + 5) / 22) ** 2 + ((d[2] - 8) / 9) ** 2 < 1
        data[vent] = CSF
    if skull:
        data[(r >= 1.0) & (r < 1.06)] = CSF
        data[(r >= 1.06) & (r < 1.16)] = SKULL
        data[(r >= 1.16) & (r < 1.3)] = SCALP
    inside = data > 0
    rng = np.random.default_rng(seed)
    data[inside] += rng.normal(0.0, noise, int(inside.sum()))
    if bias is not None:
        data = data * bias(xyz)
    data = np.where(inside, np.maximum(data, 1.0), 0.0)
    return data.astype(np.float32), affine, brain


def world_bias(strength: float = 0.5) -> Callable[[np.ndarray], np.ndarray]:
    """A smooth multiplicative field varying by ``strength`` (log units) along world x and z."""

    def field(xyz: np.ndarray) -> np.ndarray:
        return np.asarray(np.exp(strength * (xyz[0] / 140.0 + 0.6 * xyz[2] / 120.0)))

    return field
