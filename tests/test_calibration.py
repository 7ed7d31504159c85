"""Site calibration (issue 27): the fit against exact oracles, the thresholds as documented in
brainbag/person/calibration.py, the JSON file and its refusals, and the corrected gap predict
will compute with it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from brainbag.errors import InputError, UsageError
from brainbag.person.calibration import (
    FORMAT,
    VERSION,
    SiteCalibration,
    bootstrap_line,
    calibration_effect,
    choose_calibration,
    corrected_gaps,
    describe,
    fit_site_calibration,
    format_effect,
    read_site_calibration,
    write_site_calibration,
)
from brainbag.person.clinical import fit_calibration, read_prediction

SHA = "a" * 64
OTHER_SHA = "b" * 64
WEIGHTS_ID = "bagnet3d-rf9-test"
# the weights' own calibration, as fit_calibration stores it in weights metadata
WEIGHTS_CAL = fit_calibration(
    [{"age": a, "predicted_age": 0.3 * a + 38 + r, "map_spread": 40 + r}
     for a, r in zip(range(20, 80, 2), [3, -3, 1, -1, 0] * 6, strict=True)],
    fitted_on="test cross-validation")


def _controls(n: int, lo: float = 25, hi: float = 70, slope: float = 0.5,
              intercept: float = 30, noise: float = 0.0, seed: int = 0
              ) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(seed)
    age = np.linspace(lo, hi, n)
    pred = slope * age + intercept + rng.normal(0, noise, n) * (noise > 0)
    return pred.tolist(), age.tolist()


def _fit(pred: list[float], age: list[float], **kw: Any) -> SiteCalibration:
    n = len(age)
    kw.setdefault("weights_calibration", WEIGHTS_CAL)
    kw.setdefault("weights_age_range", (20.0, 80.0))
    return fit_site_calibration(pred, age, ["F", "M"] * (n // 2) + ["F"] * (n % 2),
                                [30.0 + i % 7 for i in range(n)], WEIGHTS_ID, SHA, **kw)


def one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_the_fitted_line_recovers_a_known_line_exactly() -> None:
    pred, age = _controls(20)
    site = _fit(pred, age)
    assert site.line == "full"
    # predicted = 0.5 * age + 30 without noise: least squares gives it back (6 decimals stored)
    assert site.slope == 0.5 and site.intercept == 30.0
    assert site.calibration["bias_correction"]["slope"] == 0.5
    assert site.calibration["bias_correction"]["intercept"] == 30.0
    assert site.residual_sd == 0.0
    # every resample of points on one line gives that line
    assert site.slope_ci95 == (0.5, 0.5) and site.intercept_ci95 == (30.0, 30.0)
    assert site.n == 20 and site.age_min == 25 and site.age_max == 70
    assert site.sexes == {"F": 10, "M": 10, "unknown": 0}
    assert site.warnings == []


def test_the_vectorised_line_is_least_squares() -> None:
    rng = np.random.default_rng(3)
    age = rng.uniform(20, 80, 30)
    pred = 0.4 * age + 35 + rng.normal(0, 4, 30)
    site = _fit(pred.tolist(), age.tolist())
    slope, intercept = np.polyfit(age, pred, 1)
    assert site.slope == round(slope, 6) and site.intercept == round(intercept, 6)
    # leave-one-out (the vectorised helper behind it and the bootstrap) against polyfit
    loo = []
    for i in range(30):
        keep = np.arange(30) != i
        b, a = np.polyfit(age[keep], pred[keep], 1)
        loo.append((pred[i] - a) / b - age[i])
    assert site.effect["site_leave_one_out"]["mean_abs"] == pytest.approx(
        np.mean(np.abs(loo)), abs=1e-4)
    assert site.effect["site_leave_one_out"]["mean"] == pytest.approx(np.mean(loo), abs=1e-4)
    assert site.residual_sd == pytest.approx(
        np.std(pred - (site.slope * age + site.intercept), ddof=2), abs=1e-4)


def test_bootstrap_intervals_contain_the_true_slope_under_noise() -> None:
    pred, age = _controls(40, noise=4.0, slope=0.6, intercept=25, seed=1)
    site = _fit(pred, age)
    assert site.line == "full"
    assert site.slope_ci95 is not None and site.intercept_ci95 is not None
    lo, hi = site.slope_ci95
    assert lo < 0.6 < hi and hi - lo < 0.4
    lo, hi = site.intercept_ci95
    assert lo < 25 < hi
    assert site.bootstrap == {"resamples": 2000, "seed": 0, "level": 0.95, "valid": 2000}
    # and they cover it about 95 % of the time over datasets
    covered = 0
    for seed in range(40):
        p, a = _controls(30, noise=5.0, slope=0.6, intercept=25, seed=100 + seed)
        ci = bootstrap_line(np.array(a), np.array(p), resamples=500, seed=seed)["slope_ci95"]
        covered += ci[0] < 0.6 < ci[1]
    assert covered >= 34


def test_corrected_gap_with_the_site_calibration_is_the_documented_arithmetic() -> None:
    pred, age = _controls(25, noise=3.0, slope=0.45, intercept=20, seed=2)
    site = _fit(pred, age, name="clinic")
    cal, source = choose_calibration(WEIGHTS_CAL, site)
    assert source == "site"
    w_cal, w_source = choose_calibration(WEIGHTS_CAL, None)
    assert w_source == "weights"
    wb = WEIGHTS_CAL["bias_correction"]
    for p, a in [(55.3, 41.0), (38.0, 70.5), (61.25, 22.0)]:
        with_site = read_prediction(p, 0.8, 35.0, a, "F", cal, (20, 80), WEIGHTS_ID)
        with_weights = read_prediction(p, 0.8, 35.0, a, "F", w_cal, (20, 80), WEIGHTS_ID)
        assert with_site.brain_age_gap_corrected == (p - site.intercept) / site.slope - a
        assert with_weights.brain_age_gap_corrected == (p - wb["intercept"]) / wb["slope"] - a
        assert with_site.brain_age_gap == with_weights.brain_age_gap == p - a
        q = site.calibration["age_interval"]["half_width_years"]
        assert with_site.age_interval == (p - q, p + q)
        assert with_site.methods["brain_age_gap_corrected"]["source"] == "site"
        assert with_site.methods["age_interval"]["source"] == "site"
        assert with_weights.methods["brain_age_gap_corrected"]["source"] == "weights"
    # the controls' table holds the same numbers
    for row in site.controls:
        assert row["gap_corrected_site"] == round(
            (row["predicted_age"] - site.intercept) / site.slope - row["age"], 4)


def test_the_interval_and_map_spread_are_clinical_pys_on_the_controls() -> None:
    pred, age = _controls(25, noise=3.0, seed=4)
    site = _fit(pred, age)
    rows = [{"age": a, "predicted_age": p, "map_spread": 30.0 + i % 7}
            for i, (a, p) in enumerate(zip(age, pred, strict=True))]
    own = fit_calibration(rows, fitted_on="x")
    assert site.calibration["age_interval"] == own["age_interval"]
    assert site.calibration["map_spread"] == own["map_spread"]
    assert site.calibration["sex"] == WEIGHTS_CAL["sex"]


def test_a_calibration_round_trips_through_json(tmp_path: Path) -> None:
    pred, age = _controls(12, noise=2.0, seed=5)
    site = _fit(pred, age, name="Clinic A", ids=[f"sub-{i:02d}" for i in range(12)],
                p_female=[0.7] * 12, created="2026-01-02T03:04:05Z")
    path = tmp_path / "site-calibration.json"
    write_site_calibration(site, path)
    data = json.loads(path.read_text())
    assert data["format"] == FORMAT and data["version"] == VERSION == 1
    assert data["weights"] == {"id": WEIGHTS_ID, "sha256": SHA, "age_range": [20.0, 80.0]}
    assert data["controls_summary"]["n"] == 12 and len(data["controls"]) == 12
    assert data["controls"][0]["id"] == "sub-00" and data["controls"][0]["p_female"] == 0.7
    assert data["brainbag_version"] and data["created"] == "2026-01-02T03:04:05Z"
    back = read_site_calibration(path, SHA, WEIGHTS_ID)
    assert back == site
    assert back.to_dict() == site.to_dict()
    assert back.source == "site:site-calibration.json"
    cal = back.to_weights_calibration()
    assert cal["source"] == cal["bias_correction"]["source"] == "site:site-calibration.json"
    assert {k: v for k, v in cal["bias_correction"].items() if k != "source"} == \
        site.calibration["bias_correction"]


def test_a_file_for_other_weights_is_refused_with_one_line(tmp_path: Path) -> None:
    pred, age = _controls(12, seed=6)
    path = tmp_path / "cal.json"
    write_site_calibration(_fit(pred, age), path)
    with pytest.raises(UsageError) as exc:
        read_site_calibration(path, OTHER_SHA, "bagnet3d-rf9-other")
    text = one_line(exc)
    assert WEIGHTS_ID in text and "bagnet3d-rf9-other" in text
    assert SHA[:12] in text and OTHER_SHA[:12] in text


@pytest.mark.parametrize("change, expect", [
    (lambda d: "not json {", "is not JSON"),
    (lambda d: [1, 2], "is not a brainbag site calibration"),
    (lambda d: {**d, "format": "brainbag-weights/1"}, "format 'brainbag-weights/1'"),
    (lambda d: {**d, "version": 2}, "version 2"),
    (lambda d: {k: v for k, v in d.items() if k != "fit"}, "fit.line"),
    (lambda d: {**d, "fit": {**d["fit"], "slope": "0.5"}}, "fit.slope"),
    (lambda d: {**d, "calibration": {**d["calibration"], "bias_correction": None}},
     "bias_correction"),
    (lambda d: {**d, "controls": d["controls"][:2]}, "controls recorded"),
])
def test_a_malformed_file_is_refused_with_one_line(tmp_path: Path, change, expect) -> None:
    pred, age = _controls(12, seed=7)
    path = tmp_path / "cal.json"
    write_site_calibration(_fit(pred, age), path)
    changed = change(json.loads(path.read_text()))
    path.write_text(changed if isinstance(changed, str) else json.dumps(changed))
    with pytest.raises(InputError) as exc:
        read_site_calibration(path, SHA)
    assert expect in one_line(exc)
    with pytest.raises(InputError) as exc:
        read_site_calibration(tmp_path / "missing.json", SHA)
    assert "not found" in one_line(exc)


def test_three_controls_fit_the_offset_only_and_warn() -> None:
    pred, age = [50.0, 55.0, 63.0], [30.0, 45.0, 60.0]
    site = _fit(pred, age)
    w_slope = WEIGHTS_CAL["bias_correction"]["slope"]
    # offset line: the weights' slope kept, intercept = mean(predicted - slope * age)
    assert site.line == "offset" and site.slope == w_slope
    assert site.intercept == round(float(np.mean(np.array(pred) - w_slope * np.array(age))), 6)
    assert site.slope_ci95 is None and site.intercept_ci95 is not None
    assert site.full_line is not None  # the line it did not use, for the record
    assert site.calibration["age_interval"] is None
    assert "at least 9" in site.calibration["age_interval_note"]
    text = " ".join(site.warnings)
    assert "offset only" in text and "3 controls" in text and "fewer than 20" in text
    assert "no age interval" in text
    # corrected gaps of the controls average 0 with the offset fitted on them
    assert abs(np.mean([c["gap_corrected_site"] for c in site.controls])) < 1e-3
    # a full line may be asked for (range over 5 y): it warns
    forced = _fit(pred, age, line="full")
    assert forced.line == "full" and any("full bias line from 3" in w for w in forced.warnings)


def test_fewer_than_three_controls_are_refused_with_one_line() -> None:
    with pytest.raises(InputError) as exc:
        _fit([50.0, 55.0], [30.0, 45.0])
    assert "at least 3 controls" in one_line(exc) and "got 2" in one_line(exc)
    # controls without an age do not count
    with pytest.raises(InputError) as exc:
        fit_site_calibration([50.0, 55.0, 60.0], [30.0, None, 50.0], None, None, WEIGHTS_ID,
                             SHA, weights_calibration=WEIGHTS_CAL)
    assert "got 2 (1 without)" in one_line(exc)


def test_an_age_range_under_five_years_fits_the_offset_or_is_refused() -> None:
    pred, age = _controls(30, lo=40, hi=44, noise=2.0, seed=8)
    site = _fit(pred, age)
    assert site.line == "offset"
    assert any("spanning 4.0 y" in w for w in site.warnings)
    assert any("span only 4.0 y" in w for w in site.warnings)  # narrow-range warning
    with pytest.raises(InputError) as exc:
        _fit(pred, age, line="full")
    assert "span 4.0 y" in one_line(exc)
    # weights without a slope to keep: no bias line can be made
    with pytest.raises(InputError) as exc:
        _fit(pred, age, weights_calibration={})
    assert "carry no slope" in one_line(exc)
    with pytest.raises(InputError):
        _fit(pred, age, line="offset", weights_calibration=None)


def test_a_slope_the_controls_cannot_tell_from_zero_keeps_the_weights_slope() -> None:
    rng = np.random.default_rng(9)
    age = np.linspace(20, 70, 15)
    pred = 50 + rng.normal(0, 5, 15)  # no age signal
    site = _fit(pred.tolist(), age.tolist())
    assert site.line == "offset" and "cannot tell" in site.line_reason
    with pytest.raises(InputError) as exc:
        _fit((50 - 0.01 * age).tolist(), age.tolist(), line="full")
    assert "barely follow" in one_line(exc)


def test_controls_outside_the_training_range_warn() -> None:
    pred, age = _controls(20, lo=60, hi=95)
    site = _fit(pred, age, weights_age_range=(23.35, 74.01))
    assert any("outside the training age range 23.35-74.01" in w for w in site.warnings)
    assert site.age_warnings(50.0) and not site.age_warnings(70.0)
    with pytest.raises(UsageError):
        _fit(pred, age, line="both")


def test_the_effect_summary_compares_weights_and_site_calibration() -> None:
    pred, age = _controls(20, noise=3.0, slope=0.3, intercept=20, seed=10)  # 18 y lower
    site = _fit(pred, age)
    e = site.effect
    w_gaps = np.array(corrected_gaps(WEIGHTS_CAL, pred, age), dtype=float)
    assert e["weights"]["mean"] == round(float(np.mean(w_gaps)), 4)
    assert e["weights"]["mean_abs"] == round(float(np.mean(np.abs(w_gaps))), 4)
    assert abs(e["site"]["mean"]) < 1e-3  # least squares: bias 0 on its own controls
    assert e["site_leave_one_out"]["n"] == 20
    assert e["weights"]["mean"] < -40 and abs(e["site_leave_one_out"]["mean"]) < 2
    again = calibration_effect(pred, age, WEIGHTS_CAL, site.to_weights_calibration())
    assert again["site_leave_one_out"] == e["site_leave_one_out"]
    lines = format_effect(e) + describe(site)
    assert any("weights' own calibration" in line for line in lines)
    assert any("bias line (full)" in line for line in lines)


def test_the_map_spread_warning_and_methods_name_the_site_calibration() -> None:
    pred, age = _controls(12, noise=2.0, seed=11)
    site = _fit(pred, age)
    site.path = Path("clinic.json")
    cal, source = choose_calibration(WEIGHTS_CAL, site)
    spread = site.calibration["map_spread"]
    odd = 3 * spread["warn_above"]
    r = read_prediction(50.0, 0.5, odd, 40.0, None, cal, (20, 80), WEIGHTS_ID)
    assert r.methods["map_spread"]["source"] == source == "site:clinic.json"
    text = next(w for w in r.warnings if "local age map spreads" in w)
    assert "on the 12 controls of site calibration site:clinic.json it spread" in text
    # the weights' own: named as before
    w_cal, _ = choose_calibration(WEIGHTS_CAL, None)
    r = read_prediction(50.0, 0.5, 3 * w_cal["map_spread"]["warn_above"], 40.0, None, w_cal,
                        (20, 80), WEIGHTS_ID)
    assert r.methods["map_spread"]["source"] == "weights"
    assert any("on the weights' held-out scans it spread" in w for w in r.warnings)


def test_a_calibration_without_interval_says_why_in_the_reading() -> None:
    site = _fit([50.0, 55.0, 63.0, 58.0], [30.0, 45.0, 60.0, 50.0])
    cal, _ = choose_calibration(WEIGHTS_CAL, site)
    r = read_prediction(50.0, None, None, 40.0, None, cal, (20, 80), WEIGHTS_ID)
    assert r.age_interval is None and "age_interval" not in r.methods
    assert "age interval not fitted: a 90% split-conformal interval needs at least 9 controls, " \
        "got 4" in r.notes


def test_one_minimum_slope_for_the_weights_and_the_site(monkeypatch) -> None:
    from brainbag.person import calibration, clinical

    assert calibration.MIN_SLOPE is clinical.MIN_SLOPE == 0.05
    # the weights' fit reads the shared constant (it was a literal 0.05 of its own)
    rows = [{"age": a, "predicted_age": 0.3 * a + 40} for a in (20.0, 40.0, 60.0)]
    assert fit_calibration(rows, fitted_on="x")["bias_correction"]["slope"] == 0.3
    monkeypatch.setattr(clinical, "MIN_SLOPE", 0.4)
    assert fit_calibration(rows, fitted_on="x")["bias_correction"] is None


def test_check_line_refuses_before_prediction_what_the_fit_would() -> None:
    from brainbag.person.calibration import check_line

    ages = [40.0, 41.0, 43.0, 44.0]
    with pytest.raises(InputError) as before:
        check_line("full", ages, WEIGHTS_CAL, WEIGHTS_ID)
    with pytest.raises(InputError) as after:
        _fit([50.0, 51.0, 52.0, 53.0], ages, line="full")
    assert one_line(before) == one_line(after)
    with pytest.raises(InputError) as exc:
        check_line("auto", ages, None, WEIGHTS_ID)
    assert "carry no slope" in one_line(exc)
    with pytest.raises(InputError):
        check_line("offset", [20.0, 60.0, 70.0], {}, WEIGHTS_ID)
    check_line("auto", ages, WEIGHTS_CAL, WEIGHTS_ID)  # the offset line is possible
    check_line("full", [20.0, 60.0, 70.0], None, WEIGHTS_ID)  # the predictions decide
    with pytest.raises(UsageError):
        check_line("both", ages, WEIGHTS_CAL, WEIGHTS_ID)
