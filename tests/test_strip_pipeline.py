"""Built-in skull stripping through the pipelines (issue 24): a raw head predicts end to end with
deepbet's mask, an implausible mask fails its input alone, ``--strip never`` refuses as before,
and train, evaluate and crossval mask the same scans the same way and say so.

The real networks (deepbet's and the shipped 2 mm weights) on the shared raw scans; the tests
skip when deepbet or the shared data is missing."""

from __future__ import annotations

import csv
import json
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import sample, shared
from typer.testing import CliRunner

import brainbag.image.masks as masks
from brainbag.cli import app
from brainbag.image.io import load_image
from brainbag.image.strip import INSTALL_HINT
from brainbag.train.config import TrainConfig
from brainbag.train.crossval import run_crossval
from brainbag.train.record import QuietReporter
from brainbag.train.trainer import run_training
from brainbag.weights.file import load_weights

runner = CliRunner()
needs_deepbet = pytest.mark.skipif(
    find_spec("deepbet") is None,
    reason=f"deepbet is not installed ({INSTALL_HINT} to run the real networks)")


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    return (affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0))[:3]


def _predict(*args: str) -> object:
    return runner.invoke(app, ["predict", *args], env={"COLUMNS": "200"})


# --- predict -----------------------------------------------------------------------------------


@needs_deepbet
def test_a_raw_head_predicts_end_to_end_with_its_stripped_mask(tmp_path: Path) -> None:
    scan = sample("rorden_t1_mprage.nii.gz")
    out = tmp_path / "out"
    result = _predict(str(scan), "--out", str(out), "--png")
    assert result.exit_code == 0, result.output
    assert "skull" not in result.output  # no warning, no refusal about the skull
    folder = out / "rorden_t1_mprage"
    saved = json.loads((folder / "prediction.json").read_text())
    assert 18 < saved["age"] < 95
    strip = saved["strip"]
    assert strip["method"] == "deepbet" and strip["version"] == "1.0.2"
    assert strip["threshold"] == 0.5 and strip["n_components"] == 1
    assert 1000 <= strip["volume_ml"] <= 1900 and strip["seconds"] > 0
    assert saved["timings_s"]["strip"] >= strip["seconds"]
    assert saved["mask"]["source"] == "skull stripping (deepbet)"
    assert saved["outputs"]["brain_mask"] == "brain_mask.nii.gz"
    assert not any("skull" in w for w in saved["warnings"])
    skull = next(c for c in saved["checks"]["results"] if c["name"] == "skull_stripped")
    assert skull["status"] == "pass"
    assert skull["found"] == "skull on: head object 5.00 L; stripped (deepbet 1.0.2)"
    # the mask: uint8, 0/1, on the input's grid with the input's own qform and sform
    written = nib.load(folder / "brain_mask.nii.gz")
    given = nib.load(scan)
    assert written.get_data_dtype() == np.uint8 and written.shape == given.shape
    np.testing.assert_allclose(written.affine, given.affine, atol=1e-5)
    for form in ("qform", "sform"):
        assert int(written.header[f"{form}_code"]) == int(given.header[f"{form}_code"])
    np.testing.assert_allclose(written.header.get_qform(), given.header.get_qform(), atol=1e-5)
    np.testing.assert_allclose(written.header.get_sform(), given.header.get_sform(), atol=1e-5)
    mask = np.asarray(written.dataobj)
    assert set(np.unique(mask)) == {0, 1}
    assert mask.sum() * np.prod(given.header.get_zooms()[:3]) / 1000 == pytest.approx(
        strip["volume_ml"], abs=0.1)
    # the brain sits inside the head, in the world: its centroid is on tissue, enclosed by head
    # along every axis, and the mask lies on tissue, clear of the scan's faces
    data = np.asarray(given.dataobj, dtype=np.float32)
    head = data > 0.05 * np.percentile(data, 99)
    centre = _world_centroid(mask > 0, given.affine)
    ijk = np.round(np.linalg.solve(given.affine, np.append(centre, 1.0))[:3]).astype(int)
    assert head[tuple(ijk)]
    for axis in range(3):
        line = head[tuple(slice(None) if a == axis else int(ijk[a]) for a in range(3))]
        assert line[: ijk[axis]].any() and line[ijk[axis] + 1:].any()
    assert (head & (mask > 0)).sum() > 0.98 * mask.sum()
    assert (folder / "age_map.png").is_file()


