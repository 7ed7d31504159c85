"""Site calibration from the command line (issue 27): ``brainbag calibrate`` fits and writes the
file, ``brainbag predict --calibration`` reads with it and says so everywhere, and the refusals
are one line with their exit code, before any scan runs and leaving nothing behind.

Narrow random networks (``tiny_weights``) keep most of these fast: their predicted ages mean
nothing, so the assertions are about the arithmetic on each record's own predicted age. The last
test runs the shipped weights on real scans of ../shared/data/openneuro (2 mm: seconds each).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from conftest import shared
from test_batch import FAST, brain, by_name, read_tsv
from test_brain_age_gap import CALIBRATION, INTERCEPT, SLOPE
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.person.calibration import read_site_calibration
from brainbag.run.report import png_title
from brainbag.weights.file import load_weights, save_weights

runner = CliRunner()


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(result, *needles: str) -> str:
    """The command's error: one line, the last on stderr (progress lines may come before)."""
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], f"expected one error line: {lines!r}"
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


@pytest.fixture
def weights(tiny_weights, tmp_path: Path) -> Path:
    """Tiny random weights carrying a hand-made calibration and a training age range 20-80."""
    loaded = load_weights(tiny_weights())
    loaded.meta.calibration = CALIBRATION
    loaded.meta.training["age_range"] = [20.0, 80.0]
    path = tmp_path / "calibrated.safetensors"
    save_weights(path, loaded.model, loaded.meta)
    return path


@pytest.fixture
def other_weights(tiny_weights, tmp_path: Path) -> Path:
    """Other weights (another file, another sha256) with the same calibration."""
    loaded = load_weights(tiny_weights(width=2))
    loaded.meta.calibration = CALIBRATION
    path = tmp_path / "other.safetensors"
    save_weights(path, loaded.model, loaded.meta)
    return path


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch) -> Path:
    """The folder calibrate's temporary prediction folders go to (checked empty afterwards)."""
    folder = tmp_path / "scratch"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def controls(folder: Path, ages: list[float | None]) -> Path:
    """A list file of synthetic scans with these ages (None: no age), sexes alternating."""
    lines = []
    for i, age in enumerate(ages):
        scan = brain(folder / f"c{i:02d}.nii.gz", seed=i)
        lines.append(f"{scan}\t\t{'n/a' if age is None else age}\t{'FM'[i % 2]}")
    listing = folder / "controls.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def test_calibrate_writes_the_file_and_predict_reads_with_it(
        tmp_path: Path, weights: Path, scratch: Path) -> None:
    listing = controls(tmp_path / "site", [25, 31, 38, 44, 47, 52, 58, 63, 69, 74, 79, None])
    out = tmp_path / "cal" / "site-calibration.json"
    result = cli("calibrate", listing, "--weights", weights, "--out", out, "--name", "clinic",
                 *FAST)
    assert result.exit_code == 0, result.output
    assert list(scratch.iterdir()) == [], "the temporary predictions were not removed"
    loaded = load_weights(weights)
    site = read_site_calibration(out, loaded.sha256)
    assert site.n == 11 and site.name == "clinic" and site.age_min == 25 and site.age_max == 79
    assert site.sexes == {"F": 6, "M": 5, "unknown": 0}
    assert [c["id"] for c in site.controls] == [f"c{i:02d}" for i in range(11)]
    assert site.weights_age_range == (20.0, 80.0)
    # random weights predict about the same age for every scan: no slope to fit, the
    # weights' own slope is kept and the file says why; the console says what was fitted
    assert site.line == "offset" and site.slope == SLOPE
    assert "bias line (offset)" in result.stdout and "weights' own calibration" in result.stdout
    assert f"--calibration {out}" in " ".join(result.stdout.split())
    assert "1 of 12 scans have no age" in " ".join(result.stderr.split())
    # every control's predicted age in the file is the one predict gives for that scan
    scan = tmp_path / "site" / "c03.nii.gz"
    plain, calibrated = tmp_path / "plain", tmp_path / "calibrated"
    args = ["--weights", weights, "--age", "44", "--sex", "M", *FAST]
    assert cli("predict", scan, "--out", plain, *args).exit_code == 0
    result = cli("predict", scan, "--out", calibrated, "--calibration", out, *args)
    assert result.exit_code == 0, result.output
    without = json.loads((plain / "c03" / "prediction.json").read_text())
    within = json.loads((calibrated / "c03" / "prediction.json").read_text())
    age = within["age"]
    assert age == without["age"] == site.controls[3]["predicted_age"]
    # the documented arithmetic: only the calibration changes
    assert within["brain_age_gap"] == without["brain_age_gap"] == age - 44
    assert without["brain_age_gap_corrected"] == pytest.approx((age - INTERCEPT) / SLOPE - 44)
    assert within["brain_age_gap_corrected"] == pytest.approx(
        (age - site.intercept) / site.slope - 44)
    q = site.calibration["age_interval"]["half_width_years"]
    assert (within["age_interval_low"], within["age_interval_high"]) == pytest.approx(
        (age - q, age + q))
    # each number says where its calibration came from
    assert without["calibration"] == {"source": "weights", "file": None, "file_sha256": None,
                                      "weights_id": loaded.id}
    assert within["calibration"]["source"] == "site:site-calibration.json"
    assert within["calibration"]["file"] == str(out.resolve())
    assert within["calibration"]["weights_id"] == loaded.id
    assert len(within["calibration"]["file_sha256"]) == 64
    methods = within["reading"]["methods"]
    assert {methods[k]["source"] for k in ("brain_age_gap_corrected", "age_interval",
                                           "map_spread")} == {"site:site-calibration.json"}
    assert methods["brain_age_gap_corrected"]["source"] != \
        without["reading"]["methods"]["brain_age_gap_corrected"]["source"]
    assert read_tsv(calibrated / "predictions.tsv")[0]["calibration"] == \
        "site:site-calibration.json"
    assert read_tsv(plain / "predictions.tsv")[0]["calibration"] == "weights"
    console = " ".join(result.stdout.split())
    assert "calibration site" in console and "the site's healthy controls" in console
    assert "site calibration site-calibration.json" in png_title(within)[1]
    assert "weights' own calibration" in png_title(without)[1]


