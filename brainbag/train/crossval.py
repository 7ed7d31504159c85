"""Cross-validation grouped by subject: train one model per fold, predict its held-out images
with the predict pipeline's inference (``brainbag evaluate``), pool the held-out predictions and
report them pooled, per data set, per site and per group, each next to two baselines fitted on
the same training folds (:mod:`brainbag.train.baselines`: the per-site training mean and a
morphometric ridge regression).

The data may be several training tables (or BIDS folders) at once: each image keeps its data set,
site and group, and subject ids must be unique across them. With several, the images are written
to ``OUT/data.tsv`` (absolute paths) and every fold trains on that table.

Folds live in a TSV (``participant_id``, ``fold``) so that every figure is reproducible;
:func:`make_folds` writes one (stratified by data set, site, group and age, seeded) when none
exists. ``leave_one_dataset_out`` makes one fold per data set instead: train on all others, test
on that one (how a model fares on a site it never saw). ``train_groups`` keeps the other groups
(e.g. patients) out of every training fold while they are still predicted and reported. A
subject's images always share a fold. Each fold's run is an ordinary ``brainbag train`` run in
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
from brainbag.image.masks import MaskCache, mask_sources
from brainbag.network.inference import InferenceSettings
from brainbag.person.clinical import fit_calibration
from brainbag.person.tables import bare, read_table
from brainbag.train.baselines import (
    DESCRIPTION,
    FEATURES,
    PENALTY,
    fit_logistic,
    fit_ridge,
    record_features,
)
from brainbag.train.config import TrainConfig
from brainbag.train.cvreport import breakdown, crossval_table, learning_curve_tsv, summarise
from brainbag.train.datasets import ImageRecord, combined_table, discover_all
from brainbag.train.evaluate import EvaluateSettings, predictions_tsv, run_evaluate

FOLDS_COLUMNS = ("participant_id", "fold", "stratum", "age")
PREDICTION_EXTRA = ("fold", "dataset", "site", "group", "source", "site_mean_age",
                    "site_mean_p_female", "morph_age", "morph_p_female", "brain_mask")


def image_source(t1w: Path, root: Path) -> str:
    """The folder an image lies in relative to the data root (for the IXI table ``native`` or
    ``2mm``), or ``.`` for images directly in it."""
    try:
        rel = t1w.resolve().relative_to(root.resolve())
    except ValueError:
        return t1w.parent.name
    parts = rel.parts[:-1]
    return parts[0] if parts else "."


def source_of(t1w: Path, roots: Sequence[Path]) -> str:
    """:func:`image_source` relative to the data root (of ``roots``: the folders of the tables
    or BIDS folders given) that holds the image."""
    resolved = t1w.resolve()
    for root in sorted((r.resolve() for r in roots), key=lambda r: len(r.parts), reverse=True):
        if resolved.is_relative_to(root):
            return image_source(t1w, root)
    return t1w.parent.name


def site_of(r: ImageRecord) -> str:
    """An image's site: its ``site`` column, else its data set (one site)."""
    return r.site or r.dataset or "."


def stratum(r: ImageRecord) -> str:
    """``dataset/site[/group]``: the cell a subject is stratified in."""
    parts = [r.dataset or ".", site_of(r)] + ([r.cohort] if r.cohort else [])
    return "/".join(parts)


def _first_images(records: Sequence[ImageRecord]) -> dict[str, ImageRecord]:
    first: dict[str, ImageRecord] = {}  # a subject's first image stands for it
    for r in records:
        first.setdefault(r.group, r)
    return first


def make_folds(records: Sequence[ImageRecord], k: int, seed: int) -> list[dict[str, Any]]:
    """Assign subjects to ``k`` folds, stratified by data set, site, group and age.

    Within each stratum (:func:`stratum` of a subject's first image), subjects are ordered by
    age and each run of ``k`` consecutive subjects is dealt one per fold in a random order
    (``seed``); a shorter last run goes to the folds that hold the fewest subjects so far. Every
    fold so spans the age range, holds its share of each site and group, and the fold sizes
    differ by at most one.
    """
    if k < 2:
        raise UsageError(f"cross-validation needs at least 2 folds, got --k {k}")
    first = _first_images(records)
    strata = {g: stratum(r) for g, r in first.items()}
    ages = {g: r.age if r.age is not None else -1.0 for g, r in first.items()}
    rng = np.random.default_rng(seed)
    counts = np.zeros(k, dtype=int)
    rows = []
    for cell in sorted(set(strata.values())):
        order = sorted((g for g in first if strata[g] == cell), key=lambda g: (ages[g], g))
        for start in range(0, len(order), k):
            chunk = order[start:start + k]
            # a full run of k gets every fold; a last, shorter run the emptiest folds
            ties = rng.random(k)
            emptiest = sorted(range(k), key=lambda f: (counts[f], ties[f]))[: len(chunk)]
            folds = rng.permutation(emptiest)
            for g, f in zip(chunk, folds, strict=True):
                counts[f] += 1
                rows.append({"participant_id": first[g].participant_id, "fold": int(f),
                             "stratum": cell, "age": ages[g]})
    return sorted(rows, key=lambda r: (r["fold"], r["participant_id"]))


