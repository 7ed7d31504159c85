"""`brainbag weights ...` and predict's manifest options, end to end against the local test hub."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
from conftest import make_affine, save
from manifests import entry_for, write_manifest
from typer.testing import CliRunner

import brainbag.run.predict
from brainbag.cli import app
from brainbag.image.io import sha256_file
from brainbag.weights.hub import cache_path
from brainbag.weights.manifest import read_manifest

runner = CliRunner()
REPO = "lab/brainbag-weights"


# _brain is a 21 ml block, not a brain: predict's checks refuse it (brain_mask), so the tests
# that predict on it pass --force (FORCE) to reach the weights
FORCE = "--force"


def _brain(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    data = np.zeros((40, 44, 36), np.float32)
    data[6:34, 6:38, 6:30] = rng.uniform(50, 150, (28, 32, 24))
    return save(data, make_affine(), tmp_path / "sub-01_T1w.nii.gz")


def _one_line_error(result, *needles: str) -> str:
    err = result.stderr.strip()
    assert err.count("\n") == 0 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.fixture
def lfs_uploads(monkeypatch):
    """The test hub has no Xet storage, so uploads go over Git LFS, as for a user of such a
    server who sets HF_HUB_DISABLE_XET=1 (huggingface_hub reads it at import, hence both)."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def lab(fake_hub, tiny_weights, tmp_path, monkeypatch):
    """Two weights files on the test hub and a manifest pinning them (RF 9 is the default).
    The shipped manifest is replaced by an empty one, so that the lab's entries are all there
    is to list, fetch and verify."""
    import brainbag.weights.manifest

    empty = tmp_path / "shipped-empty.json"
    empty.write_text('{"format": "brainbag-manifest/1", "weights": []}')
    monkeypatch.setattr(brainbag.weights.manifest, "SHIPPED_MANIFEST", empty)
    w9, w17 = tiny_weights(rf=9), tiny_weights(rf=17)
    c9 = fake_hub.add_file(REPO, "rf9.safetensors", w9.read_bytes())
    c17 = fake_hub.add_file(REPO, "sub/rf17.safetensors", w17.read_bytes())
    manifest = write_manifest(
        tmp_path / "lab.json",
        entry_for(w9, "lab-rf9-v1", default=True, hf=(REPO, c9, "rf9.safetensors")),
        entry_for(w17, "lab-rf17-v1", hf=(REPO, c17, "sub/rf17.safetensors")))
    return {"manifest": manifest, "w9": w9, "w17": w17, "cache": tmp_path / "cache"}


def test_list_with_only_the_shipped_manifest_shows_the_bundled_weights() -> None:
    result = runner.invoke(app, ["weights", "list", "--json"])
    assert result.exit_code == 0
    listed = json.loads(result.stdout)
    assert listed and all(e["status"] == "ok" and e["source"] == "bundled" for e in listed)
    assert any(e["rf"] == 9 and e["default"] for e in listed)
    result = runner.invoke(app, ["weights", "list"])
    assert result.exit_code == 0 and "bagnet3d" in result.stdout and "ok" in result.stdout


