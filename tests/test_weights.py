from __future__ import annotations

import json
import pickle
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from brainbag.errors import WeightsError
from brainbag.image.io import sha256_file
from brainbag.network.model import BagNet3D, BagNetConfig
from brainbag.weights.file import (
    FORMAT,
    WeightsMeta,
    load_weights,
    random_weights_meta,
    read_meta,
    save_weights,
)
from brainbag.weights.resolve import resolve_weights


def _model(rf: int = 17, **kw) -> BagNet3D:
    torch.manual_seed(1)
    return BagNet3D(BagNetConfig.for_rf(rf, width=4, **kw)).eval()


def test_round_trip_rebuilds_the_same_model_from_metadata(tmp_path: Path) -> None:
    model = _model(17, padding="valid", heads=("age", "sex"))
    meta = random_weights_meta(model, "test-rf17")
    meta.age_scaling = {"mean": 47.5, "std": 13.25}
    meta.training = {"data": "synthetic", "licence": "n/a", "epochs": 3}
    path = tmp_path / "w.safetensors"
    digest = save_weights(path, model, meta)
    assert digest == sha256_file(path)

    loaded = load_weights(path, sha256=digest)
    assert loaded.model.config == model.config
    assert loaded.meta.age_scaling == {"mean": 47.5, "std": 13.25}
    assert loaded.meta.training["epochs"] == 3
    assert loaded.meta.trained is False
    assert loaded.meta.preprocessing["voxel_mm"] == 1.0
    assert loaded.meta.code_version
    x = torch.randn(1, 1, 40, 41, 42)
    with torch.no_grad():
        np.testing.assert_array_equal(loaded.model(x).numpy(), model(x).numpy())
    assert not any(p.requires_grad and p.grad is not None for p in loaded.model.parameters())


def test_float16_files_load_as_float32(tmp_path: Path) -> None:
    model = _model(9)
    path = tmp_path / "half.safetensors"
    save_weights(path, model, random_weights_meta(model, "half"), dtype=torch.float16)
    loaded = load_weights(path)
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    ref = model.head.weight.detach().half().float()
    torch.testing.assert_close(loaded.model.head.weight, ref)


def test_metadata_is_plain_json_with_the_documented_fields(tmp_path: Path) -> None:
    model = _model(33, heads=("sex",))
    path = tmp_path / "s.safetensors"
    save_weights(path, model, random_weights_meta(model, "sex-only"))
    meta = read_meta(path)
    assert meta.architecture == "bagnet3d" and meta.rf == 33 and meta.heads == ["sex"]
    assert meta.age_scaling is None
    raw = json.loads(meta.to_json())
    for key in ("id", "architecture", "arch_kwargs", "heads", "age_scaling", "preprocessing",
                "training", "code_version", "trained"):
        assert key in raw


def test_pickles_are_never_loaded(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    for name in ("evil.pt", "evil.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(WeightsError) as info:
            load_weights(path)
        assert str(path) in str(info.value)
    assert not marker.exists()


def test_unusable_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        load_weights(tmp_path / "missing.safetensors")
    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(2)}, str(bare))
    with pytest.raises(WeightsError, match="without brainbag metadata"):
        load_weights(bare)
    model = _model(9)
    meta = random_weights_meta(model, "mismatch")
    meta.arch_kwargs = {**meta.arch_kwargs, "width": 8}
    wrong = tmp_path / "wrong.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(wrong),
              metadata={"format": FORMAT, "brainbag": meta.to_json()})
    with pytest.raises(WeightsError, match="do not match"):
        load_weights(wrong)
    good = tmp_path / "good.safetensors"
    save_weights(good, model, random_weights_meta(model, "good"))
    with pytest.raises(WeightsError, match="expected 0+"):
        load_weights(good, sha256="0" * 64)
    with pytest.raises(WeightsError, match=r"\.safetensors"):
        save_weights(tmp_path / "w.pt", model, random_weights_meta(model, "x"))


def test_without_weights_the_message_says_none_are_installed() -> None:
    with pytest.raises(WeightsError, match="no trained weights are installed for RF 17"):
        resolve_weights(None, 17)


def test_meta_ignores_unknown_future_fields() -> None:
    meta = WeightsMeta(id="a", architecture="bagnet3d", arch_kwargs={"rf": 9}, heads=["age"])
    d = json.loads(meta.to_json())
    d["added_in_a_later_version"] = 1
    assert WeightsMeta.from_json(json.dumps(d)).id == "a"


def test_weights_files_get_the_mode_of_other_outputs(tmp_path: Path) -> None:
    """Issue 16: weights.safetensors was written 0600 while the run's other files are 0644."""
    from brainbag.files import default_mode, write_text_atomic

    model = BagNet3D(BagNetConfig.for_rf(9, width=2))
    path = tmp_path / "weights.safetensors"
    save_weights(path, model, random_weights_meta(model, "mode-test"))
    write_text_atomic(tmp_path / "MODEL_CARD.md", "card\n")
    assert stat.S_IMODE(path.stat().st_mode) == default_mode()
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(
        (tmp_path / "MODEL_CARD.md").stat().st_mode)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_model_card_headings_are_one_line_each() -> None:
    """Issue 16: the Validation heading of MODEL_CARD.md was split over two lines."""
    from brainbag.weights.card import model_card

    model = BagNet3D(BagNetConfig.for_rf(9, width=2))
    meta = random_weights_meta(model, "card-test")
    meta.training.update(best_epoch=3, selected_by="val_mae", val_view="centre")
    lines = model_card(meta).splitlines()
    heading = next(line for line in lines if line.startswith("## Validation"))
    assert heading.endswith("centre view)"), heading
    for line in lines:
        if line.startswith("#"):
            assert line.count("(") == line.count(")"), line