def dataset_folds(records: Sequence[ImageRecord]) -> tuple[list[dict[str, Any]], list[str]]:
    """Leave-one-dataset-out: fold ``K`` = the ``K``-th data set (sorted by name)."""
    first = _first_images(records)
    datasets = sorted({r.dataset or "." for r in first.values()})
    if len(datasets) < 2:
        raise UsageError(
            f"leave-one-dataset-out needs at least 2 data sets, the data holds one "
            f"({datasets[0]}); give several tables, or a 'dataset' column")
    rows = [{"participant_id": r.participant_id, "fold": datasets.index(r.dataset or "."),
             "stratum": stratum(r), "age": r.age if r.age is not None else -1.0}
            for r in first.values()]
    return sorted(rows, key=lambda r: (r["fold"], r["participant_id"])), datasets


def folds_tsv(rows: Sequence[dict[str, Any]]) -> str:
    """The text of a folds TSV."""
    lines = ["\t".join(FOLDS_COLUMNS)]
    for r in rows:
        lines.append(f"{r['participant_id']}\t{r['fold']}\t{r['stratum']}\t{r['age']:g}")
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


# --- baselines ---------------------------------------------------------------------------------

FEATURE_KEY_COLUMNS = ("t1w", "mask", "voxel_mm")


def _feature_key(r: ImageRecord, voxel_mm: float) -> tuple[str, str, str]:
    return (str(r.t1w.resolve()), str(r.mask.resolve()) if r.mask else "", f"{voxel_mm:g}")


def load_features(records: Sequence[ImageRecord], voxel_mm: float, path: Path,
                  on_message: Callable[[str], None] | None = None,
                  cache: MaskCache | None = None) -> dict[tuple[str, str, str], np.ndarray]:
    """The morphometric features of every record, measured once and kept in ``path`` (a TSV:
    image, mask, voxel size, features), so a resumed cross-validation does not measure again."""
    known: dict[tuple[str, str, str], np.ndarray] = {}
    if path.is_file():
        header, rows = read_table(path)
        if header == [c.lower() for c in (*FEATURE_KEY_COLUMNS, *FEATURES)]:
            for row in rows:
                key = (row["t1w"], row["mask"], row["voxel_mm"])
                known[key] = np.array([float(row[c.lower()]) for c in FEATURES])
    todo = [r for r in records if _feature_key(r, voxel_mm) not in known]
    for n, r in enumerate(todo):
        known[_feature_key(r, voxel_mm)] = record_features(r, voxel_mm, cache)
        if on_message is not None and ((n + 1) % 25 == 0 or n + 1 == len(todo)):
            on_message(f"morphometric features: {n + 1}/{len(todo)} images measured")
    if todo:
        lines = ["\t".join((*FEATURE_KEY_COLUMNS, *FEATURES))]
        for key, values in sorted(known.items()):
            lines.append("\t".join([*key, *(repr(float(v)) for v in values)]))
        write_text_atomic(path, "\n".join(lines) + "\n")
    return known


def add_baselines(rows: list[dict[str, Any]], train: Sequence[ImageRecord],
                  records: dict[str, ImageRecord],
                  features: dict[tuple[str, str, str], np.ndarray], voxel_mm: float) -> None:
    """Add both baselines' predictions, fitted on the ``train`` images only, to the held-out
    ``rows`` (``records`` maps a row's resolved image path to its record)."""
    aged = [r for r in train if r.age is not None]
    sexed = [r for r in train if r.sex is not None]
    mean_age = float(np.mean([r.age for r in aged])) if aged else math.nan
    female = float(np.mean([r.sex == "F" for r in sexed])) if sexed else 0.5
    by_site: dict[tuple[str, str], list[ImageRecord]] = {}
    for r in train:
        by_site.setdefault((r.dataset or ".", site_of(r)), []).append(r)
    ridge = fit_ridge(np.stack([features[_feature_key(r, voxel_mm)] for r in aged]),
                      [float(r.age) for r in aged if r.age is not None]) if aged else None
    logistic = fit_logistic(np.stack([features[_feature_key(r, voxel_mm)] for r in sexed]),
                            [r.sex == "F" for r in sexed]) if sexed else None
    for row in rows:
        record = records[str(Path(row["t1w"]).resolve())]
        site = by_site.get((record.dataset or ".", site_of(record)), [])
        site_ages = [float(r.age) for r in site if r.age is not None]
        site_sexes = [r.sex == "F" for r in site if r.sex is not None]
        row["site_mean_age"] = float(np.mean(site_ages)) if site_ages else mean_age
        row["site_mean_p_female"] = float(np.mean(site_sexes)) if site_sexes else female
        x = features[_feature_key(record, voxel_mm)]
        row["morph_age"] = float(ridge.predict(x)[0]) if ridge is not None else None
        row["morph_p_female"] = float(logistic.predict(x)[0]) if logistic is not None else None


