"""Site calibration: a site fits the reading of a prediction to its own scanner with its controls.

Every brain-age model carries a bias that depends on the scanner, the protocol and the age
range. The weights store a calibration fitted on their own cross-validation
(:func:`brainbag.person.clinical.fit_calibration`: bias line, interval, map-spread range); this
module fits the same calibration on healthy controls scanned at one site, so ``brainbag predict
--calibration site-calibration.json`` can use it in place of the weights' own. The arithmetic
is clinical.py's, not a second copy: the full line, the residual-free figures, the conformal
interval and the map-spread range come from
:func:`~brainbag.person.clinical.fit_calibration` on the controls, and every corrected gap here
(the controls' table, the effect summary, the bench) is computed by
:func:`~brainbag.person.clinical.read_prediction`, the function predict calls.

What is fitted on the controls
------------------------------
* **bias line** (de Lange & Cole 2020): ``predicted = slope * age + intercept`` by least
  squares; corrected gap = ``(predicted - intercept) / slope - age``. Either the **full line**
  (slope and intercept fitted) or the **offset line**: the weights' own slope kept and only the
  intercept fitted, ``intercept = mean(predicted - slope * age)`` over the controls (the least
  squares intercept for a fixed slope). Which one is chosen, and why, is written in the file.
* **residual SD**: the SD of ``predicted - (slope * age + intercept)`` over the controls
  (``ddof`` 2 for the full line, 1 for the offset line).
* **90 % age interval**: split conformal, as clinical.py does for the weights (predicted age
  +/- the ``ceil((n + 1) * 0.9)``-th smallest absolute error of the controls); the controls were
  not used to train the weights, so they are a valid calibration set. It needs n >= 9; below
  that the file has no interval (``age_interval`` null with a note), never the weights' one,
  which is centred on this site's biased predictions.
* **map-spread range**: 5th-95th percentile of the controls' map spreads, flagged below 0.5 x p5
  or above 2 x p95 (clinical.SPREAD_LIMITS), as for the weights.
* **uncertainty**: percentile bootstrap 95 % intervals of slope and intercept (2000 resamples
  of the controls, seed 0, numpy only) and the bootstrap SD of the slope.

Thresholds, and the measurement behind them
-------------------------------------------
The slope is the hard part: ``bench/calibration_n.py --synthetic`` simulates controls with the
noise of the shipped weights' 59 real held-out predictions (bagnet3d-rf9-ixi-open-v1: slope
0.315, residual SD 0.315 x 16.71 = 5.26 y), fits the line on n of them, 2000 draws per cell.
SD of the fitted slope [share of slopes at or below 0.05, where clinical.py will not divide]:

==========  =============  =============  =============  =============
ages (y)    n = 5          n = 10         n = 20         n = 40
==========  =============  =============  =============  =============
23-74       0.215 [9 %]    0.127 [2 %]    0.085 [0 %]    0.058 [0 %]
19-55       0.351 [18 %]   0.176 [5 %]    0.120 [1 %]    0.081 [0 %]
69-96       0.486 [22 %]   0.237 [12 %]   0.160 [4 %]    0.111 [1 %]
==========  =============  =============  =============  =============

The slope SD scales as ``sigma / (sd(age) * sqrt(n - 2))``: a model with less noise per year of
slope needs fewer controls, so the file also records the slope's bootstrap SD measured on its
own controls. The same bench, on three synthetic held-out sites (50 controls each, calibrate on
n, read the rest, 200 splits), shows the trade-off between the lines: where the site's slope is
steeper than the weights' (young adults, 19-55 y, slope x 1.5), the full line wins from n = 5
(mean |corrected gap| 11.9 y full vs 20.6 y offset); where it is flatter (20-80 y, slope x 0.5)
the full line loses at every n (26-27 y vs 16-17 y) and is refused (slope <= 0.05) in 39 of 200
splits at n = 5; where it matches (69-96 y) the offset line is as good and the full line is
refused in 34-42 % of splits. ``auto`` comes within 1.2 y of the better line except at the
steep site with n = 5 (offset forced: 20.6 y vs 11.9 y) and at the flat site with n >= 20, where
it moves to the site's own, truly flatter line (18.5-20.3 y vs 16.0-16.1 y: a mean |corrected
gap| rewards dividing by the larger, wrong slope). Both lines cut the bias alike. Hence:

* **refused** (:class:`~brainbag.errors.InputError`, one line): fewer than
  :data:`MIN_CONTROLS` = 3 controls with an age and a prediction; and whenever no bias line can
  be made: the offset line is needed but the weights carry no slope to keep, or the full line
  is asked for (``line="full"``) on an age range under :data:`LINE_MIN_RANGE` = 5 y or gives a
  slope at or below :data:`MIN_SLOPE` = 0.05.
* **offset line, with a warning** (``line="auto"``, the default): fewer than
  :data:`LINE_MIN_CONTROLS` = 10 controls (slope SD 0.22-0.49 at n = 5, up to 1.5 x the slope
  itself, and up to 22 % of fits without any age signal); an age
  range under 5 y (a slope needs ages to vary); or a bootstrap 95 % interval of the slope that
  reaches down to 0.05 (these controls do not tell a slope from no age dependence).
* **warnings**: fewer than :data:`SMALL_N_WARN` = 20 controls (the slope SD is still 0.09-0.16
  at n = 20, a quarter to a half of the shipped weights' slope); an age range under
  :data:`NARROW_RANGE_WARN` = 20 y (the line is then an extrapolation for most people, and the
  slope SD grows as the range shrinks); controls outside the weights' training age range; fewer
  than 9 controls (no interval); controls left out for a missing age or prediction.

The file (JSON, ``format`` "brainbag-site-calibration", ``version`` 1)
----------------------------------------------------------------------
``{"format", "version", "name", "created", "brainbag_version",
"weights": {"id", "sha256", "age_range"},
"controls_summary": {"n", "left_out", "age_min", "age_max", "age_mean", "sexes": {"F", "M",
"unknown"}},
"fit": {"line": "full"|"offset", "line_reason", "slope", "intercept", "residual_sd",
"slope_ci95": [lo, hi]|null, "intercept_ci95": [lo, hi], "slope_sd": float|null,
"bootstrap": {"resamples", "seed", "level", "valid"}, "full_line": {"slope", "intercept",
"slope_ci95", "slope_sd"}|null},
"calibration": <the structure of clinical.fit_calibration, read by clinical.read_prediction>,
"effect": <calibration_effect()>, "warnings": [str],
"controls": [{"id", "age", "sex", "predicted_age", "p_female", "map_spread", "brain_age_gap",
"gap_corrected_weights", "gap_corrected_site"}]}``.
:func:`read_site_calibration` refuses, with one line, a file for other weights (sha256), an
unreadable or malformed file and a format version it does not know.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainbag import __version__
from brainbag.errors import InputError, UsageError
from brainbag.files import write_json_atomic
from brainbag.person.clinical import (
    BIAS_METHOD,
    BIAS_REFERENCE,
    INTERVAL_LEVEL,
    MIN_SLOPE,
    SEX_MISMATCH,
    SEX_UNDETERMINED,
    conformal_half_width,
    fit_calibration,
    read_prediction,
)

FORMAT = "brainbag-site-calibration"
VERSION = 1
#: the ``source`` of numbers read with the weights' own calibration
WEIGHTS_SOURCE = "weights"

#: fewer controls than this (with an age and a prediction) are refused
MIN_CONTROLS = 3
#: the full line (slope fitted) needs at least this many controls ...
LINE_MIN_CONTROLS = 10
#: ... and an age range (max - min, years) at least this wide
LINE_MIN_RANGE = 5.0
#: fewer controls than this get a warning naming the slope's bootstrap SD
SMALL_N_WARN = 20
#: an age range (years) narrower than this gets a warning
NARROW_RANGE_WARN = 20.0
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_LEVEL = 0.95
LINES = ("auto", "full", "offset")

OFFSET_METHOD = (BIAS_METHOD + "; offset line: the weights' own slope kept, the intercept fitted "
                 "on the site's controls as mean(predicted - slope * age)")


@dataclass
class SiteCalibration:
    """A calibration fitted on one site's healthy controls (see the module docstring)."""

    weights_id: str
    weights_sha256: str
    weights_age_range: tuple[float, float] | None
    n: int
    left_out: int
    age_min: float
    age_max: float
    age_mean: float
    sexes: dict[str, int]
    line: str
    line_reason: str
    slope: float
    intercept: float
    residual_sd: float
    slope_ci95: tuple[float, float] | None
    intercept_ci95: tuple[float, float] | None
    slope_sd: float | None
    bootstrap: dict[str, Any]
    full_line: dict[str, Any] | None
    calibration: dict[str, Any]
    effect: dict[str, Any]
    warnings: list[str]
    controls: list[dict[str, Any]]
    name: str | None = None
    created: str = ""
    brainbag_version: str = __version__
    #: the file it was read from (not stored in the file)
    path: Path | None = field(default=None, compare=False)

    @property
    def source(self) -> str:
        """``site:<file name>`` (``site`` before it is written): recorded beside every number
        read with this calibration."""
        return f"site:{self.path.name}" if self.path is not None else "site"

    def to_weights_calibration(self, source: str | None = None) -> dict[str, Any]:
        """The calibration as clinical.read_prediction reads it from weights metadata, each
        section and the whole marked with ``source`` (default :attr:`source`)."""
        return with_source(self.calibration, source or self.source)

    def age_warnings(self, chronological_age: float | None) -> list[str]:
        """Warnings for one person read with this calibration: an age outside the controls'
        ages is an extrapolation of the site's line."""
        if chronological_age is None or self.age_min <= chronological_age <= self.age_max:
            return []
        return [f"chronological age {chronological_age:g} y lies outside the ages of the "
                f"{self.n} controls of site calibration {self.source} ({self.age_min:g}-"
                f"{self.age_max:g} y): its bias correction is an extrapolation there, trust "
                "it less"]

    def to_dict(self) -> dict[str, Any]:
        """The file's JSON structure (the module docstring lists it); :meth:`from_dict` reads
        it back."""
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "created": self.created,
            "brainbag_version": self.brainbag_version,
            "weights": {"id": self.weights_id, "sha256": self.weights_sha256,
                        "age_range": _list(self.weights_age_range)},
            "controls_summary": {"n": self.n, "left_out": self.left_out,
                                 "age_min": self.age_min, "age_max": self.age_max,
                                 "age_mean": self.age_mean, "sexes": dict(self.sexes)},
            "fit": {"line": self.line, "line_reason": self.line_reason, "slope": self.slope,
                    "intercept": self.intercept, "residual_sd": self.residual_sd,
                    "slope_ci95": _list(self.slope_ci95),
                    "intercept_ci95": _list(self.intercept_ci95), "slope_sd": self.slope_sd,
                    "bootstrap": dict(self.bootstrap), "full_line": self.full_line},
            "calibration": self.calibration, "effect": self.effect,
            "warnings": list(self.warnings), "controls": list(self.controls),
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "site calibration") -> SiteCalibration:
        """Rebuild from :meth:`to_dict`; a missing or mistyped field is an InputError."""
        r = _Reader(d, where)
        fmt = r.get("format", str)
        if fmt != FORMAT:
            raise InputError(f"{where} is not a brainbag site calibration (format {fmt!r}, "
                             f"expected {FORMAT!r}); give the file `brainbag calibrate` wrote")
        version = r.get("version", int)
        if version != VERSION:
            newer = " (written by a newer brainbag: upgrade brainbag)" if version > VERSION else ""
            raise InputError(f"{where} has site-calibration format version {version}, this "
                             f"brainbag reads version {VERSION}{newer}; or run brainbag "
                             "calibrate again")
        line = r.get("fit.line", str)
        if line not in ("full", "offset"):
            raise InputError(f"{where}: fit.line is {line!r}, expected 'full' or 'offset'; "
                             "the file is damaged: run brainbag calibrate again")
        site = cls(
            weights_id=r.get("weights.id", str), weights_sha256=r.get("weights.sha256", str),
            weights_age_range=r.pair("weights.age_range", optional=True),
            n=r.get("controls_summary.n", int), left_out=r.get("controls_summary.left_out", int),
            age_min=r.num("controls_summary.age_min"), age_max=r.num("controls_summary.age_max"),
            age_mean=r.num("controls_summary.age_mean"),
            sexes=r.counts("controls_summary.sexes"),
            line=line, line_reason=r.get("fit.line_reason", str), slope=r.num("fit.slope"),
            intercept=r.num("fit.intercept"), residual_sd=r.num("fit.residual_sd"),
            slope_ci95=r.pair("fit.slope_ci95", optional=True),
            intercept_ci95=r.pair("fit.intercept_ci95", optional=True),
            slope_sd=r.num("fit.slope_sd", optional=True),
            bootstrap=r.get("fit.bootstrap", dict),
            full_line=r.get("fit.full_line", dict, optional=True),
            calibration=r.get("calibration", dict), effect=r.get("effect", dict),
            warnings=[str(w) for w in r.get("warnings", list)],
            controls=r.get("controls", list), name=r.get("name", str, optional=True),
            created=r.get("created", str), brainbag_version=r.get("brainbag_version", str),
        )
        bias = site.calibration.get("bias_correction")
        if not isinstance(bias, dict) or not _finite(bias.get("slope")) or not _finite(
                bias.get("intercept")) or float(bias["slope"]) <= MIN_SLOPE:
            raise InputError(f"{where}: calibration.bias_correction is missing or has no usable "
                             "slope and intercept; the file is damaged: run brainbag calibrate "
                             "again")
        if site.n < MIN_CONTROLS or len(site.controls) != site.n:
            raise InputError(f"{where}: {site.n} controls recorded, {len(site.controls)} in its "
                             "table; the file is damaged: run brainbag calibrate again")
        return site


