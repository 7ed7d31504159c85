"""Honest evaluation (issue 25): crossval over several tables, folds stratified by data set, site
and group, per-site and per-group figures next to the per-site mean and morphometric baselines,
leave-one-dataset-out, --train-groups; and the end-to-end path to shipped weights (crossval,
train, training/ship_weights.py) on tiny synthetic tables named like the real ones."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from synthetic import make_dataset
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.errors import InputError, UsageError
from brainbag.train.baselines import fit_logistic, fit_ridge, record_features
from brainbag.train.config import TrainConfig
from brainbag.train.crossval import make_folds, read_folds, run_crossval
from brainbag.train.datasets import ImageRecord, discover, discover_all
from brainbag.weights.card import unseen_site_text
from brainbag.weights.file import load_weights
from brainbag.weights.manifest import read_manifest

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]
#: whole-volume views (predict then runs one 16^3 view, not 160x160x128 windows)
TINY_RECIPE = ('width = 2\ncrop = [16, 16, 16]\nview = "brain"\npooling = "brain"\n'
               'batch_size = 4\nepochs = 1\ndevice = "cpu"\nworkers = 1\nval_fraction = 0.0\n'
               'test_fraction = 0.0\n')


def _rewrite(table: Path, rows: list[dict[str, str]]) -> None:
    with open(table, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)


def _read(table: Path) -> list[dict[str, str]]:
    with open(table) as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def make_tables(root: Path) -> tuple[Path, Path]:
    """``ixi/participants.tsv``: 8 subjects at sites HH (5) and Guys (3), one of them with a
    second image; ``openneuro/participants.tsv``: 6 subjects of site ds002748, 3 controls and
    3 patients (``group``), ids prefixed with the data set as in ../shared/data."""
    ixi = make_dataset(root / "ixi", 8, shape=(16, 16, 16), seed=11)
    rows = []
    for i, row in enumerate(_read(ixi)):
        site = "HH" if i < 5 else "Guys"
        pid = f"IXI{i:03d}-{site}-{1000 + i}"
        rows.append({"participant_id": pid, "age": row["age"], "sex": row["sex"], "site": site,
                     "t1w": row["t1w"]})
    shutil.copy(root / "ixi" / rows[0]["t1w"], root / "ixi" / "images" / "second.nii.gz")
    rows.append({**rows[0], "t1w": "images/second.nii.gz"})  # one subject, two images
    _rewrite(ixi, rows)
    openneuro = make_dataset(root / "openneuro", 6, shape=(16, 16, 16), seed=12)
    rows = []
    for i, row in enumerate(_read(openneuro)):
        rows.append({"participant_id": f"ds002748-sub-{i + 1:02d}", "age": row["age"],
                     "sex": row["sex"], "group": "control" if i % 2 else "depression",
                     "site": "ds002748", "t1w": row["t1w"]})
    _rewrite(openneuro, rows)
    return ixi, openneuro


def _load_ship_weights() -> Any:
    spec = importlib.util.spec_from_file_location("ship_weights",
                                                  REPO / "training" / "ship_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """The whole path once, through the command line: crossval of both tables (2 folds,
    trained on controls), crossval --leave-one-dataset-out, train on the pooled table, ship."""
    root = tmp_path_factory.mktemp("sites")
    ixi, openneuro = make_tables(root)
    recipe = root / "tiny.toml"
    recipe.write_text(TINY_RECIPE)
    ns = SimpleNamespace(root=root, ixi=ixi, openneuro=openneuro, recipe=recipe,
                         cv=root / "cv", lodo=root / "lodo", run=root / "run",
                         manifest=root / "manifest")
    ns.cv_result = runner.invoke(app, [
        "crossval", str(ixi), str(openneuro), "--recipe", str(recipe), "--k", "2",
        "--train-groups", "control", "--out", str(ns.cv)])
    assert ns.cv_result.exit_code == 0, ns.cv_result.output
    ns.lodo_result = runner.invoke(app, [
        "crossval", str(ixi), str(openneuro), "--recipe", str(recipe),
        "--leave-one-dataset-out", "--out", str(ns.lodo)])
    assert ns.lodo_result.exit_code == 0, ns.lodo_result.output
    trained = runner.invoke(app, ["train", str(ns.cv / "data.tsv"), "--recipe", str(recipe),
                                  "--out", str(ns.run)])
    assert trained.exit_code == 0, trained.output
    ns.ship = _load_ship_weights()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert ns.ship.main([str(ns.run), str(ns.cv), "--lodo", str(ns.lodo),
                             "--id", "bagnet3d-rf9-tiny-v2", "--manifest-dir",
                             str(ns.manifest)]) == 0
    ns.ship_stderr = err.getvalue()
    return ns


def _predictions(folder: Path) -> list[dict[str, str]]:
    return _read(folder / "predictions.tsv")


def _train_images(ns: SimpleNamespace, fold: int, groups: set[str] | None) -> list[ImageRecord]:
    records = discover_all([ns.ixi, ns.openneuro]).records
    folds = read_folds(ns.cv / "folds.tsv" if groups is not None else ns.lodo / "folds.tsv")
    return [r for r in records if folds[r.group] != fold
            and (groups is None or r.cohort is None or r.cohort in groups)]


def test_make_folds_stratifies_by_dataset_site_and_group(tmp_path: Path) -> None:
    records = []
    for i in range(30):
        dataset, site = ("ixi", "HH" if i < 12 else "Guys") if i < 18 else ("on", "ds002748")
        cohort = None if dataset == "ixi" else ("control" if i % 2 else "depression")
        records.append(ImageRecord(f"S{i:02d}", tmp_path / f"{i}.nii.gz", age=20.0 + i,
                                   dataset=dataset, site=site, cohort=cohort))
    records.append(ImageRecord("S05", tmp_path / "5b.nii.gz", age=25.0, dataset="ixi",
                               site="HH"))  # a second image of S05
    rows = make_folds(records, 3, seed=0)
    assert rows == make_folds(records, 3, seed=0) and rows != make_folds(records, 3, seed=1)
    assert len(rows) == 30  # one row per subject: both images of S05 share its fold
    by_stratum: dict[str, list[int]] = {}
    for r in rows:
        by_stratum.setdefault(r["stratum"], []).append(r["fold"])
    assert sorted(by_stratum) == ["ixi/Guys", "ixi/HH", "on/ds002748/control",
                                  "on/ds002748/depression"]
    for folds in by_stratum.values():  # every stratum dealt evenly over the 3 folds
        counts = [folds.count(f) for f in range(3)]
        assert max(counts) - min(counts) <= 1, (by_stratum, counts)
    sizes = [sum(r["fold"] == f for r in rows) for f in range(3)]
    assert sizes == [10, 10, 10]


def test_several_tables_are_pooled_each_image_keeping_its_origin(pipeline: SimpleNamespace
                                                                 ) -> None:
    pooled = discover(pipeline.cv / "data.tsv").records
    assert len(pooled) == 15  # 9 IXI images (8 subjects) + 6 OpenNeuro
    assert {(r.dataset, r.site) for r in pooled} == {("ixi", "HH"), ("ixi", "Guys"),
                                                      ("openneuro", "ds002748")}
    assert {r.cohort for r in pooled} == {None, "control", "depression"}
    rows = _predictions(pipeline.cv)
    assert len(rows) == 15  # every image predicted once
    two = [r for r in rows if r["participant_id"] == "IXI000-HH-1000"]
    assert len(two) == 2 and two[0]["fold"] == two[1]["fold"]
    assert {"dataset", "site", "group", "site_mean_age", "morph_age", "morph_p_female"} <= set(
        rows[0])


def test_patients_are_predicted_but_never_trained_on(pipeline: SimpleNamespace) -> None:
    folds = read_folds(pipeline.cv / "folds.tsv")
    for fold in (0, 1):
        splits = _read(pipeline.cv / f"fold-{fold}" / "run" / "splits.tsv")
        trained = {r["participant_id"] for r in splits if r["split"] == "train"}
        assert trained and not any(r["group"] == "depression" for r in splits
                                   if r["split"] == "train")
        # the controls and IXI subjects of the other fold are trained on
        assert trained == {r["participant_id"] for r in splits
                           if folds[r["participant_id"]] != fold and r["group"] != "depression"}
    patients = [r for r in _predictions(pipeline.cv) if r["group"] == "depression"]
    assert len(patients) == 3
    metrics = json.loads((pipeline.cv / "metrics.json").read_text())
    assert metrics["train_groups"] == ["control"]
    groups = metrics["datasets"]["openneuro"]["groups"]
    assert groups == {"control": {"subjects": 3, "trained_on": True},
                      "depression": {"subjects": 3, "trained_on": False}}
    assert "trained on the groups control" in pipeline.cv_result.stdout


def test_baselines_are_fitted_on_the_training_folds_only(pipeline: SimpleNamespace) -> None:
    """Both baselines, recomputed independently for every held-out image."""
    for row in _predictions(pipeline.cv):
        train = _train_images(pipeline, int(row["fold"]), {"control"})
        same_site = [r for r in train if r.dataset == row["dataset"] and r.site == row["site"]]
        assert float(row["site_mean_age"]) == pytest.approx(
            np.mean([r.age for r in same_site]), abs=1e-3)
        assert float(row["site_mean_p_female"]) == pytest.approx(
            np.mean([r.sex == "F" for r in same_site]), abs=1e-3)
        x = np.stack([record_features(r, 1.0) for r in train])
        target = record_features(ImageRecord(row["participant_id"], Path(row["t1w"])), 1.0)
        ridge = fit_ridge(x, [r.age for r in train]).predict(target)[0]
        logistic = fit_logistic(x, [r.sex == "F" for r in train]).predict(target)[0]
        assert float(row["morph_age"]) == pytest.approx(ridge, abs=1e-3)
        assert float(row["morph_p_female"]) == pytest.approx(logistic, abs=1e-3)


def test_figures_per_dataset_site_and_group_next_to_both_baselines(pipeline: SimpleNamespace
                                                                   ) -> None:
    metrics = json.loads((pipeline.cv / "metrics.json").read_text())
    assert set(metrics["by_dataset"]) == {"ixi", "openneuro"}
    assert set(metrics["by_site"]) == {"ixi/HH", "ixi/Guys", "openneuro/ds002748"}
    assert set(metrics["by_group"]) == {"openneuro/control", "openneuro/depression"}
    hh = [r for r in _predictions(pipeline.cv) if r["site"] == "HH"]
    s = metrics["by_site"]["ixi/HH"]
    assert s["n"] == len(hh) == 6
    assert s["site_mean"]["age"]["mae"] == pytest.approx(
        np.mean([abs(float(r["age"]) - float(r["site_mean_age"])) for r in hh]), abs=1e-3)
    assert s["morphometric"]["age"]["mae"] == pytest.approx(
        np.mean([abs(float(r["age"]) - float(r["morph_age"])) for r in hh]), abs=1e-3)
    assert s["mae_ratio"]["morphometric"] == pytest.approx(
        s["model"]["age"]["mae"] / s["morphometric"]["age"]["mae"])
    table = (pipeline.cv / "table.tsv").read_text().splitlines()
    assert table[0].split("\t")[:5] == ["subset", "n", "age_mae", "site_mean_mae", "morph_mae"]
    assert [line.split("\t")[0] for line in table[1:]] == [
        "all", "ixi", "openneuro", "ixi/Guys", "ixi/HH", "openneuro/control",
        "openneuro/depression"]
    out = pipeline.cv_result.stdout
    assert "site mean" in out and "morph." in out and "│ openneuro/depression │" in out
    assert "data: ixi + openneuro (table)" in out  # the pooled table trains under its names
    curve = (pipeline.cv / "learning_curve.tsv").read_text().splitlines()
    assert curve[0].split("\t")[4:6] == ["site_mean_age_mae", "morph_age_mae"]


def test_leave_one_dataset_out_tests_each_dataset_on_a_model_that_never_saw_it(
        pipeline: SimpleNamespace) -> None:
    metrics = json.loads((pipeline.lodo / "metrics.json").read_text())
    assert metrics["scheme"] == "leave-one-dataset-out"
    assert metrics["held_out_datasets"] == ["ixi", "openneuro"]
    assert [f["held_out"] for f in metrics["by_fold"]] == [["ixi"], ["openneuro"]]
    for row in _predictions(pipeline.lodo):
        fold = int(row["fold"])
        assert row["dataset"] == ["ixi", "openneuro"][fold]
        train = _train_images(pipeline, fold, None)
        assert {r.dataset for r in train} == {["openneuro", "ixi"][fold]}
        # its site was never trained on: the site-mean baseline is the training mean
        assert float(row["site_mean_age"]) == pytest.approx(
            np.mean([r.age for r in train]), abs=1e-3)
        split = _read(pipeline.lodo / f"fold-{fold}" / "run" / "splits.tsv")
        assert {r["dataset"] for r in split if r["split"] == "train"} == {
            ["openneuro", "ixi"][fold]}


def test_a_finished_crossval_resumes_every_fold_and_refuses_other_settings(
        pipeline: SimpleNamespace) -> None:
    config = TrainConfig(width=2, crop=[16, 16, 16], batch_size=4, epochs=1, device="cpu",
                         workers=1, val_fraction=0.0, test_fraction=0.0)
    seen: list[bool] = []

    def train(c: TrainConfig, resume: bool) -> None:
        seen.append(resume)

    before = _predictions(pipeline.cv)
    again = run_crossval([pipeline.ixi, pipeline.openneuro], None, config, pipeline.cv,
                         train=train, train_groups=["control"])
    assert seen == [True, True]
    assert [r["predicted_age"] for r in again.rows] == pytest.approx(
        [float(r["predicted_age"]) for r in before], abs=1e-3)
    with pytest.raises(UsageError, match="trained on another split"):
        run_crossval([pipeline.ixi, pipeline.openneuro], None, config, pipeline.cv,
                     train=train)  # every group this time: not the folds' runs


def test_unknown_groups_colliding_ids_and_lone_datasets_are_refused(
        pipeline: SimpleNamespace, tmp_path: Path) -> None:
    args = ["crossval", str(pipeline.ixi), str(pipeline.openneuro), "--recipe",
            str(pipeline.recipe), "--out", str(tmp_path / "x")]
    bad = runner.invoke(app, [*args, "--train-groups", "controls"])
    assert bad.exit_code == 2 and "no such group" in bad.output and "control, depression" in (
        bad.output)
    both = runner.invoke(app, [*args, "--leave-one-dataset-out", "--folds", "f.tsv"])
    assert both.exit_code == 2 and "exclude each other" in both.output
    lone = runner.invoke(app, ["crossval", str(pipeline.ixi), "--recipe", str(pipeline.recipe),
                               "--leave-one-dataset-out", "--out", str(tmp_path / "y")])
    assert lone.exit_code == 2 and "at least 2 data sets" in lone.output
    copy = tmp_path / "again" / "ixi"
    shutil.copytree(pipeline.ixi.parent, copy)
    with pytest.raises(InputError, match="are both data set 'ixi'"):
        discover_all([pipeline.ixi, copy / "participants.tsv"])
    renamed = tmp_path / "other"
    shutil.copytree(pipeline.ixi.parent, renamed)
    with pytest.raises(InputError, match="IXI000-HH-1000 is in both"):
        discover_all([pipeline.ixi, renamed / "participants.tsv"])


def test_shipped_weights_say_what_they_are(pipeline: SimpleNamespace) -> None:
    """Item 4 of issue 25: the model card and manifest entry name every data set with licence
    and citation, subjects, patients, sites, ages, the figures per site and pooled, both
    baselines, and leave-one-dataset-out with its sentence about a site never seen."""
    entry = next(e for e in read_manifest(pipeline.manifest / "manifest.json")
                 if e.id == "bagnet3d-rf9-tiny-v2")
    assert entry.default and entry.bundled_path is not None and entry.bundled_path.is_file()
    names = [d["name"] for d in entry.training["datasets"]]
    assert names == ["ixi", "openneuro"]
    ixi, openneuro = entry.training["datasets"]
    assert ixi["licence"] == "CC BY-SA 3.0" and "Hajnal" in ixi["citation"]
    assert openneuro["licence"] == "CC0" and "10.1155/2021/8846097" in openneuro["citation"]
    assert "10.18112/openneuro.ds002748.v1.0.5" in openneuro["citation"]
    assert openneuro["groups"] == {"control": 3, "depression": 3} and openneuro["patients"] == 3
    assert ixi["sites"] == {"Guys": 3, "HH": 5} and ixi["subjects"] == 8
    assert entry.licence.startswith("CC BY-SA 3.0")
    sets = {(m["dataset"], m["split"].split(" (")[0]) for m in entry.metrics}
    assert {("all", "cross-validation"), ("ixi/HH", "cross-validation"),
            ("openneuro/depression", "cross-validation"),
            ("openneuro", "leave-one-dataset-out")} <= sets
    mae = next(m for m in entry.metrics if m["name"] == "age_mae_years"
               and m["dataset"] == "ixi/HH")
    assert set(mae["baselines"]) == {"site_mean", "morphometric"}

    meta = load_weights(entry.bundled_path).meta
    assert meta.training["crossval"]["by_site"]["ixi/HH"]["n"] == 6
    assert set(meta.training["lodo"]["by_dataset"]) == {"ixi", "openneuro"}
    card = (pipeline.manifest / "bagnet3d-rf9-tiny-v2.md").read_text()
    for text in ("**IXI**", "CC BY-SA 3.0", "Hajnal", "**OpenNeuro ds002748**", "CC0",
                 "doi:10.1155/2021/8846097", "Patients were in the training data",
                 "3 depression", "HH (5)", "| ixi/HH |", "| openneuro/depression |",
                 "site-mean MAE", "morph. MAE", "leave-one-dataset-out", "never saw"):
        assert text in card, text
    assert "ixi-open-v1" not in card and "57 subjects" not in card  # no recipe text
    # the final run trained on the patients too, the cross-validation on controls only
    assert "the cross-validation on ['control'] only" in pipeline.ship_stderr


def test_the_card_says_when_the_model_is_worse_than_the_training_mean_on_an_unseen_site(
        ) -> None:
    def summary(model: float, mean: float) -> dict[str, Any]:
        return {"n": 5, "model": {"age": {"mae": model}}, "site_mean": {"age": {"mae": mean}},
                "morphometric": {"age": {"mae": 9.0}}}

    text = unseen_site_text({"by_dataset": {"a": summary(12.0, 10.0),
                                            "b": summary(6.0, 10.0)}})
    worse, better = text.splitlines()
    assert "**Worse than the training mean on a, a site it never saw**" in worse
    assert "12.00 y against 10.00 y" in worse
    assert "On b, never seen in training" in better and "0.60x" in better
    assert "Not measured on a site left out" in unseen_site_text(None)
