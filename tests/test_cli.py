from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, save
from typer.testing import CliRunner

import brainbag.run.predict
import brainbag.run.scan
from brainbag.cli import app

runner = CliRunner()


# _brain is a 21 ml block, not a brain: predict's checks refuse it (brain_mask), so the pipeline
# tests below pass --force (FORCE); tests/test_predict_checks.py covers the checks themselves
FORCE = "--force"


def _brain(tmp_path: Path, name: str = "sub-01_T1w.nii.gz", affine=None) -> Path:
    rng = np.random.default_rng(0)
    data = np.zeros((40, 44, 36), np.float32)
    data[6:34, 6:38, 6:30] = rng.uniform(50, 150, (28, 32, 24))
    return save(data, make_affine() if affine is None else affine, tmp_path / name)


def _one_line_error(result, *needles: str) -> str:
    err = result.stderr.strip()
    assert err.count("\n") == 0, f"expected one line, got: {err!r}"
    assert err.startswith("error:")
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def test_version_and_help() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.startswith("brainbag ")
    result = runner.invoke(app, ["predict", "--help"])
    assert result.exit_code == 0
    for option in ("--rf", "--weights", "--mask", "--mode", "--window", "--overlap",
                   "--batch-size", "--device", "--precision", "--no-resample", "--map-space",
                   "--out", "--mask-pattern", "--resume", "--overwrite", "--jobs", "--png",
                   "--threads"):
        assert option in result.stdout


def _help(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [(), ("predict",), ("calibrate",), ("check",), ("train",),
                                     ("crossval",), ("evaluate",), ("weights", "info"),
                                     ("weights", "list"), ("weights", "fetch"),
                                     ("weights", "publish")])
def test_help_shows_defaults_and_no_value_type_for_flags(command: tuple[str, ...]) -> None:
    """Issue 16: rich markup ate every "[default: ...]" written in a help text (leaving " ."),
    and on/off flags showed a `<bool>` value they do not take."""
    text = _help(*command)
    assert "<bool>" not in text
    assert not re.search(r"\w \.(\s|$)", text), re.findall(r".{30}\w \.", text)


COMMANDS = [("predict",), ("merge",), ("check",), ("train",), ("crossval",), ("evaluate",),
            ("weights",), ("weights", "info"), ("weights", "list"), ("weights", "publish")]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("columns", [80, 120])
def test_help_paragraphs_wrap_without_ragged_lines(command: tuple[str, ...],
                                                   columns: int) -> None:
    """Issue 23: `check --help` and `merge --help` kept the docstring's line breaks, so at 80
    columns every source line became a full line and a short one ("(the default", "fails")."""
    result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": str(columns)})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    usage = next(i for i, line in enumerate(lines) if "Usage:" in line)
    box = next(i for i, line in enumerate(lines) if line.startswith("╭"))
    paragraphs: list[list[str]] = [[]]
    for line in lines[usage + 1:box]:
        if line.strip():
            paragraphs[-1].append(line.strip())
        elif paragraphs[-1]:
            paragraphs.append([])
    for paragraph in paragraphs:
        for line, following in zip(paragraph, paragraph[1:], strict=False):
            # a line is only broken early when the next word would not have fitted on it
            assert len(line) + 1 + len(following.split()[0]) > columns - 4, (line, following)


def test_train_help_shows_the_configuration_defaults() -> None:
    from brainbag.train.config import default_config

    text = _help("train")
    c = default_config()  # the defaults with the default recipe (the shipped weights')
    for option, value in (("--epochs", c.epochs), ("--rf", c.rf), ("--lr", c.lr),
                          ("--seed", c.seed), ("--workers", c.workers),
                          ("--crop", " ".join(map(str, c.crop)))):
        line = next(line for line in text.splitlines() if f" {option} " in line)
        assert f"[default: {value}]" in line, (option, line)
    assert "[default: 9, or the RF of --weights]" in _help("predict")