def with_source(calibration: dict[str, Any], source: str) -> dict[str, Any]:
    """A copy of a clinical.py calibration with ``source`` at the top and in each of its
    sections (bias correction, interval, map spread), so the ``methods`` that
    clinical.read_prediction copies from them name where each number came from."""
    out: dict[str, Any] = {**calibration, "source": source}
    for key in ("bias_correction", "age_interval", "map_spread"):
        if isinstance(out.get(key), dict):
            out[key] = {**out[key], "source": source}
    return out


def _list(pair: tuple[float, float] | None) -> list[float] | None:
    return None if pair is None else [pair[0], pair[1]]


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a finite number, else None."""
    return float(value) if _finite(value) else None


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


class _Reader:
    """Typed access to dotted keys of a parsed file, each failure one InputError line."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise InputError(f"{where} is not a brainbag site calibration (a JSON "
                             f"{type(data).__name__}, expected an object); give the file "
                             "`brainbag calibrate` wrote")
        self.data, self.where = data, where

    def _bad(self, key: str, what: str) -> InputError:
        return InputError(f"{self.where}: {key} is missing or not {what}; the file is damaged "
                          "or not a brainbag site calibration: run brainbag calibrate again")

    def get(self, key: str, kind: type, optional: bool = False) -> Any:
        value: Any = self.data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None and optional:
            return None
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise self._bad(key, f"a {kind.__name__}")
        return value

    def num(self, key: str, optional: bool = False) -> Any:
        value = self.get(key, object, optional=True)
        if value is None and optional:
            return None
        if not _finite(value):
            raise self._bad(key, "a finite number")
        return float(value)

    def counts(self, key: str) -> dict[str, int]:
        value = self.get(key, dict)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in value.values()):
            raise self._bad(key, "a table of counts")
        return {str(k): int(v) for k, v in value.items()}

    def pair(self, key: str, optional: bool = False) -> tuple[float, float] | None:
        value = self.get(key, list, optional=optional)
        if value is None:
            return None
        if len(value) != 2 or not all(_finite(v) for v in value):
            raise self._bad(key, "a pair of finite numbers")
        return float(value[0]), float(value[1])


