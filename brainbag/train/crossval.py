"""K-fold cross-validation grouped by subject: train one model per fold, predict its held-out
subjects with the predict pipeline's inference (``brainbag evaluate``), pool the held-out
predictions and report them next to the predict-the-training-mean baseline on the same folds.

The folds live in a TSV (``participant_id``, ``fold``) so that every figure is reproducible;
:func:`make_folds` writes one (stratified by image source and age, seeded) when none exists.
A subject's images always share a fold. Each fold's run is an ordinary ``brainbag train`` run in
``OUT/fold-K`` (resumable: an interrupted cross-validation continues where it stopped).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainbag.errors import InputError, UsageError
from brainbag.files import write_json_atomic, write_text_atomic
from brainbag.image.masks import mask_sources
from brainbag.network.inference import InferenceSettings
from brainbag.person.clinical import fit_calibration
from brainbag.person.tables import bare, read_table
from brainbag.train.config import TrainConfig
from brainbag.train.datasets import ImageRecord, discover
from brainbag.train.evaluate import (
    EvaluateSettings,
    age_metrics,
    predictions_tsv,
    run_evaluate,
    sex_metrics,
)

FOLDS_COLUMNS = ("participant_id", "fold", "source", "age")


def image_source(t1w: Path, root: Path) -> str:
    """The group an image is reported in: its folder relative to the data root (for the IXI
    table, ``native`` or ``2mm``), or ``.`` for images directly in it."""
    try:
        rel = t1w.resolve().relative_to(root.resolve())
    except ValueError:
        return t1w.parent.name
    parts = rel.parts[:-1]
    return parts[0] if parts else "."


def make_folds(records: Sequence[ImageRecord], root: Path, k: int, seed: int
               ) -> list[dict[str, Any]]:
    """Assign subjects to ``k`` folds, stratified by source and age.

    Within each source (of a subject's first image), subjects are ordered by age and each run of
    ``k`` consecutive subjects is dealt one per fold in a random order (``seed``); a shorter last
    run goes to the folds that hold the fewest subjects so far. Every fold so spans the age range,
    holds its share of each source, and the fold sizes differ by at most one.
    """
    first: dict[str, ImageRecord] = {}  # a subject's first image stands for it
    for r in records:
        first.setdefault(r.group, r)
    sources = {g: image_source(r.t1w, root) for g, r in first.items()}
    ages = {g: r.age if r.age is not None else -1.0 for g, r in first.items()}
    rng = np.random.default_rng(seed)
    counts = np.zeros(k, dtype=int)
    rows = []
    for source in sorted(set(sources.values())):
        order = sorted((g for g in first if sources[g] == source), key=lambda g: (ages[g], g))
        for start in range(0, len(order), k):
            chunk = order[start:start + k]
            # a full run of k gets every fold; a last, shorter run the emptiest folds
            ties = rng.random(k)
            emptiest = sorted(range(k), key=lambda f: (counts[f], ties[f]))[: len(chunk)]
            folds = rng.permutation(emptiest)
            for g, f in zip(chunk, folds, strict=True):
                counts[f] += 1
                rows.append({"participant_id": first[g].participant_id, "fold": int(f),
                             "source": source, "age": ages[g]})
    return sorted(rows, key=lambda r: (r["fold"], r["participant_id"]))


def folds_tsv(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["\t".join(FOLDS_COLUMNS)]
    for r in rows:
        lines.append(f"{r['participant_id']}\t{r['fold']}\t{r['source']}\t{r['age']:g}")
    return "\n".join(lines) + "\n"


def read_folds(path: Path) -> dict[str, int]:
    """``{bare participant id: fold}`` from a folds TSV."""
    header, rows = read_table(path)
    if "participant_id" not in header or "fold" not in header:
        raise InputError(f"{path} needs 'participant_id' and 'fold' columns, has {header}")
    out: dict[str, int] = {}
    for n, row in enumerate(rows, start=2):
        try:
            fold = int(row["fold"])
        except ValueError:
            raise InputError(f"{path}, row {n}: fold {row['fold']!r} is not an integer") from None
        pid = bare(row["participant_id"])
        if out.get(pid, fold) != fold:
            raise InputError(f"{path}: subject {pid} is in two folds")
        out[pid] = fold
    return out


@dataclasses.dataclass
class CrossvalResult:
    out: Path
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]


def _baseline_rows(rows: list[dict[str, Any]], train_age: float, train_female: float
                   ) -> list[dict[str, Any]]:
    return [{**r, "predicted_age": train_age, "p_female": train_female} for r in rows]


def summarise(rows: Sequence[dict[str, Any]], baseline: Sequence[dict[str, Any]]
              ) -> dict[str, Any]:
    """Age and sex figures of ``rows`` with those of the baseline predictions on the same rows."""

    def figures(rs: Sequence[dict[str, Any]]) -> dict[str, Any]:
        aged = [r for r in rs if r["age"] is not None and r["predicted_age"] is not None]
        sexed = [r for r in rs if r["sex"] is not None and r["p_female"] is not None]
        out: dict[str, Any] = {"n": len(rs)}
        if aged:
            out["age"] = age_metrics([r["age"] for r in aged], [r["predicted_age"] for r in aged])
        if sexed:
            out["sex"] = sex_metrics([r["sex"] == "F" for r in sexed],
                                     [r["p_female"] for r in sexed])
        return out

    model, base = figures(rows), figures(baseline)
    result = {"model": model, "baseline": base}
    if model.get("age") and base.get("age") and base["age"].get("mae"):
        result["mae_ratio"] = model["age"]["mae"] / base["age"]["mae"]
    return result


def run_crossval(
    data: Path, folds_path: Path, config: TrainConfig, out: Path,
    inference: InferenceSettings | None = None, k: int = 5, seed: int = 0,
    train: Callable[[TrainConfig, bool], Any] | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> CrossvalResult:
    """Train and evaluate every fold; write ``OUT/predictions.tsv``, ``metrics.json``,
    ``table.tsv``. ``train(config, resume)`` runs one fold's training (default:
    :func:`brainbag.train.trainer.run_training`)."""
    from brainbag.train.trainer import run_training

    source = discover(data)
    root = source.root  # the folder of the table, the BIDS root or the Cam-CAN folder
    if not folds_path.exists():
        write_text_atomic(folds_path, folds_tsv(make_folds(source.records, root, k, seed)))
    folds = read_folds(folds_path)
    missing = sorted({r.group for r in source.records} - set(folds))
    if missing:
        raise InputError(f"{folds_path} has no fold for {len(missing)} subject(s) of {data} "
                         f"(first: {missing[0]}); delete it to make new folds")
    fold_ids = sorted(set(folds.values()))
    if len(fold_ids) < 2:
        raise UsageError(f"{folds_path}: cross-validation needs at least 2 folds")
    run_train = train or (lambda c, resume: run_training(c, None, resume))
    out.mkdir(parents=True, exist_ok=True)
    masks = Path(config.mask_cache) if config.mask_cache else out / "brain_masks"
    all_rows: list[dict[str, Any]] = []
    baseline: list[dict[str, Any]] = []
    per_fold: list[dict[str, Any]] = []
    for n, fold in enumerate(fold_ids):
        if on_fold is not None:
            on_fold(n, len(fold_ids))
        folder = out / f"fold-{fold}"
        split = folder / "split.tsv"
        # the held-out fold is the run's validation set: its loss and MAE are recorded every
        # epoch (the learning curve) but never used to choose weights (best_metric = "last")
        lines = ["participant_id\tsplit"] + [
            f"{pid}\t{'val' if f == fold else 'train'}" for pid, f in sorted(folds.items())]
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(split, "\n".join(lines) + "\n")
        # every fold and its evaluation share one cache: each head is stripped once
        fold_config = dataclasses.replace(config, data=str(data), out=str(folder / "run"),
                                          split=str(split), best_metric="last",
                                          mask_cache=str(masks))
        run_train(fold_config, (folder / "run" / "last.ckpt").exists())
        weights = folder / "run" / "weights.safetensors"
        results = run_evaluate(EvaluateSettings(
            data=data, weights=(weights,), split="val", split_file=split,
            out=folder / "eval", inference=inference or InferenceSettings(),
            plot=False, force=True,  # the data trained on: checks recorded, never refused
            mask_cache=masks))
        rows = [{**r, "fold": fold, "source": image_source(Path(r["t1w"]), root)}
                for r in results[0].rows]
        train_records = [r for r in source.records if folds.get(r.group) != fold]
        ages = [r.age for r in train_records if r.age is not None]
        sexes = [r.sex == "F" for r in train_records if r.sex is not None]
        mean_age = float(np.mean(ages)) if ages else math.nan
        female = float(np.mean(sexes)) if sexes else 0.5
        base = _baseline_rows(rows, mean_age, female)
        per_fold.append({"fold": fold, **summarise(rows, base),
                         "history": read_history(folder / "run" / "metrics.tsv")})
        all_rows += rows
        baseline += base
    sources = sorted({r["source"] for r in all_rows})
    mask_label, mask_counts = mask_sources(str(r.get("brain_mask")) for r in all_rows)
    metrics: dict[str, Any] = {
        "data": str(data),
        "folds_file": str(folds_path),
        "folds": len(fold_ids),
        "images": len(all_rows),
        "subjects": len({r["participant_id"] for r in all_rows}),
        "baseline": "predict the training folds' mean age and female fraction (AUC 0.5)",
        "config": config.to_dict(),
        # the brain masks of the held-out images (each fold trained on the same kind)
        "brain_mask": mask_label,
        "brain_mask_counts": mask_counts,
        "overall": summarise(all_rows, baseline),
        "by_source": {s: summarise([r for r in all_rows if r["source"] == s],
                                   [r for r in baseline if r["source"] == s]) for s in sources},
        "by_fold": per_fold,
    }
    try:
        metrics["calibration"] = fit_calibration(all_rows, fitted_on=(
            f"held-out predictions of {len(fold_ids)}-fold cross-validation "
            f"({len(all_rows)} images of {metrics['subjects']} subjects, {data}, folds "
            f"{folds_path})"))
    except ValueError as exc:
        metrics["calibration"] = None
        metrics["calibration_note"] = str(exc)
    write_text_atomic(out / "predictions.tsv",
                      predictions_tsv(all_rows, ("fold", "source", "brain_mask")))
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "table.tsv", crossval_table(metrics))
    write_text_atomic(out / "learning_curve.tsv", learning_curve_tsv(per_fold, metrics))
    return CrossvalResult(out, all_rows, metrics)


def read_history(path: Path) -> list[dict[str, float | None]]:
    """A run's metrics.tsv as rows of floats (None for empty cells)."""
    if not path.is_file():
        return []
    _, rows = read_table(path)
    return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in rows]


