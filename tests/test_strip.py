"""Skull stripping (brainbag.image.strip): deepbet's real networks on the shared raw heads, the
orientation round trip in world space, the plausibility check and the missing-deepbet message."""

from __future__ import annotations

import itertools
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import REPO, make_affine, sample

import brainbag.image.strip as strip
from brainbag.errors import InputError, WeightsError
from brainbag.image.io import Image, LoadedImage, load_image, voxel_sizes

needs_deepbet = pytest.mark.skipif(
    find_spec("deepbet") is None,
    reason=f"deepbet is not installed ({strip.INSTALL_HINT} to run the real networks)")

_STRIPPED: dict[str, tuple[LoadedImage, strip.StripResult]] = {}


def stripped(name: str) -> tuple[LoadedImage, strip.StripResult]:
    """A shared sample and deepbet's mask of it, stripped once per test session (1 thread)."""
    if name not in _STRIPPED:
        loaded = load_image(sample(name))
        _STRIPPED[name] = loaded, strip.strip_brain(loaded, threads=1)
    return _STRIPPED[name]


def _blank_image() -> Image:
    return Image(np.zeros((8, 8, 8), np.float32), np.eye(4))


def assert_one_line(exc: pytest.ExceptionInfo[BaseException], *needles: str) -> str:
    text = str(exc.value)
    assert "\n" not in text, text
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return text


# --- (a) the real networks on raw heads ---------------------------------------------------------


@needs_deepbet
@pytest.mark.parametrize("name", ["rorden_t1_mprage.nii.gz", "chris_t1.nii.gz"])
def test_raw_head_gives_one_whole_brain_on_the_input_grid(name: str) -> None:
    before = torch.get_num_threads()
    loaded, result = stripped(name)
    assert torch.get_num_threads() == before  # the thread budget is restored
    mask = result.mask
    # on the input grid: same shape; the caller writes it with the input's affine
    assert mask.dtype == bool and mask.shape == loaded.shape
    # a whole brain: one piece, 1.0-1.9 L, and the volume is the mask's voxels times their size
    assert result.n_components == 1
    assert 1000.0 <= result.volume_ml <= 1900.0, result.volume_ml
    expected_ml = mask.sum() * float(np.prod(voxel_sizes(loaded.image.affine))) / 1000
    assert result.volume_ml == pytest.approx(expected_ml)
    strip.check_mask_plausible(result, loaded.zooms, loaded.path)
    # the brain lies inside the head: its world centroid, mapped back into the scan, falls on a
    # head voxel enclosed by head along all three axes; nearly every brain voxel is tissue, not
    # air; and the mask stays clear of the array's faces (it did not leak to the field of view)
    data = loaded.image.data
    head = data > 0.05 * np.percentile(data, 99)
    centroid = loaded.image.affine @ np.append(np.argwhere(mask).mean(axis=0), 1.0)
    ijk = np.round(np.linalg.solve(loaded.image.affine, centroid)[:3]).astype(int)
    assert np.all(ijk >= 0) and np.all(ijk < loaded.shape)
    assert head[tuple(ijk)]
    for axis in range(3):
        line = head[tuple(slice(None) if a == axis else int(ijk[a]) for a in range(3))]
        assert line[: ijk[axis]].any() and line[ijk[axis] + 1:].any()
    assert (head & mask).sum() > 0.98 * mask.sum()
    assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()
                or mask[:, :, 0].any() or mask[:, :, -1].any())
    record = result.to_record()
    assert record["method"] == "deepbet" and record["version"] == strip.deepbet_version()
    assert record["threshold"] == 0.5 and record["n_components"] == 1
    assert record["model_sha256"] == strip.MODEL_SHA256
    import json

    assert json.loads(json.dumps(record)) == record


# --- (b) geometry: the reorientation round trip -------------------------------------------------


