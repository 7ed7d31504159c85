"""The fast inference path computes the same function as the module-by-module path.

Without autograd, ``BagNet3D.forward`` folds the stem into one convolution, runs channels-last
with in-place InstanceNorm/ReLU and, under ``torch.autocast``, computes in bfloat16. These tests
hold it to the plain module path (what training differentiates): exactly in float64, closely in
float32, and, on a real scan with a full-size random network, within the issue's bounds in bf16.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import sample

from brainbag.network.inference import InferenceSettings, bf16_native, bf16_supported, predict_maps
from brainbag.network.model import BagNet3D, BagNetConfig, folded_stem_weight, instance_stats

CL = torch.channels_last_3d


def _pair(model: BagNet3D, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(module path with autograd on, fast path under inference_mode)."""
    ref = model(x).detach()
    with torch.inference_mode():
        fast = model(x)
    return ref, fast


@pytest.mark.parametrize(
    "rf, padding, norm",
    [(9, "same", "instance"), (17, "valid", "instance"), (33, "same", "instance"),
     (177, "same", "instance"), (9, "valid", "none"), (33, "same", "none")],
)
def test_fast_path_equals_module_path_in_float64(rf: int, padding: str, norm: str) -> None:
    torch.manual_seed(rf)
    model = BagNet3D(BagNetConfig.for_rf(rf, width=4, padding=padding, norm=norm)).double()
    n = 40 if rf < 177 else 184
    x = torch.randn(2, 1, n, n + 3, n - 5, dtype=torch.float64)
    if rf == 177:
        x = x[:1]
    ref, fast = _pair(model, x)
    assert fast.shape == ref.shape and fast.dtype == torch.float64
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), rtol=0, atol=1e-9 * ref.abs().max())


def test_fast_path_equals_module_path_in_float32_and_leaves_the_input_alone() -> None:
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(17, width=8)).eval()
    x = torch.randn(3, 1, 48, 40, 44) * 2 + 1
    before = x.clone()
    ref, fast = _pair(model, x)
    torch.testing.assert_close(x, before, rtol=0, atol=0)
    assert fast.dtype == torch.float32
    # a random network amplifies float32 rounding (different summation orders) ~1000x
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-3 * ref.abs().max().item())
    # each sample is normalised on its own: the batch equals its samples one by one
    with torch.inference_mode():
        one = model(x[1:2])
    np.testing.assert_allclose(one.numpy(), fast[1:2].numpy(), atol=1e-3 * one.abs().max().item())


@pytest.mark.parametrize("padding", ["same", "valid"])
def test_folded_stem_is_the_two_stem_convolutions(padding: str) -> None:
    """stem1 is 1->w, 1x1x1 and bias-free, so stem2(stem1(x)) = conv(x, W2 @ W1), borders too."""
    torch.manual_seed(1)
    model = BagNet3D(BagNetConfig.for_rf(9, width=6, padding=padding)).double()
    x = torch.randn(2, 1, 11, 9, 13, dtype=torch.float64)
    with torch.no_grad():
        two = model.stem2(model.stem1(x))
        one = F.conv3d(x, folded_stem_weight(model), None, 1, model.stem2.padding)
    np.testing.assert_allclose(one.numpy(), two.numpy(), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["channels_last", "contiguous"])
@pytest.mark.parametrize("shape", [(2, 5, 70, 61, 53), (1, 32, 70, 61, 53)])
def test_instance_stats_are_float32_accurate_with_a_large_offset(dtype, layout, shape) -> None:
    """Mean 40 std 0.5 (ratio 80): a naive sum-of-squares variance would lose it. 32 channels
    of 226,310 voxels: whole pieces of the channels-last kernel calls and a remainder."""
    torch.manual_seed(2)
    x = (torch.randn(*shape, dtype=torch.float64) * 0.5 + 40).to(dtype)
    x = x.contiguous(memory_format=CL) if layout == "channels_last" else x.contiguous()
    mean, rstd = instance_stats(x)
    var_ref, mean_ref = torch.var_mean(x.double(), dim=(2, 3, 4), correction=0)
    assert mean.dtype == torch.float32 and mean.shape == shape[:2]
    np.testing.assert_allclose(mean.numpy(), mean_ref.numpy(), rtol=1e-6)
    np.testing.assert_allclose(rstd.numpy(), torch.rsqrt(var_ref + 1e-5).numpy(), rtol=1e-4)