def _lines(age: np.ndarray, pred: np.ndarray, slope: float | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares lines ``pred = slope * age + intercept`` of each row of 2-D arrays, or
    with ``slope`` fixed the intercept alone (the mean of ``pred - slope * age``). NaN slope
    where a row's ages do not vary."""
    if slope is not None:
        return np.full(age.shape[0], slope), (pred - slope * age).mean(axis=1)
    ma, mp = age.mean(axis=1, keepdims=True), pred.mean(axis=1, keepdims=True)
    sxx = ((age - ma) ** 2).sum(axis=1)
    sxy = ((age - ma) * (pred - mp)).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        b = np.where(np.ptp(age, axis=1) > 0, sxy / sxx, np.nan)
    return b, mp[:, 0] - b * ma[:, 0]


def bootstrap_line(age: np.ndarray, pred: np.ndarray, slope: float | None = None,
                   resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
                   ) -> dict[str, Any]:
    """Percentile bootstrap of the line (controls resampled with replacement): 95 % intervals
    of slope (None with a fixed slope) and intercept, the slope's SD, the resamples used
    (those whose ages vary)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(age), size=(resamples, len(age)))
    b, a = _lines(age[idx], pred[idx], slope)
    ok = np.isfinite(b) & np.isfinite(a)
    b, a = b[ok], a[ok]
    tail = 100 * (1 - BOOTSTRAP_LEVEL) / 2
    pct = (tail, 100 - tail)
    out: dict[str, Any] = {"resamples": resamples, "seed": seed, "level": BOOTSTRAP_LEVEL,
                           "valid": int(ok.sum())}
    if len(b) < 2:
        return {**out, "slope_ci95": None, "intercept_ci95": None, "slope_sd": None}
    lo, hi = (float(v) for v in np.percentile(a, pct))
    out["intercept_ci95"] = (round(lo, 6), round(hi, 6))
    if slope is None:
        lo, hi = (float(v) for v in np.percentile(b, pct))
        out["slope_ci95"] = (round(lo, 6), round(hi, 6))
        out["slope_sd"] = round(float(np.std(b, ddof=1)), 6)
    else:
        out["slope_ci95"], out["slope_sd"] = None, None
    return out


def corrected_gaps(calibration: dict[str, Any] | None, predicted: Sequence[float],
                   age: Sequence[float]) -> list[float | None]:
    """The corrected gap of each (predicted, age) as predict reads it with ``calibration``
    (clinical.read_prediction; None where the calibration has no bias correction)."""
    return [read_prediction(p, None, None, a, None, calibration, None, "").brain_age_gap_corrected
            for p, a in zip(predicted, age, strict=True)]


def _summary(gaps: Sequence[float | None]) -> dict[str, Any] | None:
    values = [g for g in gaps if g is not None]
    if not values:
        return None
    return {"n": len(values), "mean_abs": round(float(np.mean(np.abs(values))), 4),
            "mean": round(float(np.mean(values)), 4)}


def calibration_effect(predicted: Sequence[float], age: Sequence[float],
                       weights_calibration: dict[str, Any] | None,
                       site: dict[str, Any], line: str = "full",
                       weights_slope: float | None = None) -> dict[str, Any]:
    """How a site calibration changes the corrected gap of the controls: mean |gap| and mean
    (bias) of the raw gap, of the gap corrected with the weights' own calibration and with the
    site's (on the controls it was fitted on, where the site's bias is 0 by construction, and
    leave-one-out: each control corrected by the line fitted on the others, the honest figure
    for a new person). ``line``/``weights_slope`` say how the site's line was fitted."""
    p, a = np.asarray(predicted, dtype=float), np.asarray(age, dtype=float)
    n = len(p)
    loo: list[float | None] = []
    if n >= 3:
        keep = ~np.eye(n, dtype=bool)
        b, c = _lines(np.broadcast_to(a, (n, n))[keep].reshape(n, n - 1),
                      np.broadcast_to(p, (n, n))[keep].reshape(n, n - 1),
                      weights_slope if line == "offset" else None)
        for i in range(n):
            if np.isfinite(b[i]) and b[i] > MIN_SLOPE:
                cal = {"bias_correction": {"slope": float(b[i]), "intercept": float(c[i])}}
                loo += corrected_gaps(cal, [p[i]], [a[i]])
    weights_gaps = (corrected_gaps(weights_calibration, p.tolist(), a.tolist())
                    if weights_calibration else [])
    return {
        "n": n,
        "raw_gap": _summary((p - a).tolist()),
        "weights": _summary(weights_gaps),
        "site": _summary(corrected_gaps(site, p.tolist(), a.tolist())),
        "site_leave_one_out": _summary(loo),
    }


