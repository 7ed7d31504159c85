"""Sharded batch prediction: the shard rule, --shard auto, merge's checks, and real shard runs in
parallel processes against one process."""

from __future__ import annotations

import csv
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from brainbag.errors import UsageError
from brainbag.run.discover import OutputLocation, ScanInput
from brainbag.run.shards import (
    MergeError,
    Shard,
    ShardState,
    assign,
    input_key,
    input_set_sha256,
    merge,
    parse_shard,
)


def _items(names: list[str]) -> list[ScanInput]:
    return [ScanInput(Path(f"/data/{n}.nii.gz"), n, OutputLocation(Path(n))) for n in names]


# --- the rule ---------------------------------------------------------------------------------


def test_every_input_in_exactly_one_shard_balanced_and_order_free() -> None:
    names = [f"s{i:03d}" for i in range(23)]
    items = _items(names)
    shards = [assign(items, Shard(k, 4)) for k in range(1, 5)]
    keys = [input_key(i) for shard in shards for i in shard]
    assert sorted(keys) == sorted(input_key(i) for i in items)  # each exactly once
    assert sorted(len(s) for s in shards) == [5, 6, 6, 6]  # sizes differ by at most one
    shuffled = items[:]
    random.Random(1).shuffle(shuffled)
    for k in range(1, 5):  # the order inputs are listed in does not matter
        assert {input_key(i) for i in assign(shuffled, Shard(k, 4))} == {
            input_key(i) for i in shards[k - 1]}
    # the rule as documented: position K-1, K-1+N, ... of the inputs sorted by key
    assert [input_key(i) for i in shards[1]] == sorted(input_key(i) for i in items)[1::4]
    assert input_set_sha256(shuffled) == input_set_sha256(items)
    assert input_set_sha256(items[1:]) != input_set_sha256(items)


@pytest.mark.parametrize(("text", "env", "expected"), [
    ("2/3", {}, (2, 3, None)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "4",
              "SLURM_ARRAY_TASK_MIN": "0"}, (1, 4, None)),
    ("auto", {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4",
              "SLURM_ARRAY_TASK_MIN": "5"}, (3, 4, None)),  # --array=5-8
    ("auto", {"SLURM_ARRAY_TASK_ID": "14", "SLURM_ARRAY_TASK_COUNT": "5",
              "SLURM_ARRAY_TASK_MIN": "10", "SLURM_ARRAY_TASK_STEP": "2"}, (3, 5, None)),
    ("auto", {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}, (4, 4, 1)),
    # Slurm wins over torchrun variables a Slurm job may also export
    ("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "2", "RANK": "0",
              "WORLD_SIZE": "8"}, (2, 2, None)),
])
def test_shard_from_text_slurm_and_torchrun(text, env, expected) -> None:
    shard = parse_shard(text, env)
    assert (shard.index, shard.count, shard.local_rank) == expected


@pytest.mark.parametrize(("text", "env", "message"), [
    ("0/3", {}, "does not exist"),
    ("4/3", {}, "does not exist"),
    ("2-3", {}, "expected K/N"),
    ("auto", {}, "found neither a Slurm job array"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3"}, "SLURM_ARRAY_TASK_COUNT is not"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
              "SLURM_ARRAY_TASK_MIN": "0"}, "does not exist"),
    ("auto", {"SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "3",
              "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_STEP": "2"}, "not on the array"),
    ("auto", {"RANK": "x", "WORLD_SIZE": "2"}, "not a whole number"),
])
def test_bad_shards_are_usage_errors(text, env, message) -> None:
    with pytest.raises(UsageError, match=message):
        parse_shard(text, env)


# --- merge's checks on synthetic shard sets -----------------------------------------------------


def _fake_shards(out: Path, n_inputs: int, count: int, weights: str = "w" * 64,
                 fingerprint: str = "f", drop_rows: int = 0) -> list[ScanInput]:
    from brainbag.run.outputs import TSV_COLUMNS, write_tsv_atomic

    items = _items([f"sub{i:05d}" for i in range(n_inputs)])
    for k in range(1, count + 1):
        shard = Shard(k, count)
        mine = assign(items, shard)
        state = ShardState(k, count, input_set_sha256(items), len(items),
                           {input_key(i): str(i.path) for i in mine}, weights, "wid",
                           fingerprint, state="complete")
        state.save(out)
        rows = [{c: "" for c in TSV_COLUMNS} | {
            "subject": i.subject, "path": str(i.path), "status": "ok", "age": "50.0",
            "p_female": "0.5", "weights_sha256": weights, "output":
            i.location.relative("prediction").as_posix()} for i in mine]
        write_tsv_atomic(shard.table(out), rows[drop_rows if k == 1 else 0:])
    return items


