"""Header fuzzing: small valid NIfTI-1, NIfTI-2 and MGZ images with mutated header fields and file
lengths go through ``brainbag check`` and ``brainbag predict`` (a tiny random network). Every
outcome must be a normal result or a one-line error with exit 1 or 2: never a traceback, a hang,
a huge allocation, or files left in the output folder.

Seeded (derandomised) and bounded for CI: ``BRAINBAG_FUZZ_EXAMPLES`` cases (default 200). For a
release, run longer and with fresh randomness, e.g.::

    BRAINBAG_FUZZ_EXAMPLES=5000 BRAINBAG_FUZZ_RANDOM=1 pytest tests/test_fuzz_headers.py

``BRAINBAG_FUZZ_LOG=file`` appends each case's exit codes and error line to ``file``.
"""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import signal
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from brainbag.cli import app

runner = CliRunner()
EXAMPLES = int(os.environ.get("BRAINBAG_FUZZ_EXAMPLES", "200"))
RANDOM = os.environ.get("BRAINBAG_FUZZ_RANDOM", "") not in ("", "0")
LOG = os.environ.get("BRAINBAG_FUZZ_LOG")  # a file to append one line per case to
SECONDS_PER_CASE = 30  # a case that takes longer is a hang
MEMORY_HEADROOM = 3 << 30  # address space a case may add: far less than a header bomb asks for

# --- header fields and the values tried for them -----------------------------------------------

BAD_FLOATS = [0.0, -1.0, float("nan"), float("inf"), -float("inf"), 1e-30, 1e30, 1e-6, 3.0,
              0.5, 1.0, 2.0, 100.0]
BAD_INTS = [0, 1, 2, -1, -32768, 32767, 7, 8, 3, 4, 255, 2**15 - 1]
DATATYPES = [2, 4, 8, 16, 64, 256, 512, 768, 1024, 1280, 32, 128, 2304, 1792, 0, 1, 7, 3, 9999,
             -4]
MGH_TYPES = [0, 1, 3, 4, 2, 5, 99, -1]


def _values(kind: str) -> st.SearchStrategy[Any]:
    if kind == "f":
        return st.one_of(st.sampled_from(BAD_FLOATS),
                         st.floats(allow_nan=True, allow_infinity=True, width=32))
    return st.one_of(st.sampled_from(BAD_INTS), st.integers(-(2**31), 2**31 - 1))


NIFTI_FIELDS: dict[str, tuple[str, int]] = {
    # field: (value kind, how many elements may be mutated)
    "dim": ("i", 8), "pixdim": ("f", 8), "datatype": ("dt", 1), "bitpix": ("i", 1),
    "vox_offset": ("f", 1), "scl_slope": ("f", 1), "scl_inter": ("f", 1),
    "qform_code": ("i", 1), "sform_code": ("i", 1), "quatern_b": ("f", 1),
    "quatern_c": ("f", 1), "quatern_d": ("f", 1), "qoffset_x": ("f", 1), "srow_x": ("f", 4),
    "srow_y": ("f", 4), "srow_z": ("f", 4), "xyzt_units": ("i", 1), "intent_code": ("i", 1),
    "magic": ("magic", 1),
}
MGH_FIELDS = {"dims": ("i", 4), "type": ("mt", 1), "delta": ("f", 3), "Mdc": ("f", 9),
              "Pxyz_c": ("f", 3), "goodRASFlag": ("i", 1), "version": ("i", 1)}


@st.composite
def mutation(draw: Any, fields: dict[str, tuple[str, int]]) -> tuple[str, int, Any]:
    name = draw(st.sampled_from(sorted(fields)))
    kind, count = fields[name]
    index = draw(st.integers(0, count - 1))
    if kind == "dt":
        value: Any = draw(st.sampled_from(DATATYPES))
    elif kind == "mt":
        value = draw(st.sampled_from(MGH_TYPES))
    elif kind == "magic":
        value = draw(st.sampled_from([b"n+1\0", b"ni1\0", b"n+2\0", b"\0\0\0\0", b"abcd"]))
    else:
        value = draw(_values(kind))
    return name, index, value


