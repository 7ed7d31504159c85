"""The morphometric baseline: its features (exact on constructed volumes) and its fits (against
independent solutions)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from brainbag.train.baselines import (
    FEATURES,
    HISTOGRAM_EDGES,
    PENALTY,
    fit_logistic,
    fit_ridge,
    morphometrics,
    record_features,
)
from brainbag.train.datasets import ImageRecord


def test_features_are_counted_inside_the_mask_only() -> None:
    data = np.full((10, 10, 10), -5.0)  # outside the mask: never counted
    mask = np.zeros((10, 10, 10), bool)
    mask[:8, :5, :5] = True  # 200 brain voxels
    brain = np.zeros(200)
    brain[:20] = -2.2  # 10 %: below -1.5 (bin [-2.5, -2))
    brain[20:50] = -1.2  # 15 %: below -1.0 only (bin [-1.5, -1))
    brain[50:60] = 3.7  # 5 %: beyond 3 SD, counted in the top bin
    brain[60:200] = 0.25  # 70 %: bin [0, 0.5)
    data[mask] = brain
    f = dict(zip(FEATURES, morphometrics(data, mask, voxel_mm=2.0), strict=True))
    assert f["brain_volume_ml"] == 200 * 8 / 1000  # 1.6 mL of 2 mm voxels
    assert f["share_below_-1.5sd"] == 0.10 and f["share_below_-1sd"] == 0.25
    hist = {k: v for k, v in f.items() if k.startswith("hist_")}
    assert len(hist) == 12 and len(HISTOGRAM_EDGES) == 13
    assert hist == {**{k: 0.0 for k in hist}, "hist_-2.5_-2": 0.10, "hist_-1.5_-1": 0.15,
                    "hist_0_0.5": 0.70, "hist_2.5_3": 0.05}
    with pytest.raises(ValueError, match="empty"):
        morphometrics(data, np.zeros_like(mask), 1.0)


def test_features_of_an_image_are_measured_on_the_conformed_whitened_volume(
        tmp_path: Path) -> None:
    """A two-level brain: 25 % of its voxels at 1, 75 % at 3 (raw), 0 outside. Whitened that is
    -sqrt(3) and 1/sqrt(3) SD, whatever the scanner's scale."""
    raw = np.zeros((12, 12, 12), np.float32)
    raw[2:10, 2:10, 2:10] = 3.0  # 512 brain voxels
    raw[2:4, 2:10, 2:10] = 1.0  # 128 of them dark
    path = tmp_path / "t1.nii.gz"
    nib.save(nib.Nifti1Image(raw * 37.0, np.eye(4)), str(path))
    f = dict(zip(FEATURES, record_features(ImageRecord("s1", path), 1.0), strict=True))
    assert f["brain_volume_ml"] == pytest.approx(0.512)
    assert f["share_below_-1.5sd"] == 0.25 and f["share_below_-1sd"] == 0.25
    assert f["hist_-2_-1.5"] == 0.25 and f["hist_0.5_1"] == 0.75


def _data(n: int = 40, p: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, p)) * rng.uniform(0.1, 50, p) + rng.uniform(-100, 100, p)
    return x, rng.normal(size=n)


def test_ridge_without_penalty_recovers_an_exact_linear_law() -> None:
    x, _ = _data()
    y = 30.0 + x @ np.array([0.5, -0.02, 1.5, 0.0, 0.3])
    fit = fit_ridge(x, y, penalty=0.0)
    assert np.allclose(fit.predict(x), y, atol=1e-9)
    assert np.allclose(fit.predict(x[:3] + 1.0), 30.0 + (x[:3] + 1.0) @ np.array(
        [0.5, -0.02, 1.5, 0.0, 0.3]), atol=1e-9)


def test_ridge_matches_the_augmented_least_squares_solution() -> None:
    """The penalised problem is an ordinary least-squares problem with sqrt(n * penalty) * I
    rows appended: solved independently with lstsq."""
    x, noise = _data(seed=1)
    y = 50 + 3 * noise + x[:, 0] * 0.1
    fit = fit_ridge(x, y)
    z = (x - x.mean(0)) / x.std(0)
    t = (y - y.mean()) / y.std()
    n, p = z.shape
    stacked = np.vstack([z, np.sqrt(n * PENALTY) * np.eye(p)])
    coef = np.linalg.lstsq(stacked, np.concatenate([t, np.zeros(p)]), rcond=None)[0]
    assert np.allclose(fit.coef, coef, atol=1e-12)
    assert np.allclose(fit.predict(x), y.mean() + y.std() * z @ coef, atol=1e-9)
    # a sample at the training means is predicted the training mean (unpenalised intercept)
    assert fit.predict(x.mean(0))[0] == pytest.approx(y.mean(), abs=1e-9)


def test_ridge_ignores_a_constant_feature_and_the_units_of_the_others() -> None:
    x, noise = _data(seed=2)
    y = 40 + 5 * noise + 0.2 * x[:, 1]
    a = fit_ridge(x, y).predict(x)
    scaled = np.hstack([x * np.array([1000, 0.001, 1, 1, 1]), np.full((len(x), 1), 7.0)])
    assert np.allclose(fit_ridge(scaled, y).predict(scaled), a, atol=1e-9)


def test_logistic_fit_is_the_minimum_of_its_penalised_objective() -> None:
    """Stationarity (the gradient vanishes) and a higher objective at every nearby point."""
    x, noise = _data(n=60, seed=3)
    y = ((x[:, 0] - x[:, 0].mean()) / x[:, 0].std() + noise) > 0.3
    fit = fit_logistic(x, y)
    z = (x - x.mean(0)) / x.std(0)
    design = np.hstack([np.ones((len(z), 1)), z])
    beta = np.concatenate([[fit.intercept], fit.coef])

    def objective(b: np.ndarray) -> float:
        a = design @ b
        return float(np.mean(np.logaddexp(0, a) - y * a) + PENALTY * b[1:] @ b[1:])

    prob = 1 / (1 + np.exp(-(design @ beta)))
    grad = design.T @ (prob - y) / len(y) + 2 * PENALTY * np.concatenate([[0], beta[1:]])
    assert np.abs(grad).max() < 1e-10
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert objective(beta + 1e-3 * rng.normal(size=beta.size)) > objective(beta)
    assert np.allclose(fit.predict(x), prob, atol=1e-12)
    # swapping the labels swaps the probabilities
    assert np.allclose(fit_logistic(x, ~y).predict(x), 1 - prob, atol=1e-8)


def test_logistic_with_one_class_predicts_that_class() -> None:
    x, _ = _data(n=10)
    assert np.all(fit_logistic(x, np.ones(10, bool)).predict(x) == 1.0)
    assert np.all(fit_logistic(x, np.zeros(10, bool)).predict(x) == 0.0)
