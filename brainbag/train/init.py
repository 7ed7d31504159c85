"""Fine-tuning: ``brainbag train --init WEIGHTS`` starts from existing weights, not random ones.

A site with many healthy controls may do better than a calibration (which only re-reads the
predictions) by training the network itself a little on its own scans. Fine-tuning keeps
everything the weights' numbers mean:

* **the architecture and voxel size** of the weights (RF, width, padding, heads, norm and the
  voxel size the network runs at): settings not given (by an option or the recipe) are taken
  from the weights; one given that differs is refused in one line;
* **how the weights see a scan** (``pooling``, ``view``, ``crop``): taken from the weights
  unless given;
* **the age scaling** (the mean and SD that turn the head's output into years): the weights',
  not one fitted on the new data, so the first step starts from exactly the weights' predictions;
* ``freeze_stages`` N keeps the stem and the first N of the four bottleneck stages as they are
  (not trained, no weight decay): the early, generic features stay, the later ones and the head
  adapt. BagNet-3D's norms are InstanceNorms without running statistics, so a frozen stage does
  not change at all.

The new weights record where they started (``training.init``: id, sha256, the stages frozen)
in their metadata and model card. See ``brainbag/train/recipes/finetune-small.toml`` for a
recipe for small local data, and the README's "Use on your own scanner" for when to fine-tune.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

from brainbag.errors import UsageError
from brainbag.network.model import BLOCKS, BagNet3D, BagNetConfig
from brainbag.train.config import TrainConfig
from brainbag.weights.file import LoadedWeights

#: the stages ``freeze_stages`` counts: the four bottleneck stages (the stem goes with the first)
STAGES = len(BLOCKS)
#: settings that must be the weights' own (taken from them when not given)
SAME = ("rf", "width", "padding", "task", "voxel_mm")
#: settings taken from the weights when not given (a given one is kept)
FROM_WEIGHTS = ("pooling", "view", "crop")
TASK_OF_HEADS = {("age", "sex"): "both", ("age",): "age", ("sex",): "sex"}


def open_init(config: TrainConfig) -> LoadedWeights:
    """The weights ``config.init`` names: a manifest id or a ``.safetensors`` file, resolved
    and verified as ``predict --weights`` does."""
    from brainbag.weights.resolve import open_weights

    return open_weights(config.init, None)


def weights_settings(init: LoadedWeights) -> dict[str, Any]:
    """The training settings the weights ``init`` were made with (those :data:`SAME` and
    :data:`FROM_WEIGHTS` name)."""
    meta = init.meta
    arch = init.model.config
    heads = tuple(arch.heads)
    if heads not in TASK_OF_HEADS:
        raise UsageError(f"--init {init.path}: heads {list(heads)} match no training task")
    view = meta.view
    window = meta.preprocessing.get("window_xyz")
    crop = list(view) if view else ([int(v) for v in window] if window else None)
    values: dict[str, Any] = {
        "rf": arch.rf, "width": arch.width, "padding": arch.padding,
        "task": TASK_OF_HEADS[heads], "voxel_mm": meta.voxel_mm, "pooling": meta.pooling,
        "view": "brain" if view else "crop",
    }
    if crop is not None:
        values["crop"] = crop
    return values


def adopt(config: TrainConfig, init: LoadedWeights, explicit: Iterable[str]) -> list[str]:
    """Set on ``config`` the weights' own settings it did not give; refuse (one line) a given
    architecture or voxel size that differs from the weights'. Returns messages for the run's
    log (a given view setting that differs from the weights')."""
    given = set(explicit)
    theirs = weights_settings(init)
    messages = []
    for key in (*SAME, *FROM_WEIGHTS):
        if key not in theirs:
            continue
        mine = getattr(config, key)
        if mine == theirs[key]:
            continue
        if key not in given:
            setattr(config, key, theirs[key])
        elif key in SAME:
            raise UsageError(
                f"--init {config.init}: weights {init.id} have {key} = {theirs[key]!r} but this "
                f"run sets {key} = {mine!r}: fine-tuning keeps the architecture and voxel size "
                f"of the weights it starts from; drop that option (or use a recipe without it)")
        else:
            messages.append(f"warning: weights {init.id} were trained with {key} = "
                            f"{theirs[key]!r}; this run uses {key} = {mine!r} as asked")
    config.validate()
    mine_arch = BagNetConfig.for_rf(config.rf, width=config.width, heads=config.heads,
                                    padding=config.padding)  # type: ignore[arg-type]
    if mine_arch != init.model.config:
        raise UsageError(f"--init {config.init}: weights {init.id} are a BagNet-3D "
                         f"{init.model.config.to_dict()}, not the {mine_arch.to_dict()} this "
                         "run builds; fine-tune weights brainbag train wrote")
    return messages


def start_from(model: BagNet3D, init: LoadedWeights) -> None:
    """Copy the weights' parameters into ``model`` (the same architecture: checked)."""
    model.load_state_dict(init.model.state_dict(), strict=True)


def frozen_modules(model: BagNet3D, stages: int) -> list[tuple[str, nn.Module]]:
    """The modules ``freeze_stages`` = ``stages`` keeps: the stem and the first ``stages``
    bottleneck stages (none for 0)."""
    if not 0 <= stages <= STAGES:
        raise UsageError(f"freeze_stages must be 0-{STAGES}, got {stages}")
    if stages == 0:
        return []
    stem: list[tuple[str, nn.Module]] = [("stem1", model.stem1), ("stem2", model.stem2)]
    return stem + [(f"stages.{i}", model.stages[i]) for i in range(stages)]


def freeze(model: BagNet3D, stages: int) -> list[str]:
    """Stop training the stem and the first ``stages`` stages; returns their names."""
    names = []
    for name, module in frozen_modules(model, stages):
        for p in module.parameters():
            p.requires_grad_(False)
        names.append(name)
    return names


def init_record(init: LoadedWeights, config: TrainConfig, frozen: list[str]) -> dict[str, Any]:
    """``training.init`` of the new weights: where they started and what stayed fixed."""
    return {"id": init.id, "sha256": init.sha256, "file_meta_id": init.meta.id,
            "age_range": init.meta.training.get("age_range"),
            "data": init.meta.training.get("data"),
            "freeze_stages": config.freeze_stages, "frozen": frozen}


def prepare(model: BagNet3D, init: LoadedWeights | None, config: TrainConfig
            ) -> dict[str, Any] | None:
    """Before training (a resumed run too): start ``model`` from ``init`` when given, freeze
    ``config.freeze_stages`` stages. Returns ``training.init`` (None without ``init``)."""
    if init is not None:
        start_from(model, init)
    frozen = freeze(model, config.freeze_stages)
    return init_record(init, config, frozen) if init is not None else None


def age_range_with(ages: list[float], init: dict[str, Any] | None) -> list[float] | None:
    """The training age range of the new weights: the ages trained on, with those the base
    weights were trained on when fine-tuned (``init``: their ``training.init``)."""
    if not ages:
        return None
    lo, hi = min(ages), max(ages)
    base = (init or {}).get("age_range")
    if base:
        lo, hi = min(lo, float(base[0])), max(hi, float(base[1]))
    return [lo, hi]
