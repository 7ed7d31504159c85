"""Cheaper settings for the bias check's N4 estimate: do they keep its verdicts?

    python bench/bias_variants.py [--data ../shared/data] [--every 1]

The bias check (``brainbag.image.fixes.estimate_bias``) fits N4 on a 6 mm copy of the image
within the brain (3 levels of at most 50 iterations) and warns when ``exp(p95 - p5) - 1`` of the
log field is 20 % or more. On raw scans N4 runs every iteration, so this fit is most of what the
checks cost (issue 26). This bench fits it with cheaper settings on the scans the check judges
(the skull-stripped samples, ``ixi/native``, ``ixi/2mm`` with masks, ``openneuro``; ``--every N``
takes every N-th of the last two) and prints, per variant, the statistic on each scan, the
verdicts that differ from the shipped setting's and the variant's CPU time relative to it
(process time, all threads: a ratio that holds on a busy machine, unlike wall seconds):

* ``crop``: the shrunk image cut to the brain's bounding box (N4's B-spline domain shrinks);
* ``iterations 20``: at most 20 iterations per level;
* ``levels 2``: two fitting levels of 50;
* ``8 mm``: a copy shrunk to about 8 mm instead of 6;
* ``threshold 0.005``: N4 stops at a 5x larger convergence threshold.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from brainbag.image.checks import MAX_BIAS
from brainbag.image.fixes import (
    ESTIMATE_ITERATIONS,
    ESTIMATE_SHRINK_MM,
    _field_range,
    _from_sitk,
    _shrink_factors,
    _to_sitk,
)
from brainbag.image.io import bounding_box, load_image
from brainbag.image.preprocess import load_mask

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
SKULL_ON = {"ch2.nii.gz", "chris_t1.nii.gz", "rorden_t1_mprage.nii.gz"}
VARIANTS: dict[str, dict[str, Any]] = {
    "shipped": {},
    "crop": {"crop": True},
    "iterations 20": {"iterations": (20, 20, 20)},
    "levels 2": {"iterations": (50, 50)},
    "8 mm": {"shrink_mm": 8.0},
    "threshold 0.005": {"threshold": 0.005},
}


def scans(data: Path, every: int) -> list[tuple[Path, Path | None]]:
    rows: list[tuple[Path, Path | None]] = [
        (p, None) for p in sorted((data / "samples").glob("*"))
        if p.name.endswith((".nii.gz", ".mgz")) and p.name not in SKULL_ON]
    rows += [(p, None) for p in sorted((data / "ixi" / "native").glob("*_T1w.nii.gz"))]
    rows += [(p, p.with_name(p.name.replace("_T1w", "_mask")))
             for p in sorted((data / "ixi" / "2mm").glob("*_T1w.nii.gz"))[::every]]
    rows += [(p, None) for p in sorted((data / "openneuro").glob("ds*/sub-*/anat/*_T1w.nii.gz"))
             [::every]]
    return rows


def estimate(data: np.ndarray, mask: np.ndarray, zooms: tuple[float, float, float],
             shrink_mm: float = ESTIMATE_SHRINK_MM,
             iterations: tuple[int, ...] = ESTIMATE_ITERATIONS, crop: bool = False,
             threshold: float = 0.001) -> tuple[float, float]:
    """(field range, CPU seconds of the fit) for one setting."""
    import SimpleITK as sitk

    brain = mask & np.isfinite(data) & (data > 0)
    factors = list(_shrink_factors(zooms, shrink_mm, data.shape))
    small = sitk.Shrink(_to_sitk(np.where(np.isfinite(data), data, 0).astype(np.float32),
                                 zooms), factors)
    small_mask = sitk.Shrink(_to_sitk(brain.astype(np.uint8), zooms), factors)
    if crop:
        box = bounding_box(_from_sitk(small_mask) > 0)
        assert box is not None
        lo = np.maximum(box[0] - 1, 0)
        hi = np.minimum(box[1] + 1, small.GetSize())
        small = sitk.RegionOfInterest(small, [int(v) for v in hi - lo], [int(v) for v in lo])
        small_mask = sitk.RegionOfInterest(small_mask, [int(v) for v in hi - lo],
                                           [int(v) for v in lo])
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(i) for i in iterations])
    n4.SetConvergenceThreshold(threshold)
    t0 = time.process_time()
    n4.Execute(small, small_mask)
    seconds = time.process_time() - t0
    log_field = _from_sitk(n4.GetLogBiasFieldAsImage(small))
    return _field_range(log_field, _from_sitk(small_mask) > 0), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SHARED)
    parser.add_argument("--every", type=int, default=1)
    args = parser.parse_args()
    rows = scans(args.data, args.every)
    if not rows:
        sys.exit(f"no scans under {args.data}; set --data or BRAINBAG_SHARED_DATA")
    found: dict[str, list[float]] = {v: [] for v in VARIANTS}
    cpu = dict.fromkeys(VARIANTS, 0.0)
    print(f"{'scan':48s} " + " ".join(f"{v:>15s}" for v in VARIANTS))
    for path, mask_path in rows:
        loaded = load_image(path)
        data = loaded.image.data
        mask = load_mask(mask_path, loaded) if mask_path else data > 0
        cells = []
        for name, settings in VARIANTS.items():
            value, seconds = estimate(data, mask, loaded.zooms, **settings)
            found[name].append(value)
            cpu[name] += seconds
            flip = (value > MAX_BIAS) != (found["shipped"][-1] > MAX_BIAS)
            cells.append(f"{100 * value:13.1f}{' *' if flip else '  '}")
        label = str(path.relative_to(args.data)) + (" +mask" if mask_path else "")
        print(f"{label[-48:]:48s} " + " ".join(cells), flush=True)
    base = np.array(found["shipped"])
    print(f"\nfield variation in %; * = verdict (warn at {100 * MAX_BIAS:.0f} %) differs from the "
          "shipped setting's")
    print(f"closest to the threshold (shipped): "
          f"{100 * base[np.argmin(np.abs(base - MAX_BIAS))]:.1f} %")
    for name in VARIANTS:
        values = np.array(found[name])
        flips = int(((values > MAX_BIAS) != (base > MAX_BIAS)).sum())
        moved = 100 * np.abs(values - base).max()
        print(f"{name:16s} CPU x{cpu[name] / cpu['shipped']:.2f}, verdicts changed: {flips} of "
              f"{len(base)}, largest change of the statistic {moved:.1f} points")


if __name__ == "__main__":
    main()
