"""Getting the bytes of a manifest entry onto this machine, verified; and publishing new ones.

Resolution of an entry, in order (every file is checked against the entry's sha256 before use):

1. the ``bundled`` file beside the manifest (inside the installed package for the shipped one);
2. the local cache: ``<cache>/models--ORG--NAME/snapshots/<revision>/<filename>``, the
   HuggingFace hub cache layout, so files fetched with ``hf download`` or copied from another
   machine's cache are found too;
3. ``huggingface_hub.hf_hub_download`` of the pinned commit into that cache, then verified; a
   mismatch deletes the download and fails naming the file, the expected and the actual hash.

Settings are read when they are used, not when a module is imported: ``HF_ENDPOINT`` (internal
mirrors), ``HF_HUB_OFFLINE`` or ``--offline`` (no network call at all: huggingface_hub is not even
imported), and the cache folder: ``--cache-dir``, else ``$BRAINBAG_CACHE_DIR``, else the
HuggingFace hub cache (``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from brainbag import __version__
from brainbag.errors import UsageError, WeightsError
from brainbag.weights.manifest import HfSource, WeightsEntry, check_relative_filename, parse_entry

ENV_CACHE = "BRAINBAG_CACHE_DIR"
DEFAULT_ENDPOINT = "https://huggingface.co"
_TRUE = {"1", "on", "yes", "true"}

Source = Literal["bundled", "cache", "download"]


def _env_true(environ: Mapping[str, str], name: str) -> bool:
    return environ.get(name, "").strip().lower() in _TRUE


def default_cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$BRAINBAG_CACHE_DIR``, else the HuggingFace hub cache folder (as huggingface_hub)."""
    env = os.environ if environ is None else environ
    for name in (ENV_CACHE, "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    xdg = env.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(xdg).expanduser() / "huggingface" / "hub"


@dataclass(frozen=True)
class HubSettings:
    """Where weights are cached, which hub endpoint to use and whether the network is allowed."""

    cache_dir: Path
    endpoint: str = DEFAULT_ENDPOINT
    offline: bool = False

    @classmethod
    def from_env(
        cls,
        cache_dir: Path | None = None,
        offline: bool = False,
        environ: Mapping[str, str] | None = None,
    ) -> HubSettings:
        """Options over environment over defaults (``--offline`` or ``HF_HUB_OFFLINE``)."""
        env = os.environ if environ is None else environ
        return cls(
            cache_dir=Path(cache_dir).expanduser() if cache_dir else default_cache_dir(env),
            endpoint=(env.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            offline=offline or _env_true(env, "HF_HUB_OFFLINE"),
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (for records and logs)."""
        return {"cache_dir": str(self.cache_dir), "endpoint": self.endpoint,
                "offline": self.offline}


@dataclass(frozen=True)
class ResolvedFile:
    """A verified local copy of a manifest entry."""

    path: Path
    source: Source
    sha256: str


def repo_cache_dir(hf: HfSource, cache_dir: Path) -> Path:
    """The HuggingFace cache folder of a model repository."""
    return Path(cache_dir) / ("models--" + hf.repo_id.replace("/", "--"))


def cache_path(hf: HfSource, cache_dir: Path) -> Path:
    """Where the pinned file lives in the cache; refuses names that would leave the cache."""
    check_relative_filename(hf.filename, f"hf source {hf.repo_id}")
    snapshot = repo_cache_dir(hf, cache_dir) / "snapshots" / hf.revision
    path = snapshot.joinpath(*hf.filename.split("/"))
    inside = os.path.normpath(path)
    if not inside.startswith(os.path.normpath(snapshot) + os.sep):
        raise WeightsError(
            f"weights file name {hf.filename!r} escapes the cache folder {cache_dir}"
        )
    return path


def _sha256(path: Path) -> str:
    from brainbag.image.io import sha256_file

    return sha256_file(path)


def _mismatch(entry: WeightsEntry, path: Path, actual: str, size: int) -> str:
    return (
        f"weights file {path} has sha256 {actual} ({size} bytes), expected {entry.sha256} "
        f"({entry.size} bytes) for {entry.id} in {entry.manifest}"
    )


def check_copy(entry: WeightsEntry, path: Path) -> str | None:
    """Hash ``path``; return None when it is the entry's file, else a message saying how not."""
    size = path.stat().st_size
    actual = _sha256(path)
    return None if actual == entry.sha256 else _mismatch(entry, path, actual, size)


def delete_cached(path: Path, cache_dir: Path) -> None:
    """Remove a cached file: the snapshot link, any links it goes through (huggingface_hub's
    per-repo blob, which may link on to a shared blob) and the file at the end of the chain,
    deleting only what lies inside the cache folder."""
    root = Path(cache_dir).resolve()
    chain = [Path(path)]
    while chain[-1].is_symlink() and len(chain) < 8:
        link = chain[-1]
        chain.append(Path(os.path.normpath(link.parent / os.readlink(link))))
    for i, item in enumerate(chain):
        inside = Path(os.path.normpath(item.parent.resolve() / item.name)).is_relative_to(root)
        if i == 0 or inside:
            item.unlink(missing_ok=True)


def local_copies(entry: WeightsEntry, settings: HubSettings) -> list[tuple[Source, Path]]:
    """Copies of ``entry`` present on this machine (not yet verified), in resolution order."""
    found: list[tuple[Source, Path]] = []
    bundled = entry.bundled_path
    if bundled is not None and bundled.is_file():
        found.append(("bundled", bundled))
    if entry.hf is not None:
        cached = cache_path(entry.hf, settings.cache_dir)
        if cached.is_file():
            found.append(("cache", cached))
    return found


def resolve_entry(
    entry: WeightsEntry,
    settings: HubSettings,
    on_download: Callable[[WeightsEntry], None] | None = None,
) -> ResolvedFile:
    """Return a verified local copy of ``entry``: bundled, cached, or downloaded now."""
    for source, path in local_copies(entry, settings):
        problem = check_copy(entry, path)
        if problem is None:
            return ResolvedFile(path=path, source=source, sha256=entry.sha256)
        if source == "bundled":
            raise WeightsError(
                f"{problem}; the bundled copy is damaged: reinstall brainbag (or restore the "
                "file next to the manifest)"
            )
        delete_cached(path, settings.cache_dir)
        if settings.offline:
            raise WeightsError(
                f"{problem}; the damaged cached copy was deleted and offline mode is on: run "
                f"`brainbag weights fetch {entry.id}` with network access"
            )
    if entry.hf is None:
        raise WeightsError(
            f"weights {entry.id}: bundled file {entry.bundled_path} is missing and "
            f"{entry.manifest} lists no HuggingFace source; restore the file or reinstall brainbag"
        )
    if settings.offline:
        raise WeightsError(
            f"weights {entry.id} are not in the cache {settings.cache_dir} and offline mode is "
            "on (--offline or HF_HUB_OFFLINE); on a machine with access run `brainbag weights "
            f"fetch {entry.id}` and copy its cache folder here (or use --cache-dir), or pass "
            "--weights FILE"
        )
    if on_download is not None:
        on_download(entry)
    path = download(entry, settings)
    problem = check_copy(entry, path)
    if problem is not None:
        delete_cached(path, settings.cache_dir)
        raise WeightsError(
            f"{problem}; downloaded from {_url(entry.hf, settings)} and deleted: the server "
            "does not serve the file the manifest pins (check HF_ENDPOINT and the manifest)"
        )
    return ResolvedFile(path=path, source="download", sha256=entry.sha256)


def _url(hf: HfSource, settings: HubSettings) -> str:
    return f"{settings.endpoint}/{hf.repo_id}/resolve/{hf.revision}/{hf.filename}"


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def download(entry: WeightsEntry, settings: HubSettings) -> Path:
    """Download the pinned file with huggingface_hub into the cache (not verified here)."""
    assert entry.hf is not None
    hf = entry.hf
    # huggingface_hub resolves the cache folder's symlinks; compare like with like.
    expected = cache_path(hf, Path(settings.cache_dir).expanduser().resolve())
    from huggingface_hub import hf_hub_download

    try:
        got = hf_hub_download(
            repo_id=hf.repo_id,
            filename=hf.filename,
            revision=hf.revision,
            cache_dir=str(settings.cache_dir),
            endpoint=settings.endpoint,
            library_name="brainbag",
            library_version=__version__,
        )
    except Exception as exc:  # network, HTTP and protocol errors all end the same way for users
        raise WeightsError(
            f"could not download weights {entry.id} from {_url(hf, settings)} ({_one_line(exc)}); "
            "check the network, HF_ENDPOINT and HF_TOKEN, or copy the file here and pass "
            "--weights FILE"
        ) from exc
    path = Path(got)
    if os.path.normpath(path) != os.path.normpath(expected):
        # huggingface_hub stores files under the commit the server reports: a server that
        # answers for another commit than the pinned one is not serving what was asked for.
        delete_cached(path, settings.cache_dir)
        raise WeightsError(
            f"{_url(hf, settings)} was served as {path}, not under the pinned commit "
            f"{hf.revision}; the download was deleted (is HF_ENDPOINT a faithful mirror?)"
        )
    return path


@dataclass(frozen=True)
class EntryStatus:
    """What is on this machine for one entry (every present copy hashed)."""

    entry: WeightsEntry
    path: Path | None
    source: Source | None
    status: Literal["ok", "missing", "mismatch"]
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The ``brainbag weights list --json`` object of this entry."""
        return {
            "id": self.entry.id,
            "rf": self.entry.rf,
            "heads": list(self.entry.heads),
            "sha256": self.entry.sha256,
            "size": self.entry.size,
            "default": self.entry.default,
            "trained": self.entry.trained,
            "path": str(self.path) if self.path is not None else None,
            "source": self.source,
            "status": self.status,
            "problems": list(self.problems),
            "manifest": str(self.entry.manifest) if self.entry.manifest else None,
        }


def entry_status(entry: WeightsEntry, settings: HubSettings) -> EntryStatus:
    """Hash every local copy of ``entry``; the first good one is its path."""
    good: tuple[Source, Path] | None = None
    problems: list[str] = []
    for source, path in local_copies(entry, settings):
        problem = check_copy(entry, path)
        if problem is None:
            good = good or (source, path)
        else:
            problems.append(problem)
    if problems:
        status: Literal["ok", "missing", "mismatch"] = "mismatch"
    else:
        status = "ok" if good else "missing"
    return EntryStatus(
        entry=entry,
        path=good[1] if good else None,
        source=good[0] if good else None,
        status=status,
        problems=tuple(problems),
    )


@dataclass(frozen=True)
class PublishSettings:
    """What ``brainbag weights publish`` was asked to do."""

    file: Path
    repo_id: str
    weights_id: str | None = None
    filename: str | None = None
    branch: str = "main"
    private: bool = False
    create_repo: bool = True
    default: bool = False
    licence: str | None = None
    description: str = ""
    metrics: Path | None = None
    write: Path | None = None
    commit_message: str | None = None


def _metrics(path: Path | None) -> list[dict[str, Any]]:
    if path is None:
        return []
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"--metrics {path}: cannot read a JSON list of metrics ({exc})") from exc
    if not isinstance(data, list):
        raise UsageError(f"--metrics {path}: expected a JSON list of objects, found "
                         f"{type(data).__name__}")
    return data


def draft_entry(settings: PublishSettings, revision: str) -> WeightsEntry:
    """The manifest entry for ``settings.file`` at ``revision`` (validated like any entry)."""
    from brainbag.weights.file import SUFFIX, read_meta

    path = Path(settings.file)
    if path.suffix != SUFFIX:
        raise WeightsError(f"{path} is not a {SUFFIX} file; brainbag only publishes safetensors")
    meta = read_meta(path)
    weights_id = settings.weights_id or meta.id
    filename = settings.filename or f"{weights_id}{SUFFIX}"
    licence = settings.licence or str(meta.training.get("licence") or "unspecified")
    raw = {
        "id": weights_id,
        "default": settings.default,
        "description": settings.description,
        "rf": meta.rf,
        "heads": list(meta.heads),
        "architecture": meta.architecture,
        "arch_kwargs": meta.arch_kwargs,
        "preprocessing": meta.preprocessing,
        "training": meta.training,
        "licence": licence,
        "metrics": _metrics(settings.metrics),
        "trained": meta.trained,
        "sha256": _sha256(path),
        "size": path.stat().st_size,
        "sources": {"hf": {"repo_id": settings.repo_id, "revision": revision,
                           "filename": filename}},
    }
    return parse_entry(raw, None)


@dataclass(frozen=True)
class PublishResult:
    """The published entry (pinned to the new commit) and where it was verified."""

    entry: WeightsEntry
    commit_url: str
    verified_path: Path


def publish(settings: PublishSettings, hub: HubSettings) -> PublishResult:
    """Upload a weights file, then download it back by its pinned commit and verify it.

    Returns the manifest entry (commit hash, sha256, size, model card fields from the file's own
    metadata). The file is uploaded with ``HfApi.upload_file`` to ``hub.endpoint``.
    """
    if hub.offline:
        raise UsageError("cannot publish in offline mode (--offline or HF_HUB_OFFLINE is set)")
    draft = draft_entry(settings, revision="0" * 40)
    assert draft.hf is not None
    from huggingface_hub import HfApi

    api = HfApi(endpoint=hub.endpoint, library_name="brainbag", library_version=__version__)
    message = settings.commit_message or f"brainbag: add {draft.id} ({draft.hf.filename})"
    try:
        if settings.create_repo:
            api.create_repo(settings.repo_id, private=settings.private, exist_ok=True)
        info = api.upload_file(
            path_or_fileobj=str(settings.file),
            path_in_repo=draft.hf.filename,
            repo_id=settings.repo_id,
            revision=settings.branch,
            commit_message=message,
        )
    except Exception as exc:  # HTTP, auth and protocol errors all end the same way for users
        hint = "check HF_TOKEN (a write token), the repo name and HF_ENDPOINT"
        if "xet" in str(exc).lower():
            hint = ("the server did not accept a Xet upload: for a Hub-compatible server "
                    "without Xet storage, set HF_HUB_DISABLE_XET=1 to upload over plain Git LFS")
        raise WeightsError(
            f"could not upload {settings.file} to {hub.endpoint}/{settings.repo_id} "
            f"({_one_line(exc)}); {hint}"
        ) from exc
    commit = str(info.oid)
    entry = replace(draft, hf=replace(draft.hf, revision=commit))
    entry = parse_entry(entry.to_dict(), None)
    resolved = resolve_entry(entry, replace(hub, offline=False))
    return PublishResult(entry=entry, commit_url=str(info.commit_url), verified_path=resolved.path)
