from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import make_affine, rotation, sample, save, world_coords

from brainbag.errors import InputError
from brainbag.image.io import (
    Image,
    bounding_box,
    isotropic_grid,
    load_image,
    make_nifti,
    resample,
    same_grid,
    subject_name,
    to_ras,
    voxel_sizes,
)

AFFINES = {
    "RAS": make_affine(),
    "LAS": make_affine(flips=(-1, 1, 1)),
    "LPI-permuted": make_affine(flips=(-1, -1, -1), perm=(1, 0, 2)),
    "oblique": make_affine(zooms=(1.0, 1.1, 0.9), rot=rotation(0, 20) @ rotation(2, -12)),
}


@pytest.mark.parametrize("name", ["sub-01_T1w.nii.gz", "sub-01_T1w.nii", "sub-01_T1w.mgz"])
def test_subject_name_strips_suffix_and_t1w(name: str) -> None:
    assert subject_name(Path("/data") / name) == "sub-01"
    assert subject_name(Path("brain.nii.gz")) == "brain"
    assert subject_name(Path("T1w.nii.gz")) == "T1w"


@pytest.mark.parametrize("kind", list(AFFINES))
def test_round_trip_keeps_affine_and_data(tmp_path: Path, kind: str) -> None:
    affine = AFFINES[kind]
    data = np.random.default_rng(0).random((9, 8, 7)).astype(np.float32)
    img = make_nifti(data, affine, xform_code=2, cal_range=(0.0, 1.0), description="test")
    path = tmp_path / "map.nii.gz"
    nib.save(img, path)
    loaded = load_image(path)
    np.testing.assert_allclose(loaded.image.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(loaded.image.data, data)
    hdr = nib.load(path).header
    np.testing.assert_allclose(hdr.get_sform(), affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_qform(), affine, atol=1e-4)
    assert int(hdr["sform_code"]) == 2 and int(hdr["qform_code"]) == 2
    assert (float(hdr["cal_min"]), float(hdr["cal_max"])) == (0.0, 1.0)
    assert loaded.xform_code == 2


@pytest.mark.parametrize("kind", list(AFFINES))
def test_to_ras_keeps_every_voxel_at_its_world_position(kind: str) -> None:
    affine = AFFINES[kind]
    shape = (6, 7, 8)
    xyz = world_coords(shape, affine)
    image = Image(xyz[0].astype(np.float32), affine)  # value = world x of the voxel
    ras, transform = to_ras(image)
    codes = "".join(nib.aff2axcodes(ras.affine))
    assert codes == "RAS"
    np.testing.assert_allclose(ras.data, world_coords(ras.shape, ras.affine)[0], atol=1e-4)
    np.testing.assert_allclose(ras.affine, affine @ transform)


def test_isotropic_grid_keeps_centre_and_directions() -> None:
    affine = make_affine(zooms=(1.2, 0.9375, 2.0), rot=rotation(1, 15))
    shape = (50, 64, 30)
    new_shape, t = isotropic_grid(shape, affine, 1.0)
    assert new_shape == (60, 60, 60)
    new_affine = affine @ t
    np.testing.assert_allclose(voxel_sizes(new_affine), (1.0, 1.0, 1.0))
    centre_old = affine @ np.array([*(np.array(shape) - 1) / 2, 1.0])
    centre_new = new_affine @ np.array([*(np.array(new_shape) - 1) / 2, 1.0])
    np.testing.assert_allclose(centre_new, centre_old, atol=1e-9)
    # direction of each axis unchanged
    for d in range(3):
        np.testing.assert_allclose(new_affine[:3, d] / 1.0, affine[:3, d] / np.linalg.norm(
            affine[:3, d]), atol=1e-12)


def test_resample_is_exact_for_linear_fields_in_the_interior() -> None:
    affine = make_affine(zooms=(1.3, 0.8, 1.1), rot=rotation(2, 30))
    shape = (20, 30, 25)
    values = world_coords(shape, affine)[1].astype(np.float32)  # world y
    new_shape, t = isotropic_grid(shape, affine)
    out = resample(values, t, new_shape, "linear")
    expected = world_coords(new_shape, affine @ t)[1]
    inner = tuple(slice(2, n - 2) for n in new_shape)
    np.testing.assert_allclose(out[inner], expected[inner], atol=2e-3)


def test_same_grid() -> None:
    a = make_affine()
    assert same_grid((4, 4, 4), a, (4, 4, 4), a.copy())
    b = a.copy()
    b[0, 3] += 0.5
    assert not same_grid((4, 4, 4), a, (4, 4, 4), b)
    assert not same_grid((4, 4, 4), a, (4, 4, 5), a)


def test_single_volume_4d_is_accepted(tmp_path: Path) -> None:
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6, 1)
    path = save(data, make_affine(), tmp_path / "four.nii.gz")
    loaded = load_image(path)
    assert loaded.shape == (4, 5, 6)
    np.testing.assert_array_equal(loaded.image.data, data[..., 0])


