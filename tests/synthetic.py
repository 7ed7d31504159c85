"""A synthetic labelled dataset whose age and sex are written in local texture.

Each subject is a "brain" (a box filling all but a one-voxel zero border) made of tissue
texture (white noise smoothed with a Gaussian) sprinkled with small dark spots, like lesions or
enlarged perivascular spaces. Age sets the density of the spots; sex sets the orientation of the
tissue texture (longer correlation along x for females, along y for males). Intensity offset and
scale vary at random per subject, so once the image is whitened nothing but the local texture
carries the labels. The mean age cannot predict them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import nibabel as nib
import numpy as np

SPOTS_YOUNG, SPOTS_OLD = 0.02, 0.20
AGE_RANGE = (20.0, 80.0)


def spot_density(age: float) -> float:
    t = (age - AGE_RANGE[0]) / (AGE_RANGE[1] - AGE_RANGE[0])
    return SPOTS_YOUNG + t * (SPOTS_OLD - SPOTS_YOUNG)


def _smooth(noise: np.ndarray, sigmas: tuple[float, float, float]) -> np.ndarray:
    shape = noise.shape
    freqs = np.meshgrid(np.fft.fftfreq(shape[0]), np.fft.fftfreq(shape[1]),
                        np.fft.rfftfreq(shape[2]), indexing="ij")
    gauss = np.exp(-2 * np.pi**2 * sum((s * f) ** 2 for s, f in zip(sigmas, freqs, strict=True)))
    out = np.fft.irfftn(np.fft.rfftn(noise) * gauss, s=shape, axes=(0, 1, 2))
    return out / out.std()


def textured_volume(
    age: float, female: bool, shape: tuple[int, int, int], rng: np.random.Generator
) -> np.ndarray:
    """One subject: raw intensities > 0 inside the brain ellipsoid, 0 outside."""
    tissue = _smooth(rng.standard_normal(shape), (1.2, 0.4, 0.6) if female else (0.4, 1.2, 0.6))
    spots = rng.random(shape) < spot_density(age)
    texture = 0.25 * tissue - 2.0 * spots + 0.1 * rng.standard_normal(shape)
    brain = np.zeros(shape, bool)
    brain[1:-1, 1:-1, 1:-1] = True  # fills the field of view, as a brain fills a training crop
    scale = rng.uniform(15, 25)
    offset = rng.uniform(90, 120)
    # brain voxels stay > 0: brainbag's default mask (voxels > 0) must not depend on the age
    return np.where(brain, np.maximum(offset + scale * texture, 1.0), 0.0).astype(np.float32)


def make_dataset(
    folder: Path, n_subjects: int, shape: tuple[int, int, int] = (32, 32, 32), seed: int = 0,
    split_every: int = 0,
) -> Path:
    """Write ``n_subjects`` NIfTI images and a participants.tsv; return the table's path.

    With ``split_every`` > 0 the table has a ``split`` column: every ``split_every``-th subject
    goes to test, the one after it to val, the rest to train.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "images").mkdir(exist_ok=True)
    rows = []
    for i in range(n_subjects):
        age = float(rng.uniform(*AGE_RANGE))
        female = bool(rng.integers(0, 2))
        data = textured_volume(age, female, shape, rng)
        pid = f"sub-{i:03d}"
        name = f"images/{pid}_T1w.nii.gz"
        affine = np.eye(4)
        affine[:3, 3] = -np.array(shape) / 2
        nib.save(nib.Nifti1Image(data, affine), str(folder / name))
        row = {"participant_id": pid, "age": f"{age:.2f}", "sex": "F" if female else "M",
               "t1w": name}
        if split_every:
            k = i % split_every
            row["split"] = "test" if k == 0 else "val" if k == 1 else "train"
        rows.append(row)
    path = folder / "participants.tsv"
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return path
