"""The predict pipeline: load, conform, infer, write; one settings object, one call.

For each input: read the file, run the checks (:mod:`brainbag.checks`; a failed check stops the
input unless ``force``), apply the requested fixes (N4), conform it (mask, RAS+, 1 mm, whitening),
run the network (full volume or sliding windows), turn the head outputs into years and
P(female), and write the subject's folder (``prediction.json``, ``age_map.nii.gz``,
``sex_map.nii.gz``) by staging it in a hidden folder and renaming it into place.
``predictions.tsv`` in the output folder gets one row per input (rows for other inputs already
there are kept).
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from brainbag import __version__
from brainbag.checks import CheckOptions, run_checks
from brainbag.errors import BrainbagError, InputError, ProcessingError, UsageError
from brainbag.inference import (
    InferenceSettings,
    MapResult,
    predict_maps,
    resolve_device,
    resolve_precision,
)
from brainbag.io import (
    Image,
    LoadedImage,
    axis_codes,
    load_image,
    make_nifti,
    map_transform,
    resample,
    subject_name,
)
from brainbag.outputs import (
    TSV_COLUMNS,
    brain_cells,
    default_mode,
    display_range,
    save_nifti_atomic,
    write_json_atomic,
    write_tsv_atomic,
)
from brainbag.preprocess import Conformed, conform, load_mask
from brainbag.weights import LoadedWeights, open_weights

MapSpace = Literal["model", "input"]
TSV_NAME = "predictions.tsv"


@dataclass(frozen=True)
class PredictSettings:
    """Everything ``brainbag predict`` was asked to do, resolved."""

    out: Path
    rf: int | None = None
    weights: str | None = None
    mask: Path | None = None
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    resample: bool = True
    map_space: MapSpace = "model"
    manifests: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    offline: bool = False
    force: bool = False
    n4: bool = False
    save_conformed: bool = False

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out"] = str(self.out)
        d["mask"] = str(self.mask) if self.mask else None
        d["manifests"] = [str(m) for m in self.manifests]
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        d["inference"]["window"] = list(self.inference.window)
        return d


class WeightsProvider:
    """Resolves and loads the weights once, the first time a model is needed."""

    def __init__(
        self, settings: PredictSettings, loaded: LoadedWeights | None = None
    ) -> None:
        self.settings = settings
        self._loaded = loaded
        self.seconds = 0.0

    def get(self) -> LoadedWeights:
        if self._loaded is None:
            from brainbag.hub import HubSettings

            t0 = time.perf_counter()
            s = self.settings
            hub = HubSettings.from_env(cache_dir=s.cache_dir, offline=s.offline)
            self._loaded = open_weights(s.weights, s.rf, s.manifests, hub)
            self.seconds = time.perf_counter() - t0
        return self._loaded


@dataclass
class HeadMaps:
    """Head outputs in user units, on the map grid."""

    age: np.ndarray | None
    sex_logit: np.ndarray | None
    age_global: float | None
    p_female: float | None


def interpret(result: MapResult, weights: LoadedWeights) -> HeadMaps:
    """Raw outputs -> years and P(female). Global values are means over all map voxels."""
    index = weights.model.head_index
    means = result.global_outputs()
    age = sex = None
    age_global = p_female = None
    if "age" in index:
        scale = weights.meta.age_scaling or {"mean": 0.0, "std": 1.0}
        age = result.maps[index["age"]] * np.float32(scale["std"]) + np.float32(scale["mean"])
        age_global = float(means[index["age"]] * scale["std"] + scale["mean"])
    if "sex" in index:
        sex = result.maps[index["sex"]]
        p_female = float(1.0 / (1.0 + np.exp(-means[index["sex"]])))
    return HeadMaps(age=age, sex_logit=sex, age_global=age_global, p_female=p_female)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def map_to_input_grid(
    values: np.ndarray, map_to_input_index: np.ndarray, loaded: LoadedImage, input_mask: np.ndarray
) -> np.ndarray:
    """Resample a map (NaN outside the brain) onto the input file's own grid.

    Linear interpolation of the finite values, normalised by the interpolated weight of finite
    cells, so NaN cells do not bleed into the brain; NaN outside the input's brain mask.
    """
    to_map = np.linalg.inv(map_to_input_index)
    valid = np.isfinite(values)
    filled = np.where(valid, values, 0.0).astype(np.float32)
    num = resample(filled, to_map, loaded.shape, "linear", extrapolate=True)
    den = resample(valid.astype(np.float32), to_map, loaded.shape, "linear", extrapolate=True)
    out = np.full(loaded.shape, np.nan, dtype=np.float32)
    ok = (den > 1e-3) & input_mask
    out[ok] = num[ok] / den[ok]
    return out


class Predictor:
    """Runs the pipeline for one input at a time with shared settings and weights."""

    def __init__(self, settings: PredictSettings, weights: LoadedWeights | None = None) -> None:
        """``weights`` overrides ``settings.weights`` with an already loaded model."""
        self.settings = settings
        settings.inference.validate()
        self.device = resolve_device(settings.inference.device)
        self.precision, self.precision_warning = resolve_precision(
            settings.inference.precision, self.device
        )
        self.weights = WeightsProvider(settings, weights)

    def predict(self, path: Path, mask_path: Path | None = None) -> dict[str, Any]:
        """Predict one input and write its outputs; returns the prediction record."""
        t_start = time.perf_counter()
        timings: dict[str, float] = {}
        warnings: list[str] = []

        t0 = time.perf_counter()
        loaded = load_image(path)
        mask_path = mask_path or self.settings.mask
        mask = load_mask(mask_path, loaded) if mask_path is not None else None
        timings["load"] = time.perf_counter() - t0

        loaded, checked = self._check_and_fix(loaded, mask, mask_path, warnings, timings)

        t0 = time.perf_counter()
        conformed = conform(loaded, mask, allow_resample=self.settings.resample)
        warnings += conformed.warnings
        if conformed.resampled:
            checked["fixes"].append(_resample_fix(loaded, conformed))
        timings["preprocess"] = time.perf_counter() - t0

        weights = self.weights.get()
        if not weights.meta.trained:
            warnings.append(
                f"weights {weights.id} are UNTRAINED (random initialisation): "
                "the numbers below mean nothing"
            )
        if self.precision_warning:
            warnings.append(self.precision_warning)

        t0 = time.perf_counter()
        inference = InferenceSettings(**{**asdict(self.settings.inference),
                                         "precision": self.precision})
        result = predict_maps(weights.model, conformed.image.data, conformed.background, inference)
        heads = interpret(result, weights)
        timings["inference"] = time.perf_counter() - t0

        record = self._write(
            loaded, mask_path, mask, conformed, result, heads, weights, warnings, timings, t_start,
            checked,
        )
        return record

    def _check_and_fix(
        self, loaded: LoadedImage, mask: np.ndarray | None, mask_path: Path | None,
        warnings: list[str], timings: dict[str, float],
    ) -> tuple[LoadedImage, dict[str, Any]]:
        """Run the checks on the loaded input: refuse on a failure (unless ``force``), record
        warnings, apply N4 (``n4``). Returns the image to conform and the record of both."""
        from brainbag.fixes import n4_correct

        options = CheckOptions(mask=mask_path, resample=self.settings.resample,
                               mode=self.settings.inference.mode, n4=self.settings.n4)
        report = run_checks(loaded.path, options, loaded=loaded, mask=mask)
        if report.failures and not self.settings.force:
            raise InputError(report.failure_message())
        warnings += [f"--force: predicting although check {r.message()}" for r in report.failures]
        # conform's own warning records the resampling it does
        warnings += [r.message() for r in report.warnings if r.name != "voxel_size"]
        fixes: list[dict[str, Any]] = []
        checks_seconds = report.seconds
        if self.settings.n4:
            n4 = report.n4
            if n4 is None:  # the bias check could not run (no usable brain mask)
                brain = mask if mask is not None else loaded.image.data > 0
                n4 = n4_correct(loaded.image.data, brain, loaded.zooms)
            else:
                checks_seconds -= n4.seconds
            loaded = replace(loaded, image=Image(n4.data, loaded.image.affine))
            fixes.append(n4.to_dict())
            timings["n4"] = n4.seconds
        timings["checks"] = checks_seconds
        record = {
            "checks": {
                "results": [r.to_dict() for r in report.results],
                "failed": [r.name for r in report.failures],
                "forced": bool(report.failures),
            },
            "fixes": fixes,
        }
        return loaded, record

    def _write(
        self,
        loaded: LoadedImage,
        mask_path: Path | None,
        input_mask: np.ndarray | None,
        conformed: Conformed,
        result: MapResult,
        heads: HeadMaps,
        weights: LoadedWeights,
        warnings: list[str],
        timings: dict[str, float],
        t_start: float,
        checked: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        t_write = time.perf_counter()
        subject = subject_name(loaded.path)
        out_root = self.settings.out
        map_to_conformed = map_transform(result.stride, (0, 0, 0), result.offset)
        map_to_input = conformed.to_input @ map_to_conformed
        map_affine = loaded.image.affine @ map_to_input
        cells = brain_cells(conformed.mask, result.stride, result.offset, result.maps.shape[1:])
        if not cells.any():
            raise ProcessingError(f"{loaded.path}: no map voxel covers the brain mask")
        brain_in_input = (loaded.image.data > 0) if input_mask is None else input_mask

        maps: dict[str, tuple[np.ndarray, str, str]] = {}
        if heads.age is not None:
            maps["age_map"] = (heads.age, "age", "brainbag local predicted age (years)")
        if heads.sex_logit is not None:
            maps["sex_map"] = (_sigmoid(heads.sex_logit), "sex", "brainbag local P(female)")

        record: dict[str, Any] = {
            "subject": subject,
            "session": None,
            "status": "ok",
            "age": heads.age_global,
            "p_female": heads.p_female,
            "rf": weights.meta.rf,
            "mode": self.settings.inference.mode,
            "device": result.device,
            "precision": result.precision,
            "weights": {
                "id": weights.id,
                "sha256": weights.sha256,
                "path": str(weights.path),
                "trained": weights.meta.trained,
                **weights.origin,
            },
            "brainbag_version": __version__,
            "input": {
                "path": str(loaded.path.resolve()),
                "sha256": loaded.sha256,
                "shape": list(loaded.shape),
                "voxel_mm": [round(z, 6) for z in loaded.zooms],
                "dtype": loaded.dtype,
                "orientation": axis_codes(loaded.image.affine),
                "affine": loaded.image.affine.tolist(),
            },
            "mask": {
                "path": str(Path(mask_path).resolve()) if mask_path else None,
                "source": "file" if mask_path else "voxels > 0 (input assumed skull-stripped)",
            },
            "conformed": {
                "shape": list(conformed.image.shape),
                "voxel_mm": [round(z, 6) for z in conformed.image.zooms],
                "orientation": axis_codes(conformed.image.affine),
                "resampled": conformed.resampled,
                "affine": conformed.image.affine.tolist(),
            },
            "whitening": {**conformed.whitening.to_dict(), "background": conformed.background},
            "map": {
                "space": self.settings.map_space,
                "shape": list(result.maps.shape[1:]),
                "stride_voxels": result.stride,
                "offset_voxels": result.offset,
                "affine": map_affine.tolist(),
                "windows": len(result.windows),
                "brain_cells": int(cells.sum()),
                "outside_brain": "NaN",
                "global_is_mean_over": "all map voxels (network output); see *_brain_cells",
            },
            "outputs": {},
            **(checked or {}),
            "warnings": warnings,
            "settings": self.settings.to_dict(),
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        if heads.age is not None:
            record["map"]["age_mean_brain_cells"] = float(heads.age[cells].mean())
        if heads.sex_logit is not None:
            record["map"]["p_female_brain_cells"] = float(
                1 / (1 + np.exp(-heads.sex_logit[cells].astype(np.float64).mean()))
            )

        out_root.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{subject}.partial-", dir=out_root))
        os.chmod(stage, default_mode(directory=True))
        try:
            for name, (values, kind, description) in maps.items():
                values = np.where(cells, values, np.nan).astype(np.float32)
                cal = display_range(values[cells], kind)
                if self.settings.map_space == "input":
                    values = map_to_input_grid(values, map_to_input, loaded, brain_in_input)
                    affine = loaded.image.affine
                else:
                    affine = map_affine
                img = make_nifti(values, affine, loaded.xform_code, cal, description)
                save_nifti_atomic(img, stage / f"{name}.nii.gz")
                record["outputs"][name] = f"{name}.nii.gz"
            if self.settings.save_conformed:
                img = make_nifti(conformed.image.data, conformed.image.affine, loaded.xform_code,
                                 description="brainbag conformed input (whitened)")
                save_nifti_atomic(img, stage / "conformed.nii.gz")
                record["outputs"]["conformed"] = "conformed.nii.gz"
            timings["write"] = time.perf_counter() - t_write
            timings["total"] = time.perf_counter() - t_start
            record["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            record["seconds"] = timings["total"]
            write_json_atomic(stage / "prediction.json", _json_record(record))
            _publish_dir(stage, out_root / subject)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        return record


def _resample_fix(loaded: LoadedImage, conformed: Conformed) -> dict[str, Any]:
    return {
        "name": "resample",
        "description": "resampled to 1 mm isotropic (SimpleITK; linear for the image, nearest "
                       "for the mask) on a grid with the input's axis directions and centre",
        "from_voxel_mm": [round(z, 6) for z in loaded.zooms],
        "to_voxel_mm": [round(z, 6) for z in conformed.image.zooms],
        "from_shape": list(loaded.shape),
        "to_shape": list(conformed.image.shape),
    }


def _publish_dir(stage: Path, final: Path) -> None:
    """Move a fully written folder into place, replacing any previous one."""
    old: Path | None = None
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        final.replace(old / final.name)
    stage.replace(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _json_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("status", "seconds")}


def tsv_record(record: dict[str, Any]) -> dict[str, Any]:
    """The predictions.tsv fields of a prediction record."""
    weights = record.get("weights") or {}
    inp = record.get("input") or {}
    return {
        "subject": record.get("subject"),
        "session": record.get("session"),
        "path": inp.get("path", record.get("path")),
        "input_sha256": inp.get("sha256", record.get("input_sha256")),
        "status": record.get("status", "ok"),
        "age": record.get("age"),
        "p_female": record.get("p_female"),
        "rf": record.get("rf"),
        "weights_id": weights.get("id"),
        "weights_sha256": weights.get("sha256"),
        "mode": record.get("mode"),
        "warnings": record.get("warnings", []),
        "error": record.get("error"),
        "seconds": record.get("seconds"),
    }


def update_tsv(out: Path, records: Iterable[dict[str, Any]]) -> Path:
    """Write ``predictions.tsv``: rows of this run replace rows with the same path."""
    path = out / TSV_NAME
    new = [tsv_record(r) for r in records]
    paths = {str(r["path"]) for r in new}
    kept: list[dict[str, Any]] = []
    if path.exists():
        with open(path, newline="", encoding="utf-8") as fh:
            for row in csv.DictReader(fh, delimiter="\t"):
                if row.get("path") not in paths and set(row) >= set(TSV_COLUMNS):
                    kept.append(row)
    write_tsv_atomic(path, kept + new)
    return path


def run_predict(
    inputs: list[Path],
    settings: PredictSettings,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    keep_going: bool | None = None,
) -> list[dict[str, Any]]:
    """Predict every input; with ``keep_going`` (the default for several inputs) an input that
    fails is recorded as a failed row and the others still run. With one input, its error is
    raised and nothing is written.

    Errors that concern the whole run (no weights, bad options) always stop it.
    """
    if keep_going is None:
        keep_going = len(inputs) > 1
    subjects: dict[str, Path] = {}
    for path in inputs:
        name = subject_name(path)
        if name in subjects and subjects[name] != path:
            raise UsageError(
                f"{path} and {subjects[name]} both map to output folder {name!r}; "
                "rename one or predict them into different --out folders"
            )
        subjects[name] = path
    predictor = Predictor(settings)
    records: list[dict[str, Any]] = []
    try:
        for path in inputs:
            t0 = time.perf_counter()
            try:
                record = predictor.predict(Path(path))
            except (InputError, ProcessingError) as exc:
                if not keep_going:
                    raise
                record = {
                    "subject": subject_name(path),
                    "path": str(Path(path).resolve()),
                    "status": "failed",
                    "error": str(exc),
                    "seconds": time.perf_counter() - t0,
                    "rf": settings.rf,
                    "mode": settings.inference.mode,
                }
            records.append(record)
            if on_result is not None:
                on_result(record)
    finally:
        if records:
            update_tsv(settings.out, records)
    return records


__all__ = ["BrainbagError", "PredictSettings", "Predictor", "run_predict"]
