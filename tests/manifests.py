"""Helpers for tests that need manifests: entries built from real (random-init) weights files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from brainbag.image.io import sha256_file
from brainbag.weights.file import read_meta
from brainbag.weights.manifest import FORMAT


def entry_for(path: Path, weights_id: str, **extra: Any) -> dict[str, Any]:
    """A manifest entry (plain dict) describing the weights file ``path``.

    ``extra`` sets or overrides fields; ``hf=(repo_id, revision, filename)`` and
    ``bundled="relative/name.safetensors"`` add sources.
    """
    meta = read_meta(path)
    sources: dict[str, Any] = {}
    if "bundled" in extra:
        sources["bundled"] = extra.pop("bundled")
    if "hf" in extra:
        repo_id, revision, filename = extra.pop("hf")
        sources["hf"] = {"repo_id": repo_id, "revision": revision, "filename": filename}
    entry = {
        "id": weights_id,
        "rf": meta.rf,
        "heads": list(meta.heads),
        "architecture": meta.architecture,
        "arch_kwargs": meta.arch_kwargs,
        "preprocessing": meta.preprocessing,
        "training": meta.training,
        "trained": meta.trained,
        "licence": "test only",
        "metrics": [],
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "sources": sources,
    }
    entry.update(extra)
    return entry


def write_manifest(path: Path, *entries: dict[str, Any]) -> Path:
    path.write_text(json.dumps({"format": FORMAT, "weights": list(entries)}, indent=2))
    return path
