"""Ship a finished training run as bundled default weights, with its cross-validated figures.

    python training/ship_weights.py RUN_DIR CROSSVAL_DIR [--lodo LODO_DIR] --id ID

reads ``RUN_DIR/weights.safetensors`` (a ``brainbag train`` run on all the data),
``CROSSVAL_DIR/metrics.json`` (``brainbag crossval`` with the same recipe) and, with ``--lodo``,
``LODO_DIR/metrics.json`` (``brainbag crossval --leave-one-dataset-out``), and writes into
``--manifest-dir`` (default: the repository's ``weights_manifest/``)

* ``<id>.safetensors``: the same tensors (float32), its metadata with the id, the
  cross-validated figures (``training.crossval``: pooled, per data set, site and group, both
  baselines), the leave-one-dataset-out figures (``training.lodo``) and the calibration,
* its entry in ``manifest.json`` (sha256, size, bundled source, the training data sets with
  licence and citation, metrics next to both baselines; the default for its RF unless
  ``--no-default``),
* ``<id>.md``: the model card (:func:`brainbag.weights.card.release_card`).

Nothing is trained or measured here: every number comes from the folders. The training data
described is the data the run recorded (``training.datasets``), never a recipe's text.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from brainbag.errors import BrainbagError
from brainbag.files import write_json_atomic, write_text_atomic
from brainbag.weights.card import crossval_subsets, release_card
from brainbag.weights.file import load_weights, save_weights
from brainbag.weights.manifest import WeightsEntry, manifest_document, read_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "weights_manifest"
#: the parts of a crossval metrics.json that the weights carry
CROSSVAL_KEYS = ("scheme", "folds", "folds_file", "held_out_datasets", "subjects", "images",
                 "train_groups", "datasets", "baselines", "overall", "by_dataset", "by_site",
                 "by_group")


class ShipError(Exception):
    """A crossval folder or run that cannot be shipped; the message says why."""


def read_metrics(folder: Path, lodo: bool = False) -> dict[str, Any]:
    """A crossval folder's metrics.json, checked to hold what the card needs."""
    path = folder / "metrics.json"
    if not path.is_file():
        raise ShipError(f"{path} not found: run brainbag crossval with --out {folder} first")
    cv = json.loads(path.read_text())
    if "by_site" not in cv or "site_mean" not in (cv.get("overall") or {}):
        raise ShipError(f"{path} was written by an older brainbag crossval (no per-site figures "
                        "or baselines): run the same brainbag crossval command again")
    is_lodo = cv.get("scheme") == "leave-one-dataset-out"
    if is_lodo != lodo:
        raise ShipError(f"{path} is {'a' if is_lodo else 'not a'} leave-one-dataset-out run; "
                        f"give it {'with --lodo' if is_lodo else 'as CROSSVAL_DIR'}")
    return cv


def default_command(cv: dict[str, Any], folder: Path) -> str:
    """The crossval command the figures came from, rebuilt from its metrics.json."""
    parts = ["brainbag crossval", *cv.get("data", [])]
    recipe = (cv.get("config") or {}).get("recipe")
    if recipe:
        parts += ["--recipe", recipe]
    if cv.get("scheme") == "leave-one-dataset-out":
        parts.append("--leave-one-dataset-out")
    else:
        parts += ["--folds", str(cv.get("folds_file"))]
    if cv.get("train_groups"):
        parts += ["--train-groups", ",".join(cv["train_groups"])]
    return " ".join([*parts, "--out", str(folder)])


