from __future__ import annotations

from pathlib import Path

import pytest

from brainbag.errors import UsageError
from brainbag.train.config import TrainConfig, find_recipe, load_recipe, resolve, to_toml, tomllib

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "brainbag" / "train" / "recipes"


def test_the_paper_recipe_is_the_seed_recipe() -> None:
    """BAGNET3D.md: crops 160x160x128 (x,y,z), flips, Adam lr 1e-3 eps 1e-5, coupled L2 1e-4,
    500 epochs, lr / 10 every 100, effective batch 16, centre-crop validation."""
    values, path = load_recipe("camcan-paper")
    assert path == RECIPES / "camcan-paper.toml"
    config, explicit = resolve("data", "out", "camcan-paper", {})
    assert config.crop == [160, 160, 128] and config.flip
    assert (config.lr, config.adam_eps, config.weight_decay) == (1e-3, 1e-5, 1e-4)
    assert (config.epochs, config.lr_step_epochs, config.lr_gamma) == (500, 100, 0.1)
    assert config.batch_size == 16 and config.val_view == "centre" and config.grad_clip == 0
    assert Path(config.split) == RECIPES / "splits" / "camcan"
    assert config.recipe == "camcan-paper" and "lr" in explicit and "rf" not in explicit
    # TrainConfig's defaults are the same hyperparameters (train without --recipe uses the recipe
    # of the shipped weights instead: test_recipes.py)
    defaults = TrainConfig()
    for key in ("crop", "flip", "lr", "adam_eps", "weight_decay", "epochs", "lr_step_epochs",
                "lr_gamma", "batch_size", "val_view", "grad_clip"):
        assert getattr(defaults, key) == values[key], key


def test_flags_override_the_recipe(tmp_path: Path) -> None:
    config, explicit = resolve("d", "o", "camcan-paper",
                               {"epochs": 3, "crop": [32, 32, 24], "lr": None, "seed": 7})
    assert (config.epochs, config.crop, config.lr, config.seed) == (3, [32, 32, 24], 1e-3, 7)
    assert {"epochs", "crop", "seed"} <= explicit and "lr" in explicit  # lr from the recipe


def test_config_toml_round_trips() -> None:
    config = TrainConfig(data="a \"quoted\"\tpath", out="o", lr=3e-4, crop=[8, 16, 24],
                         grad_clip=5.0, compile=True)
    text = to_toml(config.to_dict(), "header line\nsecond")
    assert text.startswith("# header line\n# second\n")
    assert TrainConfig.from_dict(tomllib.loads(text)) == config


def test_bad_recipes_and_values_are_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown recipe 'nope'.*camcan-paper"):
        find_recipe("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 0.1\nlearning_rate = 2\n")
    with pytest.raises(UsageError, match="unknown setting 'learning_rate'"):
        resolve("d", "o", str(bad), {})
    bad.write_text("epochs = 'many'\n")
    with pytest.raises(UsageError, match="epochs = 'many' should be a int"):
        resolve("d", "o", str(bad), {})
    for key in ("out", "data_name", "data_licence"):  # a recipe never names a run's data
        bad.write_text(f"{key} = 'x'\n")
        with pytest.raises(UsageError, match=f"'{key}' belongs to one run"):
            resolve("d", "o", str(bad), {})
    bad.write_text("lr = [\n")
    with pytest.raises(UsageError, match="not valid TOML"):
        resolve("d", "o", str(bad), {})
    for flags in ({"task": "height"}, {"crop": [0, 8, 8]}, {"rf": 13}, {"batch_size": 0},
                  {"lr": -1.0}):
        with pytest.raises(UsageError):
            resolve("d", "o", None, flags)
