"""Predict speed with N threads on an idle machine and with one core taken by another job.

Runs ``brainbag predict`` (bundled weights, offline) on a few sample scans in a fresh process per
run, once with the machine as it is and once while a busy-loop process occupies one core, and
prints the summed per-scan seconds (prediction.json ``seconds``: checks, preprocessing,
inference, writing) and the threads each run used. Rows are interleaved over ``--rounds``.

    python bench/busy_threads.py --threads 0 1 2 --rounds 2

``0`` is the default (auto). Busy rows start the busy loop ``--warmup`` seconds before the run so
that the 1-minute load average sees it, as it sees a job that has been running for a while.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "data" / "samples"
SCANS = ("ch2bet.nii.gz", "vxm_test_vol.nii.gz", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")


def run_once(threads: int, scans: list[Path]) -> tuple[float, float, list[int]]:
    """Summed per-scan seconds, wall seconds and the threads recorded by one predict run."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd = [sys.executable, "-m", "brainbag", "predict", *map(str, scans), "-o", str(out),
               "--offline", "--no-png", "--threads", str(threads)]
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, capture_output=True)
        wall = time.perf_counter() - t0
        with open(out / "predictions.tsv", newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh, delimiter="\t"))
        seconds = sum(float(r["seconds"]) for r in rows)
        used = [json.loads((out / r["output"]).read_text())["threads"] for r in rows]
    return seconds, wall, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=float, default=60.0)
    args = parser.parse_args()
    scans = [SAMPLES / s for s in SCANS]
    missing = [s for s in scans if not s.exists()]
    if missing:
        sys.exit(f"sample scans missing: {missing}")
    print(f"{len(scans)} scans per run; CPUs {os.cpu_count()}; load at start {os.getloadavg()}")
    print("machine\tthreads asked\tthreads used\tsum of scan seconds\twall s\tload 1 min")
    for busy in (False, True):
        hog = None
        if busy:
            hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            time.sleep(args.warmup)
        try:
            for _ in range(args.rounds):
                for threads in args.threads:
                    load = os.getloadavg()[0]
                    seconds, wall, used = run_once(threads, scans)
                    print(f"{'busy' if busy else 'as is'}\t{threads or 'default'}\t"
                          f"{sorted(set(used))}\t{seconds:.1f}\t{wall:.1f}\t{load:.2f}",
                          flush=True)
        finally:
            if hog is not None:
                hog.kill()
                hog.wait()


if __name__ == "__main__":
    main()
