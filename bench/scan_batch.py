"""Would several scans per forward pass raise throughput? The network alone, per scan.

    python bench/scan_batch.py                       # CPU, the bundled default RF 9 weights
    python bench/scan_batch.py --device cuda --batch 1 2 4 8 16

The shipped weights see one brain-centred box per scan (80x96x80 voxels at 2 mm, grown only for a
larger brain), so scans of one batch already share a shape: batching them needs no padding and
keeps every map's geometry. This measures what batching would gain: the forward time of B boxes in
one pass, per scan, best of ``--runs`` after one warm-up, for every B. ``predict`` runs one scan
per pass; this bench is the evidence for (or against) changing that on a given device.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    args = ap.parse_args()

    import torch

    from brainbag.weights.file import load_weights
    from brainbag.weights.manifest import SHIPPED_MANIFEST, read_manifest

    torch.set_num_threads(args.threads)
    entry = next(e for e in read_manifest(SHIPPED_MANIFEST) if e.default and e.rf == 9)
    assert entry.bundled is not None
    weights = load_weights(SHIPPED_MANIFEST.parent / entry.bundled)
    model = weights.model.to(args.device).eval()
    view = weights.meta.view or (80, 96, 80)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"device {args.device}, {args.threads} thread(s), {args.precision}; weights "
          f"{entry.id}, box {'x'.join(map(str, view))}")
    print("| scans per pass | s per pass (best) | s per scan | vs 1 per pass |")
    print("|---|---|---|---|")
    base = None
    for b in args.batch:
        x = torch.randn(b, 1, *view, device=device)
        times = []
        with torch.inference_mode(), torch.autocast(device.type, dtype=dtype,
                                                    enabled=args.precision == "bf16"):
            for i in range(args.runs + 1):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                model(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - t0)
        per_scan = min(times) / b
        base = base or per_scan
        print(f"| {b} | {min(times):.3f} | {per_scan:.3f} | {base / per_scan:.2f}x |")


if __name__ == "__main__":
    main()
