from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from conftest import ProbeModel

from brainbag.errors import UsageError
from brainbag.network.inference import InferenceSettings, predict_maps, window_starts
from brainbag.network.model import BagNet3D, BagNetConfig


@pytest.mark.parametrize("padding, rf", [("same", 9), ("valid", 9), ("valid", 33)])
@pytest.mark.parametrize("window", [40, 64, 128])
@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.9])
def test_window_starts_cover_the_map_on_the_stride_grid(padding, rf, window, overlap) -> None:
    model = ProbeModel(padding, rf)
    for n in range(max(rf, 20), 260, 7):
        starts, pad = window_starts(n, window, model, overlap)
        total = model.map_size(n)
        per = model.map_size(min(window, n + pad))
        assert starts[0] == 0 and all(s % 8 == 0 for s in starts)
        assert starts == sorted(set(starts))
        covered = np.zeros(total + per, bool)
        for s in starts:
            covered[s // 8 : s // 8 + per] = True
        assert covered[:total].all(), (n, window, starts)
        if n > window:
            assert 0 <= pad < 8, "last window is flush with the border to within the stride"
            assert starts[-1] + window >= n
            step = max(1, int(per * (1 - overlap))) * 8
            assert all(b - a <= step for a, b in zip(starts, starts[1:], strict=False))
        else:
            assert starts == [0] and pad == window - n


def _settings(mode: str, **kw) -> InferenceSettings:
    return InferenceSettings(mode=mode, device="cpu", **kw)


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_sliding_equals_full_for_a_local_model(padding: str) -> None:
    """The probe has no border effects and no normalisation: stitching must be exact,
    including windows that overhang the border and an axis shorter than a window."""
    vol = np.random.default_rng(0).standard_normal((61, 50, 20)).astype(np.float32)
    model = ProbeModel(padding, rf=9)
    full = predict_maps(model, vol, -1.0, _settings("full"))
    sliding = predict_maps(model, vol, -1.0, _settings("sliding", window=(24, 32, 24),
                                                        overlap=0.5))
    assert len(sliding.windows) > 4
    np.testing.assert_allclose(sliding.maps, full.maps, rtol=1e-6, atol=1e-7)


def test_sliding_equals_full_for_a_bagnet_without_instance_norm() -> None:
    """With valid padding and no InstanceNorm every map voxel depends only on its own RF cube,
    so a real BagNet's stitched map equals its full-volume map."""
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4, padding="valid", norm="none")).eval()
    vol = np.random.default_rng(1).standard_normal((60, 57, 43)).astype(np.float32)
    full = predict_maps(model, vol, 0.0, _settings("full"))
    sliding = predict_maps(model, vol, 0.0, _settings("sliding", window=(32, 32, 24),
                                                       overlap=0.25, batch_size=3))
    assert len(sliding.windows) >= 8
    scale = np.abs(full.maps).max()
    np.testing.assert_allclose(sliding.maps, full.maps, atol=1e-5 * scale)


def test_one_window_covering_the_volume_equals_full_with_instance_norm() -> None:
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(17, width=4)).eval()
    vol = np.random.default_rng(2).standard_normal((32, 40, 24)).astype(np.float32)
    full = predict_maps(model, vol, 0.0, _settings("full"))
    sliding = predict_maps(model, vol, 0.0, _settings("sliding", window=(32, 40, 24)))
    np.testing.assert_allclose(sliding.maps, full.maps, atol=1e-5)


def test_batching_windows_does_not_change_the_map() -> None:
    """InstanceNorm is per sample, so a batch of windows equals the windows one by one (checked
    in float64: in float32 the conv kernels chosen for different batch sizes round differently)."""
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).eval().double()
    vol = np.random.default_rng(3).standard_normal((48, 40, 40)).astype(np.float32)
    one = predict_maps(model, vol, -0.5, _settings("sliding", window=(32, 24, 24), batch_size=1))
    many = predict_maps(model, vol, -0.5, _settings("sliding", window=(32, 24, 24), batch_size=5))
    assert many.maps.dtype == np.float64
    np.testing.assert_allclose(many.maps, one.maps, atol=1e-10)


