"""Ship a finished training run as bundled default weights, with its cross-validated figures.

    python training/ship_weights.py RUN_DIR CROSSVAL_DIR --id bagnet3d-rf9-ixi-open-v1

reads ``RUN_DIR/weights.safetensors`` (a run of ``brainbag train --recipe ixi-open-v1``) and
``CROSSVAL_DIR/metrics.json`` (``brainbag crossval`` with the same recipe), writes

* ``weights_manifest/<id>.safetensors``: the same tensors (float32), its metadata with the id and
  the cross-validated figures added (``training.crossval``),
* its entry in ``weights_manifest/manifest.json`` (sha256, size, bundled source, metrics; the
  default for its RF unless ``--no-default``),
* ``weights_manifest/<id>.md``: the model card.

Nothing is trained or measured here: every number comes from the two folders.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from brainbag.files import write_json_atomic, write_text_atomic
from brainbag.weights.file import load_weights, save_weights
from brainbag.weights.manifest import WeightsEntry, manifest_document, read_manifest

REPO = Path(__file__).resolve().parents[1]
MANIFEST_DIR = REPO / "weights_manifest"


def metrics_list(cv: dict[str, Any], command: str) -> list[dict[str, Any]]:
    """Manifest metrics from a crossval metrics.json: overall and per source, with baselines."""
    out: list[dict[str, Any]] = []
    method = (f"{cv['folds']}-fold cross-validation grouped by subject ({cv['folds_file']}), "
              f"held-out predictions pooled: {command}")
    groups = [("all", cv["overall"])] + list(cv["by_source"].items())
    for group, s in groups:
        m, b = s["model"], s["baseline"]
        dataset = "IXI" if group == "all" else f"IXI {group}"
        age, base_age = m.get("age") or {}, b.get("age") or {}
        sex, base_sex = m.get("sex") or {}, b.get("sex") or {}
        for name, value, baseline in (
            ("age_mae_years", age.get("mae"), base_age.get("mae")),
            ("age_rmse_years", age.get("rmse"), base_age.get("rmse")),
            ("age_pearson_r", age.get("r"), None),
            ("age_bias_slope", age.get("bias_slope"), None),
            ("sex_accuracy", sex.get("accuracy"), base_sex.get("accuracy")),
            ("sex_auc", sex.get("auc"), 0.5),
        ):
            if value is None:
                continue
            row = {"name": name, "value": round(float(value), 4), "dataset": dataset,
                   "split": "cross-validation (held-out folds)", "n": m["n"], "method": method}
            if baseline is not None:
                row["baseline"] = round(float(baseline), 4)
                row["baseline_method"] = cv["baseline"]
            out.append(row)
    return out


def calibration_text(cal: dict[str, Any]) -> str:
    """The model card's bullet list of a calibration (brainbag.person.clinical.fit_calibration)."""
    if not cal:
        return "- nothing: these weights carry no calibration (raw gap only)."
    lines = []
    bias = cal.get("bias_correction")
    if bias:
        lines.append(
            f"- **bias correction** (de Lange & Cole 2020): predicted = {bias['slope']:.3f} x age "
            f"+ {bias['intercept']:.2f} on the held-out scans; corrected gap = (predicted - "
            f"{bias['intercept']:.2f}) / {bias['slope']:.3f} - age. Because the slope is small, "
            f"the correction multiplies every error by {1 / bias['slope']:.1f}: on the held-out "
            f"scans the corrected gap has a standard deviation of {bias['corrected_gap_sd']:.1f} "
            f"y (the raw gap {bias['raw_gap_sd']:.1f} y) among these healthy adults: a "
            "corrected gap of that size is what healthy adults showed, not evidence of "
            "anything.")
    interval = cal.get("age_interval")
    if interval:
        lines.append(
            f"- **{interval['level']:.0%} age interval**: predicted age +/- "
            f"{interval['half_width_years']:.1f} y (split conformal on the held-out absolute "
            "errors; holds on average over ages, not at every age).")
    spread = cal.get("map_spread")
    if spread:
        lines.append(
            f"- **map spread** (brain-weighted SD of the local age map): {spread['p5']:.1f}-"
            f"{spread['p95']:.1f} y on the held-out scans (5th-95th percentile, median "
            f"{spread['median']:.1f}); a scan below {spread['warn_below']:.1f} or above "
            f"{spread['warn_above']:.1f} y is flagged.")
    sex = cal.get("sex")
    if sex:
        lo, hi = sex["undetermined"]
        lines.append(
            f"- **sex call**: F above P(female) {hi:g}, M below {lo:g}, else undetermined; a "
            f"recorded F with P < {sex['mismatch_recorded_female_below']:g} or M with P > "
            f"{sex['mismatch_recorded_male_above']:g} is flagged as a possible mix-up.")
    return "\n".join(lines)