def learning_curve_tsv(per_fold: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """Per epoch, the mean over folds of the training loss, the held-out loss and the held-out
    age MAE (each fold's model on its own held-out subjects), next to the baseline MAE."""
    histories = [f["history"] for f in per_fold if f.get("history")]
    base = (metrics["overall"]["baseline"].get("age") or {}).get("mae")
    cols = ("epoch", "train_loss", "heldout_loss", "heldout_age_mae", "baseline_age_mae",
            "heldout_sex_accuracy", "folds")
    lines = ["\t".join(cols)]
    for e in range(max((len(h) for h in histories), default=0)):
        rows = [h[e] for h in histories if len(h) > e]

        def mean(key: str, rows: list[dict[str, float | None]] = rows) -> str:
            vals = [float(v) for r in rows if (v := r.get(key)) is not None]
            return f"{float(np.mean(vals)):.4f}" if vals else ""

        lines.append("\t".join([str(e + 1), mean("train_loss"), mean("val_loss"),
                                mean("val_mae"), "" if base is None else f"{base:.4f}",
                                mean("val_accuracy"), str(len(rows))]))
    return "\n".join(lines) + "\n"


TABLE_COLUMNS = ("group", "n", "age_mae", "baseline_mae", "mae_ratio", "age_rmse",
                 "baseline_rmse", "age_r", "age_bias_slope", "sex_accuracy",
                 "baseline_accuracy", "sex_auc")


def crossval_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    groups = [("all", metrics["overall"])] + list(metrics["by_source"].items())
    out = []
    for name, s in groups:
        m, b = s["model"], s["baseline"]
        out.append({
            "group": name, "n": m["n"],
            "age_mae": m.get("age", {}).get("mae"), "baseline_mae": b.get("age", {}).get("mae"),
            "mae_ratio": s.get("mae_ratio"),
            "age_rmse": m.get("age", {}).get("rmse"), "baseline_rmse": b.get("age", {}).get("rmse"),
            "age_r": m.get("age", {}).get("r"),
            "age_bias_slope": m.get("age", {}).get("bias_slope"),
            "sex_accuracy": m.get("sex", {}).get("accuracy"),
            "baseline_accuracy": b.get("sex", {}).get("accuracy"),
            "sex_auc": m.get("sex", {}).get("auc"),
        })
    return out


def crossval_table(metrics: dict[str, Any]) -> str:
    lines = ["\t".join(TABLE_COLUMNS)]
    for row in crossval_rows(metrics):
        lines.append("\t".join("" if row[c] is None else
                               (f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]))
                               for c in TABLE_COLUMNS))
    return "\n".join(lines) + "\n"