@needs_deepbet
def test_the_stripped_mask_of_a_reoriented_head_lies_on_the_scans_brain(tmp_path: Path) -> None:
    """Colin27 with its skull (ch2) stored with permuted and flipped axes: the mask predict writes
    on that grid covers, in the world, the brain of the independent skull-stripped copy on the
    original grid (ch2bet: FSL BET, voxels > 0)."""
    head_img = nib.load(sample("ch2.nii.gz"))
    truth_img = nib.load(sample("ch2bet.nii.gz"))
    a = np.asarray(head_img.dataobj, dtype=np.float32)
    n0, n1, n2 = a.shape
    # B[i, j, k] = A[j, n1 - 1 - k, n2 - 1 - i]; the affine keeps every voxel where it was
    b = np.ascontiguousarray(np.flip(a.transpose(2, 0, 1), axis=(0, 2)))
    to_a = np.array([[0, 1, 0, 0], [0, 0, -1, n1 - 1], [-1, 0, 0, n2 - 1], [0, 0, 0, 1]], float)
    moved = tmp_path / "ch2_moved.nii.gz"
    nib.save(nib.Nifti1Image(b, head_img.affine @ to_a), moved)
    out = tmp_path / "out"
    result = _predict(str(moved), "--out", str(out), "--no-png")
    assert result.exit_code == 0, result.output
    written = nib.load(out / "ch2_moved" / "brain_mask.nii.gz")
    np.testing.assert_allclose(written.affine, head_img.affine @ to_a, atol=1e-5)
    mask = np.asarray(written.dataobj) > 0
    assert mask.shape == b.shape
    truth = np.asarray(truth_img.dataobj) > 0
    gap = _world_centroid(mask, written.affine) - _world_centroid(truth, truth_img.affine)
    assert np.linalg.norm(gap) < 3.0, gap  # mm
    # voxel for voxel, through the world: Dice against BET's brain
    idx = np.argwhere(mask).T
    to_truth = np.linalg.solve(truth_img.affine, written.affine)
    back = np.round(to_truth[:3, :3] @ idx + to_truth[:3, 3:]).astype(int)
    overlap = truth[back[0], back[1], back[2]].sum()
    dice = 2 * overlap / (mask.sum() + truth.sum())
    assert dice > 0.9, dice


def _giant_head(tmp_path: Path) -> Path:
    """chris_t1 (a raw head, 0.88 mm) whose header claims voxels twice their size: still a head
    to the skull check, and deepbet finds the same voxels, eight times an adult brain."""
    img = nib.load(sample("chris_t1.nii.gz"))
    affine = img.affine.copy()
    affine[:3, :3] *= 2.0
    path = tmp_path / "giant_head.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj, dtype=np.float32), affine), path)
    return path


@needs_deepbet
def test_an_implausible_stripped_mask_fails_its_input_alone(tmp_path: Path) -> None:
    bad = _giant_head(tmp_path)
    out = tmp_path / "one"
    result = _predict(str(bad), "--out", str(out))
    assert result.exit_code == 1  # the exit code of a failed input
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    assert str(bad) in err and "skull stripping (deepbet)" in err
    assert " L; an adult brain is 0.8-2.2 L" in err and "--mask" in err
    assert not (out / "giant_head").exists()  # nothing written for it
    # in a batch, the other scans go on
    good = sample("ch2bet.nii.gz")
    out = tmp_path / "batch"
    result = _predict(str(bad), str(good), "--out", str(out), "--no-png")
    assert result.exit_code == 1
    with open(out / "predictions.tsv") as fh:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(fh, delimiter="\t")}
    assert rows["giant_head.nii.gz"]["status"] == "failed"
    assert "an adult brain is 0.8-2.2 L" in rows["giant_head.nii.gz"]["error"]
    assert rows["ch2bet.nii.gz"]["status"] == "ok"
    assert not (out / "giant_head").exists()
    saved = json.loads((out / "ch2bet" / "prediction.json").read_text())
    assert saved["strip"] is None and "brain_mask" not in saved["outputs"]
    assert "strip" not in saved["timings_s"]