def test_full_mode_global_is_the_network_global_and_the_map_mean() -> None:
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(33, width=4)).eval()
    vol = np.random.default_rng(4).standard_normal((40, 44, 36)).astype(np.float32)
    result = predict_maps(model, vol, 0.0, _settings("full"))
    with torch.no_grad():
        pooled = model.pooled(torch.from_numpy(vol)[None, None])[0].numpy()
    np.testing.assert_allclose(result.global_outputs(), pooled, atol=1e-5)
    np.testing.assert_allclose(result.global_outputs(), result.maps.mean(axis=(1, 2, 3)),
                               atol=1e-6)


@pytest.mark.parametrize(
    "kw, message",
    [({"overlap": 1.0}, "overlap"), ({"window": (30, 32, 32)}, "multiples"),
     ({"batch_size": 0}, "batch-size"), ({"mode": "tiles"}, "mode")],
)
def test_bad_settings_are_usage_errors(kw, message) -> None:
    with pytest.raises(UsageError, match=message):
        predict_maps(ProbeModel(), np.zeros((16, 16, 16), np.float32), 0.0,
                     InferenceSettings(device="cpu", **kw))


def test_non_finite_output_is_a_clear_error() -> None:
    from brainbag.errors import ProcessingError

    vol = np.zeros((16, 16, 16), np.float32)
    vol[0, 0, 0] = np.nan
    with pytest.raises(ProcessingError, match="non-finite"):
        predict_maps(ProbeModel(), vol, 0.0, _settings("full"))


def test_threads_auto_never_exceeds_the_cpus_this_process_may_use(monkeypatch) -> None:
    from brainbag.network import inference

    before = torch.get_num_threads()
    try:
        monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
        monkeypatch.setattr(inference, "_cgroup_cpu_quota", lambda: 1.5)
        assert inference.available_cpus() == 2
        monkeypatch.setattr(inference, "_cgroup_cpu_quota", lambda: None)
        assert inference.available_cpus() == 6
        monkeypatch.setattr(inference, "_cgroup_cpu_quota", lambda: 1.0)
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.setattr(inference, "_busy_cpus", lambda: 0.0)
        assert inference.resolve_threads(0) == 1 == torch.get_num_threads()
        assert inference.resolve_threads(3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError, match="threads"):
        InferenceSettings(threads=-1).validate()


def test_threads_auto_leaves_the_cpus_other_work_uses(monkeypatch) -> None:
    """Issue 16: with another job on one of 2 CPUs, the default 2 threads took 150.6 s for a scan
    that took 43.9 s with --threads 1. Auto counts the CPU time other work uses as CPUs taken
    (the load average only where /proc/stat cannot be read)."""
    from brainbag.network import inference

    before = torch.get_num_threads()
    monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(inference.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(inference, "_cgroup_cpu_quota", lambda: None)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    # an idle machine whose load average reads 1.0 (the development VM): both CPUs
    monkeypatch.setattr(inference.os, "getloadavg", lambda: (1.0, 1.0, 1.0))
    try:
        for busy, threads in ((0.1, 2), (0.4, 2), (0.6, 1), (1.0, 1), (1.4, 1), (2.0, 1)):
            monkeypatch.setattr(inference, "_busy_cpus", lambda busy=busy: busy)
            assert inference.auto_threads(2) == threads, busy
            torch.set_num_threads(2)
            assert inference.resolve_threads(0) == threads == torch.get_num_threads(), busy
            assert inference.resolve_threads(2) == 2  # an explicit count is kept
        # no /proc/stat: the load average
        monkeypatch.setattr(inference, "_busy_cpus", lambda: None)
        for load, threads in ((0.4, 2), (1.0, 1)):
            monkeypatch.setattr(inference.os, "getloadavg", lambda load=load: (load, 0.0, 0.0))
            assert inference.auto_threads(2) == threads, load
        # a container limited to 4 of a 64-CPU host's CPUs, the host half busy: 4 threads
        monkeypatch.setattr(inference.os, "cpu_count", lambda: 64)
        monkeypatch.setattr(inference.os, "sched_getaffinity", lambda pid: set(range(64)))
        monkeypatch.setattr(inference, "_cgroup_cpu_quota", lambda: 4.0)
        monkeypatch.setattr(inference, "_busy_cpus", lambda: 32.0)
        assert inference.auto_threads(32) == 4

        def no_load() -> tuple[float, float, float]:
            raise OSError("no load average here")

        monkeypatch.setattr(inference, "_busy_cpus", lambda: None)
        monkeypatch.setattr(inference.os, "getloadavg", no_load)
        assert inference.idle_cpus() == 64
    finally:
        torch.set_num_threads(before)


def test_busy_cpus_reads_the_cpu_time_of_other_work(tmp_path, monkeypatch) -> None:
    """From two /proc/stat samples: busy = 1 - idle share (idle and iowait), times the CPUs."""
    from brainbag.network import inference

    lines = iter(["cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 ...\n",
                  # +50 user, +10 steal, +140 idle, +0 iowait over 200 ticks of 2 CPUs
                  "cpu  150 0 100 940 0 0 0 10 0 0\ncpu0 ...\n"])

    class FakePath:
        def __init__(self, path: str) -> None:
            assert path == "/proc/stat"

        def read_text(self) -> str:
            return next(lines)

    monkeypatch.setattr(inference, "Path", FakePath)
    monkeypatch.setattr(inference.os, "cpu_count", lambda: 2)
    assert inference._busy_cpus(0.0) == pytest.approx(0.6)
    monkeypatch.undo()
    busy = inference._busy_cpus(0.05)  # the real file, where there is one
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1)


