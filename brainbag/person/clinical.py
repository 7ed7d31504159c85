"""What a prediction means for one person: brain-age gap, its correction, how far to trust it.

A predicted age alone is not what a clinician or a study reads. This module turns brainbag's
raw outputs, the person's chronological age and recorded sex (when given) and the calibration
stored in the weights into the numbers and flags written next to every prediction:

* **brain-age gap** (brain-PAD) = predicted age - chronological age;
* **bias-corrected gap**: every brain-age model regresses towards the mean age of its training
  data (old brains predicted too young, young ones too old), so the raw gap correlates with age.
  The correction of de Lange & Cole (2020) is used: on held-out (cross-validated) predictions,
  fit ``predicted = slope * age + intercept`` by least squares; a new prediction is corrected as
  ``(predicted - intercept) / slope`` and the corrected gap is that minus the chronological
  age. It removes the gap's dependence on age on average; it divides by ``slope``, so a weak
  model (small slope) gives a corrected gap much noisier than its raw gap: the calibration
  records the spread of corrected gaps on the held-out scans so every output can say so.
* **age interval**: a split-conformal interval (Vovk et al. 2005; Lei et al. 2018) from the
  held-out absolute errors: ``predicted +/- q`` with ``q`` the ``ceil((n + 1) * level)``-th
  smallest of the ``n`` held-out absolute errors. It covers the chronological age of a person
  like the held-out ones with probability ``level``, on average over ages (not at every age).
* **map spread**: the brain-weighted standard deviation of the local age map (years). A map that
  disagrees with itself far more or far less than on the held-out scans suggests a bad input or
  an unfamiliar scanner; the calibration holds the held-out range and the warning limits.
* **flags**: chronological or predicted age outside the training age range (the gap is then an
  extrapolation), a recorded sex that the sex head strongly contradicts (a swapped or
  mislabelled file is the usual cause), a map spread outside the limits.
* **sex note**: the milder sign, a recorded sex that the sex call (outside the undetermined
  band) contradicts at any P(female); the strong flag above is a warning, the note is not.

:func:`fit_calibration` makes the calibration from held-out rows (``brainbag crossval``);
:func:`read_prediction` applies it to one prediction. Weights without a calibration get the raw
gap only, with a note saying why.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: P(female) inside this band gives the sex call "undetermined" (weights may store their own)
SEX_UNDETERMINED = (0.35, 0.65)
#: a recorded F with P(female) below the first, or an M above the second, is flagged
SEX_MISMATCH = (0.1, 0.9)
INTERVAL_LEVEL = 0.9
#: a map spread below ``low * p5`` or above ``high * p95`` of the held-out scans is flagged
SPREAD_LIMITS = (0.5, 2.0)
#: a bias-line slope at or below this means the predictions carry no age signal: no correction
#: divides by it (here and in a site calibration, :mod:`brainbag.person.calibration`)
MIN_SLOPE = 0.05

BIAS_METHOD = ("de Lange & Cole 2020: on held-out predictions fit predicted = slope * age + "
               "intercept (least squares); corrected age = (predicted - intercept) / slope; "
               "corrected gap = corrected age - chronological age")
BIAS_REFERENCE = ("de Lange AMG, Cole JH. Commentary: Correction procedures in brain-age "
                  "prediction. NeuroImage: Clinical 26 (2020) 102229; Cole et al. 2018, "
                  "Molecular Psychiatry 23:1385")
INTERVAL_METHOD = ("split conformal (Vovk et al. 2005; Lei et al. 2018, JASA 113:1094): "
                   "predicted age +/- the ceil((n + 1) * level)-th smallest absolute error of "
                   "n held-out predictions; covers the chronological age with probability level "
                   "on average over ages, not at every age")
SPREAD_DEFINITION = ("standard deviation of the local age map over the brain, each map voxel "
                     "weighted by the brain fraction of its cell (years)")


def map_spread(age_map: np.ndarray | None, brain: np.ndarray | None) -> float | None:
    """Brain-weighted standard deviation (years) of a local age map on its own grid.

    ``brain`` is the brain fraction of each map voxel's cell (:attr:`MapResult.brain`); the
    weighted mean it is taken around is the masked-pooling global prediction."""
    if age_map is None or brain is None:
        return None
    w = brain.astype(np.float64).reshape(-1)
    v = age_map.astype(np.float64).reshape(-1)
    keep = (w > 0) & np.isfinite(v)
    if not keep.any():
        return None
    w, v = w[keep], v[keep]
    mean = float((w * v).sum() / w.sum())
    return float(math.sqrt(max(0.0, float((w * (v - mean) ** 2).sum() / w.sum()))))


def conformal_half_width(abs_errors: Sequence[float], level: float) -> float | None:
    """The ``ceil((n + 1) * level)``-th smallest absolute error (None when n is too small for
    that rank to exist, i.e. the interval would be unbounded)."""
    errors = sorted(float(e) for e in abs_errors)
    rank = math.ceil((len(errors) + 1) * level)
    if rank > len(errors) or rank < 1:
        return None
    return errors[rank - 1]


def fit_calibration(
    rows: Sequence[dict[str, Any]], fitted_on: str, level: float = INTERVAL_LEVEL
) -> dict[str, Any]:
    """The calibration stored in weights metadata, from held-out rows with ``age``,
    ``predicted_age`` and optionally ``map_spread``.

    Raises ValueError when there are too few labelled rows to fit anything (fewer than 3)."""
    aged = [(float(r["age"]), float(r["predicted_age"])) for r in rows
            if r.get("age") is not None and r.get("predicted_age") is not None]
    if len(aged) < 3:
        raise ValueError(f"a calibration needs at least 3 held-out predictions with an age, "
                         f"got {len(aged)}")
    age = np.array([a for a, _ in aged])
    pred = np.array([p for _, p in aged])
    slope, intercept = (float(c) for c in np.polyfit(age, pred, 1))
    out: dict[str, Any] = {"fitted_on": fitted_on, "n": len(aged)}
    if slope > MIN_SLOPE:
        corrected_gap = (pred - intercept) / slope - age
        out["bias_correction"] = {
            "method": BIAS_METHOD, "reference": BIAS_REFERENCE,
            "slope": round(slope, 6), "intercept": round(intercept, 6),
            "raw_gap_sd": round(float(np.std(pred - age, ddof=1)), 4),
            "corrected_gap_sd": round(float(np.std(corrected_gap, ddof=1)), 4),
        }
    else:
        out["bias_correction"] = None
        out["bias_correction_note"] = (
            f"not fitted: the held-out predictions barely follow age (slope {slope:.3f}), so a "
            "correction would divide by almost zero")
    half = conformal_half_width(np.abs(pred - age).tolist(), level)
    out["age_interval"] = None if half is None else {
        "level": level, "half_width_years": round(half, 4), "method": INTERVAL_METHOD}
    spreads = [float(r["map_spread"]) for r in rows if r.get("map_spread") is not None]
    if len(spreads) >= 3:
        p5, p50, p95 = (float(v) for v in np.percentile(spreads, [5, 50, 95]))
        out["map_spread"] = {
            "definition": SPREAD_DEFINITION, "n": len(spreads),
            "min": round(min(spreads), 4), "p5": round(p5, 4), "median": round(p50, 4),
            "p95": round(p95, 4), "max": round(max(spreads), 4),
            "warn_below": round(SPREAD_LIMITS[0] * p5, 4),
            "warn_above": round(SPREAD_LIMITS[1] * p95, 4),
        }
    out["sex"] = {"undetermined": list(SEX_UNDETERMINED),
                  "mismatch_recorded_female_below": SEX_MISMATCH[0],
                  "mismatch_recorded_male_above": SEX_MISMATCH[1]}
    return out


#: the fields of a :class:`Reading` in predictions.tsv, in the table's order
READING_COLUMNS = ("sex_call", "age_interval_low", "age_interval_high", "chronological_age",
                   "recorded_sex", "sex_note", "brain_age_gap", "brain_age_gap_corrected",
                   "map_spread")


@dataclass
class Reading:
    """One prediction read for a person (the fields written to prediction.json and the table)."""

    chronological_age: float | None = None
    recorded_sex: str | None = None
    brain_age_gap: float | None = None
    brain_age_gap_corrected: float | None = None
    age_interval: tuple[float, float] | None = None
    map_spread: float | None = None
    sex_call: str | None = None
    #: the recorded sex contradicted by the sex call (F/M), at any P(female): "recorded M, model
    #: calls F (P(female) 0.67)"; the strong flag (a warning) needs P(female) beyond SEX_MISMATCH
    sex_note: str | None = None
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    methods: dict[str, Any] = field(default_factory=dict)

    def columns(self) -> dict[str, Any]:
        """The predictions.tsv columns of this reading."""
        lo, hi = self.age_interval or (None, None)
        values = {"age_interval_low": lo, "age_interval_high": hi}
        return {k: values[k] if k in values else getattr(self, k) for k in READING_COLUMNS}


def sex_call(p_female: float | None, calibration: dict[str, Any] | None) -> str | None:
    """"F", "M" or "undetermined" (P(female) inside the weights' undetermined band)."""
    if p_female is None:
        return None
    lo, hi = ((calibration or {}).get("sex") or {}).get("undetermined", SEX_UNDETERMINED)
    if p_female < lo:
        return "M"
    if p_female > hi:
        return "F"
    return "undetermined"


def model_figures(meta_training: dict[str, Any]) -> dict[str, float]:
    """The cross-validated age MAE and sex accuracy the weights' model card reports ({} when
    the weights carry none)."""
    overall = ((meta_training.get("crossval") or {}).get("overall") or {}).get("model") or {}
    out: dict[str, float] = {}
    mae = (overall.get("age") or {}).get("mae")
    acc = (overall.get("sex") or {}).get("accuracy")
    if mae is not None:
        out["age_mae_years"] = float(mae)
    if acc is not None:
        out["sex_accuracy"] = float(acc)
    return out


def spread_reference(ref: dict[str, Any]) -> str:
    """Whose map spreads a calibration's range comes from, for a message: the weights'
    held-out scans, or the controls of a site calibration (its ``source``)."""
    source = str(ref.get("source") or "weights")
    if source.startswith("site"):
        n = f"{ref['n']} " if ref.get("n") is not None else ""
        return f"the {n}controls of site calibration {source}"
    return "the weights' held-out scans"


def read_prediction(
    age: float | None,
    p_female: float | None,
    spread: float | None,
    chronological_age: float | None,
    recorded_sex: str | None,
    calibration: dict[str, Any] | None,
    age_range: Sequence[float] | None,
    weights_id: str,
) -> Reading:
    """The gap, its correction, the interval, the sex call and the flags of one prediction."""
    cal = calibration or {}
    r = Reading(chronological_age=chronological_age, recorded_sex=recorded_sex,
                map_spread=spread, sex_call=sex_call(p_female, cal))
    if not cal:
        r.notes.append(f"weights {weights_id} carry no calibration (no held-out predictions): "
                       "raw gap only, no bias correction, interval or map-spread range")
    if age is not None:
        interval = cal.get("age_interval")
        if interval:
            q = float(interval["half_width_years"])
            r.age_interval = (age - q, age + q)
            r.methods["age_interval"] = {**interval, "n": cal.get("n")}
        elif cal.get("age_interval_note"):
            r.notes.append(f"age interval {cal['age_interval_note']}")
        if chronological_age is not None:
            r.brain_age_gap = age - chronological_age
            r.methods["brain_age_gap"] = "predicted age - chronological age"
            bias = cal.get("bias_correction")
            if bias:
                corrected = (age - float(bias["intercept"])) / float(bias["slope"])
                r.brain_age_gap_corrected = corrected - chronological_age
                r.methods["brain_age_gap_corrected"] = {**bias, "n": cal.get("n")}
            elif cal:
                r.notes.append(cal.get("bias_correction_note") or
                               f"weights {weights_id} carry no bias correction: raw gap only")
        if age_range:
            lo, hi = float(age_range[0]), float(age_range[1])
            if not lo <= age <= hi:
                r.warnings.append(
                    f"predicted age {age:.1f} y lies outside the training age range {lo:g}-"
                    f"{hi:g} y of weights {weights_id}: an extrapolation, trust it less")
            if chronological_age is not None and not lo <= chronological_age <= hi:
                r.warnings.append(
                    f"chronological age {chronological_age:g} y lies outside the training age "
                    f"range {lo:g}-{hi:g} y of weights {weights_id}: the gap is an "
                    "extrapolation, trust it less")
    if spread is not None and cal.get("map_spread"):
        ref = cal["map_spread"]
        r.methods["map_spread"] = {k: ref[k] for k in ("definition", "n", "p5", "median", "p95",
                                                       "warn_below", "warn_above", "source")
                                   if k in ref}
        if spread > float(ref["warn_above"]) or spread < float(ref["warn_below"]):
            r.warnings.append(
                f"the local age map spreads {spread:.1f} y across the brain; on "
                f"{spread_reference(ref)} it spread {ref['p5']:.1f}-{ref['p95']:.1f} y (5th-95th "
                "percentile): a map that disagrees with itself this much suggests a bad input "
                "or an unfamiliar scanner; check the scan and its mask")
    if recorded_sex is not None and r.sex_call in ("F", "M") and r.sex_call != recorded_sex:
        assert p_female is not None
        r.sex_note = (f"recorded {recorded_sex}, model calls {r.sex_call} "
                      f"(P(female) {p_female:.2f})")
    if recorded_sex is not None and p_female is not None:
        below, above = (((cal.get("sex") or {}).get(k, d)) for k, d in (
            ("mismatch_recorded_female_below", SEX_MISMATCH[0]),
            ("mismatch_recorded_male_above", SEX_MISMATCH[1])))
        if (recorded_sex == "F" and p_female < below) or (recorded_sex == "M" and
                                                          p_female > above):
            r.warnings.append(
                f"recorded sex {recorded_sex} but P(female) is {p_female:.2f}: a mislabelled "
                "or swapped file is the usual cause; check that this scan belongs to this "
                "person")
    return r
