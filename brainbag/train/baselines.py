"""The baselines every cross-validated figure is shown next to: what a model must beat.

* **Per-site training mean**: every held-out image is predicted the mean age of the training
  images of its site (its dataset's site; an unseen site, as in leave-one-dataset-out, gets the
  mean of all training images) and P(female) = the female share of those images, so its sex call
  is the site's majority sex. It removes the confound of site and age (a model that only
  recognises the scanner of a young cohort matches it, not more).
* **Morphometric baseline**: a few whole-brain numbers measured inside the brain mask on the
  conformed, whitened volume the network sees (:func:`morphometrics`), with a ridge regression
  for the age and an L2-penalised logistic regression for the sex, both fitted on the training
  images only, on standardised features (and, for the age, the standardised age) with the fixed
  penalty :data:`PENALTY` (chosen before any figure was seen, never tuned). It stands for what
  global atrophy and head size alone give: a network that does not beat it has learnt nothing
  beyond them.

Everything here is numpy; nothing is fitted on held-out data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from brainbag.image.masks import MaskCache
    from brainbag.train.datasets import ImageRecord

#: the whitened intensities below which a brain voxel counts as CSF-like
DARK_THRESHOLDS = (-1.5, -1.0)
#: edges of the intensity histogram: 12 bins of 0.5 SD over [-3, 3]; values beyond are counted
#: in the end bins
HISTOGRAM_EDGES = np.linspace(-3.0, 3.0, 13)
FEATURES = (
    "brain_volume_ml",
    *(f"share_below_{t:g}sd" for t in DARK_THRESHOLDS),
    *(f"hist_{lo:g}_{hi:g}" for lo, hi in zip(HISTOGRAM_EDGES[:-1], HISTOGRAM_EDGES[1:],
                                               strict=True)),
)
#: the L2 penalty of both fits: mean loss + PENALTY * |w|^2 on standardised features
PENALTY = 0.1
DESCRIPTION = {
    "site_mean": "per-site training mean: the mean age of the training images of the held-out "
                 "image's site (all training images for a site not trained on) and P(female) = "
                 "their female share (the site's majority sex)",
    "morphometric": (
        f"morphometric: ridge regression (age) and logistic regression (sex), penalty "
        f"{PENALTY:g} on standardised features, fitted on the training images only, on "
        f"{len(FEATURES)} whole-brain numbers measured inside the brain mask on the conformed "
        "volume the network sees: brain volume (mL), the share of brain voxels below -1.5 and "
        "below -1.0 SD of the whitened intensity, and a 12-bin histogram of whitened "
        "intensities over [-3, 3] SD"),
}


def morphometrics(data: np.ndarray, mask: np.ndarray, voxel_mm: float) -> np.ndarray:
    """The :data:`FEATURES` of one conformed volume: ``data`` whitened within ``mask`` (as
    :func:`brainbag.image.preprocess.conform` leaves it), on a grid of ``voxel_mm`` voxels."""
    brain = np.asarray(mask, dtype=bool)
    values = np.asarray(data, dtype=np.float64)[brain]
    n = values.size
    if n == 0:
        raise ValueError("the brain mask is empty: no morphometric features")
    volume = n * voxel_mm**3 / 1000.0
    shares = [float((values < t).sum()) / n for t in DARK_THRESHOLDS]
    clipped = np.clip(values, HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1])
    counts, _ = np.histogram(clipped, bins=HISTOGRAM_EDGES)
    return np.array([volume, *shares, *(counts / n)], dtype=np.float64)


def record_features(record: ImageRecord, voxel_mm: float, cache: MaskCache | None = None
                    ) -> np.ndarray:
    """:func:`morphometrics` of one training image, conformed as the network sees it (a head's
    stripped mask taken from, or put in, ``cache``)."""
    from brainbag.train.datasets import conform_record

    conformed = conform_record(record, voxel_mm, cache)
    return morphometrics(conformed.image.data, conformed.mask, voxel_mm)


@dataclass(frozen=True)
class Standardiser:
    """Feature means and SDs of a training set (an SD of 0 is taken as 1)."""

    mean: np.ndarray
    sd: np.ndarray

    @classmethod
    def fit(cls, x: np.ndarray) -> Standardiser:
        x = np.asarray(x, dtype=np.float64)
        sd = x.std(axis=0)
        return cls(x.mean(axis=0), np.where(sd > 1e-12, sd, 1.0))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, dtype=np.float64) - self.mean) / self.sd


@dataclass(frozen=True)
class RidgeFit:
    """``y = y_mean + y_sd * z @ coef`` with ``z`` the standardised features."""

    scale: Standardiser
    y_mean: float
    y_sd: float
    coef: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.y_mean + self.y_sd * (self.scale(np.atleast_2d(x)) @ self.coef)


def fit_ridge(x: np.ndarray, y: Sequence[float] | np.ndarray, penalty: float = PENALTY
              ) -> RidgeFit:
    """Ridge regression: the ``coef`` minimising ``mean((y_std - z @ coef)^2) + penalty *
    |coef|^2`` with ``z`` the standardised features and ``y_std`` the standardised target (the
    intercept, the mean, is not penalised)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    t = np.asarray(y, dtype=np.float64)
    if x.shape[0] != t.size or t.size == 0:
        raise ValueError(f"{x.shape[0]} feature rows for {t.size} targets")
    scale = Standardiser.fit(x)
    z = scale(x)
    y_mean, y_sd = float(t.mean()), float(t.std())
    y_sd = y_sd if y_sd > 1e-12 else 1.0
    n, p = z.shape
    gram = z.T @ z / n + penalty * np.eye(p)
    coef = np.linalg.solve(gram, z.T @ ((t - y_mean) / y_sd) / n)
    return RidgeFit(scale, y_mean, y_sd, coef)


