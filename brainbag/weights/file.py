"""The brainbag weights file: safetensors tensors plus self-describing metadata.

A weights file carries everything needed to rebuild and use the model: the architecture name and
kwargs (rebuilt through :data:`brainbag.network.model.ARCHITECTURES`), the heads, the age target
scaling, the preprocessing it expects, the training data and the code version. Only safetensors is
read: nothing is ever unpickled.

Metadata layout (safetensors metadata is ``str -> str``)::

    format    = "brainbag-weights/1"
    brainbag  = JSON of WeightsMeta

``--weights`` is either a path or a manifest id (:mod:`brainbag.weights.manifest`), turned into a
file by :mod:`brainbag.weights.resolve`; a manifest entry is fetched and verified by
:mod:`brainbag.weights.hub`, and its sha256 is checked again, before the file is parsed, by
:func:`load_weights`. The model card lives in :mod:`brainbag.weights.card`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainbag import __version__
from brainbag.errors import WeightsError
from brainbag.files import atomic_path
from brainbag.image.io import sha256_file
from brainbag.network.model import BagNet3D, build_model

FORMAT = "brainbag-weights/1"
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")

#: What brainbag's own preprocessing produces (see brainbag.image.preprocess).
DEFAULT_PREPROCESSING: dict[str, Any] = {
    "orientation": "RAS+ (closest, by axis permutation)",
    "voxel_mm": 1.0,
    "skull_stripped": True,
    "background": "raw 0 outside the brain mask, then whitened with the image",
    "whitening": "z-score with mean and std over brain-mask voxels",
    "window_xyz": [160, 160, 128],
}


@dataclass
class WeightsMeta:
    """Self-description stored in every weights file."""

    id: str
    architecture: str
    arch_kwargs: dict[str, Any]
    heads: list[str]
    age_scaling: dict[str, float] | None = None
    preprocessing: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_PREPROCESSING))
    training: dict[str, Any] = field(default_factory=dict)
    trained: bool = True
    #: how the global prediction pools the local map: "all" map voxels (the network's plain
    #: global average; older weights) or "brain" (brain-fraction-weighted mean, masked pooling)
    pooling: str = "all"
    #: how to read a prediction for a person (brainbag.person.clinical.fit_calibration): bias
    #: correction, age interval, map-spread range, sex thresholds; {} for uncalibrated weights
    calibration: dict[str, Any] = field(default_factory=dict)
    code_version: str = __version__
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    @property
    def rf(self) -> int:
        return int(self.arch_kwargs["rf"])

    @property
    def voxel_mm(self) -> float:
        """The isotropic voxel size the network was trained at (inputs are conformed to it)."""
        return float(self.preprocessing.get("voxel_mm", 1.0))

    @property
    def rf_mm(self) -> float:
        """The receptive field in millimetres: ``rf`` voxels of ``voxel_mm``."""
        return self.rf * self.voxel_mm

    @property
    def view(self) -> tuple[int, int, int] | None:
        """Size (voxels) of the brain-centred box the network sees, or None (whole volume)."""
        v = self.preprocessing.get("view_xyz")
        return (int(v[0]), int(v[1]), int(v[2])) if v else None

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> WeightsMeta:
        d = json.loads(text)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class LoadedWeights:
    """A model ready for inference with its metadata. ``model`` is a BagNet3D when loaded from a
    file; tests may pass any module with the same map geometry interface.

    ``entry_id`` is the manifest id when the file was chosen through a manifest: it is the
    authoritative name of the weights (the file's own ``meta.id`` is kept as well)."""

    model: Any
    meta: WeightsMeta
    path: Path
    sha256: str
    entry_id: str | None = None
    origin: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return self.entry_id or self.meta.id


def save_weights(
    path: Path, model: BagNet3D, meta: WeightsMeta, dtype: torch.dtype | None = None
) -> str:
    """Write ``model`` and ``meta`` as a brainbag safetensors file; return its sha256.

    The file is written to a temporary name and renamed, so a crash never leaves a partial file.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != SUFFIX:
        raise WeightsError(f"weights must be saved as {SUFFIX}, got {path}")
    state = {
        k: (v.detach().to(dtype) if dtype is not None and v.is_floating_point() else v.detach())
        .contiguous()
        .cpu()
        for k, v in model.state_dict().items()
    }
    # atomic_path: fsynced, renamed into place, with the mode of the other outputs (safetensors
    # itself creates files 0600)
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT, "brainbag": meta.to_json()})
    return sha256_file(path)


def read_meta(path: Path) -> WeightsMeta:
    """Read only the metadata of a weights file (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    check_path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            metadata = fh.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise WeightsError(
            f"weights {path} is not a readable safetensors file ({exc}); "
            "download or copy it again, or check the path"
        ) from exc
    if metadata.get("format") != FORMAT or "brainbag" not in metadata:
        raise WeightsError(
            f"weights {path} is a safetensors file without brainbag metadata "
            f"(format={metadata.get('format')!r}); brainbag needs files written by "
            "`brainbag train` or brainbag.weights.file.save_weights"
        )
    try:
        return WeightsMeta.from_json(metadata["brainbag"])
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"weights {path} has unreadable brainbag metadata ({exc})") from exc


def load_weights(path: Path, sha256: str | None = None) -> LoadedWeights:
    """Rebuild the model from a weights file's metadata and load its tensors (float32, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    check_path(path)
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise WeightsError(
            f"weights {path} has sha256 {digest}, expected {sha256}; the file is corrupt or not "
            "the one listed: delete it and fetch it again"
        )
    meta = read_meta(path)
    try:
        model = build_model(meta.architecture, meta.arch_kwargs)
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"weights {path}: cannot build the model ({exc})") from exc
    if not isinstance(model, BagNet3D):
        raise WeightsError(f"weights {path}: architecture {meta.architecture} is not a BagNet-3D")
    state = load_file(str(path))
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise WeightsError(
            f"weights {path} do not match architecture {meta.architecture} {meta.arch_kwargs} "
            f"({first})"
        ) from exc
    if "age" in model.config.heads and not meta.age_scaling:
        raise WeightsError(f"weights {path} have an age head but no age_scaling metadata")
    model.eval()
    return LoadedWeights(model=model, meta=meta, path=path, sha256=digest)


def check_path(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix != SUFFIX:
        raise WeightsError(f"weights {path} is {_what_file(path)}, not a {SUFFIX} weights "
                           f"file; {_what_is_wanted(path)}")


def _what_file(path: Path) -> str:
    """What a file given as weights seems to be, from its name."""
    from brainbag.image.io import is_image_path

    name = path.name.lower()
    if name.endswith(".ckpt"):
        return "a training checkpoint (a pickle, for `brainbag train --resume`)"
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return "a pickled PyTorch file"
    if is_image_path(path):
        return "an image"
    if path.is_dir():
        return "a folder"
    return f"a {path.suffix or 'suffix-less'} file"


def _what_is_wanted(path: Path) -> str:
    """The fix for a file that is not weights: the run's own weights file when there is one."""
    run_weights = path.parent / f"weights{SUFFIX}"
    if run_weights.is_file():
        return f"its run folder holds the predict-ready weights: --weights {run_weights}"
    wanted = (f"pass the {SUFFIX} file `brainbag train` writes into its run folder "
              f"(weights{SUFFIX}) or a weights id from `brainbag weights list`")
    if path.suffix.lower() == ".ckpt":
        wanted += (f"; this run folder has none yet: `brainbag train DATA --out {path.parent} "
                   "--resume` continues the run and writes it")
    elif path.suffix.lower() in PICKLE_SUFFIXES:
        wanted += ("; brainbag never loads pickled weights (convert a trained model with "
                   "brainbag.weights.file.save_weights)")
    return wanted


def is_weights_path(spec: str) -> bool:
    """True when ``--weights`` (or ``weights info``) names a file rather than a manifest id."""
    return _looks_like_path(spec)


def random_weights_meta(model: nn.Module, weights_id: str) -> WeightsMeta:
    """Metadata for an *untrained* model (tests and benchmarks only)."""
    assert isinstance(model, BagNet3D)
    return WeightsMeta(
        id=weights_id,
        architecture="bagnet3d",
        arch_kwargs=model.config.to_dict(),
        heads=list(model.config.heads),
        age_scaling={"mean": 50.0, "std": 15.0} if "age" in model.config.heads else None,
        training={"data": "none: random initialisation, not a trained model"},
        trained=False,
    )


def _looks_like_path(spec: str) -> bool:
    return (
        "/" in spec
        or os.sep in spec
        or Path(spec).suffix.lower() in (SUFFIX, *PICKLE_SUFFIXES)
        or Path(spec).expanduser().exists()
    )
