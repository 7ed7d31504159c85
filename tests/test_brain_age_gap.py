"""Chronological age and recorded sex in; gap, corrected gap, interval and flags out, from every
place a user keeps ages: --age/--sex, a BIDS dataset's participants/sessions/scans tables, a
list file's columns and --participants.

Narrow random networks keep these fast; their calibration is set by hand here so every derived
number can be checked against arithmetic on the record's own predicted age.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from test_batch import FAST, brain, by_name, predict, read_tsv

from brainbag.run.discover import discover
from brainbag.weights.file import load_weights, save_weights

SLOPE, INTERCEPT, HALF = 0.5, 25.0, 12.0
CALIBRATION = {
    "fitted_on": "hand-made for tests", "n": 40,
    "bias_correction": {"method": "m", "reference": "r", "slope": SLOPE, "intercept": INTERCEPT,
                        "raw_gap_sd": 5.0, "corrected_gap_sd": 10.0},
    "age_interval": {"level": 0.9, "half_width_years": HALF, "method": "m"},
    "map_spread": {"definition": "d", "n": 40, "min": 0.0, "p5": 0.0, "median": 1.0, "p95": 1e6,
                   "max": 1e6, "warn_below": 0.0, "warn_above": 1e9},
    "sex": {"undetermined": [0.35, 0.65], "mismatch_recorded_female_below": 0.1,
            "mismatch_recorded_male_above": 0.9},
}


@pytest.fixture
def calibrated(tiny_weights, tmp_path: Path) -> Path:
    """Tiny random weights carrying a hand-made calibration and a training age range 20-80."""
    loaded = load_weights(tiny_weights())
    meta = loaded.meta
    meta.calibration = CALIBRATION
    meta.training["age_range"] = [20.0, 80.0]
    path = tmp_path / "calibrated.safetensors"
    save_weights(path, loaded.model, meta)
    return path


def _json(out: Path, name: str) -> dict:
    return json.loads((out / name / "prediction.json").read_text())


def _check_arithmetic(record: dict, chrono: float | None) -> None:
    age = record["age"]
    assert record["age_interval_low"] == pytest.approx(age - HALF)
    assert record["age_interval_high"] == pytest.approx(age + HALF)
    if chrono is None:
        assert record["brain_age_gap"] is None and record["brain_age_gap_corrected"] is None
        return
    assert record["chronological_age"] == chrono
    assert record["brain_age_gap"] == pytest.approx(age - chrono)
    assert record["brain_age_gap_corrected"] == pytest.approx((age - INTERCEPT) / SLOPE - chrono)


def test_age_and_sex_on_the_command_line(tmp_path: Path, calibrated: Path) -> None:
    scan = brain(tmp_path / "s1.nii.gz")
    out = tmp_path / "out"
    result = predict(scan, "--weights", calibrated, "--out", out, "--age", "47.5", "--sex",
                     "F", *FAST)
    assert result.exit_code == 0, result.output
    record = _json(out, "s1")
    _check_arithmetic(record, 47.5)
    assert record["recorded_sex"] == "F"
    assert record["reading"]["demographics_source"] == "command line (--age/--sex)"
    assert record["reading"]["methods"]["brain_age_gap_corrected"]["slope"] == SLOPE
    call = record["sex_call"]
    p = record["p_female"]
    assert call == ("F" if p > 0.65 else "M" if p < 0.35 else "undetermined")
    # the console shows the gap and the interval next to the age
    assert "brain-age gap" in result.output and "90% interval" in result.output
    row = read_tsv(out / "predictions.tsv")[0]
    assert float(row["brain_age_gap"]) == pytest.approx(record["brain_age_gap"], abs=1e-4)
    assert row["chronological_age"] == "47.5000" and row["recorded_sex"] == "F"


def test_age_applies_to_one_input_only(tmp_path: Path, calibrated: Path) -> None:
    a, b = brain(tmp_path / "a.nii.gz"), brain(tmp_path / "b.nii.gz", seed=1)
    result = predict(a, b, "--weights", calibrated, "--out", tmp_path / "o", "--age", "40", *FAST)
    assert result.exit_code == 2 and "--age and --sex apply to one image file" in result.output
    assert not (tmp_path / "o").exists()
    bad = predict(a, "--weights", calibrated, "--out", tmp_path / "o", "--age", "-3", *FAST)
    assert bad.exit_code == 2 and not (tmp_path / "o").exists()


def _bids(root: Path) -> Path:
    (root).mkdir(parents=True)
    (root / "dataset_description.json").write_text('{"Name": "t", "BIDSVersion": "1.9.0"}')
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\n"
        "sub-01\t30\tF\n"
        "sub-02\tn/a\tM\n"
        "sub-03\t61.5\tmale\n")
    brain(root / "sub-01" / "ses-a" / "anat" / "sub-01_ses-a_T1w.nii.gz", seed=1)
    brain(root / "sub-01" / "ses-b" / "anat" / "sub-01_ses-b_T1w.nii.gz", seed=2)
    brain(root / "sub-02" / "anat" / "sub-02_T1w.nii.gz", seed=3)
    brain(root / "sub-03" / "anat" / "sub-03_T1w.nii.gz", seed=4)
    # a session table gives sub-01's age at session b; a scans table overrides it for one file
    (root / "sub-01" / "sub-01_sessions.tsv").write_text(
        "session_id\tage\n" "ses-a\t30.2\n" "ses-b\t33.0\n")
    (root / "sub-01" / "ses-b" / "sub-01_ses-b_scans.tsv").write_text(
        "filename\tacq_time\tage\n" "anat/sub-01_ses-b_T1w.nii.gz\t2020-01-01T10:00:00\t33.4\n")
    return root


def test_bids_participants_sessions_and_scans_ages(tmp_path: Path, calibrated: Path) -> None:
    root = _bids(tmp_path / "ds")
    out = tmp_path / "out"
    result = predict(root, "--weights", calibrated, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = {(r["subject"], r["session"]): r for r in read_tsv(out / "predictions.tsv")}
    assert rows[("sub-01", "ses-a")]["chronological_age"] == "30.2000"  # sessions.tsv
    assert rows[("sub-01", "ses-b")]["chronological_age"] == "33.4000"  # scans.tsv wins
    assert rows[("sub-01", "ses-a")]["recorded_sex"] == "F"  # participants.tsv
    assert rows[("sub-02", "")]["chronological_age"] == "" and rows[("sub-02", "")][
        "brain_age_gap"] == ""  # n/a leaves the cells empty
    assert rows[("sub-02", "")]["recorded_sex"] == "M"
    assert rows[("sub-03", "")]["chronological_age"] == "61.5000"
    record = json.loads((out / "sub-01" / "ses-b" / "anat" /
                         "sub-01_ses-b_prediction.json").read_text())
    _check_arithmetic(record, 33.4)
    assert "sub-01_ses-b_scans.tsv, row 2" in record["reading"]["demographics_source"]
    assert "participants.tsv, row 2" in record["reading"]["demographics_source"]


def test_an_unreadable_age_names_file_row_and_column(tmp_path: Path, calibrated: Path) -> None:
    root = _bids(tmp_path / "ds")
    (root / "participants.tsv").write_text(
        "participant_id\tage\tsex\n" "sub-01\t30\tF\n" "sub-02\tforty\tM\n" "sub-03\t61\tM\n")
    out = tmp_path / "out"
    result = predict(root, "--weights", calibrated, "--out", out, *FAST)
    assert result.exit_code == 1
    line = " ".join(result.output.split())
    assert "participants.tsv, row 3, column 'age': age 'forty' is not a number" in line
    assert not out.exists(), "nothing may be written when the ages cannot be read"


def test_list_file_columns_and_a_scan_without_age(tmp_path: Path, calibrated: Path) -> None:
    a, b, c = (brain(tmp_path / f"{n}.nii.gz", seed=i) for i, n in enumerate("abc"))
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{a}\t\t52\tM\n{b}\n{c}\t\tn/a\tF\n")
    out = tmp_path / "out"
    result = predict(listing, "--weights", calibrated, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert rows["a.nii.gz"]["chronological_age"] == "52.0000"
    assert rows["a.nii.gz"]["recorded_sex"] == "M" and rows["a.nii.gz"]["brain_age_gap"] != ""
    assert rows["b.nii.gz"]["chronological_age"] == "" and rows["b.nii.gz"]["brain_age_gap"] == ""
    assert rows["b.nii.gz"]["age_interval_low"] != ""  # the interval needs no age
    assert rows["c.nii.gz"]["chronological_age"] == "" and rows["c.nii.gz"]["recorded_sex"] == "F"
    _check_arithmetic(_json(out, "a"), 52.0)
    _check_arithmetic(_json(out, "b"), None)
    listing.write_text(f"{a}\t\tfifty\tM\n")
    bad = predict(listing, "--weights", calibrated, "--out", tmp_path / "o2", *FAST)
    assert bad.exit_code == 1
    assert "line 1, column '3 (age)': age 'fifty'" in " ".join(bad.output.split())


def test_participants_table_for_a_plain_folder(tmp_path: Path, calibrated: Path) -> None:
    data = tmp_path / "study"
    brain(data / "IXI001-HH-1_T1w.nii.gz", seed=1)
    brain(data / "IXI002-HH-2_T1w.nii.gz", seed=2)
    brain(data / "other.nii.gz", seed=3)
    table = tmp_path / "people.csv"
    table.write_text("participant_id,age,sex\nIXI001-HH-1,70.25,F\nIXI002-HH-2,,M\n")
    out = tmp_path / "out"
    result = predict(data, "--weights", calibrated, "--out", out, "--participants", table, *FAST)
    assert result.exit_code == 0, result.output
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert rows["IXI001-HH-1_T1w.nii.gz"]["chronological_age"] == "70.2500"
    assert rows["IXI002-HH-2_T1w.nii.gz"]["chronological_age"] == ""
    assert rows["IXI002-HH-2_T1w.nii.gz"]["recorded_sex"] == "M"
    assert rows["other.nii.gz"]["chronological_age"] == ""  # not in the table: empty cells
    _check_arithmetic(_json(out, "IXI001-HH-1"), 70.25)
    # a table that matches nothing is a usage error saying what the ids look like
    table.write_text("participant_id,age\nnobody,40\n")
    none = predict(data, "--weights", calibrated, "--out", tmp_path / "o2", "--participants",
                   table, *FAST)
    assert none.exit_code == 2 and "matches none of the 3 inputs" in none.output


def test_the_shared_ixi_table_matches_the_ixi_folder_by_path(tmp_path: Path) -> None:
    from conftest import SHARED_DATA

    table = SHARED_DATA / "ixi" / "participants.tsv"
    if not table.exists():
        pytest.skip(f"{table} not available (set BRAINBAG_SHARED_DATA)")
    found = discover([SHARED_DATA / "ixi" / "2mm"], tmp_path / "out",
                     mask_pattern="{stem}_mask.nii.gz")
    from brainbag.run.demographics import add_demographics

    items = add_demographics(found, participants=table).items
    scans = [i for i in items if i.path.name.endswith("_T1w.nii.gz")]
    with open(table, newline="") as fh:
        truth = {Path(r["t1w"]).name: float(r["age"]) for r in csv.DictReader(fh, delimiter="\t")}
    assert scans and all(i.demographics.age == truth[i.path.name] for i in scans)


def test_flags_reach_json_table_and_console(tmp_path: Path, calibrated: Path) -> None:
    scan = brain(tmp_path / "s.nii.gz")
    out = tmp_path / "o1"
    first = predict(scan, "--weights", calibrated, "--out", out, *FAST)
    p = _json(out, "s")["p_female"]
    # record the sex the network contradicts most and an age outside the training range 20-80
    contradicted = "M" if p > 0.5 else "F"
    strong = p > 0.9 or p < 0.1
    out2 = tmp_path / "o2"
    result = predict(scan, "--weights", calibrated, "--out", out2, "--age", "85",
                     "--sex", contradicted, *FAST)
    assert first.exit_code == 0 and result.exit_code == 0, result.output
    record = _json(out2, "s")
    warnings = " ".join(record["warnings"])
    assert "chronological age 85 y lies outside the training age range 20-80" in warnings
    assert ("mislabelled or swapped" in warnings) == strong
    row = read_tsv(out2 / "predictions.tsv")[0]
    assert "chronological age 85 y" in row["warnings"]


def test_weights_without_calibration_give_the_raw_gap_with_a_note(tmp_path: Path,
                                                                   tiny_weights) -> None:
    scan = brain(tmp_path / "s.nii.gz")
    out = tmp_path / "o"
    result = predict(scan, "--weights", tiny_weights(), "--out", out, "--age", "50", *FAST)
    assert result.exit_code == 0, result.output
    record = _json(out, "s")
    assert record["brain_age_gap"] == pytest.approx(record["age"] - 50)
    assert record["brain_age_gap_corrected"] is None and record["age_interval_low"] is None
    assert any("carry no calibration" in n for n in record["reading"]["notes"])
    assert "carry no calibration" in " ".join(result.output.split())


def test_resume_redoes_a_scan_whose_age_changed(tmp_path: Path, calibrated: Path) -> None:
    a, b = brain(tmp_path / "a.nii.gz", seed=1), brain(tmp_path / "b.nii.gz", seed=2)
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{a}\t\t40\n{b}\t\t50\n")
    out = tmp_path / "out"
    assert predict(listing, "--weights", calibrated, "--out", out, *FAST).exit_code == 0
    listing.write_text(f"{a}\t\t40\n{b}\t\t55\n")
    result = predict(listing, "--weights", calibrated, "--out", out, "--resume", *FAST)
    assert result.exit_code == 0, result.output
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert rows["b.nii.gz"]["chronological_age"] == "55.0000"
    _check_arithmetic(_json(out, "b"), 55.0)
    assert rows["a.nii.gz"]["chronological_age"] == "40.0000"


def test_the_png_title_and_index_carry_the_gap(tmp_path: Path, calibrated: Path) -> None:
    from brainbag.run.report import png_title

    scan = brain(tmp_path / "s.nii.gz")
    out = tmp_path / "o"
    assert predict(scan, "--weights", calibrated, "--out", out, "--age", "50", "--png",
                   *FAST).exit_code == 0
    record = _json(out, "s")
    title, subtitle = png_title(record)
    assert "90% interval" in title and f"{record['age']:.1f}" in title
    assert f"gap {record['brain_age_gap']:+.1f} y" in subtitle
    copy = tmp_path / "study"
    copy.mkdir()
    shutil.copy(scan, copy / "s.nii.gz")
    shutil.copy(scan, copy / "t.nii.gz")
    (tmp_path / "p.tsv").write_text("participant_id\tage\ns\t50\n")
    assert predict(copy, "--weights", calibrated, "--out", tmp_path / "o2", "--participants",
                   tmp_path / "p.tsv", *FAST).exit_code == 0
    page = (tmp_path / "o2" / "index.html").read_text()
    assert "chronological age 50.0 y" in page and "bias-corrected" in page


def test_the_plain_progress_line_carries_the_gap(tmp_path: Path, calibrated: Path) -> None:
    a, b = brain(tmp_path / "a.nii.gz", seed=1), brain(tmp_path / "b.nii.gz", seed=2)
    listing = tmp_path / "scans.txt"
    listing.write_text(f"{a}\t\t40\n{b}\n")
    out = tmp_path / "out"
    result = predict(listing, "--weights", calibrated, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    lines = {line.split("]")[1].split(":")[0].strip(): line
             for line in result.stderr.splitlines() if line.startswith("[")}
    record = _json(out, "a")
    assert (f"gap {record['brain_age_gap']:+.1f} (corrected "
            f"{record['brain_age_gap_corrected']:+.1f})") in lines["a"]
    assert "gap" not in lines["b"]  # no age, no gap


def test_a_contradicted_recorded_sex_is_flagged_end_to_end(tmp_path: Path, tiny_weights
                                                           ) -> None:
    """The random network's P(female) sits near 0.5, so the flags test above only sees the
    flag absent. With thresholds taken from the weights (0.99 / 0.01), the same scan's recorded
    sex is always contradicted: the flag must reach the JSON, the table and the console."""
    loaded = load_weights(tiny_weights())
    meta = loaded.meta
    meta.calibration = {**CALIBRATION, "sex": {"undetermined": [0.35, 0.65],
                                               "mismatch_recorded_female_below": 0.99,
                                               "mismatch_recorded_male_above": 0.01}}
    strict = tmp_path / "strict.safetensors"
    save_weights(strict, loaded.model, meta)
    scan = brain(tmp_path / "s.nii.gz")
    for sex in ("F", "M"):
        out = tmp_path / f"o-{sex}"
        result = predict(scan, "--weights", strict, "--out", out, "--sex", sex, *FAST)
        assert result.exit_code == 0, result.output
        flag = f"recorded sex {sex} but P(female) is"
        assert any(flag in w for w in _json(out, "s")["warnings"])
        assert flag in read_tsv(out / "predictions.tsv")[0]["warnings"]
        assert "mislabelled or swapped" in " ".join(result.output.split())


def test_a_moderately_contradicted_recorded_sex_gets_a_note(tmp_path: Path, tiny_weights
                                                            ) -> None:
    """Issue 23, item 8: a man called female at P(female) 0.67 raised nothing, because the flag
    needs P > 0.9. A recorded sex the sex call contradicts (outside the undetermined band) gets
    a note in the JSON, the table and the console, milder than the flag (no warning)."""
    loaded = load_weights(tiny_weights())
    meta = loaded.meta
    # the random network's P(female) sits near 0.5: a narrow band makes that a call of F
    meta.calibration = {**CALIBRATION, "sex": {"undetermined": [0.01, 0.02],
                                               "mismatch_recorded_female_below": 0.1,
                                               "mismatch_recorded_male_above": 0.9}}
    weights = tmp_path / "called.safetensors"
    save_weights(weights, loaded.model, meta)
    scans = [brain(tmp_path / "in" / f"{s}.nii.gz", seed=i) for i, s in enumerate("ab")]
    out = tmp_path / "one"
    result = predict(scans[0], "--weights", weights, "--out", out, "--sex", "M", *FAST)
    assert result.exit_code == 0, result.output
    record = _json(out, "a")
    assert record["sex_call"] == "F" and 0.1 < record["p_female"] < 0.9
    note = f"recorded M, model calls F (P(female) {record['p_female']:.2f})"
    assert record["sex_note"] == note
    assert not any("recorded sex" in w for w in record["warnings"])  # no flag: a note
    assert read_tsv(out / "predictions.tsv")[0]["sex_note"] == note
    line = next(x for x in result.stdout.splitlines() if "recorded sex" in x)
    assert "M" in line and "model calls F" in line
    table = tmp_path / "people.tsv"
    table.write_text("participant_id\tsex\na\tM\nb\tF\n")
    out = tmp_path / "batch"
    result = predict(*scans, "--weights", weights, "--out", out, "--participants", table,
                     *FAST, "--no-png", env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    rows = {r["subject"]: r for r in read_tsv(out / "predictions.tsv")}
    assert rows["a"]["sex_note"].startswith("recorded M, model calls F") and not rows["b"][
        "sex_note"]
    assert "M: model calls F" in result.stdout  # the batch table's recorded-sex column