# --- the run -----------------------------------------------------------------------------------


@dataclasses.dataclass
class CrossvalResult:
    out: Path
    rows: list[dict[str, Any]]
    metrics: dict[str, Any]


def _check_groups(records: Sequence[ImageRecord], train_groups: Sequence[str] | None) -> None:
    if train_groups is None:
        return
    known = sorted({r.cohort for r in records if r.cohort})
    unknown = sorted(set(train_groups) - set(known))
    if unknown:
        raise UsageError(
            f"--train-groups {', '.join(unknown)}: no such group in the data's 'group' column "
            f"(groups: {', '.join(known) or 'none'})")


def run_crossval(
    data: Path | Sequence[Path], folds_path: Path | None, config: TrainConfig, out: Path,
    inference: InferenceSettings | None = None, k: int = 5, seed: int = 0,
    train: Callable[[TrainConfig, bool], Any] | None = None,
    on_fold: Callable[[int, int], None] | None = None, *,
    leave_one_dataset_out: bool = False, train_groups: Sequence[str] | None = None,
    on_message: Callable[[str], None] | None = None,
) -> CrossvalResult:
    """Train and evaluate every fold; write ``OUT/predictions.tsv``, ``metrics.json``,
    ``table.tsv``, ``learning_curve.tsv`` (and ``folds.tsv`` when ``folds_path`` is None).
    ``train(config, resume)`` runs one fold's training (default:
    :func:`brainbag.train.trainer.run_training`)."""
    from brainbag.train.trainer import run_training

    paths = [Path(data)] if isinstance(data, str | Path) else [Path(p) for p in data]
    source = discover_all(paths)
    records = [dataclasses.replace(r, dataset=r.dataset or source.name) for r in source.records]
    _check_groups(records, train_groups)
    out.mkdir(parents=True, exist_ok=True)
    train_data = paths[0]
    if len(paths) > 1:
        train_data = out / "data.tsv"
        write_text_atomic(train_data, combined_table(records))
    folds_path = folds_path or out / "folds.tsv"
    held_names: list[str] | None = None
    if leave_one_dataset_out:
        rows, held_names = dataset_folds(records)
        write_text_atomic(folds_path, folds_tsv(rows))
    elif not folds_path.exists():
        write_text_atomic(folds_path, folds_tsv(make_folds(records, k, seed)))
    folds = read_folds(folds_path)
    missing = sorted({r.group for r in records} - set(folds))
    if missing:
        raise InputError(f"{folds_path} has no fold for {len(missing)} subject(s) of "
                         f"{', '.join(map(str, paths))} (first: {missing[0]}); delete it to make "
                         "new folds")
    fold_ids = sorted(set(folds.values()))
    if len(fold_ids) < 2:
        raise UsageError(f"{folds_path}: cross-validation needs at least 2 folds")
    first = _first_images(records)
    groups = None if train_groups is None else set(train_groups)

    def trained_on(cohort: str | None) -> bool:
        return groups is None or cohort is None or cohort in groups

    by_path = {str(r.t1w.resolve()): r for r in records}
    roots = [p.parent if p.is_file() else p for p in paths]
    out.mkdir(parents=True, exist_ok=True)
    masks = Path(config.mask_cache) if config.mask_cache else out / "brain_masks"
    features = load_features(records, config.voxel_mm, out / "features.tsv", on_message,
                             MaskCache(masks))
    run_train = train or (lambda c, resume: run_training(c, None, resume))
    all_rows: list[dict[str, Any]] = []
    per_fold: list[dict[str, Any]] = []
    for n, fold in enumerate(fold_ids):
        if on_fold is not None:
            on_fold(n, len(fold_ids))
        folder = out / f"fold-{fold}"
        split = folder / "split.tsv"
        # the held-out fold is the run's validation set: its loss and MAE are recorded every
        # epoch (the learning curve) but never used to choose weights (best_metric = "last");
        # subjects of groups not trained on are left out of the training folds
        lines = ["participant_id\tsplit"] + [
            f"{pid}\t{'val' if f == fold else 'train'}" for pid, f in sorted(folds.items())
            if f == fold or trained_on(first[pid].cohort if pid in first else None)]
        text = "\n".join(lines) + "\n"
        run = folder / "run"
        if (run / "last.ckpt").exists() and split.is_file() and split.read_text() != text:
            raise UsageError(
                f"{folder} was trained on another split (other folds, data or --train-groups "
                f"than this command's); use another --out, or delete {folder} to train it again")
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(split, text)
        fold_config = dataclasses.replace(config, data=str(train_data), out=str(run),
                                          split=str(split), best_metric="last",
                                          mask_cache=str(masks))
        run_train(fold_config, (run / "last.ckpt").exists())
        results = run_evaluate(EvaluateSettings(
            data=train_data, weights=(run / "weights.safetensors",), split="val",
            split_file=split, out=folder / "eval", inference=inference or InferenceSettings(),
            plot=False, force=True,  # the data trained on: checks recorded, never refused
            mask_cache=masks))
        rows = []
        for r in results[0].rows:
            record = by_path[str(Path(r["t1w"]).resolve())]
            rows.append({**r, "fold": fold, "dataset": record.dataset, "site": site_of(record),
                         "group": record.cohort,
                         "source": source_of(record.t1w, roots)})
        train_records = [r for r in records
                         if folds.get(r.group) != fold and trained_on(r.cohort)]
        add_baselines(rows, train_records, by_path, features, config.voxel_mm)
        per_fold.append({
            "fold": fold,
            "held_out": sorted({str(r["dataset"]) for r in rows}),
            "train_images": len(train_records),
            **summarise(rows),
            "history": read_history(run / "metrics.tsv")})
        all_rows += rows
    subjects = len({bare(r["participant_id"]) for r in all_rows})
    mask_label, mask_counts = mask_sources(str(r.get("brain_mask")) for r in all_rows)
    metrics: dict[str, Any] = {
        "data": [str(p) for p in paths],
        "scheme": "leave-one-dataset-out" if leave_one_dataset_out else
                  f"{len(fold_ids)}-fold, grouped by subject, stratified by data set, site, "
                  "group and age",
        "folds_file": str(folds_path),
        "folds": len(fold_ids),
        "held_out_datasets": held_names,
        "train_groups": None if groups is None else sorted(groups),
        "images": len(all_rows),
        "subjects": subjects,
        "datasets": dataset_summary(records, trained_on),
        "baselines": {**DESCRIPTION, "penalty": PENALTY, "features": list(FEATURES)},
        "config": config.to_dict(),
        # the brain masks of the held-out images (each fold trained on the same kind)
        "brain_mask": mask_label,
        "brain_mask_counts": mask_counts,
        **breakdown(all_rows),
        "by_fold": per_fold,
    }
    trained_rows = [r for r in all_rows if trained_on(r.get("group"))]
    try:
        metrics["calibration"] = fit_calibration(trained_rows, fitted_on=(
            f"held-out predictions of {metrics['scheme']} cross-validation "
            f"({len(trained_rows)} images of the groups trained on, "
            f"{', '.join(map(str, paths))}, folds {folds_path})"))
    except ValueError as exc:
        metrics["calibration"] = None
        metrics["calibration_note"] = str(exc)
    write_text_atomic(out / "predictions.tsv", predictions_tsv(all_rows, PREDICTION_EXTRA))
    write_json_atomic(out / "metrics.json", metrics)
    write_text_atomic(out / "table.tsv", crossval_table(metrics))
    write_text_atomic(out / "learning_curve.tsv", learning_curve_tsv(per_fold, metrics))
    return CrossvalResult(out, all_rows, metrics)


def dataset_summary(records: Sequence[ImageRecord], trained_on: Callable[[str | None], bool]
                    ) -> dict[str, Any]:
    """Per data set: images, subjects, sites, groups (and whether each was trained on), ages."""
    out: dict[str, Any] = {}
    for name in sorted({r.dataset or "." for r in records}):
        mine = [r for r in records if (r.dataset or ".") == name]
        ages = [r.age for r in mine if r.age is not None]
        cohorts = sorted({r.cohort for r in mine if r.cohort})
        out[name] = {
            "images": len(mine),
            "subjects": len({r.group for r in mine}),
            "sites": {s: len({r.group for r in mine if site_of(r) == s})
                      for s in sorted({site_of(r) for r in mine})},
            "groups": {c: {"subjects": len({r.group for r in mine if r.cohort == c}),
                           "trained_on": trained_on(c)} for c in cohorts},
            "age_range": [min(ages), max(ages)] if ages else None,
        }
    return out


def read_history(path: Path) -> list[dict[str, float | None]]:
    """A run's metrics.tsv as rows of floats (None for empty cells)."""
    if not path.is_file():
        return []
    _, rows = read_table(path)
    return [{k: (float(v) if v not in ("", None) else None) for k, v in row.items()}
            for row in rows]
