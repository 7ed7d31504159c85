"""The bar a network must clear, without training one: both crossval baselines on given folds.

    python bench/baselines.py ../shared/data/ixi/participants.tsv \
        --folds ixi-5fold --voxel-mm 2
    python bench/baselines.py ../shared/data/ixi/participants.tsv \
        ../shared/data/openneuro/participants.tsv --k 5 --train-groups control --voxel-mm 2
    python bench/baselines.py ../shared/data/ixi/participants.tsv \
        ../shared/data/openneuro/participants.tsv --leave-one-dataset-out --voxel-mm 2

The per-site training mean and the morphometric ridge/logistic regression of
``brainbag crossval`` (:mod:`brainbag.train.baselines`), fitted on each fold's training images
and pooled over the held-out ones, per data set, site and group, exactly as crossval computes
them (same folds, same features, same fits); the network columns stay empty. The features are
measured once into ``--out/features.tsv`` (at ``--voxel-mm``, the recipe's ``voxel_mm``: 2 for
ixi-open-v1). Prints the table and writes ``--out/baselines.json``. Accuracy, not timing: it runs
on a busy machine as well as on an idle one.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from brainbag.files import write_json_atomic
from brainbag.image.masks import MaskCache
from brainbag.person.tables import bare
from brainbag.train.config import find_folds
from brainbag.train.crossval import (
    add_baselines,
    dataset_folds,
    load_features,
    make_folds,
    read_folds,
    site_of,
)
from brainbag.train.cvreport import breakdown, crossval_rows
from brainbag.train.datasets import discover_all


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("data", nargs="+", type=Path)
    ap.add_argument("--folds", type=Path, help="folds TSV, or the name of shipped folds "
                    "(ixi-5fold) [default: made, stratified]")
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--leave-one-dataset-out", action="store_true")
    ap.add_argument("--train-groups", default="", help="comma-separated groups trained on")
    ap.add_argument("--voxel-mm", type=float, default=1.0)
    ap.add_argument("--out", type=Path, default=Path("runs/baselines"))
    args = ap.parse_args(argv)
    source = discover_all(args.data)
    records = [dataclasses.replace(r, dataset=r.dataset or source.name) for r in source.records]
    if args.leave_one_dataset_out:
        folds = {bare(r["participant_id"]): r["fold"]
                 for r in dataset_folds(records)[0]}
    elif args.folds:
        folds = read_folds(find_folds(args.folds))  # a path, or shipped folds by name
    else:
        folds = {bare(r["participant_id"]): r["fold"]
                 for r in make_folds(records, args.k, args.seed)}
    groups = {g for g in args.train_groups.split(",") if g}
    args.out.mkdir(parents=True, exist_ok=True)
    features = load_features(records, args.voxel_mm, args.out / "features.tsv",
                             lambda text: print(text, file=sys.stderr),
                             MaskCache(args.out / "brain_masks"))  # heads stripped as predict
    by_path = {str(r.t1w.resolve()): r for r in records}
    rows = []
    for fold in sorted(set(folds.values())):
        held = [r for r in records if folds[r.group] == fold]
        train = [r for r in records if folds[r.group] != fold
                 and (not groups or r.cohort is None or r.cohort in groups)]
        part = [{"participant_id": r.participant_id, "t1w": str(r.t1w), "age": r.age,
                 "sex": r.sex, "predicted_age": None, "p_female": None, "fold": fold,
                 "dataset": r.dataset, "site": site_of(r), "group": r.cohort} for r in held]
        add_baselines(part, train, by_path, features, args.voxel_mm)
        rows += part
    metrics = breakdown(rows)
    write_json_atomic(args.out / "baselines.json", {
        "data": [str(p) for p in args.data], "folds": len(set(folds.values())),
        "train_groups": sorted(groups) or None, "voxel_mm": args.voxel_mm, **metrics})
    print(f"{len(rows)} held-out images, {len(set(folds.values()))} folds, "
          f"{args.voxel_mm:g} mm" + (f", trained on {sorted(groups)}" if groups else ""))
    print("subset\tn\tsite_mean_mae\tmorph_mae\tsite_mean_acc\tmorph_acc\tmorph_auc")
    for row in crossval_rows(metrics):
        cells = [row["site_mean_mae"], row["morph_mae"], row["site_mean_accuracy"],
                 row["morph_accuracy"], row["morph_auc"]]
        print("\t".join([row["subset"], str(row["n"]),
                         *("-" if v is None else f"{v:.3f}" for v in cells)]))
    print(json.dumps({"written": str(args.out / "baselines.json")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
