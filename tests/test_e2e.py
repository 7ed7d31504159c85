"""End to end on real scans from ../shared/data/samples with random-initialised weights.

These runs use the real architecture; the numbers they print mean nothing (untrained weights),
so the assertions are about the pipeline: outputs exist, are consistent, and lie on the scan.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import sample, world_coords
from typer.testing import CliRunner

from brainbag.cli import app

runner = CliRunner()


def _brain_world_box(img: nib.spatialimages.SpatialImage) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(img.dataobj)
    idx = np.argwhere(data > 0)
    corners = np.array(np.meshgrid(*[[idx[:, d].min(), idx[:, d].max()] for d in range(3)],
                                   indexing="ij")).reshape(3, -1)
    xyz = img.affine[:3, :3] @ corners + img.affine[:3, 3:4]
    return xyz.min(axis=1), xyz.max(axis=1)


def _check_outputs(out: Path, subject: str, scan: Path, stride_mm: float = 8.0) -> dict:
    saved = json.loads((out / subject / "prediction.json").read_text())
    age = nib.load(out / subject / "age_map.nii.gz")
    assert np.isfinite(saved["age"]) and 0 <= saved["p_female"] <= 1
    np.testing.assert_allclose(np.linalg.norm(age.affine[:3, :3], axis=0), stride_mm, atol=1e-4)
    values = np.asarray(age.dataobj)
    assert np.isfinite(values).sum() == saved["map"]["brain_cells"]
    # the map's brain cells span the scan's brain in world coordinates (to within a cell)
    lo, hi = _brain_world_box(nib.load(scan))
    xyz = world_coords(values.shape, age.affine)[:, np.isfinite(values)]
    np.testing.assert_allclose(xyz.min(axis=1), lo, atol=stride_mm)
    np.testing.assert_allclose(xyz.max(axis=1), hi, atol=stride_mm)
    return saved


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "sliding"])
def test_ch2bet_with_a_random_full_size_rf9(tmp_path: Path, tiny_weights, mode: str) -> None:
    scan = sample("ch2bet.nii.gz")
    weights = tiny_weights(rf=9, width=32)
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(scan), "--rf", "9", "--weights", str(weights),
                                 "--mode", mode, "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = _check_outputs(out, "ch2bet", scan)
    assert saved["mode"] == mode and saved["rf"] == 9
    assert saved["map"]["shape"] == [23, 28, 23]
    assert saved["map"]["windows"] == (1 if mode == "full" else 8)
    assert saved["whitening"]["mask_voxels"] == int((np.asarray(nib.load(scan).dataobj) > 0).sum())
    if mode == "full":
        age = np.asarray(nib.load(out / "ch2bet" / "age_map.nii.gz").dataobj)
        assert abs(saved["map"]["age_mean_brain_cells"] - np.nanmean(age)) < 1e-3


def test_mgz_lia_input_end_to_end(tmp_path: Path, tiny_weights) -> None:
    scan = sample("brainmask.mgz")
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(scan), "--weights", str(tiny_weights(rf=17)),
                                 "--mode", "full", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = _check_outputs(out, "brainmask", scan)
    assert saved["input"]["orientation"] == "LIA" and saved["conformed"]["orientation"] == "RAS"


def test_anisotropic_las_input_is_resampled_and_maps_overlay_it(tmp_path, tiny_weights) -> None:
    scan = sample("beijing_sub08251_mprage_skullstripped.nii.gz")
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(scan), "--weights", str(tiny_weights(rf=33)),
                                 "--out", str(out), "--map-space", "input"])
    assert result.exit_code == 0, result.output
    assert "resampled to 1 mm" in result.stderr
    saved = json.loads((out / "beijing_sub08251_mprage_skullstripped" / "prediction.json")
                       .read_text())
    assert saved["conformed"]["resampled"] is True
    age = nib.load(out / "beijing_sub08251_mprage_skullstripped" / "age_map.nii.gz")
    src = nib.load(scan)
    assert age.shape == src.shape
    np.testing.assert_allclose(age.affine, src.affine, atol=1e-4)
    values = np.asarray(age.dataobj)
    brain = np.asarray(src.dataobj) > 0
    assert np.isnan(values[~brain]).all()
    assert np.isfinite(values[brain]).mean() > 0.99
    result = runner.invoke(app, ["predict", str(scan), "--weights", str(tiny_weights(rf=33)),
                                 "--out", str(out), "--no-resample", "--overwrite"])
    assert result.exit_code == 1 and "--no-resample" in result.stderr
