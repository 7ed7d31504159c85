"""Batch throughput of ``brainbag predict`` on a 20-scan folder, with read-ahead on and off.

Builds (once) a folder of 20 real scans synthesised from the shared data (copies, flipped and
permuted copies and a resampled copy of Colin27 ``ch2bet``, the nine IXI native scans and three
flipped copies, and four other samples), writes a random-initialised full-size RF 9 weights file
(width 32: the real architecture, meaningless numbers), then runs the real CLI once per ``--jobs``
value into a fresh output folder and prints wall time, scans/minute and seconds per scan.

    python bench/batch_throughput.py --work /tmp/brainbag-bench --jobs 0 1
    python bench/batch_throughput.py --work /tmp/brainbag-bench --kill-after 5   # kill -9, resume

``--kill-after K`` instead starts a run, kills it with SIGKILL once K rows are in the table, checks
the table, and finishes it with ``--resume``. Nothing is written into the repository.
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))


def _flip(img, axis: int):
    import nibabel as nib
    import numpy as np

    data = np.flip(np.asarray(img.dataobj), axis=axis).copy()
    flip = np.eye(4)
    flip[axis, axis] = -1
    flip[axis, 3] = img.shape[axis] - 1
    return nib.Nifti1Image(data, img.affine @ flip)


def build_folder(folder: Path) -> list[Path]:
    """The 20 scans (made once; every copy keeps its world geometry)."""
    import nibabel as nib
    import numpy as np

    from brainbag.image.io import isotropic_grid, resample

    folder.mkdir(parents=True, exist_ok=True)
    samples, native = SHARED / "samples", SHARED / "ixi" / "native"
    if not samples.exists() or not native.exists():
        sys.exit(f"shared data not found under {SHARED}; set BRAINBAG_SHARED_DATA")
    ch2 = nib.load(samples / "ch2bet.nii.gz")
    made: dict[str, object] = {
        "ch2bet.nii.gz": samples / "ch2bet.nii.gz",
        "ch2bet_LAS.nii.gz": _flip(ch2, 0),
        "ch2bet_SLP.nii.gz": nib.as_closest_canonical(ch2).as_reoriented(
            np.array([[1, -1], [2, -1], [0, 1]])),
    }
    shape, to_old = isotropic_grid(ch2.shape, ch2.affine, 1.25)
    coarse = resample(np.asarray(ch2.dataobj, dtype=np.float32), to_old, shape, "linear")
    made["ch2bet_1.25mm.nii.gz"] = nib.Nifti1Image(coarse, ch2.affine @ to_old)
    ixi = sorted(native.glob("*_T1w.nii.gz"))
    for path in ixi:
        made[path.name] = path
    for path in ixi[:3]:
        made[path.name.replace("_T1w", "_flipped_T1w")] = _flip(nib.load(path), 0)
    for name in ("brainmask.mgz", "beijing_sub08251_mprage_skullstripped.nii.gz",
                 "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "vxm_test_vol.nii.gz"):
        made[name] = samples / name
    paths = []
    for name, source in made.items():
        target = folder / name
        if not target.exists():
            if isinstance(source, Path):
                shutil.copy(source, target)
            else:
                nib.save(source, str(target))
        paths.append(target)
    return paths


def make_weights(path: Path, width: int) -> Path:
    import torch

    from brainbag.network.model import BagNet3D, BagNetConfig
    from brainbag.weights.file import random_weights_meta, save_weights

    if not path.exists():
        torch.manual_seed(0)
        model = BagNet3D(BagNetConfig.for_rf(9, width=width))
        save_weights(path, model, random_weights_meta(model, f"random-rf9-w{width}"))
    return path


def _command(folder: Path, out: Path, weights: Path, jobs: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "brainbag", "predict", str(folder), "--weights", str(weights),
            "--out", str(out), "--jobs", str(jobs), *extra]


def _rows(out: Path) -> list[dict[str, str]]:
    tsv = out / "predictions.tsv"
    if not tsv.exists():
        return []
    with open(tsv, newline="") as fh:
        return list(csv.DictReader(fh, delimiter="\t"))


def timed_run(folder: Path, out: Path, weights: Path, jobs: int, extra: list[str]) -> None:
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    done = subprocess.run(_command(folder, out, weights, jobs, extra), check=False)
    wall = time.perf_counter() - t0
    rows = _rows(out)
    ok = sum(r["status"] == "ok" for r in rows)
    per_scan = [float(r["seconds"]) for r in rows if r["seconds"]]
    print(f"RESULT jobs={jobs}: exit {done.returncode}, {ok}/{len(rows)} ok, wall {wall:.1f} s "
          f"(incl. start-up), {60 * len(rows) / wall:.2f} scans/min, "
          f"mean {sum(per_scan) / max(1, len(per_scan)):.1f} s of work per scan", flush=True)


def kill_and_resume(folder: Path, out: Path, weights: Path, jobs: int, extra: list[str],
                    kill_after: int) -> None:
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.Popen(_command(folder, out, weights, jobs, extra))
    while len(_rows(out)) < kill_after and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = _rows(out)
    print(f"\nKILLED (SIGKILL) with {len(rows)} rows in predictions.tsv: "
          f"{sorted({r['status'] for r in rows})}; leftovers: "
          f"{sorted(p.name for p in out.rglob('.*'))}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(_command(folder, out, weights, jobs, [*extra, "--resume"]),
                          check=False)
    wall = time.perf_counter() - t0
    rows = _rows(out)
    paths = [r["path"] for r in rows]
    print(f"RESUMED: exit {done.returncode}, {len(rows)} rows, {len(set(paths))} distinct, "
          f"{sum(r['status'] == 'ok' for r in rows)} ok, wall {wall:.1f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch folder (not the repo)")
    parser.add_argument("--jobs", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--kill-after", type=int, default=0)
    parser.add_argument("extra", nargs="*", help="more predict options, after --")
    args = parser.parse_args()
    if REPO in args.work.resolve().parents or args.work.resolve() == REPO:
        sys.exit("--work must be outside the repository")
    folder = args.work / "scans"
    print(f"{len(build_folder(folder))} scans in {folder}", flush=True)
    weights = make_weights(args.work / f"random-rf9-w{args.width}.safetensors", args.width)
    if args.kill_after:
        kill_and_resume(folder, args.work / "out-resume", weights, args.jobs[0], args.extra,
                        args.kill_after)
        return
    for jobs in args.jobs:
        timed_run(folder, args.work / f"out-jobs{jobs}", weights, jobs, args.extra)


if __name__ == "__main__":
    main()