@dataclass(frozen=True)
class LogisticFit:
    """``P = sigmoid(intercept + z @ coef)`` with ``z`` the standardised features."""

    scale: Standardiser
    intercept: float
    coef: np.ndarray

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(self.intercept + self.scale(np.atleast_2d(x)) @ self.coef)


def _sigmoid(a: np.ndarray) -> np.ndarray:
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * a)))


def fit_logistic(x: np.ndarray, y: Sequence[bool] | np.ndarray, penalty: float = PENALTY,
                 iterations: int = 100) -> LogisticFit:
    """L2-penalised logistic regression: the intercept and ``coef`` minimising the mean
    log-loss + ``penalty * |coef|^2`` on standardised features (the intercept is not penalised),
    by Newton's method with step halving. With one class only in ``y`` the coefficients are 0
    and P is that class (0 or 1)."""
    x = np.atleast_2d(np.asarray(x, dtype=np.float64))
    t = np.asarray(y, dtype=np.float64)
    if x.shape[0] != t.size or t.size == 0:
        raise ValueError(f"{x.shape[0]} feature rows for {t.size} targets")
    scale = Standardiser.fit(x)
    z = scale(x)
    n, p = z.shape
    share = float(t.mean())
    if share in (0.0, 1.0):  # one class: no boundary to fit
        return LogisticFit(scale, float("inf") if share else float("-inf"), np.zeros(p))
    design = np.hstack([np.ones((n, 1)), z])
    ridge = 2 * penalty * np.diag([0.0] + [1.0] * p)

    def objective(beta: np.ndarray) -> float:
        a = design @ beta
        # log(1 + e^a) - t * a, the log-loss of a logit, computed without overflow
        return float(np.mean(np.logaddexp(0.0, a) - t * a) + penalty * beta[1:] @ beta[1:])

    beta = np.zeros(p + 1)
    beta[0] = np.log(share / (1 - share))
    value = objective(beta)
    for _ in range(iterations):
        prob = _sigmoid(design @ beta)
        grad = design.T @ (prob - t) / n + ridge @ beta
        hess = (design * (prob * (1 - prob))[:, None]).T @ design / n + ridge
        step = np.linalg.solve(hess + 1e-12 * np.eye(p + 1), grad)
        shrink = 1.0
        while shrink > 1e-8:
            candidate = beta - shrink * step
            new_value = objective(candidate)
            if new_value <= value:
                break
            shrink /= 2
        else:
            break
        beta, value = candidate, new_value
        if float(np.abs(shrink * step).max()) < 1e-12:
            break
    return LogisticFit(scale, float(beta[0]), beta[1:])