def test_predict_passes_the_weights_options_through(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_run(inputs, settings, on_result=None):
        seen["settings"] = settings
        return []

    monkeypatch.setattr(brainbag.run.predict, "run_predict", fake_run)
    result = runner.invoke(app, [
        "predict", str(_brain(tmp_path)), "--weights", "lab-rf9-v1", "--manifest", "a.json",
        "--manifest", "b.json", "--cache-dir", str(tmp_path / "c"), "--offline"])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert (s.weights, s.manifests, s.cache_dir, s.offline) == (
        "lab-rf9-v1", (Path("a.json"), Path("b.json")), tmp_path / "c", True)
    assert s.to_dict()["manifests"] == ["a.json", "b.json"]


def test_predict_without_weights_says_so_and_how_to_supply_them(tmp_path: Path) -> None:
    result = runner.invoke(app, ["predict", str(_brain(tmp_path)), "--rf", "17",
                                 "--out", str(tmp_path / "o"), FORCE])
    assert result.exit_code == 1
    _one_line_error(result, "no trained weights are installed for RF 17", "--weights",
                    "--manifest", "brainbag weights list")


def test_fetch_list_verify_info(fake_hub, lab) -> None:
    common = ["--manifest", str(lab["manifest"]), "--cache-dir", str(lab["cache"])]
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json", *common]).stdout)
    assert [(e["id"], e["rf"], e["heads"], e["status"], e["path"]) for e in listed] == [
        ("lab-rf9-v1", 9, ["age", "sex"], "missing", None),
        ("lab-rf17-v1", 17, ["age", "sex"], "missing", None)]
    assert listed[0]["sha256"] == sha256_file(lab["w9"])
    table = runner.invoke(app, ["weights", "list", *common])
    assert table.exit_code == 0 and "lab-rf17-v1" in table.stdout and "missing" in table.stdout
    assert fake_hub.requests == []  # listing never uses the network

    result = runner.invoke(app, ["weights", "fetch", *common])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok ") == 2
    listed = json.loads(runner.invoke(app, ["weights", "list", "--json", *common]).stdout)
    assert [e["status"] for e in listed] == ["ok", "ok"]
    rf17 = Path(listed[1]["path"])
    assert rf17.read_bytes() == lab["w17"].read_bytes()

    result = runner.invoke(app, ["weights", "verify", *common])
    assert result.exit_code == 0 and result.stdout.count("ok ") == 2
    rf17.resolve().write_bytes(rf17.read_bytes()[::-1])  # same size, wrong bytes
    result = runner.invoke(app, ["weights", "verify", *common])
    assert result.exit_code == 1
    assert str(rf17) in result.stderr and sha256_file(lab["w17"]) in result.stderr
    assert "weights fetch lab-rf17-v1" in result.stderr
    assert json.loads(runner.invoke(app, ["weights", "list", "--json", *common]).stdout)[1][
        "status"] == "mismatch"

    fake_hub.requests.clear()
    result = runner.invoke(app, ["weights", "fetch", "lab-rf17-v1", *common])
    assert result.exit_code == 0, result.output
    assert fake_hub.count("cdn", "GET") == 1  # only the damaged file was downloaded again
    assert runner.invoke(app, ["weights", "verify", *common]).exit_code == 0

    result = runner.invoke(app, ["weights", "info", "lab-rf17-v1", *common])
    assert result.exit_code == 0
    for needle in ("lab-rf17-v1", "UNTRAINED", "sha256", REPO, "preprocessing", "licence"):
        assert needle in result.stdout, needle
    card = json.loads(runner.invoke(app, ["weights", "info", "lab-rf9-v1", "--json",
                                          *common]).stdout)
    assert card["default"] and card["local"]["status"] == "ok"
    result = runner.invoke(app, ["weights", "info", "nope-v1", *common])
    assert result.exit_code == 1
    _one_line_error(result, "unknown weights id 'nope-v1'", "lab-rf9-v1")


def test_fetch_offline_and_unknown_ids_fail_per_entry(fake_hub, lab) -> None:
    common = ["--manifest", str(lab["manifest"]), "--cache-dir", str(lab["cache"])]
    result = runner.invoke(app, ["weights", "fetch", "--offline", *common])
    assert result.exit_code == 1
    assert result.stderr.count("offline mode is on") == 2 and fake_hub.requests == []
    assert runner.invoke(app, ["weights", "verify", *common]).exit_code == 0  # nothing present
    result = runner.invoke(app, ["weights", "fetch", "lab-rf33-v1", *common])
    assert result.exit_code == 1 and "unknown weights id" in result.stderr


def test_predict_by_default_entry_id_offline_and_env_manifest(fake_hub, lab, tmp_path,
                                                                monkeypatch) -> None:
    img = _brain(tmp_path)
    monkeypatch.setenv("BRAINBAG_MANIFEST", str(lab["manifest"]))
    monkeypatch.setenv("BRAINBAG_CACHE_DIR", str(lab["cache"]))
    out = tmp_path / "o"
    # --overwrite: every run writes into the same folder (a filled folder is refused without it)
    base = ["predict", str(img), "--mode", "full", "--out", str(out), FORCE, "--overwrite"]

    result = runner.invoke(app, [*base, "--rf", "9", "--offline"])
    assert result.exit_code == 1 and fake_hub.requests == []
    _one_line_error(result, "lab-rf9-v1", "offline mode is on")

    result = runner.invoke(app, [*base, "--rf", "9"])  # the manifest's default for RF 9
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "sub-01" / "prediction.json").read_text())
    w = saved["weights"]
    assert (w["id"], w["sha256"], w["source"], w["file_meta_id"]) == (
        "lab-rf9-v1", sha256_file(lab["w9"]), "download", "random-rf9-w4")
    assert w["manifest"] == str(lab["manifest"]) and w["hf"]["repo_id"] == REPO
    with open(out / "predictions.tsv", newline="") as fh:
        row = next(csv.DictReader(fh, delimiter="\t"))
    assert (row["weights_id"], row["weights_sha256"]) == ("lab-rf9-v1", sha256_file(lab["w9"]))

    fake_hub.requests.clear()
    result = runner.invoke(app, [*base, "--weights", "lab-rf17-v1", "--offline"])
    assert result.exit_code == 1 and fake_hub.requests == []
    result = runner.invoke(app, ["weights", "fetch", "lab-rf17-v1"])
    assert result.exit_code == 0
    fake_hub.requests.clear()
    result = runner.invoke(app, [*base, "--weights", "lab-rf17-v1", "--offline"])
    assert result.exit_code == 0, result.output
    assert fake_hub.requests == []
    saved = json.loads((out / "sub-01" / "prediction.json").read_text())
    assert (saved["rf"], saved["weights"]["id"], saved["weights"]["source"]) == (
        17, "lab-rf17-v1", "cache")
    assert saved["settings"]["offline"] is True

    result = runner.invoke(app, [*base, "--weights", "lab-rf17-v1", "--rf", "9"])
    assert result.exit_code == 2 and "RF 17 but --rf 9" in result.stderr
    result = runner.invoke(app, [*base, "--weights", "lab-rf99-v1"])
    assert result.exit_code == 1
    _one_line_error(result, "'lab-rf99-v1' is neither a file nor a weights id",
                    "lab-rf9-v1, lab-rf17-v1", str(lab["manifest"]))