@pytest.mark.parametrize("rf, padding", [(9, "same"), (177, "same"), (33, "valid")])
def test_folded_norms_compute_the_unfolded_function(rf: int, padding: str, monkeypatch) -> None:
    """On CPU the fast path folds every norm whose consumers are convolutions (issue 17): the
    stem's and the two inside each block. float64, odd and even sizes, so the border
    correction of the padded (strided) 3x3x3 convolutions is checked to rounding."""
    from brainbag.network import model as M

    folded = []
    fold = M._norm_relu_folded
    monkeypatch.setattr(M, "_norm_relu_folded", lambda y: folded.append(y.shape) or fold(y))
    torch.manual_seed(rf)
    model = BagNet3D(BagNetConfig.for_rf(rf, width=4, padding=padding)).double().eval()
    n = 41 if rf < 177 else 180
    x = torch.randn(2, 1, n, n + 4, n - 7, dtype=torch.float64) * 3 + 1
    with torch.inference_mode():
        on = model(x)
        assert len(folded) == 2 * (1 + 2 * 16)  # two samples: stem + 2 per block
        model.fold_norms = False
        off = model(x)
    assert len(folded) == 2 * 33
    ref = model(x).detach()
    np.testing.assert_allclose(on.numpy(), off.numpy(), rtol=0, atol=1e-9 * ref.abs().max())
    np.testing.assert_allclose(on.numpy(), ref.numpy(), rtol=0, atol=1e-9 * ref.abs().max())


def test_autograd_uses_the_module_path_and_reaches_every_parameter() -> None:
    """Training (issue 6) differentiates the module path; the fast path never runs under
    autograd, so in-place operations cannot corrupt a backward pass."""
    torch.manual_seed(3)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).train()
    x = torch.randn(2, 1, 32, 32, 24, requires_grad=True)
    out = model(x)
    assert out.requires_grad
    out[:, 0].mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["stem1.weight"].abs().sum() > 0 and grads["stem2.weight"].abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad():
        fast = model(x)
    ref = out.detach()
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-3 * ref.abs().max().item())


def test_autocast_bfloat16_runs_the_fast_path_in_bfloat16() -> None:
    if not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 support in oneDNN")
    torch.manual_seed(4)
    model = BagNet3D(BagNetConfig.for_rf(9, width=8)).eval()
    with torch.no_grad():  # positive weights: a smooth network, so bf16 errors stay small
        for m in model.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.abs_()
    x = torch.randn(1, 1, 40, 40, 32)
    with torch.inference_mode():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.compute_dtype(x.device) == torch.bfloat16
            features = model.features(x)
            out = model(x)
    assert features.dtype == torch.bfloat16 and out.dtype == torch.float32
    assert features.is_contiguous(memory_format=CL)
    err = (out - ref).abs().max().item()
    assert 0 < err < 0.01 * ref.abs().max().item()  # bf16 really ran, and agrees


def _whole_scan_maps(mode: str) -> dict[str, tuple[np.ndarray, float, float]]:
    """Maps, global age and P(female) of a random full-size RF9 on the conformed Colin27 scan:
    the fp32 module path (the reference), the fast path in fp32 and in bf16."""
    from brainbag.image.io import load_image
    from brainbag.image.preprocess import conform
    from brainbag.run.outputs import brain_cells

    conformed = conform(load_image(sample("ch2bet.nii.gz")), None)
    torch.manual_seed(9)
    model = BagNet3D(BagNetConfig.for_rf(9)).eval()
    scale = {"mean": 50.0, "std": 15.0}  # brainbag.weights.file.random_weights_meta
    out = {}
    runs = [("fast-bf16", True, "bf16"), ("fast-fp32", True, "fp32")]
    if mode == "sliding":  # the module path over the whole volume needs >3 GB: windows only
        runs.append(("reference", False, "fp32"))
    for name, fast, precision in runs:
        model.fast_inference = fast
        result = predict_maps(model, conformed.image.data, conformed.background,
                              InferenceSettings(mode=mode, device="cpu", precision=precision))
        assert result.precision == precision
        age = result.maps[0] * scale["std"] + scale["mean"]
        g = result.global_outputs()
        out[name] = (age, float(g[0] * scale["std"] + scale["mean"]),
                     float(1 / (1 + np.exp(-g[1]))))
    out["cells"] = (brain_cells(conformed.mask, 8, 0.0, out["fast-fp32"][0].shape), 0.0, 0.0)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sliding", "full"])
