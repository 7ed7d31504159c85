"""``brainbag check``: a table (or JSON) per scan, exit 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_affine, sample, save
from phantom import head
from typer.testing import CliRunner

import brainbag.image.checks
from brainbag.cli import app
from brainbag.image.checks import CHECK_NAMES, CheckReport

runner = CliRunner()


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("scans")
    (tmp / "study" / "sub-02").mkdir(parents=True)
    data, affine, brain = head()
    skull, _, _ = head(skull=True)
    return {
        "clean": save(data, affine, tmp / "study" / "clean.nii.gz"),
        "skull": save(skull, affine, tmp / "study" / "sub-02" / "skull.nii.gz"),
        "mask": save(brain, affine, tmp / "mask.nii.gz"),
        "study": tmp / "study",
    }


def test_a_clean_scan_prints_a_table_and_exits_0(scans, tiny_weights) -> None:
    # judged for weights at 1 mm: the phantom's 2 mm voxels will be resampled (a warning)
    result = runner.invoke(app, ["check", str(scans["clean"]), "--weights",
                                 str(tiny_weights())], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "fits, with warnings" in out  # 2 mm voxels are resampled
    for name in CHECK_NAMES:
        assert name in out
    assert "will be resampled to 1 mm" in out


def test_check_judges_for_the_default_weights_of_predict(scans) -> None:
    """The shipped RF 9 weights run at 2 mm on a 160x192x160 mm brain view: check said "will
    be resampled to 1 mm" and compared the brain with 1 mm sliding crops."""
    result = runner.invoke(app, ["check", str(scans["clean"]), "--json"])
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["voxel_size"]["status"] == "pass"
    assert "2 mm isotropic (the weights' voxel size" in rows["voxel_size"]["expected"]
    assert "160x192x160 mm" in rows["field_of_view"]["expected"]
    unknown = runner.invoke(app, ["check", str(scans["clean"]), "--weights", "no-such-id"])
    assert unknown.exit_code == 1 and "neither a file nor a weights id" in unknown.output


