"""Training configuration as plain data: defaults, TOML recipes, flags, and the resolved file.

Precedence: flags over the recipe over :class:`TrainConfig`'s defaults (which are the paper's
hyperparameters, see ``brainbag/train/recipes/camcan-paper.toml``). Without ``--recipe`` the
recipe of the shipped weights (:data:`DEFAULT_RECIPE`) is used. The resolved configuration is
written to the run folder as ``config.toml`` (flat keys; read back with :mod:`tomllib`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from brainbag.errors import UsageError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: the same parser, packaged as tomli
    import tomli as tomllib

#: recipes (``*.toml``) and the folds and splits they name ship inside the package, in
#: ``brainbag/train/recipes/``: found by name after any install, from any folder
RECIPES_PACKAGE = ("brainbag.train", "recipes")
#: the recipe of the shipped default weights (bagnet3d-rf9-ixi-open-v1): ``train`` without
#: ``--recipe`` uses it
DEFAULT_RECIPE = "ixi-open-v1"
TASKS = ("age", "sex", "both")
BEST_METRICS = ("auto", "val_loss", "val_mae", "val_accuracy", "last")
#: the strongest intensity augmentation accepted (gamma up to exp(0.47 * 4) = 6.6 at the top)
MAX_AUGMENT = 4.0


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults = the paper's recipe (BAGNET3D.md)."""

    data: str = ""
    out: str = "runs/brainbag"
    recipe: str = ""
    split: str = ""  # split folder or splits.tsv; "" = random split by subject
    data_name: str = ""  # "" = from the data (BIDS dataset_description.json or folder name)
    data_licence: str = ""
    # fine-tuning (brainbag.train.init): start from these weights (a manifest id or a file)
    init: str = ""
    freeze_stages: int = 0  # with init: the stem and this many of the 4 stages stay fixed
    # model
    rf: int = 9
    task: str = "both"
    width: int = 32
    padding: str = "same"
    voxel_mm: float = 1.0  # isotropic voxel size the network runs at (inputs conformed to it)
    pooling: str = "all"  # global = mean over "all" map voxels, or "brain" (masked pooling)
    # optimisation (Adam with coupled L2, step decay)
    epochs: int = 500
    batch_size: int = 16
    micro_batch: int = 0  # samples per forward pass; 0 = the whole batch
    lr: float = 1e-3
    adam_eps: float = 1e-5
    weight_decay: float = 1e-4
    lr_schedule: str = "step"  # "step" (lr * gamma every lr_step_epochs) or "cosine"
    lr_step_epochs: int = 100
    lr_gamma: float = 0.1
    warmup_epochs: int = 0  # cosine: linear warm-up from lr / warmup_epochs
    grad_clip: float = 0.0  # max gradient norm; 0 = off (the published clipping never acted)
    age_loss_weight: float = 1.0
    sex_loss_weight: float = 1.0
    #: weight of the local loss: every cell of the local map trained on the subject's age and
    #: sex (brain-weighted mean of the per-cell losses); 0 = the pooled loss only
    local_weight: float = 0.0
    # augmentation and validation
    crop: list[int] = field(default_factory=lambda: [160, 160, 128])
    view: str = "crop"  # "crop": random crops of `crop`; "brain": `crop` box centred on the brain
    view_jitter: int = 0  # brain view: random shift of up to this many voxels per axis
    flip: bool = True
    intensity_jitter: float = 0.0  # brain voxels scaled by a random factor in [1 - j, 1 + j]
    #: intensity augmentation strength (gamma, bias field, blur, noise; brainbag.train.augment)
    augment: float = 0.0
    val_view: str = "centre"
    val_every: int = 1
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    best_metric: str = "auto"  # "last": keep the last epoch (validation is only recorded)
    # engine
    seed: int = 42
    device: str = "auto"
    precision: str = "auto"
    channels_last: str = "auto"
    compile: bool = False
    cache_device: str = "auto"
    cache_dtype: str = "float32"
    workers: int = 4
    # stripped brain masks of heads without a mask, one per image sha256 ("" = <out>/brain_masks)
    mask_cache: str = ""

    def validate(self) -> None:
        """Raise :class:`UsageError` for values no run can use."""
        checks: list[tuple[bool, str]] = [
            (self.task in TASKS, f"task must be one of {', '.join(TASKS)}, got {self.task!r}"),
            (self.rf in (9, 17, 33, 177), f"rf must be 9, 17, 33 or 177, got {self.rf}"),
            (self.width >= 1, f"width must be >= 1, got {self.width}"),
            (self.padding in ("same", "valid"), f"padding must be same or valid, got "
                                                f"{self.padding!r}"),
            (0.25 <= self.voxel_mm <= 8 and math.isfinite(self.voxel_mm),
             f"voxel_mm must be in [0.25, 8], got {self.voxel_mm}"),
            (self.pooling in ("all", "brain"), f"pooling must be all or brain, got "
                                               f"{self.pooling!r}"),
            (self.lr_schedule in ("step", "cosine"), f"lr_schedule must be step or cosine, got "
                                                     f"{self.lr_schedule!r}"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.view in ("crop", "brain"), f"view must be crop or brain, got {self.view!r}"),
            (self.view_jitter >= 0, f"view_jitter must be >= 0, got {self.view_jitter}"),
            (0 <= self.intensity_jitter < 1, "intensity_jitter must be in [0, 1)"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch size must be >= 1, got {self.batch_size}"),
            (self.micro_batch >= 0, f"micro batch must be >= 0, got {self.micro_batch}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
            (self.adam_eps > 0, f"adam_eps must be > 0, got {self.adam_eps}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.lr_step_epochs >= 0, "lr_step_epochs must be >= 0 (0 = constant lr)"),
            (0 < self.lr_gamma <= 1, f"lr_gamma must be in (0, 1], got {self.lr_gamma}"),
            (self.grad_clip >= 0, f"grad_clip must be >= 0, got {self.grad_clip}"),
            (self.age_loss_weight >= 0 and self.sex_loss_weight >= 0, "loss weights must be >= 0"),
            (0 <= self.local_weight < math.inf,
             f"local_weight must be a number >= 0, got {self.local_weight}"),
            (0 <= self.augment <= MAX_AUGMENT,
             f"augment must be a strength in [0, {MAX_AUGMENT:g}] (0 = off), got {self.augment}"),
            (len(self.crop) == 3 and all(int(c) >= 1 for c in self.crop),
             f"crop must be three positive sizes (x y z), got {self.crop}"),
            (self.val_view in ("centre", "full"), f"val_view must be centre or full, got "
                                                  f"{self.val_view!r}"),
            (self.val_every >= 1, f"val_every must be >= 1, got {self.val_every}"),
            (self.best_metric in BEST_METRICS, f"best_metric must be one of {BEST_METRICS}"),
            (self.precision in ("auto", "fp32", "bf16"), "precision must be auto, fp32 or bf16"),
            (self.channels_last in ("auto", "on", "off"), "channels_last must be auto, on or off"),
            (self.cache_device in ("auto", "cpu", "device"),
             "cache_device must be auto, cpu or device"),
            (self.cache_dtype in ("float32", "float16"), "cache_dtype must be float32 or float16"),
            (self.workers >= 1, f"workers must be >= 1, got {self.workers}"),
            (0 <= self.freeze_stages <= 4,
             f"freeze_stages must be 0-4 (the stem and that many of the 4 stages), got "
             f"{self.freeze_stages}"),
            (self.freeze_stages == 0 or bool(self.init),
             f"freeze_stages {self.freeze_stages} keeps stages of the weights training starts "
             "from, but no --init WEIGHTS was given: they would stay random; give --init (a "
             "weights id or .safetensors file) or --freeze-stages 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        if self.padding == "valid" and min(self.crop) < self.rf:
            raise UsageError(f"crop {self.crop} is smaller than the receptive field {self.rf} "
                             "(valid padding)")

    @property
    def heads(self) -> tuple[str, ...]:
        return ("age", "sex") if self.task == "both" else (self.task,)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "configuration") -> TrainConfig:
        config = cls()
        apply(config, values, where)
        return config


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: keys a recipe may not set: they belong to one run (the data's name and licence describe the
#: data a run is given, which the weights record from the data itself)
RUN_KEYS = ("data", "out", "recipe", "data_name", "data_licence")


def apply(config: TrainConfig, values: dict[str, Any], where: str) -> None:
    """Set ``values`` on ``config`` with type checks; unknown keys are errors."""
    for key, value in values.items():
        if key not in FIELDS:
            raise UsageError(f"{where}: unknown setting {key!r}; known: {', '.join(FIELDS)}")
        default = getattr(TrainConfig(), key)
        setattr(config, key, _coerce(key, value, default, where))


def _coerce(key: str, value: Any, default: Any, where: str) -> Any:
    def bad() -> UsageError:
        return UsageError(f"{where}: {key} = {value!r} should be a {type(default).__name__}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad()
        return value
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if isinstance(default, list):
        if not isinstance(value, list | tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        ):
            raise bad()
        return [int(v) for v in value]
    if not isinstance(value, str):
        raise bad()
    return value


def read_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"recipe file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML: {exc}") from exc


def shipped(*parts: str) -> Path:
    """A file or folder shipped in ``brainbag/train/recipes/`` (recipes, folds, splits), found
    through :mod:`importlib.resources`: in a source checkout or any installed copy."""
    from importlib.resources import files

    package, folder = RECIPES_PACKAGE
    return Path(str(files(package).joinpath(folder, *parts)))


def shipped_recipes() -> list[str]:
    """The names of the recipes shipped with brainbag."""
    return sorted(p.stem for p in shipped().glob("*.toml"))


def find_recipe(spec: str) -> Path:
    """A recipe path: ``spec`` itself if it is a ``.toml`` path or a file, else the shipped
    recipe of that name (``brainbag/train/recipes/<spec>.toml``)."""
    path = Path(spec).expanduser()
    if path.suffix == ".toml" or path.is_file() or "/" in spec:
        if not path.is_file():
            raise UsageError(f"recipe file not found: {path}")
        return path
    candidate = shipped(f"{spec}.toml")
    if candidate.is_file():
        return candidate
    raise UsageError(
        f"unknown recipe {spec!r}; shipped: {', '.join(shipped_recipes()) or 'none found'} "
        "(or give the path of a .toml file)"
    )


def find_folds(spec: Path) -> Path:
    """``crossval --folds``: a path (made when it does not exist), or the name of shipped folds
    (``ixi-5fold``: ``brainbag/train/recipes/folds/ixi-5fold.tsv``)."""
    name = str(spec)
    if not spec.exists() and "/" not in name and not spec.suffix:
        candidate = shipped("folds", f"{name}.tsv")
        if candidate.is_file():
            return candidate
    return spec


def load_recipe(spec: str) -> tuple[dict[str, Any], Path]:
    """Settings of a recipe; a relative ``split`` is resolved against the recipe's folder."""
    path = find_recipe(spec)
    values = read_toml(path)
    values.pop("description", None)
    values.pop("name", None)
    for key in RUN_KEYS:
        if key in values:
            raise UsageError(f"{path}: {key!r} belongs to one run, not to a recipe")
    bad = [k for k, v in values.items() if isinstance(v, dict)]
    if bad:
        raise UsageError(f"{path}: recipes are flat; unexpected table(s) {bad}")
    if values.get("split"):
        split = Path(str(values["split"]))
        if not split.is_absolute():
            values["split"] = str((path.parent / split).resolve())
    return values, path


def resolve(
    data: str, out: str, recipe: str | None, flags: dict[str, Any]
) -> tuple[TrainConfig, set[str]]:
    """Defaults, then the recipe, then the flags that were given (None = not given).

    Returns the configuration and the names of the settings the recipe or a flag set.
    """
    config = TrainConfig(data=data, out=out)
    explicit: set[str] = set()
    values, path = load_recipe(recipe or DEFAULT_RECIPE)
    apply(config, values, str(path))
    config.recipe = path.stem
    if recipe:  # the default recipe is not the user's choice: --resume keeps the run's own
        explicit |= set(values) | {"recipe"}
    given = {k: v for k, v in flags.items() if v is not None}
    apply(config, given, "options")
    explicit |= set(given)
    config.validate()
    return config, explicit


def default_config() -> TrainConfig:
    """The configuration of ``train`` without options: the defaults with
    :data:`DEFAULT_RECIPE` applied (what ``--help`` shows as each option's default)."""
    config = TrainConfig()
    values, path = load_recipe(DEFAULT_RECIPE)
    apply(config, values, str(path))
    config.recipe = path.stem
    return config


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        text = repr(value)
        return text if any(c in text for c in ".en") else text + ".0"
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def to_toml(values: dict[str, Any], header: str = "") -> str:
    """A flat TOML document (scalars and arrays only)."""
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    return "\n".join(lines) + "\n"