def test_a_file_for_other_weights_is_refused_in_one_line_before_any_scan(
        tmp_path: Path, weights: Path, other_weights: Path) -> None:
    listing = controls(tmp_path / "site", [30, 40, 50, 60])
    cal = tmp_path / "cal.json"
    assert cli("calibrate", listing, "--weights", weights, "--out", cal, *FAST).exit_code == 0
    out = tmp_path / "out"
    result = cli("predict", listing, "--weights", other_weights, "--out", out,
                 "--calibration", cal, *FAST)
    assert result.exit_code == 2
    other = load_weights(other_weights)
    one_line_error(result, f"site calibration {cal} was fitted for weights",
                   load_weights(weights).id, other.id, other.sha256[:12])
    assert not out.exists(), "nothing may be predicted or written"
    # a file that is not a calibration, or is missing: one line, exit 1
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "something else"}')
    result = cli("predict", listing, "--weights", weights, "--out", out, "--calibration", broken,
                 *FAST)
    assert result.exit_code == 1
    one_line_error(result, "is not a brainbag site calibration")
    result = cli("predict", listing, "--weights", weights, "--out", out, "--calibration",
                 tmp_path / "none.json", *FAST)
    assert result.exit_code == 1
    one_line_error(result, "not found")
    assert not out.exists()


