"""World placement: every map voxel lands where the voxels that produced it came from.

The input's intensity is a linear function of world position inside a ball (the "brain"), and
the probe model outputs, at each map voxel, the conformed input value at the voxel the map voxel
is centred on. So a written map voxel must hold the whitened field evaluated at *its own* world
position, read from the map file's affine. This checks reorientation, resampling, window starts,
padding offsets, stitching and the NIfTI header together, for LAS, permuted and oblique inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ProbeModel, linear_field, make_affine, rotation, save, world_coords

from brainbag.network.inference import InferenceSettings
from brainbag.run.predict import Predictor, PredictSettings
from brainbag.weights.file import LoadedWeights, WeightsMeta

CASES = {
    "RAS-1mm": dict(affine=make_affine(), shape=(64, 70, 60)),
    "LAS-1mm": dict(affine=make_affine(flips=(-1, 1, 1)), shape=(64, 70, 60)),
    "PIR-permuted": dict(affine=make_affine(flips=(1, -1, 1), perm=(1, 2, 0)), shape=(70, 60, 64)),
    "oblique-1mm": dict(affine=make_affine(rot=rotation(0, 17) @ rotation(1, -9)),
                        shape=(64, 70, 60)),
    "oblique-anisotropic": dict(
        affine=make_affine(zooms=(1.25, 0.9, 1.1), flips=(-1, 1, -1), rot=rotation(2, 23)),
        shape=(52, 78, 56)),
}
RADIUS = 27.0


def _probe_weights(padding: str) -> LoadedWeights:
    meta = WeightsMeta(id=f"probe-{padding}", architecture="probe", arch_kwargs={"rf": 9},
                       heads=["age"], age_scaling={"mean": 0.0, "std": 1.0})
    return LoadedWeights(model=ProbeModel(padding, rf=9), meta=meta, path=Path("probe"),
                         sha256="0" * 64)


def _scan(tmp_path: Path, case: str) -> tuple[Path, np.ndarray]:
    affine, shape = CASES[case]["affine"], CASES[case]["shape"]
    xyz = world_coords(shape, affine)
    centre = world_coords(shape, affine).reshape(3, -1).mean(axis=1)
    inside = np.linalg.norm(xyz - centre[:, None, None, None], axis=0) < RADIUS
    data = np.where(inside, linear_field(xyz), 0.0)
    return save(data, affine, tmp_path / f"{case}.nii.gz"), centre


def _run(tmp_path: Path, path: Path, padding: str, mode: str, map_space: str = "model"):
    settings = PredictSettings(
        out=tmp_path / "out",
        inference=InferenceSettings(mode=mode, window=(32, 40, 24), overlap=0.25, device="cpu"),
        map_space=map_space,  # type: ignore[arg-type]
        force=True,  # a 27 mm ball is not a brain: the checks refuse it (brain_mask)
    )
    record = Predictor(settings, weights=_probe_weights(padding)).predict(path)
    subject_dir = tmp_path / "out" / record["subject"]
    saved = json.loads((subject_dir / "prediction.json").read_text())
    return nib.load(subject_dir / "age_map.nii.gz"), saved


@pytest.mark.parametrize("mode", ["full", "sliding"])
@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("case", list(CASES))
def test_map_voxels_hold_the_field_at_their_own_world_position(tmp_path, case, padding, mode):
    path, centre = _scan(tmp_path, case)
    img, saved = _run(tmp_path, path, padding, mode)
    stats = saved["whitening"]
    affine = img.affine
    np.testing.assert_allclose(img.header.get_qform(), affine, atol=1e-4)
    assert int(img.header["sform_code"]) > 0 and int(img.header["qform_code"]) > 0
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), 8.0, atol=1e-5)

    values = np.asarray(img.dataobj, dtype=np.float64)
    xyz = world_coords(values.shape, affine)
    expected = (linear_field(xyz) - stats["mean"]) / stats["std"]
    deep = np.linalg.norm(xyz - centre[:, None, None, None], axis=0) < RADIUS - 3
    assert deep.sum() >= 20
    assert np.isfinite(values[deep]).all()
    np.testing.assert_allclose(values[deep], expected[deep], atol=2e-3)
    # outside the brain the map is NaN, and no map voxel far from the ball is shown
    far = np.linalg.norm(xyz - centre[:, None, None, None], axis=0) > RADIUS + 8
    assert np.isnan(values[far]).all()
    if saved["conformed"]["resampled"]:
        assert any("resampled" in w for w in saved["warnings"])


@pytest.mark.parametrize("case", ["LAS-1mm", "oblique-anisotropic"])
def test_input_space_maps_overlay_the_input_grid(tmp_path, case) -> None:
    path, centre = _scan(tmp_path, case)
    img, saved = _run(tmp_path, path, "same", "sliding", map_space="input")
    src = nib.load(path)
    assert img.shape == src.shape
    np.testing.assert_allclose(img.affine, src.affine, atol=1e-5)
    values = np.asarray(img.dataobj, dtype=np.float64)
    xyz = world_coords(values.shape, img.affine)
    stats = saved["whitening"]
    expected = (linear_field(xyz) - stats["mean"]) / stats["std"]
    deep = np.linalg.norm(xyz - centre[:, None, None, None], axis=0) < RADIUS - 16
    assert deep.sum() > 100
    np.testing.assert_allclose(values[deep], expected[deep], atol=5e-3)
    outside = np.asarray(src.dataobj) == 0
    assert np.isnan(values[outside]).all()


def test_prediction_json_records_geometry_and_provenance(tmp_path) -> None:
    path, _ = _scan(tmp_path, "oblique-anisotropic")
    img, saved = _run(tmp_path, path, "valid", "full")
    for key in ("age", "p_female", "rf", "mode", "device", "weights", "brainbag_version",
                "input", "whitening", "timings_s", "settings"):
        assert key in saved
    assert set(saved["timings_s"]) >= {"load", "preprocess", "inference", "write"}
    assert set(saved["input"]) >= {"path", "sha256", "shape", "voxel_mm"}
    assert set(saved["whitening"]) >= {"mean", "std", "mask_voxels"}
    assert saved["weights"] == {"id": "probe-valid", "sha256": "0" * 64, "path": "probe",
                                "trained": True}
    np.testing.assert_allclose(np.array(saved["map"]["affine"]), img.affine, atol=1e-5)
    assert saved["map"]["offset_voxels"] == 4.0
    assert saved["input"]["voxel_mm"] == pytest.approx([1.25, 0.9, 1.1])


def _probe_2mm_weights() -> LoadedWeights:
    """Probe weights that run at 2 mm on a brain-centred view with masked pooling."""
    meta = WeightsMeta(id="probe-2mm-view", architecture="probe", arch_kwargs={"rf": 9},
                       heads=["age"], age_scaling={"mean": 0.0, "std": 1.0}, pooling="brain",
                       preprocessing={"voxel_mm": 2.0, "view_xyz": [24, 24, 24]},
                       training={"age_range": [50.0, 60.0]})
    return LoadedWeights(model=ProbeModel("same", rf=9), meta=meta, path=Path("probe"),
                         sha256="0" * 64)


@pytest.mark.parametrize("mode", ["auto", "sliding"])
@pytest.mark.parametrize("case", ["LAS-1mm", "PIR-permuted", "oblique-anisotropic"])
def test_2mm_brain_view_maps_land_at_their_own_world_position(tmp_path, case, mode) -> None:
    """Weights at 2 mm with a brain-centred view: map voxels 16 mm apart, starting where the view
    starts (outside the conformed grid here), still hold the field at their own world point."""
    path, centre = _scan(tmp_path, case)
    settings = PredictSettings(
        out=tmp_path / "out", force=True,
        inference=InferenceSettings(mode=mode, window=(16, 16, 16), device="cpu"))  # type: ignore[arg-type]
    record = Predictor(settings, weights=_probe_2mm_weights()).predict(path)
    folder = tmp_path / "out" / record["subject"]
    saved = json.loads((folder / "prediction.json").read_text())
    img = nib.load(folder / "age_map.nii.gz")
    assert saved["conformed"]["voxel_mm"] == pytest.approx([2.0, 2.0, 2.0])
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 16.0, atol=1e-5)
    assert saved["mode"] == ("full" if mode == "auto" else "sliding")
    stats = saved["whitening"]
    values = np.asarray(img.dataobj, dtype=np.float64)
    xyz = world_coords(values.shape, img.affine)
    expected = (linear_field(xyz) - stats["mean"]) / stats["std"]
    dist = np.linalg.norm(xyz - centre[:, None, None, None], axis=0)
    deep = dist < RADIUS - 5
    assert deep.sum() >= 5
    np.testing.assert_allclose(values[deep], expected[deep], atol=3e-3)
    assert np.isnan(values[dist > RADIUS + 16]).all()
    # the global value is the brain-weighted mean of the map (masked pooling)
    assert "masked pooling" in saved["map"]["global_is_mean_over"]
    # the probe's "age" (a whitened intensity, about 0) lies outside the training range 50-60
    assert abs(saved["age"]) < 5
    assert any("outside the training age range 50-60 y" in w for w in saved["warnings"])
