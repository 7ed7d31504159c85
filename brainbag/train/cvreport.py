"""The figures of a cross-validation (:mod:`brainbag.train.crossval`): pooled, per data set,
site and group, each next to the two baselines (:mod:`brainbag.train.baselines`) on the same
held-out images; the printed and ``table.tsv`` rows; the learning curve.

A held-out row carries the network's prediction (``predicted_age``, ``p_female``) and each
baseline's (``site_mean_age``, ``site_mean_p_female``, ``morph_age``, ``morph_p_female``), with
its ``dataset``, ``site`` and ``group`` (None where the data has none).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from brainbag.train.evaluate import age_metrics, sex_metrics

#: who predicts: the network, and the two baselines (their columns in a held-out row)
PREDICTORS = {
    "model": ("predicted_age", "p_female"),
    "site_mean": ("site_mean_age", "site_mean_p_female"),
    "morphometric": ("morph_age", "morph_p_female"),
}
BASELINES = ("site_mean", "morphometric")


def site_key(row: dict[str, Any]) -> str:
    """``dataset/site``, or the data set's name when its site is the data set itself."""
    dataset, site = row.get("dataset") or ".", row.get("site") or row.get("dataset") or "."
    return dataset if site == dataset else f"{dataset}/{site}"


def group_key(row: dict[str, Any]) -> str | None:
    """``dataset/group`` (``openneuro/control``), None for a row without a group."""
    return None if not row.get("group") else f"{row.get('dataset') or '.'}/{row['group']}"


def figures(rows: Sequence[dict[str, Any]], age_key: str, sex_key: str) -> dict[str, Any]:
    """Age and sex figures of one predictor (its columns ``age_key``, ``sex_key``) on ``rows``."""
    aged = [r for r in rows if r["age"] is not None and r.get(age_key) is not None]
    sexed = [r for r in rows if r["sex"] is not None and r.get(sex_key) is not None]
    out: dict[str, Any] = {"n": len(rows)}
    if aged:
        out["age"] = age_metrics([r["age"] for r in aged], [r[age_key] for r in aged])
    if sexed:
        out["sex"] = sex_metrics([r["sex"] == "F" for r in sexed], [r[sex_key] for r in sexed])
    return out


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The network's figures on ``rows`` next to each baseline's on the same rows; ``mae_ratio``
    is the network's age MAE over each baseline's."""
    out: dict[str, Any] = {"n": len(rows)}
    for name, (age_key, sex_key) in PREDICTORS.items():
        out[name] = figures(rows, age_key, sex_key)
    model_mae = (out["model"].get("age") or {}).get("mae")
    out["mae_ratio"] = {}
    for name in BASELINES:
        base = (out[name].get("age") or {}).get("mae")
        out["mae_ratio"][name] = (model_mae / base) if model_mae is not None and base else None
    return out


def _split_by(rows: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], str | None]
              ) -> dict[str, dict[str, Any]]:
    names = sorted({k for r in rows if (k := key(r)) is not None})
    return {name: summarise([r for r in rows if key(r) == name]) for name in names}


def breakdown(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``overall`` and ``by_dataset``, ``by_site``, ``by_group``, ``by_source`` summaries."""
    return {
        "overall": summarise(rows),
        "by_dataset": _split_by(rows, lambda r: r.get("dataset") or "."),
        "by_site": _split_by(rows, site_key),
        "by_group": _split_by(rows, group_key),
        "by_source": _split_by(rows, lambda r: r.get("source") or "."),
    }


def shown(metrics: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The subsets the table shows, in order: all; each data set (when there are several); each
    site of a data set with several sites; each group."""
    out = [("all", metrics["overall"])]
    datasets = metrics["by_dataset"]
    if len(datasets) > 1:
        out += list(datasets.items())
    for name, summary in metrics["by_site"].items():
        dataset = name.split("/", 1)[0]
        if sum(k.split("/", 1)[0] == dataset for k in metrics["by_site"]) > 1:
            out.append((name, summary))
    out += list(metrics["by_group"].items())
    return out


TABLE_COLUMNS = ("subset", "n", "age_mae", "site_mean_mae", "morph_mae", "mae_ratio_site_mean",
                 "mae_ratio_morph", "age_rmse", "age_r", "age_bias_slope", "sex_accuracy",
                 "site_mean_accuracy", "morph_accuracy", "sex_auc", "morph_auc")


def crossval_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per shown subset: the network's figures next to both baselines'."""
    out = []
    for name, s in shown(metrics):
        m, mean, morph = s["model"], s["site_mean"], s["morphometric"]

        def get(part: dict[str, Any], head: str, key: str) -> Any:
            return (part.get(head) or {}).get(key)

        out.append({
            "subset": name, "n": s["n"],
            "age_mae": get(m, "age", "mae"), "site_mean_mae": get(mean, "age", "mae"),
            "morph_mae": get(morph, "age", "mae"),
            "mae_ratio_site_mean": s["mae_ratio"]["site_mean"],
            "mae_ratio_morph": s["mae_ratio"]["morphometric"],
            "age_rmse": get(m, "age", "rmse"), "age_r": get(m, "age", "r"),
            "age_bias_slope": get(m, "age", "bias_slope"),
            "sex_accuracy": get(m, "sex", "accuracy"),
            "site_mean_accuracy": get(mean, "sex", "accuracy"),
            "morph_accuracy": get(morph, "sex", "accuracy"),
            "sex_auc": get(m, "sex", "auc"), "morph_auc": get(morph, "sex", "auc"),
        })
    return out


def crossval_table(metrics: dict[str, Any]) -> str:
    """``table.tsv``: :func:`crossval_rows` as tab-separated text."""
    lines = ["\t".join(TABLE_COLUMNS)]
    for row in crossval_rows(metrics):
        lines.append("\t".join("" if row[c] is None else
                               (f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c]))
                               for c in TABLE_COLUMNS))
    return "\n".join(lines) + "\n"


def learning_curve_tsv(per_fold: Sequence[dict[str, Any]], metrics: dict[str, Any]) -> str:
    """Per epoch, the mean over folds of the training loss, the held-out loss and the held-out
    age MAE (each fold's model on its own held-out images), next to both baselines' MAE."""
    histories = [f["history"] for f in per_fold if f.get("history")]
    overall = metrics["overall"]
    bases = [(overall[b].get("age") or {}).get("mae") for b in BASELINES]
    cols = ("epoch", "train_loss", "heldout_loss", "heldout_age_mae", "site_mean_age_mae",
            "morph_age_mae", "heldout_sex_accuracy", "folds")
    lines = ["\t".join(cols)]
    for e in range(max((len(h) for h in histories), default=0)):
        rows = [h[e] for h in histories if len(h) > e]

        def mean(key: str, rows: list[dict[str, float | None]] = rows) -> str:
            vals = [float(v) for r in rows if (v := r.get(key)) is not None]
            return f"{float(np.mean(vals)):.4f}" if vals else ""

        lines.append("\t".join([
            str(e + 1), mean("train_loss"), mean("val_loss"), mean("val_mae"),
            *("" if b is None else f"{b:.4f}" for b in bases),
            mean("val_accuracy"), str(len(rows))]))
    return "\n".join(lines) + "\n"
