"""The weights manifest: schema validation, precedence of manifests, writing entries."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from manifests import entry_for, write_manifest

from brainbag.errors import ManifestError
from brainbag.image.io import sha256_file
from brainbag.network.model import HEAD_OUTPUTS, RF_KERNEL3
from brainbag.weights.manifest import (
    FORMAT,
    KNOWN_HEADS,
    KNOWN_RF,
    SHIPPED_MANIFEST,
    add_entry,
    load_catalog,
    parse_entry,
    read_manifest,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_shipped_manifest_is_valid_and_lists_only_bundled_trained_weights() -> None:
    data = json.loads(SHIPPED_MANIFEST.read_text())
    assert data["format"] == FORMAT
    entries = read_manifest(SHIPPED_MANIFEST)
    assert entries, "the shipped manifest lists no weights"
    for entry in entries:
        # every shipped entry is backed by a real bundled file with its hash
        assert entry.trained and entry.bundled_path is not None and entry.bundled_path.is_file()
        assert entry.bundled_path.stat().st_size == entry.size
        assert sha256_file(entry.bundled_path) == entry.sha256
    assert (SHIPPED_MANIFEST.parent / "README.md").exists()


def test_manifest_constants_match_the_model_registry() -> None:
    assert set(KNOWN_RF) == set(RF_KERNEL3)
    assert set(KNOWN_HEADS) == set(HEAD_OUTPUTS)


def test_entry_round_trips_through_json(tmp_path: Path, tiny_weights) -> None:
    raw = entry_for(tiny_weights(rf=17), "lab-rf17-v2", default=True,
                    hf=("lab/brain", COMMIT, "w/rf17.safetensors"), bundled="rf17.safetensors",
                    metrics=[{"name": "age_mae", "value": 5.1, "method": "test split, n=131"}])
    entry = parse_entry(raw, tmp_path / "m.json")
    assert entry.rf == 17 and entry.heads == ("age", "sex") and entry.default
    assert entry.hf is not None and entry.hf.revision == COMMIT
    assert entry.bundled_path == tmp_path / "rf17.safetensors"
    again = parse_entry(json.loads(json.dumps(entry.to_dict())), tmp_path / "m.json")
    assert again == entry


@pytest.mark.parametrize("change, needle", [
    ({"id": "lab-rf9"}, "not a versioned id"),
    ({"id": "../evil-v1"}, "not a versioned id"),
    ({"rf": 13}, "rf 13 is not one of"),
    ({"rf": "9"}, "expected an integer"),
    ({"heads": ["age", "age"]}, "non-empty subset"),
    ({"heads": ["iq"]}, "non-empty subset"),
    ({"sha256": "ABC"}, "64 lower-case hex"),
    ({"size": 0}, "size must be positive"),
    ({"size": True}, "expected a size in bytes"),
    ({"sah256": "x"}, "unknown key(s) ['sah256']"),
    ({"sources": {}}, "sources is empty"),
    ({"sources": {"url": "http://x"}}, "unknown source(s) ['url']"),
    ({"sources": {"bundled": "w.pt"}}, "not a .safetensors file"),
    ({"sources": {"bundled": "../w.safetensors"}}, "escapes its folder"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": "main",
                         "filename": "w.safetensors"}}}, "never to a branch"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": COMMIT[:12],
                         "filename": "w.safetensors"}}}, "40-character"),
    ({"sources": {"hf": {"repo_id": "lab", "revision": COMMIT,
                         "filename": "w.safetensors"}}}, "'org/name'"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": COMMIT,
                         "filename": "../../../etc/w.safetensors"}}}, "escapes its folder"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": COMMIT,
                         "filename": "/abs/w.safetensors"}}}, "escapes its folder"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": COMMIT,
                         "filename": "a\\..\\w.safetensors"}}}, "escapes its folder"),
    ({"sources": {"hf": {"repo_id": "lab/b", "revision": COMMIT,
                         "filename": "pytorch_model.bin"}}}, "not a .safetensors file"),
    ({"metrics": [{"name": "mae", "value": 5.0}]}, "how it was measured"),
    ({"arch_kwargs": {"rf": 33}}, "arch_kwargs.rf is 33"),
])
def test_invalid_entries_give_one_line_errors_naming_file_and_field(
    tmp_path: Path, tiny_weights, change: dict, needle: str
) -> None:
    raw = entry_for(tiny_weights(), "lab-rf9-v1", hf=("lab/b", COMMIT, "w.safetensors"))
    raw.update(change)
    path = write_manifest(tmp_path / "lab.json", raw)
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    message = str(info.value)
    assert needle in message and str(path) in message and "\n" not in message


def test_manifest_level_errors(tmp_path: Path, tiny_weights) -> None:
    raw = entry_for(tiny_weights(), "lab-rf9-v1", hf=("lab/b", COMMIT, "w.safetensors"))
    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{'format': nope")
    with pytest.raises(ManifestError, match=r"not valid JSON \(line 1"):
        read_manifest(bad_json)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"format": "brainbag-manifest/9", "weights": []}))
    with pytest.raises(ManifestError, match="format is 'brainbag-manifest/9'"):
        read_manifest(other)
    with pytest.raises(ManifestError, match="listed twice"):
        read_manifest(write_manifest(tmp_path / "dup.json", raw, raw))
    two = write_manifest(tmp_path / "two.json", {**raw, "default": True},
                         {**raw, "id": "lab-rf9-v2", "default": True})
    with pytest.raises(ManifestError, match="default for RF 9"):
        read_manifest(two)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(tmp_path / "missing.json")


def test_precedence_cli_then_env_then_shipped(tmp_path: Path, tiny_weights) -> None:
    w9 = tiny_weights(rf=9)
    w17 = tiny_weights(rf=17)
    cli = write_manifest(tmp_path / "cli.json",
                         entry_for(w9, "cli-rf9-v1", default=True, bundled=w9.name))
    env_a = write_manifest(tmp_path / "a.json",
                           entry_for(w9, "env-rf9-v1", default=True, bundled=w9.name),
                           entry_for(w17, "env-rf17-v1", default=True, bundled=w17.name))
    env_b = write_manifest(tmp_path / "b.json",
                           entry_for(w17, "env-rf17-v1", bundled="elsewhere.safetensors"))
    environ = {"BRAINBAG_MANIFEST": os.pathsep.join([str(env_a), str(env_b)])}

    catalog = load_catalog([cli], environ)
    assert catalog.manifests == [cli, env_a, env_b, SHIPPED_MANIFEST]
    assert catalog.default_for(9).id == "cli-rf9-v1"
    assert catalog.default_for(17).id == "env-rf17-v1"
    # the same id in two manifests: the higher-precedence entry (and its sources) is used
    assert catalog.get("env-rf17-v1").manifest == env_a
    assert catalog.default_for(33) is None

    assert load_catalog([], environ).default_for(9).id == "env-rf9-v1"
    # with no user manifest, the shipped one: its bundled RF 9 default
    shipped = load_catalog([], {})
    assert list(shipped.entries) == ["bagnet3d-rf9-ixi-open-v1"]
    assert shipped.default_for(9).id == "bagnet3d-rf9-ixi-open-v1"
    assert shipped.default_for(17) is None
    with pytest.raises(ManifestError, match="unknown weights id 'nope-v1'"):
        catalog.get("nope-v1")


def test_one_id_must_name_one_file_across_manifests(tmp_path: Path, tiny_weights) -> None:
    a = write_manifest(tmp_path / "a.json", entry_for(tiny_weights(rf=9), "lab-v1",
                                                        bundled="a.safetensors"))
    b = write_manifest(tmp_path / "b.json", entry_for(tiny_weights(rf=17), "lab-v1",
                                                        bundled="b.safetensors"))
    with pytest.raises(ManifestError, match="'lab-v1' has sha256 .* but .*new version"):
        load_catalog([a, b], {})


def test_add_entry_creates_appends_and_moves_the_default(tmp_path: Path, tiny_weights) -> None:
    path = tmp_path / "sub" / "lab.json"
    w = tiny_weights(rf=9)
    first = parse_entry(entry_for(w, "lab-rf9-v1", default=True, bundled=w.name), None)
    add_entry(path, first)
    assert [e.id for e in read_manifest(path)] == ["lab-rf9-v1"]
    second = parse_entry(entry_for(w, "lab-rf9-v2", default=True, bundled=w.name), None)
    add_entry(path, second)
    entries = {e.id: e for e in read_manifest(path)}
    assert not entries["lab-rf9-v1"].default and entries["lab-rf9-v2"].default
    with pytest.raises(ManifestError, match="already lists 'lab-rf9-v2'"):
        add_entry(path, second)
    assert [p.name for p in path.parent.iterdir()] == ["lab.json"]  # no temporary files left