def format_effect(effect: dict[str, Any]) -> list[str]:
    """Console lines of :func:`calibration_effect` for ``brainbag calibrate``."""
    def row(label: str, s: dict[str, Any] | None) -> str:
        if s is None:
            return f"  {label:<38} -"
        return f"  {label:<38} mean |gap| {s['mean_abs']:6.1f} y   bias {s['mean']:+6.1f} y"
    lines = [f"corrected gap of the {effect['n']} controls (healthy: ideally 0):",
             row("raw gap (predicted - age)", effect.get("raw_gap")),
             row("weights' own calibration", effect.get("weights")),
             row("site calibration, leave-one-out", effect.get("site_leave_one_out")),
             row("site calibration, on its own controls", effect.get("site"))]
    w, s = effect.get("weights"), effect.get("site_leave_one_out")
    if w and s and w["mean_abs"] > 0:
        lines.append(f"  the site calibration changes the controls' mean |corrected gap| by "
                     f"{s['mean_abs'] - w['mean_abs']:+.1f} y ({s['mean_abs'] / w['mean_abs']:.2f}"
                     f" x) and their bias by {s['mean'] - w['mean']:+.1f} y (leave-one-out)")
    return lines


def describe(site: SiteCalibration) -> list[str]:
    """Console lines saying what was fitted (``brainbag calibrate``)."""
    ci = (f", 95 % interval {site.slope_ci95[0]:.3f}-{site.slope_ci95[1]:.3f}"
          if site.slope_ci95 else "")
    ici = (f", 95 % interval {site.intercept_ci95[0]:.2f}-{site.intercept_ci95[1]:.2f}"
           if site.intercept_ci95 else "")
    sexes = ", ".join(f"{v} {k}" for k, v in site.sexes.items() if v)
    interval = site.calibration.get("age_interval")
    spread = site.calibration.get("map_spread")
    lines = [
        f"site calibration for weights {site.weights_id} (sha256 {site.weights_sha256[:12]}...) "
        f"from {site.n} controls, ages {site.age_min:g}-{site.age_max:g} y ({sexes})",
        f"  bias line ({site.line}): predicted = {site.slope:.3f} x age + {site.intercept:.2f}"
        f"; {site.line_reason}",
        f"  slope {site.slope:.3f}{ci}; intercept {site.intercept:.2f}{ici}; residual SD "
        f"{site.residual_sd:.2f} y",
        (f"  90 % age interval: predicted age +/- {interval['half_width_years']:.1f} y"
         if interval else f"  age interval {site.calibration.get('age_interval_note', '')}"),
    ]
    if spread:
        lines.append(f"  map spread {spread['p5']:.1f}-{spread['p95']:.1f} y (5th-95th "
                     f"percentile); flagged below {spread['warn_below']:.1f} or above "
                     f"{spread['warn_above']:.1f} y")
    return lines


