"""One scan through the model: load, strip, check, fix, conform, infer, write.

:class:`Predictor` runs two stages per input: *prepare* (read the file, read its mask or make one
by skull stripping (:func:`brainbag.image.masks.choose_brain_mask`), run the checks of
:mod:`brainbag.image.checks` (a failed check stops the input unless ``force``), apply the
requested fixes (N4), conform: mask, RAS+, 1 mm, whitening), which is thread-safe and runs ahead
of time in worker threads during a batch, and *infer + write* (run the network over the full
volume or sliding windows, turn the head outputs into years and P(female), and write the input's
outputs: ``prediction.json``, ``age_map.nii.gz``, ``sex_map.nii.gz``, ``brain_mask.nii.gz`` when
the scan was stripped, and optionally ``conformed.nii.gz`` and ``age_map.png``, staged in a hidden
folder and renamed into place).
The batch around it is :mod:`brainbag.run.predict`.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from brainbag import __version__
from brainbag.errors import (
    BrainbagError,
    InputError,
    ProcessingError,
)
from brainbag.files import default_mode, write_json_atomic
from brainbag.image.checks import (
    BEFORE_STRIPPING,
    SKULL_OBJECT_LITRES,
    CheckOptions,
    run_checks,
)
from brainbag.image.io import (
    Image,
    LoadedImage,
    axis_codes,
    load_image,
    make_nifti,
    map_transform,
    resample_masked,
    sha256_file,
)
from brainbag.image.masks import (
    SOURCE_TEXT,
    BrainMaskChoice,
    check_strip_mode,
    choose_brain_mask,
    mask_image,
    skull_on,
)
from brainbag.image.preprocess import Conformed, conform
from brainbag.network.inference import (
    InferenceSettings,
    MapResult,
    predict_maps,
    resolve_device,
    resolve_precision,
    resolve_threads,
)
from brainbag.person.calibration import (
    SiteCalibration,
    choose_calibration,
    read_site_calibration,
)
from brainbag.person.clinical import (
    Reading,
    map_spread,
    model_figures,
    read_prediction,
)
from brainbag.run.batch import (
    settings_fingerprint,
)
from brainbag.run.discover import (
    OutputLocation,
    ScanInput,
)
from brainbag.run.outputs import display_range, save_nifti_atomic
from brainbag.weights.file import LoadedWeights, WeightsMeta
from brainbag.weights.resolve import open_weights, training_statistic

MapSpace = Literal["model", "input"]


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
    mask_pattern: str | None = None
    png: bool | None = None  # None: on for batch runs (a folder, dataset, list or several files)
    jobs: int = 1  # worker threads reading and preprocessing the next scans; 0 = no overlap
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    n4: bool = False
    save_conformed: bool = False
    age: float | None = None  # --age: chronological age of the one input (years)
    sex: str | None = None  # --sex: recorded sex of the one input ("F" or "M")
    participants: Path | None = None  # --participants: a table of ages and sexes
    shard: str | None = None  # --shard K/N or auto: this process runs shard K of N
    #: --calibration: a site calibration (``brainbag calibrate``) read in place of the weights'
    calibration: Path | None = None
    strip: str = "auto"  # --strip: skull stripping of inputs without a mask (auto, always, never)

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready data (written to every ``prediction.json``)."""
        d = asdict(self)
        d["out"] = str(self.out)
        d["mask"] = str(self.mask) if self.mask else None
        d["manifests"] = [str(m) for m in self.manifests]
        d["cache_dir"] = str(self.cache_dir) if self.cache_dir else None
        d["participants"] = str(self.participants) if self.participants else None
        d["calibration"] = str(self.calibration) if self.calibration else None
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
        self._lock = threading.Lock()

    def _meta(self) -> WeightsMeta | None:
        """The weights' metadata, None when they cannot be loaded (the inference stage then
        reports why)."""
        try:
            return self.get().meta
        except BrainbagError:
            return None

    def voxel_mm(self) -> float:
        """The voxel size inputs are conformed to: the weights' own (1 mm without weights)."""
        meta = self._meta()
        return meta.voxel_mm if meta is not None else 1.0

    def view(self) -> tuple[int, int, int] | None:
        """The brain view of the weights (None without weights, or when they have none)."""
        meta = self._meta()
        return meta.view if meta is not None else None

    def bias_field(self) -> dict[str, Any] | None:
        """The bias-field statistic of the weights' training images (None when not recorded)."""
        meta = self._meta()
        return training_statistic(meta.training, "bias_field") if meta is not None else None

    def get(self) -> LoadedWeights:
        with self._lock:
            return self._get()

    def _get(self) -> LoadedWeights:
        if self._loaded is None:
            from brainbag.weights.hub import HubSettings

            t0 = time.perf_counter()
            s = self.settings
            hub = HubSettings.from_env(cache_dir=s.cache_dir, offline=s.offline)
            self._loaded = open_weights(s.weights, s.rf, s.manifests, hub)
            self.seconds = time.perf_counter() - t0
        return self._loaded

    @property
    def loaded(self) -> LoadedWeights | None:
        """The weights if :meth:`get` has loaded them, else None."""
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