def metrics_list(cv: dict[str, Any], command: str, lodo: dict[str, Any] | None = None,
                 lodo_command: str = "") -> list[dict[str, Any]]:
    """Manifest metrics: pooled, per data set, site and group, each with both baselines; then
    each data set held out (leave-one-dataset-out)."""
    out: list[dict[str, Any]] = []
    method = f"{cv['scheme']} cross-validation, held-out predictions pooled: {command}"
    rows = [(name, s, "cross-validation (held-out folds)", method)
            for name, s in crossval_subsets(cv)]
    if lodo:
        lodo_method = f"leave-one-dataset-out: trained on the other data sets: {lodo_command}"
        rows += [(name, s, f"leave-one-dataset-out (held out: {name})", lodo_method)
                 for name, s in lodo["by_dataset"].items()]
    for subset, s, split, how in rows:
        for name, head, key in (
            ("age_mae_years", "age", "mae"), ("age_rmse_years", "age", "rmse"),
            ("age_pearson_r", "age", "r"), ("age_bias_slope", "age", "bias_slope"),
            ("sex_accuracy", "sex", "accuracy"), ("sex_auc", "sex", "auc"),
        ):
            value = ((s["model"].get(head) or {}).get(key))
            if value is None:
                continue
            row: dict[str, Any] = {"name": name, "value": round(float(value), 4),
                                   "dataset": subset, "split": split, "n": s["n"],
                                   "method": how}
            if name in ("age_mae_years", "age_rmse_years", "sex_accuracy", "sex_auc"):
                baselines = {b: (s[b].get(head) or {}).get(key)
                             for b in ("site_mean", "morphometric")}
                row["baselines"] = {b: None if v is None else round(float(v), 4)
                                    for b, v in baselines.items()}
                if baselines["site_mean"] is not None:
                    row["baseline"] = round(float(baselines["site_mean"]), 4)
                    row["baseline_method"] = "per-site training mean (see baselines)"
            out.append(row)
    return out


def weights_licence(datasets: list[dict[str, Any]]) -> str:
    """The licence the weights inherit: share-alike if any data set asks for it."""
    licences = [str(d.get("licence") or "") for d in datasets]
    derived = ", ".join(f"{d.get('title')}: {d.get('licence') or 'not stated'}"
                        for d in datasets)
    if any("BY-SA" in text.upper() for text in licences):
        return f"CC BY-SA 3.0 (derived from {derived})"
    if licences and all(text.upper().startswith("CC0") for text in licences):
        return f"CC0 (derived from {derived})"
    return f"the terms of the training data ({derived})"