def _weights_slope(weights_calibration: dict[str, Any] | None) -> float | None:
    bias = (weights_calibration or {}).get("bias_correction") or {}
    slope = bias.get("slope")
    value = _number(slope)
    return value if value is not None and value > MIN_SLOPE else None


def _choose_line(line: str, n: int, age_range: float, boot: dict[str, Any] | None,
                 fitted_slope: float | None, weights_slope: float | None, weights_id: str
                 ) -> tuple[str, str, list[str]]:
    """("full" or "offset", why, warnings); an InputError where no line can be made."""
    hint = (f"give at least {LINE_MIN_CONTROLS} controls whose ages span at least "
            f"{LINE_MIN_RANGE:g} years")
    if line == "offset":
        if weights_slope is None:
            raise InputError(f"an offset-only site calibration keeps the weights' own slope, but "
                             f"weights {weights_id} carry none; {hint} to fit a full line")
        return "offset", "asked for (line='offset'): the weights' own slope kept", []
    if line == "full":
        if age_range < LINE_MIN_RANGE or fitted_slope is None:
            raise InputError(f"the controls' ages span {age_range:.1f} y: a slope cannot be "
                             f"fitted on less than {LINE_MIN_RANGE:g} y; {hint}, or fit the "
                             "offset only (keeping the weights' slope)")
        if fitted_slope <= MIN_SLOPE:
            raise InputError(f"the controls' predictions barely follow their age (fitted slope "
                             f"{fitted_slope:.3f}, at most {MIN_SLOPE}): a bias correction would "
                             "divide by almost zero; add controls over a wider age range, or fit "
                             "the offset only (keeping the weights' slope)")
        warn = []
        if n < LINE_MIN_CONTROLS:
            warn.append(f"a full bias line from {n} controls (fewer than {LINE_MIN_CONTROLS}): "
                        "its slope is barely determined (see its bootstrap interval)")
        return "full", "asked for (line='full')", warn
    reasons = []
    if n < LINE_MIN_CONTROLS:
        reasons.append(f"{n} controls (a slope needs at least {LINE_MIN_CONTROLS})")
    if age_range < LINE_MIN_RANGE:
        reasons.append(f"ages spanning {age_range:.1f} y (a slope needs at least "
                       f"{LINE_MIN_RANGE:g} y)")
    ci = (boot or {}).get("slope_ci95")
    if not reasons and (fitted_slope is None or fitted_slope <= MIN_SLOPE or ci is None
                        or ci[0] <= MIN_SLOPE):
        shown = "" if ci is None else f", 95 % interval {ci[0]:.3f}-{ci[1]:.3f}"
        reasons.append(f"a fitted slope of {fitted_slope or 0:.3f}{shown} that these controls "
                       f"cannot tell from no age dependence ({MIN_SLOPE} or less)")
    if not reasons:
        return "full", (f"{n} controls over {age_range:.1f} y with a slope clearly above "
                        f"{MIN_SLOPE}: slope and intercept fitted"), []
    why = "; ".join(reasons)
    if weights_slope is None:
        raise InputError(f"no bias line can be fitted from {why}, and weights {weights_id} carry "
                         f"no slope to keep; {hint}")
    return "offset", f"offset only, the weights' slope {weights_slope:.3f} kept: {why}", [
        f"site calibration fits the offset only and keeps the weights' slope "
        f"{weights_slope:.3f}: {why}; {hint} to fit the site's own slope"]


