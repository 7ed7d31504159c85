"""Trained weights on real scans: how far each inference path lands from the reference.

    python bench/accuracy_weights.py                        # shipped weights, demo + 8 IXI scans
    python bench/accuracy_weights.py --save-inputs /tmp/acc # also keep the conformed inputs
    python bench/accuracy_weights.py --inputs /tmp/acc      # reuse them (no conform, so no
                                                            # SimpleITK; nibabel is still needed)

The reference is the module-by-module float32 path (``fast_inference = False``: what training
differentiates). The rows are the fast path as `brainbag predict` runs it (norms folded, float32
and bfloat16) and the fast path with the norms unfolded (float32), each run the way predict runs
the weights (their voxel size, brain view, masked pooling). Issue 17's bound: ages within
0.05 y and P(female) within 0.005 of the reference.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from bench_infer import machine  # this folder: the same machine line as the inference bench

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
WEIGHTS = REPO / "weights_manifest" / "bagnet3d-rf9-ixi-open-v1.safetensors"


def default_scans() -> list[tuple[Path, Path | None]]:
    scans: list[tuple[Path, Path | None]] = [(REPO / "brainbag" / "data" / "demo" /
                                              "ch2bet.nii.gz", None)]
    two = SHARED / "ixi" / "2mm"
    for t1 in sorted(two.glob("*_T1w.nii.gz"))[:8]:
        scans.append((t1, two / t1.name.replace("_T1w", "_mask")))
    return scans


def conformed_inputs(voxel_mm: float, save: Path | None) -> list[tuple[str, dict]]:
    from brainbag.image.io import load_image
    from brainbag.image.preprocess import conform, load_mask

    out = []
    for t1, mask_path in default_scans():
        loaded = load_image(t1)
        mask = load_mask(mask_path, loaded) if mask_path else None
        c = conform(loaded, mask, spacing=voxel_mm)
        item = {"volume": c.image.data.astype(np.float32), "mask": c.mask,
                "background": np.float32(c.background)}
        name = t1.name.split(".")[0]
        if save:
            save.mkdir(parents=True, exist_ok=True)
            np.savez_compressed(save / f"{name}.npz", **item)
        out.append((name, item))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, default=WEIGHTS)
    p.add_argument("--inputs", type=Path, help="folder of .npz inputs saved by --save-inputs")
    p.add_argument("--save-inputs", type=Path)
    args = p.parse_args(argv)

    from brainbag.network.inference import InferenceSettings, bf16_native, predict_maps
    from brainbag.weights.file import load_weights

    w = load_weights(args.weights)
    model, meta = w.model, w.meta
    if args.inputs:
        inputs = [(f.stem, dict(np.load(f))) for f in sorted(args.inputs.glob("*.npz"))]
    else:
        inputs = conformed_inputs(meta.voxel_mm, args.save_inputs)
    print(f"weights {w.id} ({meta.voxel_mm:g} mm, view {meta.view}, pooling {meta.pooling}); "
          f"{machine('cpu')}")
    variants = [("fast fp32 (folded norms)", True, True, "fp32"),
                ("fast fp32 (unfolded)", True, False, "fp32")]
    if bf16_native(torch.device("cpu")):
        variants += [("fast bf16 (folded norms)", True, True, "bf16"),
                     ("fast bf16 (unfolded)", True, False, "bf16")]
    scale = meta.age_scaling or {"mean": 0.0, "std": 1.0}

    def run(fast: bool, fold: bool, precision: str, item: dict) -> tuple[float, float]:
        model.fast_inference, model.fold_norms = fast, fold
        r = predict_maps(model, item["volume"], float(item["background"]),
                         InferenceSettings(mode="full", device="cpu", precision=precision),  # type: ignore[arg-type]
                         mask=item["mask"].astype(bool), pooling=meta.pooling, view=meta.view)
        g = r.global_outputs()
        idx = model.head_index
        return (float(g[idx["age"]] * scale["std"] + scale["mean"]),
                float(1 / (1 + np.exp(-g[idx["sex"]]))))

    print("| scan | reference age | reference P(female) | variant | d age (y) | d P(female) |")
    print("|---|---|---|---|---|---|")
    worst: dict[str, list[float]] = {}
    for name, item in inputs:
        age0, p0 = run(False, False, "fp32", item)
        for label, fast, fold, precision in variants:
            age, pf = run(fast, fold, precision, item)
            print(f"| {name} | {age0:.2f} | {p0:.4f} | {label} | {age - age0:+.4f} | "
                  f"{pf - p0:+.5f} |", flush=True)
            wv = worst.setdefault(label, [0.0, 0.0])
            wv[0], wv[1] = max(wv[0], abs(age - age0)), max(wv[1], abs(pf - p0))
    for label, (da, dp) in worst.items():
        ok = "within" if da <= 0.05 and dp <= 0.005 else "OUTSIDE"
        print(f"{label}: largest |d age| {da:.4f} y, |d P(female)| {dp:.5f} over {len(inputs)} "
              f"scans ({ok} 0.05 y / 0.005)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