def test_optimised_paths_stay_within_the_bounds_on_a_real_scan(mode: str) -> None:
    if not bf16_native(torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 units: predict runs bf16 requests in fp32")
    out = _whole_scan_maps(mode)
    cells = out.pop("cells")[0]
    ref = out.get("reference", out["fast-fp32"])
    ref_age, ref_global, ref_p = ref
    # the test means something: local ages vary far more than the tolerance
    assert ref_age[cells].std() > 4.0
    if "reference" in out:
        # channels-last, folded stem, fused norm in fp32: the same maps to float32 rounding
        age, glob, p = out["fast-fp32"]
        assert np.abs(age - ref_age).max() < 0.05
        assert abs(glob - ref_global) < 1e-3 and abs(p - ref_p) < 1e-4
    # bf16: the bounds on the results; its maps still overlay the reference map
    age, glob, p = out["fast-bf16"]
    assert abs(glob - ref_global) <= 0.25, (glob, ref_global)
    assert abs(p - ref_p) <= 0.01, (p, ref_p)
    corr = np.corrcoef(age[cells], ref_age[cells])[0, 1]
    shifted = np.corrcoef(np.roll(ref_age, 1, axis=0)[cells], ref_age[cells])[0, 1]
    assert corr > 0.8 and shifted < 0.5, (corr, shifted)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_fast_path_activation_is_channels_last(dtype, monkeypatch) -> None:
    """A layout change between layers would copy a whole activation (0.5-1 GB at full size)."""
    from brainbag.network import model as M

    if dtype == torch.bfloat16 and not bf16_supported(torch.device("cpu")):
        pytest.skip("this CPU has no bfloat16 support in oneDNN")

    seen = []
    conv = M.conv3d_fast

    def spy(x, weight, stride, padding, bias=None):
        out = conv(x, weight, stride, padding, bias)
        seen.append((x.is_contiguous(memory_format=CL), out.is_contiguous(memory_format=CL)))
        return out

    monkeypatch.setattr(M, "conv3d_fast", spy)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).eval()
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        model(torch.randn(1, 1, 24, 32, 16))
    assert len(seen) == 1 + 3 * 16 + 4  # stem, 16 blocks, 4 projection shortcuts
    assert all(i and o for i, o in seen), seen


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_a_model_moved_to_channels_last_runs_the_same_function(dtype) -> None:
    """Training (issue 6) moves the model to ``channels_last_3d`` and validates under no_grad,
    which runs the fast path with permuted-stride weights (the folded stem's included)."""
    torch.manual_seed(5)
    model = BagNet3D(BagNetConfig.for_rf(17, width=4)).to(dtype)
    x = torch.randn(2, 1, 36, 40, 32, dtype=dtype)
    with torch.no_grad():
        ref = model.head(model.features_reference(x).mean(dim=(2, 3, 4)))
        ref_map = model.features_reference(x)
    model = model.to(memory_format=CL)  # type: ignore[call-overload]
    assert not model.stem2.weight.is_contiguous()
    tol = 1e-9 if dtype == torch.float64 else 1e-3
    with torch.no_grad():
        for inp in (x, x.contiguous(memory_format=CL)):
            np.testing.assert_allclose(model.pooled(inp).numpy(), ref.numpy(),
                                       atol=tol * ref.abs().max().item())
            np.testing.assert_allclose(model.features(inp).numpy(), ref_map.numpy(),
                                       atol=tol * ref_map.abs().max().item())


def test_training_steps_then_fast_evaluation_follow_the_updated_weights() -> None:
    """Train as issue 6 does (Adam on ``pooled``, fp32 and bf16 autocast steps, a channels-last
    model): every step differentiates the module path and changes the weights, and evaluation
    under no_grad (the fast path) computes the updated network, nothing cached from before."""
    torch.manual_seed(6)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4)).to(memory_format=CL).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x = torch.randn(2, 1, 32, 32, 24)
    target = torch.tensor([[0.5, 1.0], [-0.5, 0.0]])
    with torch.no_grad():
        before = model.pooled(x)
    for bf16 in (False, True, False):
        start = {n: p.detach().clone() for n, p in model.named_parameters()}
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model.pooled(x)
        assert out.requires_grad
        loss = F.mse_loss(out.float(), target)
        opt.zero_grad()
        loss.backward()
        for n, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all(), n
            assert p.grad.abs().sum() > 0, n
        opt.step()
        assert all(not torch.equal(p, start[n]) for n, p in model.named_parameters())
    with torch.no_grad():
        fast = model.pooled(x)
        ref = model.head(model.features_reference(x).mean(dim=(2, 3, 4)))
    assert (fast - before).abs().max() > 100 * (fast - ref).abs().max()
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-4 * ref.abs().max().item())


def test_batch_predict_runs_the_fast_path_with_read_ahead(tmp_path, tiny_weights,
                                                          monkeypatch) -> None:
    """The batch Predictor (prepare in a read-ahead thread, infer in the caller's) runs every
    scan through the fast path, with the thread count asked for, recorded per input."""
    import json
    import threading

    from conftest import make_affine, save

    from brainbag.run.predict import PredictSettings, run_predict

    calls: list[str] = []
    fast = BagNet3D._features_fast

    def spy(self: BagNet3D, x: torch.Tensor) -> torch.Tensor:
        calls.append(threading.current_thread().name)
        return fast(self, x)

    monkeypatch.setattr(BagNet3D, "_features_fast", spy)
    rng = np.random.default_rng(0)
    scans = []
    for i in range(3):
        data = np.zeros((40, 44, 36), np.float32)
        data[5:-5, 5:-5, 5:-5] = rng.uniform(50, 150, (30, 34, 26))
        scans.append(save(data, make_affine(), tmp_path / f"s{i}.nii.gz"))
    settings = PredictSettings(out=tmp_path / "out", weights=str(tiny_weights()), force=True,
                               jobs=1, png=False,
                               inference=InferenceSettings(mode="full", threads=1))
    threads = torch.get_num_threads()
    try:
        records = run_predict(scans, settings)
    finally:
        torch.set_num_threads(threads)
    assert [r["status"] for r in records] == ["ok"] * 3
    assert calls == [threading.current_thread().name] * 3
    for i in range(3):
        saved = json.loads((tmp_path / "out" / f"s{i}" / "prediction.json").read_text())
        assert saved["threads"] == 1
