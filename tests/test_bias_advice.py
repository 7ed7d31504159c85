"""The bias-field check judges a scan against the bias fields the weights saw in training, and
advises --n4 only where N4 brings the scan closer to them (issue 23, item 3: the check fired on
7 of 10 IXI training scans and its advice moved the in-sample MAE from 4.53 to 5.77 y)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import SHARED_DATA, save
from phantom import head, world_bias
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.image.bias import judge, summarize
from brainbag.image.checks import CheckOptions, measure_bias_field, run_checks

runner = CliRunner()
SHIPPED = Path(__file__).resolve().parents[1] / "weights_manifest"


def _phantom(tmp_path: Path, name: str, strength: float | None) -> Path:
    data, affine, _ = head(bias=world_bias(strength) if strength else None)
    return save(data, affine, tmp_path / name)


def _bias(path: Path, training: dict | None, n4: bool = False):
    report = run_checks(path, CheckOptions(bias_field=training, n4=n4), names=("bias_field",))
    return report.get("bias_field"), report


@pytest.fixture(scope="module")
def scans(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("bias")
    return {"flat": _phantom(tmp, "flat.nii.gz", None),
            "biased": _phantom(tmp, "biased.nii.gz", 0.5)}


RAW = {"n": 50, "p5": 0.19, "p50": 0.33, "p95": 0.60}  # weights trained on raw scans
CORRECTED = {"n": 50, "p5": 0.002, "p50": 0.01, "p95": 0.05}  # ... on bias-corrected scans


def test_a_field_like_the_training_images_passes_and_runs_no_n4(scans) -> None:
    result, report = _bias(scans["biased"], RAW)
    assert result.status == "pass" and "after_n4" not in result.values
    assert "within the weights' training images: 19 %-60 %" in result.expected  # p5-p95 ...
    assert report.n4 is None


def test_n4_is_advised_only_where_it_brings_the_scan_closer(scans) -> None:
    result, report = _bias(scans["biased"], CORRECTED)
    assert result.status == "warn" and result.hint.startswith("pass --n4: N4 brings it to")
    assert result.values["after_n4"] < 0.05 and report.n4 is None  # a trial, not a fix
    # a flatter field than any training image: N4 flattens it further, away from the range
    result, _ = _bias(scans["flat"], RAW)
    assert result.status == "warn" and "less than in the weights' training images" in result.found
    assert "--n4 is not advised" in result.hint and "pass --n4" not in result.hint


def test_asking_for_n4_on_weights_trained_without_it_says_to_drop_it(scans) -> None:
    """What the issue's user did: --n4 on a raw scan for weights trained on raw scans."""
    result, report = _bias(scans["biased"], RAW, n4=True)
    assert result.status == "warn" and "drop --n4" in result.hint
    assert result.values["after_n4"] < RAW["p5"] and report.n4 is not None
    result, _ = _bias(scans["biased"], CORRECTED, n4=True)
    assert result.status == "pass"


def test_without_a_training_record_no_fix_is_advised(scans) -> None:
    result, _ = _bias(scans["biased"], None)
    assert result.status == "warn" and "pass --n4" not in result.hint
    assert "not advised" in result.hint
    assert _bias(scans["flat"], None)[0].status == "pass"


def test_the_range_is_what_the_training_images_spanned() -> None:
    """No training image is judged unlike its own training data: min-max when recorded."""
    spanned = {**RAW, "min": 0.002, "max": 0.7}
    assert judge(0.65, spanned, None, n4_asked=False).status == "pass"
    assert judge(0.65, RAW, None, n4_asked=False).status == "warn"  # ... when only p5-p95
    assert "0 %-70 % (50 images; 5th-95th percentile 19 %-60 %" in judge(
        0.65, spanned, None, n4_asked=False).expected


def test_judge_calls_n4_only_when_it_must() -> None:
    calls = []

    def after() -> tuple[float, float]:
        calls.append(1)
        return 0.01, 1.0

    assert judge(0.3, RAW, after, n4_asked=False).status == "pass" and not calls
    assert judge(0.9, RAW, after, n4_asked=False).status == "warn" and len(calls) == 1
    assert judge(0.3, None, after, n4_asked=False).status == "warn" and len(calls) == 1
    assert summarize([0.1, 0.2, None, float("nan"), 0.3])["n"] == 3  # type: ignore[list-item]
    assert summarize([]) is None


def test_the_shipped_weights_record_the_fields_of_their_training_images() -> None:
    from safetensors import safe_open

    entry = json.loads((SHIPPED / "manifest.json").read_text())["weights"][0]
    with safe_open(str(SHIPPED / f"{entry['id']}.safetensors"), framework="pt") as fh:
        meta = json.loads(fh.metadata()["brainbag"])
    bias = meta["training"]["statistics"]["bias_field"]
    assert bias == entry["training"]["statistics"]["bias_field"]  # one record in both places
    assert bias["n"] == 59 and bias["p5"] < 0.01 < 0.3 < bias["p50"] < bias["p95"] < 0.5
    assert "0.2-49.9 % over 59 images" in (SHIPPED / f"{entry['id']}.md").read_text()


def test_raw_ixi_training_scans_pass_with_the_shipped_weights() -> None:
    """The issue's case: a raw 2 mm IXI scan the shipped weights were trained on warned "pass
    --n4"; judged against the training images, its field is ordinary."""
    scan = SHARED_DATA / "ixi" / "2mm" / "IXI012-HH-1211_T1w.nii.gz"
    if not scan.exists():
        pytest.skip(f"IXI scan {scan} not available (set BRAINBAG_SHARED_DATA)")
    mask = scan.with_name("IXI012-HH-1211_mask.nii.gz")
    result = runner.invoke(app, ["check", str(scan), "--mask", str(mask), "--json"])
    assert result.exit_code == 0, result.output
    bias = next(r for r in json.loads(result.stdout) if r["name"] == "bias_field")
    assert bias["status"] == "pass", bias
    assert 0.3 < measure_bias_field(scan, mask) < 0.5  # type: ignore[operator]
