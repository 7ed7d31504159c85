"""Ids and statuses are never cut, at 80 columns and in piped output (a non-terminal console):
the batch table, `check` and `weights list` (issue 23, item 7); `check` on a batch is compact
(item 9)."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from conftest import save
from phantom import head, world_bias
from rich.console import Console
from test_batch import FAST, brain, predict
from typer.testing import CliRunner

from brainbag.cli import app
from brainbag.cli.predict import _print_table

runner = CliRunner()
IDS = ["IXI012-HH-1211", "IXI013-HH-1212", "site2/IXI014-HH-1236"]


def _records(people: bool) -> list[dict]:
    records = []
    for i, subject in enumerate(IDS):
        r = {"subject": subject, "status": "ok", "age": 44.03 + i, "age_interval_low": 24.0,
             "age_interval_high": 64.0, "p_female": 0.67, "sex_call": "F", "rf": 9,
             "seconds": 3.2, "warnings": ["bias_field: x"] if i == 1 else [],
             "resumed": i == 2}
        if people:
            r.update(chronological_age=50.0, brain_age_gap=-6.0, brain_age_gap_corrected=3.0,
                     recorded_sex="M", sex_note="recorded M, model calls F (P(female) 0.67)")
        records.append(r)
    records.append({"subject": "IXI015-HH-1258", "session": "ses-baseline", "status": "failed",
                    "rf": 9, "error": "x"})
    return records


def _plain(text: str) -> str:
    return re.sub(r"\s+", " ", text)


@pytest.mark.parametrize("width", [60, 80, 120, 200])
@pytest.mark.parametrize("people", [False, True])
def test_the_batch_table_never_cuts_ids_or_statuses(width: int, people: bool) -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width)  # not a terminal, as in a pipe or a log
    assert not console.is_terminal
    _print_table(console, _records(people), Path("out"))
    text = buffer.getvalue()
    assert "…" not in text
    lines = text.splitlines()
    assert all(len(line) <= width for line in lines if "│" in line or "┃" in line)
    for subject in [*IDS, "IXI015-HH-1258"]:
        assert any(subject in line for line in lines), (subject, text)  # whole, on one line
    for status in ("ok (earlier run)", "ok (warnings)", "failed"):
        assert any(status in line for line in lines), (status, text)
    if people:
        assert "model calls F" in text


def test_a_piped_batch_at_80_columns_shows_whole_ids(tmp_path: Path, tiny_weights) -> None:
    scans = [brain(tmp_path / "in" / f"{name}_T1w.nii.gz", seed=i)
             for i, name in enumerate(IDS[:2])]
    result = predict(*scans, "--weights", tiny_weights(), "--out", tmp_path / "out", *FAST,
                     "--no-png", env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for subject in IDS[:2]:
        line = next(x for x in result.stdout.splitlines() if subject in x)
        assert "ok" in line


@pytest.mark.parametrize("width", ["60", "80", "120"])
def test_weights_list_never_cuts_ids_or_statuses(width: str) -> None:
    result = runner.invoke(app, ["weights", "list"], env={"COLUMNS": width})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    line = next(x for x in result.stdout.splitlines() if "bagnet3d-rf9-ixi-open-v1" in x)
    assert re.search(r"\bok\b", line), result.stdout


@pytest.fixture(scope="module")
def heads(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("heads")
    data, affine, _ = head(bias=world_bias(0.15))  # a field like the shipped weights' images
    save(data, affine, folder / "IXI012-HH-1211_T1w.nii.gz")
    data, affine, _ = head(skull=True)  # skull on, no mask: fails
    save(data, affine, folder / "IXI013-HH-1212_T1w.nii.gz")
    return folder


def test_check_of_a_batch_is_one_line_per_scan_and_its_problems(heads: Path) -> None:
    # --strip never: the head fails its skull check (auto would strip it in predict)
    result = runner.invoke(app, ["check", str(heads), "--strip", "never"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 1, result.output
    lines = result.stdout.splitlines()
    assert lines[0] == f"{heads}/IXI012-HH-1211_T1w.nii.gz: fits the model (13 passed)"
    assert lines[1] == (f"{heads}/IXI013-HH-1212_T1w.nii.gz: does not fit the model (2 failed, "
                        "8 passed, 3 skipped)")
    assert lines[2].startswith("  fail skull_stripped: skull on")
    assert lines[3].startswith("  fail brain_mask: ")
    assert lines[-1].endswith("--verbose shows every check")
    assert len(lines) < 12  # 13 checks of two scans were 71 lines at 80 columns
    verbose = runner.invoke(app, ["check", str(heads), "--strip", "never", "--verbose"],
                            env={"COLUMNS": "80"})
    for name in ("file", "size", "dimensions", "header", "orientation", "bias_field"):
        assert re.search(rf"│ {name}\s", verbose.stdout), name  # every row, names not cut


def test_check_of_one_scan_is_its_full_table_with_whole_names(heads: Path) -> None:
    result = runner.invoke(app, ["check", str(heads / "IXI012-HH-1211_T1w.nii.gz")],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout
    for name in ("skull_stripped", "field_of_view", "bias_field", "voxel_size"):
        assert re.search(rf"│ {name}\s+│ (pass|warn|skip)\s", result.stdout), name