def run_weights(
    weights: LoadedWeights, conformed: Conformed, settings: InferenceSettings
) -> MapResult:
    """The network of ``weights`` over an input conformed to their voxel size, run the way the
    weights were trained: on their brain view (if any), pooled as they say, with the brain mask.
    Every caller (predict, evaluate, crossval, benches) goes through here."""
    meta = weights.meta
    if abs(conformed.image.zooms[0] - meta.voxel_mm) > 1e-3:
        raise ProcessingError(
            f"internal: the input was conformed to {conformed.image.zooms[0]:g} mm but "
            f"weights {weights.id} expect {meta.voxel_mm:g} mm")
    return predict_maps(weights.model, conformed.image.data, conformed.background, settings,
                        mask=conformed.mask, pooling=meta.pooling, view=meta.view)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x.astype(np.float64)))).astype(np.float32)


def map_to_input_grid(
    values: np.ndarray, map_to_input_index: np.ndarray, loaded: LoadedImage, input_mask: np.ndarray
) -> np.ndarray:
    """Resample a map (NaN outside the brain) onto the input file's own grid.

    Linear interpolation of the finite values, normalised by the interpolated weight of finite
    cells, so NaN cells do not bleed into the brain; NaN outside the input's brain mask.
    """
    return resample_masked(values, np.linalg.inv(map_to_input_index), loaded.shape, input_mask)


@dataclass
class Prepared:
    """An input read and conformed, ready for the network (the output of the prepare stage)."""

    item: ScanInput
    loaded: LoadedImage
    mask_path: Path | None
    mask: np.ndarray | None
    mask_sha256: str | None
    conformed: Conformed
    warnings: list[str]
    timings: dict[str, float]
    checked: dict[str, Any] = field(default_factory=dict)  # checks run and fixes applied
    brain: BrainMaskChoice | None = None  # where ``mask`` came from (given, stripped, voxels > 0)


@dataclass
class Inferred:
    """The network's outputs for one prepared input."""

    result: MapResult
    heads: HeadMaps
    weights: LoadedWeights
    warnings: list[str]
    seconds: float
    reading: Reading = field(default_factory=Reading)
    #: which calibration the reading used (``prediction.json``'s ``calibration``)
    calibration: dict[str, Any] = field(default_factory=dict)


