"""Per-stage time of ``brainbag predict`` on three kinds of scan, before and after a change.

    python bench/pipeline_stages.py --before main                 # main against this tree
    python bench/pipeline_stages.py --before main --scans 2       # a quick run on 2 scans a kind
    python bench/pipeline_stages.py --kinds 2mm --rounds 3        # this tree only, 3 rounds

For each side (``--before REF``: that git ref, checked out in a temporary ``git worktree``;
``after``: this working tree) and each kind of scan, runs the real command line,
``python -m brainbag predict LIST --jobs 0 --no-png`` with the shipped weights (stages in turn,
so no read-ahead overlaps them), in a fresh process and output folder, then reads every
``prediction.json``'s ``timings_s`` and prints per kind and side:

* the median over scans of each stage: load, checks, preprocess, inference, write (seconds);
* ``other/inf``: the median over scans of (load + checks + preprocess + write) / inference,
  the ratio issue 26 asks to bring to 2 or less;
* scans per minute of the whole batch (wall time of the command: Python start, imports and
  loading the weights included) and from the scans' own totals (``scans/min net``).

The kinds (``--data``: the shared data folder, ``BRAINBAG_SHARED_DATA`` by default):

* ``2mm``: ``ixi/2mm/*_T1w.nii.gz``, 120x120x90 at 2 mm, skull on, each with its ``_mask`` file;
* ``native``: ``ixi/native/*_T1w.nii.gz``, 256x256x150 at 0.94x0.94x1.2 mm, skull-stripped;
* ``aniso``: ``samples/beijing_sub08251_mprage_skullstripped.nii.gz`` (1.33x1x1 mm, the one such
  scan we have), hard-linked (or copied) under ``--scans`` names.

``--scans N`` takes the first N scans of each kind (default: every 2 mm and native scan, 10 copies
of the anisotropic one). ``--rounds R`` alternates the sides R times and pools the scans, which
evens out a busy machine. Timings depend on the machine and on what else runs on it: quote them
with the machine and the command. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
STAGES = ("load", "checks", "preprocess", "inference", "write")
KINDS = ("2mm", "native", "aniso")
ANISO = "samples/beijing_sub08251_mprage_skullstripped.nii.gz"


def inputs(kind: str, data: Path, scans: int | None, folder: Path) -> Path:
    """A list file of ``kind``'s scans (and masks) in ``folder``; exits when they are missing."""
    rows: list[str] = []
    if kind == "2mm":
        for path in sorted((data / "ixi" / "2mm").glob("*_T1w.nii.gz"))[:scans]:
            rows.append(f"{path}\t{path.with_name(path.name.replace('_T1w', '_mask'))}")
    elif kind == "native":
        rows = [str(p) for p in sorted((data / "ixi" / "native").glob("*_T1w.nii.gz"))[:scans]]
    else:
        source = data / ANISO
        if source.exists():
            links = folder / "aniso"
            links.mkdir(parents=True, exist_ok=True)
            for i in range(scans or 10):
                link = links / f"aniso_{i + 1:02d}.nii.gz"
                if not link.exists():  # a copy (or hard link): predict drops repeated paths
                    try:
                        os.link(source, link)
                    except OSError:
                        shutil.copyfile(source, link)
                rows.append(str(link))
    if not rows:
        sys.exit(f"no {kind} scans under {data}; set --data or BRAINBAG_SHARED_DATA")
    listing = folder / f"{kind}.txt"
    listing.write_text("\n".join(rows) + "\n")
    return listing


@dataclass
class Side:
    """One version of brainbag: a source tree put first on PYTHONPATH."""

    name: str
    root: Path
    per_kind: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    walls: dict[str, list[tuple[int, float]]] = field(default_factory=dict)


def run_batch(side: Side, kind: str, listing: Path, work: Path, extra: list[str]) -> None:
    """One ``brainbag predict`` of the list in a fresh process; records each scan's timings."""
    out = Path(tempfile.mkdtemp(prefix=f"{side.name}-{kind}-", dir=work))
    env = {**os.environ, "PYTHONPATH": str(side.root)}
    command = [sys.executable, "-m", "brainbag", "predict", str(listing), "--out", str(out),
               "--jobs", "0", "--no-png", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"{side.name} {kind}: brainbag predict exited {done.returncode}:\n"
                 f"{done.stderr[-3000:]}")
    rows = [json.loads(p.read_text())["timings_s"] for p in sorted(out.rglob("prediction.json"))]
    side.per_kind.setdefault(kind, []).extend(rows)
    side.walls.setdefault(kind, []).append((len(rows), wall))
    shutil.rmtree(out, ignore_errors=True)


def summary(side: Side, kind: str) -> list[str]:
    rows = side.per_kind[kind]
    cells = [f"{statistics.median(r.get(s, 0.0) for r in rows):.3f}" for s in STAGES]
    ratio = statistics.median(
        sum(r.get(s, 0.0) for s in STAGES if s != "inference") / max(r["inference"], 1e-9)
        for r in rows)
    scans = sum(n for n, _ in side.walls[kind])
    wall = sum(w for _, w in side.walls[kind])
    net = sum(r["total"] for r in rows)
    return [kind, side.name, str(len(rows)), *cells, f"{ratio:.2f}",
            f"{60 * scans / wall:.1f}", f"{60 * len(rows) / net:.1f}"]


def worktree(ref: str, work: Path) -> Path:
    """A detached checkout of ``ref`` in ``work`` (removed by :func:`drop_worktree`)."""
    path = work / "before"
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(path), ref],
                   check=True, capture_output=True)
    return path


def drop_worktree(path: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(path)],
                   capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", metavar="REF", help="git ref to compare with (e.g. main)")
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    parser.add_argument("--scans", type=int, default=None, help="scans per kind")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="predict --threads")
    parser.add_argument("--work", type=Path, default=None,
                        help="scratch folder (default: a temporary one, removed)")
    args = parser.parse_args()
    extra = ["--threads", str(args.threads)] if args.threads is not None else []
    work = Path(tempfile.mkdtemp(prefix="brainbag-stages-", dir=args.work))
    sides = [Side("after", REPO)]
    try:
        if args.before:
            sides.insert(0, Side(f"before ({args.before})", worktree(args.before, work)))
        lists = {kind: inputs(kind, args.data.resolve(), args.scans, work) for kind in args.kinds}
        for round_ in range(args.rounds):
            for kind in args.kinds:
                for side in sides if round_ % 2 == 0 else sides[::-1]:
                    run_batch(side, kind, lists[kind], work, extra)
                    print(f"round {round_ + 1}/{args.rounds}: {kind} {side.name} done",
                          file=sys.stderr, flush=True)
    finally:
        for side in sides:
            if side.root != REPO:
                drop_worktree(side.root)
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, python {platform.python_version()}; --jobs 0, "
          f"{args.rounds} round(s)")
    head = ["kind", "side", "scans", *STAGES, "other/inf", "scans/min", "scans/min net"]
    table = [summary(side, kind) for kind in args.kinds for side in sides]
    widths = [max(len(r[i]) for r in [head, *table]) for i in range(len(head))]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    print("stages: median seconds per scan; other/inf: median of (load+checks+preprocess+write)"
          " / inference; scans/min: batch wall time (process start included), net: the scans' "
          "own totals")


if __name__ == "__main__":
    main()
