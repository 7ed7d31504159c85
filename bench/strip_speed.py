"""Skull stripping speed (and, with --dice, agreement with provided masks) on the shared scans.

    python bench/strip_speed.py                      # samples/*, ixi/native/*, 12 OpenNeuro
    python bench/strip_speed.py --threads 1 --limit 2
    python bench/strip_speed.py --dice               # the 50 IXI 2 mm heads with *_mask.nii.gz
    python bench/strip_speed.py --device cuda scan1.nii.gz scan2.nii.gz
    python bench/strip_speed.py --jobs 2 raw_heads/      # a folder: scans per minute, 2 workers

Runs brainbag's built-in stripping (brainbag.image.strip.strip_brain: deepbet's two networks on
the image in memory, mask back on the input grid) one scan at a time, as predict does. Per scan:
"strip s" is the networks and deepbet's post-processing (what predict adds per raw head), "total
s" adds the reorientation, the copy back to the input grid and the component count. Loading the
networks happens once per process and is printed on its own. Reading the file is not timed.
Volumes are the mask's (brain and the CSF inside its outline); "check" is
check_mask_plausible's verdict. Shared data: $BRAINBAG_SHARED_DATA or ../shared/data.

Scans per minute: a folder (or files) given, every scan is read and stripped; with ``--jobs N``
by N worker threads at once, as ``brainbag predict --jobs N`` prepares scans ahead (deepbet keeps
per-scan state on its object, so the networks run one scan at a time behind a lock; reading,
reorienting and counting pieces overlap). The last line gives scans per minute of the whole
stage (reading included, wall clock) next to the one-at-a-time figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))


def default_scans(shared: Path, openneuro: int = 12) -> list[Path]:
    """samples/* (raw and stripped), ixi/native/* and the first ``openneuro`` ds002748 T1s."""
    scans = sorted(p for p in (shared / "samples").glob("*") if p.name.endswith(
        (".nii", ".nii.gz", ".mgz")))
    scans += sorted((shared / "ixi" / "native").glob("*_T1w.nii.gz"))
    scans += sorted((shared / "openneuro" / "ds002748").glob("sub-*/anat/*_T1w.nii.gz"))[
        :openneuro]
    return scans


def expand(paths: list[Path]) -> list[Path]:
    """Files as given; folders searched recursively for .nii, .nii.gz and .mgz files."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(
                (".nii", ".nii.gz", ".mgz")) and not p.name.startswith("."))
        else:
            found.append(path)
    return found


def dice_pairs(shared: Path) -> list[tuple[Path, Path]]:
    """(T1, provided mask) of every IXI 2 mm scan that has a mask file."""
    pairs = []
    for mask in sorted((shared / "ixi" / "2mm").glob("*_mask.nii.gz")):
        t1 = mask.with_name(mask.name.replace("_mask.nii.gz", "_T1w.nii.gz"))
        if t1.exists():
            pairs.append((t1, mask))
    return pairs


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scans", nargs="*", type=Path,
                    help="scans or folders of scans to strip (default: see above)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="worker threads reading and stripping scans at once (as predict --jobs)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dice", action="store_true",
                    help="the IXI 2 mm scans, with Dice against their provided masks")
    ap.add_argument("--limit", type=int, default=0, help="only the first N scans")
    ap.add_argument("--json", type=Path, help="also write the per-scan records here")
    args = ap.parse_args()

    import numpy as np
    import torch

    from brainbag.errors import BrainbagError
    from brainbag.image import strip
    from brainbag.image.io import load_image
    from brainbag.image.preprocess import load_mask

    torch.set_num_threads(args.threads)
    if args.dice:
        jobs: list[tuple[Path, Path | None]] = [(t1, m) for t1, m in dice_pairs(SHARED)]
    else:
        jobs = [(p, None) for p in (expand(args.scans) if args.scans else
                                    default_scans(SHARED))]
    if args.limit:
        jobs = jobs[: args.limit]
    if not jobs:
        sys.exit(f"no scans found (shared data: {SHARED}; set BRAINBAG_SHARED_DATA)")

    t0 = time.perf_counter()
    strip._extractor(args.device, jobs[0][0])  # import deepbet, verify and load the networks
    load_s = time.perf_counter() - t0
    print(f"machine: {machine()}; device {args.device}, {args.threads} thread(s); deepbet "
          f"{strip.deepbet_version()}; networks imported, verified and loaded in {load_s:.2f} s")
    header = "| scan | shape | mm | strip s | total s | volume L | pieces | check |"
    if args.dice:
        header += " provided L | Dice |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    def one(job: tuple[Path, Path | None]) -> tuple[dict[str, Any], str]:
        path, given = job
        loaded = load_image(path)
        start = time.perf_counter()
        result = strip.strip_brain(loaded, threads=args.threads, device=args.device)
        total = time.perf_counter() - start
        try:
            strip.check_mask_plausible(result, loaded.zooms, path)
            verdict = "ok"
        except BrainbagError as exc:
            verdict = f"FAILS: {exc}"
        rec = {"scan": path.name, "shape": list(loaded.shape),
               "zooms": [round(z, 3) for z in loaded.zooms], "strip_s": round(result.seconds, 2),
               "total_s": round(total, 2), "volume_l": round(result.volume_ml / 1000, 3),
               "pieces": result.n_components, "check": verdict}
        row = (f"| {path.name} | {'x'.join(map(str, loaded.shape))} | "
               f"{'x'.join(f'{z:.3g}' for z in loaded.zooms)} | {result.seconds:.2f} | "
               f"{total:.2f} | {result.volume_ml / 1000:.3f} | {result.n_components} | "
               f"{verdict} |")
        if given is not None:
            provided = load_mask(given, loaded)
            dice = 2 * (provided & result.mask).sum() / (provided.sum() + result.mask.sum())
            rec["provided_l"] = round(float(provided.sum()) * strip.voxel_ml(loaded.zooms) / 1000,
                                      3)
            rec["dice"] = round(float(dice), 4)
            row += f" {rec['provided_l']:.3f} | {dice:.4f} |"
        return rec, row

    records: list[dict[str, Any]] = []
    wall0 = time.perf_counter()
    with ThreadPoolExecutor(max(1, args.jobs), thread_name_prefix="strip") as pool:
        for rec, row in pool.map(one, jobs):  # in input order, as each finishes
            records.append(rec)
            print(row, flush=True)
    wall = time.perf_counter() - wall0

    strip_s = [float(r["strip_s"]) for r in records]
    total_s = [float(r["total_s"]) for r in records]
    vols = [float(r["volume_l"]) for r in records]
    print(f"\n{len(records)} scans: strip s median {statistics.median(strip_s):.2f} "
          f"(min {min(strip_s):.2f}, max {max(strip_s):.2f}); total s median "
          f"{statistics.median(total_s):.2f}; {60 / statistics.median(total_s):.1f} scans per "
          f"minute (networks loaded once, reading not timed); volume "
          f"{min(vols):.3f}-{max(vols):.3f} L; "
          f"{sum(r['check'] != 'ok' for r in records)} fail the plausibility check")
    print(f"the whole stage: {len(records)} scans read and stripped in {wall:.1f} s wall clock "
          f"with --jobs {args.jobs}: {60 * len(records) / wall:.1f} scans per minute")
    if args.dice:
        dices = np.array([r["dice"] for r in records])
        print(f"Dice against the provided masks: median {np.median(dices):.4f}, min "
              f"{dices.min():.4f} ({records[int(dices.argmin())]['scan']})")
    if args.json:
        args.json.write_text(json.dumps(records, indent=1) + "\n")


if __name__ == "__main__":
    main()
