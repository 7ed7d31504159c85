"""Would a leaner route to deepbet's networks do? Import cost and mask agreement, measured.

    python bench/strip_lean.py                       # rorden, chris, one IXI 2 mm head
    python bench/strip_lean.py --threads 2 a.nii.gz b.nii.gz

deepbet's two networks are plain TorchScript files; its Python package adds pandas,
customtkinter, fill_voids, connected-components-3d (cc3d), fastremap and tqdm. A lean route would
load the two pinned files with torch.jit.load and replace cc3d (largest component, used twice) and
fill_voids (hole filling) with SimpleITK, which brainbag already depends on. This prints:

1. the time to import deepbet.bet, to load the two files with torch.jit.load, and to build
   deepbet's BrainExtraction (each in a fresh process with torch already imported; median of
   ``--repeat``);
2. per scan, on deepbet's own probability map: deepbet's post-processing (cc3d + fill_voids)
   against SimpleITK's (ConnectedComponent 26-connected, largest piece, BinaryFillhole): Dice,
   voxels that differ, seconds of each;
3. per scan, the whole lean pipeline (torch.jit.load'ed networks, deepbet's pre-processing
   re-written here after deepbet 1.0.2's bet.py, MIT licence, SimpleITK for both connected
   component steps) against deepbet's mask: Dice and voxels that differ.

Nothing here switches brainbag to the lean route; it is the evidence for deciding.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("BRAINBAG_SHARED_DATA", REPO.parent / "shared" / "data"))
DEFAULT = ["samples/rorden_t1_mprage.nii.gz", "samples/chris_t1.nii.gz",
           "ixi/2mm/IXI012-HH-1211_T1w.nii.gz"]


def fresh_seconds(body: str, repeat: int) -> float:
    """Median seconds of ``body`` in a fresh interpreter, torch imported beforehand."""
    code = ("import time, warnings, torch; warnings.simplefilter('ignore'); "
            "torch.set_num_threads(1); t = time.perf_counter(); " + body +
            "; print(time.perf_counter() - t)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    runs = [float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                 check=True, env=env).stdout.split()[-1])
            for _ in range(repeat)]
    return statistics.median(runs)


def sitk_largest(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
    ranked = sitk.RelabelComponent(sitk.ConnectedComponent(image, True), sortByObjectSize=True)
    return sitk.GetArrayFromImage(ranked) == 1


def sitk_fill(mask: np.ndarray) -> np.ndarray:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(mask, np.uint8))
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(image, False, 1)) > 0


def sitk_postprocess(mask: np.ndarray, bbox: tuple[slice, ...]) -> np.ndarray:
    """deepbet's postprocess(mask, 0) with SimpleITK: largest 26-connected piece, holes filled,
    inside the network's bounding box (as deepbet does)."""
    out = np.zeros_like(mask, dtype=bool)
    out[bbox] = sitk_fill(sitk_largest(mask[bbox]))
    return out


def lean_mask(model: Any, bbox_model: Any, x: np.ndarray) -> np.ndarray:
    """deepbet 1.0.2's run_model + threshold + postprocess, with torch and SimpleITK only."""
    import torch
    import torch.nn.functional as F

    def normalize(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        v = ((v - low) / (high - low)).clamp(min=0, max=1)
        return 0.226 * (v - v.mean()) / v.std() + 0.449

    t = torch.nan_to_num(torch.from_numpy(x))
    small = F.interpolate(t[None, None], (128, 128, 128), mode="nearest-exact")[0, 0]
    low, high = small.quantile(0.005), small.quantile(0.995)
    with torch.no_grad():
        p_small = bbox_model(normalize(small, low, high)[None, None])[0, 1]
    m_small = torch.from_numpy(sitk_largest((p_small > 0.5).numpy()).astype(np.float32))
    # bounding box with a 10 % margin each side, as deepbet's get_bbox_with_margin
    scale = torch.tensor(t.shape) / torch.tensor(m_small.shape)
    rs = [torch.where(m_small.mean(d) > 0.02)[0] for d in [(1, 2), (0, 2), (0, 1)]]
    center = scale * torch.tensor([(r.max() + 1 + r.min()) / 2 for r in rs])
    size = scale * torch.tensor([(r.max() + 1) - r.min() for r in rs]) * 1.2
    center, size = center.round(), size.round()
    bbox = tuple(slice(max(0, int(c - s / 2)), min(n, int(c + s / 2)), 1)
                 for c, s, n in zip(center, size, t.shape, strict=True))
    crop = F.interpolate(t[bbox][None, None], (256, 256, 256), mode="nearest-exact")[0, 0]
    with torch.no_grad():
        p = model(normalize(crop, low, high)[None, None])[0, 1]
    prob = torch.zeros_like(t)
    prob[bbox] = F.interpolate(p[None, None], prob[bbox].shape, mode="nearest-exact")[0, 0]
    return sitk_postprocess(prob.numpy() > 0.5, bbox)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(1, a.sum() + b.sum()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scans", nargs="*", type=Path)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import torch

    from brainbag.image import strip
    from brainbag.image.io import load_image

    torch.set_num_threads(args.threads)
    files = strip.model_files()
    strip.verify_model_files(files)
    a, b = (str(files[n]) for n in ("model.pt", "bbox_model.pt"))
    print(f"torch {torch.__version__}, deepbet {strip.deepbet_version()}, {args.threads} "
          f"thread(s); median of {args.repeat} fresh processes, torch imported beforehand:")
    print(f"  import deepbet.bet: {fresh_seconds('import deepbet.bet', args.repeat):.2f} s")
    print(f"  torch.jit.load of the two files: "
          f"{fresh_seconds(f'torch.jit.load({a!r}); torch.jit.load({b!r})', args.repeat):.2f} s")
    build = ("from deepbet.bet import BrainExtraction; BrainExtraction(no_gpu=True)")
    print(f"  import deepbet.bet + BrainExtraction(no_gpu=True): "
          f"{fresh_seconds(build, args.repeat):.2f} s")

    bet, _ = strip._extractor("cpu", Path("bench"))
    model, bbox_model = torch.jit.load(a).eval(), torch.jit.load(b).eval()
    print("\n| scan | post: Dice | post: voxels differ | post s deepbet | post s SimpleITK | "
          "lean pipeline: Dice | lean: voxels differ | lean s | deepbet s |")
    print("|---|---|---|---|---|---|---|---|---|")
    scans = args.scans or [SHARED / s for s in DEFAULT]
    for path in scans:
        loaded = load_image(path)
        x, _ = strip.to_ras_array(loaded.image.data, loaded.image.affine)
        x = np.where(np.isfinite(x), x, np.float32(0)).astype(np.float32, copy=True)
        t0 = time.perf_counter()
        raw = bet.run_model(x.copy()) > strip.THRESHOLD
        t1 = time.perf_counter()
        ours = sitk_postprocess(raw, bet.bbox)
        t2 = time.perf_counter()
        theirs = bet.postprocess(raw.copy(), 0)
        t3 = time.perf_counter()
        lean = lean_mask(model, bbox_model, x.copy())
        t4 = time.perf_counter()
        print(f"| {path.name} | {dice(ours, theirs):.5f} | {int((ours != theirs).sum())} | "
              f"{t3 - t2:.2f} | {t2 - t1:.2f} | {dice(lean, theirs):.5f} | "
              f"{int((lean != theirs).sum())} | {t4 - t3:.2f} | {t1 - t0 + t3 - t2:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
