"""The brainbag weights file: safetensors tensors plus self-describing metadata.

A weights file carries everything needed to rebuild and use the model: the architecture name and
kwargs (rebuilt through :data:`brainbag.model.ARCHITECTURES`), the heads, the age target scaling,
the preprocessing it expects, the training data and the code version. Only safetensors is read:
nothing is ever unpickled.

Metadata layout (safetensors metadata is ``str -> str``)::

    format    = "brainbag-weights/1"
    brainbag  = JSON of WeightsMeta
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from brainbag import __version__
from brainbag.errors import WeightsError
from brainbag.io import sha256_file
from brainbag.model import BagNet3D, build_model

FORMAT = "brainbag-weights/1"
SUFFIX = ".safetensors"

#: What brainbag's own preprocessing produces (see brainbag.preprocess).
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
    code_version: str = __version__
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    )

    @property
    def rf(self) -> int:
        return int(self.arch_kwargs["rf"])

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
    file; tests may pass any module with the same map geometry interface."""

    model: Any
    meta: WeightsMeta
    path: Path
    sha256: str


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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(state, str(tmp), metadata={"format": FORMAT, "brainbag": meta.to_json()})
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return sha256_file(path)


def read_meta(path: Path) -> WeightsMeta:
    """Read only the metadata of a weights file (no tensors)."""
    from safetensors import safe_open

    path = Path(path)
    _check_path(path)
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
            "`brainbag train` or brainbag.weights.save_weights"
        )
    try:
        return WeightsMeta.from_json(metadata["brainbag"])
    except (ValueError, TypeError) as exc:
        raise WeightsError(f"weights {path} has unreadable brainbag metadata ({exc})") from exc


def load_weights(path: Path, sha256: str | None = None) -> LoadedWeights:
    """Rebuild the model from a weights file's metadata and load its tensors (float32, CPU)."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_meta(path)
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise WeightsError(
            f"weights {path} has sha256 {digest}, expected {sha256}; the file is corrupt or not "
            "the one listed: delete it and fetch it again"
        )
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


def _check_path(path: Path) -> None:
    if not path.exists():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix != SUFFIX:
        raise WeightsError(
            f"weights {path} is not a {SUFFIX} file; brainbag never loads pickled weights "
            "(.pt, .pth, .ckpt): convert them with brainbag.weights.save_weights"
        )


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


def resolve_weights(spec: str | None, rf: int | None) -> Path:
    """Turn ``--weights`` (or its absence) into a local weights file.

    Until trained default weights are published, a missing ``spec`` is an error that says so.
    """
    if spec is None:
        raise WeightsError(
            f"no trained weights are installed for RF {rf or 9}: brainbag {__version__} ships "
            "none yet, so it will not print an age. Pass --weights FILE.safetensors "
            "(a file written by `brainbag train`); see 'Weights' in the README"
        )
    path = Path(spec).expanduser()
    _check_path(path)
    return path
