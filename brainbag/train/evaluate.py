"""``brainbag evaluate``: test-set figures for one or more weights files.

Every image goes through exactly what ``brainbag predict`` does (load, conform, full-volume or
sliding-window inference, global prediction = mean of the local map), so the figures are the
ones a user of ``predict`` gets, on the brain masks ``predict`` would use (an image's mask file,
else deepbet's for a head, else voxels > 0; stripped masks are kept in ``OUT/brain_masks`` or
``mask_cache``). Per weights file the output folder gets ``predictions.tsv``
(one row per image), ``metrics.json`` and ``age_scatter.png``; with several weights files a
``table.tsv`` shaped like the paper's Table 1 (one row per weights file) is written and printed.

Metrics: age MAE, RMSE, Pearson r, and the age bias (slope and intercept of the least-squares
line of the error ``predicted - true`` against the true age; a negative slope is the usual
regression to the mean); sex accuracy (P(female) > 0.5) and ROC AUC (Mann-Whitney, ties count
one half).
"""

from __future__ import annotations

import csv
import io
import math
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from brainbag.errors import InputError, UsageError
from brainbag.files import write_json_atomic, write_text_atomic
from brainbag.image.checks import CheckReport
from brainbag.image.masks import MaskCache, MaskNote, describe_sources, mask_sources
from brainbag.network.inference import InferenceSettings
from brainbag.train.datasets import (
    DataSource,
    ImageRecord,
    apply_split,
    conform_record,
    discover,
    record_mask,
)

PREDICTION_COLUMNS = ("participant_id", "session", "split", "t1w", "age", "predicted_age",
                      "age_error", "sex", "p_female", "predicted_sex", "map_spread")
#: Printed under the tables that show the bias slope.
BIAS_SLOPE_NOTE = ("bias slope: slope of the error (predicted - true age) against the true age; "
                   "0 = no age bias, -1 = every subject predicted the same age. The scatter's "
                   "fit of predicted against true age has slope 1 + bias slope.")
TABLE_COLUMNS = ("weights", "rf", "heads", "n", "age_mae", "age_rmse", "age_r", "age_bias_slope",
                 "sex_accuracy", "sex_auc")


@dataclass(frozen=True)
class EvaluateSettings:
    """What ``brainbag evaluate`` was asked to do."""

    data: Path
    #: ``--weights``: manifest ids or weights files (Path or str), resolved as ``predict`` does;
    #: () = the manifests' default for ``rf``
    weights: tuple[str | Path, ...] = ()
    rf: int | None = None
    manifests: tuple[Path, ...] = ()
    cache_dir: Path | None = None
    offline: bool = False
    split: str = "all"
    split_file: Path | None = None
    out: Path = Path("brainbag-eval")
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    plot: bool = True
    force: bool = False  # evaluate images that fail predict's input checks (recorded per image)
    mask_cache: Path | None = None  # stripped brain masks; None = OUT/brain_masks

    def cache(self) -> MaskCache:
        """Where stripped masks are kept (and found again)."""
        return MaskCache(self.mask_cache if self.mask_cache is not None
                         else self.out / "brain_masks")

    def validate(self) -> None:
        if self.split not in ("all", "train", "val", "test"):
            raise UsageError(f"--split must be all, train, val or test, got {self.split!r}")
        self.inference.validate()

    def load_weights(self) -> list[Any]:
        """Every ``--weights`` (or the default for ``--rf``), through the resolver ``predict``
        uses (:func:`brainbag.weights.resolve.open_weights`): verified, then loaded."""
        from brainbag.weights.hub import HubSettings
        from brainbag.weights.resolve import open_weights

        hub = HubSettings.from_env(cache_dir=self.cache_dir, offline=self.offline)
        specs = self.weights or (None,)
        return [open_weights(None if s is None else str(s), self.rf, self.manifests, hub)
                for s in specs]


@dataclass
class WeightsResult:
    """Predictions and figures of one weights file."""

    path: Path
    label: str
    rf: int
    heads: list[str]
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]
    masks: str = ""  # where the images' brain masks came from (describe_sources)


# --- metrics -----------------------------------------------------------------------------------


