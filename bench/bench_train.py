"""Training benchmark: time per training sample (forward + backward + Adam step) per RF and
speed option, and the projected time of the seed schedule (500 epochs x 456 subjects).

Run from the repository root:

    python bench/bench_train.py                                  # CPU: every RF, every option
    python bench/bench_train.py --rf 9 --options fp32 bf16 --runs 3
    python bench/bench_train.py --device cuda --batch 16         # on a GPU
    python bench/bench_train.py --device cuda --batch 16 --options bf16+cl bf16+cl+compile

Each configuration runs in a fresh process (so peak memory is its own): one warm-up step, then
``--runs`` timed steps of ``--batch`` random 160x160x128 crops (x, y, z) through
``brainbag.train.steps.accumulate_gradients`` (the training loop's own step: ``model.pooled``,
both heads, loss, backward) and ``Adam.step``. It prints a Markdown table with seconds per step, ms
per sample, peak memory and the projected schedule time:

    schedule = 500 epochs x (456 samples x train ms/sample + 65 validation crops x forward ms)

Options: ``fp32`` (float32, NCDHW), ``cl`` (channels_last_3d), ``bf16`` (bf16 autocast), and
``compile`` (``torch.compile``); combine with ``+`` (``bf16+cl``). bf16 on a CPU needs AVX512-BF16
or AMX (it is skipped elsewhere). The seed schedule goal is 1 hour on one H100 = 15.8 ms/sample.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CROP = (160, 160, 128)
EPOCHS, TRAIN, VAL = 500, 456, 65
DEFAULT_OPTIONS = ("fp32", "cl", "bf16", "bf16+cl")


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """Time one (rf, option) configuration in this process."""
    import contextlib

    import torch

    from brainbag.network.inference import bf16_supported
    from brainbag.network.model import BagNet3D, BagNetConfig
    from brainbag.train.steps import LossSpec, PooledNet, accumulate_gradients

    options = set(args.option.split("+"))
    device = torch.device(args.device)
    if "bf16" in options and not bf16_supported(device):
        return {"skipped": f"bf16 not supported on this {device.type}"}
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(args.rf, width=args.width)).to(device)
    fmt = torch.channels_last_3d if "cl" in options else torch.contiguous_format
    model = model.to(memory_format=fmt)
    net: Any = PooledNet(model)
    if "compile" in options:
        net = torch.compile(net)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-5, weight_decay=1e-4)
    x = torch.randn(args.batch, 1, *args.crop, device=device).contiguous(memory_format=fmt)
    targets = torch.stack([torch.randn(args.batch), torch.randint(0, 2, (args.batch,)).float()],
                          dim=1).to(device)
    loss = LossSpec(("age", "sex"))

    def autocast() -> contextlib.AbstractContextManager[Any]:
        if "bf16" in options:
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def step() -> None:
        accumulate_gradients(net, x, targets, loss, args.micro_batch, args.batch,
                             autocast=autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def forward() -> None:
        with torch.no_grad(), autocast():
            net(x[:1])

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _sync(args.device)
    t0 = time.perf_counter()
    step()  # warm-up (and compilation)
    _sync(args.device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        step()
        _sync(args.device)
        times.append(time.perf_counter() - t0)
    forward()
    _sync(args.device)
    t0 = time.perf_counter()
    forward()
    _sync(args.device)
    fwd = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    step_s = statistics.median(times)
    per_sample = step_s / args.batch
    schedule_h = EPOCHS * (TRAIN * per_sample + VAL * fwd) / 3600
    return {"first_s": first, "step_s": step_s, "min_step_s": min(times),
            "ms_per_sample": 1000 * per_sample, "forward_ms": 1000 * fwd, "peak_gib": peak,
            "schedule_h": schedule_h}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rf", type=int, nargs="+", default=[9, 17, 33, 177])
    parser.add_argument("--options", nargs="+", default=list(DEFAULT_OPTIONS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--micro-batch", type=int, default=0)
    parser.add_argument("--crop", type=int, nargs=3, default=list(CROP))
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--option", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.rf = args.rf[0]
        print(json.dumps(worker(args)))
        return

    import torch

    print(f"# brainbag training benchmark: {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, device {args.device}, "
          f"batch {args.batch}, crop {args.crop}, width {args.width}\n")
    print("| RF | option | first step s | step s | ms / sample | fwd ms | peak GiB | "
          "500x456 schedule h |")
    print("|---|---|---|---|---|---|---|---|")
    results = []
    for rf in args.rf:
        for option in args.options:
            cmd = [sys.executable, __file__, "--worker", "--rf", str(rf), "--option", option,
                   "--device", args.device, "--batch", str(args.batch), "--micro-batch",
                   str(args.micro_batch), "--crop", *map(str, args.crop), "--width",
                   str(args.width), "--runs", str(args.runs)]
            done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if done.returncode != 0:
                r: dict[str, Any] = {"error": done.stderr.strip().splitlines()[-1:]}
            else:
                r = json.loads(done.stdout.strip().splitlines()[-1])
            r.update(rf=rf, option=option)
            results.append(r)
            if "step_s" in r:
                print(f"| {rf} | {option} | {r['first_s']:.2f} | {r['step_s']:.2f} | "
                      f"{r['ms_per_sample']:.0f} | {r['forward_ms']:.0f} | {r['peak_gib']:.1f} | "
                      f"{r['schedule_h']:.1f} |", flush=True)
            else:
                why = r.get("skipped") or r.get("error")
                print(f"| {rf} | {option} | - | - | - | - | - | {why} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