def test_missing_file_exit_1_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.nii.gz"
    result = runner.invoke(app, ["predict", str(missing), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    _one_line_error(result, "not found", str(missing))
    assert not (tmp_path / "o").exists()


def test_non_image_file_exit_1_one_line(tmp_path: Path) -> None:
    notes = tmp_path / "notes.json"  # .txt would be read as a list of scans
    notes.write_text("hello\n")
    result = runner.invoke(app, ["predict", str(notes), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    _one_line_error(result, str(notes), "NIfTI or MGZ")


def test_mask_on_another_grid_exit_1_one_line(tmp_path: Path, tiny_weights) -> None:
    img = _brain(tmp_path)
    mask = save(np.ones((40, 44, 36)), make_affine(zooms=(1.0, 1.0, 1.5)), tmp_path / "m.nii.gz")
    result = runner.invoke(app, ["predict", str(img), "--mask", str(mask), "--weights",
                                 str(tiny_weights()), "--out", str(tmp_path / "o")])
    assert result.exit_code == 1
    _one_line_error(result, str(mask), "another grid")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    img = _brain(tmp_path)
    for args in (["--rf", "13"], ["--overlap", "1.5"], ["--mode", "tiles"],
                 ["--window", "30", "32", "32"], ["--threads", "-1"], ["--no-such-option"]):
        result = runner.invoke(app, ["predict", str(img), *args, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2, (args, result.output)


def test_without_weights_it_says_none_are_installed(tmp_path: Path) -> None:
    img = _brain(tmp_path)
    # RF 9 has shipped default weights; RF 17 has none
    result = runner.invoke(app, ["predict", str(img), "--rf", "17", "--out", str(tmp_path / "o"),
                                 FORCE])
    assert result.exit_code == 1
    _one_line_error(result, "no trained weights are installed for RF 17", "--weights")
    assert not (tmp_path / "o" / "sub-01").exists()


def test_pickled_weights_are_refused(tmp_path: Path) -> None:
    img = _brain(tmp_path)
    pt = tmp_path / "model.pt"
    pt.write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(app, ["predict", str(img), "--weights", str(pt), FORCE])
    assert result.exit_code == 1
    _one_line_error(result, str(pt), "never loads pickled weights")


def test_weights_that_are_a_checkpoint_an_image_or_text_say_what_they_are(
        tmp_path: Path) -> None:
    """Issue 16: a run's last.ckpt, a NIfTI and a text file all got 'convert them with
    brainbag.weights.file.save_weights'. Say what the file is; name the run's weights file."""
    img = _brain(tmp_path)
    run = tmp_path / "run"
    run.mkdir()
    ckpt = run / "last.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    result = runner.invoke(app, ["predict", str(img), "--weights", str(ckpt), FORCE])
    assert result.exit_code == 1
    _one_line_error(result, "training checkpoint", "weights.safetensors",
                    f"--out {run} --resume")
    (run / "weights.safetensors").write_bytes(b"x")
    result = runner.invoke(app, ["predict", str(img), "--weights", str(ckpt), FORCE])
    _one_line_error(result, "training checkpoint", f"--weights {run / 'weights.safetensors'}")
    for path, what in ((img, "is an image"), (tmp_path / "notes.txt", "is a .txt file")):
        path.touch()
        result = runner.invoke(app, ["predict", str(img), "--weights", str(path), FORCE])
        assert result.exit_code == 1
        _one_line_error(result, what, "weights list")
        assert "save_weights" not in result.stderr


def test_cli_builds_the_settings_it_was_asked_for(tmp_path: Path, monkeypatch) -> None:
    seen = {}

    def fake_run(inputs, settings, observer=None):
        seen["inputs"], seen["settings"] = inputs, settings
        return []

    monkeypatch.setattr(brainbag.run.predict, "run_predict", fake_run)
    img = _brain(tmp_path)
    result = runner.invoke(app, [
        "predict", str(img), "--rf", "33", "--weights", "w.safetensors", "--mode", "full",
        "--window", "64", "64", "48", "--overlap", "0.5", "--batch-size", "3", "--device", "cpu",
        "--precision", "bf16", "--no-resample", "--map-space", "input", "--out", str(tmp_path),
        "--mask-pattern", "{stem}_brain.nii.gz", "--jobs", "3", "--no-png", "--resume",
        "--threads", "1",
    ])
    assert result.exit_code == 0, result.output
    s = seen["settings"]
    assert seen["inputs"] == [img]
    assert (s.rf, s.weights, s.out, s.resample, s.map_space) == (
        33, "w.safetensors", tmp_path, False, "input")
    assert (s.mask_pattern, s.jobs, s.png, s.resume, s.overwrite) == (
        "{stem}_brain.nii.gz", 3, False, True, False)
    inf = s.inference
    assert (inf.mode, inf.window, inf.overlap, inf.batch_size, inf.device, inf.precision,
            inf.threads) == ("full", (64, 64, 48), 0.5, 3, "cpu", "bf16", 1)


def test_predict_writes_outputs_and_a_table(tmp_path: Path, tiny_weights) -> None:
    img = _brain(tmp_path, affine=make_affine(flips=(-1, 1, 1)))
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(img), "--weights", str(tiny_weights()),
                                 "--out", str(out), "--window", "32", "32", "24", FORCE])
    assert result.exit_code == 0, result.output
    assert "UNTRAINED" in result.stderr
    assert "sub-01" in result.stdout and "P(female)" in result.stdout
    subject = out / "sub-01"
    assert sorted(p.name for p in subject.iterdir()) == [
        "age_map.nii.gz", "prediction.json", "sex_map.nii.gz"]
    saved = json.loads((subject / "prediction.json").read_text())
    assert 0.0 <= saved["p_female"] <= 1.0
    sex = np.asarray(nib.load(subject / "sex_map.nii.gz").dataobj)
    finite = sex[np.isfinite(sex)]
    assert finite.size and finite.min() >= 0 and finite.max() <= 1
    rows = (out / "predictions.tsv").read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("subject\tsession\tpath")
    assert rows[1].split("\t")[4] == "ok"
    # no staging folders or temporary files left behind
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []
    # a second run into the same folder is refused unless it resumes or overwrites
    result = runner.invoke(app, ["predict", str(img), "--weights", str(tiny_weights()),
                                 "--out", str(out), "--mode", "full", FORCE])
    assert result.exit_code == 2
    _one_line_error(result, str(out), "--resume", "--overwrite")
    # overwriting replaces the row instead of adding one
    result = runner.invoke(app, ["predict", str(img), "--weights", str(tiny_weights()),
                                 "--out", str(out), "--mode", "full", FORCE, "--overwrite"])
    assert result.exit_code == 0
    assert len((out / "predictions.tsv").read_text().splitlines()) == 2


def test_a_crash_while_writing_leaves_nothing_half_written(tmp_path, tiny_weights, monkeypatch):
    img = _brain(tmp_path)
    out = tmp_path / "results"
    calls = {"n": 0}
    real = brainbag.run.scan.save_nifti_atomic

    def flaky(image, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real(image, path)

    monkeypatch.setattr(brainbag.run.scan, "save_nifti_atomic", flaky)
    result = runner.invoke(app, ["predict", str(img), "--weights", str(tiny_weights()),
                                 "--out", str(out), "--mode", "full", FORCE])
    assert result.exit_code != 0
    assert calls["n"] == 2  # it got as far as writing
    assert not (out / "sub-01").exists()
    assert list(out.iterdir()) == [] if out.exists() else True


def test_several_inputs_one_bad_file_does_not_stop_the_others(tmp_path, tiny_weights) -> None:
    good = _brain(tmp_path)
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(b"not gzip at all")
    out = tmp_path / "results"
    result = runner.invoke(app, ["predict", str(bad), str(good), "--weights",
                                 str(tiny_weights()), "--out", str(out), "--mode", "full", FORCE])
    assert result.exit_code == 1
    assert (out / "sub-01" / "prediction.json").exists()
    rows = [r.split("\t") for r in (out / "predictions.tsv").read_text().splitlines()[1:]]
    assert {r[0]: r[4] for r in rows} == {"broken": "failed", "sub-01": "ok"}


def test_python_dash_m_entry_point() -> None:
    done = subprocess.run([sys.executable, "-m", "brainbag", "--version"],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0 and done.stdout.startswith("brainbag ")


def test_help_does_not_import_torch() -> None:
    code = ("import sys; from brainbag.cli import app; "
            "print('torch' in sys.modules, 'SimpleITK' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("debug", [False, True])
def test_debug_shows_the_traceback(tmp_path: Path, debug: bool) -> None:
    args = (["--debug"] if debug else []) + ["predict", str(tmp_path / "none.nii")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert ("Traceback" in result.stderr) is debug


def test_predict_asks_for_huge_pages_before_torch_is_imported() -> None:
    code = ("import os, sys; from typer.testing import CliRunner; from brainbag.cli import app; "
            "assert 'torch' not in sys.modules; "
            "CliRunner().invoke(app, ['predict', 'missing.nii.gz', '--weights', 'w.safetensors']); "
            "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert out.stdout.split() == ["1", "True"]