def test_strip_never_keeps_the_refusal_of_a_raw_head(tmp_path: Path) -> None:
    scan = sample("rorden_t1_mprage.nii.gz")
    out = tmp_path / "out"
    result = _predict(str(scan), "--out", str(out), "--strip", "never")
    assert result.exit_code == 1
    # the very line brainbag gave before it could strip
    assert result.stderr.strip() == (
        f"error: {scan}: check skull_stripped: skull on: head object 5.00 L; expected "
        "skull-stripped (largest object <= 2.5 L, a brain), or --mask; strip the skull first "
        "(HD-BET, SynthStrip, FSL bet, ANTs antsBrainExtraction.sh) or pass --mask "
        "brain_mask.nii.gz (also failed: brain_mask); --force predicts anyway")
    assert not (out / "rorden_t1_mprage").exists()


def test_strip_mode_is_checked() -> None:
    result = _predict("x.nii.gz", "--strip", "sometimes")
    assert result.exit_code == 2 and "sometimes" in result.output


# --- the shared decision and the cache -----------------------------------------------------------


@needs_deepbet
def test_the_cache_gives_back_the_same_mask_and_ignores_another_image(tmp_path: Path) -> None:
    loaded = load_image(sample("ch2.nii.gz"))
    cache = masks.MaskCache(tmp_path / "cache")
    first = masks.choose_brain_mask(loaded, cache=cache, threads=1)
    assert first.source == "stripped" and not first.cached and first.label == "deepbet 1.0.2"
    again = masks.choose_brain_mask(loaded, cache=cache)
    assert again.cached and np.array_equal(again.mask, first.mask)
    assert again.strip is not None and first.strip is not None
    assert again.strip.volume_ml == pytest.approx(first.strip.volume_ml, abs=0.05)
    files = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert files == [f"{loaded.sha256}_deepbet-1.0.2-threshold-0.5.json",
                     f"{loaded.sha256}_deepbet-1.0.2-threshold-0.5.nii.gz"]
    stripped = load_image(sample("ch2bet.nii.gz"))
    assert cache.get(stripped) is None  # keyed by the image's own sha256
    assert masks.choose_brain_mask(stripped, cache=cache).source == "nonzero"
    never = masks.choose_brain_mask(loaded, mode="never")
    assert never.source == "nonzero" and never.mask is None


# --- train, evaluate, crossval ----------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_table(tmp_path_factory) -> Path:
    """Three real scans, one of each mask source: a head without a mask (stripped), a
    skull-stripped scan (voxels > 0) and a head with its mask file (given)."""
    folder = tmp_path_factory.mktemp("mixed")
    ixi_t1 = shared("ixi/2mm/IXI012-HH-1211_T1w.nii.gz")
    ixi_mask = shared("ixi/2mm/IXI012-HH-1211_mask.nii.gz")
    rows = [("head", sample("ch2.nii.gz"), "", 30, "M"),
            ("stripped", sample("ch2bet.nii.gz"), "", 40, "F"),
            ("masked", ixi_t1, ixi_mask, 50, "M")]
    table = folder / "participants.tsv"
    table.write_text("participant_id\tage\tsex\tt1w\tmask\n" + "".join(
        f"{pid}\t{age}\t{sex}\t{t1}\t{mask}\n" for pid, t1, mask, age, sex in rows))
    return table


def _tiny(table: Path, out: Path, **kw: object) -> TrainConfig:
    values: dict = dict(data=str(table), out=str(out), width=2, crop=[16, 16, 16], batch_size=3,
                        epochs=1, device="cpu", workers=1, val_fraction=0.0, test_fraction=0.0,
                        voxel_mm=4.0)
    values.update(kw)
    return TrainConfig(**values)