def test_three_controls_warn_and_fit_the_offset_only(tmp_path: Path, weights: Path,
                                                     scratch: Path) -> None:
    listing = controls(tmp_path / "site", [30, 45, 60])
    out = tmp_path / "cal.json"
    result = cli("calibrate", listing, "--weights", weights, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    err = " ".join(result.stderr.split())
    assert "warning: site calibration fits the offset only" in err
    assert "3 controls (a slope needs at least 10)" in err
    assert "3 controls (fewer than 20)" in err and "no age interval" in err
    site = json.loads(out.read_text())
    assert site["fit"]["line"] == "offset" and site["calibration"]["age_interval"] is None
    # predict then says why there is no interval
    result = cli("predict", tmp_path / "site" / "c00.nii.gz", "--weights", weights, "--out",
                 tmp_path / "o", "--calibration", out, "--age", "30", *FAST)
    assert result.exit_code == 0, result.output
    assert "age interval not fitted" in " ".join(result.stdout.split())
    assert list(scratch.iterdir()) == []


def test_refusals_are_one_line_and_leave_nothing(tmp_path: Path, weights: Path,
                                                 scratch: Path) -> None:
    out = tmp_path / "cal.json"
    # a full line on ages spanning under 5 years: refused before any scan runs
    narrow = controls(tmp_path / "narrow", [40, 41, 42, 43, 44])
    work = tmp_path / "work"
    result = cli("calibrate", narrow, "--weights", weights, "--out", out, "--line", "full",
                 "--work", work, *FAST)
    assert result.exit_code == 1
    one_line_error(result, "the controls' ages span 4.0 y", "fit the offset only")
    assert not out.exists() and not (work / "predictions.tsv").exists()
    # the same controls with the default line: the offset, with the narrow range named
    result = cli("calibrate", narrow, "--weights", weights, "--out", out, *FAST)
    assert result.exit_code == 0, result.output
    assert "ages spanning 4.0 y (a slope needs at least 5 y)" in " ".join(result.stderr.split())
    # a full line the predictions do not support (random weights: about the same age for
    # everyone, a slope near 0): refused after the predictions, nothing kept
    flat = controls(tmp_path / "flat", [20, 30, 40, 50, 60, 70])
    result = cli("calibrate", flat, "--weights", weights, "--out", tmp_path / "flat.json",
                 "--line", "full", *FAST)
    assert result.exit_code == 1
    one_line_error(result, "barely follow their age (fitted slope")
    assert not (tmp_path / "flat.json").exists() and list(scratch.iterdir()) == []
    # fewer than 3 controls with an age: refused before any scan runs
    few = controls(tmp_path / "few", [30, 50, None, None])
    result = cli("calibrate", few, "--weights", weights, "--out", tmp_path / "few.json",
                 "--work", work, *FAST)
    assert result.exit_code == 1
    one_line_error(result, "2 of 4 scans have an age", "at least 3 controls")
    assert not (tmp_path / "few.json").exists()
    assert not (work / "predictions.tsv").exists(), "no scan may run"
    # an existing --out is kept unless --overwrite; a bad --rf is a usage error
    before = out.read_bytes()
    result = cli("calibrate", narrow, "--weights", weights, "--out", out, *FAST)
    assert result.exit_code == 2
    one_line_error(result, f"{out} already exists", "--overwrite")
    assert out.read_bytes() == before
    result = cli("calibrate", narrow, "--rf", "10", "--out", tmp_path / "x.json")
    assert result.exit_code == 2
    one_line_error(result, "--rf must be one of")


def test_work_keeps_the_predictions_and_a_rerun_reuses_them(tmp_path: Path,
                                                            weights: Path) -> None:
    listing = controls(tmp_path / "site", [30, 40, 50, 60])
    work = tmp_path / "work"
    first = cli("calibrate", listing, "--weights", weights, "--out", tmp_path / "a.json",
                "--work", work, *FAST)
    assert first.exit_code == 0, first.output
    rows = by_name(read_tsv(work / "predictions.tsv"))
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows.values())
    again = cli("calibrate", listing, "--weights", weights, "--out", tmp_path / "b.json",
                "--work", work, *FAST)
    assert again.exit_code == 0, again.output
    assert "4 done before with the same input, weights and settings (skipped); 0 to run" in \
        " ".join(again.stderr.split())
    a, b = (json.loads((tmp_path / n).read_text()) for n in ("a.json", "b.json"))
    assert a["fit"] == b["fit"] and a["controls"] == b["controls"]


