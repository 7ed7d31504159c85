"""brainbag crossval: folds grouped by subject, one model per fold, pooled held-out predictions
next to the predict-the-training-mean baseline."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from synthetic import make_dataset
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.errors import InputError
from brainbag.train.config import TrainConfig
from brainbag.train.crossval import make_folds, read_folds, run_crossval
from brainbag.train.datasets import ImageRecord
from brainbag.train.record import QuietReporter
from brainbag.train.trainer import run_training
from brainbag.weights.file import load_weights

runner = CliRunner()


def test_folds_are_stratified_grouped_and_reproducible(tmp_path: Path) -> None:
    root = tmp_path
    records = []
    for i in range(23):
        site = "Guys" if i < 5 else "HH"
        records.append(ImageRecord(f"S{i:02d}", root / f"S{i:02d}.nii.gz", age=20.0 + 2 * i,
                                   dataset="ixi", site=site))
    records.append(ImageRecord("S03", root / "S03b.nii.gz", age=26.0, dataset="ixi",
                               site="Guys"))  # a 2nd image
    a = make_folds(records, 5, seed=0)
    assert a == make_folds(records, 5, seed=0)
    assert a != make_folds(records, 5, seed=1)
    assert len(a) == 23  # one row per subject, not per image
    folds = [r["fold"] for r in a]
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    assert max(folds.count(f) for f in range(5)) - min(folds.count(f) for f in range(5)) <= 1
    guys = [r["fold"] for r in a if r["stratum"] == "ixi/Guys"]
    assert sorted(guys) == [0, 1, 2, 3, 4]  # 5 subjects of one site: one per fold


def test_a_folds_file_missing_a_subject_is_refused(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 4, shape=(16, 16, 16), seed=0)
    folds = tmp_path / "folds.tsv"
    folds.write_text("participant_id\tfold\nsub-000\t0\nsub-001\t1\nsub-002\t0\n")
    with pytest.raises(InputError, match="no fold for 1 subject"):
        run_crossval(data, folds, TrainConfig(), tmp_path / "cv", train=lambda c, r: None)
    folds.write_text("participant_id\tfold\nsub-000\tzero\n")
    with pytest.raises(InputError, match="not an integer"):
        read_folds(folds)


def test_crossval_trains_each_fold_and_predicts_every_subject_once(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 9, shape=(24, 24, 24), seed=3)
    folds = tmp_path / "folds.tsv"
    config = TrainConfig(width=2, crop=[16, 16, 16], batch_size=4, epochs=1, device="cpu",
                         workers=1, val_fraction=0.0, test_fraction=0.0, task="both")
    seen: list[tuple[str, bool]] = []

    def train(c: TrainConfig, resume: bool) -> object:
        seen.append((c.out, resume))
        return run_training(c, QuietReporter(), resume)

    result = run_crossval(data, folds, config, tmp_path / "cv", k=3, seed=0, train=train)
    assert folds.is_file()  # made, then used
    assignment = read_folds(folds)
    assert len(seen) == 3 and all(not resume for _, resume in seen)
    rows = result.rows
    assert sorted(r["participant_id"].removeprefix("sub-") for r in rows) == sorted(assignment)
    ages = {}
    with open(data) as fh:
        for row in csv.DictReader(fh, delimiter="\t"):
            ages[row["participant_id"].removeprefix("sub-")] = float(row["age"])
    for r in rows:
        # each subject is predicted by the model of its own fold, which never trained on it
        split = (tmp_path / "cv" / f"fold-{r['fold']}" / "run" / "splits.tsv").read_text()
        line = next(x for x in split.splitlines() if x.startswith(r["participant_id"] + "\t"))
        assert line.split("\t")[2] == "val"  # recorded each epoch, never used to choose
        assert assignment[r["participant_id"].removeprefix("sub-")] == r["fold"]
    # site-mean baseline = the mean age of the other folds (one site: the table), same rows
    fold0 = [p for p, f in assignment.items() if f == 0]
    train_mean = np.mean([ages[p] for p, f in assignment.items() if f != 0])
    expected = np.mean([abs(ages[p] - train_mean) for p in fold0])
    got = result.metrics["by_fold"][0]["site_mean"]["age"]["mae"]
    assert got == pytest.approx(expected, rel=1e-9)
    overall = result.metrics["overall"]
    assert overall["model"]["n"] == 9 and overall["mae_ratio"]["site_mean"] > 0
    assert overall["morphometric"]["age"]["n"] == 9
    curve = (tmp_path / "cv" / "learning_curve.tsv").read_text().splitlines()
    assert curve[0].startswith("epoch\ttrain_loss\theldout_loss\theldout_age_mae")
    assert len(curve) == 2 and curve[1].split("\t")[-1] == "3"  # 1 epoch, 3 folds
    meta = load_weights(tmp_path / "cv" / "fold-0" / "run" / "weights.safetensors").meta
    assert meta.training["selected_by"] == "last"
    for name in ("predictions.tsv", "metrics.json", "table.tsv"):
        assert (tmp_path / "cv" / name).is_file()
    header = (tmp_path / "cv" / "predictions.tsv").read_text().splitlines()[0].split("\t")
    assert {"fold", "source", "predicted_age", "p_female"} <= set(header)
    # run again: every fold is finished, so each is resumed (nothing retrained) and the
    # held-out predictions are the same
    seen.clear()
    again = run_crossval(data, folds, config, tmp_path / "cv", k=3, seed=0, train=train)
    assert [resume for _, resume in seen] == [True, True, True]
    assert [r["predicted_age"] for r in again.rows] == [r["predicted_age"] for r in rows]


def test_crossval_cli_prints_the_table(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 6, shape=(16, 16, 16), seed=4)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('width = 2\ncrop = [16, 16, 16]\nbatch_size = 4\nepochs = 1\n'
                      'device = "cpu"\nworkers = 1\nval_fraction = 0.0\ntest_fraction = 0.0\n')
    result = runner.invoke(app, ["crossval", str(data), "--folds", str(tmp_path / "f.tsv"),
                                 "--recipe", str(recipe), "--k", "2", "--out",
                                 str(tmp_path / "cv")])
    assert result.exit_code == 0, result.output
    assert "ratio" in result.stdout and "fold 2/2" in result.stdout and "│ all" in result.stdout
