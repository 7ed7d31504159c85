"""predict runs the checks: a failure stops the input (unless force), warnings and fixes are
recorded, and the conformed image it saves lies where the input lies in the world.

The network is the probe model from conftest (its map is the conformed input sampled every 8
voxels): what is tested here is the checks and fixes around it, not the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ProbeModel, linear_field, make_affine, rotation, save, world_coords
from phantom import GM, WM, egg_radius, head, world_bias
from typer.testing import CliRunner

import brainbag.run.predict
from brainbag.cli import app
from brainbag.errors import InputError
from brainbag.network.inference import InferenceSettings
from brainbag.run.predict import Predictor, PredictSettings
from brainbag.weights.file import LoadedWeights, WeightsMeta

runner = CliRunner()


def _probe() -> LoadedWeights:
    meta = WeightsMeta(id="probe", architecture="probe", arch_kwargs={"rf": 9}, heads=["age"],
                       age_scaling={"mean": 0.0, "std": 1.0})
    return LoadedWeights(model=ProbeModel(), meta=meta, path=Path("probe"), sha256="0" * 64)


def _predict(tmp_path: Path, path: Path, **settings) -> dict:
    s = PredictSettings(out=tmp_path / "out", inference=InferenceSettings(mode="full",
                                                                          device="cpu"),
                        **settings)
    return Predictor(s, weights=_probe()).predict(path)


def _saved(tmp_path: Path, subject: str) -> dict:
    return json.loads((tmp_path / "out" / subject / "prediction.json").read_text())


@pytest.fixture(scope="module")
def skull_on(tmp_path_factory) -> Path:
    data, affine, _ = head(skull=True)
    return save(data, affine, tmp_path_factory.mktemp("skull") / "skull.nii.gz")


def test_a_failed_check_stops_the_input_and_writes_nothing(tmp_path: Path, skull_on) -> None:
    with pytest.raises(InputError) as info:
        _predict(tmp_path, skull_on, strip="never")
    message = str(info.value)
    assert "\n" not in message and str(skull_on) in message
    assert "check skull_stripped: skull on" in message and "--mask" in message
    assert "also failed: brain_mask" in message and "--force" in message
    assert not (tmp_path / "out" / "skull").exists()


def test_force_predicts_and_records_the_override(tmp_path: Path, skull_on) -> None:
    record = _predict(tmp_path, skull_on, force=True, strip="never")
    saved = _saved(tmp_path, "skull")
    for r in (record, saved):
        assert r["checks"]["forced"] is True
        assert r["checks"]["failed"] == ["skull_stripped", "brain_mask"]
        assert any(w.startswith("--force: predicting although check skull_stripped")
                   for w in r["warnings"])
    assert saved["settings"]["force"] is True
    results = {c["name"]: c for c in saved["checks"]["results"]}
    assert results["skull_stripped"]["status"] == "fail"
    assert set(results["file"]) == {"name", "status", "found", "expected", "hint"}


def test_warnings_are_recorded_and_the_resampling_fix_too(tmp_path: Path) -> None:
    data, affine, _ = head(bias=world_bias(0.5))
    path = save(data, affine, tmp_path / "biased.nii.gz")
    _predict(tmp_path, path)
    saved = _saved(tmp_path, "biased")
    assert saved["checks"]["forced"] is False and saved["checks"]["failed"] == []
    assert any(w.startswith("bias_field: intensity varies") and "--n4" in w
               for w in saved["warnings"])
    # 2 mm voxels: conform's warning and a recorded fix, not the check's "will be resampled"
    assert not any(w.startswith("voxel_size") for w in saved["warnings"])
    assert any("resampled to 1 mm" in w for w in saved["warnings"])
    (fix,) = saved["fixes"]
    assert fix["name"] == "resample" and fix["from_voxel_mm"] == [2.0, 2.0, 2.0]
    assert fix["to_voxel_mm"] == [1.0, 1.0, 1.0]


def test_n4_and_save_conformed_keep_world_coordinates(tmp_path: Path) -> None:
    zooms = (1.9, 2.1, 2.0)
    affine = make_affine(zooms=zooms, flips=(-1, 1, 1), rot=rotation(2, 15))
    shape = (100, 90, 95)
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2)
    data, affine, _ = head(shape=shape, affine=affine, bias=world_bias(0.5), noise=1.0)
    path = save(data, affine, tmp_path / "sub-02_T1w.nii.gz")
    record = _predict(tmp_path, path, n4=True, save_conformed=True)
    saved = _saved(tmp_path, "sub-02")
    names = [f["name"] for f in saved["fixes"]]
    assert names == ["n4", "resample"]
    n4 = saved["fixes"][0]
    assert n4["seconds"] > 0 and 35 < n4["field_range_percent"] < 70
    assert record["timings_s"]["n4"] > 0
    bias = {c["name"]: c for c in saved["checks"]["results"]}["bias_field"]
    assert bias["status"] == "pass" and "after --n4" in bias["found"]
    assert not any(w.startswith("bias_field") for w in saved["warnings"])
    # conformed.nii.gz: 1 mm, and its white matter, located through its own affine in world
    # coordinates, is where the phantom's white matter is, and now uniform
    conformed = nib.load(tmp_path / "out" / "sub-02" / "conformed.nii.gz")
    assert saved["outputs"]["conformed"] == "conformed.nii.gz"
    np.testing.assert_allclose(np.linalg.norm(conformed.affine[:3, :3], axis=0), 1.0, atol=1e-5)
    values = np.asarray(conformed.dataobj)
    labels = head(shape=conformed.shape, affine=conformed.affine, noise=0.0)[0]
    assert (labels == WM).sum() > 100_000
    assert _wm_spread(values, labels) < 0.15
    centre = affine[:3, :3] @ ((np.array(shape) - 1) / 2) + affine[:3, 3]
    outside = egg_radius(world_coords(conformed.shape, conformed.affine), centre) > 1.05
    np.testing.assert_allclose(values[outside], saved["whitening"]["background"], rtol=1e-5)
    # the same measure on the input, through its own affine: the field was strong there
    assert _wm_spread(data, head(shape=shape, affine=affine, noise=0.0)[0]) > 0.4


def _wm_spread(values: np.ndarray, labels: np.ndarray) -> float:
    """Spread of white matter (10th-90th percentile) relative to the white-grey contrast."""
    wm, gm = values[labels == WM], values[labels == GM]
    return float(np.subtract(*np.percentile(wm, [90, 10])) / (np.median(wm) - np.median(gm)))


def test_save_conformed_is_exactly_the_whitened_input_in_world(tmp_path: Path) -> None:
    affine = make_affine(zooms=(1.3, 0.9, 1.1), flips=(1, -1, 1), rot=rotation(0, 12))
    shape = (40, 60, 44)
    xyz = world_coords(shape, affine)
    centre = xyz.reshape(3, -1).mean(axis=1)
    inside = np.linalg.norm(xyz - centre[:, None, None, None], axis=0) < 20
    path = save(np.where(inside, linear_field(xyz), 0.0), affine, tmp_path / "ball.nii.gz")
    _predict(tmp_path, path, force=True, save_conformed=True)
    saved = _saved(tmp_path, "ball")
    img = nib.load(tmp_path / "out" / "ball" / "conformed.nii.gz")
    values = np.asarray(img.dataobj)
    cxyz = world_coords(img.shape, img.affine)
    deep = np.linalg.norm(cxyz - centre[:, None, None, None], axis=0) < 17
    w = saved["whitening"]
    expected = (linear_field(cxyz[:, deep]) - w["mean"]) / w["std"]
    np.testing.assert_allclose(values[deep], expected, atol=2e-3)


def test_cli_refuses_with_the_check_message_and_force_overrides(tmp_path, skull_on,
                                                               tiny_weights) -> None:
    out = tmp_path / "o"
    result = runner.invoke(app, ["predict", str(skull_on), "--weights", str(tiny_weights()),
                                 "--out", str(out), "--strip", "never"])
    assert result.exit_code == 1
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error:")
    assert "check skull_stripped" in err and "--force" in err
    assert not (out / "skull").exists()


def test_cli_passes_force_n4_and_save_conformed(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_run(inputs, settings, on_result=None):
        seen["settings"] = settings
        return []

    monkeypatch.setattr(brainbag.run.predict, "run_predict", fake_run)
    img = save(np.ones((8, 8, 8)), make_affine(), tmp_path / "x.nii.gz")
    result = runner.invoke(app, ["predict", str(img), "--force", "--n4", "--save-conformed"])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.force, s.n4, s.save_conformed) == (True, True, True)
    result = runner.invoke(app, ["predict", str(img)])
    s = seen["settings"]
    assert (s.force, s.n4, s.save_conformed) == (False, False, False)
    assert "--force" in runner.invoke(app, ["predict", "--help"]).stdout
