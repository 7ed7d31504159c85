"""How far the optimised paths land from the float32 reference on a real scan.

    python bench/accuracy.py                       # RF 9, full and sliding, seeds 0-3
    python bench/accuracy.py --rf 177 --mode full --seeds 0 1 --reference module

For each random initialisation (full-size network, seed = torch.manual_seed) it runs the scan
through ``predict_maps`` in float32 and bfloat16 and prints the differences of the global age
(years; age scaling 50 +- 15 as brainbag.weights.file.random_weights_meta) and P(female), and how
the local age maps compare over the brain cells: the largest difference, the 99th percentile, the
correlation, and the spread of the reference map (so that the differences can be read against it).
``--reference module`` uses the plain module-by-module float32 path as the reference (the code
before the speed work; >3 GB in full mode), ``fast`` the fast float32 path.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from brainbag.image.io import load_image
from brainbag.image.preprocess import conform
from brainbag.network.inference import InferenceSettings, predict_maps
from brainbag.network.model import BagNet3D, BagNetConfig
from brainbag.run.outputs import brain_cells

REPO = Path(__file__).resolve().parents[1]


def run(model: BagNet3D, vol: np.ndarray, background: float, mode: str, fast: bool,
        precision: str) -> tuple[np.ndarray, float, float]:
    """Local age map (years), global age and P(female) of one pass."""
    model.fast_inference = fast
    r = predict_maps(model, vol, background,
                     InferenceSettings(mode=mode, device="cpu", precision=precision))  # type: ignore[arg-type]
    g = r.global_outputs()
    return r.maps[0] * 15 + 50, float(g[0] * 15 + 50), float(1 / (1 + np.exp(-g[1])))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scan", default=str(REPO / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"))
    p.add_argument("--rf", type=int, default=9)
    p.add_argument("--mode", nargs="+", default=["full", "sliding"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--reference", choices=["fast", "module"], default="fast")
    args = p.parse_args()

    conformed = conform(load_image(Path(args.scan)), None)
    vol, bg = conformed.image.data, conformed.background
    print(f"scan {args.scan} {vol.shape}, RF {args.rf}, reference: {args.reference} fp32, "
          f"{torch.get_num_threads()} threads")
    print("| mode | seed | variant | d age (y) | d P(female) | local max d (y) | local p99 d (y) "
          "| local corr | local sd (y) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in args.mode:
        for seed in args.seeds:
            torch.manual_seed(seed)
            model = BagNet3D(BagNetConfig.for_rf(args.rf)).eval()

            ref = run(model, vol, bg, mode, args.reference == "fast", "fp32")
            cells = brain_cells(conformed.mask, 8, 0.0, ref[0].shape)
            variants = [("fast bf16", True, "bf16")]
            if args.reference == "module":
                variants.insert(0, ("fast fp32", True, "fp32"))
            for name, fast, precision in variants:
                age, glob, pf = run(model, vol, bg, mode, fast, precision)
                d = np.abs(age - ref[0])[cells]
                corr = np.corrcoef(age[cells], ref[0][cells])[0, 1]
                print(f"| {mode} | {seed} | {name} | {glob - ref[1]:+.3f} | {pf - ref[2]:+.4f} | "
                      f"{d.max():.2f} | {np.percentile(d, 99):.2f} | {corr:.3f} | "
                      f"{ref[0][cells].std():.1f} |", flush=True)


if __name__ == "__main__":
    main()