def model_card(entry: WeightsEntry, meta: Any, cv: dict[str, Any], command: str) -> str:
    t = meta.training
    o = cv["overall"]

    def f(v: Any, fmt: str = ".2f") -> str:
        return "-" if v is None else format(v, fmt)

    rows = []
    for group, s in [("all", o)] + list(cv["by_source"].items()):
        sm, sb = s["model"], s["baseline"]
        a, ba = sm.get("age") or {}, sb.get("age") or {}
        x, bx = sm.get("sex") or {}, sb.get("sex") or {}
        rows.append(f"| {group} | {sm['n']} | {f(a.get('mae'))} | {f(ba.get('mae'))} | "
                    f"{f(s.get('mae_ratio'))} | {f(a.get('rmse'))} | {f(a.get('r'), '.3f')} | "
                    f"{f(a.get('bias_slope'), '.3f')} | {f(x.get('accuracy'), '.1%')} | "
                    f"{f(bx.get('accuracy'), '.1%')} | {f(x.get('auc'), '.3f')} |")
    lo, hi = t.get("age_range") or (None, None)
    cal = meta.calibration or {}
    cal_n = cal.get("n", "-")
    calibration = calibration_text(cal)
    return f"""# Model card: {entry.id}

BagNet-3D, receptive field {meta.rf} voxels = **{meta.rf_mm:g} mm** at the network's
**{meta.voxel_mm:g} mm** voxels (local maps on a {8 * meta.voxel_mm:g} mm grid), width
{meta.arch_kwargs.get('width')}, one network with two heads ({', '.join(meta.heads)}).
Trained with brainbag {meta.code_version} by `brainbag train
../shared/data/ixi/participants.tsv --recipe ixi-open-v1` ({t.get('epochs')} epochs,
seed {t.get('seed')}, {t.get('precision')}, on a CPU).

## What it was trained on

- {t.get('data')}; licence of the data: {t.get('licence')}.
- {t.get('images', {}).get('train')} images of {t.get('subjects', {}).get('train')} subjects, ages
  {f(lo, '.1f')}-{f(hi, '.1f')} years (mean {meta.age_scaling['mean']:.1f});
  {(t.get('sexes') or {}).get('F')} female and {(t.get('sexes') or {}).get('M')} male images.
- Two London hospitals: Hammersmith (HH) and Guy's (Guys). 50 images are scans resampled to 2 mm
  with a brain mask (all HH); 9 are native ~1 mm skull-stripped scans (HH and Guys); 2 subjects
  have both.
- Preprocessing as `brainbag predict` does it: RAS+, skull-stripped (mask), resampled to
  {meta.voxel_mm:g} mm on a world-anchored grid (smoothed first when coarsened), whitened within
  the brain; the network sees an {'x'.join(str(v) for v in meta.view or [])}-voxel box centred on
  the brain; the global age and sex are the brain-weighted means of the local maps (masked
  pooling).

## How well it predicts (cross-validated)

{cv['folds']}-fold cross-validation grouped by subject on all {cv['subjects']} subjects (folds in
`{Path(cv['folds_file']).name}`, stratified by source and age), the same recipe per fold, each
subject predicted once by the model that never saw it, through the predict pipeline. Baseline:
{cv['baseline']}, on the same folds. Command: `{command}`.

| images | n | age MAE (y) | baseline MAE | ratio | RMSE | r | bias slope | sex acc. | \
baseline acc. | sex AUC |
|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Read the native row with care: its 9 subjects are 8 women and 1 man, 7 of them aged 55-65. The
fold models predicted 52-59 years for all nine (a 34-year-old got 57.6), so **on native ~1 mm
scans these weights show no age signal** (r below 0); the sex column there is "everyone female"
(the one man got P(female) 0.98, hence AUC 0). The two subjects scanned at both resolutions were
predicted consistently across them (ages within 3.6 y, P(female) within 0.03). The overall
figures come mostly from the 2 mm HH scans.

The project's target for these weights was a cross-validated age MAE of at most 0.75x the
baseline; they reach {f(o.get('mae_ratio'))}x: **not met**. They are shipped as the best weights
measured so far, labelled as such.

The shipped weights are trained on all {cv['subjects']} subjects with the same recipe; they were
not evaluated on data they did not see beyond these cross-validation figures.

## Reading a prediction for a person

Fitted on the {cal_n} held-out predictions above and stored in the weights (`calibration`), so
`brainbag predict --age YEARS` reports:

{calibration}

## Limits

- **57 subjects from two London sites**, ages {f(lo, '.0f')}-{f(hi, '.0f')}: expect larger errors
  on other scanners, protocols, populations and ages; `brainbag predict` warns when a predicted
  age lies outside the training range.
- Like every brain-age model it regresses to the mean: young subjects are predicted older and
  old subjects younger (bias slope above). The gap between predicted and chronological age needs
  that correction before any interpretation.
- Sex accuracy is modest (see the table) and fails on the native scans; a P(female) near 0.5
  means "undetermined".
- Local maps: the global values are means over the brain of local predictions that vary far more
  than any age (single 16 mm cells range from a few years to over 300); cells at the brain's edge
  are the most extreme. Read a map as where the evidence sits, not as local ages.
- Research use only; not a medical device.

## Licence

The weights are derived from IXI data (CC BY-SA 3.0) and are shared under **CC BY-SA 3.0**:
attribute "IXI dataset, brain-development.org (Hajnal et al.)" and share adaptations alike.
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("crossval", type=Path)
    ap.add_argument("--id", required=True)
    ap.add_argument("--description", default="")
    ap.add_argument("--no-default", action="store_true")
    ap.add_argument("--command", default="brainbag crossval ../shared/data/ixi/participants.tsv "
                    "--recipe ixi-open-v1 --folds training/folds/ixi-5fold.tsv --out runs/cv-rf9")
    args = ap.parse_args()

    loaded = load_weights(args.run / "weights.safetensors")
    cv = json.loads((args.crossval / "metrics.json").read_text())
    meta = loaded.meta
    meta.id = args.id
    meta.training["crossval"] = {"overall": cv["overall"], "by_source": cv["by_source"],
                                 "folds": cv["folds"], "baseline": cv["baseline"],
                                 "command": args.command}
    meta.calibration = cv.get("calibration") or {}
    target = MANIFEST_DIR / f"{args.id}.safetensors"
    sha = save_weights(target, loaded.model, meta)
    manifest = MANIFEST_DIR / "manifest.json"
    entries = [e for e in read_manifest(manifest) if e.id != args.id]
    if not args.no_default:
        entries = [e if e.rf != meta.rf else dataclasses.replace(e, default=False)
                   for e in entries]
    preprocessing = {k: meta.preprocessing[k] for k in ("voxel_mm", "view_xyz", "orientation",
                                                       "skull_stripped", "whitening")
                     if k in meta.preprocessing}
    entry = WeightsEntry(
        id=args.id, rf=meta.rf, heads=tuple(meta.heads), sha256=sha,
        size=target.stat().st_size, architecture=meta.architecture,
        arch_kwargs=meta.arch_kwargs, preprocessing={**preprocessing, "pooling": meta.pooling},
        training={"data": meta.training.get("data"), "licence": meta.training.get("licence"),
                  "recipe": "ixi-open-v1", "age_range": meta.training.get("age_range"),
                  "subjects": meta.training.get("subjects", {}).get("train"),
                  "sites": ["HH (Hammersmith, London)", "Guys (Guy's, London)"],
                  "device": "CPU (2-core AMD EPYC development VM)"},
        licence="CC BY-SA 3.0 (derived from the IXI dataset, brain-development.org)",
        metrics=metrics_list(cv, args.command), trained=True, default=not args.no_default,
        description=args.description or (
            f"BagNet-3D RF {meta.rf} ({meta.rf_mm:g} mm at {meta.voxel_mm:g} mm voxels), age and "
            f"sex, trained on 57 IXI subjects (ixi-open-v1)"),
        bundled=target.name, manifest=manifest)
    document = manifest_document(entries + [entry], description=(
        "Weights shipped with brainbag, bundled in the package (see README.md in this folder)."))
    write_json_atomic(manifest, document)
    write_text_atomic(MANIFEST_DIR / f"{args.id}.md", model_card(entry, meta, cv, args.command))
    print(f"{target} sha256 {sha}; entry {args.id} written to {manifest}")


if __name__ == "__main__":
    main()
