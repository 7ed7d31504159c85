"""Recipes, and the folds and splits they name, ship inside the package: `brainbag train DATA
--recipe ixi-open-v1` works after a non-editable `pip install .`, from any folder; without
--recipe, train uses the recipe of the shipped weights (issue 23, item 2)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.train.config import (
    DEFAULT_RECIPE,
    default_config,
    find_folds,
    find_recipe,
    resolve,
    shipped,
    shipped_recipes,
)

runner = CliRunner()
PACKAGE = REPO / "brainbag" / "train" / "recipes"


def test_recipes_are_found_in_the_package_from_any_folder() -> None:
    assert Path.cwd() != REPO and not (Path.cwd() / "training").exists()  # the test's own folder
    assert shipped() == PACKAGE and shipped_recipes() == ["camcan-paper", "finetune-small",
                                                         "ixi-open-v1"]
    assert find_recipe("ixi-open-v1") == PACKAGE / "ixi-open-v1.toml"
    config, _ = resolve("data.tsv", "out", "camcan-paper", {})
    assert Path(config.split) == PACKAGE / "splits" / "camcan"
    assert sorted(p.name for p in Path(config.split).iterdir()) == [
        "test.csv", "train.csv", "val.csv"]
    assert find_folds(Path("ixi-5fold")) == PACKAGE / "folds" / "ixi-5fold.tsv"
    assert find_folds(Path("my-folds.tsv")) == Path("my-folds.tsv")  # made when missing
    assert not (REPO / "training" / "recipes").exists()  # one copy, in the package


def test_the_wheel_ships_the_recipes_folds_and_splits(tmp_path: Path) -> None:
    """A real (non-editable) build of the package, from a copy of the sources."""
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("brainbag", "weights_manifest"):
        shutil.copytree(REPO / folder, source / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    isolation = [] if importlib.util.find_spec("setuptools") is None else [
        "--no-build-isolation"]
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                             *isolation, "-w", str(tmp_path / "wheel"), str(source)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel = next((tmp_path / "wheel").glob("brainbag-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped_files = {f"brainbag/train/recipes/{p.relative_to(PACKAGE).as_posix()}"
                     for p in PACKAGE.rglob("*") if p.is_file()}
    assert {"brainbag/train/recipes/ixi-open-v1.toml",
            "brainbag/train/recipes/camcan-paper.toml",
            "brainbag/train/recipes/folds/ixi-5fold.tsv",
            "brainbag/train/recipes/splits/camcan/train.csv"} <= shipped_files
    assert shipped_files <= names, sorted(shipped_files - names)


def test_train_without_a_recipe_uses_the_recipe_of_the_shipped_weights() -> None:
    manifest = json.loads((REPO / "weights_manifest" / "manifest.json").read_text())
    default = next(e for e in manifest["weights"] if e["default"] and e["rf"] == 9)
    assert DEFAULT_RECIPE == default["training"]["recipe"] == "ixi-open-v1"
    config, explicit = resolve("data.tsv", "out", None, {"epochs": 3})
    assert config.recipe == "ixi-open-v1" and config.voxel_mm == 2.0 and config.epochs == 3
    assert explicit == {"epochs"}  # the default recipe does not pin a resumed run's settings
    assert default_config().epochs == 40
    text = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "250"}).stdout
    assert "[default: ixi-open-v1, the recipe of the shipped weights]" in text
    line = next(line for line in text.splitlines() if " --epochs " in line)
    assert "[default: 40]" in line


@pytest.mark.parametrize("recipe", ["ixi-open-v1", "camcan-paper", "finetune-small"])
def test_shipped_recipes_describe_no_data(recipe: str) -> None:
    """A recipe is hyperparameters: the data's name and licence belong to the run (item 6)."""
    text = find_recipe(recipe).read_text()
    assert "data_name" not in text and "data_licence" not in text
