"""When fine-tuning beats calibration alone, and from how many controls (issue 27, item 3).

A site held out from the base weights' training (OpenNeuro ds002748: 21 healthy controls and
51 patients with depression, ages 19-55, one scanner; the shipped bagnet3d-rf9-ixi-open-v1 was
trained on IXI only) is split at random, ``--splits`` times (seeded) for each n in ``--n``: n of
its controls are the site's "own" data, the other controls and all patients are read. Four ways
to read a person, each through the product's own code:

* **weights' calibration**: the base weights and the calibration they ship with (what
  ``brainbag predict`` gives without ``--calibration``);
* **site calibration**: the base weights, calibrated on the n controls as ``brainbag
  calibrate`` does (brainbag.person.calibration.fit_site_calibration, line ``auto``, on the base
  weights' predictions of the n);
* **fine-tuned raw**: ``brainbag train DATA --recipe finetune-small --init BASE`` on the n
  controls (brainbag.train.config.resolve and brainbag.train.trainer.run_training, the CLI's
  path), then the read scans predicted with the new weights. They carry no calibration, so
  predict reports the raw gap (predicted - age): that is the "gap" of this row;
* **fine-tuned + site calibration**: the fine-tuned weights calibrated on the same n controls,
  from their predictions of those n. The network was trained on exactly these scans, so these
  in-sample predictions are optimistic (closer to the true ages than a new person's): the line
  fitted on them understates the bias of new predictions and corrects them too little. This is
  what a site gets that calibrates on the controls it fine-tuned on; the finetune-small recipe
  says to keep calibration controls apart. Where ``brainbag calibrate`` would refuse (fewer
  than 10 controls need an offset line, and fine-tuned weights carry no calibration, so no
  slope to keep) the split counts as refused.

Every prediction goes through brainbag.train.evaluate.run_evaluate (predict's loading, checks,
masks, conforming and inference; these scans are skull-stripped, so mask = voxels > 0); every
corrected gap through clinical.read_prediction, as predict reads it (calibration_n.py's
helpers). The base weights' predictions of the site are made once and cached in
``OUT/base-predictions.tsv``; each fine-tuned model predicts its own split's scans, and a
finished split (``OUT/n*-split*/split.json``) is reused when the command is run again.

Printed, per n and method: the read controls' mean |corrected gap| and bias (mean corrected
gap; both should be 0 for healthy controls), the patients' (a small positive gap is expected in
depression, about +1 y), and the MAE of the raw predicted age, as mean +- SD over the splits;
then refusals, timings (training s per epoch and per image-epoch, s per predicted scan), the
machine and the command. ``OUT/results.json`` holds every split's figures. ``--threads 0`` (the
default) applies predict's thread choice (at most the CPUs other work leaves idle) to training
and prediction alike; ``brainbag evaluate`` and ``train`` do not choose threads themselves.

    python bench/finetune_vs_calibration.py --quick       # smoke run: n 3, 1 split, 1 epoch
    python bench/finetune_vs_calibration.py               # n 5 10 15, 3 splits each
    python bench/finetune_vs_calibration.py --n 5 10 15 --splits 5 --epochs 20 --threads 2

Data: ``../shared/data/openneuro/ds002748`` (or ``$BRAINBAG_SHARED_DATA/openneuro/ds002748``;
``--site`` for another BIDS folder with a ``group`` column). Do not run it while anything else
uses the CPU: the timings would be another job's too.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT_SITE = SHARED / "openneuro" / "ds002748"
LOCAL_WEIGHTS = REPO / "weights_manifest" / "bagnet3d-rf9-ixi-open-v1.safetensors"
BASE_ID = "bagnet3d-rf9-ixi-open-v1"
RECIPE = "finetune-small"
METHODS = ("weights", "site", "finetuned", "finetuned+site")
LABELS = {"weights": "base, weights' calibration", "site": "base + site calibration",
          "finetuned": "fine-tuned raw (no cal.)",
          "finetuned+site": "fine-tuned + site cal.*"}
GROUPS = ("controls", "patients")
METRICS = ("mean_abs_gap", "bias", "mae")
BASE_COLUMNS = ("participant_id", "group", "age", "predicted_age", "weights_sha256")

sys.path.insert(0, str(BENCH))
import strip_speed  # noqa: E402
from calibration_n import CONTROL_GROUPS, _gap_figures  # noqa: E402


def machine(device: str) -> str:
    """strip_speed's machine line (CPU model, CPUs, torch), with this run's threads and GPU."""
    import torch

    text = f"{strip_speed.machine()}, {torch.get_num_threads()} threads"
    if device == "cuda":
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def is_control(record: Any) -> bool:
    return (record.cohort or "").lower() in CONTROL_GROUPS


def write_table(path: Path, records: Sequence[Any]) -> Path:
    """A participants table of ``records`` (the product's own format, absolute paths)."""
    from brainbag.train.datasets import combined_table

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(combined_table(records))
    return path


def predict(records: Sequence[Any], weights: Path, out: Path, threads: int
            ) -> tuple[dict[str, float], float]:
    """Predicted age per participant id of ``records`` with ``weights``, through
    brainbag evaluate (predict's pipeline); and the seconds per scan."""
    from brainbag.network.inference import InferenceSettings
    from brainbag.train.evaluate import EvaluateSettings, run_evaluate

    table = write_table(out / "scans.tsv", records)
    settings = EvaluateSettings(data=table, weights=(weights,), out=out, plot=False,
                                inference=InferenceSettings(threads=threads),
                                mask_cache=out.parent / "brain_masks")
    t0 = time.perf_counter()
    result = run_evaluate(settings)[0]
    seconds = (time.perf_counter() - t0) / max(len(records), 1)
    preds = {str(r["participant_id"]): float(r["predicted_age"]) for r in result.rows
             if r["predicted_age"] is not None}
    missing = [r.participant_id for r in records if r.participant_id not in preds]
    if missing:
        sys.exit(f"{weights}: no predicted age for {', '.join(missing)}")
    return preds, seconds


def base_predictions(records: Sequence[Any], base: Any, out: Path, threads: int
                     ) -> tuple[dict[str, float], float | None]:
    """The base weights' predictions of ``records``: read from OUT/base-predictions.tsv, the
    missing ones predicted and added (rows of other weights are dropped)."""
    cache = out / "base-predictions.tsv"
    known: dict[str, dict[str, str]] = {}
    if cache.is_file():
        with open(cache, newline="", encoding="utf-8") as fh:
            known = {r["participant_id"]: r for r in csv.DictReader(fh, delimiter="\t")
                     if r.get("weights_sha256") == base.sha256}
    todo = [r for r in records if r.participant_id not in known]
    seconds = None
    if todo:
        print(f"base weights: predicting {len(todo)} scans (cached in {cache})", flush=True)
        preds, seconds = predict(todo, base.path, out / "base-eval", threads)
        for r in todo:
            known[r.participant_id] = {
                "participant_id": r.participant_id, "group": r.cohort or "", "age": repr(r.age),
                "predicted_age": repr(preds[r.participant_id]), "weights_sha256": base.sha256}
        with open(cache, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, BASE_COLUMNS, delimiter="\t", lineterminator="\n")
            writer.writeheader()
            writer.writerows(known[k] for k in sorted(known))
    return {k: float(v["predicted_age"]) for k, v in known.items()}, seconds


class EpochPrinter:
    """A training reporter (brainbag.train.record.Reporter) that prints one line per epoch."""

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def message(self, text: str) -> None:
        if text.startswith("warning"):
            print(f"    {text}", flush=True)

    def start(self, first_epoch: int, epochs: int, steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        pass

    def epoch(self, row: dict[str, Any]) -> None:
        from brainbag.train.record import format_row

        print(f"    {format_row(row, self.epochs)}", flush=True)

    def close(self) -> None:
        pass


def finetune(train: Sequence[Any], run: Path, base: Path, epochs: int | None,
             freeze: int | None) -> tuple[Path, list[float]]:
    """``brainbag train TABLE --recipe finetune-small --init BASE [--epochs] [--freeze-stages]
    --out RUN`` on ``train``, as the CLI builds its configuration; the weights and the seconds
    of each epoch."""
    from brainbag.train.config import resolve
    from brainbag.train.trainer import run_training

    table = write_table(run.parent / "train.tsv", train)
    flags = {"init": str(base), "epochs": epochs, "freeze_stages": freeze}
    config, explicit = resolve(str(table), str(run), RECIPE, flags)
    result = run_training(config, EpochPrinter(config.epochs), False, explicit)
    return result.weights, [float(h["seconds"]) for h in result.history]


def figures(calibration: dict[str, Any] | None, pred: Sequence[float], age: Sequence[float]
            ) -> dict[str, Any]:
    """Mean |gap| and bias of the gaps predict reports with ``calibration`` (the corrected gap;
    the raw gap where the calibration has no bias correction, as predict then shows), and the
    MAE of the raw predicted age."""
    from brainbag.person.calibration import corrected_gaps

    corrected = bool((calibration or {}).get("bias_correction"))
    gaps: list[float | None] = (corrected_gaps(calibration, list(pred), list(age)) if corrected
                                else [p - a for p, a in zip(pred, age, strict=True)])
    gap = _gap_figures(gaps)
    return {"n": len(pred), "gap": "corrected" if corrected else "raw",
            "mean_abs_gap": None if gap is None else gap[0],
            "bias": None if gap is None else gap[1],
            "mae": float(np.mean(np.abs(np.subtract(pred, age)))) if len(pred) else None}


def site_fit(weights: Any, pred: Sequence[float], records: Sequence[Any]) -> Any:
    """``brainbag calibrate``'s fit on these controls' predictions with ``weights``."""
    from brainbag.person.calibration import fit_site_calibration

    return fit_site_calibration(
        list(pred), [r.age for r in records], [r.sex for r in records], None,
        weights.id, weights.sha256, ids=[r.participant_id for r in records],
        weights_calibration=weights.meta.calibration or None,
        weights_age_range=weights.meta.training.get("age_range"), line="auto",
        name="bench", created="bench")


def read_split(calibration: dict[str, Any] | None, preds: dict[str, float],
               test: dict[str, Sequence[Any]]) -> dict[str, Any]:
    return {g: figures(calibration, [preds[r.participant_id] for r in rs],
                       [r.age for r in rs]) for g, rs in test.items()}


def run_split(n: int, k: int, own: Sequence[Any], test: dict[str, Sequence[Any]], base: Any,
              base_preds: dict[str, float], args: argparse.Namespace, epochs: int,
              freeze: int) -> dict[str, Any]:
    """One split: the four methods on the read scans (the fine-tuning reused when this
    split's split.json already holds it)."""
    from brainbag.errors import BrainbagError
    from brainbag.weights.resolve import open_weights

    folder = args.out / f"n{n}-split{k}-e{epochs}-f{freeze}"
    ids = {"own": [r.participant_id for r in own],
           "test": {g: [r.participant_id for r in rs] for g, rs in test.items()},
           "base_sha256": base.sha256}
    saved = folder / "split.json"
    done = json.loads(saved.read_text()) if saved.is_file() else None
    if done is not None and done.get("ids") == ids and Path(done["weights"]).is_file():
        print(f"n {n}, split {k + 1}: fine-tuned earlier, reused ({saved})", flush=True)
        ft_preds, epoch_s, predict_s = done["predicted"], done["epoch_seconds"], \
            done["predict_seconds"]
        ft_path = Path(done["weights"])
    else:
        shutil.rmtree(folder, ignore_errors=True)
        print(f"n {n}, split {k + 1}/{args.splits}: fine-tuning on {n} controls "
              f"({', '.join(ids['own'])})", flush=True)
        ft_path, epoch_s = finetune(own, folder / f"finetuned-n{n}-split{k}", base.path,
                                    args.epochs, args.freeze_stages)
        scans = list(own) + [r for rs in test.values() for r in rs]
        ft_preds, predict_s = predict(scans, ft_path, folder / "eval", args.threads)
        saved.write_text(json.dumps({"ids": ids, "weights": str(ft_path),
                                     "predicted": ft_preds, "epoch_seconds": epoch_s,
                                     "predict_seconds": predict_s}, indent=1) + "\n")
    tuned = open_weights(str(ft_path), None)
    result: dict[str, Any] = {"n": n, "split": k, "own": ids["own"], "test": ids["test"],
                              "weights": str(ft_path),
                              "epoch_seconds": epoch_s, "predict_seconds": predict_s,
                              "methods": {}, "fits": {}}
    result["methods"]["weights"] = read_split(base.meta.calibration or None, base_preds, test)
    result["methods"]["finetuned"] = read_split(tuned.meta.calibration or None, ft_preds, test)
    for method, weights, preds in (("site", base, base_preds),
                                   ("finetuned+site", tuned, ft_preds)):
        try:
            fitted = site_fit(weights, [preds[i] for i in ids["own"]], own)
        except BrainbagError as exc:
            result["methods"][method] = None
            result["fits"][method] = {"refused": str(exc)}
            continue
        result["fits"][method] = {"line": fitted.line, "slope": fitted.slope,
                                  "intercept": fitted.intercept, "warnings": fitted.warnings}
        result["methods"][method] = read_split(fitted.to_weights_calibration(), preds, test)
    return result


def summarise(splits: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Mean and SD over splits of every figure, per method and group; refusals counted."""
    out: dict[str, Any] = {}
    for method in METHODS:
        done = [s["methods"][method] for s in splits if s["methods"].get(method)]
        cell: dict[str, Any] = {"splits": len(done), "refused": len(splits) - len(done)}
        for group in GROUPS:
            for metric in METRICS:
                values = [d[group][metric] for d in done if d[group][metric] is not None]
                cell[f"{group}_{metric}"] = {
                    "mean": float(np.mean(values)) if values else None,
                    "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}
        out[method] = cell
    return out


def _cell(figure: dict[str, Any], signed: bool = False) -> str:
    if figure["mean"] is None:
        return f"{'-':>13}"
    sd = "" if figure["sd"] is None else f" +-{figure['sd']:4.1f}"
    return f"{figure['mean']:{'+' if signed else ''}6.1f}{sd:<7}"


def print_table(summary: dict[int, dict[str, Any]], splits: int) -> None:
    print(f"\nmean +- SD over {splits} split(s), years; gap = corrected gap as predict reports "
          "it (fine-tuned raw: the raw gap,\nthose weights carry no calibration); bias = mean "
          "gap; MAE of the raw predicted age")
    head = (f"{'n':>3}  {'method':<27}{'ctrl |gap|':>13}{'ctrl bias':>13}{'pat |gap|':>13}"
            f"{'pat bias':>13}{'ctrl MAE':>13}{'pat MAE':>13}  refused")
    print(head)
    print("-" * len(head))
    for n, cells in summary.items():
        for method in METHODS:
            c = cells[method]
            print(f"{n:>3}  {LABELS[method]:<27}"
                  + "".join(_cell(c[f"{g}_{m}"], m == "bias")
                            for g, m in (("controls", "mean_abs_gap"), ("controls", "bias"),
                                         ("patients", "mean_abs_gap"), ("patients", "bias"),
                                         ("controls", "mae"), ("patients", "mae")))
                  + f"  {c['refused']}/{c['splits'] + c['refused']}")
    print("* calibrated on the fine-tuned weights' predictions of the n controls they were "
          "trained on: in-sample\n  predictions are optimistic (closer to the true ages than a "
          "new person's), so this line understates\n  the bias of new predictions; in practice "
          "keep calibration controls out of the fine-tuning data (the\n  finetune-small recipe "
          "says so). Refused: calibrate refuses an offset line for weights without a slope.")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[5, 10, 15],
                    help="controls the site fits on (default 5 10 15)")
    ap.add_argument("--splits", type=int, default=3, help="random splits per n (default 3)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the splits (default 0)")
    ap.add_argument("--epochs", type=int, help=f"fine-tuning epochs (default: {RECIPE}'s)")
    ap.add_argument("--freeze-stages", type=int,
                    help=f"stages kept fixed (default: {RECIPE}'s)")
    ap.add_argument("--weights", default=None,
                    help=f"base weights, a file or an id (default: {BASE_ID}, the file in "
                         "weights_manifest/ when present)")
    ap.add_argument("--site", type=Path, default=DEFAULT_SITE,
                    help="the held-out site, a BIDS folder whose participants.tsv has a group "
                         "column (default: ds002748 of the shared data)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/brainbag-finetune-vs-calibration"),
                    help="work and results folder (default %(default)s)")
    ap.add_argument("--threads", type=int, default=0,
                    help="CPU threads for training and prediction (0 = as predict chooses: at "
                         "most the CPUs other work leaves idle)")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run: n 3, 1 split, 1 epoch, 6 read scans (3 controls, 3 "
                         "patients)")
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.splits, args.epochs = [3], 1, 1
    t0 = time.perf_counter()
    import torch

    from brainbag.network.inference import resolve_threads
    from brainbag.train.config import load_recipe
    from brainbag.train.datasets import discover
    from brainbag.weights.resolve import open_weights

    if not (args.site / "participants.tsv").is_file():
        sys.exit(f"{args.site}/participants.tsv not found; set BRAINBAG_SHARED_DATA or give "
                 "--site")
    spec = args.weights or (str(LOCAL_WEIGHTS) if LOCAL_WEIGHTS.is_file() else BASE_ID)
    base = open_weights(spec, None)
    if not base.meta.calibration:
        sys.exit(f"base weights {base.id} carry no calibration")
    recipe, _ = load_recipe(RECIPE)
    epochs = args.epochs if args.epochs is not None else int(recipe["epochs"])
    freeze = args.freeze_stages if args.freeze_stages is not None \
        else int(recipe["freeze_stages"])
    records = [r for r in discover(args.site).records if r.age is not None]
    controls = [r for r in records if is_control(r)]
    patients = [r for r in records if not is_control(r)]
    bad = [n for n in args.n if not 3 <= n < len(controls)]
    if bad:
        sys.exit(f"--n {bad}: between 3 and {len(controls) - 1} ({len(controls)} controls)")
    args.out.mkdir(parents=True, exist_ok=True)
    # predict's thread policy (0: the CPUs other work leaves idle), for training too: neither
    # run_evaluate nor run_training sets it, and more threads than idle CPUs is many times slower
    resolve_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"site {args.site}: {len(controls)} controls, {len(patients)} patients; base weights "
          f"{base.id} (sha256 {base.sha256[:12]}...); {RECIPE}: {epochs} epochs, "
          f"{freeze} stages frozen; {machine(device)}", flush=True)

    plans = []
    for n in args.n:
        for k in range(args.splits):
            order = np.random.default_rng([args.seed, n, k]).permutation(len(controls))
            own = [controls[i] for i in order[:n]]
            rest = [controls[i] for i in order[n:]]
            read = {"controls": rest, "patients": patients}
            if args.quick:
                pick = np.random.default_rng([args.seed, 1]).permutation(len(patients))[:3]
                read = {"controls": rest[:3], "patients": [patients[i] for i in sorted(pick)]}
            plans.append((n, k, own, read))
    needed = {r.participant_id: r for _, _, own, read in plans
              for r in [*own, *(x for rs in read.values() for x in rs)]}
    base_preds, base_seconds = base_predictions(list(needed.values()), base, args.out,
                                                args.threads)
    results = [run_split(n, k, own, read, base, base_preds, args, epochs, freeze)
               for n, k, own, read in plans]
    summary = {n: summarise([s for s in results if s["n"] == n]) for n in args.n}
    print_table(summary, args.splits)
    for s in results:
        refused = {m: f["refused"] for m, f in s["fits"].items() if "refused" in f}
        for m, why in refused.items():
            print(f"refused (n {s['n']}, split {s['split'] + 1}, {m}): {why}")
    epoch_s = [e for s in results for e in s["epoch_seconds"]]
    image_epoch = [e / s["n"] for s in results for e in s["epoch_seconds"]]
    predict_s = [s["predict_seconds"] for s in results]
    wall = time.perf_counter() - t0
    timing = {"epoch_seconds_mean": float(np.mean(epoch_s)),
              "image_epoch_seconds_mean": float(np.mean(image_epoch)),
              "predict_seconds_per_scan_mean": float(np.mean(predict_s)),
              "base_predict_seconds_per_scan": base_seconds, "wall_seconds": wall}
    print(f"\ntraining {np.mean(epoch_s):.1f} s per epoch ({np.mean(image_epoch):.2f} s per "
          f"image-epoch); prediction {np.mean(predict_s):.2f} s per scan (fine-tuned"
          + (f"), {base_seconds:.2f} s per scan (base)" if base_seconds is not None else ")"))
    command = shlex.join([sys.executable, *sys.argv]) if argv is None else \
        shlex.join(["bench/finetune_vs_calibration.py", *argv])
    print(f"machine: {machine(device)}\nwall time {wall:.0f} s\ncommand: {command}")
    report = {"site": str(args.site), "controls": len(controls), "patients": len(patients),
              "base_weights": {"id": base.id, "sha256": base.sha256, "path": str(base.path)},
              "recipe": RECIPE, "epochs": epochs, "freeze_stages": freeze, "seed": args.seed,
              "splits": args.splits, "quick": args.quick, "machine": machine(device),
              "command": command, "timing": timing,
              "summary": {str(n): v for n, v in summary.items()}, "per_split": results}
    (args.out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"per-split figures: {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
