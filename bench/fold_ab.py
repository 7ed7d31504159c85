"""Issue 17 in one process: the fast path, its norms unfolded, and the fast path as before
(unfolded, chunked statistics), interleaved round by round on one random full-size network.

    python bench/fold_ab.py --precision fp32 --rounds 4

One process and interleaving take the machine's slow phases out of the comparison that
separate processes (bench_infer.py --variant ...) see; prints median and min seconds per forward.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as `brainbag predict` sets it

import torch  # noqa: E402

from brainbag.network import model as M  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rf", type=int, default=9)
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--shape", type=int, nargs=3, default=[182, 218, 182])
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    torch.manual_seed(0)
    model = M.BagNet3D(M.BagNetConfig.for_rf(args.rf)).eval()
    x = torch.randn(1, 1, *args.shape)

    def run() -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16,
                                                    enabled=args.precision == "bf16"):
            model(x)

    variants = {"fast": (True, True), "unfolded": (False, True), "before-17": (False, False)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    run()  # warm-up
    for _ in range(args.rounds):
        for name, (fold, kernel) in variants.items():
            model.fold_norms, M.STATS_KERNEL = fold, kernel
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
    print(f"RF {args.rf}, {'x'.join(map(str, args.shape))}, {args.precision}, "
          f"{torch.get_num_threads()} threads, {args.rounds} rounds")
    for name, ts in times.items():
        print(f"  {name:10s} median {statistics.median(ts):.2f} s, min {min(ts):.2f} s")


if __name__ == "__main__":
    main()