@pytest.mark.parametrize(
    "shape, message",
    [((4, 5, 6, 3), "4D with 3 volumes"), ((40, 50), "2 dimensions"),
     ((40, 50, 1), "single slice")],
)
def test_wrong_dimensionality_is_refused(tmp_path: Path, shape, message: str) -> None:
    path = tmp_path / "bad.nii.gz"
    nib.save(nib.Nifti1Image(np.ones(shape, np.float32), np.eye(4)), path)
    with pytest.raises(InputError, match=message) as info:
        load_image(path)
    assert str(path) in str(info.value)


def test_missing_text_and_truncated_files_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.nii.gz")
    text = tmp_path / "notes.nii.gz"
    text.write_text("this is not an image\n")
    with pytest.raises(InputError, match="not a NIfTI|could not be read|corrupt"):
        load_image(text)
    good = save(np.random.default_rng(1).random((30, 30, 30)), make_affine(), tmp_path / "g.nii.gz")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated or corrupt"):
        load_image(truncated)
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    assert gzip.decompress(raw)  # the intact file really is gzip


def test_mgz_input_is_read_in_the_same_world(tmp_path: Path) -> None:
    affine = make_affine(flips=(-1, 1, -1), perm=(0, 2, 1), origin=(128, -128, 128))
    data = np.random.default_rng(2).integers(0, 255, (16, 16, 16)).astype(np.uint8)
    path = tmp_path / "brain.mgz"
    nib.save(nib.MGHImage(data, affine), path)
    loaded = load_image(path)
    np.testing.assert_allclose(loaded.image.affine, affine, atol=1e-4)
    np.testing.assert_array_equal(loaded.image.data, data.astype(np.float32))
    assert loaded.xform_code == 1


def test_real_mgz_sample_reads() -> None:
    path = sample("brainmask.mgz")
    loaded = load_image(path)
    assert loaded.shape == (256, 256, 256)
    assert "".join(nib.aff2axcodes(loaded.image.affine)) == "LIA"
    assert loaded.image.data.max() > 0


def _header_only(path: Path, shape, dtype=np.float32, gz: bool = True) -> Path:
    """A NIfTI file whose header claims ``shape`` but that holds (almost) no voxel data."""
    hdr = nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    hdr.set_sform(np.eye(4), code=1)
    hdr["vox_offset"] = 352
    raw = hdr.binaryblock + b"\x00" * 4 + b"\x00" * 64  # extension flag + a few voxels
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def test_size_guard_refuses_absurd_headers_before_allocating(tmp_path: Path) -> None:
    import time
    import tracemalloc

    path = _header_only(tmp_path / "huge.nii.gz", (4000, 4000, 4000))
    tracemalloc.start()
    t0 = time.perf_counter()
    with pytest.raises(InputError, match="4000x4000x4000") as info:
        load_image(path)
    seconds = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert str(path) in str(info.value) and "\n" not in str(info.value)
    assert peak < 20e6, f"{peak / 1e6:.0f} MB allocated for a refused header"  # data: 256 GB
    assert seconds < 1.0


def test_size_guard_refuses_more_data_than_the_file_can_hold(tmp_path: Path) -> None:
    # 500^3 float32 = 500 MB: within the voxel limit, but no gzip file of 1 kB expands to that
    gz = _header_only(tmp_path / "claims.nii.gz", (500, 500, 500))
    with pytest.raises(InputError, match="truncated or its header is corrupt"):
        load_image(gz)
    raw = _header_only(tmp_path / "claims.nii", (100, 100, 100), gz=False)
    with pytest.raises(InputError, match="the file holds"):
        load_image(raw)
    # the same shape with its data present loads
    ok = save(np.ones((100, 100, 100), np.float32), make_affine(), tmp_path / "ok.nii")
    assert load_image(ok).shape == (100, 100, 100)


def test_bounding_box_matches_the_voxels_it_bounds() -> None:
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = rng.random((9, 11, 7)) > 0.97
        box = bounding_box(mask)
        if not mask.any():
            assert box is None
            continue
        found = np.argwhere(mask)
        assert box is not None
        np.testing.assert_array_equal(box[0], found.min(axis=0))
        np.testing.assert_array_equal(box[1], found.max(axis=0) + 1)
    assert bounding_box(np.zeros((4, 4, 4), bool)) is None