def test_threads_also_bound_simpleitk(monkeypatch) -> None:
    """--threads 1 left SimpleITK (resampling, smoothing, checks) on every CPU, so two shards of
    one thread each competed for both cores of this machine (bench/shards.py: 0.59x)."""
    import SimpleITK as sitk

    from brainbag.network import inference

    before_torch = torch.get_num_threads()
    before_itk = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(4)
        assert inference.resolve_threads(1) == 1
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 1
        assert inference.resolve_threads(2) == 2
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == 2
    finally:
        torch.set_num_threads(before_torch)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before_itk)


def test_bf16_on_a_cpu_without_bfloat16_units_runs_fp32(monkeypatch) -> None:
    """oneDNN runs bf16 on any AVX-512 CPU, emulated where the CPU has no bfloat16 units (1.34x
    slower than fp32 here, issue 17): predict then runs fp32 and says why."""
    from brainbag.network import inference

    cpu = torch.device("cpu")
    monkeypatch.setattr(inference, "bf16_supported", lambda device: True)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    monkeypatch.delenv("DNNL_MAX_CPU_ISA", raising=False)
    flags = {"x86 without": "flags\t\t: fpu sse avx2 avx512f avx512bw avx512_vnni\n",
             "x86 with": "flags\t\t: fpu avx512f avx512_bf16\n",
             "AMX": "flags\t\t: fpu avx512f amx_tile amx_bf16\n",
             "Arm with": "Features\t: fp asimd sve bf16\n"}
    for name, text in flags.items():
        monkeypatch.setattr(inference, "Path", lambda p, text=text: _Text(text))
        precision, warning = inference.resolve_precision("bf16", cpu)
        if name == "x86 without":
            assert precision == "fp32" and warning is not None and "no bfloat16 units" in warning
        else:
            assert (precision, warning) == ("bf16", None), name
    # a oneDNN ISA cap below bf16 (how bench/README.md emulated such a CPU) counts as none
    monkeypatch.setattr(inference, "Path", lambda p: _Text(flags["x86 with"]))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE")
    assert inference.resolve_precision("bf16", cpu)[0] == "fp32"
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX512_CORE_AMX")
    assert inference.resolve_precision("bf16", cpu)[0] == "bf16"
    # unknown (no /proc/cpuinfo): trust oneDNN
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA")
    monkeypatch.setattr(inference, "Path", lambda p: _Text(None))
    assert inference.resolve_precision("bf16", cpu)[0] == "bf16"
    assert inference.resolve_precision("fp32", cpu) == ("fp32", None)


class _Text:
    def __init__(self, text: str | None) -> None:
        self.text = text

    def read_text(self) -> str:
        if self.text is None:
            raise OSError("no such file")
        return self.text