def test_a_failing_scan_exits_1_and_names_the_fix(scans) -> None:
    result = runner.invoke(app, ["check", str(scans["skull"]), "--strip", "never"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "does not fit the model" in result.stdout and "SynthStrip" in result.stdout
    masked = runner.invoke(app, ["check", str(scans["skull"]), "--mask", str(scans["mask"])])
    assert masked.exit_code == 0, masked.output


def test_json_report_for_a_folder(scans) -> None:
    result = runner.invoke(app, ["check", str(scans["study"]), "--json", "--strip", "never"])
    assert result.exit_code == 1  # the skull-on scan fails
    rows = json.loads(result.stdout)
    assert all(set(r) == {"path", "name", "status", "found", "expected", "hint"} for r in rows)
    by_path: dict[str, dict[str, str]] = {}
    for r in rows:
        by_path.setdefault(Path(r["path"]).name, {})[r["name"]] = r["status"]
    assert sorted(by_path) == ["clean.nii.gz", "skull.nii.gz"]
    assert list(by_path["clean.nii.gz"]) == list(CHECK_NAMES)
    assert by_path["skull.nii.gz"]["skull_stripped"] == "fail"
    assert "fail" not in by_path["clean.nii.gz"].values()
    # by default the head would be stripped by predict: it fits, and check says so
    auto = runner.invoke(app, ["check", str(scans["study"]), "--json"])
    assert auto.exit_code == 0, auto.output
    skull = {r["name"]: r for r in json.loads(auto.stdout) if r["path"].endswith("skull.nii.gz")}
    assert skull["skull_stripped"]["status"] == "pass"
    assert "will be stripped" in skull["skull_stripped"]["found"]
    assert skull["brain_mask"]["status"] == "skip"


def test_several_inputs_and_a_missing_one(scans, tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    result = runner.invoke(app, ["check", str(scans["clean"]), str(missing)],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 1
    assert "2 scans checked: 1 with failed checks" in result.stdout
    assert "not found" in result.stdout


def test_usage_errors_exit_2(scans, tmp_path: Path) -> None:
    two = runner.invoke(app, ["check", str(scans["clean"]), str(scans["clean"]), "--mask",
                              str(scans["mask"])])
    assert two.exit_code == 2 and "--mask applies to one input" in two.stderr
    assert runner.invoke(app, ["check", str(scans["clean"]), "--bogus"]).exit_code == 2
    assert runner.invoke(app, ["check"]).exit_code == 2
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["check", str(tmp_path / "empty")])
    assert empty.exit_code == 1 and "holds no .nii" in empty.stderr


def test_cli_builds_the_check_options(scans, monkeypatch) -> None:
    seen = []

    def fake(path, options=None, loaded=None, mask=None, names=None):
        seen.append((path, options))
        return CheckReport(path, [], 0.0)

    monkeypatch.setattr(brainbag.image.checks, "run_checks", fake)
    result = runner.invoke(app, ["check", str(scans["clean"]), "--mask", str(scans["mask"]),
                                 "--n4", "--json"])
    assert result.exit_code == 0, result.output
    assert [p for p, _ in seen] == [scans["clean"]]
    o = seen[0][1]
    assert (o.mask, o.n4, o.mode, o.resample) == (scans["mask"], True, "auto", True)
    assert (o.voxel_mm, o.view_xyz) == (2.0, (80, 96, 80))  # the shipped default weights
    assert json.loads(result.stdout) == []


@pytest.mark.slow
def test_check_n4_on_a_real_scan_reports_the_field_left_and_the_time() -> None:
    scan = sample("beijing_sub08251_mprage_skullstripped.nii.gz")
    result = runner.invoke(app, ["check", str(scan), "--n4", "--json"])
    assert result.exit_code == 0, result.output
    bias = next(r for r in json.loads(result.stdout) if r["name"] == "bias_field")
    assert bias["status"] == "pass" and "after --n4" in bias["found"] and "N4 took" in bias[
        "found"]


def test_check_on_the_bundled_demo_passes() -> None:
    demo = Path(__file__).resolve().parents[1] / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"
    result = runner.invoke(app, ["check", str(demo), "--json"])
    assert result.exit_code == 0, result.output
    assert {r["status"] for r in json.loads(result.stdout)} == {"pass"}


def test_a_text_file_is_reported_not_crashed(tmp_path: Path) -> None:
    notes = tmp_path / "notes.nii"
    notes.write_text("hello\n")
    ones = save(np.ones((4, 4, 4)), make_affine(), tmp_path / "ones.nii")
    result = runner.invoke(app, ["check", str(notes), str(ones), "--json"])
    assert result.exit_code == 1
    rows = json.loads(result.stdout)
    assert {r["name"]: r["status"] for r in rows if r["path"] == str(notes)}["file"] == "fail"
    assert {r["name"]: r["status"] for r in rows if r["path"] == str(ones)}["values"] == "fail"


@pytest.mark.parametrize("damage", ["cut in half", "cut in the trailer", "CRC flipped"])
def test_check_reads_the_voxel_data_to_the_end(tmp_path: Path, damage: str) -> None:
    """A gzip NIfTI with an intact header but damaged data fails check, as predict refuses it,
    with the same one-line error and exit 1 (it used to pass: the data checks were skipped)."""
    demo = Path(__file__).resolve().parents[1] / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"
    data = bytearray(demo.read_bytes())
    if damage == "cut in half":
        data = data[: len(data) // 2]
    elif damage == "cut in the trailer":
        data = data[:-4]
    else:
        data[-6] ^= 0xFF
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(bytes(data))
    result = runner.invoke(app, ["check", str(bad), "--json"])
    assert result.exit_code == 1, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["file"]["status"] == "pass" and rows["values"]["status"] == "fail"
    assert "truncated or corrupt" in rows["values"]["found"]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: input ") and str(bad) in lines[0]
    from brainbag.errors import InputError
    from brainbag.image.io import load_image

    with pytest.raises(InputError) as info:  # what predict raises for the same file
        load_image(bad)
    assert lines[0] == f"error: {info.value}"