def age_metrics(true: Sequence[float], pred: Sequence[float]) -> dict[str, float | int | None]:
    """MAE, RMSE, Pearson r and the bias line of ``pred - true`` against ``true``."""
    t = np.asarray(true, dtype=np.float64)
    p = np.asarray(pred, dtype=np.float64)
    n = int(t.size)
    if n == 0:
        return {"n": 0, "mae": None, "rmse": None, "r": None, "bias_slope": None,
                "bias_intercept": None, "mean_error": None}
    err = p - t
    out: dict[str, float | int | None] = {
        "n": n,
        "mae": float(np.abs(err).mean()),
        "rmse": float(np.sqrt((err**2).mean())),
        "mean_error": float(err.mean()),
        "r": None, "bias_slope": None, "bias_intercept": None,
    }
    if n >= 2 and t.std() > 0:
        slope, intercept = np.polyfit(t, err, 1)
        out["bias_slope"], out["bias_intercept"] = float(slope), float(intercept)
        if p.std() > 0:
            out["r"] = float(np.corrcoef(t, p)[0, 1])
    return out


def roc_auc(positive: Sequence[bool] | np.ndarray, score: Sequence[float] | np.ndarray
            ) -> float | None:
    """Area under the ROC curve by the Mann-Whitney statistic (ties count 1/2)."""
    y = np.asarray(positive, dtype=bool)
    s = np.asarray(score, dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(s.size, dtype=np.float64)
    sorted_s = s[order]
    i = 0
    while i < s.size:  # average ranks over ties
        j = i
        while j + 1 < s.size and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[y].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def sex_metrics(female: Sequence[bool], p_female: Sequence[float]) -> dict[str, Any]:
    """Accuracy at P(female) > 0.5, ROC AUC, and the counts."""
    y = np.asarray(female, dtype=bool)
    p = np.asarray(p_female, dtype=np.float64)
    if y.size == 0:
        return {"n": 0, "accuracy": None, "auc": None, "n_female": 0, "n_male": 0}
    return {
        "n": int(y.size),
        "accuracy": float(((p > 0.5) == y).mean()),
        "auc": roc_auc(y, p),
        "n_female": int(y.sum()),
        "n_male": int((~y).sum()),
    }


# --- the run -----------------------------------------------------------------------------------


def select_records(settings: EvaluateSettings, first_weights: Path
                   ) -> tuple[DataSource, list[ImageRecord]]:
    """The images to evaluate: all of DATA, or one split of it (by ``--split-file``, else the
    ``splits.tsv`` beside the first weights file)."""
    split_file = settings.split_file
    if settings.split != "all" and split_file is None:
        beside = first_weights.parent / "splits.tsv"
        if not beside.is_file():
            raise UsageError(
                f"--split {settings.split} needs to know the split: pass --split-file (a split "
                f"folder or a run's splits.tsv); none found beside {first_weights}")
        split_file = beside
    if split_file is not None and not split_file.exists():
        raise InputError(f"split file not found: {split_file}")
    if split_file is not None and split_file.is_dir():
        source = discover(settings.data, split_file)
    else:
        source = discover(settings.data)
        if split_file is not None:
            source = apply_split(source, split_file)
    records = source.select(settings.split)
    if not records:
        raise InputError(f"{settings.data}: no image in split {settings.split!r}")
    return source, records


def _label(path: Path, meta_id: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", meta_id or path.stem) or "weights"
    label, k = base, 2
    while label in taken:
        label, k = f"{base}-{k}", k + 1
    taken.add(label)
    return label


def run_evaluate(
    settings: EvaluateSettings, on_image: Callable[[int, int, ImageRecord], None] | None = None,
) -> list[WeightsResult]:
    """Predict every selected image with every weights file and write the figures."""
    from brainbag.network.inference import resolve_device
    from brainbag.person.clinical import map_spread
    from brainbag.run.scan import interpret, run_weights
    from brainbag.weights.resolve import training_statistic

    settings.validate()
    loaded = settings.load_weights()
    _, records = select_records(settings, loaded[0].path)
    device = str(resolve_device(settings.inference.device))
    cache = settings.cache()
    notes: list[MaskNote] = []
    # the checks judge the images by the first weights file's voxel size and brain view
    checks = check_records(records, settings, loaded[0].meta.voxel_mm, loaded[0].meta.view,
                           notes, device,
                           training_statistic(loaded[0].meta.training, "bias_field"))
    masks = describe_sources(notes)
    taken: set[str] = set()
    results = [WeightsResult(w.path, _label(w.path, w.id, taken), w.meta.rf,
                             list(w.meta.heads), [], {}, masks) for w in loaded]
    for k, record in enumerate(records):
        if on_image is not None:
            on_image(k, len(records), record)
        by_spacing: dict[float, Any] = {}  # conform once per voxel size the weights need
        for weights, result in zip(loaded, results, strict=True):
            spacing = weights.meta.voxel_mm
            if spacing not in by_spacing:
                by_spacing[spacing] = conform_record(record, spacing, cache, device)
            conformed = by_spacing[spacing]
            maps = run_weights(weights, conformed, settings.inference)
            heads = interpret(maps, weights)
            row = _row(record, heads.age_global, heads.p_female,
                       map_spread(heads.age, maps.brain))
            row["checks"] = checks[k].summary()
            row["brain_mask"] = notes[k].label
            result.rows.append(row)
    settings.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(settings.out / "checks.json", [
        {"participant_id": r.participant_id, "session": r.session, "t1w": str(r.t1w),
         "checks": c.summary(), "forced": bool(c.failures), "results": c.to_list()}
        for r, c in zip(records, checks, strict=True)])
    label, counts = mask_sources(n.label for n in notes)
    for result in results:
        result.metrics = {**_metrics(result, settings), "brain_mask": label,
                          "brain_mask_counts": counts}
        folder = settings.out / result.label
        write_text_atomic(folder / "predictions.tsv",
                          predictions_tsv(result.rows, ("checks", "brain_mask")))
        write_json_atomic(folder / "metrics.json", result.metrics)
        if settings.plot and "age" in result.heads:
            scatter_png(folder / "age_scatter.png", result)
    if len(results) > 1:
        write_text_atomic(settings.out / "table.tsv", table_tsv(results))
    return results


def check_records(records: Sequence[ImageRecord], settings: EvaluateSettings,
                  voxel_mm: float = 1.0, view: tuple[int, int, int] | None = None,
                  notes: list[MaskNote] | None = None, device: str = "cpu",
                  bias_field: dict[str, Any] | None = None) -> list[CheckReport]:
    """Choose every image's brain mask as predict does (stripping heads into the settings'
    mask cache) and run predict's input checks with it, before any inference, so a bad image
    stops the evaluation at once (with the line predict would print) unless ``settings.force``.
    An image that cannot be read, or whose stripped mask is implausible, stops it even with
    ``--force``. ``notes`` gets where each image's mask came from; ``bias_field`` is the first
    weights' record of their training images' bias fields."""
    from brainbag.image.checks import CheckOptions, run_checks

    reports = []
    cache = settings.cache()
    for record in records:
        loaded, choice = record_mask(record, cache, device)
        if notes is not None:
            notes.append(choice.note())
        options = CheckOptions(mask=record.mask, mode=settings.inference.mode,
                               voxel_mm=voxel_mm, view_xyz=view, bias_field=bias_field,
                               stripped=choice.label if choice.strip is not None else None)
        reports.append(run_checks(record.t1w, options, loaded=loaded, mask=choice.mask,
                                  head_litres=choice.head_litres))
    failed = [r for r in reports if r.failures]
    if failed and not settings.force:
        also = f" (and {len(failed) - 1} more of {len(reports)} images)" if len(failed) > 1 else ""
        raise InputError(failed[0].failure_message(
            f"--force evaluates anyway (recorded per image){also}"))
    return reports


def _row(record: ImageRecord, age: float | None, p_female: float | None,
         spread: float | None = None) -> dict[str, Any]:
    return {
        "participant_id": record.participant_id,
        "session": record.session,
        "split": record.split,
        "t1w": str(record.t1w),
        "age": record.age,
        "predicted_age": age,
        "age_error": (age - record.age) if age is not None and record.age is not None else None,
        "sex": record.sex,
        "p_female": p_female,
        "predicted_sex": None if p_female is None else ("F" if p_female > 0.5 else "M"),
        "map_spread": spread,
    }


def _metrics(result: WeightsResult, settings: EvaluateSettings) -> dict[str, Any]:
    aged = [r for r in result.rows if r["age"] is not None and r["predicted_age"] is not None]
    sexed = [r for r in result.rows if r["sex"] is not None and r["p_female"] is not None]
    out: dict[str, Any] = {
        "weights": str(result.path),
        "label": result.label,
        "rf": result.rf,
        "heads": result.heads,
        "data": str(settings.data),
        "split": settings.split,
        "images": len(result.rows),
        "mode": settings.inference.mode,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if "age" in result.heads:
        out["age"] = age_metrics([r["age"] for r in aged], [r["predicted_age"] for r in aged])
    if "sex" in result.heads:
        out["sex"] = sex_metrics([r["sex"] == "F" for r in sexed], [r["p_female"] for r in sexed])
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.{digits}f}"
    return str(value)


def predictions_tsv(rows: Sequence[dict[str, Any]], extra: Sequence[str] = ()) -> str:
    columns = (*PREDICTION_COLUMNS, *extra)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_fmt(row.get(c)) for c in columns])
    return buf.getvalue()


