"""The issue-14 bad-input corpus, built in a folder: 13 broken inputs (and a good one), each
named, with the command-line arguments a user would pass for it. Used by
``tests/test_bad_input_corpus.py`` (every input refused clearly) and ``tests/verdicts.py`` (the
checks' verdicts on every input, before and after a change to the checks)."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
from conftest import make_affine, save
from phantom import head

DEMO = Path(__file__).resolve().parents[1] / "brainbag" / "data" / "demo" / "ch2bet.nii.gz"


def _raw_header_bomb(path: Path) -> Path:
    """A valid NIfTI-1 header declaring 30000^3 float32 voxels (108 TB) in a 1 kB file."""
    img = nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4))
    raw = bytearray(img.to_bytes())
    hdr = np.frombuffer(raw, dtype=nib.nifti1.header_dtype, count=1).copy()
    hdr["dim"][0, 1:4] = 30000
    raw[:348] = hdr.tobytes()
    path.write_bytes(bytes(raw))
    return path


def _zero_pixdim(path: Path) -> Path:
    img = nib.Nifti1Image(np.random.default_rng(0).uniform(1, 100, (20, 20, 20)).astype(
        np.float32), None)
    img.header.set_zooms((0.0, 0.0, 0.0))
    img.header.set_qform(None, code=0)
    img.header.set_sform(None, code=0)
    nib.save(img, str(path))
    return path


def build_corpus(tmp: Path) -> dict[str, list[str]]:
    """Write the corpus into ``tmp``; name -> the command's arguments after the subcommand."""
    rng = np.random.default_rng(14)
    data, affine, mask = head()
    good = save(data, affine, tmp / "good.nii.gz")
    (tmp / "truncated.nii.gz").write_bytes(DEMO.read_bytes()[: DEMO.stat().st_size // 2])
    (tmp / "empty.nii.gz").write_bytes(b"")
    (tmp / "random.nii").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (tmp / "text.nii.gz").write_bytes(gzip.compress(b"patient list\nname,age\n"))
    nib.save(nib.Nifti1Image(data[:, :, 40].astype(np.float32), affine), str(tmp / "2d.nii.gz"))
    save(np.stack([data] * 3, axis=-1), affine, tmp / "4d.nii.gz")
    nan = data.copy()
    nan[40:50, 50:60, 40:45] = np.nan
    save(nan, affine, tmp / "nan.nii.gz")
    save(np.zeros_like(data), affine, tmp / "allzero.nii.gz")
    _zero_pixdim(tmp / "zero_pixdim.nii")
    _raw_header_bomb(tmp / "bomb.nii")
    save(mask[::2, ::2, ::2], make_affine(zooms=(4.0, 4.0, 4.0)), tmp / "coarse_mask.nii.gz")
    mixed = tmp / "mixed"
    mixed.mkdir()
    save(data, affine, mixed / "good.nii.gz")
    (mixed / "bad.nii.gz").write_bytes(DEMO.read_bytes()[:5000])
    files = {name: [str(tmp / f)] for name, f in (
        ("truncated", "truncated.nii.gz"), ("empty", "empty.nii.gz"), ("random bytes",
         "random.nii"), ("text", "text.nii.gz"), ("2D", "2d.nii.gz"), ("4D", "4d.nii.gz"),
        ("NaN", "nan.nii.gz"), ("all-zero", "allzero.nii.gz"),
        ("zero pixdim", "zero_pixdim.nii"), ("header bomb", "bomb.nii"))}
    return {**files,
            "mask on another grid": [str(good), "--mask", str(tmp / "coarse_mask.nii.gz")],
            "missing file": [str(tmp / "no_such_scan.nii.gz")],
            "mixed batch": [str(mixed)]}
