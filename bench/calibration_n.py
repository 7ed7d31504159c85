"""How many controls a site calibration needs: the measurement behind issue 27's first target.

For each site held out from the weights' training, calibrate on n of its controls and read the
rest: repeatedly (``--splits``, default 200 random splits per n), for n = 5, 10, 20 and half the
controls. Each held-out control is healthy, so its corrected gap should be 0; reported per n:

* mean |corrected gap| and bias (mean corrected gap; and the mean of |bias| over splits, the
  bias one calibration leaves) of the held-out controls read with the weights' own calibration
  and with the site calibration (``auto``: the line brainbag chooses; ``full`` and ``offset``
  forced), every gap computed by clinical.read_prediction as predict does;
* the ratio site / weights and whether it meets the target (at most 0.5 for both);
* the SD over splits of the slope fitted on the n controls, the share of splits where ``auto``
  fitted the full line, and the splits a forced line refused.

The "weights' own calibration" is fitted (clinical.fit_calibration) on the rows of the other
sites in the file (held-out predictions of the training sites, as ``brainbag crossval`` fits it
for the weights) or read from ``--weights FILE``'s metadata.

Inputs: a TSV/CSV of held-out predictions with columns ``participant_id, age, predicted`` (or
``predicted_age``, as ``brainbag crossval`` writes), ``site`` (or ``source``) and ``group``
(absent: all controls); or a JSON file with a ``preds`` list of ``{key, site, group, age, pred,
pred_tta}`` (``--tta`` reads ``pred_tta``). ``--synthetic`` makes the data instead: a reference
site following the shipped weights' held-out line (slope 0.315, intercept 37.84, residual SD
5.26 y, from their 59 real cross-validated predictions) and three held-out sites with their own
bias, and prints the slope-SD table quoted in brainbag/person/calibration.py.

    python bench/calibration_n.py --synthetic
    python bench/calibration_n.py /work/local/exp/out/RUN.json --site ds002748 --tta
    python bench/calibration_n.py runs/cv/predictions.tsv --weights W.safetensors --site HH
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from brainbag.errors import BrainbagError
from brainbag.person.calibration import (
    MIN_SLOPE,
    corrected_gaps,
    fit_site_calibration,
)
from brainbag.person.clinical import fit_calibration

#: the shipped weights' (bagnet3d-rf9-ixi-open-v1) line on their 59 held-out predictions
WEIGHTS_SLOPE, WEIGHTS_INTERCEPT = 0.314865, 37.835695
WEIGHTS_RESIDUAL_SD = 0.314865 * 16.7077
CONTROL_GROUPS = {"", "control", "controls", "hc", "healthy"}
METHODS = ("weights", "auto", "full", "offset")


def read_rows(path: Path, tta: bool) -> list[dict[str, Any]]:
    """Rows {id, site, group, age, predicted} of a predictions table or an experiment JSON."""
    if path.suffix.lower() == ".json":
        data = json.loads(path.read_text())
        key = "pred_tta" if tta else "pred"
        return [{"id": str(p.get("key")), "site": str(p.get("site", "")),
                 "group": str(p.get("group", "control")), "age": p.get("age"),
                 "predicted": p.get(key)} for p in data["preds"]]
    from brainbag.person.tables import parse_age, read_table

    header, table = read_table(path)
    pred_col = next((c for c in ("predicted", "predicted_age") if c in header), None)
    site_col = next((c for c in ("site", "source") if c in header), None)
    if pred_col is None or "age" not in header:
        sys.exit(f"{path}: needs columns age and predicted (or predicted_age), has {header}")
    rows = []
    for k, r in enumerate(table, start=2):
        where = f"{path}, row {k}"
        rows.append({"id": r.get("participant_id", str(k)),
                     "site": r.get(site_col, "") if site_col else "",
                     "group": r.get("group", "control"), "age": parse_age(r["age"], where),
                     "predicted": parse_age(r[pred_col], where, pred_col)})
    return rows


def synthetic_rows(seed: int) -> list[dict[str, Any]]:
    """A reference site on the shipped weights' held-out line and three held-out sites: young
    adults predicted ~30 y too old with a steeper slope, old adults predicted ~17 y too young
    (the issue's figures) on the weights' own slope, and a wide-age site predicted 10 y too
    young with half the slope."""
    rng = np.random.default_rng(seed)
    sites = [("synthetic-reference", 59, 23.0, 74.0, 1.0, 0.0),
             ("synthetic-young", 50, 19.0, 55.0, 1.5, 17.5),
             ("synthetic-old", 50, 69.0, 96.0, 1.0, 1.7),
             ("synthetic-flat", 50, 20.0, 80.0, 0.5, -10.0)]
    rows = []
    for site, n, lo, hi, slope_factor, shift in sites:
        age = rng.uniform(lo, hi, n)
        line = WEIGHTS_SLOPE * age + WEIGHTS_INTERCEPT + shift
        pred = line + (slope_factor - 1) * WEIGHTS_SLOPE * (age - age.mean())
        pred = pred + rng.normal(0.0, WEIGHTS_RESIDUAL_SD, n)
        rows += [{"id": f"{site}-{i}", "site": site, "group": "control", "age": float(a),
                  "predicted": float(p)} for i, (a, p) in enumerate(zip(age, pred, strict=True))]
    return rows


def slope_table(seed: int, draws: int = 2000) -> list[str]:
    """SD of the least-squares slope fitted on n controls whose predictions carry the shipped
    weights' noise, and the share of fits at or below MIN_SLOPE (the docstring's table)."""
    rng = np.random.default_rng(seed)
    lines = [f"slope SD of a line fitted on n controls (shipped weights' noise: slope "
             f"{WEIGHTS_SLOPE:.3f}, residual SD {WEIGHTS_RESIDUAL_SD:.2f} y; {draws} draws), "
             f"and [share of slopes <= {MIN_SLOPE}]",
             f"{'ages (y)':<10}" + "".join(f"{'n = ' + str(n):>18}" for n in (5, 10, 20, 40))]
    for lo, hi in ((23, 74), (19, 55), (69, 96)):
        cells = []
        for n in (5, 10, 20, 40):
            age = rng.uniform(lo, hi, (draws, n))
            pred = WEIGHTS_SLOPE * age + rng.normal(0.0, WEIGHTS_RESIDUAL_SD, (draws, n))
            am = age - age.mean(axis=1, keepdims=True)
            slope = (am * pred).sum(axis=1) / (am ** 2).sum(axis=1)
            cells.append(f"{slope.std(ddof=1):.3f} [{np.mean(slope <= MIN_SLOPE):4.0%}]")
        lines.append(f"{f'{lo}-{hi}':<10}" + "".join(f"{c:>18}" for c in cells))
    return lines


def reference_calibration(rows: Sequence[dict[str, Any]], held_out: str,
                          weights: Path | None, reference_sites: Sequence[str]
                          ) -> tuple[dict[str, Any], str]:
    if weights is not None:
        from brainbag.weights.file import read_meta

        meta = read_meta(weights)
        if not meta.calibration:
            sys.exit(f"weights {weights} carry no calibration")
        return meta.calibration, f"weights {meta.id}"
    sites = sorted(set(reference_sites) or {r["site"] for r in rows} - {held_out})
    ref = [{"age": r["age"], "predicted_age": r["predicted"]} for r in rows
           if r["site"] in sites and r["site"] != held_out
           and r["group"].lower() in CONTROL_GROUPS and r["age"] is not None
           and r["predicted"] is not None]
    if len(ref) < 3:
        sys.exit(f"no other sites' controls to fit the weights' own calibration for held-out "
                 f"site {held_out!r}; pass --weights FILE or --reference-site")
    return fit_calibration(ref, fitted_on="reference sites"), (
        f"fitted on {len(ref)} controls of {', '.join(sites)}")


def _gap_figures(gaps: Sequence[float | None]) -> tuple[float, float] | None:
    values = [g for g in gaps if g is not None]
    if not values:
        return None
    return float(np.mean(np.abs(values))), float(np.mean(values))


def evaluate_site(rows: Sequence[dict[str, Any]], site: str, ns: Sequence[str],
                  reference: dict[str, Any], splits: int, seed: int,
                  resamples: int) -> list[dict[str, Any]]:
    controls = [r for r in rows if r["site"] == site and r["group"].lower() in CONTROL_GROUPS
                and r["age"] is not None and r["predicted"] is not None]
    age = np.array([r["age"] for r in controls], dtype=float)
    pred = np.array([r["predicted"] for r in controls], dtype=float)
    total = len(controls)
    out = []
    for spec in ns:
        n = total // 2 if spec == "half" else int(spec)
        if n < 3 or n >= total:
            out.append({"site": site, "n": spec, "skipped": f"{total} controls"})
            continue
        rng = np.random.default_rng(seed)
        figures: dict[str, list[tuple[float, float]]] = {m: [] for m in METHODS}
        refused = {m: 0 for m in METHODS}
        slopes, full_chosen = [], 0
        for _ in range(splits):
            order = rng.permutation(total)
            cal, test = order[:n], order[n:]
            if np.ptp(age[cal]) > 0:
                slopes.append(float(np.polyfit(age[cal], pred[cal], 1)[0]))
            w = _gap_figures(corrected_gaps(reference, pred[test].tolist(), age[test].tolist()))
            if w is not None:
                figures["weights"].append(w)
            for line in ("auto", "full", "offset"):
                try:
                    fitted = fit_site_calibration(
                        pred[cal].tolist(), age[cal].tolist(), None, None, "bench", "0" * 64,
                        weights_calibration=reference, line=line, resamples=resamples,
                        seed=seed, created="bench")
                except BrainbagError:
                    refused[line] += 1
                    continue
                full_chosen += line == "auto" and fitted.line == "full"
                g = _gap_figures(corrected_gaps(fitted.to_weights_calibration(),
                                                pred[test].tolist(), age[test].tolist()))
                if g is not None:
                    figures[line].append(g)
        result: dict[str, Any] = {"site": site, "n": spec, "n_calibrate": n,
                                  "n_read": total - n, "splits": splits,
                                  "slope_sd": float(np.std(slopes, ddof=1)) if len(slopes) > 1
                                  else None,
                                  "slope_mean": float(np.mean(slopes)) if slopes else None,
                                  "auto_full_share": full_chosen / splits}
        for m in METHODS:
            f = np.array(figures[m]) if figures[m] else np.zeros((0, 2))
            result[m] = {"refused": refused[m], "mean_abs_gap": None, "bias": None,
                         "mean_abs_bias": None}
            if len(f):
                result[m].update(mean_abs_gap=float(f[:, 0].mean()), bias=float(f[:, 1].mean()),
                                 mean_abs_bias=float(np.abs(f[:, 1]).mean()))
        w, a = result["weights"], result["auto"]
        if w["mean_abs_gap"] is not None and a["mean_abs_gap"] is not None:
            result["ratio_mean_abs_gap"] = a["mean_abs_gap"] / w["mean_abs_gap"]
            result["ratio_abs_bias"] = a["mean_abs_bias"] / max(w["mean_abs_bias"], 1e-9)
            result["target_met"] = (result["ratio_mean_abs_gap"] <= 0.5
                                    and result["ratio_abs_bias"] <= 0.5)
        out.append(result)
    return out


def print_site(results: Sequence[dict[str, Any]], site: str, reference_label: str,
               total: int) -> None:
    print(f"\nheld-out site {site}: {total} controls; weights' own calibration {reference_label}")
    print(f"{'n':>6} {'read':>5} {'slope SD':>9} {'auto=full':>9}   "
          + "   ".join(f"{m + ' |gap|/bias/|bias|':>26}" for m in METHODS)
          + f"   {'ratio |gap|':>11} {'ratio |bias|':>12} target")
    for r in results:
        if "skipped" in r:
            print(f"{r['n']:>6} skipped: {r['skipped']}")
            continue
        cells = []
        for m in METHODS:
            f = r[m]
            cells.append(f"{'refused ' + str(f['refused']):>26}" if f["mean_abs_gap"] is None
                         else
                         f"{f['mean_abs_gap']:8.1f} {f['bias']:+7.1f} {f['mean_abs_bias']:6.1f}"
                         + (f" r{f['refused']:<3d}" if f["refused"] else "     "))
        sd = "-" if r["slope_sd"] is None else f"{r['slope_sd']:.3f}"
        print(f"{str(r['n']) + '=' + str(r['n_calibrate']) if r['n'] == 'half' else r['n']:>6}"
              f" {r['n_read']:>5} {sd:>9} {r['auto_full_share']:>9.0%}   " + "   ".join(cells)
              + f"   {r.get('ratio_mean_abs_gap', float('nan')):>11.2f}"
              f" {r.get('ratio_abs_bias', float('nan')):>12.2f} "
              f"{'met' if r.get('target_met') else 'NOT met'}")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("predictions", nargs="?", type=Path,
                    help="held-out predictions (.tsv/.csv or experiment .json)")
    ap.add_argument("--synthetic", action="store_true", help="simulate the data (see above)")
    ap.add_argument("--site", action="append", default=[],
                    help="held-out site (repeatable; default: every site except the reference)")
    ap.add_argument("--n", nargs="+", default=["5", "10", "20", "half"])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples per fit")
    ap.add_argument("--weights", type=Path, help="read the weights' own calibration from here")
    ap.add_argument("--reference-site", action="append", default=[],
                    help="fit the weights' own calibration on these sites' controls "
                         "(repeatable; default: every other site)")
    ap.add_argument("--tta", action="store_true", help="JSON input: use pred_tta")
    ap.add_argument("--out", type=Path, help="also write the figures as JSON")
    args = ap.parse_args(argv)
    if args.synthetic == (args.predictions is not None):
        ap.error("give a predictions file or --synthetic (one of them)")
    for spec in args.n:
        if spec != "half" and not spec.isdigit():
            ap.error(f"--n takes numbers or 'half', got {spec!r}")
    t0 = time.perf_counter()
    if args.synthetic:
        rows = synthetic_rows(args.seed)
        print("\n".join(slope_table(args.seed)))
        sites = args.site or sorted({r["site"] for r in rows} - {"synthetic-reference"})
        args.reference_site = args.reference_site or ["synthetic-reference"]
    else:
        rows = read_rows(args.predictions, args.tta)
        sites = args.site or sorted({r["site"] for r in rows} - set(args.reference_site))
    missing = [s for s in sites if not any(r["site"] == s for r in rows)]
    if missing:
        sys.exit(f"no rows of site(s) {', '.join(missing)}; the file has "
                 f"{', '.join(sorted({r['site'] for r in rows}))}")
    print(f"\nper cell: mean |corrected gap| of the held-out controls, mean bias, mean |bias| "
          f"over {args.splits} splits (y); rN = splits the forced line refused; ratio and "
          "target: auto vs weights (target: both ratios <= 0.5)")
    report = []
    for site in sites:
        reference, label = reference_calibration(rows, site, args.weights,
                                                 args.reference_site)
        results = evaluate_site(rows, site, args.n, reference, args.splits, args.seed,
                                args.resamples)
        total = sum(1 for r in rows if r["site"] == site and r["group"].lower() in CONTROL_GROUPS)
        print_site(results, site, label, total)
        report.append({"site": site, "reference": label, "results": results})
    print(f"\n{time.perf_counter() - t0:.1f} s")
    if args.out:
        args.out.write_text(json.dumps({"synthetic": args.synthetic, "sites": report},
                                       indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
