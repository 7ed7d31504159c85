"""Masks lying beside their scans are paired by name, in predict and check; files that look like
masks but pair with nothing get the --mask-pattern that would fit (issue 23, item 4)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from conftest import save
from phantom import head
from test_batch import FAST, brain, predict, read_tsv
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.run.discover import discover, discover_checks

runner = CliRunner()


def _mask_of(scan: Path, name: str) -> Path:
    import nibabel as nib

    img = nib.load(str(scan))
    return save((np.asarray(img.dataobj) > 0).astype(np.float32), img.affine,
                scan.with_name(name))


def test_masks_beside_scans_are_paired_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    pairs = {}
    for subject, mask_name in (("a", "a_mask.nii.gz"), ("b", "b_brain_mask.nii.gz"),
                               ("c", "c_desc-brain_mask.nii")):
        scan = brain(folder / f"{subject}_T1w.nii.gz", seed=ord(subject))
        pairs[scan] = _mask_of(scan, mask_name)
    found = discover([folder])
    assert {i.path: i.mask for i in found.items} == pairs  # the masks are no inputs
    assert found.notes == [
        "paired 3 scan(s) with the mask beside each, by name (e.g. a_T1w.nii.gz + "
        "a_mask.nii.gz); the masks are not taken for scans (--mask-pattern chooses other masks)"]
    pattern = discover([folder], mask_pattern="{prefix}_mask.nii.gz")  # the user's choice wins
    by_subject = {i.subject: i for i in pattern.items}
    assert not pattern.notes and by_subject["a"].mask == pairs[folder / "a_T1w.nii.gz"]
    assert by_subject["b"].mask_error and "--mask-pattern '{prefix}_mask.nii.gz'" in by_subject[
        "b"].mask_error


def test_predict_uses_the_masks_beside_the_scans_and_says_so(tmp_path: Path,
                                                            tiny_weights) -> None:
    folder = tmp_path / "study"
    masks = [_mask_of(brain(folder / f"s{i}_T1w.nii.gz", seed=i), f"s{i}_mask.nii.gz")
             for i in range(2)]
    out = tmp_path / "out"
    result = predict(folder, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png")
    assert result.exit_code == 0, result.output
    assert "paired 2 scan(s) with the mask beside each" in result.stderr
    assert [r["subject"] for r in read_tsv(out / "predictions.tsv")] == ["s0", "s1"]
    for i, mask in enumerate(masks):
        saved = json.loads((out / f"s{i}" / "prediction.json").read_text())
        assert saved["mask"]["path"] == str(mask.resolve()) and saved["mask"]["source"] == "file"


def test_files_that_look_like_masks_get_a_fitting_pattern(tmp_path: Path) -> None:
    folder = tmp_path / "study"
    for i in range(3):
        scan = brain(folder / f"scan{i:02d}.nii.gz", seed=i)
        _mask_of(scan, f"brainmask_scan{i:02d}.nii.gz")
    found = discover([folder])
    assert len(found.items) == 6 and found.notes == [
        "3 file(s) look like masks (e.g. brainmask_scan00.nii.gz) but pair with no scan by name, "
        "so they are treated as scans: --mask-pattern 'brainmask_{prefix}.nii.gz' would pair 3 "
        "of them"]
    suggested = discover([folder], mask_pattern="brainmask_{prefix}.nii.gz")
    assert [(i.path.name, i.mask.name if i.mask else None) for i in suggested.items] == [
        (f"scan{i:02d}.nii.gz", f"brainmask_scan{i:02d}.nii.gz") for i in range(3)]
    odd = tmp_path / "odd"
    brain(odd / "x.nii.gz")
    brain(odd / "mask_of_someone.nii.gz")
    assert discover([odd]).notes[0].endswith(
        "treated as scans: if they are masks, name them <scan>_mask.nii.gz or pass "
        "--mask-pattern")


def test_check_pairs_the_masks_beside_skull_on_scans(tmp_path: Path) -> None:
    """`check folder/` reported every scan failed (skull on), with the masks right there."""
    folder = tmp_path / "heads"
    folder.mkdir()
    for i in range(2):
        data, affine, mask = head(skull=True, seed=i)
        save(data, affine, folder / f"h{i}_T1w.nii.gz")
        save(mask.astype(np.float32), affine, folder / f"h{i}_mask.nii.gz")
    result = runner.invoke(app, ["check", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    assert "paired 2 scan(s) with the mask beside each" in result.stderr
    rows = json.loads(result.stdout)
    assert {Path(r["path"]).name for r in rows} == {"h0_T1w.nii.gz", "h1_T1w.nii.gz"}
    skull = [r for r in rows if r["name"] == "skull_stripped"]
    assert [r["status"] for r in skull] == ["pass", "pass"]
    assert all("the brain mask removes it" in r["found"] for r in skull)
    # --mask-pattern as for predict; a mask it names that is missing fails that scan's mask check
    result = runner.invoke(app, ["check", str(folder), "--mask-pattern", "{prefix}_brain.nii",
                                 "--json"])
    assert result.exit_code == 1
    masks = [r for r in json.loads(result.stdout) if r["name"] == "brain_mask"
             and "_T1w" in r["path"]]
    assert [r["status"] for r in masks] == ["fail", "fail"]
    assert all("h0_brain.nii" in r["found"] or "h1_brain.nii" in r["found"] for r in masks)
    assert "check_inputs" not in dir(__import__("brainbag.image.checks", fromlist=["x"]))
    assert discover_checks([folder]).notes  # the same pairing as predict
