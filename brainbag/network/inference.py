"""Inference: local prediction maps over a whole volume or stitched from sliding windows.

Both modes return raw head outputs on one map grid: map voxel ``i`` (per axis) is centred on
conformed voxel ``stride * i + offset`` (``offset`` = 0 for "same" padding, ``(RF - 1) / 2`` for
"valid"). The global prediction is, in both modes, the mean of this map over all its voxels:

* ``full``: one forward pass over the whole volume. The map mean is exactly the network's global
  average-then-linear output.
* ``sliding``: windows of the training crop size (160x160x128 voxels in x, y, z by default)
  whose starts lie on the stride-8 grid, so every window's map voxels coincide with voxels of the
  one map grid and are stitched without interpolation. Where windows overlap, a map voxel is the
  plain mean of the windows that produced it. ``overlap`` is the fraction of a window's map
  voxels shared with the next window (for "same" padding this equals the fraction of its input
  voxels, to within the stride). The last window is placed so that it produces the last map
  voxel, which puts it flush with the border to within the stride (it may overhang by at most 7
  voxels). Voxels past the border, and whole windows on axes shorter than a window, are filled
  with the background value. Windows are batched.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch

from brainbag.errors import ProcessingError, UsageError

Mode = Literal["auto", "sliding", "full"]
Precision = Literal["fp32", "bf16"]
DEFAULT_WINDOW = (160, 160, 128)


class MapModel(Protocol):
    """What inference needs from a network: its map geometry and a map-valued forward."""

    stride: int

    @property
    def map_offset(self) -> float: ...

    @property
    def min_input(self) -> int: ...

    def map_size(self, n: int) -> int: ...

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True)
class InferenceSettings:
    mode: Mode = "auto"
    window: tuple[int, int, int] = DEFAULT_WINDOW
    overlap: float = 0.25
    batch_size: int = 1
    device: str = "auto"
    precision: Precision = "fp32"
    threads: int = 0  # CPU threads; 0 = auto (see resolve_threads)

    def validate(self, stride: int = 8) -> None:
        if self.mode not in ("auto", "sliding", "full"):
            raise UsageError(f"--mode must be auto, sliding or full, got {self.mode!r}")
        if not 0.0 <= self.overlap < 1.0:
            raise UsageError(f"--overlap must be in [0, 1), got {self.overlap}")
        if len(self.window) != 3 or any(w <= 0 or w % stride for w in self.window):
            raise UsageError(
                f"--window must be three positive multiples of the map stride {stride}, "
                f"got {list(self.window)}"
            )
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.precision not in ("fp32", "bf16"):
            raise UsageError(f"--precision must be fp32 or bf16, got {self.precision!r}")
        if self.threads < 0:
            raise UsageError(f"--threads must be >= 0 (0 = auto), got {self.threads}")


@dataclass
class MapResult:
    """Raw head outputs on the map grid, plus how they were made.

    ``start`` is where the region the network saw begins, in voxels of the conformed volume
    (negative or past the end where a brain view reaches outside it), so map voxel ``i`` is
    centred on conformed voxel ``stride * i + start + offset``. ``brain`` is the fraction of
    brain-mask voxels in each map voxel's cell (None without a mask); with ``pooling ==
    "brain"`` the global outputs are the brain-weighted mean of the map (masked pooling).
    """

    maps: np.ndarray  # (n_outputs, M0, M1, M2), float32 (float64 for a float64 model)
    stride: int
    offset: float
    windows: list[tuple[int, int, int]]
    device: str
    precision: str
    start: tuple[int, int, int] = (0, 0, 0)
    brain: np.ndarray | None = None
    pooling: str = "all"
    mode: str = "full"

    def global_outputs(self) -> np.ndarray:
        """Mean of each output over the map (float64 accumulation): over all map voxels, or
        weighted by each cell's brain fraction for masked pooling."""
        flat = self.maps.reshape(self.maps.shape[0], -1).astype(np.float64)
        if self.pooling == "brain" and self.brain is not None:
            w = self.brain.reshape(-1).astype(np.float64)
            return (flat * w).sum(axis=1) / w.sum()
        return flat.mean(axis=1)


POOLING = ("all", "brain")