def table_rows(results: Sequence[WeightsResult]) -> list[dict[str, Any]]:
    """One Table-1 row per weights file (empty cells for a head the weights lack)."""
    rows = []
    for r in results:
        age = r.metrics.get("age") or {}
        sex = r.metrics.get("sex") or {}
        rows.append({
            "weights": r.label, "rf": r.rf, "heads": "+".join(r.heads),
            "n": r.metrics.get("images"),
            "age_mae": age.get("mae"), "age_rmse": age.get("rmse"), "age_r": age.get("r"),
            "age_bias_slope": age.get("bias_slope"),
            "sex_accuracy": sex.get("accuracy"), "sex_auc": sex.get("auc"),
        })
    return rows


def table_tsv(results: Sequence[WeightsResult]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    for row in table_rows(results):
        writer.writerow([_fmt(row[c]) for c in TABLE_COLUMNS])
    return buf.getvalue()


def fit_line(age: dict[str, Any]) -> tuple[float, float, str] | None:
    """The least-squares line of predicted against true age, from the age metrics: slope
    ``1 + bias slope`` (the bias line fits the error ``predicted - true``), its intercept and a
    legend that names both slopes, so the scatter and the table's "bias slope" agree."""
    bias, intercept = age.get("bias_slope"), age.get("bias_intercept")
    if bias is None or intercept is None:
        return None
    slope = 1.0 + bias
    return slope, intercept, f"fit: slope {slope:.2f} (= 1 + bias slope {bias:.2f})"


def scatter_png(path: Path, result: WeightsResult) -> None:
    """Predicted against true age with the identity line and the fitted line; written atomically.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    from brainbag.files import atomic_path

    pts = [(r["age"], r["predicted_age"]) for r in result.rows
           if r["age"] is not None and r["predicted_age"] is not None]
    fig, ax = plt.subplots(figsize=(5, 5), dpi=100)
    try:
        if pts:
            t, p = (np.array(v, dtype=np.float64) for v in zip(*pts, strict=True))
            lo = float(min(t.min(), p.min())) - 2
            hi = float(max(t.max(), p.max())) + 2
            ax.scatter(t, p, s=14, alpha=0.7, color="tab:blue", edgecolors="none")
            ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="identity")
            age = result.metrics.get("age") or {}
            fit = fit_line(age)
            if fit is not None:
                slope, intercept, label = fit
                ax.plot([lo, hi], [slope * lo + intercept, slope * hi + intercept],
                        color="tab:red", lw=1, label=label)
            ax.set_xlim(lo, hi)
            ax.set_ylim(lo, hi)
            ax.set_title(f"{result.label}: MAE {_fmt(age.get('mae'), 2)} y, "
                         f"r {_fmt(age.get('r'), 2)}, n {age.get('n')}", fontsize=9)
            ax.legend(loc="upper left", fontsize=8)
        ax.set_xlabel("true age (years)")
        ax.set_ylabel("predicted age (years)")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
    finally:
        plt.close(fig)