def test_resume_redoes_inputs_read_with_another_calibration(tmp_path: Path,
                                                            weights: Path) -> None:
    listing = controls(tmp_path / "site", [30, 40, 50, 60])
    cal_a, cal_b = tmp_path / "a.json", tmp_path / "b.json"
    assert cli("calibrate", listing, "--weights", weights, "--out", cal_a, *FAST).exit_code == 0
    assert cli("calibrate", listing, "--weights", weights, "--out", cal_b, "--name", "b",
               *FAST).exit_code == 0
    out = tmp_path / "out"

    def run(*extra: object) -> list[dict]:
        result = cli("predict", listing, "--weights", weights, "--out", out, "--resume",
                     "--no-png", *extra, *FAST)
        assert result.exit_code == 0, result.output
        return [json.loads((out / f"c{i:02d}" / "prediction.json").read_text())
                for i in range(4)]

    first = run("--calibration", cal_a)
    same = run("--calibration", cal_a)
    assert [r["created"] for r in same] == [r["created"] for r in first]  # skipped: done
    other = run("--calibration", cal_b)  # another file's content: every input is redone
    assert all(r["calibration"]["file_sha256"] != f["calibration"]["file_sha256"]
               for r, f in zip(other, first, strict=True))
    plain = run()
    assert all(r["calibration"]["source"] == "weights" for r in plain)


def test_index_html_names_the_calibration(tmp_path: Path, weights: Path) -> None:
    listing = controls(tmp_path / "site", [30, 40, 50])
    cal = tmp_path / "clinic.json"
    assert cli("calibrate", listing, "--weights", weights, "--out", cal, *FAST).exit_code == 0
    out = tmp_path / "out"
    result = cli("predict", listing, "--weights", weights, "--out", out, "--calibration", cal,
                 *FAST)
    assert result.exit_code == 0, result.output
    page = (out / "index.html").read_text()
    assert page.count("site calibration clinic.json") == 3
    assert "gaps, intervals and flags read with site calibration site:clinic.json" in \
        " ".join(result.stdout.split())


OPENNEURO_CONTROLS = [("sub-52", 32, "M"), ("sub-53", 44, "F"), ("sub-54", 26, "F"),
                      ("sub-68", 52, "F")]


def test_real_scans_with_the_shipped_weights_differ_by_the_documented_arithmetic(
        tmp_path: Path) -> None:
    """The shipped (2 mm) weights on four real controls of ds002748, a site they were not
    trained on: calibrate them, then predict two with and without the file."""
    from brainbag.weights.resolve import open_weights

    root = shared("openneuro/ds002748")
    listing = tmp_path / "controls.txt"
    listing.write_text("".join(f"{root}/{s}/anat/{s}_T1w.nii.gz\t\t{a}\t{x}\n"
                               for s, a, x in OPENNEURO_CONTROLS))
    cal = tmp_path / "site.json"
    result = cli("calibrate", listing, "--out", cal, "--name", "ds002748")
    assert result.exit_code == 0, result.output
    shipped = open_weights(None, 9)
    site = read_site_calibration(cal, shipped.sha256, shipped.id)
    assert site.n == 4 and site.line == "offset"  # 4 controls: the weights' slope is kept
    two = tmp_path / "two.txt"
    two.write_text("".join(listing.read_text().splitlines(keepends=True)[:2]))
    assert cli("predict", two, "--out", tmp_path / "plain", "--no-png").exit_code == 0
    result = cli("predict", two, "--out", tmp_path / "site", "--calibration", cal)
    assert result.exit_code == 0, result.output
    bias = shipped.meta.calibration["bias_correction"]
    for subject, age, _ in OPENNEURO_CONTROLS[:2]:
        without = json.loads((tmp_path / "plain" / subject / "prediction.json").read_text())
        within = json.loads((tmp_path / "site" / subject / "prediction.json").read_text())
        p = within["age"]
        assert p == without["age"]
        assert p == next(c["predicted_age"] for c in site.controls if c["id"] == subject)
        assert without["brain_age_gap_corrected"] == pytest.approx(
            (p - bias["intercept"]) / bias["slope"] - age, abs=1e-9)
        assert within["brain_age_gap_corrected"] == pytest.approx(
            (p - site.intercept) / site.slope - age, abs=1e-9)
        # same slope: the two corrected gaps differ by the intercepts alone
        assert within["brain_age_gap_corrected"] - without["brain_age_gap_corrected"] == \
            pytest.approx((bias["intercept"] - site.intercept) / site.slope, abs=1e-9)
        assert within["calibration"]["source"] == "site:site.json"
        assert without["calibration"]["source"] == "weights"
