"""Fine-tuning (issue 27): ``brainbag train --init WEIGHTS`` starts from exactly those weights,
keeps their architecture, voxel size and age scaling, leaves frozen stages untouched (through a
resume too) and records where it started in the new weights and their model card."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from synthetic import make_dataset
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.train.config import TrainConfig, resolve
from brainbag.train.record import QuietReporter
from brainbag.train.trainer import Trainer
from brainbag.weights.file import load_weights

runner = CliRunner()
FROZEN = ("stem1.", "stem2.", "stages.0.", "stages.1.")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """14 subjects of 24^3 voxels: 8 train, 3 val, 3 test."""
    return make_dataset(tmp_path_factory.mktemp("ft"), 14, shape=(24, 24, 24), seed=2,
                        split_every=5)


class Watcher(QuietReporter):
    """Keeps the model's parameters when training starts and after its first step."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.at_start: dict[str, torch.Tensor] = {}
        self.after_first: dict[str, torch.Tensor] = {}
        self.messages: list[str] = []

    def _state(self) -> dict[str, torch.Tensor]:
        assert self.trainer is not None and self.trainer.model is not None
        return {k: v.detach().clone() for k, v in self.trainer.model.state_dict().items()}

    def message(self, text: str) -> None:
        self.messages.append(text)

    def start(self, first_epoch: int, epochs: int, steps: int, done_steps: int) -> None:
        self.at_start = self._state()

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if not self.after_first:
            self.after_first = self._state()


def train(config: TrainConfig, explicit: set[str], resume: bool = False) -> Watcher:
    watcher = Watcher()
    trainer = Trainer(config, watcher, resume)
    watcher.trainer = trainer
    trainer.run(explicit)
    return watcher


def equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], prefix: str) -> bool:
    keys = [k for k in a if k.startswith(prefix)]
    assert keys, prefix
    return all(torch.equal(a[k], b[k]) for k in keys)


def test_init_starts_from_the_weights_and_frozen_stages_never_change(
        data: Path, tmp_path: Path, tiny_weights) -> None:
    base_path = tiny_weights(width=2)
    base = load_weights(base_path)
    start = {k: v.detach().clone() for k, v in base.model.state_dict().items()}
    flags: dict[str, Any] = {"init": str(base_path), "freeze_stages": 2, "crop": [16, 16, 16],
                             "batch_size": 4, "epochs": 1, "device": "cpu", "workers": 1,
                             "lr": 1e-2, "best_metric": "last"}
    config, explicit = resolve(str(data), str(tmp_path / "run"), None, flags)
    watcher = train(config, explicit)
    # the architecture came from the weights (width 2, not the default 32); the first step
    # starts from exactly their parameters
    assert config.width == 2 and config.task == "both"
    assert watcher.at_start.keys() == start.keys()
    assert all(torch.equal(watcher.at_start[k], start[k]) for k in start)
    # one step later the frozen stem and stages 1-2 are untouched, the rest moved
    after = watcher.after_first
    for prefix in FROZEN:
        assert equal(after, start, prefix), prefix
    for prefix in ("stages.2.", "stages.3.", "head."):
        assert not equal(after, start, prefix), prefix
    out = tmp_path / "run"
    tuned = load_weights(out / "weights.safetensors")
    state = tuned.model.state_dict()
    for prefix in FROZEN:
        assert equal(state, start, prefix), prefix
    init = tuned.meta.training["init"]
    assert init["id"] == base.id and init["sha256"] == base.sha256
    assert init["freeze_stages"] == 2 and init["frozen"] == ["stem1", "stem2", "stages.0",
                                                             "stages.1"]
    assert tuned.meta.age_scaling == base.meta.age_scaling  # the head's years are the base's
    card = (out / "MODEL_CARD.md").read_text()
    assert f"fine-tuned from weights {base.id} (sha256 {base.sha256})" in card
    assert "Use on your own scanner" in card
    assert any(f"fine-tuning weights {base.id}" in m for m in watcher.messages)
    # a resumed run keeps the start and the frozen stages
    config, explicit = resolve(str(data), str(out), None, {**flags, "epochs": 2})
    train(config, explicit, resume=True)
    resumed = load_weights(out / "weights.safetensors")
    assert resumed.meta.training["init"] == init and resumed.meta.training["epochs"] == 2
    for prefix in FROZEN:
        assert equal(resumed.model.state_dict(), start, prefix), prefix
    assert not equal(resumed.model.state_dict(), state, "head.")


def test_without_freezing_every_stage_trains(data: Path, tmp_path: Path, tiny_weights) -> None:
    base_path = tiny_weights(width=2)
    start = load_weights(base_path).model.state_dict()
    config, explicit = resolve(str(data), str(tmp_path / "run"), None, {
        "init": str(base_path), "crop": [16, 16, 16], "batch_size": 4, "epochs": 1,
        "device": "cpu", "workers": 1, "lr": 1e-2})
    watcher = train(config, explicit)
    assert all(torch.equal(watcher.at_start[k], start[k]) for k in start)
    for prefix in (*FROZEN, "stages.2.", "head."):
        assert not equal(watcher.after_first, start, prefix), prefix


def test_a_different_architecture_is_refused_in_one_line(data: Path, tmp_path: Path,
                                                         tiny_weights) -> None:
    base = tiny_weights(width=2)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--init", str(base),
                                 "--width", "4", "--crop", "16", "16", "16", "--device", "cpu"])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    assert "weights random-rf9-w2 have width = 2 but this run sets width = 4" in \
        " ".join(err.split())
    assert not out.exists(), "nothing may be written"
    # freezing stages without weights to start from
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--freeze-stages", "2"])
    assert result.exit_code == 2 and "no --init WEIGHTS was given" in " ".join(
        result.stderr.split())
    # weights that do not exist
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--init",
                                 str(tmp_path / "none.safetensors")])
    assert result.exit_code == 1 and result.stderr.strip().count("\n") == 0
    assert not out.exists()


def test_the_finetune_recipe_needs_init_and_takes_the_shipped_weights_settings(
        tmp_path: Path) -> None:
    """The recipe sets no architecture: with the shipped weights, theirs is used."""
    from brainbag.errors import UsageError
    from brainbag.train.init import adopt
    from brainbag.weights.resolve import open_weights

    with pytest.raises(UsageError, match="no --init WEIGHTS was given"):
        resolve("data", str(tmp_path), "finetune-small", {})
    shipped = open_weights(None, 9)
    config, explicit = resolve("data", str(tmp_path), "finetune-small", {"init": shipped.id})
    assert config.lr == 1e-4 and config.freeze_stages == 2
    adopt(config, shipped, explicit)
    assert (config.width, config.voxel_mm, config.pooling, config.view, config.crop) == (
        8, 2.0, "brain", "brain", list(shipped.meta.view or ()))