class Predictor:
    """Runs the pipeline for one input at a time with shared settings and weights.

    :meth:`predict` = :meth:`prepare` (thread-safe: load, mask, conform) then :meth:`infer` and
    :meth:`write` (in the caller's thread; the model is shared).
    """

    def __init__(self, settings: PredictSettings, weights: LoadedWeights | None = None) -> None:
        """``weights`` overrides ``settings.weights`` with an already loaded model."""
        self.settings = settings
        settings.inference.validate()
        check_strip_mode(settings.strip)
        self.device = resolve_device(settings.inference.device)
        self.threads = resolve_threads(settings.inference.threads)
        self.precision, self.precision_warning = resolve_precision(
            settings.inference.precision, self.device
        )
        self.weights = WeightsProvider(settings, weights)
        self._site: SiteCalibration | None = None
        self._site_sha256: str | None = None
        self._site_lock = threading.Lock()

    @property
    def fingerprint(self) -> str:
        """The settings fingerprint (``--resume``, shards): the settings that change results,
        and the content of the site calibration file when one is given."""
        settings = self.settings.to_dict()
        if self.settings.calibration is not None:
            self.site_calibration()
            settings["calibration_sha256"] = self._site_sha256
        return settings_fingerprint(settings)

    def site_calibration(self) -> SiteCalibration | None:
        """The site calibration of ``--calibration``, read once for the weights in use (loading
        them): a file for other weights, or one that cannot be read, is refused with one line."""
        if self.settings.calibration is None:
            return None
        with self._site_lock:
            if self._site is None:
                weights = self.weights.get()
                path = Path(self.settings.calibration)
                site = read_site_calibration(path, weights.sha256, weights.id)
                self._site_sha256 = sha256_file(path)
                self._site = site
            return self._site

    def predict(self, source: Path | ScanInput, mask_path: Path | None = None) -> dict[str, Any]:
        """Predict one input and write its outputs; returns the prediction record."""
        item = source if isinstance(source, ScanInput) else ScanInput.single(
            Path(source), mask_path or self.settings.mask)
        prepared = self.prepare(item)
        return self.write(prepared, self.infer(prepared))

    def prepare(self, item: ScanInput) -> Prepared:
        """Read the input and its mask (or strip it: :func:`choose_brain_mask`) and conform it.
        Thread-safe: touches no shared state (stripping takes deepbet's own lock)."""
        timings: dict[str, float] = {}
        warnings: list[str] = []
        if item.mask_error is not None:
            raise InputError(item.mask_error)

        t0 = time.perf_counter()
        loaded = load_image(item.path)
        mask_sha256 = sha256_file(item.mask) if item.mask is not None else None
        timings["load"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        brain = self._brain_mask(loaded, item.mask)
        # stripping (networks, reorientation, plausibility), else the skull check's measure
        elapsed = time.perf_counter() - t0
        if brain.strip is not None:
            timings["strip"] = elapsed
        else:
            timings["load"] += elapsed
        mask = brain.mask

        fixed, checked = self._check_and_fix(loaded, brain, item.mask, warnings, timings)

        t0 = time.perf_counter()
        conformed = conform(fixed, mask, allow_resample=self.settings.resample,
                            spacing=self.weights.voxel_mm())
        warnings += conformed.warnings
        if conformed.resampled:
            checked["fixes"].append(_resample_fix(fixed, conformed))
        timings["preprocess"] = time.perf_counter() - t0
        # the PNG shows the input as stored (before N4): ``loaded`` is kept, not ``fixed``
        return Prepared(item, loaded, item.mask, mask, mask_sha256, conformed, warnings, timings,
                        checked, brain)

    def _check_options(self, mask_path: Path | None, strip: str | None = None,
                       stripped: str | None = None) -> CheckOptions:
        s = self.settings
        return CheckOptions(mask=mask_path, resample=s.resample, mode=s.inference.mode, n4=s.n4,
                            voxel_mm=self.weights.voxel_mm(), view_xyz=self.weights.view(),
                            strip=strip or s.strip, stripped=stripped,
                            bias_field=self.weights.bias_field())

    def _brain_mask(self, loaded: LoadedImage, mask_path: Path | None) -> BrainMaskChoice:
        """The input's brain mask (:func:`choose_brain_mask`, on the run's threads and device).
        A scan to strip first passes the checks that need no mask: one they refuse is refused
        as before (or, with ``force``, predicted as before: unstripped, brain = voxels > 0)."""
        s = self.settings
        litres = None
        if mask_path is None and s.strip != "never":
            head, litres = skull_on(loaded)
            if head or s.strip == "always":
                before = run_checks(loaded.path, self._check_options(None), loaded=loaded,
                                    names=BEFORE_STRIPPING, head_litres=litres)
                if before.failures and not s.force:
                    raise InputError(before.failure_message())
                if before.failures:  # --force past them: no fix, as for any failed check
                    return BrainMaskChoice("nonzero", None, head_litres=litres)
        return choose_brain_mask(loaded, mask_path, s.strip, self.threads, str(self.device),
                                 head_litres=litres)

    def _check_and_fix(
        self, loaded: LoadedImage, brain: BrainMaskChoice, mask_path: Path | None,
        warnings: list[str], timings: dict[str, float],
    ) -> tuple[LoadedImage, dict[str, Any]]:
        """Run the checks on the loaded input: refuse on a failure (unless ``force``), record
        warnings, apply N4 (``n4``). Returns the image to conform and the record of both."""
        from brainbag.image.fixes import n4_correct

        mask = brain.mask
        # a scan left unstripped (forced past a failed check) is judged as --strip never would
        unstripped = brain.source == "nonzero" and brain.head_litres is not None and (
            self.settings.strip == "always" or brain.head_litres > SKULL_OBJECT_LITRES)
        options = self._check_options(mask_path, "never" if unstripped else None,
                                      brain.label if brain.strip is not None else None)
        report = run_checks(loaded.path, options, loaded=loaded, mask=mask,
                            head_litres=brain.head_litres)
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
                inside = mask if mask is not None else loaded.image.data > 0
                n4 = n4_correct(loaded.image.data, inside, loaded.zooms)
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

    def infer(self, prepared: Prepared) -> Inferred:
        """Run the network over a prepared input and convert its outputs to user units."""
        warnings: list[str] = []
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
        conformed = prepared.conformed
        meta = weights.meta
        if meta.view is not None and inference.mode == "sliding" and any(
                w < v for w, v in zip(inference.window, meta.view, strict=True)):
            warnings.append(
                f"--mode sliding with windows {list(inference.window)} smaller than the "
                f"whole-brain view {list(meta.view)} these weights were trained on: it sees less "
                "than in training and the age can move by many years (up to 14.5 y measured, "
                "bench/view_agreement.py); use --mode auto")
        result = run_weights(weights, conformed, inference)
        heads = interpret(result, weights)
        people = prepared.item.demographics
        site = self.site_calibration()
        calibration, source = choose_calibration(meta.calibration, site)
        reading = read_prediction(
            heads.age_global, heads.p_female, map_spread(heads.age, result.brain), people.age,
            people.sex, calibration, meta.training.get("age_range"), weights.id)
        if site is not None:
            reading.warnings += site.age_warnings(people.age)
        warnings += reading.warnings
        used = {"source": source if calibration else None,
                "file": str(Path(self.settings.calibration or "").resolve())
                if site is not None else None,
                "file_sha256": self._site_sha256 if site is not None else None,
                "weights_id": site.weights_id if site is not None else weights.id}
        return Inferred(result, heads, weights, warnings, time.perf_counter() - t0, reading,
                        used)

    def write(self, prepared: Prepared, inferred: Inferred) -> dict[str, Any]:
        """Write the input's outputs (staged, then renamed into place); return its record."""
        timings = {**prepared.timings, "inference": inferred.seconds}
        return self._write(prepared, inferred, prepared.warnings + inferred.warnings, timings)

    def _write(
        self,
        prepared: Prepared,
        inferred: Inferred,
        warnings: list[str],
        timings: dict[str, float],
    ) -> dict[str, Any]:
        t_write = time.perf_counter()
        item, loaded, conformed = prepared.item, prepared.loaded, prepared.conformed
        result, heads, weights = inferred.result, inferred.heads, inferred.weights
        mask_path, input_mask, brain = prepared.mask_path, prepared.mask, prepared.brain
        location = item.location
        out_root = self.settings.out
        map_to_conformed = map_transform(result.stride, result.start, result.offset)
        map_to_input = conformed.to_input @ map_to_conformed
        map_affine = loaded.image.affine @ map_to_input
        assert result.brain is not None  # run_weights always passes the brain mask
        cells = result.brain > 0
        if not cells.any():
            raise ProcessingError(f"{loaded.path}: no map voxel covers the brain mask")
        brain_in_input = (loaded.image.data > 0) if input_mask is None else input_mask

        maps: dict[str, tuple[np.ndarray, str, str]] = {}
        if heads.age is not None:
            maps["age_map"] = (heads.age, "age", "brainbag local predicted age (years)")
        if heads.sex_logit is not None:
            maps["sex_map"] = (_sigmoid(heads.sex_logit), "sex", "brainbag local P(female)")

        reading = inferred.reading
        record: dict[str, Any] = {
            "subject": item.subject,
            "session": item.session,
            "status": "ok",
            "age": heads.age_global,
            "p_female": heads.p_female,
            **reading.columns(),
            "calibration": inferred.calibration,
            "reading": {
                "demographics_source": item.demographics.source,
                "methods": reading.methods,
                "notes": reading.notes,
                "model": {**model_figures(weights.meta.training),
                          "source": "the weights' cross-validation (model card)"},
                "training_age_range": weights.meta.training.get("age_range"),
            },
            "rf": weights.meta.rf,
            "rf_mm": weights.meta.rf_mm,
            "mode": result.mode,
            "device": result.device,
            "precision": result.precision,
            "threads": self.threads,
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
                "sha256": prepared.mask_sha256,
                "source": SOURCE_TEXT[brain.source] if brain is not None else
                ("file" if mask_path else SOURCE_TEXT["nonzero"]),
            },
            # skull stripping, recorded like any fix (null: the scan was not stripped)
            "strip": brain.strip.to_record() if brain is not None and brain.strip else None,
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
                "start_voxels": list(result.start),
                "global_is_mean_over": (
                    "map voxels weighted by the brain fraction of their cell (masked pooling)"
                    if result.pooling == "brain"
                    else "all map voxels (network output); see *_brain_cells"),
            },
            "outputs": {},
            **prepared.checked,
            "warnings": warnings,
            "settings": self.settings.to_dict(),
            "settings_fingerprint": self.fingerprint,
            "created": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "output": location.relative("prediction").as_posix(),
        }
        if heads.age is not None:
            record["map"]["age_mean_brain_cells"] = float(heads.age[cells].mean())
        if heads.sex_logit is not None:
            record["map"]["p_female_brain_cells"] = float(
                1 / (1 + np.exp(-heads.sex_logit[cells].astype(np.float64).mean()))
            )

        final = out_root / location.folder
        stage_parent = final if location.prefix is not None else final.parent
        stage_parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(
            prefix=f".{location.prefix or final.name}.partial-", dir=stage_parent))
        os.chmod(stage, default_mode(directory=True))
        try:
            # the PNG shows the age map (the sex map for a sex-only model)
            shown: tuple[np.ndarray, tuple[float, float], str] | None = None
            for name, (values, kind, description) in maps.items():
                values = np.where(cells, values, np.nan).astype(np.float32)
                cal = display_range(values[cells], kind, weights.meta.training.get("age_range"))
                if shown is None or kind == "age":
                    shown = (values, cal, "local predicted age (years)" if kind == "age"
                             else "local P(female)")
                if self.settings.map_space == "input":
                    values = map_to_input_grid(values, map_to_input, loaded, brain_in_input)
                    affine = loaded.image.affine
                else:
                    affine = map_affine
                img = make_nifti(values, affine, loaded.xform_code, cal, description)
                save_nifti_atomic(img, stage / location.name(name))
                record["outputs"][name] = location.name(name)
            if brain is not None and brain.strip is not None:  # review it over the scan
                save_nifti_atomic(mask_image(brain.strip.mask, loaded,
                                             f"brainbag brain mask ({brain.label})"),
                                  stage / location.name("brain_mask"))
                record["outputs"]["brain_mask"] = location.name("brain_mask")
            if self.settings.save_conformed:
                img = make_nifti(conformed.image.data, conformed.image.affine, loaded.xform_code,
                                 description="brainbag conformed input (whitened)")
                save_nifti_atomic(img, stage / location.name("conformed"))
                record["outputs"]["conformed"] = location.name("conformed")
            if self.settings.png and shown is not None:
                self._draw(stage / location.name("png"), record, prepared, brain_in_input,
                           map_to_input, *shown)
                record["outputs"]["png"] = location.name("png")
            timings["write"] = time.perf_counter() - t_write
            timings["total"] = sum(timings.values())
            record["timings_s"] = {k: round(v, 4) for k, v in timings.items()}
            record["seconds"] = timings["total"]
            write_json_atomic(stage / location.name("prediction"), _json_record(record))
            if location.prefix is None:
                _publish_dir(stage, final)
            else:
                _publish_files(stage, final, location)
        finally:
            if stage.exists():
                shutil.rmtree(stage, ignore_errors=True)
        return record

    def _draw(
        self,
        path: Path,
        record: dict[str, Any],
        prepared: Prepared,
        brain_in_input: np.ndarray,
        map_to_input: np.ndarray,
        values: np.ndarray,
        value_range: tuple[float, float],
        label: str,
    ) -> None:
        from brainbag.run.report import overlay_views, png_title, save_overlay_png

        brain = prepared.brain
        stripped = brain is not None and brain.strip is not None
        views = overlay_views(prepared.loaded, brain_in_input, values, map_to_input,
                              outline=stripped)
        title, subtitle = png_title(record)
        untrained = not record["weights"]["trained"]
        warning = "UNTRAINED weights (random initialisation): these numbers mean nothing" \
            if untrained else None
        notes = [w for w in record["warnings"] if "UNTRAINED" not in w]
        outline_label = (f"line: brain mask by skull stripping ({brain.label}), "
                         f"{record['outputs']['brain_mask']}" if stripped and brain is not None
                         else None)
        save_overlay_png(path, views, title, subtitle, value_range, warning, label, notes,
                         outline_label)


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


def _publish_files(stage: Path, final: Path, location: OutputLocation) -> None:
    """Move staged files into a shared folder (BIDS ``anat``), ``prediction.json`` last, and
    remove this input's brainbag files of an earlier run that this run did not write."""
    prediction = location.name("prediction")
    written = {p.name for p in stage.iterdir()}
    for kind in ("age_map", "sex_map", "png", "conformed", "brain_mask"):
        name = location.name(kind)
        if name not in written:
            (final / name).unlink(missing_ok=True)
    for name in sorted(written - {prediction}):
        os.replace(stage / name, final / name)
    os.replace(stage / prediction, final / prediction)


def _json_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in ("status", "seconds", "output")}
