"""The weights brainbag ships: they load, verify and predict, and the age they give does not
depend on the field of view (padding, cropping to the brain) thanks to the brain-centred view,
the world-anchored grid and masked pooling."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.network.inference import InferenceSettings
from brainbag.run.predict import Predictor, PredictSettings
from brainbag.weights.manifest import load_catalog
from brainbag.weights.resolve import open_weights

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"
runner = CliRunner()


def _default_entry():
    entry = load_catalog().default_for(9)
    assert entry is not None, "the shipped manifest has no default RF 9 weights"
    return entry


def test_the_shipped_manifest_lists_bundled_verified_rf9_weights() -> None:
    entry = _default_entry()
    assert entry.trained and entry.bundled and entry.bundled_path.is_file()
    loaded = open_weights(None, 9)
    assert loaded.sha256 == entry.sha256 and loaded.origin["source"] == "bundled"
    meta = loaded.meta
    assert meta.pooling == "brain" and meta.view is not None and meta.voxel_mm == 2.0
    assert "CC BY-SA 3.0" in meta.training["licence"] and "CC BY-SA 3.0" in entry.licence
    lo, hi = meta.training["age_range"]
    assert 20 <= lo < hi <= 80
    names = {m["name"] for m in entry.metrics}
    assert {"age_mae_years", "sex_accuracy"} <= names
    for m in entry.metrics:
        assert "cross-validation" in m["method"] and m["n"] > 0
    assert (REPO / "weights_manifest" / f"{entry.id}.md").is_file()  # the model card


def test_the_readme_demo_command_prints_an_age_with_the_default_weights(tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = runner.invoke(app, ["predict", str(DEMO), "--rf", "9", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "ch2bet" / "prediction.json").read_text())
    assert saved["weights"]["source"] == "bundled" and saved["weights"]["trained"]
    assert 18 < saved["age"] < 95 and 0 <= saved["p_female"] <= 1
    assert f"{saved['age']:.1f}" in result.stdout
    assert saved["rf_mm"] == 18.0 and saved["mode"] == "full"
    # the maps overlay the input: 16 mm voxels inside the input's world box
    img = nib.load(out / "ch2bet" / "age_map.nii.gz")
    np.testing.assert_allclose(np.linalg.norm(img.affine[:3, :3], axis=0), 16.0, atol=1e-5)
    values = np.asarray(img.dataobj)
    assert np.isfinite(values).sum() > 100


def _predict_age(path: Path, out: Path, mode: str = "auto") -> tuple[float, float]:
    settings = PredictSettings(out=out, rf=9, inference=InferenceSettings(
        mode=mode, device="cpu", window=(48, 48, 48)))  # type: ignore[arg-type]
    record = Predictor(settings).predict(path)
    return float(record["age"]), float(record["p_female"])


def test_padding_and_cropping_the_field_of_view_do_not_move_the_age(tmp_path: Path) -> None:
    img = nib.load(DEMO)
    data = np.asarray(img.dataobj, dtype=np.float32)
    affine = img.affine
    base = _predict_age(DEMO, tmp_path / "base")

    def variant(name: str, arr: np.ndarray, start: tuple[int, int, int]) -> tuple[float, float]:
        shifted = affine.copy()
        shifted[:3, 3] = affine[:3, :3] @ np.array(start, dtype=float) + affine[:3, 3]
        path = tmp_path / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, shifted), path)
        return _predict_age(path, tmp_path / name)

    padded = variant("padded40", np.pad(data, 40), (-40, -40, -40))
    lo = np.argwhere(data > 0).min(axis=0)
    hi = np.argwhere(data > 0).max(axis=0) + 1
    cropped = variant("cropped", np.ascontiguousarray(
        data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]), tuple(int(v) for v in lo))
    uneven = variant("uneven", np.pad(data, ((0, 25), (31, 0), (7, 60))), (0, -31, -7))
    print(f"age base {base}, padded {padded}, cropped {cropped}, uneven {uneven}")
    for age, p_female in (padded, cropped, uneven):
        assert abs(age - base[0]) < 0.1
        assert abs(p_female - base[1]) < 0.005