def test_merge_of_a_complete_set_lists_every_input_once(tmp_path: Path) -> None:
    items = _fake_shards(tmp_path, 50, 3)
    result = merge(tmp_path)
    assert result.complete and not result.failed
    with open(tmp_path / "predictions.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    assert sorted(r["path"] for r in rows) == sorted(str(i.path) for i in items)


def test_merge_lists_missing_inputs_and_shards(tmp_path: Path) -> None:
    _fake_shards(tmp_path, 20, 3, drop_rows=2)
    result = merge(tmp_path)
    assert not result.complete and len(result.missing) == 2
    (tmp_path / "shards" / "3-of-3.json").unlink()
    result = merge(tmp_path)
    assert any("shards never started: 3-of-3" in m for m in result.missing)


def test_merge_refuses_shards_with_other_weights_inputs_or_settings(tmp_path: Path) -> None:
    _fake_shards(tmp_path, 12, 2)
    state = ShardState.load(tmp_path / "shards" / "2-of-2.json")
    state.weights_sha256, state.weights_id = "x" * 64, "other"
    state.save(tmp_path)
    with pytest.raises(MergeError, match="shard 2-of-2 used weights other"):
        merge(tmp_path)
    _fake_shards(tmp_path, 12, 2)
    state = ShardState.load(tmp_path / "shards" / "2-of-2.json")
    state.settings_fingerprint = "g"
    state.save(tmp_path)
    with pytest.raises(MergeError, match="other result-affecting settings"):
        merge(tmp_path)
    _fake_shards(tmp_path, 12, 2)
    state = ShardState.load(tmp_path / "shards" / "2-of-2.json")
    state.input_set_sha256, state.inputs = "0" * 64, 13
    state.save(tmp_path)
    with pytest.raises(MergeError, match="different set of inputs"):
        merge(tmp_path)
    _fake_shards(tmp_path, 12, 3)  # a second set of shard files beside the 2-shard one
    with pytest.raises(MergeError, match="shards of 2 and 3 shard runs"):
        merge(tmp_path)


# --- real shard runs ------------------------------------------------------------------------------


def _folder(tmp_path: Path, n: int = 7) -> Path:
    from test_batch import brain

    data = tmp_path / "scans"
    for i in range(n):
        brain(data / f"s{i:02d}.nii.gz", seed=i)
    return data


def _cmd(data: Path, weights: Path, out: Path, *extra: str) -> list[str]:
    from test_batch import FAST

    return [sys.executable, "-m", "brainbag", "predict", str(data), "--weights", str(weights),
            "--out", str(out), *FAST, "--threads", "1", *extra]


def _env(**extra: str) -> dict[str, str]:
    from conftest import REPO

    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _table(path: Path) -> dict[str, dict[str, str]]:
    from test_batch import read_tsv

    return {r["path"]: r for r in read_tsv(path)}


def test_three_parallel_shards_merge_to_the_table_of_one_process(tmp_path: Path,
                                                                 tiny_weights) -> None:
    data, weights = _folder(tmp_path), tiny_weights()
    out = tmp_path / "sharded"
    procs = [subprocess.Popen(_cmd(data, weights, out, "--shard", f"{k}/3"), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k in (1, 2, 3)]
    outputs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], outputs
    assert any("all 3 shards finished: merged" in " ".join(e.split()) for _, e in outputs)
    single = tmp_path / "single"
    done = subprocess.run(_cmd(data, weights, single), env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    merged, one = _table(out / "predictions.tsv"), _table(single / "predictions.tsv")
    assert sorted(merged) == sorted(one) and len(one) == 7
    for path, row in one.items():
        assert merged[path]["status"] == "ok"
        assert float(merged[path]["age"]) == pytest.approx(float(row["age"]), abs=1e-3)
        assert float(merged[path]["p_female"]) == pytest.approx(float(row["p_female"]),
                                                                abs=1e-4)
        assert merged[path]["output"] == row["output"]
        assert (out / merged[path]["output"]).exists()
    # each shard kept its own table of 2 or 3 rows, together every input once
    sizes = sorted(len(_table(out / "shards" / f"predictions.{k}-of-3.tsv")) for k in (1, 2, 3))
    assert sizes == [2, 2, 3]
    assert (out / "index.html").exists()


def test_a_killed_shard_resumed_completes_the_merge(tmp_path: Path, tiny_weights) -> None:
    from test_batch import _wait_for_rows

    data, weights = _folder(tmp_path, n=8), tiny_weights()
    out = tmp_path / "out"
    first = subprocess.run(_cmd(data, weights, out, "--shard", "2/2"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    proc = subprocess.Popen(_cmd(data, weights, out, "--shard", "1/2", "--jobs", "1"),
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        _wait_for_rows(out / "shards" / "predictions.1-of-2.tsv", 1, proc)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    state = ShardState.load(out / "shards" / "1-of-2.json")
    assert state.state == "running"  # killed: never marked complete
    from typer.testing import CliRunner

    from brainbag.cli import app

    merged = CliRunner().invoke(app, ["merge", str(out)])
    assert merged.exit_code == 1 and "missing:" in merged.output  # what it lacks is listed
    again = subprocess.run(_cmd(data, weights, out, "--shard", "1/2"), env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already ran" in again.stderr  # no silent redo
    resumed = subprocess.run(_cmd(data, weights, out, "--shard", "1/2", "--resume"),
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "merged" in " ".join(resumed.stderr.split())
    rows = _table(out / "predictions.tsv")
    assert len(rows) == 8 and all(r["status"] == "ok" for r in rows.values())


def test_a_shard_with_other_weights_is_refused_by_merge(tmp_path: Path, tiny_weights) -> None:
    data = _folder(tmp_path, n=4)
    out = tmp_path / "out"
    a = subprocess.run(_cmd(data, tiny_weights(rf=9), out, "--shard", "1/2"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    b = subprocess.run(_cmd(data, tiny_weights(rf=17), out, "--shard", "2/2"), env=_env(),
                       capture_output=True, text=True, timeout=300)
    assert a.returncode == 0, a.stderr
    assert b.returncode == 2 and "cannot be merged" in b.stderr
    assert "used weights random-rf17-w4" in " ".join(b.stderr.split())
    assert not (out / "predictions.tsv").exists()
    from typer.testing import CliRunner

    from brainbag.cli import app

    result = CliRunner().invoke(app, ["merge", str(out)])
    assert result.exit_code == 2 and "rerun it with the same --weights" in result.output


@pytest.mark.parametrize(("env", "name"), [
    ({"SLURM_ARRAY_TASK_ID": "11", "SLURM_ARRAY_TASK_MIN": "10",
      "SLURM_ARRAY_TASK_COUNT": "3"}, "2-of-3"),
    ({"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}, "3-of-3"),
])
def test_shard_auto_from_slurm_and_torchrun(env, name, tmp_path: Path, tiny_weights) -> None:
    data = _folder(tmp_path, n=3)
    out = tmp_path / "out"
    done = subprocess.run(_cmd(data, tiny_weights(), out, "--shard", "auto"), env=_env(**env),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    state = ShardState.load(out / "shards" / f"{name}.json")
    assert len(state.assigned) == 1 and state.state == "complete"
    assert "1 of 3 shards finished" in " ".join(done.stderr.split())


def test_an_ordinary_run_is_refused_while_a_shard_holds_the_folder(tmp_path: Path,
                                                                    tiny_weights) -> None:
    from brainbag.run.lock import OutputLock

    data, weights = _folder(tmp_path, n=2), tiny_weights()
    out = tmp_path / "out"
    with OutputLock(out, shared=True):  # what a running shard holds
        plain = subprocess.run(_cmd(data, weights, out), env=_env(), capture_output=True,
                               text=True, timeout=120)
        shard = subprocess.run(_cmd(data, weights, out, "--shard", "1/2"), env=_env(),
                               capture_output=True, text=True, timeout=120)
    assert plain.returncode == 2 and "in use by another brainbag run" in plain.stderr
    assert shard.returncode == 0, shard.stderr  # shards share the folder
    with OutputLock(out / "shards", name=".2-of-2.lock"):  # shard 2 running
        twice = subprocess.run(_cmd(data, weights, out, "--shard", "2/2"), env=_env(),
                               capture_output=True, text=True, timeout=120)
    assert twice.returncode == 2 and "shard 2-of-2 of output folder" in twice.stderr


def test_merge_of_10000_rows_is_quick_enough_to_measure(tmp_path: Path) -> None:
    """The target (under 5 s) is measured by bench/shard_merge.py; this only proves the size
    works and every row comes out once."""
    _fake_shards(tmp_path, 10_000, 8)
    t0 = time.perf_counter()
    result = merge(tmp_path)
    assert len(result.rows) == 10_000 and result.complete
    assert time.perf_counter() - t0 < 120  # a hang guard, not a speed test