def test_a_manifest_entry_contradicting_its_file_is_refused(fake_hub, tiny_weights, tmp_path):
    w = tiny_weights(rf=9)
    commit = fake_hub.add_file(REPO, "rf9.safetensors", w.read_bytes())
    raw = entry_for(w, "liar-rf9-v1", hf=(REPO, commit, "rf9.safetensors"))
    raw["heads"] = ["age"]
    raw["arch_kwargs"] = {**raw["arch_kwargs"], "heads": ["age"]}
    manifest = write_manifest(tmp_path / "m.json", raw)
    result = runner.invoke(app, ["predict", str(_brain(tmp_path)), "--weights", "liar-rf9-v1",
                                 "--manifest", str(manifest), "--cache-dir",
                                 str(tmp_path / "c"), "--out", str(tmp_path / "o"), FORCE])
    assert result.exit_code == 1
    _one_line_error(result, "liar-rf9-v1", "heads ['age']", "fix the manifest entry")


@pytest.mark.parametrize("upload_mode", ["lfs", "regular"])
def test_publish_then_download_round_trip(fake_hub, lfs_uploads, tiny_weights, tmp_path,
                                          upload_mode) -> None:
    fake_hub.upload_mode = upload_mode
    w = tiny_weights(rf=9)
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps([{"name": "age_mae_years", "value": 99.0,
                                    "method": "none: random weights (test)"}]))
    manifest = tmp_path / "lab" / "manifest.json"
    result = runner.invoke(app, [
        "weights", "publish", str(w), "--repo", REPO, "--id", "lab-rf9-v3", "--default",
        "--licence", "CC0-1.0", "--metrics", str(metrics), "--write", str(manifest),
        "--cache-dir", str(tmp_path / "publisher-cache")])
    assert result.exit_code == 0, result.output
    entry = json.loads(result.stdout)
    head = fake_hub.repos[REPO].branches["main"]
    assert entry["sources"]["hf"] == {"repo_id": REPO, "revision": head,
                                      "filename": "lab-rf9-v3.safetensors"}
    assert (entry["sha256"], entry["size"]) == (sha256_file(w), w.stat().st_size)
    assert (entry["rf"], entry["heads"], entry["trained"], entry["default"]) == (
        9, ["age", "sex"], False, True)
    assert entry["licence"] == "CC0-1.0" and entry["metrics"][0]["value"] == 99.0
    assert "UNTRAINED" in result.stderr
    assert [e.to_dict() for e in read_manifest(manifest)] == [entry]
    uploads = fake_hub.count("cdn", "PUT")
    assert uploads == (1 if upload_mode == "lfs" else 0)
    # publish checked its own work by downloading the file back by commit hash
    assert fake_hub.count("cdn" if upload_mode == "lfs" else "hub", "GET") == 1

    # another machine, empty cache: the written manifest is all it needs
    out = tmp_path / "o"
    result = runner.invoke(app, ["predict", str(_brain(tmp_path)), "--rf", "9", "--manifest",
                                 str(manifest), "--cache-dir", str(tmp_path / "user-cache"),
                                 "--mode", "full", "--out", str(out), FORCE])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "sub-01" / "prediction.json").read_text())
    assert (saved["weights"]["id"], saved["weights"]["sha256"]) == ("lab-rf9-v3", entry["sha256"])
    assert saved["weights"]["hf"]["revision"] == head
    pinned = cache_path(read_manifest(manifest)[0].hf, tmp_path / "user-cache")
    assert pinned.read_bytes() == w.read_bytes()


