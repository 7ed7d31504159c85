"""Sharded prediction: throughput of N shards against one process, and the cost of a merge.

    python bench/shards.py throughput --shards 2 --scans 50     # real IXI 2 mm scans
    python bench/shards.py merge --rows 10000 --shards 8         # synthetic shard set

``throughput`` runs the real CLI with the bundled default weights on the first ``--scans`` scans
of ``../shared/data/ixi/2mm`` (with their masks, ``--mask-pattern '{prefix}_mask.nii.gz'``):
once as one process, then as ``--shards`` processes started together (``--shard K/N``), every
process with ``--threads 1 --jobs 0`` so that each uses one core. It prints wall times,
scans/minute and the ratio of the sharded throughput to N times the single one (the issue's
target: at least 0.9 when the machine has a core per shard). Do not run it while anything else
uses the CPU.

``merge`` writes a synthetic set of shard tables and states (``--rows`` inputs over ``--shards``
shards) and times :func:`brainbag.run.shards.merge` (reading, checking, writing predictions.tsv;
no index.html: no PNGs) over ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"


def _folder(work: Path, scans: int) -> Path:
    source = SHARED / "ixi" / "2mm"
    if not source.is_dir():
        sys.exit(f"{source} not found; set BRAINBAG_SHARED_DATA")
    folder = work / "scans"
    folder.mkdir(parents=True, exist_ok=True)
    for t1 in sorted(source.glob("*_T1w.nii.gz"))[:scans]:
        mask = t1.with_name(t1.name.replace("_T1w", "_mask"))
        for path in (t1, mask):
            link = folder / path.name
            if not link.exists():
                link.symlink_to(path)
    return folder


def _cmd(folder: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "brainbag", "predict", str(folder), "--out", str(out),
            "--mask-pattern", "{prefix}_mask.nii.gz", "--threads", "1", "--jobs", "0",
            "--no-png", *extra]


def throughput(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="brainbag-shards-"))
    folder = _folder(work, args.scans)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    n = len(list(folder.glob("*_T1w.nii.gz")))
    print(f"machine: {_machine()}; {n} scans of {SHARED / 'ixi' / '2mm'}; bundled default "
          f"RF 9 weights; every process --threads 1 --jobs 0; {args.rounds} round(s)")
    singles, sharded = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        subprocess.run(_cmd(folder, work / f"one-{r}"), env=env, check=True,
                       capture_output=True)
        singles.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        procs = [subprocess.Popen(_cmd(folder, work / f"sharded-{r}", "--shard",
                                       f"{k}/{args.shards}"), env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for k in range(1, args.shards + 1)]
        for p in procs:
            _, err = p.communicate()
            if p.returncode != 0:
                sys.exit(f"a shard failed: {err.decode()[-2000:]}")
        sharded.append(time.perf_counter() - t0)
        if not (work / f"sharded-{r}" / "predictions.tsv").exists():
            sys.exit("the shards did not merge")
    one, many = statistics.median(singles), statistics.median(sharded)
    ratio = (n / many) / (args.shards * n / one)
    print("| run | wall s (median) | all rounds | scans/min |")
    print("|---|---|---|---|")
    print(f"| 1 process | {one:.1f} | {', '.join(f'{t:.1f}' for t in singles)} | "
          f"{60 * n / one:.1f} |")
    print(f"| {args.shards} shards | {many:.1f} | {', '.join(f'{t:.1f}' for t in sharded)} | "
          f"{60 * n / many:.1f} |")
    print(f"sharded throughput / ({args.shards} x single) = {ratio:.2f} (target >= 0.9)")


def merge_cost(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from test_shards import _fake_shards  # the synthetic shard set the tests check

    from brainbag.run.shards import merge

    times = []
    with tempfile.TemporaryDirectory() as tmp:
        _fake_shards(Path(tmp), args.rows, args.shards)
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            result = merge(Path(tmp))
            times.append(time.perf_counter() - t0)
    assert len(result.rows) == args.rows and result.complete
    print(f"machine: {_machine()}; merge of {args.rows} rows in {args.shards} shards: median "
          f"{statistics.median(times):.2f} s, min {min(times):.2f} s over {args.repeat} runs "
          "(target < 5 s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--shards", type=int, default=2)
    t.add_argument("--scans", type=int, default=50)
    t.add_argument("--rounds", type=int, default=1)
    m = sub.add_parser("merge")
    m.add_argument("--rows", type=int, default=10_000)
    m.add_argument("--shards", type=int, default=8)
    m.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    throughput(args) if args.what == "throughput" else merge_cost(args)


if __name__ == "__main__":
    main()
