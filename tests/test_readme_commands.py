"""The README's two commands (install + demo, install + tests) pass in either order, any number
of times, in one clone, and CI runs them that way (issue 23, item 1)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from typer.testing import CliRunner

from brainbag.cli import app

runner = CliRunner()


def _readme_command(marker: str) -> str:
    """The text in the code fence after ``<!-- marker -->`` in README.md (a command, or
    the demo's output)."""
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    start = lines.index(f"<!-- {marker} -->")
    assert lines[start + 1].startswith("```")
    end = lines.index("```", start + 2)
    return "\n".join(lines[start + 2:end])


def test_ci_runs_the_demo_and_the_tests_twice_each_in_turn() -> None:
    result = subprocess.run(["bash", str(REPO / ".ci" / "run"), "--print"], capture_output=True,
                            text=True, check=True)
    demo, tests = _readme_command("demo-command"), _readme_command("test-command")
    assert result.stdout.splitlines() == [demo, tests, demo, tests]
    assert "pip install" in demo and "pytest" in tests


def test_the_demo_output_folder_is_ignored_by_git() -> None:
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    result = subprocess.run(["git", "check-ignore", "-q", "brainbag-results/ch2bet/age_map.nii.gz"],
                            cwd=REPO)
    assert result.returncode == 0, "brainbag-results/ is not in .gitignore"


def test_the_demo_command_can_run_again_and_prints_the_same() -> None:
    """The demo's `brainbag predict` twice in one folder (the tests run in their own empty
    folder): both exit 0 and print the same; the second says on stderr that it reused the
    first's results. Before, the second was refused (exit 2) and `--resume` crashed."""
    words = shlex.split(_readme_command("demo-command").split("&&")[-1])
    assert words[0] == ".venv/bin/brainbag" and words[1] == "predict"
    args = [str(REPO / w) if (REPO / w).is_file() else w for w in words[1:]]
    first = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert first.exit_code == 0, first.output
    assert "predicted age" in first.stdout and first.stderr == ""
    shown = [line.rstrip() for line in first.stdout.splitlines()]
    assert shown == _readme_command("demo-output").splitlines()  # the README shows it as it is
    second = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert second.exit_code == 0, second.output
    assert second.stdout == first.stdout
    assert second.stderr.strip().splitlines() == [
        "brainbag: ch2bet was done before with the same input, weights and settings (--resume): "
        "its results in brainbag-results are shown, not computed again"]


def test_the_tests_do_not_depend_on_the_folder_they_are_started_from(tmp_path: Path) -> None:
    """A predict test without --out, started from a folder that holds the demo's results
    (as a clone does after the demo command), still passes."""
    (tmp_path / "brainbag-results" / "ch2bet").mkdir(parents=True)
    (tmp_path / "brainbag-results" / "predictions.tsv").write_text("subject\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(REPO),
         str(REPO / "tests" / "test_cli.py") + "::test_pickled_weights_are_refused"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:]
    assert "1 passed" in result.stdout