@needs_deepbet
def test_flipped_and_permuted_scan_gives_the_same_world_mask(tmp_path: Path) -> None:
    """The same scan stored with permuted and flipped axes (and the affine that keeps every voxel
    at its world position) gets a mask on the same world voxels."""
    loaded, result = stripped("chris_t1.nii.gz")
    a = loaded.image.data
    n0, n1, n2 = a.shape
    # B[i, j, k] = A[j, n1 - 1 - k, n2 - 1 - i]: axes permuted (PIR-like), two of them flipped
    b = np.flip(a.transpose(2, 0, 1), axis=(0, 2))
    to_a = np.array([[0, 1, 0, 0], [0, 0, -1, n1 - 1], [-1, 0, 0, n2 - 1], [0, 0, 0, 1]], float)
    assert b[3, 5, 7] == a[5, n1 - 1 - 7, n2 - 1 - 3]
    path = tmp_path / "chris_pir.nii"
    nib.save(nib.Nifti1Image(b, loaded.image.affine @ to_a), str(path))
    moved = load_image(path)
    assert nib.aff2axcodes(moved.image.affine) != nib.aff2axcodes(loaded.image.affine)
    other = strip.strip_brain(moved, threads=1)
    assert other.mask.shape == b.shape
    # the moved grid's voxels, placed in the world by its own affine and found on the original
    # grid by the original affine: the two grids coincide voxel for voxel (checked at the corners)
    moved_to_a = np.linalg.solve(loaded.image.affine, moved.image.affine)
    corners = np.array(list(itertools.product(*[(0, n - 1) for n in b.shape]))).T
    at = moved_to_a[:3, :3] @ corners + moved_to_a[:3, 3:]
    assert np.abs(at - np.round(at)).max() < 1e-3
    assert at.min() > -0.5 and np.all(at.max(axis=1) < np.array(a.shape) - 0.5)
    # the moved mask's brain voxels, looked up in the original mask
    idx = np.argwhere(other.mask).T
    back = np.round(moved_to_a[:3, :3] @ idx + moved_to_a[:3, 3:]).astype(int)
    overlap = result.mask[back[0], back[1], back[2]].sum()
    dice = 2 * overlap / (result.mask.sum() + other.mask.sum())
    assert dice > 0.98, dice
    assert other.volume_ml == pytest.approx(result.volume_ml, rel=0.02)


@pytest.mark.parametrize("perm", list(itertools.permutations(range(3))))
def test_ras_round_trip_is_exact_for_every_axis_order(perm: tuple[int, int, int]) -> None:
    """Without the networks: for each of the 48 axis orders and directions, the array handed to
    deepbet is RAS+ (each index placed where the RAS affine says) and coming back is the input."""
    rng = np.random.default_rng(0)
    data = rng.random((5, 6, 7)).astype(np.float32)
    for flips in itertools.product((1, -1), repeat=3):
        affine = make_affine(zooms=(1.0, 1.2, 0.9), flips=flips, perm=perm)
        ras, ornt = strip.to_ras_array(data, affine)
        assert nib.aff2axcodes(affine @ nib.orientations.inv_ornt_aff(ornt, data.shape)) == (
            "R", "A", "S")
        to_input = nib.orientations.inv_ornt_aff(ornt, data.shape)
        for r in [(0, 0, 0), (1, 2, 3), tuple(n - 1 for n in ras.shape)]:
            i = np.round(to_input @ np.append(r, 1.0))[:3].astype(int)
            assert ras[r] == data[tuple(i)]
        assert np.array_equal(strip.from_ras_array(ras, ornt), data)


# --- (c) the plausibility check -----------------------------------------------------------------


def _cube(shape: tuple[int, int, int], lo: int, hi: int) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[lo:hi, lo:hi, lo:hi] = True
    return mask


def test_plausibility_refuses_a_tiny_mask_in_one_line() -> None:
    path = Path("/data/sub-01_T1w.nii.gz")
    tiny = _cube((60, 60, 60), 10, 20)  # 1000 voxels of 1 mm: 1 mL
    with pytest.raises(InputError) as exc:
        strip.check_mask_plausible(tiny, (1.0, 1.0, 1.0), path)
    assert_one_line(exc, str(path), "1 mL", "0.8-2.2 L")
    with pytest.raises(InputError) as exc:
        strip.check_mask_plausible(np.zeros((8, 8, 8), bool), (1.0, 1.0, 1.0), path)
    assert_one_line(exc, str(path), "empty")
    huge = _cube((70, 70, 70), 0, 70)  # 70^3 voxels of 2 mm: 2.74 L
    with pytest.raises(InputError) as exc:
        strip.check_mask_plausible(huge, (2.0, 2.0, 2.0), path)
    assert_one_line(exc, str(path), "2.74 L")


