"""``--weights``/``--rf`` to a verified local weights file: a path, or a manifest entry that the
hub fetches and verifies; then the file is loaded and checked against its entry.

This is the one place that joins the file format (:mod:`brainbag.weights.file`), the manifests
(:mod:`brainbag.weights.manifest`) and the hub (:mod:`brainbag.weights.hub`); none of them imports
it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brainbag import __version__
from brainbag.errors import UsageError, WeightsError
from brainbag.weights.file import (
    LoadedWeights,
    WeightsMeta,
    check_path,
    is_weights_path,
    load_weights,
    read_meta,
)
from brainbag.weights.hub import HubSettings, resolve_entry
from brainbag.weights.manifest import ENV_MANIFEST, WeightsEntry, load_catalog


@dataclass(frozen=True)
class ResolvedWeights:
    """A local weights file chosen by ``--weights`` / ``--rf``, before loading.

    ``sha256`` is the hash the file must have (from the manifest) or None for a plain file path;
    ``entry`` is the manifest entry used, if any; ``source`` says where the file came from:
    ``file`` (a path given by the user), ``bundled``, ``cache`` or ``download``.
    """

    path: Path
    sha256: str | None = None
    entry: WeightsEntry | None = None
    source: str = "file"


def manifest_entry(spec: str | None, rf: int | None, manifests: Sequence[Path] = ()
                   ) -> WeightsEntry | None:
    """The manifest entry ``--weights ID`` names, or without an id the default for ``rf`` (9
    when not given; None when there is none). An unknown id is an error."""
    catalog = load_catalog(manifests)
    if spec is None:
        return catalog.default_for(rf or 9)
    if spec not in catalog.entries:
        known = ", ".join(catalog.entries) or "none"
        raise WeightsError(
            f"--weights {spec!r} is neither a file nor a weights id in the manifests (known ids: "
            f"{known}; manifests: {', '.join(str(m) for m in catalog.manifests)}); pass a "
            ".safetensors path, or an id from `brainbag weights list`"
        )
    return catalog.entries[spec]


def resolve_weights(
    spec: str | None,
    rf: int | None,
    manifests: Sequence[Path] = (),
    hub: HubSettings | None = None,
) -> ResolvedWeights:
    """Turn ``--weights`` (a path or a manifest id) or its absence into a verified local file.

    Without ``spec`` the manifests' default entry for ``rf`` (9 when not given) is used; when
    there is none, the error says that no trained weights are installed and how to supply them.
    Manifest entries are fetched if needed (see :mod:`brainbag.weights.hub`) and hash-verified.
    """
    if spec is not None and is_weights_path(spec):
        path = Path(spec).expanduser()
        check_path(path)
        return ResolvedWeights(path=path)

    entry = manifest_entry(spec, rf, manifests)
    if entry is None:
        raise WeightsError(
            f"no trained weights are installed for RF {rf or 9}: brainbag {__version__} "
            "ships none yet, so it will not print an age. Pass --weights FILE.safetensors "
            "(a file written by `brainbag train`) or --weights ID from a manifest (--manifest "
            f"FILE or ${ENV_MANIFEST}; see `brainbag weights list` and 'Weights' in the README)"
        )
    if rf is not None and entry.rf != rf:
        raise UsageError(
            f"weights {entry.id} are RF {entry.rf} but --rf {rf} was given; drop --rf or pass "
            "weights of that RF"
        )
    resolved = resolve_entry(entry, hub or HubSettings.from_env())
    return ResolvedWeights(path=resolved.path, sha256=resolved.sha256, entry=entry,
                           source=resolved.source)


def check_entry(entry: WeightsEntry, meta: WeightsMeta, path: Path) -> None:
    """Refuse a file whose own metadata contradicts its manifest entry."""
    found = (meta.architecture, meta.rf, sorted(meta.heads))
    expected = (entry.architecture, entry.rf, sorted(entry.heads))
    if found != expected:
        raise WeightsError(
            f"weights {path} describe themselves as {found[0]} RF {found[1]} heads {found[2]} but "
            f"manifest entry {entry.id} in {entry.manifest} says {expected[0]} RF {expected[1]} "
            f"heads {expected[2]}; fix the manifest entry"
        )


@dataclass(frozen=True)
class InputExpectations:
    """What a weights file expects of its inputs, for ``brainbag check``: the voxel size the
    network runs at and the brain view it sees (voxels at that size), and whose they are."""

    voxel_mm: float = 1.0
    view_xyz: tuple[int, int, int] | None = None
    weights_id: str | None = None
    #: the bias-field statistic of the training images (``training.statistics.bias_field``)
    bias_field: dict[str, Any] | None = None


def input_expectations(
    spec: str | None, rf: int | None, manifests: Sequence[Path] = ()
) -> InputExpectations:
    """The expectations of ``--weights``/``--rf`` without loading tensors or downloading: a
    file's metadata, or a manifest entry's ``preprocessing``. No default weights: 1 mm, no view.
    """
    if spec is not None and is_weights_path(spec):
        meta = read_meta(Path(spec).expanduser())
        return InputExpectations(meta.voxel_mm, meta.view, meta.id,
                                 training_statistic(meta.training, "bias_field"))
    entry = manifest_entry(spec, rf, manifests)
    if entry is None:
        return InputExpectations()
    pre = entry.preprocessing or {}
    view = pre.get("view_xyz")
    return InputExpectations(float(pre.get("voxel_mm", 1.0)),
                             tuple(int(v) for v in view) if view else None,  # type: ignore[arg-type]
                             entry.id, training_statistic(entry.training or {}, "bias_field"))


def training_statistic(training: dict[str, Any], name: str) -> dict[str, Any] | None:
    """``training.statistics.<name>`` of weights metadata or a manifest entry (None when the
    weights do not record it)."""
    value = (training.get("statistics") or {}).get(name)
    return value if isinstance(value, dict) else None


def open_weights(
    spec: str | None,
    rf: int | None,
    manifests: Sequence[Path] = (),
    hub: HubSettings | None = None,
) -> LoadedWeights:
    """Resolve ``--weights``/``--rf`` to a file, verify its sha256, then load it."""
    resolved = resolve_weights(spec, rf, manifests, hub)
    loaded = load_weights(resolved.path, sha256=resolved.sha256)
    entry = resolved.entry
    if entry is not None:
        check_entry(entry, loaded.meta, resolved.path)
        loaded.entry_id = entry.id
    loaded.origin = {
        "file_meta_id": loaded.meta.id,
        "source": resolved.source,
        "manifest": str(entry.manifest) if entry is not None and entry.manifest else None,
        "hf": entry.hf.to_dict() if entry is not None and entry.hf else None,
    }
    if rf is not None and loaded.meta.rf != rf:
        raise UsageError(
            f"weights {loaded.path} are RF {loaded.meta.rf} but --rf {rf} was given; "
            "drop --rf or pass weights of that RF"
        )
    return loaded
