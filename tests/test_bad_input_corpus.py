"""The issue-14 corpus: 13 broken inputs, each refused clearly by the command a user would run
(``brainbag predict``, and ``brainbag check`` for the files): exit 1 (2 for usage), one line
naming the file, what was found and the fix, and nothing left in the output folder.

``pytest tests/test_bad_input_corpus.py -s`` prints the 13 messages.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_affine, save
from corpus import build_corpus
from test_batch import predict, read_tsv
from typer.testing import CliRunner

from brainbag.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """name -> the command's arguments after the subcommand (the files are made here)."""
    return build_corpus(tmp_path_factory.mktemp("corpus"))


EXPECTED = {  # what each message must say (besides naming the file)
    "truncated": "truncated or corrupt",
    "empty": "Empty file",
    "random bytes": "is not a NIfTI or MGZ image",
    "text": "is not a NIfTI or MGZ image",
    "2D": "has 2 dimensions (96, 116); brainbag needs a 3D T1 volume",
    "4D": "is 4D with 3 volumes",
    "NaN": "check values: 500 NaN or infinite voxels",
    "all-zero": "check values: every voxel is 0",
    "zero pixdim": "voxel sizes (pixdim) are 0x0x0 mm",
    "header bomb": "27,000,000,000,000 voxels per volume",
    "mask on another grid": "is on another grid than",
    "missing file": "not found",
    "mixed batch": "file is truncated or its header is corrupt",
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_each_bad_input_is_refused_in_one_clear_line(name: str, corpus, tmp_path: Path,
                                                     tiny_weights) -> None:
    args = corpus[name]
    out = tmp_path / "out"
    result = predict(*args, "--weights", tiny_weights(), "--out", out, "--mode", "full",
                     "--no-png")
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code in (1, 2), result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if name == "mixed batch":
        # the batch goes on: the good scan is predicted, the bad one refused in its row
        rows = {Path(r["path"]).name: r for r in read_tsv(out / "predictions.tsv")}
        assert rows["good.nii.gz"]["status"] == "ok"
        assert rows["bad.nii.gz"]["status"] == "failed"
        message = rows["bad.nii.gz"]["error"]
        assert "\n" not in message
        assert f"FAILED {Path(args[0]) / 'bad.nii.gz'}" in result.stderr.replace("\n", " ") or \
            "bad.nii.gz" in result.stderr
    else:
        assert len(errors) == 1, result.stderr
        message = errors[0][len("error: "):]
        named = args[2] if name == "mask on another grid" else args[0]
        assert named in message or Path(named).name in message, message
        assert not out.exists() or not any(out.iterdir()), list(out.rglob("*"))
    assert EXPECTED[name] in message, message
    print(f"{name}: {message}")  # the corpus's messages, with `pytest -s`
    if name not in ("mask on another grid", "missing file", "mixed batch"):
        checked = runner.invoke(app, ["check", *args, "--json"])  # check refuses it too
        assert checked.exit_code == 1, checked.output
        assert [x for x in checked.stderr.splitlines() if x.startswith("error:")], checked.stderr


@pytest.mark.parametrize("zoom", [0.002, 5e3, 1.5e18])
def test_implausible_voxel_sizes_with_force_are_one_line_not_a_memory_error(
        zoom: float, tmp_path: Path, tiny_weights) -> None:
    """Found by a random fuzz run: with --force, a header whose voxels are 0.002 mm (smoothing
    before coarsening pads by thousands of voxels) or 5 m (a giant grid) made conform allocate
    until MemoryError; at 1.5e18 mm the grid's voxel count overflowed int64, looked small and
    reached SimpleITK. The resampling grid is now bounded like the input."""
    data = np.zeros((12, 12, 12), np.float32)
    data[3:9, 3:9, 3:9] = 100.0
    scan = save(data, make_affine(zooms=(zoom,) * 3), tmp_path / "odd.nii.gz")
    out = tmp_path / "out"
    result = predict(scan, "--weights", tiny_weights(), "--out", out, "--mode", "full",
                     "--force", "--no-png")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "voxel sizes are implausible" in errors[0], result.stderr
    assert "odd.nii.gz" in errors[0]
    assert not out.exists() or not any(out.iterdir())


def test_an_affine_with_a_huge_skew_is_refused_not_a_traceback(tmp_path: Path,
                                                               tiny_weights) -> None:
    """Found by the random fuzz run: srow_x[1] = 7.5e14 made nibabel name no code for one axis
    and `check` raised TypeError, `predict` an OrientationError."""
    affine = np.eye(4)
    affine[0, 1] = 750599960264704.0
    data = np.zeros((6, 6, 6), np.uint8)
    data[2:4, 2:4, 2:4] = 100
    scan = save(data, affine, tmp_path / "skewed.nii")
    result = runner.invoke(app, ["check", str(scan), "--json"])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "so skewed" in result.stderr
    out = tmp_path / "out"
    result = predict(scan, "--weights", tiny_weights(), "--out", out, "--force", "--no-png")
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "so skewed" in errors[0], result.output
    assert not out.exists() or not any(out.iterdir())
