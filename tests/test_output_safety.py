"""One writer per output folder, and outputs that cannot be written: refused in one line,
nothing half-written."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from test_batch import FAST, brain, predict, read_tsv

from brainbag.errors import FolderInUse
from brainbag.run.lock import LOCK_NAME, OutputLock

HOLD = ("import sys, time\n"
        "from brainbag.run.lock import OutputLock\n"
        "with OutputLock(sys.argv[1]):\n"
        "    print('held', flush=True)\n"
        "    time.sleep(60)\n")


def _holder(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s lock (as a live brainbag run does)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], stdout=subprocess.PIPE,
                            env=env, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_on_a_held_folder_is_refused_at_once(tmp_path: Path, tiny_weights) -> None:
    data = brain(tmp_path / "in" / "a.nii.gz")
    out = tmp_path / "out"
    holder = _holder(out)
    try:
        t0 = time.perf_counter()
        result = predict(data, "--weights", tiny_weights(), "--out", out, *FAST)
        assert time.perf_counter() - t0 < 10
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and f"output folder {out} is in use" in line
        assert f"pid {holder.pid} on host {socket.gethostname()}, started " in line
        assert [p.name for p in out.iterdir()] == [LOCK_NAME]  # nothing of ours written
    finally:
        holder.kill()
        holder.wait()
    # the holder was killed (-9): its lock is free, the next run takes it over and removes it
    result = predict(data, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png")
    assert result.exit_code == 0, result.output
    assert [r["status"] for r in read_tsv(out / "predictions.tsv")] == ["ok"]
    assert not (out / LOCK_NAME).exists()


def test_a_stale_lock_file_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(f'{{"pid": {dead.pid}, "host": "{socket.gethostname()}", '
                                 '"started": "yesterday"}\n')
    with OutputLock(out) as lock:
        assert lock.took_over is not None and lock.took_over["pid"] == dead.pid
        with pytest.raises(FolderInUse, match=f"pid {os.getpid()} on host"):
            OutputLock(out).acquire()  # a second open file description: refused
    assert list(out.iterdir()) == []


def test_without_flock_a_live_pid_on_this_host_keeps_the_folder(tmp_path: Path,
                                                                monkeypatch) -> None:
    import fcntl

    def no_flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    out = tmp_path / "out"
    out.mkdir()
    host = socket.gethostname()
    (out / LOCK_NAME).write_text(f'{{"pid": {os.getppid()}, "host": "{host}"}}')
    with pytest.raises(FolderInUse, match="is still running .*does not support flock"):
        OutputLock(out).acquire()
    (out / LOCK_NAME).write_text('{"pid": 1, "host": "elsewhere.example"}')
    with pytest.raises(FolderInUse, match="on another host and cannot be checked"):
        OutputLock(out).acquire()


def test_a_failed_single_input_leaves_no_folder_behind(tmp_path: Path, tiny_weights) -> None:
    bad = tmp_path / "bad.nii"
    bad.write_text("not an image\n")
    out = tmp_path / "new" / "out"
    result = predict(bad, "--weights", tiny_weights(), "--out", out)
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()


def _fail_writes_after(monkeypatch, calls: int) -> None:
    """Simulate a full disk: the ``calls``-th NIfTI write (and later ones) writes half a file
    and fails with ENOSPC."""
    import brainbag.run.scan

    real = brainbag.run.scan.save_nifti_atomic
    seen = {"n": 0}

    def failing(img, path: Path) -> None:
        seen["n"] += 1
        if seen["n"] < calls:
            return real(img, path)
        from brainbag.files import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_bytes(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    monkeypatch.setattr(brainbag.run.scan, "save_nifti_atomic", failing)


def _leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*"))


def test_a_full_disk_stops_the_run_with_one_line_and_no_partial_output(
        tmp_path: Path, tiny_weights, monkeypatch) -> None:
    data = tmp_path / "in"
    for k in range(3):
        brain(data / f"s{k}.nii.gz", seed=k)
    out = tmp_path / "out"
    _fail_writes_after(monkeypatch, calls=3)  # s0 writes 2 maps; s1's first map fails
    result = predict(data, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png",
                     "--jobs", "0")
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: could not write the outputs of ")
    assert "s1.nii.gz" in lines[-1] and "No space left on device" in lines[-1]
    assert "--resume" in lines[-1]
    # s0 done and recorded; nothing of s1 (no folder, no staging, no row), s2 not started
    assert [r["subject"] for r in read_tsv(out / "predictions.tsv")] == ["s0"]
    assert _leftovers(out) == ["predictions.tsv", "s0", "s0/age_map.nii.gz",
                               "s0/prediction.json", "s0/sex_map.nii.gz"]
    monkeypatch.undo()
    again = predict(data, "--weights", tiny_weights(), "--out", out, *FAST, "--no-png",
                    "--resume")
    assert again.exit_code == 0, again.output
    assert [r["status"] for r in read_tsv(out / "predictions.tsv")] == ["ok"] * 3


def test_a_read_only_output_folder_is_one_line(tmp_path: Path, tiny_weights,
                                               monkeypatch) -> None:
    data = brain(tmp_path / "a.nii.gz")
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):  # EROFS for anything written in ``out``
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    result = predict(data, "--weights", tiny_weights(), "--out", out, *FAST)
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert line == (f"error: cannot write in the output folder {out}: Read-only file system; "
                    "choose a writable --out (or fix its permissions)")
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("name", ["...nii.gz", "..nii", ".nii.gz"])
def test_a_file_name_that_names_no_folder_is_refused_before_anything_is_written(
        tmp_path: Path, tiny_weights, name: str) -> None:
    """Issue 23, item 10: `...nii.gz` gave the subject `..`, so the run tried to move `out/x/..`
    aside and left an empty `out/x/....old-*` folder behind."""
    scan = brain(tmp_path / "in" / "a.nii.gz").rename(tmp_path / "in" / name)
    out = tmp_path / "out" / "x"
    for inputs in ([scan], [scan, brain(tmp_path / "in" / "b.nii.gz")]):
        result = predict(*inputs, "--weights", tiny_weights(), "--out", out)
        line = result.stderr.strip()
        assert result.exit_code == 2 and "\n" not in line, result.output
        assert f"{scan}: its file name gives the subject or session name" in line
        assert "nothing was written: rename the file" in line
        assert not (tmp_path / "out").exists()
    listed = tmp_path / "in" / "scans.txt"  # a list file names its inputs the same way
    listed.write_text(f"{name}\n")
    result = predict(listed, "--weights", tiny_weights(), "--out", out)
    assert result.exit_code == 2 and "cannot hold its results" in result.stderr
    assert not (tmp_path / "out").exists()


def test_an_output_location_outside_out_is_refused() -> None:
    from brainbag.errors import UsageError
    from brainbag.run.discover import OutputLocation, ScanInput, check_output_names

    inside = ScanInput(Path("a.nii"), "a", OutputLocation(Path("sub/a")))
    check_output_names([inside], Path("out"))
    for folder in (Path("../elsewhere"), Path("/abs/olute"), Path("a/../..")):
        item = ScanInput(Path("a.nii"), "a", OutputLocation(folder))
        with pytest.raises(UsageError, match="cannot hold its results"):
            check_output_names([item], Path("out"))
