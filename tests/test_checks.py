"""Each check made to pass and made to fail or warn: synthetic heads, and real scans where the
check is about real anatomy (skull, orientation, bias)."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import SHARED_DATA, make_affine, rotation, sample, save
from phantom import head, world_bias

from brainbag.errors import InputError
from brainbag.image.checks import (
    CHECK_NAMES,
    CheckOptions,
    CheckReport,
    run_checks,
)

IXI = SHARED_DATA / "ixi"


def ixi(name: str) -> Path:
    path = IXI / name
    if not path.exists():
        pytest.skip(f"IXI scan {path} not available (set BRAINBAG_SHARED_DATA)")
    return path


def _scan(tmp_path: Path, name: str = "t1.nii.gz", **kwargs) -> Path:
    data, affine, _ = head(**kwargs)
    return save(data, affine, tmp_path / name)


def _status(report: CheckReport) -> dict[str, str]:
    return {r.name: r.status for r in report.results}


def _run(path: Path, names=None, **options) -> CheckReport:
    report = run_checks(path, CheckOptions(**options), names=names)
    assert [r.name for r in report.results] == list(names or CHECK_NAMES)
    return report


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    return _scan(tmp_path_factory.mktemp("clean"))


@pytest.fixture(scope="module")
def skull_on(tmp_path_factory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("skull")
    data, affine, brain = head(skull=True)
    return save(data, affine, tmp / "head.nii.gz"), save(brain, affine, tmp / "mask.nii.gz")


def test_a_skull_stripped_phantom_passes_every_check(clean: Path) -> None:
    report = _run(clean)
    status = _status(report)
    assert status.pop("voxel_size") == "warn"  # 2 mm voxels: resampled
    assert set(status.values()) == {"pass"}, report.results
    assert report.ok
    rows = report.to_list()
    assert set(rows[0]) == {"path", "name", "status", "found", "expected", "hint"}
    assert "will be resampled to 1 mm" in report.get("voxel_size").found


def test_every_check_runs_when_one_fails(tmp_path: Path) -> None:
    data, affine, _ = head()
    data[40:44, 50:54, 40:44] = np.nan
    report = _run(save(data, affine, tmp_path / "nan.nii.gz"))
    status = _status(report)
    assert status["values"] == "fail" and "64 NaN" in report.get("values").found
    # the checks that do not depend on the values all still ran
    assert status["orientation"] == "pass" and status["skull_stripped"] == "pass"
    assert status["brain_mask"] == "pass" and status["bias_field"] == "pass"
    assert "skip" not in status.values()


def test_unreadable_files_fail_the_file_check_and_skip_the_rest(tmp_path: Path) -> None:
    missing = _run(tmp_path / "missing.nii.gz")
    assert _status(missing)["file"] == "fail" and "not found" in missing.get("file").found
    assert {s for n, s in _status(missing).items() if n != "file"} == {"skip"}
    text = tmp_path / "notes.nii.gz"
    text.write_text("not an image\n")
    report = _run(text)
    assert _status(report)["file"] == "fail" and not report.ok


def test_size_guard_check_fails_without_reading_data(tmp_path: Path) -> None:
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((4000, 4000, 4000))
    hdr.set_data_dtype(np.int16)
    hdr["vox_offset"] = 352
    path = tmp_path / "huge.nii.gz"
    path.write_bytes(gzip.compress(hdr.binaryblock + b"\x00" * 4))
    report = _run(path)
    status = _status(report)
    assert status["file"] == "pass" and status["size"] == "fail"
    assert "64,000,000,000 voxels" in report.get("size").found
    assert status["values"] == "skip" and status["bias_field"] == "skip"


def test_dimensions(tmp_path: Path) -> None:
    data, affine, _ = head()
    one = save(data[..., None], affine, tmp_path / "one.nii.gz")
    assert _status(_run(one))["dimensions"] == "pass"
    three = save(np.stack([data] * 3, axis=-1), affine, tmp_path / "three.nii.gz")
    report = _run(three)
    assert _status(report)["dimensions"] == "fail" and "3 volumes" in report.get(
        "dimensions").found
    assert "fslroi" in report.get("dimensions").hint


def test_header_qform_sform_disagreement_and_missing_orientation(tmp_path: Path) -> None:
    data, affine, _ = head()
    img = nib.Nifti1Image(data, affine)
    shifted = affine.copy()
    shifted[:3, 3] += (12.0, 0.0, 0.0)
    img.set_qform(shifted, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, tmp_path / "disagree.nii.gz")
    report = _run(tmp_path / "disagree.nii.gz", names=("header",))
    assert _status(report)["header"] == "warn"
    assert "12.0 mm" in report.get("header").found and "sform" in report.get("header").hint
    img.set_qform(affine, code=1)
    nib.save(img, tmp_path / "agree.nii.gz")
    assert _status(_run(tmp_path / "agree.nii.gz", names=("header",)))["header"] == "pass"
    img.set_qform(None, code=0)
    img.set_sform(None, code=0)
    nib.save(img, tmp_path / "none.nii.gz")
    report = _run(tmp_path / "none.nii.gz", names=("header",))
    assert _status(report)["header"] == "warn" and "no orientation" in report.get("header").found


def test_header_degenerate_affine_fails(tmp_path: Path) -> None:
    data, affine, _ = head()
    bad = affine.copy()
    bad[:3, 2] = 0.0
    img = nib.Nifti1Image(data, None)
    img.set_sform(bad, code=1)
    nib.save(img, tmp_path / "flat.nii.gz")
    report = _run(tmp_path / "flat.nii.gz")
    assert _status(report)["header"] == "fail" and "degenerate" in report.get("header").found


def test_constant_image_fails(tmp_path: Path) -> None:
    path = save(np.full((40, 40, 40), 7.0), make_affine(), tmp_path / "flat.nii.gz")
    report = _run(path)
    assert _status(report)["values"] == "fail" and "every voxel is 7" in report.get(
        "values").found


def test_intensity_label_maps_fail_and_normalised_images_warn(tmp_path: Path) -> None:
    data, affine, brain = head()
    mask = _run(save(brain.astype(np.uint8), affine, tmp_path / "mask.nii.gz"),
                names=("intensity",))
    assert _status(mask)["intensity"] == "fail" and "mask or label map" in mask.get(
        "intensity").hint
    zscored = np.where(brain, (data - data[brain].mean()) / data[brain].std(), 0.0)
    report = _run(save(zscored, affine, tmp_path / "z.nii.gz"), names=("intensity",))
    assert _status(report)["intensity"] == "warn" and "negative" in report.get("intensity").found


@pytest.mark.parametrize(
    "zooms, status, needle",
    [((1.0, 1.0, 1.0), "pass", "1x1x1 mm"), ((1.2, 1.2, 1.2), "warn", "resampled to 1 mm"),
     ((4.0, 4.0, 4.0), "fail", "too coarse"), ((0.5, 0.5, 1.8), "fail", "3.6:1 anisotropic")],
)
def test_voxel_size(tmp_path: Path, zooms, status: str, needle: str) -> None:
    rng = np.random.default_rng(0)
    path = save(rng.uniform(1, 100, (24, 24, 24)), make_affine(zooms=zooms), tmp_path / "v.nii")
    report = _run(path)
    assert _status(report)["voxel_size"] == status and needle in report.get("voxel_size").found


def test_voxel_size_fails_with_no_resample(tmp_path: Path) -> None:
    path = save(np.ones((8, 8, 8)), make_affine(zooms=(1.2, 1.0, 1.0)), tmp_path / "v.nii")
    report = _run(path, resample=False)
    assert _status(report)["voxel_size"] == "fail" and "--no-resample" in report.get(
        "voxel_size").hint


def test_orientation_is_reported_and_extreme_obliquity_warns(tmp_path: Path) -> None:
    lia = make_affine(flips=(-1, -1, 1), perm=(0, 2, 1))
    report = _run(save(np.ones((8, 8, 8)), lia, tmp_path / "lia.nii"))
    assert _status(report)["orientation"] == "pass"
    assert report.get("orientation").found == "LIA, not oblique"
    tilted = make_affine(rot=rotation(0, 12))
    report = _run(save(np.ones((8, 8, 8)), tilted, tmp_path / "tilt.nii"))
    assert _status(report)["orientation"] == "pass" and "12.0 deg" in report.get(
        "orientation").found
    steep = make_affine(rot=rotation(0, 40))
    report = _run(save(np.ones((8, 8, 8)), steep, tmp_path / "steep.nii"))
    assert _status(report)["orientation"] == "warn" and "40.0 deg" in report.get(
        "orientation").found


def test_skull_on_phantom_fails_without_a_mask_and_passes_with_one(skull_on) -> None:
    head_path, mask_path = skull_on
    report = _run(head_path, strip="never")  # --strip never: the refusal of old
    assert _status(report)["skull_stripped"] == "fail"
    assert "--mask" in report.get("skull_stripped").hint
    assert "SynthStrip" in report.get("skull_stripped").hint
    assert _status(report)["brain_mask"] == "fail"  # voxels > 0 is the whole head
    masked = _run(head_path, mask=mask_path)
    status = _status(masked)
    assert status["skull_stripped"] == "pass" and "mask removes it" in masked.get(
        "skull_stripped").found
    assert status["brain_mask"] == "pass" and status["anatomy"] == "pass"
    assert masked.ok


def test_skull_on_phantom_will_be_stripped_by_default(skull_on, monkeypatch) -> None:
    """--strip auto (the default): check says the head will be stripped and skips the checks of
    the mask that only predict makes; without deepbet it fails and says how to install it."""
    head_path, _ = skull_on
    report = _run(head_path)
    status = _status(report)
    assert status["skull_stripped"] == "pass" and report.ok
    found = report.get("skull_stripped").found
    assert found.startswith("skull on: head object") and "will be stripped (deepbet)" in found
    for name in ("brain_mask", "anatomy", "field_of_view", "bias_field"):
        assert status[name] == "skip"
        assert "made by skull stripping (deepbet)" in report.get(name).found
    monkeypatch.setitem(sys.modules, "deepbet", None)  # as if it were not installed
    missing = _run(head_path, names=("skull_stripped",))
    result = missing.get("skull_stripped")
    assert result.status == "fail" and "deepbet is not installed" in result.found
    assert "pip install deepbet==1.0.2" in result.hint and "--mask" in result.hint


STRIPPED = ["ch2bet.nii.gz", "brainmask.mgz", "beijing_sub08251_mprage_skullstripped.nii.gz",
            "vxm_test_vol.nii.gz", "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"]
SKULL_ON = ["ch2.nii.gz", "rorden_t1_mprage.nii.gz", "chris_t1.nii.gz"]


@pytest.mark.parametrize("name", STRIPPED + SKULL_ON)
def test_skull_check_on_real_scans(name: str) -> None:
    report = _run(sample(name), names=("skull_stripped", "brain_mask"))
    result = report.get("skull_stripped")
    litres = result.values["object_litres"]
    if name in STRIPPED:
        assert result.status == "pass", result
        assert litres < 2.2  # measured 1.54-2.06 L
        assert _status(report)["brain_mask"] == "pass"
    else:
        assert result.status == "pass" and "will be stripped" in result.found, result
        assert litres > 3.0  # measured 3.25-5.00 L
        never = _run(sample(name), names=("skull_stripped", "brain_mask"), strip="never")
        assert never.get("skull_stripped").status == "fail" and not never.ok


def test_skull_on_real_scan_with_its_mask_passes() -> None:
    scan = ixi("2mm/IXI296-HH-1970_T1w.nii.gz")
    report = _run(scan, mask=ixi("2mm/IXI296-HH-1970_mask.nii.gz"),
                  names=("skull_stripped", "brain_mask"))
    assert report.get("skull_stripped").values["object_litres"] > 3.0
    assert report.get("skull_stripped").status == "pass"
    assert report.get("brain_mask").status == "pass"


def test_brain_mask_problems(tmp_path: Path) -> None:
    data, affine, brain = head()
    t1 = save(data, affine, tmp_path / "t1.nii.gz")
    other = save(brain, make_affine(zooms=(2.0, 2.0, 2.5)), tmp_path / "other.nii.gz")
    report = _run(t1, mask=other, names=("brain_mask",))
    assert _status(report)["brain_mask"] == "fail" and "another grid" in report.get(
        "brain_mask").found
    empty = _run(t1, mask=save(np.zeros_like(brain), affine, tmp_path / "empty.nii.gz"),
                 names=("brain_mask",))
    assert _status(empty)["brain_mask"] == "fail" and "empty" in empty.get("brain_mask").found
    small = np.zeros_like(brain)
    small[40:50, 50:60, 40:50] = True  # 8 ml
    report = _run(t1, mask=save(small, affine, tmp_path / "small.nii.gz"), names=("brain_mask",))
    assert _status(report)["brain_mask"] == "fail" and "not a brain volume" in report.get(
        "brain_mask").found
    pieces = brain.copy()
    pieces[:, 50:54, :] = False  # cut into a front and a back piece
    report = _run(t1, mask=save(pieces, affine, tmp_path / "pieces.nii.gz"), names=("brain_mask",))
    assert _status(report)["brain_mask"] == "warn" and "pieces" in report.get("brain_mask").found


def test_anatomy_warns_when_the_header_axes_do_not_match_the_brain(tmp_path: Path) -> None:
    data, affine, _ = head()
    ok = _run(save(data, affine, tmp_path / "ok.nii.gz"), names=("anatomy",))
    assert _status(ok)["anatomy"] == "pass"
    # the same array stored with its y and z axes swapped but the header left unchanged: the
    # brain's long, asymmetric A-P axis now lies along the header's S-I axis
    swapped = np.ascontiguousarray(data.transpose(0, 2, 1))
    report = _run(save(swapped, affine, tmp_path / "swapped.nii.gz"), names=("anatomy",))
    assert _status(report)["anatomy"] == "warn"
    assert "orientation may be wrong" in report.get("anatomy").hint


@pytest.mark.parametrize("name, status", [("ch2bet.nii.gz", "pass"),
                                          ("brainmask.mgz", "pass"),
                                          ("vxm_test_vol.nii.gz", "warn")])
def test_anatomy_on_real_scans(name: str, status: str) -> None:
    # vxm_test_vol stores a FreeSurfer-conformed (LIA) brain under an identity (RAS) affine
    assert _run(sample(name), names=("anatomy",)).get("anatomy").status == status


def test_field_of_view_equal_to_the_crop_is_not_larger(tmp_path: Path, monkeypatch) -> None:
    """Issue 16: a brain shown as 127x160x128 mm was "larger than the crop along y, z" (its
    unrounded extent was 160.4 x 128.3 mm). Compared as shown, it fits the 160x160x128 crop."""
    import brainbag.image.checks as checks

    monkeypatch.setattr(checks, "brain_extent_mm",
                        lambda mask, affine, box=None: (127.2, 160.4, 128.3))
    monkeypatch.setattr(checks, "border_contact", lambda mask, affine, box=None: {})
    path = _scan(tmp_path, "in.nii.gz")
    for mode in ("sliding", "full"):
        result = _run(path, mode=mode, names=("field_of_view",)).get("field_of_view")
        assert result.status == "pass", (mode, result.found)
        assert result.found == "brain 127x160x128 mm, within one crop"
    monkeypatch.setattr(checks, "brain_extent_mm",
                        lambda mask, affine, box=None: (127.2, 161.0, 128.3))
    result = _run(path, mode="full", names=("field_of_view",)).get("field_of_view")
    assert result.status == "warn" and "larger than the crop along y" in result.found


def test_field_of_view(tmp_path: Path) -> None:
    inside = _run(_scan(tmp_path, "in.nii.gz"), names=("field_of_view",))
    assert _status(inside)["field_of_view"] == "pass"
    assert "larger than the crop along y: sliding windows cover it" in inside.get(
        "field_of_view").found
    full = _run(tmp_path / "in.nii.gz", mode="full", names=("field_of_view",))
    assert _status(full)["field_of_view"] == "warn" and "--mode sliding" in full.get(
        "field_of_view").hint
    data, affine, _ = head()
    cut = data.copy()
    cut[:, :, 75:] = 0  # top of the brain outside the field of view
    cut[:, :, 74] = np.where(data[:, :, 74] > 0, data[:, :, 74], 0)
    report = _run(save(cut[:, :, :75], affine, tmp_path / "cut.nii.gz"), names=("field_of_view",))
    assert _status(report)["field_of_view"] == "warn"
    assert "superior" in report.get("field_of_view").found


def test_bias_field_warns(tmp_path: Path) -> None:
    flat = _run(_scan(tmp_path, "flat.nii.gz"))
    assert _status(flat)["bias_field"] == "pass"
    assert flat.get("bias_field").values["field_range"] < 0.05
    biased = _scan(tmp_path, "biased.nii.gz", bias=world_bias(0.5))
    report = _run(biased, names=("bias_field",))
    result = report.get("bias_field")
    assert result.status == "warn" and "pass --n4" not in result.hint  # nothing says N4 helps
    assert 0.3 < result.values["field_range"] < 0.7  # true p5-p95 variation of the field: 0.47
    # with n4 the check runs N4 and judges what is left (tested end to end in test_fixes.py)


def test_bias_field_on_the_same_real_scan_before_and_after_n4() -> None:
    # IXI296: the native scan was N4-corrected; the 2 mm copy is the raw scan (skull on, mask)
    corrected = _run(ixi("native/IXI296-HH-1970_T1w.nii.gz"), names=("bias_field",))
    raw = _run(ixi("2mm/IXI296-HH-1970_T1w.nii.gz"), names=("bias_field",),
               mask=ixi("2mm/IXI296-HH-1970_mask.nii.gz"))
    corrected, raw = corrected.get("bias_field"), raw.get("bias_field")
    assert corrected.status == "pass" and corrected.values["field_range"] < 0.05
    assert raw.status == "warn" and raw.values["field_range"] > 0.25


def test_check_finds_the_images_of_folders_and_files(tmp_path: Path) -> None:
    from brainbag.run.discover import discover_checks

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for name in ("a/x.nii.gz", "a/b/y.mgz", "a/b/z.nii", "a/notes.txt", ".hidden/h.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    found = discover_checks([tmp_path / "a", tmp_path / "single.nii.gz"]).items
    rel = [os.path.relpath(i.path, tmp_path) for i in found]
    assert rel == ["a/b/y.mgz", "a/b/z.nii", "a/x.nii.gz", "single.nii.gz"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="holds no .nii"):
        discover_checks([tmp_path / "empty"])


@pytest.mark.parametrize(
    "zooms, status, needle",
    [((1.0, 1.0, 1.0), "pass", "smoothed and resampled to 2 mm"), ((2.0, 2.0, 2.0), "pass",
     "2x2x2 mm"), ((2.5, 2.5, 2.5), "warn", "resampled to 2 mm"),
     ((0.9, 0.9, 1.2), "pass", "resampled to 2 mm")],
)
def test_voxel_size_is_judged_for_the_weights_voxel_size(tmp_path: Path, zooms, status: str,
                                                         needle: str) -> None:
    """Weights at 2 mm (the shipped ones): finer scans are smoothed and resampled as in
    training, not "resampled to 1 mm"; only refining coarser voxels warns."""
    rng = np.random.default_rng(0)
    path = save(rng.uniform(1, 100, (24, 24, 24)), make_affine(zooms=zooms), tmp_path / "v.nii")
    result = _run(path, voxel_mm=2.0, names=("voxel_size",)).get("voxel_size")
    assert result.status == status and needle in result.found, result.found
    assert "2 mm isotropic (the weights' voxel size" in result.expected


def test_field_of_view_against_the_weights_brain_view(tmp_path: Path, monkeypatch) -> None:
    """Weights with a brain view (80x96x80 voxels at 2 mm = 160x192x160 mm) see the whole
    brain at once: no "crop" or "--mode sliding" advice, which would be wrong for them."""
    import brainbag.image.checks as checks

    monkeypatch.setattr(checks, "border_contact", lambda mask, affine, box=None: {})
    path = _scan(tmp_path, "in.nii.gz")
    view = {"voxel_mm": 2.0, "view_xyz": (80, 96, 80), "names": ("field_of_view",)}
    monkeypatch.setattr(checks, "brain_extent_mm",
                        lambda mask, affine, box=None: (140.0, 180.2, 150.0))
    inside = _run(path, **view).get("field_of_view")
    assert inside.status == "pass"
    assert inside.found == "brain 140x180x150 mm, within the weights' 160x192x160 mm view"
    monkeypatch.setattr(checks, "brain_extent_mm",
                        lambda mask, affine, box=None: (140.0, 200.0, 150.0))
    larger = _run(path, **view).get("field_of_view")
    assert larger.status == "warn" and "larger than the weights' 160x192x160 mm view along y" \
        in larger.found and "check the mask" in larger.hint
