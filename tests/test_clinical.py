"""The brain-age gap, its bias correction, the interval, the map spread and the flags, against
values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from brainbag.person.clinical import (
    conformal_half_width,
    fit_calibration,
    map_spread,
    read_prediction,
    sex_call,
)

# five held-out predictions on the line predicted = 0.5 * age + 25 exactly, plus residuals
AGES = [20.0, 30.0, 40.0, 50.0, 60.0]
RESIDUALS = [2.0, -2.0, 0.0, 2.0, -2.0]  # sum 0 and uncorrelated with age: the fit is exact
PREDS = [0.5 * a + 25 + r for a, r in zip(AGES, RESIDUALS, strict=True)]


def _rows(spreads=None):
    spreads = spreads or [None] * len(AGES)
    return [{"age": a, "predicted_age": p, "map_spread": s}
            for a, p, s in zip(AGES, PREDS, spreads, strict=True)]


def test_the_bias_fit_recovers_slope_and_intercept_by_hand() -> None:
    # residuals 2, -2, 0, 2, -2 against centred ages -20, -10, 0, 10, 20: sum of products
    # -40 + 20 + 0 + 20 - 40 = -40, so the least-squares slope is 0.5 - 40 / 1000 = 0.46
    cal = fit_calibration(_rows(), fitted_on="test")
    bias = cal["bias_correction"]
    assert bias["slope"] == pytest.approx(0.46)
    # the line passes through the means: mean age 40, mean prediction 45
    assert bias["intercept"] == pytest.approx(45 - 0.46 * 40)
    assert cal["n"] == 5 and cal["fitted_on"] == "test"


def test_gap_and_corrected_gap_by_hand() -> None:
    cal = {"n": 10, "bias_correction": {"slope": 0.5, "intercept": 25.0}}
    r = read_prediction(age=60.0, p_female=0.8, spread=None, chronological_age=50.0,
                        recorded_sex="F", calibration=cal, age_range=(20, 80), weights_id="w")
    assert r.brain_age_gap == pytest.approx(10.0)
    # corrected age (60 - 25) / 0.5 = 70, minus 50
    assert r.brain_age_gap_corrected == pytest.approx(20.0)
    # a prediction exactly on the bias line has a corrected gap of 0 at any age
    on_line = read_prediction(age=0.5 * 30 + 25, p_female=None, spread=None,
                              chronological_age=30.0, recorded_sex=None, calibration=cal,
                              age_range=None, weights_id="w")
    assert on_line.brain_age_gap == pytest.approx(10.0)
    assert on_line.brain_age_gap_corrected == pytest.approx(0.0)


def test_without_a_chronological_age_there_is_no_gap_but_an_interval() -> None:
    cal = {"n": 59, "age_interval": {"level": 0.9, "half_width_years": 20.0, "method": "m"},
           "bias_correction": {"slope": 0.5, "intercept": 25.0}}
    r = read_prediction(age=55.0, p_female=0.5, spread=None, chronological_age=None,
                        recorded_sex=None, calibration=cal, age_range=None, weights_id="w")
    assert r.brain_age_gap is None and r.brain_age_gap_corrected is None
    assert r.age_interval == (35.0, 75.0)
    assert r.columns()["age_interval_low"] == 35.0 and r.columns()["age_interval_high"] == 75.0


def test_uncalibrated_weights_give_the_raw_gap_with_a_note() -> None:
    r = read_prediction(age=60.0, p_female=0.9, spread=30.0, chronological_age=55.0,
                        recorded_sex="F", calibration={}, age_range=None, weights_id="old")
    assert r.brain_age_gap == pytest.approx(5.0)
    assert r.brain_age_gap_corrected is None and r.age_interval is None
    assert any("old carry no calibration" in n for n in r.notes)


def test_conformal_half_width_is_the_rank_by_hand() -> None:
    errors = [5.0, 1.0, 4.0, 2.0, 3.0, 9.0, 7.0, 6.0, 8.0]  # n = 9
    # rank ceil(10 * 0.8) = 8 -> the 8th smallest = 8
    assert conformal_half_width(errors, 0.8) == 8.0
    # rank ceil(10 * 0.9) = 9 -> the largest
    assert conformal_half_width(errors, 0.9) == 9.0
    # rank ceil(10 * 0.95) = 10 > n: no finite interval
    assert conformal_half_width(errors, 0.95) is None
    cal = fit_calibration(_rows(), fitted_on="t", level=0.5)
    # absolute errors of the exact-line fit are not the residuals above; the interval uses the
    # raw errors |predicted - age| = |25 - 0.5 age + r|: 17, 8, 5, 2, 7 -> rank ceil(6 * 0.5) = 3
    assert cal["age_interval"]["half_width_years"] == pytest.approx(7.0)


def test_map_spread_is_the_brain_weighted_sd() -> None:
    age = np.array([[[10.0, 20.0], [30.0, 99.0]]], dtype=np.float32)
    brain = np.array([[[1.0, 1.0], [0.5, 0.0]]], dtype=np.float32)  # the 99 is outside
    # weighted mean (10 + 20 + 15) / 2.5 = 18; weighted variance
    # (64 + 4 + 0.5 * 144) / 2.5 = 56
    assert map_spread(age, brain) == pytest.approx(math.sqrt(56.0))
    assert map_spread(None, brain) is None and map_spread(age, np.zeros_like(brain)) is None


def test_spread_reference_and_its_warning() -> None:
    spreads = [20.0, 30.0, 40.0, 50.0, 60.0]
    cal = fit_calibration(_rows(spreads), fitted_on="t")
    ref = cal["map_spread"]
    assert ref["median"] == 40.0 and ref["p5"] == pytest.approx(22.0)
    assert ref["p95"] == pytest.approx(58.0)
    assert ref["warn_above"] == pytest.approx(116.0) and ref["warn_below"] == pytest.approx(11.0)
    common = dict(age=50.0, p_female=None, chronological_age=None, recorded_sex=None,
                  calibration=cal, age_range=None, weights_id="w")
    assert not read_prediction(spread=45.0, **common).warnings
    high = read_prediction(spread=130.0, **common).warnings
    low = read_prediction(spread=5.0, **common).warnings
    assert len(high) == 1 and "spreads 130.0 y" in high[0] and "22.0-58.0 y" in high[0]
    assert len(low) == 1 and "spreads 5.0 y" in low[0]


@pytest.mark.parametrize(("p", "call"), [(0.2, "M"), (0.35, "undetermined"), (0.5, "undetermined"),
                                         (0.65, "undetermined"), (0.66, "F"), (None, None)])
def test_sex_call_only_outside_the_undetermined_band(p, call) -> None:
    assert sex_call(p, {}) == call


def test_the_band_comes_from_the_weights_when_they_have_one() -> None:
    assert sex_call(0.6, {"sex": {"undetermined": [0.45, 0.55]}}) == "F"


@pytest.mark.parametrize(("recorded", "p", "flagged"), [
    ("F", 0.05, True), ("F", 0.15, False), ("M", 0.95, True), ("M", 0.85, False),
    ("F", 0.95, False), ("M", 0.05, False)])
def test_recorded_sex_strongly_contradicted_is_flagged(recorded, p, flagged) -> None:
    r = read_prediction(age=None, p_female=p, spread=None, chronological_age=None,
                        recorded_sex=recorded, calibration={}, age_range=None, weights_id="w")
    assert any("mislabelled or swapped" in w for w in r.warnings) == flagged


@pytest.mark.parametrize(("chrono", "flagged"), [(19.0, True), (20.0, False), (80.0, False),
                                                 (85.5, True)])
def test_chronological_age_outside_the_training_range_is_flagged(chrono, flagged) -> None:
    r = read_prediction(age=50.0, p_female=None, spread=None, chronological_age=chrono,
                        recorded_sex=None, calibration={}, age_range=(20.0, 80.0),
                        weights_id="w")
    assert any("outside the training age range" in w for w in r.warnings) == flagged


def test_a_flat_fit_refuses_to_correct() -> None:
    rows = [{"age": a, "predicted_age": 50.0 + (1 if i % 2 else -1)}
            for i, a in enumerate(AGES)]
    cal = fit_calibration(rows, fitted_on="t")
    assert cal["bias_correction"] is None and "slope" in cal["bias_correction_note"]
    r = read_prediction(age=50.0, p_female=None, spread=None, chronological_age=40.0,
                        recorded_sex=None, calibration=cal, age_range=None, weights_id="w")
    assert r.brain_age_gap == pytest.approx(10.0) and r.brain_age_gap_corrected is None
    assert any("slope" in n for n in r.notes)
    with pytest.raises(ValueError, match="at least 3"):
        fit_calibration(rows[:2], fitted_on="t")


def test_the_shipped_weights_carry_their_calibration() -> None:
    from brainbag.weights.file import load_weights
    from brainbag.weights.manifest import SHIPPED_MANIFEST, read_manifest

    entry = next(e for e in read_manifest(SHIPPED_MANIFEST) if e.default and e.rf == 9)
    meta = load_weights(SHIPPED_MANIFEST.parent / entry.bundled).meta
    cal = meta.calibration
    assert cal["n"] == 59
    assert 0.05 < cal["bias_correction"]["slope"] < 1.0
    assert cal["age_interval"]["level"] == 0.9 and cal["age_interval"]["half_width_years"] > 0
    assert cal["map_spread"]["p5"] < cal["map_spread"]["median"] < cal["map_spread"]["p95"]


@pytest.mark.parametrize(("age", "flagged"), [(19.9, True), (20.0, False), (80.0, False),
                                              (80.1, True)])
def test_predicted_age_outside_the_training_range_is_flagged(age, flagged) -> None:
    r = read_prediction(age=age, p_female=None, spread=None, chronological_age=None,
                        recorded_sex=None, calibration={}, age_range=(20.0, 80.0),
                        weights_id="w")
    assert any(w.startswith(f"predicted age {age:.1f} y lies outside the training age range "
                            "20-80 y of weights w") for w in r.warnings) == flagged


@pytest.mark.parametrize(("recorded", "p", "note", "flagged"), [
    ("M", 0.67, "recorded M, model calls F (P(female) 0.67)", False),
    ("M", 0.95, "recorded M, model calls F (P(female) 0.95)", True),
    ("F", 0.20, "recorded F, model calls M (P(female) 0.20)", False),
    ("M", 0.50, None, False),  # undetermined: no call to contradict
    ("F", 0.67, None, False), (None, 0.67, None, False)])
def test_a_recorded_sex_the_call_contradicts_gets_a_note(recorded, p, note, flagged) -> None:
    """Issue 23, item 8: the note is the milder sign (any contradicting call); the flag, a
    warning, needs P(female) beyond 0.1 / 0.9."""
    r = read_prediction(age=None, p_female=p, spread=None, chronological_age=None,
                        recorded_sex=recorded, calibration={}, age_range=None, weights_id="w")
    assert r.sex_note == note and r.columns()["sex_note"] == note
    assert any("mislabelled or swapped" in w for w in r.warnings) == flagged