@needs_deepbet
def test_train_and_evaluate_mask_like_predict_and_record_it(mixed_table: Path, tmp_path: Path,
                                                           monkeypatch) -> None:
    recipe = tmp_path / "tiny.toml"
    recipe.write_text('width = 2\ncrop = [16, 16, 16]\nbatch_size = 3\nepochs = 1\n'
                      'voxel_mm = 4.0\nworkers = 1\nval_fraction = 0.0\ntest_fraction = 0.0\n')
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(mixed_table), "--out", str(run), "--recipe",
                                 str(recipe), "--device", "cpu"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    line = "brain masks: 1 given, 1 stripped (deepbet 1.0.2), 1 voxels > 0"
    assert line in result.output
    meta = load_weights(run / "weights.safetensors").meta
    assert meta.preprocessing["brain_mask"] == "mixed: deepbet 1.0.2 1, given 1, nonzero 1"
    assert meta.preprocessing["brain_mask_counts"] == {"deepbet 1.0.2": 1, "given": 1,
                                                       "nonzero": 1}
    assert len(list((run / "brain_masks").glob("*.nii.gz"))) == 1
    # evaluate on the run's masks: the head is not stripped again
    calls: list[str] = []
    real = masks.strip_brain

    def counted(loaded, *args, **kwargs):  # the real networks, counted
        calls.append(loaded.path.name)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(masks, "strip_brain", counted)
    ev = tmp_path / "eval"
    result = runner.invoke(app, ["evaluate", str(mixed_table), "--weights",
                                 str(run / "weights.safetensors"), "--out", str(ev),
                                 "--mask-cache", str(run / "brain_masks"), "--no-plot"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert calls == []
    assert ("brain masks: 1 given, 1 stripped (deepbet 1.0.2; 1 from the cache), 1 voxels > 0"
            in result.output)
    metrics = json.loads(next(ev.glob("*/metrics.json")).read_text())
    assert metrics["brain_mask"] == meta.preprocessing["brain_mask"]
    with open(next(ev.glob("*/predictions.tsv"))) as fh:
        sources = {r["participant_id"]: r["brain_mask"] for r in csv.DictReader(fh,
                                                                               delimiter="\t")}
    assert sources == {"head": "deepbet 1.0.2", "stripped": "nonzero", "masked": "given"}
    checks = json.loads((ev / "checks.json").read_text())
    head = next(c for c in checks if c["participant_id"] == "head")
    skull = next(r for r in head["results"] if r["name"] == "skull_stripped")
    assert skull["status"] == "pass" and "stripped (deepbet 1.0.2)" in skull["found"]
    assert not head["forced"]


@needs_deepbet
def test_crossval_strips_each_head_once(mixed_table: Path, tmp_path: Path, monkeypatch) -> None:
    calls: list[str] = []
    real = masks.strip_brain

    def counted(loaded, *args, **kwargs):  # the real networks, counted
        calls.append(loaded.path.name)
        return real(loaded, *args, **kwargs)

    monkeypatch.setattr(masks, "strip_brain", counted)
    cv = tmp_path / "cv"
    result = run_crossval(mixed_table, tmp_path / "folds.tsv", _tiny(mixed_table, tmp_path),
                          cv, k=3, seed=0,
                          train=lambda c, resume: run_training(c, QuietReporter(), resume))
    # 3 folds: the head is in two training sets and one held-out set, stripped once
    assert calls == ["ch2.nii.gz"]
    assert result.metrics["brain_mask"] == "mixed: deepbet 1.0.2 1, given 1, nonzero 1"
    assert len(list((cv / "brain_masks").glob("*.nii.gz"))) == 1
    for fold in cv.glob("fold-*"):  # each fold's run loads its held-out fold too (validation)
        meta = load_weights(fold / "run" / "weights.safetensors").meta
        assert meta.preprocessing["brain_mask_counts"] == {"deepbet 1.0.2": 1, "given": 1,
                                                           "nonzero": 1}
        assert not (fold / "run" / "brain_masks").exists()
