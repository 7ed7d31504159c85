from __future__ import annotations

import numpy as np
import pytest
import torch

from brainbag.network.model import (
    ARCHITECTURES,
    BagNet3D,
    BagNetConfig,
    build_model,
    count_parameters,
    macs_estimate,
    receptive_field,
)

# BAGNET3D.md: parameters (millions) and multiply-adds (G) on 128x160x160 and 182x218x182
DOC_PARAMS = {9: 3.51, 17: 3.93, 33: 5.64, 177: 11.55}
DOC_MACS = {9: (155, 345), 177: (242, 544)}


@pytest.mark.parametrize("rf", [9, 17, 33, 177])
def test_architecture_matches_the_paper(rf: int) -> None:
    cfg = BagNetConfig.for_rf(rf, heads=("age",))
    assert receptive_field(cfg.kernel3) == rf
    model = BagNet3D(cfg)
    assert round(count_parameters(model) / 1e6, 2) == DOC_PARAMS[rf]
    assert model.n_features == 1024
    if rf in DOC_MACS:
        crop, vol = DOC_MACS[rf]
        assert round(macs_estimate(cfg, (128, 160, 160)) / 1e9) == crop
        assert round(macs_estimate(cfg, (182, 218, 182)) / 1e9) == vol
    norms = [m for m in model.modules() if isinstance(m, torch.nn.InstanceNorm3d)]
    assert norms and all(not n.affine and not n.track_running_stats for n in norms)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)]
    assert all(c.bias is None for c in convs)


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("rf", [9, 17, 33])
def test_map_size_matches_the_network(rf: int, padding: str) -> None:
    model = BagNet3D(BagNetConfig.for_rf(rf, width=2, padding=padding)).eval()
    for n in (rf, rf + 7, rf + 8, 41, 48):
        x = torch.zeros(1, 1, n, n + 1, n + 8)  # InstanceNorm needs > 1 map voxel
        with torch.no_grad():
            y = model(x)
        assert tuple(y.shape[2:]) == tuple(model.map_size(s) for s in x.shape[2:])
        if padding == "same":
            assert y.shape[2] == -(-n // 8)
        else:
            assert y.shape[2] == (n - rf) // 8 + 1


def _positive_geometry_model(rf: int, padding: str) -> BagNet3D:
    """No norm and strictly positive weights: every ReLU passes, so the gradient of a map voxel
    is non-zero exactly on its receptive field."""
    model = BagNet3D(BagNetConfig.for_rf(rf, width=2, padding=padding, norm="none"))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Conv3d):
                m.weight.fill_(1.0 / m.weight[0].numel())
        model.head.weight.fill_(1.0)
        model.head.bias.zero_()
    return model.double()


@pytest.mark.parametrize("padding", ["same", "valid"])
@pytest.mark.parametrize("rf", [9, 17, 33])
def test_each_map_voxel_sees_the_rf_cube_centred_where_documented(rf: int, padding: str) -> None:
    """Map voxel i depends on exactly the RF cube centred on input voxel 8 i + c."""
    model = _positive_geometry_model(rf, padding)
    n = 2 * rf + 24
    x = torch.ones(1, 1, n, n, n, dtype=torch.float64, requires_grad=True)
    out = model(x)
    c = model.map_offset
    assert c == (0 if padding == "same" else (rf - 1) / 2)
    half = (rf - 1) // 2
    tested = 0
    for i in range(out.shape[2]):
        centre = 8 * i + c
        if centre - half < 0 or centre + half > n - 1:
            continue  # with "same" padding the border cubes are clipped
        grad = torch.autograd.grad(out[0, 0, i, i, i], x, retain_graph=True)[0][0, 0]
        support = np.argwhere(grad.numpy() > 0)
        lo, hi = support.min(axis=0), support.max(axis=0)
        np.testing.assert_array_equal(lo, [centre - half] * 3)
        np.testing.assert_array_equal(hi, [centre + half] * 3)
        assert (hi - lo + 1 == rf).all()
        tested += 1
    assert tested >= 1


def test_local_map_mean_equals_the_global_prediction() -> None:
    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(17, width=4)).eval()
    x = torch.randn(2, 1, 40, 48, 36)
    with torch.no_grad():
        local = model(x)
        pooled = model.pooled(x)
    assert local.shape[1] == 2
    np.testing.assert_allclose(local.mean(dim=(2, 3, 4)).numpy(), pooled.numpy(), atol=1e-5)


def test_heads_and_registry() -> None:
    assert set(ARCHITECTURES) == {"bagnet3d"}
    model = build_model("bagnet3d", {"rf": 33, "heads": ["sex"], "width": 2})
    assert isinstance(model, BagNet3D)
    assert model.head.out_features == 1 and model.head_index == {"sex": 0}
    with pytest.raises(ValueError, match="unknown architecture"):
        build_model("torchvision.models.resnet50", {})
    with pytest.raises(ValueError, match="heads"):
        BagNetConfig.for_rf(9, heads=("height",))
    with pytest.raises(ValueError, match="receptive field"):
        BagNetConfig.for_rf(13)
    cfg = BagNetConfig.for_rf(9, padding="valid", heads=("age",))
    assert BagNetConfig.from_dict(cfg.to_dict()) == cfg
