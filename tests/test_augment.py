"""Intensity augmentation (recipe setting ``augment``): identity at zero strength, output whitened
the way predict whitens, deterministic for a generator, wired into training and its records."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from synthetic import make_dataset

from brainbag.errors import UsageError
from brainbag.image.preprocess import whiten
from brainbag.train.augment import augment_intensity, gaussian_blur
from brainbag.train.config import TrainConfig
from brainbag.train.record import QuietReporter
from brainbag.train.trainer import run_training
from brainbag.weights.card import model_card
from brainbag.weights.file import read_meta


def _views(n: int = 2, side: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Whole-brain views as predict makes them: raw > 0 in a ball, 0 outside, whitened over the
    ball (background = -mean / SD)."""
    rng = np.random.default_rng(seed)
    i, j, k = np.indices((side,) * 3) - (side - 1) / 2
    ball = i**2 + j**2 + k**2 < (side / 2.5) ** 2
    xs, masks, backgrounds = [], [], []
    for s in range(n):
        raw = np.where(ball, rng.uniform(50, 150, ball.shape) + 30 * s, 0).astype(np.float32)
        white, stats = whiten(raw, ball)
        xs.append(white)
        masks.append(ball.astype(np.float32))
        backgrounds.append(-stats.mean / stats.std)
    return (torch.from_numpy(np.stack(xs))[:, None], torch.from_numpy(np.stack(masks))[:, None],
            torch.tensor(backgrounds))


def test_zero_strength_is_the_identity() -> None:
    x, m, bg = _views()
    assert augment_intensity(x, m, bg, torch.Generator().manual_seed(0), 0.0) is x


@pytest.mark.parametrize("strength", [0.5, 1.0, 2.0])
def test_the_output_is_whitened_within_the_mask_as_predict_whitens(strength: float) -> None:
    x, m, bg = _views(3)
    y = augment_intensity(x, m, bg, torch.Generator().manual_seed(1), strength)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert not torch.allclose(y, x, atol=1e-2)  # it did something
    for i in range(3):
        inside, outside = y[i][m[i] > 0].double(), y[i][m[i] == 0].double()
        assert float(inside.mean()) == pytest.approx(0.0, abs=1e-5)
        assert float(inside.std(unbiased=False)) == pytest.approx(1.0, abs=1e-4)
        # outside: one value, the whitened raw zero (-mean / SD of the augmented raw brain),
        # as predict gives a background; it lies below the mean of the brain
        assert float(outside.max() - outside.min()) == 0.0 and float(outside[0]) < 0


def test_a_vanishing_strength_gives_back_the_view_background_included() -> None:
    """The raw scale the augmentation works on keeps raw zero where predict put it: at a
    strength near 0 the output is the input, brain and background (a rescale from the brain's
    minimum, or zeros outside, would move the background)."""
    x, m, bg = _views(2)
    y = augment_intensity(x, m, bg, torch.Generator().manual_seed(2), 1e-7)
    assert torch.allclose(y, x, atol=1e-4)
    assert torch.allclose(y[0][m[0] == 0], bg[0].expand(int((m[0] == 0).sum())), atol=1e-4)


def test_the_same_generator_state_gives_the_same_views() -> None:
    x, m, bg = _views(2)
    a = augment_intensity(x, m, bg, torch.Generator().manual_seed(5), 1.0)
    b = augment_intensity(x, m, bg, torch.Generator().manual_seed(5), 1.0)
    c = augment_intensity(x, m, bg, torch.Generator().manual_seed(6), 1.0)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_view_without_brain_is_left_alone() -> None:
    x, m, bg = _views(2)
    m[1] = 0
    y = augment_intensity(x, m, bg, torch.Generator().manual_seed(0), 1.0)
    assert torch.equal(y[1], x[1])


def test_blur_keeps_a_constant_and_the_mean_of_an_impulse() -> None:
    const = torch.full((1, 1, 6, 7, 8), 3.0)
    assert torch.allclose(gaussian_blur(const, 1.5), const)
    impulse = torch.zeros((1, 1, 15, 15, 15))
    impulse[0, 0, 7, 7, 7] = 1.0
    out = gaussian_blur(impulse, 1.0)
    assert float(out.sum()) == pytest.approx(1.0, abs=1e-5)
    assert out[0, 0, 7, 7, 7] == out.max() and out[0, 0, 6, 7, 7] == out[0, 0, 8, 7, 7]


def test_augment_is_a_validated_recipe_setting() -> None:
    TrainConfig(augment=1.0).validate()
    for bad in (-0.1, float("nan"), 10.0):
        with pytest.raises(UsageError, match="augment"):
            TrainConfig(augment=bad).validate()


def test_training_with_augment_changes_the_run_and_records_it(tmp_path: Path) -> None:
    data = make_dataset(tmp_path / "data", 6, shape=(16, 16, 16), seed=2)

    def run(name: str, augment: float) -> tuple[list[float], Path]:
        config = TrainConfig(data=str(data), out=str(tmp_path / name), width=2,
                             crop=[16, 16, 16], batch_size=3, epochs=1, device="cpu",
                             workers=1, val_fraction=0.0, test_fraction=0.0, augment=augment)
        result = run_training(config, QuietReporter())
        return [r["train_loss"] for r in result.history], result.weights

    plain, _ = run("plain", 0.0)
    augmented, weights = run("augmented", 1.0)
    assert plain != augmented
    meta = read_meta(weights)
    assert meta.training["augment"] == 1.0 and meta.training["config"]["augment"] == 1.0
    assert "intensity augmentation, strength 1" in model_card(meta)
