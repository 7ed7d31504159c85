"""How much the shipped weights' prediction moves with the field of view and the inference mode.

    python bench/view_agreement.py                        # demo scan + the 9 native IXI scans
    python bench/view_agreement.py --weights FILE --scans a.nii.gz b.nii.gz

For each scan it prints the global age and P(female) of the default (or given) weights in
``full`` mode (the whole-brain view the weights were trained on) and the differences from it of:
the scan padded with 40 mm of zeros on every side, the scan cropped to its brain's bounding box,
and ``sliding`` mode with windows of 48^3 and 64^3 voxels (96 and 128 mm at 2 mm). Ages in
years, P(female) in probability units; the last lines give the largest absolute differences.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np

from brainbag.image.io import load_image
from brainbag.image.preprocess import conform, load_mask
from brainbag.network.inference import InferenceSettings
from brainbag.run.scan import interpret, run_weights
from brainbag.weights.file import load_weights
from brainbag.weights.resolve import open_weights

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def predict(weights, path: Path, mask: Path | None, mode: str, window=(48, 48, 48)
            ) -> tuple[float, float]:
    loaded = load_image(path)
    m = load_mask(mask, loaded) if mask is not None else None
    c = conform(loaded, m, spacing=weights.meta.voxel_mm)
    result = run_weights(weights, c, InferenceSettings(mode=mode, window=window, device="cpu"))
    heads = interpret(result, weights)
    return float(heads.age_global), float(heads.p_female)


def variants(path: Path, mask: Path | None, tmp: Path) -> dict[str, tuple[Path, Path | None]]:
    img = nib.load(path)
    data = np.asarray(img.dataobj, dtype=np.float32)
    brain = data > 0 if mask is None else np.asarray(nib.load(mask).dataobj) > 0
    out = {}

    def save(name: str, arr: np.ndarray, marr: np.ndarray, start) -> None:
        aff = img.affine.copy()
        aff[:3, 3] = img.affine[:3, :3] @ np.asarray(start, float) + img.affine[:3, 3]
        p = tmp / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(arr, aff), p)
        q = None
        if mask is not None:
            q = tmp / f"{name}_mask.nii.gz"
            nib.save(nib.Nifti1Image(marr.astype(np.uint8), aff), q)
        out[name] = (p, q)

    pad = [int(round(40 / z)) for z in img.header.get_zooms()[:3]]
    widths = [(p, p) for p in pad]
    save("pad40mm", np.pad(data, widths), np.pad(brain, widths), [-p for p in pad])
    lo = np.argwhere(brain).min(axis=0)
    hi = np.argwhere(brain).max(axis=0) + 1
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    save("brain_box", np.ascontiguousarray(data[box]), brain[box], lo)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", type=Path)
    ap.add_argument("--scans", type=Path, nargs="*")
    args = ap.parse_args()
    weights = load_weights(args.weights) if args.weights else open_weights(None, 9)
    scans: list[tuple[Path, Path | None]] = []
    if args.scans:
        scans = [(p, None) for p in args.scans]
    else:
        scans.append((REPO / "brainbag" / "data" / "demo" / "ch2bet.nii.gz", None))
        scans += [(p, None) for p in sorted((SHARED / "ixi" / "native").glob("*_T1w.nii.gz"))]
    print(f"weights {weights.meta.id} ({weights.sha256[:12]}), voxel {weights.meta.voxel_mm} mm, "
          f"view {weights.meta.view}, pooling {weights.meta.pooling}")
    cols = ["pad40mm", "brain_box", "sliding48", "sliding64"]
    print(f"{'scan':36s} {'age':>6s} {'P(F)':>6s} " + " ".join(f"{c:>17s}" for c in cols))
    worst = {c: [0.0, 0.0] for c in cols}
    with tempfile.TemporaryDirectory() as d:
        for path, mask in scans:
            base = predict(weights, path, mask, "full")
            diffs = {}
            for name, (p, q) in variants(path, mask, Path(d)).items():
                diffs[name] = predict(weights, p, q, "full")
            diffs["sliding48"] = predict(weights, path, mask, "sliding", (48, 48, 48))
            diffs["sliding64"] = predict(weights, path, mask, "sliding", (64, 64, 64))
            cells = []
            for c in cols:
                da, dp = diffs[c][0] - base[0], diffs[c][1] - base[1]
                worst[c][0] = max(worst[c][0], abs(da))
                worst[c][1] = max(worst[c][1], abs(dp))
                cells.append(f"{da:+8.3f}/{dp:+.4f}")
            print(f"{path.name[:36]:36s} {base[0]:6.2f} {base[1]:6.3f} " + " ".join(
                f"{c:>17s}" for c in cells), flush=True)
    print("largest |difference| (age y / P(female)): " + ", ".join(
        f"{c} {w[0]:.3f} / {w[1]:.4f}" for c, w in worst.items()))


if __name__ == "__main__":
    main()