@st.composite
def case(draw: Any) -> dict[str, Any]:
    fmt = draw(st.sampled_from(["nifti1", "nifti2", "mgz"]))
    fields = MGH_FIELDS if fmt == "mgz" else NIFTI_FIELDS
    return {
        "format": fmt,
        "gz": draw(st.booleans()) if fmt != "mgz" else draw(st.sampled_from([True, True, False])),
        "shape": tuple(draw(st.integers(6, 14)) for _ in range(3)),
        "dtype": draw(st.sampled_from(["uint8", "int16", "float32", "float64"])),
        "seed": draw(st.integers(0, 2**16)),
        "mutations": draw(st.lists(mutation(fields), min_size=0, max_size=4)),
        "extension": fmt != "mgz" and draw(st.sampled_from([None, "valid", "bad-size",
                                                            "flag-only"])),
        "length": draw(st.sampled_from([None, None, "cut", "extend", "header-only", "empty"])),
        "cut": draw(st.floats(0.0, 1.0)),
    }


def _nifti_bytes(c: dict[str, Any], data: np.ndarray) -> bytes:
    klass = nib.Nifti1Image if c["format"] == "nifti1" else nib.Nifti2Image
    img = klass(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    img.header.set_xyzt_units("mm")
    img.set_sform(img.affine, 1)
    img.set_qform(img.affine, 1)
    if c["extension"] == "valid":
        img.header.extensions.append(nib.nifti1.Nifti1Extension(6, b"brainbag fuzz\0"))
    raw = bytearray(img.to_bytes())
    size = 348 if c["format"] == "nifti1" else 540
    dtype = nib.nifti1.header_dtype if c["format"] == "nifti1" else nib.nifti2.header_dtype
    hdr = np.frombuffer(raw, dtype=dtype, count=1)[0:1].copy()
    for name, index, value in c["mutations"]:
        field = hdr[name]
        try:
            with np.errstate(all="ignore"):
                if field.ndim > 1:
                    field[0, index % field.shape[1]] = value
                else:
                    field[0] = value
        except (OverflowError, ValueError, TypeError):
            continue
        hdr[name] = field
    raw[:size] = hdr.tobytes()
    if c["extension"] == "bad-size":
        raw[size:size + 4] = b"\1\0\0\0"
        raw[size + 4:size + 8] = np.int32(1 << 30).tobytes()  # esize past the end of the file
    elif c["extension"] == "flag-only":
        raw[size:size + 4] = b"\1\0\0\0"
    return bytes(raw)


def _mgh_bytes(c: dict[str, Any], data: np.ndarray) -> bytes:
    if data.dtype == np.float64 or data.dtype == np.int16 and c["seed"] % 2:
        data = data.astype(np.float32)
    img = nib.MGHImage(data, np.eye(4))
    raw = bytearray(img.to_bytes())
    hdr = np.frombuffer(raw, dtype=nib.freesurfer.mghformat.hf_dtype, count=1).copy()
    for name, index, value in c["mutations"]:
        field = hdr[name].reshape(1, -1)
        try:
            with np.errstate(all="ignore"):
                field[0, index % field.shape[1]] = value
        except (OverflowError, ValueError, TypeError):
            continue
        hdr[name] = field.reshape(hdr[name].shape)
    raw[:hdr.itemsize] = hdr.tobytes()
    return bytes(raw)


def build(c: dict[str, Any], folder: Path) -> Path:
    """Write the case's file; returns its path."""
    rng = np.random.default_rng(c["seed"])
    data = np.zeros(c["shape"], dtype=c["dtype"])
    inner = tuple(slice(1, n - 1) for n in c["shape"])
    data[inner] = rng.uniform(10, 200, [n - 2 for n in c["shape"]]).astype(c["dtype"])
    if c["format"] == "mgz":
        raw, name = _mgh_bytes(c, data), "scan.mgz"
    else:
        raw, name = _nifti_bytes(c, data), "scan.nii"
    if c["length"] == "cut":
        raw = raw[: int(len(raw) * c["cut"])]
    elif c["length"] == "extend":
        raw = raw + bytes(rng.integers(0, 256, 1 + int(4000 * c["cut"]), dtype=np.uint8))
    elif c["length"] == "header-only":
        raw = raw[:352]
    elif c["length"] == "empty":
        raw = b""
    if c["gz"]:
        raw = gzip.compress(raw, compresslevel=1)
        if c["format"] != "mgz":
            name += ".gz"
    path = folder / name
    path.write_bytes(raw)
    return path


class _Hang(Exception):
    pass


def _alarm(signum: int, frame: Any) -> None:
    raise _Hang(f"a case ran over {SECONDS_PER_CASE} s")


def _assert_clean_outcome(result: Any, command: str, c: dict[str, Any]) -> None:
    where = f"{command} on {c}"
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        import traceback

        tb = "".join(traceback.format_exception(result.exception))
        raise AssertionError(f"{where}: raised\n{tb}")
    assert result.exit_code in (0, 1, 2), (where, result.exit_code, result.output)
    assert "Traceback" not in result.output, (where, result.output)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    if result.exit_code == 0:
        assert not errors, (where, result.stderr)
    elif command == "predict":
        assert result.stderr.strip().splitlines() == errors[:1], (where, result.stderr)
        assert "unexpected" not in errors[0], (where, errors[0])


@pytest.fixture(scope="module")
def fuzz_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from brainbag.network.model import BagNet3D, BagNetConfig
    from brainbag.weights.file import random_weights_meta, save_weights

    torch.manual_seed(0)
    model = BagNet3D(BagNetConfig.for_rf(9, width=4, heads=("age", "sex")))
    path = tmp_path_factory.mktemp("fuzz-weights") / "rand.safetensors"
    save_weights(path, model, random_weights_meta(model, "random-fuzz"))
    return path


@pytest.fixture(scope="module")
def memory_guard() -> Any:
    """Cap the address space for the fuzz run: a case that allocates what a header bomb asks
    for gets a MemoryError (a failed case) instead of swapping the machine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    limit = vm + MEMORY_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY
                                            else min(limit, hard), hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


@settings(max_examples=EXAMPLES, derandomize=not RANDOM, database=None, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                 HealthCheck.function_scoped_fixture], print_blob=True)
@given(c=case())
def test_mutated_headers_give_a_result_or_one_clear_line(c: dict[str, Any], fuzz_weights: Path,
                                                        memory_guard: Any) -> None:
    folder = Path(tempfile.mkdtemp(prefix="brainbag-fuzz-"))
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS_PER_CASE)
    try:
        path = build(c, folder)
        checked = runner.invoke(app, ["check", str(path), "--json"])
        _assert_clean_outcome(checked, "check", c)
        out = folder / "out"
        predicted = runner.invoke(app, [
            "predict", str(path), "--weights", str(fuzz_weights), "--out", str(out),
            "--mode", "full", "--device", "cpu", "--jobs", "0", "--no-png", "--force"])
        _assert_clean_outcome(predicted, "predict", c)
        if LOG:  # one line per case: the exit codes and the error a user would read
            line = next((x for x in predicted.stderr.splitlines() if x.startswith("error:")), "")
            with open(LOG, "a", encoding="utf-8") as fh:
                fh.write(f"{c['format']}\tcheck {checked.exit_code}\tpredict "
                         f"{predicted.exit_code}\t{line[:160]}\n")
        if predicted.exit_code == 0:
            left = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
            assert left == ["predictions.tsv", "scan", "scan/age_map.nii.gz",
                            "scan/prediction.json", "scan/sex_map.nii.gz"], (c, left)
        else:
            assert not out.exists() or not any(out.iterdir()), (c, list(out.rglob("*")))
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        shutil.rmtree(folder, ignore_errors=True)


def test_the_fuzz_builder_makes_valid_images_when_nothing_is_mutated(tmp_path: Path) -> None:
    """Without mutations every format loads as the data it was built from (the fuzzing starts
    from valid files)."""
    for fmt, gz in (("nifti1", True), ("nifti2", False), ("mgz", True)):
        c = {"format": fmt, "gz": gz, "shape": (7, 8, 9), "dtype": "int16", "seed": 2,
             "mutations": [], "extension": "valid" if fmt != "mgz" else None, "length": None,
             "cut": 0.5}
        folder = tmp_path / fmt
        folder.mkdir()
        path = build(c, folder)
        data = np.asanyarray(nib.load(str(path)).dataobj)
        assert data.shape == (7, 8, 9) and data[0].max() == 0 and data[3, 3, 3] >= 10