def ship(run: Path, crossval: Path, weights_id: str, lodo: Path | None = None,
         manifest_dir: Path = MANIFEST_DIR, command: str = "", lodo_command: str = "",
         description: str = "", licence: str = "", notes: str = "", default: bool = True
         ) -> WeightsEntry:
    """Write the weights, their manifest entry and their model card (module docstring)."""
    cv = read_metrics(crossval)
    lodo_cv = read_metrics(lodo, lodo=True) if lodo is not None else None
    command = command or default_command(cv, crossval)
    if lodo is not None and lodo_cv is not None:
        lodo_command = lodo_command or default_command(lodo_cv, lodo)
    loaded = load_weights(run / "weights.safetensors")
    meta = loaded.meta
    datasets = meta.training.get("datasets") or []
    trained = sorted(d["name"] for d in datasets)
    if trained and trained != sorted(cv.get("datasets") or {}):
        print(f"warning: the run trained on {trained}, the cross-validation used "
              f"{sorted(cv.get('datasets') or {})}", file=sys.stderr)
    groups = {g for d in datasets for g in d.get("groups") or {}}
    if cv.get("train_groups") and groups - set(cv["train_groups"]):
        print(f"warning: the run trained on the groups {sorted(groups)}, the cross-validation "
              f"on {cv['train_groups']} only: its figures describe another training set",
              file=sys.stderr)
    meta.id = weights_id
    meta.training["crossval"] = {**{k: cv.get(k) for k in CROSSVAL_KEYS}, "command": command}
    if lodo_cv is not None:
        meta.training["lodo"] = {**{k: lodo_cv.get(k) for k in CROSSVAL_KEYS},
                                 "command": lodo_command}
    meta.calibration = cv.get("calibration") or {}
    licence = licence or weights_licence(datasets)
    manifest_dir.mkdir(parents=True, exist_ok=True)
    target = manifest_dir / f"{weights_id}.safetensors"
    sha = save_weights(target, loaded.model, meta)
    manifest = manifest_dir / "manifest.json"
    entries = [e for e in read_manifest(manifest) if e.id != weights_id] \
        if manifest.is_file() else []
    if default:
        entries = [e if e.rf != meta.rf else dataclasses.replace(e, default=False)
                   for e in entries]
    preprocessing = {k: meta.preprocessing[k] for k in ("voxel_mm", "view_xyz", "orientation",
                                                       "skull_stripped", "whitening")
                     if k in meta.preprocessing}
    titles = " + ".join(str(d.get("title")) for d in datasets) or meta.training.get("data")
    entry = WeightsEntry(
        id=weights_id, rf=meta.rf, heads=tuple(meta.heads), sha256=sha,
        size=target.stat().st_size, architecture=meta.architecture,
        arch_kwargs=meta.arch_kwargs, preprocessing={**preprocessing, "pooling": meta.pooling},
        training={
            "data": titles,
            "datasets": [{k: d.get(k) for k in ("name", "title", "licence", "citation", "url",
                                                 "subjects", "sites", "groups", "patients",
                                                 "age_range")} for d in datasets],
            "patients": meta.training.get("patients"),
            "licence": "; ".join(f"{d.get('title')}: {d.get('licence') or 'not stated'}"
                                 for d in datasets) or meta.training.get("licence"),
            "recipe": meta.training.get("recipe"),
            "age_range": meta.training.get("age_range"),
            "subjects": (meta.training.get("subjects") or {}).get("train"),
            "sites": sorted({f"{d['name']}/{s}" for d in datasets for s in d.get("sites") or {}}),
            "local_weight": meta.training.get("local_weight"),
            "augment": meta.training.get("augment"),
            "precision": meta.training.get("precision"),
            # what `brainbag check` judges scans against without loading the file
            **({"statistics": meta.training["statistics"]}
               if meta.training.get("statistics") else {}),
        },
        licence=licence, metrics=metrics_list(cv, command, lodo_cv, lodo_command),
        trained=True, default=default,
        description=description or (
            f"BagNet-3D RF {meta.rf} ({meta.rf_mm:g} mm at {meta.voxel_mm:g} mm voxels), "
            f"{' and '.join(meta.heads)}, trained on {titles} "
            f"({(meta.training.get('subjects') or {}).get('train')} subjects, recipe "
            f"{meta.training.get('recipe')})"),
        bundled=target.name, manifest=manifest)
    document = manifest_document(entries + [entry], description=(
        "Weights shipped with brainbag, bundled in the package (see README.md in this folder)."))
    write_json_atomic(manifest, document)
    write_text_atomic(manifest_dir / f"{weights_id}.md",
                      release_card(meta, weights_id, licence, notes))
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="training run folder (weights.safetensors)")
    ap.add_argument("crossval", type=Path, help="brainbag crossval --out folder")
    ap.add_argument("--lodo", type=Path, help="brainbag crossval --leave-one-dataset-out folder")
    ap.add_argument("--id", required=True, help="versioned weights id (...-vN)")
    ap.add_argument("--description", default="")
    ap.add_argument("--licence", default="", help="licence of the weights [default: from the "
                    "training data's licences]")
    ap.add_argument("--notes", type=Path, help="markdown file added to the model card as Notes")
    ap.add_argument("--no-default", action="store_true")
    ap.add_argument("--command", default="", help="the crossval command, as the card shows it "
                    "[default: rebuilt from metrics.json]")
    ap.add_argument("--lodo-command", default="")
    ap.add_argument("--manifest-dir", type=Path, default=MANIFEST_DIR)
    args = ap.parse_args(argv)
    try:
        notes = args.notes.read_text() if args.notes else ""
        entry = ship(args.run, args.crossval, args.id, args.lodo, args.manifest_dir,
                     args.command, args.lodo_command, args.description, args.licence, notes,
                     default=not args.no_default)
    except (ShipError, BrainbagError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{entry.bundled_path} sha256 {entry.sha256}; entry {entry.id} written to "
          f"{entry.manifest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