def check_line(line: str, ages: Sequence[float | None],
               weights_calibration: dict[str, Any] | None, weights_id: str) -> None:
    """Refuse, before any control is predicted, a bias line the controls' ages or the weights
    rule out whatever the predictions turn out to be (the one-line InputError
    :func:`fit_site_calibration` would raise): ``line="full"`` on ages spanning under
    :data:`LINE_MIN_RANGE` years, or an offset line (asked for, or the only one ``auto`` could
    choose) when the weights carry no slope to keep."""
    if line not in LINES:
        raise UsageError(f"line {line!r} is not one of {', '.join(LINES)}")
    values = [v for v in (_number(a) for a in ages) if v is not None]
    if not values:
        return
    # a slope every check accepts: only what the ages and the weights say can refuse
    _choose_line(line, len(values), max(values) - min(values), {"slope_ci95": (1.0, 1.0)}, 1.0,
                 _weights_slope(weights_calibration), weights_id)


def fit_site_calibration(
    predicted: Sequence[float | None],
    age: Sequence[float | None],
    sex: Sequence[str | None] | None,
    map_spread: Sequence[float | None] | None,
    weights_id: str,
    weights_sha256: str,
    *,
    ids: Sequence[str] | None = None,
    p_female: Sequence[float | None] | None = None,
    weights_calibration: dict[str, Any] | None = None,
    weights_age_range: Sequence[float] | None = None,
    line: str = "auto",
    name: str | None = None,
    level: float = INTERVAL_LEVEL,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    created: str | None = None,
) -> SiteCalibration:
    """Fit a site calibration on controls' predicted ages (the weights' global age), ages,
    sexes ("F"/"M"/None) and map spreads (see the module docstring for the method and the
    thresholds). ``weights_calibration`` is the weights' own (metadata ``calibration``): its
    slope is kept by an offset line, its sex thresholds are copied, and the effect summary
    compares with it. Controls without an age or a prediction are left out (with a warning);
    fewer than 3 left, or no possible bias line, raise a one-line InputError."""
    if line not in LINES:
        raise UsageError(f"line {line!r} is not one of {', '.join(LINES)}")
    count = len(predicted)
    columns = {"age": age, "sex": sex, "map_spread": map_spread, "ids": ids,
                "p_female": p_female}
    for label, values in columns.items():
        if values is not None and len(values) != count:
            raise UsageError(f"{count} predictions but {len(values)} values of {label}")
    ids = list(ids) if ids is not None else [f"control-{i + 1}" for i in range(count)]
    usable = [i for i in range(count) if _finite(age[i]) and _finite(predicted[i])]
    left_out = count - len(usable)
    if len(usable) < MIN_CONTROLS:
        raise InputError(
            f"a site calibration needs at least {MIN_CONTROLS} controls with an age and a "
            f"prediction, got {len(usable)}" + (f" ({left_out} without)" if left_out else "")
            + f"; add healthy controls scanned at this site ({LINE_MIN_CONTROLS} or more, over "
            f"at least {LINE_MIN_RANGE:g} years, fit the site's own slope)")
    a = np.array([_number(age[i]) for i in usable], dtype=float)
    p = np.array([_number(predicted[i]) for i in usable], dtype=float)
    n, age_range = len(usable), float(a.max() - a.min())
    weights_slope = _weights_slope(weights_calibration)

    full_boot = bootstrap_line(a, p, None, resamples, seed) if age_range > 0 else None
    fitted = None if age_range == 0 else float(np.polyfit(a, p, 1)[0])
    chosen, reason, warnings = _choose_line(line, n, age_range, full_boot, fitted,
                                            weights_slope, weights_id)
    spreads = [_number(map_spread[i]) if map_spread else None for i in usable]
    rows = [{"age": float(x), "predicted_age": float(y), "map_spread": s}
            for x, y, s in zip(a, p, spreads, strict=True)]
    fitted_on = (f"site calibration: {n} healthy controls" + (f" of {name}" if name else "")
                 + f", ages {a.min():g}-{a.max():g} y, weights {weights_id}")
    cal = fit_calibration(rows, fitted_on=fitted_on, level=level)
    if chosen == "full":
        bias = cal["bias_correction"]
        slope, intercept = float(bias["slope"]), float(bias["intercept"])
        boot = full_boot or {}
        residual = p - (slope * a + intercept)
        residual_sd = float(np.std(residual, ddof=2)) if n > 2 else 0.0
    else:
        assert weights_slope is not None  # _choose_line refused otherwise
        slope, intercept = weights_slope, round(float(np.mean(p - weights_slope * a)), 6)
        boot = bootstrap_line(a, p, weights_slope, resamples, seed)
        gap = (p - intercept) / slope - a
        cal["bias_correction"] = {
            "method": OFFSET_METHOD, "reference": BIAS_REFERENCE, "slope": slope,
            "intercept": intercept, "raw_gap_sd": round(float(np.std(p - a, ddof=1)), 4),
            "corrected_gap_sd": round(float(np.std(gap, ddof=1)), 4)}
        cal.pop("bias_correction_note", None)
        residual_sd = float(np.std(p - (slope * a + intercept), ddof=1))
    cal["bias_correction"]["line"] = chosen
    if cal.get("age_interval") is None:
        need = next(k for k in range(1, 10_000) if conformal_half_width([0.0] * k, level)
                    is not None)
        cal["age_interval_note"] = (
            f"not fitted: a {level:.0%} split-conformal interval needs at least {need} controls,"
            f" got {n}")
        warnings.append(f"no age interval: {n} controls, a {level:.0%} interval needs at least "
                        f"{need}")
    sex_bands = (weights_calibration or {}).get("sex") or {
        "undetermined": list(SEX_UNDETERMINED),
        "mismatch_recorded_female_below": SEX_MISMATCH[0],
        "mismatch_recorded_male_above": SEX_MISMATCH[1]}
    cal["sex"] = sex_bands

    if n < SMALL_N_WARN:
        sd = (full_boot or {}).get("slope_sd")
        warnings.append(
            f"{n} controls (fewer than {SMALL_N_WARN}): the site's bias line is uncertain"
            + (f" (bootstrap SD of a fitted slope {sd:.3f})" if sd is not None else "")
            + "; calibrate with more controls when you can")
    if age_range < NARROW_RANGE_WARN:
        warnings.append(f"the controls' ages span only {age_range:.1f} y ({a.min():g}-"
                        f"{a.max():g}): people outside that range are an extrapolation of this "
                        "calibration")
    training = None
    if weights_age_range is not None and len(weights_age_range) == 2:
        training = (float(weights_age_range[0]), float(weights_age_range[1]))
        outside = sorted(x for x in a.tolist() if not training[0] <= x <= training[1])
        if outside:
            warnings.append(
                f"{len(outside)} of {n} controls lie outside the training age range "
                f"{training[0]:g}-{training[1]:g} y of weights {weights_id} (ages "
                f"{', '.join(f'{x:g}' for x in outside[:5])}{', ...' if len(outside) > 5 else ''}"
                "): the calibration corrects the weights where they extrapolate")
    if left_out:
        warnings.append(f"{left_out} of {count} controls left out: no age or no prediction")

    site_cal = with_source(cal, "site")
    weights_cal = with_source(weights_calibration, WEIGHTS_SOURCE) if weights_calibration \
        else None
    effect = calibration_effect(p.tolist(), a.tolist(), weights_cal, site_cal, chosen,
                                weights_slope)
    weights_gaps = corrected_gaps(weights_cal, p.tolist(), a.tolist()) if weights_cal else \
        [None] * n
    site_gaps = corrected_gaps(site_cal, p.tolist(), a.tolist())
    controls = []
    for k, i in enumerate(usable):
        controls.append({
            "id": str(ids[i]), "age": float(a[k]), "sex": sex[i] if sex else None,
            "predicted_age": float(p[k]),
            "p_female": _number(p_female[i]) if p_female else None,
            "map_spread": rows[k]["map_spread"],
            "brain_age_gap": round(float(p[k] - a[k]), 4),
            "gap_corrected_weights": _rounded(weights_gaps[k]),
            "gap_corrected_site": _rounded(site_gaps[k]),
        })
    sexes = {"F": 0, "M": 0, "unknown": 0}
    for i in usable:
        s = sex[i] if sex else None
        sexes[s if s in ("F", "M") else "unknown"] += 1
    full_line = None
    if chosen == "offset" and fitted is not None and full_boot is not None:
        full_line = {"slope": round(fitted, 6), "slope_ci95": _list(full_boot["slope_ci95"]),
                     "slope_sd": full_boot["slope_sd"],
                     "intercept": round(float(np.mean(p) - fitted * np.mean(a)), 6)}
    return SiteCalibration(
        weights_id=weights_id, weights_sha256=weights_sha256, weights_age_range=training,
        n=n, left_out=left_out, age_min=float(a.min()), age_max=float(a.max()),
        age_mean=round(float(a.mean()), 4), sexes=sexes, line=chosen, line_reason=reason,
        slope=slope, intercept=intercept, residual_sd=round(residual_sd, 4),
        slope_ci95=boot.get("slope_ci95"), intercept_ci95=boot.get("intercept_ci95"),
        slope_sd=boot.get("slope_sd"),
        bootstrap={k: boot[k] for k in ("resamples", "seed", "level", "valid") if k in boot},
        full_line=full_line, calibration=cal, effect=effect, warnings=warnings,
        controls=controls, name=name,
        created=created or _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )


