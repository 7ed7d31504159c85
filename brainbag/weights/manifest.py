"""The weights manifest: plain, validated data that lists the weight sets brainbag can use.

A manifest is a JSON file (no executable content) of the form::

    {"format": "brainbag-manifest/1",
     "weights": [ {entry}, ... ]}

Each entry names one weights file by ``id`` (versioned: ``...-v<N>``), says what it is (``rf``,
``heads``, ``architecture`` + ``arch_kwargs``, ``preprocessing``, ``training``, ``licence``,
``metrics`` with how they were measured, ``trained``), pins its bytes (``sha256``, ``size``) and
lists where to get them (``sources``): a ``bundled`` file (a path relative to the manifest's own
folder; for the shipped manifest, inside the installed package) and/or a HuggingFace location
(``hf``: ``repo_id``, ``revision`` = a 40-character commit hash, ``filename``). The schema is
documented in ``weights_manifest/README.md`` and enforced here; unknown keys are errors
so that a typo never silently drops a field.

Several manifests combine into a :class:`Catalog`. Precedence, highest first: ``--manifest``
files (in the order given), the files in ``$BRAINBAG_MANIFEST`` (``os.pathsep``-separated), then
the shipped manifest. An id may appear in several manifests only with the same ``sha256`` (the
highest-precedence entry, with its sources, is used); the default entry for an RF is the one marked
``"default": true`` in the highest-precedence manifest that marks one.

This module imports neither torch nor huggingface_hub, so ``brainbag weights list`` stays fast.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from brainbag.errors import ManifestError

FORMAT = "brainbag-manifest/1"
ENV_MANIFEST = "BRAINBAG_MANIFEST"


def _shipped_manifest_path() -> Path:
    """The manifest installed with brainbag: the repository's top-level ``weights_manifest/``,
    installed as the data package ``brainbag.weights_manifest``."""
    try:
        spec = importlib.util.find_spec("brainbag.weights_manifest")
    except ImportError:
        spec = None
    if spec is not None and spec.origin:
        return Path(spec.origin).parent / "manifest.json"
    return Path(__file__).resolve().parents[2] / "weights_manifest" / "manifest.json"


SHIPPED_MANIFEST = _shipped_manifest_path()

#: Receptive fields and heads brainbag's model registry knows (checked against
#: brainbag.network.model in the tests; repeated here so that reading a manifest does not import
#: torch).
KNOWN_RF = (9, 17, 33, 177)
KNOWN_HEADS = ("age", "sex")

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*-v[0-9]+(\.[0-9]+)*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_COMMIT = re.compile(r"[0-9a-f]{40}")
_REPO_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

_ENTRY_KEYS = {
    "id", "default", "description", "rf", "heads", "architecture", "arch_kwargs",
    "preprocessing", "training", "licence", "metrics", "trained", "sha256", "size", "sources",
}
_REQUIRED_KEYS = {"id", "rf", "heads", "architecture", "arch_kwargs", "sha256", "size", "sources"}


@dataclass(frozen=True)
class HfSource:
    """A file in a HuggingFace repository, pinned to one commit."""

    repo_id: str
    revision: str
    filename: str

    def to_dict(self) -> dict[str, str]:
        """Plain-data form, as in the manifest."""
        return {"repo_id": self.repo_id, "revision": self.revision, "filename": self.filename}


@dataclass(frozen=True)
class WeightsEntry:
    """One weights file listed in a manifest."""

    id: str
    rf: int
    heads: tuple[str, ...]
    sha256: str
    size: int
    architecture: str = "bagnet3d"
    arch_kwargs: dict[str, Any] = field(default_factory=dict)
    preprocessing: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    licence: str = "unspecified"
    metrics: list[dict[str, Any]] = field(default_factory=list)
    trained: bool = True
    default: bool = False
    description: str = ""
    bundled: str | None = None
    hf: HfSource | None = None
    #: The manifest file this entry was read from (None for an entry not yet written anywhere).
    manifest: Path | None = None

    @property
    def bundled_path(self) -> Path | None:
        """Absolute path of the bundled file (which may not exist), or None."""
        if self.bundled is None:
            return None
        base = self.manifest.parent if self.manifest is not None else Path.cwd()
        return base / Path(*PurePosixPath(self.bundled).parts)

    def to_dict(self) -> dict[str, Any]:
        """The entry as manifest JSON (without the manifest path)."""
        sources: dict[str, Any] = {}
        if self.bundled is not None:
            sources["bundled"] = self.bundled
        if self.hf is not None:
            sources["hf"] = self.hf.to_dict()
        return {
            "id": self.id,
            "default": self.default,
            "description": self.description,
            "rf": self.rf,
            "heads": list(self.heads),
            "architecture": self.architecture,
            "arch_kwargs": self.arch_kwargs,
            "preprocessing": self.preprocessing,
            "training": self.training,
            "licence": self.licence,
            "metrics": self.metrics,
            "trained": self.trained,
            "sha256": self.sha256,
            "size": self.size,
            "sources": sources,
        }


def check_relative_filename(name: Any, where: str) -> str:
    """Validate a relative POSIX file name that must stay inside the folder it is joined to."""
    if not isinstance(name, str) or not name:
        raise ManifestError(f"{where}: expected a relative file name, found {name!r}")
    path = PurePosixPath(name)
    bad = (
        "\\" in name
        or "\x00" in name
        or path.is_absolute()
        or re.match(r"^[A-Za-z]:", name) is not None
        or any(part in ("", ".", "..") for part in name.split("/"))
    )
    if bad:
        raise ManifestError(
            f"{where}: file name {name!r} escapes its folder (absolute, '..', '.', empty part or "
            "backslash); use a plain relative path such as 'rf9.safetensors'"
        )
    if not name.endswith(".safetensors"):
        raise ManifestError(
            f"{where}: file name {name!r} is not a .safetensors file; brainbag only uses "
            "safetensors weights (never pickles)"
        )
    return name


def _expect(value: Any, kind: type | tuple[type, ...], where: str, what: str) -> Any:
    if isinstance(value, bool) and kind in (int, (int, float)):
        raise ManifestError(f"{where}: expected {what}, found {value!r}")
    if not isinstance(value, kind):
        raise ManifestError(f"{where}: expected {what}, found {value!r}")
    return value


def parse_entry(raw: Any, manifest: Path | None, index: int = 0) -> WeightsEntry:
    """Validate one manifest entry (a dict from JSON) and return it as a :class:`WeightsEntry`."""
    origin = str(manifest) if manifest is not None else "manifest entry"
    where = f"{origin}: weights[{index}]"
    _expect(raw, dict, where, "an object")
    if isinstance(raw.get("id"), str):
        where = f"{origin}: entry {raw['id']!r}"
    unknown = sorted(set(raw) - _ENTRY_KEYS)
    if unknown:
        raise ManifestError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(_ENTRY_KEYS)}")
    missing = sorted(_REQUIRED_KEYS - set(raw))
    if missing:
        raise ManifestError(f"{where}: missing required key(s) {missing}")

    weights_id = _expect(raw["id"], str, where, "a string id")
    if not _ID.fullmatch(weights_id):
        raise ManifestError(
            f"{where}: id {weights_id!r} is not a versioned id; use letters, digits, '.', '_' "
            "or '-' ending in '-v<N>', e.g. 'bagnet3d-rf9-ixi-v0'"
        )
    rf = _expect(raw["rf"], int, f"{where}: rf", "an integer")
    if rf not in KNOWN_RF:
        raise ManifestError(f"{where}: rf {rf} is not one of {list(KNOWN_RF)}")
    heads = _expect(raw["heads"], list, f"{where}: heads", "a list such as [\"age\", \"sex\"]")
    if not heads or len(set(heads)) != len(heads) or any(h not in KNOWN_HEADS for h in heads):
        raise ManifestError(
            f"{where}: heads {heads!r} must be a non-empty subset of {list(KNOWN_HEADS)}"
        )
    architecture = _expect(raw["architecture"], str, f"{where}: architecture", "a string")
    arch_kwargs = _expect(raw["arch_kwargs"], dict, f"{where}: arch_kwargs", "an object")
    if "rf" in arch_kwargs and arch_kwargs["rf"] != rf:
        raise ManifestError(f"{where}: arch_kwargs.rf is {arch_kwargs['rf']} but rf is {rf}")
    if "heads" in arch_kwargs and list(arch_kwargs["heads"]) != list(heads):
        raise ManifestError(
            f"{where}: arch_kwargs.heads is {arch_kwargs['heads']} but heads is {heads}"
        )
    sha256 = _expect(raw["sha256"], str, f"{where}: sha256", "a hex string")
    if not _SHA256.fullmatch(sha256):
        raise ManifestError(
            f"{where}: sha256 {sha256!r} is not 64 lower-case hex characters"
        )
    size = _expect(raw["size"], int, f"{where}: size", "a size in bytes")
    if size <= 0:
        raise ManifestError(f"{where}: size must be positive, found {size}")

    sources = _expect(raw["sources"], dict, f"{where}: sources", "an object")
    unknown = sorted(set(sources) - {"bundled", "hf"})
    if unknown:
        raise ManifestError(f"{where}: unknown source(s) {unknown}; allowed: bundled, hf")
    if not sources:
        raise ManifestError(f"{where}: sources is empty; give 'bundled' and/or 'hf'")
    bundled = None
    if "bundled" in sources:
        bundled = check_relative_filename(sources["bundled"], f"{where}: sources.bundled")
    hf = None
    if "hf" in sources:
        hf = parse_hf_source(sources["hf"], f"{where}: sources.hf")

    optional: dict[str, Any] = {}
    for key, kind, what in (
        ("default", bool, "true or false"),
        ("trained", bool, "true or false"),
        ("description", str, "a string"),
        ("licence", str, "a string"),
        ("preprocessing", dict, "an object"),
        ("training", dict, "an object"),
        ("metrics", list, "a list of objects"),
    ):
        if key in raw:
            optional[key] = _expect(raw[key], kind, f"{where}: {key}", what)
    for i, metric in enumerate(optional.get("metrics", [])):
        _expect(metric, dict, f"{where}: metrics[{i}]", "an object")
        for needed in ("name", "value", "method"):
            if needed not in metric:
                raise ManifestError(
                    f"{where}: metrics[{i}] lacks {needed!r}; every metric says its name, value "
                    "and how it was measured (method: data, split, command)"
                )
    return WeightsEntry(
        id=weights_id,
        rf=rf,
        heads=tuple(heads),
        sha256=sha256,
        size=size,
        architecture=architecture,
        arch_kwargs=arch_kwargs,
        bundled=bundled,
        hf=hf,
        manifest=manifest,
        **optional,
    )


def parse_hf_source(raw: Any, where: str) -> HfSource:
    """Validate an ``hf`` source: a repo, a pinned 40-hex commit and a safe file name."""
    _expect(raw, dict, where, "an object with repo_id, revision, filename")
    unknown = sorted(set(raw) - {"repo_id", "revision", "filename"})
    missing = sorted({"repo_id", "revision", "filename"} - set(raw))
    if unknown or missing:
        raise ManifestError(
            f"{where}: expected keys repo_id, revision, filename; unknown {unknown}, missing "
            f"{missing}"
        )
    repo_id = _expect(raw["repo_id"], str, f"{where}.repo_id", "'org/name'")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(_REPO_PART.fullmatch(p) for p in parts) or ".." in repo_id:
        raise ManifestError(f"{where}.repo_id: {repo_id!r} is not of the form 'org/name'")
    revision = _expect(raw["revision"], str, f"{where}.revision", "a commit hash")
    if not _COMMIT.fullmatch(revision):
        raise ManifestError(
            f"{where}.revision: {revision!r} is not a 40-character lower-case commit hash; "
            "brainbag pins downloads to a commit, never to a branch or tag"
        )
    filename = check_relative_filename(raw["filename"], f"{where}.filename")
    return HfSource(repo_id=repo_id, revision=revision, filename=filename)


def parse_manifest(data: Any, path: Path | None) -> list[WeightsEntry]:
    """Validate a whole manifest document; return its entries in file order."""
    origin = str(path) if path is not None else "manifest"
    _expect(data, dict, origin, f'an object {{"format": "{FORMAT}", "weights": [...]}}')
    if data.get("format") != FORMAT:
        raise ManifestError(
            f"{origin}: format is {data.get('format')!r}, expected {FORMAT!r} (a manifest "
            "written for another brainbag version?)"
        )
    unknown = sorted(set(data) - {"format", "description", "weights"})
    if unknown:
        raise ManifestError(f"{origin}: unknown top-level key(s) {unknown}")
    raw_entries = _expect(data.get("weights", []), list, f"{origin}: weights", "a list")
    entries = [parse_entry(raw, path, i) for i, raw in enumerate(raw_entries)]
    seen: dict[str, int] = {}
    defaults: dict[int, str] = {}
    for entry in entries:
        if entry.id in seen:
            raise ManifestError(f"{origin}: id {entry.id!r} is listed twice")
        seen[entry.id] = 1
        if entry.default:
            if entry.rf in defaults:
                raise ManifestError(
                    f"{origin}: both {defaults[entry.rf]!r} and {entry.id!r} are the default for "
                    f"RF {entry.rf}; mark only one \"default\": true"
                )
            defaults[entry.rf] = entry.id
    return entries


def read_manifest(path: Path) -> list[WeightsEntry]:
    """Read and validate one manifest file."""
    path = Path(path).expanduser().absolute()
    if not path.is_file():
        raise ManifestError(f"manifest not found: {path} (check --manifest or ${ENV_MANIFEST})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(
            f"manifest {path} is not valid JSON (line {exc.lineno}, column {exc.colno}: "
            f"{exc.msg})"
        ) from exc
    return parse_manifest(data, path)


def manifest_document(entries: Iterable[WeightsEntry], description: str | None = None) -> dict:
    """A manifest document (to be written as JSON) holding ``entries``."""
    doc: dict[str, Any] = {"format": FORMAT}
    if description:
        doc["description"] = description
    doc["weights"] = [e.to_dict() for e in entries]
    return doc


def manifest_paths(cli: Sequence[Path] = (), environ: dict[str, str] | None = None) -> list[Path]:
    """Manifest files in precedence order: ``--manifest``, ``$BRAINBAG_MANIFEST``, shipped."""
    env = os.environ if environ is None else environ
    paths = [Path(p).expanduser() for p in cli]
    paths += [Path(p).expanduser() for p in env.get(ENV_MANIFEST, "").split(os.pathsep) if p]
    paths.append(SHIPPED_MANIFEST)
    unique: list[Path] = []
    for p in paths:
        if p.absolute() not in [u.absolute() for u in unique]:
            unique.append(p)
    return unique


@dataclass
class Catalog:
    """All weights entries from the manifests in use, merged by precedence."""

    manifests: list[Path]
    entries: dict[str, WeightsEntry]
    defaults: dict[int, str]

    def get(self, weights_id: str) -> WeightsEntry:
        """The entry called ``weights_id``; an error listing the known ids otherwise."""
        try:
            return self.entries[weights_id]
        except KeyError:
            known = ", ".join(self.entries) or "none"
            raise ManifestError(
                f"unknown weights id {weights_id!r} (known ids: {known}; manifests: "
                f"{', '.join(str(m) for m in self.manifests)}); run `brainbag weights list`, or "
                "add a manifest with --manifest FILE"
            ) from None

    def default_for(self, rf: int) -> WeightsEntry | None:
        """The default entry for ``rf`` (see the precedence rules above), if any."""
        weights_id = self.defaults.get(rf)
        return self.entries[weights_id] if weights_id else None


def load_catalog(cli: Sequence[Path] = (), environ: dict[str, str] | None = None) -> Catalog:
    """Read every manifest in precedence order and merge them (see the module docstring)."""
    paths = manifest_paths(cli, environ)
    entries: dict[str, WeightsEntry] = {}
    defaults: dict[int, str] = {}
    for path in paths:
        for entry in read_manifest(path):
            first = entries.setdefault(entry.id, entry)
            if first.sha256 != entry.sha256:
                raise ManifestError(
                    f"weights id {entry.id!r} has sha256 {first.sha256} in {first.manifest} "
                    f"but {entry.sha256} in {entry.manifest}; an id names one file: give "
                    "the new file a new version (-v<N+1>)"
                )
            if entry.default and entry.rf not in defaults:
                defaults[entry.rf] = entry.id
    return Catalog(manifests=[p.expanduser().absolute() for p in paths], entries=entries,
                   defaults=defaults)


def add_entry(path: Path, entry: WeightsEntry) -> None:
    """Add ``entry`` to the manifest file ``path`` (created if absent), atomically.

    An existing entry with the same id is an error (ids name one file: bump the version). When
    ``entry.default`` is set, other entries of the same RF in that file stop being the default.
    """
    from dataclasses import replace

    from brainbag.files import write_text_atomic

    path = Path(path).expanduser().absolute()
    existing = read_manifest(path) if path.exists() else []
    description = None
    if path.exists():
        description = json.loads(path.read_text(encoding="utf-8")).get("description")
    if any(e.id == entry.id for e in existing):
        raise ManifestError(
            f"manifest {path} already lists {entry.id!r}; an id names one file: publish the new "
            "file under a new version (--id ...-v<N+1>)"
        )
    if entry.default:
        existing = [replace(e, default=False) if e.rf == entry.rf else e for e in existing]
    doc = manifest_document([*existing, entry], description)
    parse_manifest(json.loads(json.dumps(doc)), path)
    write_text_atomic(path, json.dumps(doc, indent=2) + "\n")
