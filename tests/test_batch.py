"""Batch runs: folders, BIDS datasets and list files in; one table, maps and pictures out.

Narrow random-initialised networks (``tiny_weights``, width 4) keep these fast; the numbers they
print mean nothing, so the assertions are about which inputs ran, where their outputs went and
what the table says.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import REPO, make_affine, sample, save, shared
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.errors import UsageError
from brainbag.network.inference import InferenceSettings
from brainbag.run.batch import ResultsTable, read_ahead, settings_fingerprint
from brainbag.run.discover import discover
from brainbag.run.outputs import TSV_COLUMNS
from brainbag.run.predict import PredictSettings, run_predict

runner = CliRunner()
# the synthetic scans are 20-30 ml blocks, not brains: predict's checks refuse them (brain_mask),
# so runs on them pass --force; full-volume mode keeps them fast
FAST = ["--mode", "full", "--force"]


def brain(path: Path, seed: int = 0, shape=(40, 44, 36), affine=None) -> Path:
    """A small synthetic skull-stripped scan: random intensities in a box, 0 around it."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, np.float32)
    data[5:-5, 5:-5, 5:-5] = rng.uniform(50, 150, [n - 10 for n in shape])
    path.parent.mkdir(parents=True, exist_ok=True)
    return save(data, make_affine() if affine is None else affine, path)


def read_tsv(path: Path) -> list[dict[str, str]]:
    """Parse predictions.tsv strictly: a header of the known columns, every row complete."""
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), "last row is incomplete"
    lines = text.splitlines()
    assert lines[0].split("\t") == list(TSV_COLUMNS)
    for line in lines[1:]:
        assert len(line.split("\t")) == len(TSV_COLUMNS), f"broken row: {line!r}"
    rows = list(csv.DictReader(text.splitlines(), delimiter="\t"))
    paths = [r["path"] for r in rows]
    assert len(paths) == len(set(paths)), "duplicate rows"
    return rows


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {Path(r["path"]).name: r for r in rows}


def predict(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, ["predict", *[str(a) for a in args]], env=env)


# --- the tests ---------------------------------------------------------------------


