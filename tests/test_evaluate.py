from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from brainbag.errors import UsageError
from brainbag.train.evaluate import (
    EvaluateSettings,
    WeightsResult,
    age_metrics,
    fit_line,
    roc_auc,
    scatter_png,
    select_records,
    sex_metrics,
    table_tsv,
)


def test_age_metrics_on_an_exact_example() -> None:
    true = [20.0, 40.0, 60.0, 80.0]
    pred = [30.0, 45.0, 55.0, 70.0]  # error = 10, 5, -5, -10: regression to the mean
    m = age_metrics(true, pred)
    assert m["n"] == 4 and m["mae"] == pytest.approx(7.5)
    assert m["rmse"] == pytest.approx(np.sqrt((100 + 25 + 25 + 100) / 4))
    assert m["mean_error"] == pytest.approx(0.0)
    # least squares of the error on the centred age: -700 / 2000; intercept 0 + 0.35 * 50
    assert m["bias_slope"] == pytest.approx(-0.35) and m["bias_intercept"] == pytest.approx(17.5)
    assert m["r"] == pytest.approx(np.corrcoef(true, pred)[0, 1])
    perfect = age_metrics(true, true)
    assert perfect["mae"] == 0 and perfect["r"] == pytest.approx(1) and perfect[
        "bias_slope"] == pytest.approx(0, abs=1e-12)
    constant = age_metrics(true, [50.0] * 4)
    assert constant["r"] is None and constant["bias_slope"] == pytest.approx(-1)
    assert age_metrics([], [])["mae"] is None


def _auc_brute(y: list[bool], s: list[float]) -> float:
    pairs = [(a, b) for a, b in itertools.product(range(len(y)), repeat=2) if y[a] and not y[b]]
    return sum(1.0 if s[a] > s[b] else 0.5 if s[a] == s[b] else 0.0 for a, b in pairs) / len(
        pairs)


def test_auc_counts_ties_as_one_half() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = list(rng.integers(0, 2, 15).astype(bool))
        s = list(rng.integers(0, 5, 15) / 4)  # many ties
        if all(y) or not any(y):
            continue
        assert roc_auc(y, s) == pytest.approx(_auc_brute(y, s))
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0
    assert roc_auc([True, True], [0.9, 0.1]) is None
    m = sex_metrics([True, True, False, False], [0.9, 0.4, 0.6, 0.1])
    assert m["accuracy"] == 0.5 and m["auc"] == 0.75 and (m["n_female"], m["n_male"]) == (2, 2)


def test_table_and_scatter(tmp_path: Path) -> None:
    rows = [{"age": a, "predicted_age": a + d} for a, d in ((25.0, 3.0), (50.0, -2.0),
                                                              (70.0, -6.0))]
    results = [
        WeightsResult(Path("a.safetensors"), "rf9", 9, ["age", "sex"], rows,
                      {"images": 3, "age": age_metrics([25, 50, 70], [28, 48, 64]),
                       "sex": {"accuracy": 0.5, "auc": 0.75}}),
        WeightsResult(Path("b.safetensors"), "rf17-sex", 17, ["sex"], [],
                      {"images": 3, "sex": {"accuracy": 1.0, "auc": 1.0}}),
    ]
    lines = table_tsv(results).splitlines()
    assert lines[0].split("\t") == ["weights", "rf", "heads", "n", "age_mae", "age_rmse",
                                    "age_r", "age_bias_slope", "sex_accuracy", "sex_auc"]
    assert lines[1].split("\t")[:5] == ["rf9", "9", "age+sex", "3", "3.6667"]
    assert lines[2].split("\t")[4:8] == ["", "", "", ""]  # no age head: empty, not zero
    png = tmp_path / "scatter.png"
    scatter_png(png, results[0])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["scatter.png"]


def test_a_split_needs_a_split_file(tmp_path: Path) -> None:
    table = tmp_path / "p.tsv"
    table.write_text("participant_id\tage\tsex\tt1w\nA\t30\tF\ta.nii\n")
    settings = EvaluateSettings(data=table, weights=(tmp_path / "w.safetensors",),
                                split="test")
    with pytest.raises(UsageError, match="--split test needs.*--split-file"):
        select_records(settings, tmp_path / "w.safetensors")
    with pytest.raises(UsageError):
        EvaluateSettings(data=table, weights=(), split="nope").validate()


