"""Measure the check heuristics on every real scan and print their margins and N4's run time.

    python bench/check_heuristics.py [--data ../shared/data] [--n4 SCAN [--mask MASK]]

For each scan in ``samples/`` and ``ixi/`` (native: skull-stripped, brain = voxels > 0; 2mm: skull
on, with the ``*_mask`` file) prints the statistic behind each heuristic check:

* skull_stripped: volume of the largest bright object (litres) against SKULL_OBJECT_LITRES;
* brain_mask: volume of the brain mask (litres);
* anatomy: skewness of the brain voxels' world A-P coordinate against MIN_AP_SKEWNESS;
* bias_field: N4's estimate of the field's variation across the brain against the range of the
  default weights' training images (``training.statistics.bias_field``; UNRECORDED_MAX for
  weights without that record);

then the margins (smallest distance from a threshold, as a ratio) and the run time of
``n4_correct`` (the ``--n4`` fix) on one scan. Figures depend on the machine: say which.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np

from brainbag.image.bias import UNRECORDED_MAX, training_range
from brainbag.image.checks import (
    MIN_AP_SKEWNESS,
    SKULL_OBJECT_LITRES,
    CheckOptions,
    run_checks,
)
from brainbag.image.fixes import estimate_bias, n4_correct
from brainbag.image.io import format_mm, load_image
from brainbag.image.preprocess import load_mask
from brainbag.weights.resolve import input_expectations

SKULL_ON_SAMPLES = {"ch2.nii.gz", "chris_t1.nii.gz", "rorden_t1_mprage.nii.gz"}


def scans(data: Path) -> list[tuple[str, Path, Path | None, bool]]:
    """(group, scan, mask, skull_on) for every real scan."""
    rows: list[tuple[str, Path, Path | None, bool]] = []
    for path in sorted((data / "samples").glob("*")):
        if path.name.endswith((".nii.gz", ".mgz")):
            rows.append(("samples", path, None, path.name in SKULL_ON_SAMPLES))
    for path in sorted((data / "ixi" / "native").glob("*_T1w.nii.gz")):
        rows.append(("ixi-native", path, None, False))
    for path in sorted((data / "ixi" / "2mm").glob("*_T1w.nii.gz")):
        rows.append(("ixi-2mm", path, path.with_name(path.name.replace("_T1w", "_mask")), True))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path,
                        default=Path(__file__).resolve().parents[1].parent / "shared" / "data")
    parser.add_argument("--n4", type=Path, default=None, help="scan to time N4 on "
                        "[default: samples/beijing_sub08251_mprage_skullstripped.nii.gz]")
    parser.add_argument("--mask", type=Path, default=None, help="brain mask for --n4")
    args = parser.parse_args()
    rows = scans(args.data)
    if not rows:
        sys.exit(f"no scans under {args.data}")
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    names = ("skull_stripped", "brain_mask", "anatomy", "bias_field")
    print(f"{'group':11s} {'scan':44s} {'skull':>5s} {'object L':>8s} {'mask L':>7s} "
          f"{'A-P skew':>8s} {'bias %':>6s} {'checks s':>8s}")
    stats: dict[str, list[float]] = {k: [] for k in ("stripped", "skull", "skew", "bias_ok")}
    for group, path, mask, skull_on in rows:
        report = run_checks(path, CheckOptions(mask=mask), names=names)
        values = {r.name: r.values for r in report.results}
        obj = values["skull_stripped"].get("object_litres", float("nan"))
        litres = values["brain_mask"].get("litres", float("nan"))
        skew = values["anatomy"].get("skewness_xyz", [np.nan] * 3)[1]
        bias = 100 * values["bias_field"].get("field_range", float("nan"))
        stats["skull" if skull_on else "stripped"].append(obj)
        if np.isfinite(skew) and path.name != "vxm_test_vol.nii.gz":
            stats["skew"].append(skew)
        print(f"{group:11s} {path.name[:44]:44s} {'on' if skull_on else 'off':>5s} {obj:8.2f} "
              f"{litres:7.2f} {skew:8.3f} {bias:6.1f} {report.seconds:8.1f}")
    top, bottom = max(stats["stripped"]), min(stats["skull"])
    print(f"\nskull_stripped: stripped scans {min(stats['stripped']):.2f}-{top:.2f} L, skull-on "
          f"{bottom:.2f}-{max(stats['skull']):.2f} L, threshold {SKULL_OBJECT_LITRES} L: "
          f"margins x{SKULL_OBJECT_LITRES / top:.2f} above the largest stripped scan, "
          f"x{bottom / SKULL_OBJECT_LITRES:.2f} below the smallest head")
    print(f"anatomy: A-P skewness of correctly labelled brains {min(stats['skew']):.3f}-"
          f"{max(stats['skew']):.3f}, threshold {MIN_AP_SKEWNESS}")
    expect = input_expectations(None, 9)
    if expect.bias_field:
        low, high = training_range(expect.bias_field)
        print(f"bias_field: the range of {expect.weights_id}'s training images, "
              f"{100 * low:.1f}-{100 * high:.1f} % (without that record: < "
              f"{100 * UNRECORDED_MAX:.0f} %)")
    else:
        print(f"bias_field: threshold {100 * UNRECORDED_MAX:.0f} % (no training record)")

    scan = args.n4 or args.data / "samples" / "beijing_sub08251_mprage_skullstripped.nii.gz"
    loaded = load_image(scan)
    brain = load_mask(args.mask, loaded) if args.mask else loaded.image.data > 0
    t0 = time.perf_counter()
    before = estimate_bias(loaded.image.data, brain, loaded.zooms)
    estimate_s = time.perf_counter() - t0
    result = n4_correct(loaded.image.data, brain, loaded.zooms)
    after = estimate_bias(result.data, brain, loaded.zooms)
    voxels = int(brain.sum())
    print(f"\nN4 on {scan.name} {loaded.shape} {format_mm(loaded.zooms)}, {voxels:,} brain "
          f"voxels: {result.seconds:.1f} s (shrink {result.shrink}, iterations "
          f"{result.iterations})")
    print(f"field {100 * before.range:.0f} % before, {100 * after.range:.0f} % after; the bias "
          f"check's estimate took {estimate_s:.1f} s")


if __name__ == "__main__":
    main()
