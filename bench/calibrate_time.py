"""How long ``brainbag calibrate`` takes against ``brainbag predict`` on the same controls.

Issue 27's target: calibrate on 20 controls takes no longer than predicting them plus one
second (the fit, its 2000-resample bootstrap and the file cost next to nothing; the scans are
the work).

    python bench/calibrate_time.py                      # 20 controls of ds002748, shipped weights
    python bench/calibrate_time.py --n 3 --repeats 1    # a quick check that it runs
    python bench/calibrate_time.py --controls my.txt -- --device cuda --weights ID

The controls are a list file (``path<TAB>mask<TAB>age<TAB>sex``; ``--controls``) or, by
default, the first ``--n`` healthy controls of ``../shared/data/openneuro/ds002748`` (its
``participants.tsv``: group ``control``). Each round runs, as separate processes of the real
CLI, in an order that alternates between rounds: ``predict LIST`` (its defaults: PNGs and
index.html for a list), ``predict LIST --no-png`` (the same work calibrate does) and
``calibrate LIST``. Options after ``--`` go to all three (weights, device, threads). Printed:
each command's wall times, medians, and calibrate minus each predict against the target.
Do not run it while anything else uses the CPU or the GPU.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET_S = 1.0


def default_controls(work: Path, n: int) -> Path:
    """A list file of the first ``n`` healthy controls of ds002748 with their ages and sexes."""
    root = SHARED / "openneuro" / "ds002748"
    table = root / "participants.tsv"
    if not table.is_file():
        sys.exit(f"{table} not found; set BRAINBAG_SHARED_DATA or give --controls")
    with open(table, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.DictReader(fh, delimiter="\t") if r.get("group") == "control"]
    if len(rows) < n:
        sys.exit(f"{table} has {len(rows)} controls, fewer than --n {n}")
    lines = []
    for r in rows[:n]:
        sub = r["participant_id"]
        scan = root / sub / "anat" / f"{sub}_T1w.nii.gz"
        sex = {"f": "F", "m": "M"}.get(r.get("gender", "").lower(), "")
        lines.append(f"{scan}\t\t{r['age']}\t{sex}")
    listing = work / "controls.txt"
    listing.write_text("\n".join(lines) + "\n")
    return listing


def run(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--controls", type=Path, help="list file of controls with ages")
    parser.add_argument("--n", type=int, default=20, help="controls of ds002748 (default 20)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("extra", nargs="*", help="options for predict and calibrate (after --)")
    args = parser.parse_args()
    cli = [sys.executable, "-m", "brainbag"]
    with tempfile.TemporaryDirectory(prefix="brainbag-bench-") as tmp:
        work = Path(tmp)
        listing = args.controls or default_controls(work, args.n)
        count = sum(1 for line in listing.read_text().splitlines()
                    if line.strip() and not line.startswith("#"))
        commands = {
            "predict": lambda k: [*cli, "predict", str(listing), "--out",
                                  str(work / f"p{k}"), *args.extra],
            "predict --no-png": lambda k: [*cli, "predict", str(listing), "--out",
                                           str(work / f"q{k}"), "--no-png", *args.extra],
            "calibrate": lambda k: [*cli, "calibrate", str(listing), "--out",
                                    str(work / f"c{k}.json"), *args.extra],
        }
        times: dict[str, list[float]] = {name: [] for name in commands}
        for k in range(args.repeats):
            order = list(commands) if k % 2 == 0 else list(reversed(commands))
            for name in order:
                times[name].append(run(commands[name](k)))
                for p in work.glob(f"[pq]{k}"):
                    shutil.rmtree(p, ignore_errors=True)
    print(f"{count} controls ({listing}); {args.repeats} rounds; "
          f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"options: {' '.join(args.extra) or '(defaults)'}")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        print(f"  {name:<18} median {medians[name]:7.2f} s   runs "
              + ", ".join(f"{v:.2f}" for v in values))
    for base in ("predict", "predict --no-png"):
        extra = medians["calibrate"] - medians[base]
        verdict = "met" if extra <= TARGET_S else "NOT met"
        print(f"  calibrate - {base:<18} {extra:+6.2f} s   target <= +{TARGET_S:g} s: {verdict}")


if __name__ == "__main__":
    main()