def test_the_scatter_fit_and_the_bias_slope_say_the_same_thing() -> None:
    """Issue 16: the scatter said "slope 0.01" and the table "bias slope -0.990" without saying
    that one fits the prediction and the other the error. The line is drawn from the metrics and
    its legend names both."""
    true = [20.0, 40.0, 60.0, 80.0]
    pred = [50.0, 50.5, 50.0, 51.0]
    age = age_metrics(true, pred)
    slope, intercept, label = fit_line(age)
    direct_slope, direct_intercept = np.polyfit(true, pred, 1)
    assert slope == pytest.approx(direct_slope) and intercept == pytest.approx(direct_intercept)
    assert slope == pytest.approx(1 + age["bias_slope"])
    assert label == f"fit: slope {slope:.2f} (= 1 + bias slope {age['bias_slope']:.2f})"
    assert fit_line(age_metrics([], [])) is None


def test_evaluate_reports_progress_when_not_on_a_terminal(tmp_path, monkeypatch) -> None:
    """Issue 16: `evaluate` printed nothing until it ended when its output was not a terminal."""
    from types import SimpleNamespace

    from typer.testing import CliRunner

    import brainbag.train.evaluate as ev
    from brainbag.cli import app

    def fake(settings, on_image=None):
        for k in range(2):
            on_image(k, 2, SimpleNamespace(participant_id=f"sub-0{k + 1}"))
        return []

    monkeypatch.setattr(ev, "run_evaluate", fake)
    result = CliRunner().invoke(app, ["evaluate", str(tmp_path), "--weights", "w.safetensors",
                                      "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    assert "evaluating 1/2: sub-01" in result.stderr and "evaluating 2/2: sub-02" in result.stderr
    assert "bias slope: slope of the error" in result.stdout


def test_evaluate_takes_weights_ids_files_and_rf(tmp_path: Path) -> None:
    """Issue 23, item 5: `evaluate --weights bagnet3d-rf9-ixi-open-v1` failed with "weights file
    not found" while predict accepted the id. Every command resolves weights one way."""
    import json
    import shutil

    import nibabel as nib
    from typer.testing import CliRunner

    from brainbag.cli import app

    repo = Path(__file__).resolve().parents[1]
    demo = nib.load(str(repo / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"))
    affine = demo.affine.copy()
    affine[:3, :3] *= 2  # every second voxel: a 2 mm copy, as the weights see it, checked faster
    nib.save(nib.Nifti1Image(np.asarray(demo.dataobj)[::2, ::2, ::2], affine),
             str(tmp_path / "ch2bet.nii.gz"))
    table = tmp_path / "people.tsv"
    table.write_text("participant_id\tage\tsex\tt1w\nch2bet\t33\tM\tch2bet.nii.gz\n")
    bundled = repo / "weights_manifest" / "bagnet3d-rf9-ixi-open-v1.safetensors"
    copy = tmp_path / "copy.safetensors"
    shutil.copy(bundled, copy)
    runner = CliRunner()
    both = runner.invoke(app, ["evaluate", str(table), "--weights", "bagnet3d-rf9-ixi-open-v1",
                               "--weights", str(copy), "--out", str(tmp_path / "e1"),
                               "--no-plot"])
    assert both.exit_code == 0, both.output
    metrics = [json.loads((tmp_path / "e1" / label / "metrics.json").read_text())
               for label in ("bagnet3d-rf9-ixi-open-v1", "bagnet3d-rf9-ixi-open-v1-2")]
    assert [m["weights"] for m in metrics] == [str(bundled), str(copy)]
    ages = [json.loads((tmp_path / "e1" / m["label"] / "metrics.json").read_text())["age"]["mae"]
            for m in metrics]
    assert ages[0] == pytest.approx(ages[1])  # the same weights, found by id and by file
    default = runner.invoke(app, ["evaluate", str(table), "--rf", "9", "--out",
                                  str(tmp_path / "e2"), "--no-plot"])
    assert default.exit_code == 0, default.output
    assert (tmp_path / "e2" / "bagnet3d-rf9-ixi-open-v1" / "metrics.json").is_file()
    wrong = runner.invoke(app, ["evaluate", str(table), "--weights", "bagnet3d-rf9-ixi-open-v1",
                                "--rf", "17", "--out", str(tmp_path / "e3")])
    assert wrong.exit_code == 2 and "are RF 9 but --rf 17" in wrong.stderr
    unknown = runner.invoke(app, ["evaluate", str(table), "--weights", "no-such-id-v1",
                                  "--out", str(tmp_path / "e4")])
    assert unknown.exit_code == 1 and "neither a file nor a weights id" in unknown.stderr