def write_site_calibration(site: SiteCalibration, path: Path) -> None:
    """Write the calibration as JSON (atomically: the old file or the new one, never half)."""
    write_json_atomic(Path(path), site.to_dict())
    site.path = Path(path)


def read_site_calibration(path: Path, weights_sha256: str, weights_id: str | None = None
                          ) -> SiteCalibration:
    """Read a site calibration for the weights with ``weights_sha256`` (the weights in use;
    ``weights_id`` names them in the message). A file for other weights, an unreadable or
    malformed file, or an unknown format version is refused with one line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"site calibration {path} not found; give the file `brainbag "
                         "calibrate --out` wrote") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"site calibration {path} could not be read ({exc})") from exc
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise InputError(f"site calibration {path} is not JSON ({exc}); give the file "
                         "`brainbag calibrate --out` wrote") from None
    site = SiteCalibration.from_dict(data, where=f"site calibration {path}")
    if site.weights_sha256 != weights_sha256:
        current = f"weights {weights_id} " if weights_id else "the weights "
        raise UsageError(
            f"site calibration {path} was fitted for weights {site.weights_id} (sha256 "
            f"{site.weights_sha256[:12]}...), but this run uses {current}(sha256 "
            f"{weights_sha256[:12]}...): predict with the weights it was fitted for, or run "
            "brainbag calibrate with these weights")
    site.path = path
    return site


def choose_calibration(weights_calibration: dict[str, Any] | None,
                       site: SiteCalibration | None) -> tuple[dict[str, Any], str]:
    """The calibration predict reads with, and its source: the site's when one is given
    (``site:<file name>``), else the weights' own (``weights``), each section marked."""
    if site is not None:
        return site.to_weights_calibration(), site.source
    if not weights_calibration:
        return {}, WEIGHTS_SOURCE
    return with_source(weights_calibration, WEIGHTS_SOURCE), WEIGHTS_SOURCE
