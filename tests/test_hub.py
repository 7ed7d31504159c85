"""Pinned, verified downloads through the real huggingface_hub client against a local server.

The server (tests/hubserver.py) answers the Hub's resolve/CDN download protocol on 127.0.0.1;
no test talks to the real Hub (conftest refuses any non-loopback connection).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import huggingface_hub.file_download
import huggingface_hub.utils._http
import pytest
from manifests import entry_for, write_manifest

from brainbag.errors import WeightsError
from brainbag.weights.hub import (
    HubSettings,
    cache_path,
    default_cache_dir,
    delete_cached,
    entry_status,
    resolve_entry,
)
from brainbag.weights.manifest import HfSource, load_catalog, parse_entry

REPO = "brainbag-tests/bagnet3d"


def _publish_to(hub, weights: Path, repo: str = REPO, name: str = "rf9.safetensors") -> str:
    return hub.add_file(repo, name, weights.read_bytes())


def _entry(weights: Path, revision: str, weights_id: str = "test-rf9-v1",
           name: str = "rf9.safetensors", **extra):
    return parse_entry(entry_for(weights, weights_id, hf=(REPO, revision, name), **extra), None)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def test_settings_are_read_when_used_not_at_import(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_ENDPOINT", "http://mirror.internal:8080/")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    s = HubSettings.from_env()
    assert (s.endpoint, s.offline) == ("http://mirror.internal:8080", True)
    assert s.cache_dir == Path(os.environ["HF_HOME"]) / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    assert default_cache_dir() == tmp_path / "hf"
    monkeypatch.setenv("BRAINBAG_CACHE_DIR", str(tmp_path / "bb"))
    assert default_cache_dir() == tmp_path / "bb"
    assert HubSettings.from_env(cache_dir=tmp_path / "cli").cache_dir == tmp_path / "cli"
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not HubSettings.from_env().offline and HubSettings.from_env(offline=True).offline


def test_download_then_cache_hit_without_any_request(fake_hub, tiny_weights, tmp_path) -> None:
    weights = tiny_weights()
    commit = _publish_to(fake_hub, weights)
    entry = _entry(weights, commit)
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")
    assert settings.endpoint == fake_hub.url  # HF_ENDPOINT, as a mirror would be configured

    got = resolve_entry(entry, settings)
    assert got.source == "download"
    assert got.path == cache_path(entry.hf, settings.cache_dir)  # the hub cache layout
    assert got.path.read_bytes() == weights.read_bytes()
    assert fake_hub.requests == [
        ("hub", "HEAD", f"/{REPO}/resolve/{commit}/rf9.safetensors"),
        ("cdn", "GET", f"/lfs/{entry.sha256}"),
    ]

    fake_hub.requests.clear()
    again = resolve_entry(entry, settings)
    assert (again.path, again.source) == (got.path, "cache")
    assert fake_hub.requests == []
    assert entry_status(entry, settings).status == "ok"


def test_offline_never_touches_the_network(fake_hub, tiny_weights, tmp_path, monkeypatch):
    weights = tiny_weights()
    entry = _entry(weights, _publish_to(fake_hub, weights))
    online = HubSettings.from_env(cache_dir=tmp_path / "cache")
    offline = HubSettings.from_env(cache_dir=tmp_path / "cache", offline=True)

    with pytest.raises(WeightsError) as info:
        resolve_entry(entry, offline)
    message = str(info.value)
    assert "not in the cache" in message and "offline mode is on" in message
    assert "brainbag weights fetch test-rf9-v1" in message
    assert fake_hub.requests == []

    resolve_entry(entry, online)
    fake_hub.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    env_offline = HubSettings.from_env(cache_dir=tmp_path / "cache")
    assert env_offline.offline
    assert resolve_entry(entry, env_offline).source == "cache"
    assert fake_hub.requests == []


@pytest.mark.parametrize("how", ["corrupted in transit", "another file under that name"])
def test_a_served_file_with_the_wrong_hash_is_refused_and_removed(
    fake_hub, tiny_weights, tmp_path, how
) -> None:
    weights = tiny_weights(rf=9)
    if how == "corrupted in transit":
        commit = _publish_to(fake_hub, weights)
        fake_hub.faults[hashlib.sha256(weights.read_bytes()).hexdigest()] = "corrupt"
    else:
        commit = _publish_to(fake_hub, tiny_weights(rf=17))
    entry = _entry(weights, commit)
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")

    with pytest.raises(WeightsError) as info:
        resolve_entry(entry, settings)
    message = str(info.value)
    pointer = cache_path(entry.hf, settings.cache_dir)
    assert str(pointer) in message and f"expected {entry.sha256}" in message
    assert "deleted" in message and "\n" not in message
    assert not pointer.exists()  # the refused file is gone, blob included
    assert _files(settings.cache_dir / f"models--{REPO.replace('/', '--')}" / "blobs") == []
    assert entry_status(entry, settings).status == "missing"


def test_a_damaged_cached_copy_is_replaced_when_online(fake_hub, tiny_weights, tmp_path):
    weights = tiny_weights()
    entry = _entry(weights, _publish_to(fake_hub, weights))
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")
    path = resolve_entry(entry, settings).path
    blob = path.resolve()
    blob.write_bytes(b"\0" * entry.size)  # bit rot in the cache
    status = entry_status(entry, settings)
    assert status.status == "mismatch" and str(path) in status.problems[0]

    with pytest.raises(WeightsError, match="deleted and offline mode is on"):
        resolve_entry(entry, HubSettings.from_env(cache_dir=tmp_path / "cache", offline=True))
    assert not path.exists() and not blob.exists()
    blob.parent.mkdir(parents=True, exist_ok=True)
    got = resolve_entry(entry, settings)
    assert got.source == "download" and entry_status(entry, settings).status == "ok"


def test_a_resumed_download_is_verified_like_any_other(fake_hub, tiny_weights, tmp_path,
                                                       monkeypatch) -> None:
    # huggingface_hub waits 1 s before resuming a broken transfer; skip the wait.
    monkeypatch.setattr(huggingface_hub.file_download, "time",
                        types.SimpleNamespace(sleep=lambda seconds: None))
    weights = tiny_weights()
    entry = _entry(weights, _publish_to(fake_hub, weights))
    fake_hub.faults[entry.sha256] = "truncate_once"
    got = resolve_entry(entry, HubSettings.from_env(cache_dir=tmp_path / "cache"))
    assert got.path.read_bytes() == weights.read_bytes()
    assert fake_hub.count("cdn", "GET") == 2  # the second request resumed with a Range


def test_an_interrupted_download_leaves_nothing_usable(fake_hub, tiny_weights, tmp_path,
                                                       monkeypatch) -> None:
    monkeypatch.setattr(huggingface_hub.file_download, "time",
                        types.SimpleNamespace(sleep=lambda seconds: None))
    weights = tiny_weights()
    entry = _entry(weights, _publish_to(fake_hub, weights))
    fake_hub.faults[entry.sha256] = "truncate"  # the connection always drops mid-file
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")
    with pytest.raises(WeightsError) as info:
        resolve_entry(entry, settings)
    assert "could not download weights test-rf9-v1" in str(info.value)
    assert "\n" not in str(info.value)
    assert _files(settings.cache_dir / f"models--{REPO.replace('/', '--')}" / "blobs") == []
    assert entry_status(entry, settings).status == "missing"
    del fake_hub.faults[entry.sha256]
    assert resolve_entry(entry, settings).source == "download"


def test_a_killed_download_leaves_nothing_usable(fake_hub, tiny_weights, tmp_path) -> None:
    """SIGKILL in the middle of a transfer (power cut, OOM killer): only a temporary file may
    remain, which is never taken for the weights; the next fetch downloads and verifies."""
    weights = tiny_weights()
    commit = _publish_to(fake_hub, weights)
    manifest = write_manifest(tmp_path / "lab.json", entry_for(
        weights, "test-rf9-v1", hf=(REPO, commit, "rf9.safetensors")))
    entry = load_catalog([manifest], {}).get("test-rf9-v1")
    fake_hub.faults[entry.sha256] = "stall"
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "brainbag", "weights", "fetch", "test-rf9-v1", "--manifest",
         str(manifest), "--cache-dir", str(cache)], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert fake_hub.stalled.wait(60), "the download never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
        fake_hub.release.set()
    settings = HubSettings.from_env(cache_dir=cache)
    leftovers = _files(cache / f"models--{REPO.replace('/', '--')}")
    assert all(p.name.endswith(".incomplete") for p in leftovers), leftovers
    assert not cache_path(entry.hf, cache).exists()
    assert entry_status(entry, settings).status == "missing"
    with pytest.raises(WeightsError, match="not in the cache"):
        resolve_entry(entry, HubSettings.from_env(cache_dir=cache, offline=True))
    del fake_hub.faults[entry.sha256]
    got = resolve_entry(entry, settings)
    assert got.source == "download" and got.path.read_bytes() == weights.read_bytes()


def test_download_errors_are_one_line_and_name_the_url(fake_hub, tiny_weights, tmp_path):
    weights = tiny_weights()
    commit = _publish_to(fake_hub, weights)
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")
    for entry, needle in (
        (_entry(weights, "f" * 40), "RevisionNotFound"),
        (_entry(weights, commit, name="other.safetensors"), "EntryNotFound"),
        (parse_entry(entry_for(weights, "x-v1", hf=("nobody/none", commit, "rf9.safetensors")),
                     None), "RepositoryNotFound"),
    ):
        with pytest.raises(WeightsError) as info:
            resolve_entry(entry, settings)
        message = str(info.value)
        assert "\n" not in message and needle in message
        assert f"{fake_hub.url}/" in message and entry.hf.revision in message


def test_an_unreachable_endpoint_fails_clearly(tiny_weights, tmp_path, monkeypatch) -> None:
    # huggingface_hub retries a refused connection with back-off (about 23 s); skip the waits.
    monkeypatch.setattr(huggingface_hub.utils._http, "time",
                        types.SimpleNamespace(sleep=lambda seconds: None))
    weights = tiny_weights()
    entry = _entry(weights, "a" * 40)
    with pytest.raises(WeightsError, match=r"could not download .* http://127\.0\.0\.1:9/"):
        resolve_entry(entry, HubSettings.from_env(cache_dir=tmp_path / "cache"))


def test_bundled_files_are_used_first_and_verified(fake_hub, tiny_weights, tmp_path) -> None:
    weights = tiny_weights()
    folder = tmp_path / "share"
    (folder / "files").mkdir(parents=True)
    (folder / "files" / "rf9.safetensors").write_bytes(weights.read_bytes())
    manifest = write_manifest(folder / "lab.json", entry_for(
        weights, "lab-rf9-v1", bundled="files/rf9.safetensors",
        hf=(REPO, "b" * 40, "rf9.safetensors")))
    entry = load_catalog([manifest], {}).get("lab-rf9-v1")
    settings = HubSettings.from_env(cache_dir=tmp_path / "cache")
    got = resolve_entry(entry, settings)
    assert (got.source, got.path) == ("bundled", folder / "files" / "rf9.safetensors")
    assert fake_hub.requests == []
    (folder / "files" / "rf9.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(WeightsError, match="bundled copy is damaged"):
        resolve_entry(entry, settings)
    assert (folder / "files" / "rf9.safetensors").exists()  # never delete files we did not create


def test_names_escaping_the_cache_are_refused_even_without_the_manifest_check(tmp_path) -> None:
    evil = HfSource(repo_id="a/b", revision="c" * 40, filename="../../../../x.safetensors")
    with pytest.raises(WeightsError, match="escapes"):
        cache_path(evil, tmp_path)
    victim = tmp_path / "outside.safetensors"
    victim.write_bytes(b"keep")
    link = tmp_path / "cache" / "link.safetensors"
    link.parent.mkdir()
    link.symlink_to(victim)
    delete_cached(link, tmp_path / "cache")  # a link out of the cache: remove the link only
    assert victim.read_bytes() == b"keep" and not link.exists()


def test_deleting_a_bad_copy_removes_the_whole_link_chain_inside_the_cache(tmp_path) -> None:
    # huggingface_hub's layout with its shared blob store: snapshot -> repo blob -> shared blob
    cache = tmp_path / "cache"
    shared = cache / "blobs" / "ab" / ("ab" * 32)
    shared.parent.mkdir(parents=True)
    shared.write_bytes(b"bad")
    repo_blob = cache / "models--a--b" / "blobs" / ("cd" * 32)
    repo_blob.parent.mkdir(parents=True)
    repo_blob.symlink_to(os.path.relpath(shared, repo_blob.parent))
    pointer = cache / "models--a--b" / "snapshots" / ("e" * 40) / "w.safetensors"
    pointer.parent.mkdir(parents=True)
    pointer.symlink_to(os.path.relpath(repo_blob, pointer.parent))
    assert pointer.read_bytes() == b"bad"
    delete_cached(pointer, cache)
    assert not any(p.exists() or p.is_symlink() for p in (pointer, repo_blob, shared))
