"""The local loss (recipe setting ``local_weight``): every cell of the local map trained on the
subject's age and sex, brain-weighted, from the same forward pass as the pooled prediction."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_dataset

from brainbag.network.model import BagNet3D, BagNetConfig
from brainbag.train.config import TrainConfig
from brainbag.train.record import QuietReporter
from brainbag.train.steps import LossSpec, PooledNet, accumulate_gradients, pooled_and_local
from brainbag.train.trainer import run_training
from brainbag.weights.card import model_card
from brainbag.weights.file import read_meta


def _model() -> BagNet3D:
    torch.manual_seed(0)
    return BagNet3D(BagNetConfig.for_rf(9, width=2, heads=("age", "sex"))).double().eval()


def _masks(n: int, side: int) -> torch.Tensor:
    i, j, k = np.indices((side,) * 3) - (side - 1) / 2
    ball = (i**2 + j**2 + k**2 < (side / 2.2) ** 2).astype(np.float64)
    return torch.from_numpy(np.stack([np.roll(ball, s, axis=0) for s in range(n)]))


@pytest.mark.parametrize("masked", [False, True])
def test_pooling_the_local_map_equals_the_pooled_prediction(masked: bool) -> None:
    """One forward pass gives both: the head is linear, so the (brain-)weighted mean of the
    map is the head of the (brain-)weighted mean of the features."""
    model = _model()
    x = torch.randn(3, 1, 24, 24, 24, dtype=torch.float64)
    cells = model.brain_fractions(_masks(3, 24)).double() if masked else None
    with torch.enable_grad():  # the autograd (training) path
        pooled, local = pooled_and_local(model, x, cells)
        reference = model.pooled(x, cells)
    assert local.shape == (3, 2, 3, 3, 3)
    assert torch.allclose(pooled, reference, atol=1e-10)


def test_the_local_loss_is_the_brain_weighted_mean_of_the_cell_losses() -> None:
    """An oracle written out cell by cell."""
    rng = np.random.default_rng(0)
    local = rng.normal(size=(2, 2, 2, 3, 2))
    brain = rng.uniform(0, 1, size=(2, 2, 3, 2))
    brain[0, 0, 0, 0] = 0.0  # a cell without brain counts for nothing
    targets = np.array([[0.3, 1.0], [-1.2, 0.0]])
    spec = LossSpec(("age", "sex"), age_weight=2.0, sex_weight=0.5, local_weight=1.0)
    got = spec.local_per_sample(torch.from_numpy(local), torch.from_numpy(targets),
                                torch.from_numpy(brain))
    for b in range(2):
        total, weight = 0.0, 0.0
        for idx in np.ndindex(2, 3, 2):
            a, s = local[(b, 0, *idx)], local[(b, 1, *idx)]
            p = 1 / (1 + math.exp(-s))
            y = targets[b, 1]
            bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            total += brain[(b, *idx)] * (2.0 * (a - targets[b, 0]) ** 2 + 0.5 * bce)
            weight += brain[(b, *idx)]
        assert float(got[b]) == pytest.approx(total / weight, rel=1e-12)


def test_gradients_include_the_local_term_and_micro_batches_do_not_change_them() -> None:
    model = _model().train()
    net = PooledNet(model)
    x = torch.randn(4, 1, 16, 16, 16, dtype=torch.float64)
    brain = model.brain_fractions(_masks(4, 16)).double()
    targets = torch.tensor([[0.5, 1.0], [-0.5, 0.0], [1.5, 1.0], [0.0, 0.0]],
                           dtype=torch.float64)
    spec = LossSpec(("age", "sex"), local_weight=0.7)

    def grads(micro: int, cells: torch.Tensor | None) -> list[torch.Tensor]:
        model.zero_grad()
        accumulate_gradients(net, x, targets, spec, micro, denominator=4, cells=cells,
                             brain=brain)
        return [p.grad.clone() for p in model.parameters()]

    # the same loss written out: pooled term + 0.7 * local term, mean over the batch
    model.zero_grad()
    pooled, local = pooled_and_local(model, x, brain)
    expected_loss = (LossSpec(("age", "sex")).per_sample(pooled, targets)
                     + 0.7 * spec.local_per_sample(local, targets, brain)).mean()
    expected_loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    for micro in (4, 1):
        got = grads(micro, brain)
        assert all(torch.allclose(g, e, atol=1e-10) for g, e in zip(got, expected, strict=True))
    # and it is not the pooled loss alone
    model.zero_grad()
    LossSpec(("age", "sex")).per_sample(model.pooled(x, brain), targets).mean().backward()
    assert not all(torch.allclose(p.grad, e) for p, e in zip(model.parameters(), expected,
                                                              strict=True))
    with pytest.raises(ValueError, match="brain fractions"):
        accumulate_gradients(net, x, targets, spec, 0, denominator=4)


def test_training_with_local_weight_records_it(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 8, shape=(16, 16, 16), seed=3, split_every=4)

    def run(name: str, local_weight: float) -> tuple[list[float | None], Path]:
        config = TrainConfig(data=str(data), out=str(tmp_path / name), width=2,
                             crop=[16, 16, 16], batch_size=3, epochs=1, device="cpu",
                             workers=1, local_weight=local_weight)
        result = run_training(config, QuietReporter())
        return [result.history[0]["train_loss"], result.history[0]["val_loss"]], result.weights

    plain, _ = run("plain", 0.0)
    local, weights = run("local", 1.0)
    # same initial weights and views: the local term adds to both the training and the
    # held-out loss
    assert local[0] > plain[0] and local[1] is not None and plain[1] is not None
    assert local[1] > plain[1]
    meta = read_meta(weights)
    assert meta.training["local_weight"] == 1.0
    assert "every cell of the local map" in meta.training["loss"]
    assert "every cell of the local map" in model_card(meta)