def test_mixed_folder_gives_ok_and_failed_rows_and_exit_1(tmp_path: Path, tiny_weights) -> None:
    real = sample("ch2bet.nii.gz")
    data = tmp_path / "study"
    data.mkdir()
    shutil.copy(real, data / "ch2bet.nii.gz")
    raw = real.read_bytes()
    (data / "truncated.nii.gz").write_bytes(raw[: len(raw) // 2])
    (data / "notes.nii").write_text("scanned on Tuesday; subject moved\n")
    save(np.ones((64, 64), np.float32), np.eye(4), data / "slice2d.nii.gz")
    brain(data / "site2" / "other_T1w.nii.gz")
    (data / "README.txt").write_text("not a scan\n")
    out = tmp_path / "results"

    # no --force: the synthetic block in site2/ fails the checks like any unsuitable scan
    result = predict(data, "--weights", tiny_weights(), "--out", out, "--mode", "full",
                     "--jobs", "2")

    assert result.exit_code == 1, result.output
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert sorted(rows) == ["ch2bet.nii.gz", "notes.nii", "other_T1w.nii.gz", "slice2d.nii.gz",
                            "truncated.nii.gz"]  # README.txt is not an image: ignored
    assert {n: r["status"] for n, r in rows.items()} == {
        "ch2bet.nii.gz": "ok", "other_T1w.nii.gz": "failed", "notes.nii": "failed",
        "slice2d.nii.gz": "failed", "truncated.nii.gz": "failed"}
    assert "truncated or corrupt" in rows["truncated.nii.gz"]["error"]
    assert "not a NIfTI or MGZ image" in rows["notes.nii"]["error"]
    assert "not a 3D volume" in rows["slice2d.nii.gz"]["error"] or \
        "dimensions" in rows["slice2d.nii.gz"]["error"]
    assert "check" in rows["other_T1w.nii.gz"]["error"]  # refused by predict's checks
    assert "--force" in rows["other_T1w.nii.gz"]["error"]
    for row in rows.values():  # the failing file is named in its message
        if row["status"] == "failed":
            assert row["path"] in row["error"] and "\n" not in row["error"]
            assert len(row["input_sha256"]) == 64
    # the subject id of a scan in a sub-folder is its relative path; failures write no outputs
    assert rows["other_T1w.nii.gz"]["subject"] == "site2/other"
    assert rows["other_T1w.nii.gz"]["output"] == "" and not (out / "site2").exists()
    assert rows["ch2bet.nii.gz"]["output"] == "ch2bet/prediction.json"
    assert sorted(p.name for p in (out / "ch2bet").iterdir()) == [
        "age_map.nii.gz", "age_map.png", "prediction.json", "sex_map.nii.gz"]
    assert float(rows["ch2bet.nii.gz"]["age"]) == pytest.approx(
        json.loads((out / "ch2bet" / "prediction.json").read_text())["age"], abs=1e-4)
    # summary on stderr: counts and reasons; the ignored README is mentioned
    assert "1 ok" in result.stderr and "4 failed" in result.stderr
    assert "truncated.nii.gz" in result.stderr and "README.txt" in result.stderr
    page = (out / "index.html").read_text()
    assert "ch2bet/age_map.png" in page and "site2/other" in page
    assert "truncated or corrupt" in page and "UNTRAINED" in page


def test_bids_dataset_with_sessions_maps_to_derivatives(tmp_path: Path, tiny_weights) -> None:
    bids = tmp_path / "bids"
    bids.mkdir()
    (bids / "dataset_description.json").write_text(json.dumps(
        {"Name": "toy study", "BIDSVersion": "1.9.0"}))
    brain(bids / "sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz", seed=1)
    brain(bids / "sub-01/ses-post/anat/sub-01_ses-post_T1w.nii.gz", seed=2)
    brain(bids / "sub-02/anat/sub-02_T1w.nii.gz", seed=3)
    brain(bids / "sub-02/anat/sub-02_run-2_T1w.nii.gz", seed=4)
    (bids / "sub-02/anat/sub-02_T1w.json").write_text("{}")  # sidecar
    brain(bids / "sub-02/anat/sub-02_T2w.nii.gz", seed=5)  # not a T1w
    brain(bids / "derivatives/other/sub-01/anat/sub-01_T1w.nii.gz", seed=6)  # not raw data
    out = tmp_path / "derivatives" / "brainbag"

    result = predict(bids, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png")

    assert result.exit_code == 0, result.output
    rows = read_tsv(out / "predictions.tsv")
    assert [(r["subject"], r["session"], Path(r["path"]).name) for r in rows] == [
        ("sub-01", "ses-post", "sub-01_ses-post_T1w.nii.gz"),
        ("sub-01", "ses-pre", "sub-01_ses-pre_T1w.nii.gz"),
        ("sub-02", "", "sub-02_T1w.nii.gz"),
        ("sub-02", "", "sub-02_run-2_T1w.nii.gz"),
    ]
    expected = {
        "sub-01/ses-post/anat": ["sub-01_ses-post"],
        "sub-01/ses-pre/anat": ["sub-01_ses-pre"],
        "sub-02/anat": ["sub-02", "sub-02_run-2"],
    }
    for folder, prefixes in expected.items():
        names = sorted(p.name for p in (out / folder).iterdir())
        assert names == sorted(f"{p}_{s}" for p in prefixes for s in (
            "desc-age_map.nii.gz", "desc-sex_map.nii.gz", "prediction.json")), folder
    assert [r["output"] for r in rows] == [
        "sub-01/ses-post/anat/sub-01_ses-post_prediction.json",
        "sub-01/ses-pre/anat/sub-01_ses-pre_prediction.json",
        "sub-02/anat/sub-02_prediction.json",
        "sub-02/anat/sub-02_run-2_prediction.json",
    ]
    saved = json.loads((out / "sub-01/ses-pre/anat/sub-01_ses-pre_prediction.json").read_text())
    assert (saved["subject"], saved["session"]) == ("sub-01", "ses-pre")
    assert saved["input"]["path"].endswith("sub-01/ses-pre/anat/sub-01_ses-pre_T1w.nii.gz")
    assert saved["outputs"]["age_map"] == "sub-01_ses-pre_desc-age_map.nii.gz"
    # the map lies on its own input: its affine is derived from that input's affine
    age = nib.load(out / "sub-01/ses-pre/anat/sub-01_ses-pre_desc-age_map.nii.gz")
    np.testing.assert_allclose(age.affine[:3, 3], make_affine()[:3, 3], atol=1e-6)
    description = json.loads((out / "dataset_description.json").read_text())
    assert description["DatasetType"] == "derivative"
    assert description["GeneratedBy"][0]["Name"] == "brainbag"
    assert description["SourceDatasets"] == [{"URL": bids.resolve().as_uri()}]
    assert "toy study" in description["Name"]
    assert not (out / "index.html").exists()  # --no-png


def _wait_for_rows(tsv: Path, n: int, proc: subprocess.Popen, timeout: float = 240.0) -> int:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed: {proc.stderr.read()}")
        if tsv.exists():
            rows = tsv.read_text().count("\n") - 1
            if rows >= n:
                return rows
        time.sleep(0.005)
    raise AssertionError("no progress")


def test_resume_after_kill_9_redoes_only_what_is_missing(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(8):
        brain(data / f"s{i:02d}.nii.gz", seed=i, shape=(48, 52, 44))
    out = tmp_path / "results"
    weights = tiny_weights()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "brainbag", "predict", str(data), "--weights", str(weights),
           "--out", str(out), *FAST, "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        _wait_for_rows(out / "predictions.tsv", 2, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL

    before = read_tsv(out / "predictions.tsv")  # a valid table, whatever the moment
    done = {Path(r["path"]).name for r in before if r["status"] == "ok"}
    assert 2 <= len(done) < 8
    stamps = {name: (out / name.replace(".nii.gz", "") / "prediction.json").stat().st_mtime_ns
              for name in done}

    refused = predict(data, "--weights", weights, "--out", out, *FAST)
    assert refused.exit_code == 2 and "--resume" in refused.stderr

    result = predict(data, "--weights", weights, "--out", out, *FAST, "--resume")
    assert result.exit_code == 0, result.output
    assert f"{len(done)} done before" in result.stderr
    after = read_tsv(out / "predictions.tsv")
    assert len(after) == 8 and all(r["status"] == "ok" for r in after)
    assert [Path(r["path"]).name for r in after] == [f"s{i:02d}.nii.gz" for i in range(8)]
    for name, stamp in stamps.items():  # finished inputs were not redone
        assert (out / name.replace(".nii.gz", "") / "prediction.json").stat().st_mtime_ns == stamp
    ran = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert len(ran) == 8 - len(done)
    # nothing half-written is left: no staging folders, no temporary files
    assert not [p for p in out.rglob(".*")]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.html", "predictions.tsv"] + [f"s{i:02d}" for i in range(8)])


# --- the table survives a kill at any moment ------------------------------------------------

_WRITER = """
import sys
from pathlib import Path
from brainbag.run.batch import ResultsTable
table = ResultsTable(Path(sys.argv[1]))
i = len(table.rows)
while True:
    table.put({"subject": f"s{i}", "path": f"/data/s{i}.nii.gz", "status": "ok", "age": 40.0 + i,
               "error": "x" * 2000, "seconds": 1.0})
    table.save()
    i += 1
"""


def read_count(out: Path) -> int:
    try:
        return (out / "predictions.tsv").read_text().count("\n") - 1
    except FileNotFoundError:
        return 0


def test_table_is_valid_after_kill_9_at_random_moments(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rng = np.random.default_rng(0)
    seen = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(out)], env=env)
        t0 = time.monotonic()
        while read_count(out) <= seen and time.monotonic() - t0 < 60:  # writing has started
            time.sleep(0.002)
        time.sleep(float(rng.uniform(0, 0.3)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        rows = read_tsv(out / "predictions.tsv")
        assert len(rows) >= seen
        assert [r["subject"] for r in rows] == [f"s{i}" for i in range(len(rows))]
        seen = len(rows)
    assert seen > 6


# --- resume decisions --------------------------------------------------------------------------


def test_resume_redoes_changed_failed_and_missing_inputs(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(4):
        brain(data / f"s{i}.nii.gz", seed=i)
    (data / "s4.nii.gz").write_bytes(b"not gzip")
    out = tmp_path / "results"
    weights = tiny_weights()
    base = [data, "--weights", weights, "--out", out]
    args = [*base, *FAST, "--no-png"]
    assert predict(*args).exit_code == 1

    brain(data / "s1.nii.gz", seed=11)  # changed content
    shutil.rmtree(out / "s2")  # outputs deleted
    brain(data / "s4.nii.gz", seed=4)  # fixed
    result = predict(*args, "--resume")
    assert result.exit_code == 0, result.output
    ran = sorted(line.split("]")[1].split(":")[0].strip()
                 for line in result.stderr.splitlines() if line.startswith("["))
    assert ran == ["s1", "s2", "s4"]
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert len(rows) == 5 and all(r["status"] == "ok" for r in rows.values())

    result = predict(*args, "--resume")  # nothing left to do
    assert result.exit_code == 0 and "5 done before" in result.stderr
    assert not [line for line in result.stderr.splitlines() if line.startswith("[")]

    result = predict(*base, "--mode", "sliding", "--window", "32", "32", "32", "--no-png",
                     "--force", "--resume")  # other settings: everything is redone
    assert result.exit_code == 0
    assert len([line for line in result.stderr.splitlines() if line.startswith("[")]) == 5
    assert {r["mode"] for r in read_tsv(out / "predictions.tsv")} == {"sliding"}

    other = tiny_weights(rf=17)  # other weights: redone
    result = predict(data, "--weights", other, "--out", out, "--mode", "sliding", "--window",
                     "32", "32", "32", "--no-png", "--force", "--resume")
    assert result.exit_code == 0
    assert {r["rf"] for r in read_tsv(out / "predictions.tsv")} == {"17"}


def test_resume_force_redoes_only_the_inputs_that_failed_their_checks(tmp_path: Path,
                                                                      tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(2):
        brain(data / f"s{i}.nii.gz", seed=i)
    out = tmp_path / "results"
    base = [data, "--weights", tiny_weights(), "--out", out, "--mode", "full", "--no-png"]
    assert predict(*base, "--force").exit_code == 0
    brain(data / "s2.nii.gz", seed=2)  # a new scan, refused by the checks without --force
    result = predict(*base, "--resume")
    assert result.exit_code == 1 and "2 done before" in result.stderr
    assert by_name(read_tsv(out / "predictions.tsv"))["s2.nii.gz"]["status"] == "failed"
    result = predict(*base, "--resume", "--force")
    assert result.exit_code == 0 and "2 done before" in result.stderr
    saved = json.loads((out / "s2" / "prediction.json").read_text())
    assert saved["checks"]["forced"] is True


def test_settings_fingerprint_ignores_speed_and_location_options(tmp_path: Path) -> None:
    base = PredictSettings(out=tmp_path / "a")
    same = PredictSettings(out=tmp_path / "b", jobs=4, png=True, resume=True,
                           inference=InferenceSettings(batch_size=4, device="cpu", threads=1))
    other = PredictSettings(out=tmp_path / "a", inference=InferenceSettings(overlap=0.5))
    assert settings_fingerprint(base.to_dict()) == settings_fingerprint(same.to_dict())
    assert settings_fingerprint(base.to_dict()) != settings_fingerprint(other.to_dict())


def test_interrupt_leaves_skipped_rows_and_resume_finishes(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(4):
        brain(data / f"s{i}.nii.gz", seed=i)
    out = tmp_path / "results"

    class StopAfterOne:
        def start(self, plan) -> None:
            pass

        def result(self, record) -> None:
            raise KeyboardInterrupt

    settings = PredictSettings(out=out, weights=str(tiny_weights()), force=True,
                               inference=InferenceSettings(mode="full"), png=False)
    with pytest.raises(KeyboardInterrupt):
        run_predict([data], settings, observer=StopAfterOne())
    rows = read_tsv(out / "predictions.tsv")
    statuses = [r["status"] for r in rows]
    # the scan being written when the observer stopped the run may have finished (ok)
    assert statuses[0] == "ok" and statuses[2:] == ["skipped", "skipped"], statuses
    assert all("rerun with --resume" in r["error"] for r in rows if r["status"] == "skipped")
    records = run_predict([data], dataclasses.replace(settings, resume=True))
    assert [r["status"] for r in records] == ["ok"] * 4
    assert [bool(r.get("resumed")) for r in records] == [s == "ok" for s in statuses]


def test_interrupt_while_the_next_scan_runs_keeps_the_written_scan_and_labels_each_row(
        tmp_path: Path, tiny_weights, monkeypatch) -> None:
    """Issue 16: a scan whose outputs were written by the writer thread while the next scan ran
    got `skipped: run interrupted before this input` and was redone by --resume; the scan
    interrupted mid-way said "before this input" too."""
    import brainbag.run.predict as bp

    data = tmp_path / "scans"
    for i in range(4):
        brain(data / f"s{i}.nii.gz", seed=i)
    out = tmp_path / "results"
    settings = PredictSettings(out=out, weights=str(tiny_weights()), force=True, jobs=1,
                               inference=InferenceSettings(mode="full"), png=False)
    real_infer = bp.Predictor.infer
    calls = []

    def infer(self, prepared):
        calls.append(prepared.item.path.name)
        if len(calls) == 2:  # s0 is with the writer thread: wait until it is written, then stop
            deadline = time.monotonic() + 60
            while not (out / "s0" / "prediction.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            raise KeyboardInterrupt
        return real_infer(self, prepared)

    monkeypatch.setattr(bp.Predictor, "infer", infer)
    with pytest.raises(KeyboardInterrupt):
        run_predict([data], settings)
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert rows["s0.nii.gz"]["status"] == "ok"
    assert rows["s1.nii.gz"]["status"] == "skipped"
    assert "while this input was being processed" in rows["s1.nii.gz"]["error"]
    for name in ("s2.nii.gz", "s3.nii.gz"):
        assert rows[name]["status"] == "skipped"
        assert "before this input" in rows[name]["error"]
    monkeypatch.setattr(bp.Predictor, "infer", real_infer)
    records = run_predict([data], dataclasses.replace(settings, resume=True))
    assert [r["status"] for r in records] == ["ok"] * 4
    assert [bool(r.get("resumed")) for r in records] == [True, False, False, False]


def test_resume_keeps_a_finished_scan_whose_row_was_never_saved(tmp_path: Path,
                                                                 tiny_weights) -> None:
    """A kill between publishing a scan's outputs and saving its row leaves a `skipped` row (or
    none): --resume reads the scan's prediction.json and does not redo it."""
    data = tmp_path / "scans"
    for i in range(3):
        brain(data / f"s{i}.nii.gz", seed=i)
    out = tmp_path / "results"
    settings = PredictSettings(out=out, weights=str(tiny_weights()), force=True,
                               inference=InferenceSettings(mode="full"), png=False)
    first = run_predict([data], settings)
    table = ResultsTable(out)
    rows = list(table.rows.values())
    rows[0].update(status="skipped", age="", error="run interrupted before this input")
    table.rows.pop(rows[1]["path"])
    table.save()
    records = run_predict([data], dataclasses.replace(settings, resume=True))
    assert [bool(r.get("resumed")) for r in records] == [True, True, True]
    saved = by_name(read_tsv(out / "predictions.tsv"))
    assert [saved[f"s{i}.nii.gz"]["status"] for i in range(3)] == ["ok"] * 3
    assert float(saved["s0.nii.gz"]["age"]) == pytest.approx(first[0]["age"], abs=1e-3)


# --- inputs: list files, masks, the read-ahead pipeline ---------------------------------------


def test_list_file_with_comments_masks_and_a_missing_entry(tmp_path: Path, tiny_weights) -> None:
    a = brain(tmp_path / "a" / "one.nii.gz", seed=1)
    brain(tmp_path / "b" / "two.nii.gz", seed=2)
    mask = np.zeros((40, 44, 36), np.float32)
    mask[10:30, 10:34, 10:26] = 1
    save(mask, make_affine(), tmp_path / "b" / "two_brain.nii.gz")
    listing = tmp_path / "scans.txt"
    listing.write_text(f"# study X\n{a}\n\nb/two.nii.gz\tb/two_brain.nii.gz\nc/gone.nii.gz\n"
                       f"{a}\n")
    out = tmp_path / "results"
    result = predict(listing, "--weights", tiny_weights(), "--out", out, *FAST)
    assert result.exit_code == 1
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert {n: r["status"] for n, r in rows.items()} == {
        "one.nii.gz": "ok", "two.nii.gz": "ok", "gone.nii.gz": "failed"}
    assert "not found" in rows["gone.nii.gz"]["error"]
    saved = json.loads((out / "two" / "prediction.json").read_text())
    assert saved["whitening"]["mask_voxels"] == int(mask.sum())
    assert saved["mask"]["path"] == str((tmp_path / "b" / "two_brain.nii.gz").resolve())
    assert (out / "one" / "age_map.png").exists()  # PNGs on by default for lists


def test_mask_pattern_pairs_masks_and_never_predicts_them(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    mask = np.zeros((40, 44, 36), np.float32)
    mask[8:32, 8:36, 8:28] = 1
    for i in range(2):
        brain(data / f"s{i}_T1w.nii.gz", seed=i)
    save(mask, make_affine(), data / "s0_T1w_mask.nii.gz")  # s1 has no mask
    out = tmp_path / "results"
    result = predict(data, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png",
                     "--mask-pattern", "{stem}_mask.nii.gz")
    assert result.exit_code == 1
    rows = by_name(read_tsv(out / "predictions.tsv"))
    assert sorted(rows) == ["s0_T1w.nii.gz", "s1_T1w.nii.gz"]
    assert rows["s0_T1w.nii.gz"]["status"] == "ok"
    assert rows["s1_T1w.nii.gz"]["status"] == "failed"
    assert "s1_T1w_mask.nii.gz" in rows["s1_T1w.nii.gz"]["error"]
    assert "does not exist" in rows["s1_T1w.nii.gz"]["error"]
    saved = json.loads((out / "s0" / "prediction.json").read_text())
    assert saved["whitening"]["mask_voxels"] == int(mask.sum())

    bad = predict(data, "--weights", "w.safetensors", "--out", tmp_path / "o",
                  "--mask-pattern", "{subj}_mask.nii.gz")
    assert bad.exit_code == 2 and "unknown: subj" in bad.stderr


@pytest.mark.parametrize("scan_name", ["s0_T1w.nii.gz", "s0.nii.gz"])
def test_prefix_mask_pattern_finds_masks_and_leaves_them_out_of_the_inputs(
        tmp_path: Path, scan_name: str) -> None:
    """`{prefix}` means one thing when finding a scan's mask and when leaving masks out of the
    inputs (issue 16: the mask was predicted as an input, looking for `s0_mask_mask`)."""
    data = tmp_path / "pair"
    brain(data / scan_name)
    brain(data / "s0_mask.nii.gz")
    found = discover([data], tmp_path / "out", mask_pattern="{prefix}_mask.nii.gz")
    assert [i.path.name for i in found.items] == [scan_name]
    assert found.items[0].mask == data / "s0_mask.nii.gz"
    assert found.items[0].mask_error is None


def test_prefix_mask_pattern_on_the_shared_ixi_2mm_folder(tmp_path: Path) -> None:
    """The shared ixi/2mm folder (50 `*_T1w` scans, 50 `*_mask`): 50 inputs, each with its mask."""
    folder = shared("ixi/2mm")
    for pattern in ("{prefix}_mask.nii.gz", "{subject}_mask.nii.gz"):
        found = discover([folder], tmp_path / "out", mask_pattern=pattern)
        assert len(found.items) == 50, pattern
        assert all(i.path.name.endswith("_T1w.nii.gz") for i in found.items)
        assert all(i.mask_error is None for i in found.items)
        assert {i.mask.name for i in found.items if i.mask} == {
            i.path.name.replace("_T1w", "_mask") for i in found.items}


def test_a_text_file_that_is_not_a_list_of_scans_is_refused_before_any_output(
        tmp_path: Path) -> None:
    """Issue 16: notes.txt was read as a list, gave a failed row per line and a results
    folder. No line is an image path: a usage error, nothing written."""
    notes = tmp_path / "notes.txt"
    notes.write_text("This is my notes file about patient scans.\nSecond line.\n")
    out = tmp_path / "results"
    result = predict(notes, "--weights", "w.safetensors", "--out", out)
    assert result.exit_code == 2, result.output
    assert "not a list of scans" in result.stderr
    assert "This is my notes file" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def test_usage_errors_of_batch_inputs(tmp_path: Path) -> None:
    data = tmp_path / "scans"
    brain(data / "x.nii.gz")
    brain(data / "sub" / "x.nii.gz")
    with pytest.raises(UsageError, match="contains it"):
        discover([data], out=data)
    with pytest.raises(UsageError, match="exactly one folder"):
        discover([data, data / "x.nii.gz"])
    with pytest.raises(UsageError, match="--mask applies to one input"):
        discover([data], mask=data / "x.nii.gz")
    with pytest.raises(UsageError, match="both map to output"):
        discover([data / "x.nii.gz", data / "sub" / "x.nii.gz"])
    found = discover([data])  # a folder mirrors sub-folders, so the two do not collide
    assert [i.subject for i in found.items] == ["sub/x", "x"]
    brain(data / "x" / "y.nii.gz")  # output x/ would contain output x/y/
    with pytest.raises(UsageError, match="would contain"):
        discover([data])
    empty = tmp_path / "empty"
    empty.mkdir()
    result = predict(empty, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no T1 image found" in result.stderr
    result = predict(empty, "--out", tmp_path / "o", "--resume", "--overwrite")
    assert result.exit_code == 2 and "not both" in result.stderr


def test_read_ahead_keeps_order_and_bounds_work_in_flight() -> None:
    import threading

    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        time.sleep(0.01 * (5 - i % 5))
        if i == 3:
            raise ValueError("bad input 3")
        return i * i

    for jobs in (0, 1, 3):
        started.clear()
        seen = []
        for i, handle in read_ahead(work, range(10), jobs):
            with lock:
                assert max(started, default=-1) <= i + jobs  # at most `jobs` items ahead
            staged = handle.result()
            seen.append((i, staged.error is None and staged.get()))
            if i == 3:
                assert isinstance(staged.error, ValueError)
        assert seen == [(i, False if i == 3 else i * i) for i in range(10)]


def test_io_overlap_gives_the_same_results_as_sequential(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(4):
        brain(data / ("sub" if i == 3 else "") / f"s{i}.nii.gz", seed=i,
              affine=make_affine(flips=(-1, 1, 1)))
    weights = tiny_weights()
    ages = {}
    for jobs in (0, 3):
        out = tmp_path / f"out{jobs}"
        result = predict(data, "--weights", weights, "--out", out, *FAST, "--jobs", str(jobs))
        assert result.exit_code == 0, result.output
        ages[jobs] = [(r["path"], r["age"], r["p_female"])
                      for r in read_tsv(out / "predictions.tsv")]
    assert ages[0] == ages[3]
    # sub-folders are mirrored in the output folder
    assert (tmp_path / "out3" / "sub" / "s3" / "age_map.png").exists()
    assert read_tsv(tmp_path / "out3" / "predictions.tsv")[3]["output"] == \
        "sub/s3/prediction.json"


def test_tsv_keeps_rows_of_earlier_runs_and_old_tables(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    old_columns = [c for c in TSV_COLUMNS if c != "output"]  # a table from brainbag 0.1.0
    (out / "predictions.tsv").write_text("\t".join(old_columns) + "\n" + "\t".join(
        {"path": "/d/a.nii.gz", "status": "ok", "subject": "a"}.get(c, "") for c in old_columns)
        + "\nbroken\trow\n")
    table = ResultsTable(out)
    assert list(table.rows) == ["/d/a.nii.gz"]
    table.put({"path": "/d/b.nii.gz", "status": "failed", "error": "tab\there"})
    table.put({"path": "/d/a.nii.gz", "status": "ok", "age": 50.0})
    table.save()
    rows = read_tsv(out / "predictions.tsv")
    assert [(r["path"], r["status"], r["age"]) for r in rows] == [
        ("/d/a.nii.gz", "ok", "50.0000"), ("/d/b.nii.gz", "failed", "")]
    assert rows[1]["error"] == "tab here"


# --- progress -----------------------------------------------------------------------------------


def test_progress_plain_lines_when_not_a_terminal(tmp_path: Path, tiny_weights) -> None:
    data = tmp_path / "scans"
    for i in range(3):
        brain(data / f"s{i}.nii.gz", seed=i)
    result = predict(data, "--weights", tiny_weights(), "--out", tmp_path / "o", *FAST,
                     "--no-png")
    assert result.exit_code == 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("[")]
    assert [line.split("]")[0] for line in lines] == ["[1/3", "[2/3", "[3/3"]
    assert all("scans/min" in line and "ETA" in line and "age" in line for line in lines)
    assert result.stderr.count("UNTRAINED") == 1  # the same warning once, not per input
    assert "summary: 3 input(s): 3 ok" in result.stderr and "s per scan" in result.stderr


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    import io

    from rich.console import Console

    from brainbag.run.batch import RunPlan
    from brainbag.run.discover import Discovery, ScanInput
    from brainbag.run.progress import ConsoleObserver

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=120)
    items = [ScanInput.single(tmp_path / f"s{i}.nii.gz") for i in range(3)]
    with ConsoleObserver(console) as observer:
        assert not observer.plain
        observer.start(RunPlan(Discovery("folder", items, root=tmp_path), items, [], tmp_path,
                               False))
        for item in items:
            observer.result({"subject": item.subject, "status": "ok", "age": 50.0,
                             "p_female": 0.5, "seconds": 1.0, "warnings": []})
    text = buffer.getvalue()
    assert "3/3" in text and "scans/min" in text and "ETA" in text
    assert "[1/3]" not in text  # no plain lines on a terminal


def test_single_file_errors_still_raise_and_write_nothing(tmp_path: Path, tiny_weights) -> None:
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(gzip.compress(b"\0" * 10))
    out = tmp_path / "out"
    result = predict(bad, "--weights", tiny_weights(), "--out", out)
    assert result.exit_code == 1 and result.stderr.startswith("error:")
    assert not out.exists() or not any(out.iterdir())


def test_ctrl_c_exits_130_and_says_how_to_resume(tmp_path: Path, monkeypatch) -> None:
    import brainbag.run.predict

    def interrupted(inputs, settings, observer=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(brainbag.run.predict, "run_predict", interrupted)
    result = predict(tmp_path, "--out", tmp_path / "o")
    assert result.exit_code == 130 and "--resume" in result.stderr