def brain_view(mask: np.ndarray, size: tuple[int, int, int] | list[int], multiple: int = 8
               ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """The box the network sees: ``size`` voxels centred on the brain mask's bounding box.

    Returns ``(start, size)`` in voxels of ``mask``'s grid; ``start`` may be negative and the box
    may run past the array (that part is background). An axis on which the brain is larger than
    ``size`` gets the brain's extent rounded up to ``multiple``. The box depends only on the
    brain, not on the field of view: padding or cropping the scan around the brain gives the
    same view (training draws its views the same way, jittered).
    """
    from brainbag.image.io import bounding_box

    bounds = bounding_box(np.asarray(mask, dtype=bool))
    if bounds is None:
        raise ProcessingError("the brain mask is empty: no brain to centre the view on")
    lo, hi = bounds
    start, out = [], []
    for a in range(3):
        extent = int(hi[a] - lo[a])
        n = max(int(size[a]), -(-extent // multiple) * multiple)
        start.append(int(lo[a]) - (n - extent) // 2)
        out.append(n)
    return (start[0], start[1], start[2]), (out[0], out[1], out[2])


def cut_view(volume: np.ndarray, start: tuple[int, int, int], size: tuple[int, int, int],
             fill: float) -> np.ndarray:
    """``volume[start : start + size]`` with ``fill`` wherever the box leaves the array."""
    from brainbag.image.io import box_overlap

    out = np.full(size, fill, dtype=volume.dtype)
    overlap = box_overlap(start, size, volume.shape)
    if overlap is not None:
        out[overlap[1]] = volume[overlap[0]]
    return out


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but no CUDA GPU is available; "
                         "use --device cpu or auto")
    if name not in ("cpu", "cuda") and not name.startswith("cuda:"):
        raise UsageError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def available_cpus() -> int:
    """CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota
    (containers often see every core of the host but may only use a few)."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_cpu_quota()
    return max(1, min(n, math.ceil(quota))) if quota else n


def _cgroup_cpu_quota() -> float | None:
    """CPU quota in CPUs from cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_*``; None if unlimited."""
    try:
        limit, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if limit == "max" else int(limit) / int(period)
    except (OSError, ValueError):
        pass
    try:
        v1_quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        v1_period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
        return v1_quota / v1_period if v1_quota > 0 and v1_period > 0 else None
    except (OSError, ValueError):
        return None


def idle_cpus() -> int:
    """CPUs of this machine that other work leaves idle, at least 1: all of them minus the CPU
    time other processes used over the last :data:`BUSY_SAMPLE_S` seconds (``/proc/stat``),
    rounded; where that cannot be read, minus the 1-minute load average; all of them where
    neither can be read.

    Measured on the shared 2-CPU VM (bench/busy_threads.py, bench/README.md): with the CPUs
    taken by other work, two threads made a predict 1.6-1.9x slower than one (3.4x in issue 16),
    as every parallel operation waits for the thread that is not scheduled. The load average
    alone misleads: it counts tasks waiting on I/O and lags a minute behind (it stays near 1.0
    on that VM when idle, and after one `brainbag predict` ends the next one of a shell loop saw
    the load of the previous and ran on 1 thread of 2).
    """
    cpus = os.cpu_count() or 1
    busy = _busy_cpus()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            return cpus
    return max(1, cpus - int(busy + 0.5))


BUSY_SAMPLE_S = 0.1


def _busy_cpus(interval: float = BUSY_SAMPLE_S) -> float | None:
    """CPUs' worth of time spent busy (all but idle and I/O wait; stolen time counts as busy)
    over ``interval`` seconds while this process sleeps, from ``/proc/stat``; None off Linux."""

    def sample() -> tuple[int, int]:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        if fields[0] != "cpu":
            raise ValueError("no cpu line")
        ticks = [int(v) for v in fields[1:9]]  # user nice system idle iowait irq softirq steal
        return ticks[3] + ticks[4], sum(ticks)

    try:
        idle0, total0 = sample()
        time.sleep(interval)
        idle1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (1.0 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)


def auto_threads(default: int) -> int:
    """``--threads 0``: torch's ``default`` (one per physical core), at most the CPUs this
    process may use (:func:`available_cpus`) and the CPUs other work leaves idle
    (:func:`idle_cpus`)."""
    return max(1, min(default, available_cpus(), idle_cpus()))


def resolve_threads(threads: int) -> int:
    """Set torch's (and SimpleITK's) CPU thread count and return it.

    ``threads > 0`` is used as given, and so is ``OMP_NUM_THREADS`` when set. ``0`` (auto) is
    :func:`auto_threads`: more threads than free CPUs makes every parallel operation wait for a
    descheduled thread.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    elif "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(auto_threads(torch.get_num_threads()))
    n = torch.get_num_threads()
    # SimpleITK (resampling, smoothing, N4, the checks) has its own thread pool, one thread per
    # CPU by default: without this, "--threads 1" still used every core in preprocessing, and
    # shards of one thread each competed for the same cores (bench/shards.py)
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(n)
    return n


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


# oneDNN ISA names (ONEDNN_MAX_CPU_ISA) at or above the first with bfloat16 arithmetic
_BF16_ISAS = ("BF16", "AMX", "FP16", "AVX10", "ALL")


def cpu_bf16_units() -> bool | None:
    """Whether this CPU computes in bfloat16 natively (x86 AVX512-BF16 or AMX-BF16, Arm BF16),
    from ``/proc/cpuinfo`` and an ``ONEDNN_MAX_CPU_ISA`` cap; None where unknown (not Linux)."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    if cap and not any(k in cap.upper() for k in _BF16_ISAS):
        return False
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            flags = set(line.split(":", 1)[1].split())
            return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    return None


def bf16_native(device: torch.device) -> bool:
    """bf16 is worth running: supported, and on a CPU not emulated. oneDNN runs bf16 on any
    AVX-512 CPU, but without bfloat16 units it converts in software: with oneDNN capped to
    AVX512_CORE on the development VM, RF 9 took 5.30 s in bf16 against 3.96 s in fp32
    (bench/README.md, issue 17)."""
    if not bf16_supported(device):
        return False
    return device.type != "cpu" or cpu_bf16_units() is not False


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str | None]:
    """Effective precision and a warning when bf16 had to fall back to fp32."""
    if precision == "bf16" and not bf16_supported(device):
        return "fp32", f"bf16 is not supported on this {device.type}; running in fp32"
    if precision == "bf16" and not bf16_native(device):
        return "fp32", ("this CPU has no bfloat16 units (AVX512-BF16, AMX or Arm BF16): bf16 "
                        "would be emulated and slower than fp32; running in fp32")
    return precision, None


def window_starts(n: int, window: int, model: MapModel, overlap: float) -> tuple[list[int], int]:
    """Window starts along one axis (voxels, multiples of the stride) and end padding needed."""
    if n <= window:
        return [0], window - n
    stride = model.stride
    total = model.map_size(n)
    per_window = model.map_size(window)
    last = max(0, total - per_window)
    step = max(1, int(per_window * (1.0 - overlap)))
    ks = list(range(0, last, step)) + [last]
    starts = [k * stride for k in ks]
    return starts, max(0, starts[-1] + window - n)


def _check_size(shape: tuple[int, ...], model: MapModel) -> None:
    sizes = [model.map_size(n) for n in shape]
    if min(shape) < model.min_input or min(sizes) < 1 or math.prod(sizes) < 2:
        raise ProcessingError(
            f"volume {tuple(shape)} is too small for this network: every axis needs at least "
            f"{model.min_input} voxels and the map at least 2 voxels"
        )


def _model_dtype(model: MapModel) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.dtype
    return torch.float32


def _forward(
    model: MapModel, batch: torch.Tensor, device: torch.device, precision: str
) -> torch.Tensor:
    batch = batch.to(device=device, dtype=_model_dtype(model))
    if precision == "bf16":
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
            out = model(batch)
    else:
        out = model(batch)
    return out if out.dtype == torch.float64 else out.float()


def predict_maps(
    model: MapModel, volume: np.ndarray, background: float, settings: InferenceSettings,
    mask: np.ndarray | None = None, pooling: str = "all",
    view: tuple[int, int, int] | None = None,
) -> MapResult:
    """Run ``model`` over ``volume`` (a conformed, whitened 3D array) and return the map.

    ``mask`` (the brain on ``volume``'s grid) gives each map cell its brain fraction;
    ``pooling="brain"`` makes the global outputs the brain-weighted mean (needs ``mask``).
    ``view`` (a size in voxels) runs the network on the :func:`brain_view` box of that size
    instead of the whole volume; the map then starts at the box's start.
    """
    settings.validate(model.stride)
    if pooling not in POOLING:
        raise UsageError(f"pooling must be one of {POOLING}, got {pooling!r}")
    if pooling == "brain" and mask is None:
        raise ProcessingError("internal: masked pooling needs the brain mask")
    mode = settings.mode
    if mode == "auto":  # weights trained on whole-brain views see one; crop-trained ones slide
        mode = "full" if view is not None else "sliding"
    start = (0, 0, 0)
    if view is not None:
        if mask is None:
            raise ProcessingError("internal: a brain view needs the brain mask")
        start, size = brain_view(mask, view, model.stride)
        volume = cut_view(np.asarray(volume, dtype=np.float32), start, size, background)
        mask = cut_view(np.asarray(mask, dtype=bool), start, size, False)
    device = resolve_device(settings.device)
    precision, _ = resolve_precision(settings.precision, device)
    shape = tuple(int(n) for n in volume.shape)
    _check_size(shape, model)
    target = tuple(model.map_size(n) for n in shape)
    module = model if isinstance(model, torch.nn.Module) else None
    if module is not None:
        module.to(device).eval()

    with torch.inference_mode():
        if mode == "full":
            x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None]
            out = _forward(model, x.to(device), device, precision)[0]
            maps = out.cpu().numpy()
            windows = [(0, 0, 0)]
        else:
            if view is not None:  # windows never larger than the view (no padding around it)
                settings = replace(settings, window=tuple(  # type: ignore[arg-type]
                    min(w, -(-n // model.stride) * model.stride)
                    for w, n in zip(settings.window, volume.shape, strict=True)))
            maps, windows = _sliding(model, volume, background, settings, device, precision)
    if tuple(maps.shape[1:]) != target:
        raise ProcessingError(f"internal: map shape {maps.shape[1:]} differs from {target}")
    if not np.all(np.isfinite(maps)):
        raise ProcessingError(
            "the network produced non-finite values (NaN or Inf); the input may be extreme or "
            "the weights corrupt: check the scan with `brainbag check` and retry with fp32"
        )
    brain = None
    if mask is not None:
        from brainbag.network.model import cell_weights

        t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
        brain = cell_weights(t, model.stride, model.map_offset, list(target))[0].numpy()
        if pooling == "brain" and not brain.any():
            raise ProcessingError("no map voxel covers the brain mask")
    return MapResult(
        maps=maps,
        stride=model.stride,
        offset=model.map_offset,
        windows=windows,
        device=str(device),
        precision=precision,
        start=start,
        brain=brain,
        pooling=pooling,
        mode=mode,
    )


def _sliding(
    model: MapModel,
    volume: np.ndarray,
    background: float,
    settings: InferenceSettings,
    device: torch.device,
    precision: str,
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    shape = volume.shape
    per_axis = [
        window_starts(n, w, model, settings.overlap)
        for n, w in zip(shape, settings.window, strict=True)
    ]
    pads = [p for _, p in per_axis]
    padded = np.full(
        [n + p for n, p in zip(shape, pads, strict=True)], background, dtype=np.float32
    )
    padded[: shape[0], : shape[1], : shape[2]] = volume
    vol = torch.from_numpy(padded)
    # windows no larger than the (padded) volume on axes shorter than a window
    win = [min(w, n) for w, n in zip(settings.window, padded.shape, strict=True)]
    per_window = [model.map_size(w) for w in win]
    if min(win) < model.min_input or math.prod(per_window) < 2:
        raise UsageError(f"--window {list(settings.window)} is too small for this network")
    full = [model.map_size(n) for n in padded.shape]
    acc: torch.Tensor | None = None
    count = torch.zeros(full, dtype=torch.int32)
    starts = list(itertools.product(*[s for s, _ in per_axis]))
    for b in range(0, len(starts), settings.batch_size):
        group = starts[b : b + settings.batch_size]
        batch = torch.stack(
            [vol[s0 : s0 + win[0], s1 : s1 + win[1], s2 : s2 + win[2]] for s0, s1, s2 in group]
        )[:, None]
        out = _forward(model, batch.to(device), device, precision).cpu()
        if acc is None:
            acc = torch.zeros((out.shape[1], *full), dtype=out.dtype)
        for (s0, s1, s2), o in zip(group, out, strict=True):
            k = (s0 // model.stride, s1 // model.stride, s2 // model.stride)
            region = (
                slice(k[0], k[0] + per_window[0]),
                slice(k[1], k[1] + per_window[1]),
                slice(k[2], k[2] + per_window[2]),
            )
            acc[(slice(None), *region)] += o
            count[region] += 1
    assert acc is not None
    target = [model.map_size(n) for n in shape]
    count = count[: target[0], : target[1], : target[2]]
    if bool((count == 0).any()):
        raise ProcessingError("internal: sliding windows left map voxels uncovered")
    maps = acc[:, : target[0], : target[1], : target[2]] / count.to(acc.dtype)
    return maps.numpy(), [tuple(int(v) for v in s) for s in starts]  # type: ignore[misc]


def estimate_windows(shape: tuple[int, int, int], model: MapModel, settings: InferenceSettings
                     ) -> int:
    """Number of windows sliding mode will run over ``shape``."""
    return math.prod(
        len(window_starts(n, w, model, settings.overlap)[0])
        for n, w in zip(shape, settings.window, strict=True)
    )
