"""Inference benchmark: BagNet-3D per RF, mode and precision next to the hardware floor.

Run from the repository root (a few minutes with the defaults on a quiet 2-core CPU):

    python bench/bench_infer.py                         # RF 9/17/33/177, full+sliding, fp32+bf16
    python bench/bench_infer.py --rf 9 --mode full --precision bf16 --runs 5
    python bench/bench_infer.py --device cuda           # on a GPU
    python bench/bench_infer.py --rf 9 --variant naive fast --rounds 3   # before/after, interleaved

It prints, as a Markdown table, for every configuration: the median (and min) wall time of
``brainbag.network.inference.predict_maps`` over ``--runs`` runs after one warm-up run (whose time
is shown as "first"), the peak memory, the multiply-adds, the floor and time/floor. In the same run
it measures this machine's peak matrix-multiply rate per precision (the best of several GEMM shapes
and backends) and times SFCN (bench/sfcn.py) as a peer anchor.

* floor = 2 * multiply-adds / peak rate. "GMAC" is the network as defined (BAGNET3D.md: 345 G for
  RF 9 on 182x218x182); "GMAC run" is what the fast path executes (stem folded into one
  convolution), with its own floor ratio "x floor run".
* conv share (CPU): of one more run under ``torch.profiler``, the self time of the convolution
  operators over the self time of all operators: how much of the forward is the convolutions
  and how much is everything else (norm statistics, scale-and-shift, ReLU, copies).
* peak memory: the peak resident set of the worker process (``ru_maxrss``: model, volume, torch
  runtime and all), each configuration in a fresh process; on CUDA the peak allocated GPU memory.
* variants: ``fast`` (the default inference path), ``unfolded`` (the norms not folded:
  each InstanceNorm + ReLU as its own scale-and-shift and ReLU passes instead of folded into the
  next convolution), ``before-17`` (unfolded, and the norm statistics as chunked reductions
  instead of the batch-norm kernel: the fast path as it was before issue 17), ``naive`` (the
  module-by-module path as before the speed work, without transparent huge pages), and
  ablations that switch one optimisation off:
  ``no-thp``, ``no-fold`` (stem as two convolutions), ``stock-norm`` (torch's instance_norm),
  ``ncdhw`` (the same oneDNN convolutions and norms on NCDHW tensors); and ``compile``:
  ``torch.compile`` (inductor) of the module path, whose compile time shows in "first" (needs a
  C++ compiler).
* ``--rounds R`` repeats the whole sweep R times so that configurations interleave; medians are
  over all rounds. Use it on a busy machine, and say that the machine was busy.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
VOLUME = (182, 218, 182)
VARIANTS = ("fast", "unfolded", "before-17", "naive", "no-thp", "no-fold", "stock-norm", "ncdhw",
            "compile")


# --------------------------------------------------------------------------- worker side
def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB on Linux


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Any, runs: int, device: str) -> tuple[float, list[float]]:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t0
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return first, times


def _apply_variant(variant: str) -> None:
    """Switch one optimisation of the fast path off (monkeypatching, benchmark only)."""
    import torch
    import torch.nn.functional as F

    from brainbag.network import model as M

    if variant == "before-17":
        M.STATS_KERNEL = False
    if variant == "stock-norm":
        def stock(x: torch.Tensor, norm: bool, relu: bool) -> torch.Tensor:
            if norm:
                x.copy_(F.instance_norm(x, eps=M._EPS))
            return x.relu_() if relu else x

        M._norm_act_ = stock  # type: ignore[assignment]
    elif variant == "no-fold":
        def two_convs(self: M.BagNet3D, x: torch.Tensor) -> torch.Tensor:
            h = M.conv3d_fast(x, self.stem1.weight, 1, 0)
            return M.conv3d_fast(h, self.stem2.weight, 1, self.stem2.padding)

        M.BagNet3D._stem_fast = two_convs  # type: ignore[method-assign]
    elif variant == "ncdhw":
        def ncdhw(x: torch.Tensor, weight: torch.Tensor, stride: Any, padding: Any,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
            # the same oneDNN convolution on NCDHW tensors
            return torch.ops.aten.mkldnn_convolution(
                x.contiguous(), weight.to(x.dtype), None if bias is None else bias.to(x.dtype),
                list(M._triple(padding)), list(M._triple(stride)), [1, 1, 1], 1)

        M.conv3d_fast = ncdhw  # type: ignore[assignment]


def _memory(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 1e9
    return _peak_rss_gb()


def worker_bagnet(cfg: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import torch

    from brainbag.network.inference import InferenceSettings, estimate_windows, predict_maps
    from brainbag.network.model import BagNet3D, BagNetConfig, macs_estimate

    _apply_variant(cfg["variant"])
    torch.manual_seed(0)
    config = BagNetConfig.for_rf(cfg["rf"])
    model = BagNet3D(config).eval()
    model.fast_inference = cfg["variant"] not in ("naive", "compile")
    model.fold_norms = cfg["variant"] not in ("unfolded", "before-17", "stock-norm")
    if cfg["variant"] == "compile":
        model.features_reference = torch.compile(model.features_reference)  # type: ignore[method-assign]
    shape = tuple(cfg["shape"])
    volume = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    settings = InferenceSettings(mode=cfg["mode"], batch_size=cfg["batch_size"],
                                 window=tuple(cfg["window"]), device=cfg["device"],
                                 precision=cfg["precision"])
    if cfg["mode"] == "full":
        windows, win = 1, shape
    else:
        windows = estimate_windows(shape, model, settings)  # type: ignore[arg-type]
        win = tuple(min(w, n) for w, n in zip(settings.window, shape, strict=True))
    result: dict[str, Any] = {}

    def run() -> None:
        result["r"] = predict_maps(model, volume, 0.0, settings)

    if cfg["device"].startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    first, times = _timed(run, cfg["runs"], cfg["device"])
    return {
        "first": first, "times": times, "peak_gb": _memory(cfg["device"]),
        "conv_share": _conv_share(run, cfg["device"]),
        "precision_run": result["r"].precision, "windows": windows,
        "gmac": windows * macs_estimate(config, win) / 1e9,  # type: ignore[arg-type]
        "gmac_run": windows * macs_estimate(config, win, folded_stem=True) / 1e9,  # type: ignore[arg-type]
    }


def _conv_share(run: Any, device: str) -> float | None:
    """Share of one profiled run's operator time spent in convolutions (CPU only): the self
    time of every convolution op over the self time of all ops (torch.profiler; its own
    overhead lands in "the rest", so the share is a lower bound)."""
    if device.startswith("cuda"):
        return None
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "convolution" in e.key)
    return conv / total if total else None


def worker_sfcn(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    from sfcn import INPUT_SHAPE, SFCN, sfcn_macs

    torch.manual_seed(0)
    device = torch.device("cuda" if cfg["device"].startswith("cuda") else "cpu")
    model = SFCN().eval().to(device).to(memory_format=torch.channels_last_3d)
    x = torch.randn(1, 1, *INPUT_SHAPE, device=device)
    x = x.contiguous(memory_format=torch.channels_last_3d)

    def run() -> None:
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16,
                                                    enabled=cfg["precision"] == "bf16"):
            model(x).float().cpu()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    first, times = _timed(run, cfg["runs"], cfg["device"])
    gmac = sfcn_macs() / 1e9
    return {"first": first, "times": times, "peak_gb": _memory(cfg["device"]), "windows": 1,
            "conv_share": _conv_share(run, cfg["device"]),
            "gmac": gmac, "gmac_run": gmac, "precision_run": cfg["precision"]}


def worker_peak(cfg: dict[str, Any]) -> dict[str, Any]:
    """Best GEMM rate per precision, GFLOP/s (2 flops per multiply-add).

    On CPU two backends are tried, because they differ a lot on some CPUs (MKL's float32 GEMM
    takes a slower code path on AMD): torch.matmul, and a 1x1x1 channels-last convolution, which
    is a oneDNN GEMM, the kernel the network's convolutions use.
    """
    import torch

    device = cfg["device"]
    rates: dict[str, float] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        best = 0.0
        for n in (1024, 2048, 4096):
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            _, times = _timed(lambda a=a, b=b: a @ b, 5, device)
            best = max(best, 2 * n**3 / min(times) / 1e9)
            if device == "cpu":
                x = torch.randn(1, n, 16, 16, n // 64, dtype=dtype)
                x = x.contiguous(memory_format=torch.channels_last_3d)
                w = torch.randn(n, n, 1, 1, 1, dtype=dtype)

                def conv(x: torch.Tensor = x, w: torch.Tensor = w) -> None:
                    torch.ops.aten.mkldnn_convolution(x, w, None, [0] * 3, [1] * 3, [1] * 3, 1)

                _, times = _timed(conv, 5, device)
                best = max(best, 2 * n * n * 16 * 16 * (n // 64) / min(times) / 1e9)
        rates[name] = best
    return rates


def worker_e2e(cfg: dict[str, Any]) -> dict[str, Any]:
    """Scans per minute of the whole ``brainbag predict`` pipeline (load, conform, infer, write)
    over ``--e2e N`` copies of one scan, with random full-size weights."""
    import torch

    from brainbag.network.inference import InferenceSettings
    from brainbag.network.model import BagNet3D, BagNetConfig
    from brainbag.run.predict import PredictSettings, run_predict
    from brainbag.weights.file import random_weights_meta, save_weights

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = BagNet3D(BagNetConfig.for_rf(cfg["rf"]))
        weights = work / "random.safetensors"
        save_weights(weights, model, random_weights_meta(model, "bench-random"))
        scans = []
        for i in range(cfg["n"]):
            link = work / "in" / f"sub-{i:03d}_T1w.nii.gz"
            link.parent.mkdir(exist_ok=True)
            # copies, not links: predict runs a file given twice (same resolved path) once
            shutil.copyfile(cfg["scan"], link)
            scans.append(link)
        settings = PredictSettings(
            out=work / "out", weights=str(weights), jobs=cfg["jobs"], png=False,
            inference=InferenceSettings(mode=cfg["mode"], precision=cfg["precision"],
                                        device=cfg["device"], batch_size=cfg["batch_size"],
                                        threads=cfg["threads"]))
        # warm-up (weights load, kernel set-up) into its own folder: a batch refuses a
        # non-empty output folder
        run_predict(scans[:1], replace(settings, out=work / "warm-up"))
        t0 = time.perf_counter()
        records = run_predict(scans, settings)
        seconds = time.perf_counter() - t0
    if len(records) != len(scans):
        raise RuntimeError(f"{len(records)} records for {len(scans)} scans")
    failed = [r for r in records if r.get("status") != "ok"]
    if failed:
        raise RuntimeError(f"{len(failed)} scans failed: {failed[0].get('error')}")
    return {"seconds": seconds, "per_minute": 60 * len(scans) / seconds,
            "stages": {k: statistics.median(r["timings_s"].get(k, 0.0) for r in records)
                       for k in records[0]["timings_s"] if k != "total"}}


def worker(cfg: dict[str, Any]) -> dict[str, Any]:
    import torch

    if cfg.get("threads", 0) > 0:
        torch.set_num_threads(cfg["threads"])
    # else torch's default (one thread per physical core): not `brainbag predict`'s auto, which
    # would follow the load average and with it this benchmark's own previous rows
    kinds = {"peak": worker_peak, "bagnet": worker_bagnet, "sfcn": worker_sfcn, "e2e": worker_e2e}
    out = kinds[cfg["kind"]](cfg)
    out["threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------- parent side
def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    env = dict(os.environ)
    if cfg.get("variant") in ("naive", "no-thp"):
        env.pop("THP_MEM_ALLOC_ENABLE", None)
    else:
        env.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # what `brainbag predict` sets, see README
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)],
                              stdout=subprocess.PIPE, stderr=err, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            err.seek(0)
            tail = err.read().strip().splitlines()[-3:]
            return {"error": " / ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads by default")
    if device.startswith("cuda") and torch.cuda.is_available():
        text += f", GPU {torch.cuda.get_device_name(0)}"
    return text


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f} %"


def fmt(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rf", type=int, nargs="+", default=[9, 17, 33, 177])
    p.add_argument("--mode", nargs="+", default=["full", "sliding"], choices=["full", "sliding"])
    p.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--variant", nargs="+", default=["fast"], choices=VARIANTS)
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration and round")
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep, interleaving configs")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads (0: torch's default, one per physical core)")
    p.add_argument("--shape", type=int, nargs=3, default=list(VOLUME), help="volume, voxels")
    p.add_argument("--window", type=int, nargs=3, default=[160, 160, 128])
    p.add_argument("--batch-size", type=int, default=1, help="windows per pass (sliding)")
    p.add_argument("--no-sfcn", action="store_true", help="skip the SFCN peer anchor")
    p.add_argument("--e2e", type=int, default=0, metavar="N",
                   help="also time `brainbag predict` end to end on N copies of --scan "
                   "(scans per minute; first RF, mode and precision given)")
    p.add_argument("--scan", default=str(REPO / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"),
                   help="scan for --e2e")
    p.add_argument("--jobs", type=int, default=1,
                   help="--e2e: read-ahead threads, as `brainbag predict --jobs`")
    p.add_argument("--only-e2e", action="store_true", help="skip the table, run --e2e only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    common = {"device": args.device, "threads": args.threads, "runs": args.runs}
    print(f"machine: {machine(args.device)}")
    print(f"command: python bench/bench_infer.py {' '.join(argv or sys.argv[1:])}")
    if args.e2e:
        cfg = {"kind": "e2e", "rf": args.rf[0], "mode": args.mode[0],
               "precision": args.precision[0], "n": args.e2e, "scan": args.scan,
               "batch_size": args.batch_size, "jobs": args.jobs, **common}
        r = run_child(cfg)
        if "error" in r:
            print(f"end to end: failed: {r['error']}")
        else:
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in r["stages"].items())
            print(f"end to end: {args.e2e} x {Path(args.scan).name}, RF {cfg['rf']} "
                  f"{cfg['mode']} {cfg['precision']}, {r['threads']} threads, "
                  f"--jobs {args.jobs}: {r['seconds']:.1f} s, "
                  f"{r['per_minute']:.1f} scans/minute (median per scan: {stages})")
        if args.only_e2e:
            return 0

    peak = run_child({"kind": "peak", **common})
    if "error" in peak:
        print(f"peak-rate measurement failed: {peak['error']}")
        return 1
    print(f"peak GEMM rate: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s "
          f"(measured now, {peak['threads']} threads)")

    configs: list[dict[str, Any]] = []
    for rf in args.rf:
        for mode in args.mode:
            for prec in args.precision:
                for variant in args.variant:
                    configs.append({"kind": "bagnet", "rf": rf, "mode": mode, "precision": prec,
                                    "variant": variant, "shape": args.shape,
                                    "window": args.window, "batch_size": args.batch_size,
                                    **common})
    if not args.no_sfcn:
        for prec in args.precision:
            configs.append({"kind": "sfcn", "precision": prec, "variant": "fast", **common})
    results: list[list[dict[str, Any]]] = [[] for _ in configs]
    for _ in range(args.rounds):
        for i, cfg in enumerate(configs):
            results[i].append(run_child(cfg))

    shape = "x".join(map(str, args.shape))
    print()
    print("| net | input | mode | precision | variant | median s | min s | first s | peak GB "
          "| GMAC | floor s | x floor | GMAC run | x floor run | conv share |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for cfg, rs in zip(configs, results, strict=True):
        ok = [r for r in rs if "error" not in r]
        if cfg["kind"] == "sfcn":
            name, inp, mode = "SFCN", "160x192x160", "full"
        else:
            name, inp, mode = f"BagNet RF{cfg['rf']}", shape, cfg["mode"]
            if mode == "sliding" and ok:
                mode = f"sliding ({ok[0]['windows']} windows, batch {cfg['batch_size']})"
        if not ok:
            print(f"| {name} | {inp} | {mode} | {cfg['precision']} | {cfg['variant']} | "
                  f"failed: {rs[0]['error']} |")
            continue
        times = [t for r in ok for t in r["times"]]
        med = statistics.median(times)
        prec = ok[0]["precision_run"]
        rate = peak[prec] * 1e9
        floor = 2 * ok[0]["gmac"] * 1e9 / rate
        floor_run = 2 * ok[0]["gmac_run"] * 1e9 / rate
        label = cfg["precision"] if prec == cfg["precision"] else f"{cfg['precision']}->{prec}"
        print(f"| {name} | {inp} | {mode} | {label} | {cfg['variant']} | {fmt(med)} | "
              f"{fmt(min(times))} | {fmt(statistics.median(r['first'] for r in ok))} | "
              f"{fmt(max(r['peak_gb'] for r in ok))} | {ok[0]['gmac']:.0f} | {fmt(floor)} | "
              f"{fmt(med / floor, 1)} | {ok[0]['gmac_run']:.0f} | {fmt(med / floor_run, 1)} | "
              f"{_share(ok[0].get('conv_share'))} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