def test_publish_over_xet_to_a_server_without_xet_says_what_to_do(fake_hub, tiny_weights,
                                                                   tmp_path) -> None:
    result = runner.invoke(app, ["weights", "publish", str(tiny_weights()), "--repo", REPO,
                                 "--id", "lab-rf9-v1"])
    assert result.exit_code == 1
    # hf_xet draws its progress bars on stderr before failing; the error is one line after them
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: could not upload")
    assert "xet-write-token" in error and "HF_HUB_DISABLE_XET=1" in error
    assert fake_hub.count("hub", "POST") == 2  # create repo, preupload; no commit was made
    assert not fake_hub.repos[REPO].branches


def test_publish_refusals(fake_hub, lfs_uploads, tiny_weights, tmp_path, monkeypatch) -> None:
    w = tiny_weights()
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(app, ["weights", "publish", str(pt), "--repo", REPO])
    assert result.exit_code == 1 and ".safetensors" in result.stderr
    result = runner.invoke(app, ["weights", "publish", str(w), "--repo", REPO, "--id", "lab"])
    assert result.exit_code == 1 and "not a versioned id" in result.stderr
    result = runner.invoke(app, ["weights", "publish", str(w), "--repo", REPO, "--id",
                                 "lab-rf9-v1", "--filename", "../x.safetensors"])
    assert result.exit_code == 1 and "escapes its folder" in result.stderr
    assert fake_hub.requests == []  # all of the above were refused before any upload
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(app, ["weights", "publish", str(w), "--repo", REPO])
    assert result.exit_code == 2 and "offline" in result.stderr
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_TOKEN", "hf_wrong")
    result = runner.invoke(app, ["weights", "publish", str(w), "--repo", REPO, "--id",
                                 "lab-rf9-v1"])
    assert result.exit_code == 1
    _one_line_error(result, "could not upload", "401", "HF_TOKEN")


def test_weights_commands_import_neither_torch_nor_huggingface_hub_to_list() -> None:
    code = (
        "import sys\n"
        "from brainbag.cli import app\n"
        "from typer.testing import CliRunner\n"
        "r = CliRunner().invoke(app, ['weights', 'list', '--json'])\n"
        "assert r.exit_code == 0, r.output\n"
        "print('torch' in sys.modules, 'huggingface_hub' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]


def test_weights_info_of_a_file_prints_its_metadata_and_model_card(tmp_path: Path,
                                                                   tiny_weights) -> None:
    """Issue 16: `weights info FILE` answered "unknown weights id"."""
    from brainbag.weights.file import read_meta

    shipped = Path(__file__).resolve().parents[1] / "weights_manifest" / \
        "bagnet3d-rf9-ixi-open-v1.safetensors"
    result = runner.invoke(app, ["weights", "info", str(shipped)])
    assert result.exit_code == 0, result.output
    for needle in ("bagnet3d-rf9-ixi-open-v1", "arch_kwargs", "sha256", "training",
                   "Model card: bagnet3d-rf9-ixi-open-v1", "bagnet3d-rf9-ixi-open-v1.md"):
        assert needle in result.stdout, needle
    assert sha256_file(shipped) in result.stdout

    path = tiny_weights()  # no card beside it: the card is written from its metadata
    card = json.loads(runner.invoke(app, ["weights", "info", str(path), "--json"]).stdout)
    assert card["meta"]["id"] == read_meta(path).id
    assert card["sha256"] == sha256_file(path) and card["model_card_path"] is None
    assert card["model_card"].startswith(f"# Model card: {card['meta']['id']}")
    result = runner.invoke(app, ["weights", "info", str(tmp_path / "gone.safetensors")])
    assert result.exit_code == 1
    _one_line_error(result, "weights file not found", "gone.safetensors")