def test_plausibility_refuses_a_two_piece_mask_in_one_line() -> None:
    path = Path("/data/sub-02_T1w.nii.gz")
    mask = np.zeros((100, 60, 60), bool)  # 2 mm voxels: 8 uL each
    mask[5:45, 10:50, 10:50] = True  # 40^3 voxels = 0.51 L
    mask[55:95, 10:50, 10:50] = True  # another, ten voxels away
    with pytest.raises(InputError) as exc:
        strip.check_mask_plausible(mask, (2.0, 2.0, 2.0), path)
    assert_one_line(exc, str(path), "2 separate pieces", "512 mL")
    # a speck far from the brain (two voxels: 16 uL, below MIN_PIECE_ML) is no second piece
    mask[55:95] = False
    mask[5:50, 10:50, 0:60] = True  # one piece of 45x40x60 voxels = 0.86 L
    mask[80, 55, 55] = mask[81, 56, 56] = True
    assert strip.component_sizes(mask).tolist() == [45 * 40 * 60, 2]
    strip.check_mask_plausible(mask, (2.0, 2.0, 2.0), path)


def test_plausibility_of_a_strip_result_names_deepbet() -> None:
    mask = _cube((40, 40, 40), 5, 25)  # 20^3 voxels of 2 mm: 64 mL
    result = strip.StripResult(mask=mask, version="1.0.2", threshold=0.5, volume_ml=64.0,
                               n_components=1, seconds=1.0)
    with pytest.raises(InputError) as exc:
        strip.check_mask_plausible(result, (2.0, 2.0, 2.0), "raw.nii.gz")
    assert_one_line(exc, "raw.nii.gz", "deepbet", "64 mL", "--mask")


def test_component_sizes_count_26_connected_pieces() -> None:
    mask = np.zeros((10, 10, 10), bool)
    mask[1, 1, 1] = mask[2, 2, 2] = True  # corner neighbours: one piece
    mask[5:7, 5:7, 5:7] = True
    assert strip.component_sizes(mask).tolist() == [8, 2]
    assert strip.component_sizes(np.zeros((4, 4, 4), bool)).size == 0


# --- (d) deepbet missing, or not the pinned networks ------------------------------------------


def test_missing_deepbet_is_one_line_naming_the_input_and_the_fixes(monkeypatch) -> None:
    monkeypatch.setattr(strip, "_EXTRACTORS", {})  # nothing loaded yet in this process
    monkeypatch.setattr(strip, "_RUN_LOCKS", {})
    monkeypatch.setitem(sys.modules, "deepbet", None)
    monkeypatch.setitem(sys.modules, "deepbet.bet", None)
    path = Path("/scans/raw_T1.nii.gz")
    loaded = LoadedImage(path=path, image=_blank_image(), dtype="float32", sha256="0",
                         xform_code=1)
    with pytest.raises(strip.StripperMissing) as exc:
        strip.strip_brain(loaded)
    assert isinstance(exc.value, InputError)
    assert_one_line(exc, str(path), "deepbet", "pip install deepbet==1.0.2", "--mask",
                    "--strip never")


@needs_deepbet
def test_networks_other_than_the_pinned_ones_are_refused(monkeypatch) -> None:
    monkeypatch.setattr(strip, "_EXTRACTORS", {})
    monkeypatch.setattr(strip, "_RUN_LOCKS", {})
    monkeypatch.setitem(strip.MODEL_SHA256, "model.pt", "0" * 64)
    loaded = LoadedImage(path=Path("raw.nii.gz"), image=_blank_image(), dtype="float32",
                         sha256="0", xform_code=1)
    with pytest.raises(WeightsError) as exc:
        strip.strip_brain(loaded)
    assert_one_line(exc, "model.pt", "not the pinned", "deepbet==1.0.2")
    assert strip._EXTRACTORS == {}  # nothing was loaded


@needs_deepbet
def test_an_image_without_a_head_is_one_line() -> None:
    loaded = LoadedImage(path=Path("blank.nii.gz"), image=_blank_image(), dtype="float32",
                         sha256="0", xform_code=1)
    with pytest.raises(InputError) as exc:
        strip.strip_brain(loaded, threads=1)
    assert_one_line(exc, "blank.nii.gz", "found no brain", "--mask")


@needs_deepbet
def test_pinned_hashes_match_the_installed_networks() -> None:
    strip.verify_model_files(strip.model_files())


def test_thread_budget_is_applied_and_restored() -> None:
    before = torch.get_num_threads()
    with strip.thread_budget(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), strip.thread_budget(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_importing_the_module_imports_neither_deepbet_nor_torch() -> None:
    code = ("import sys, brainbag.image.strip; "
            "print(sorted(m for m in ('deepbet', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO,
                         env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "[]"
