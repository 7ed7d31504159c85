"""The review pictures: the map drawn on the input lands on the voxels it describes.

The geometry oracle is the one of test_geometry: the input is a linear function of world position
inside a ball and the probe model outputs, at each map voxel, the whitened input at the voxel it is
centred on. So wherever the drawn map is interpolated from brain cells only, it must equal the
whitened input at that pixel's own world position, and the panel's pixel axes must point in the
anatomical directions written at their edges.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import linear_field, make_affine, save
from test_geometry import RADIUS, _probe_weights, _scan

from brainbag.image.io import load_image
from brainbag.network.inference import InferenceSettings
from brainbag.run.predict import Predictor, PredictSettings
from brainbag.run.report import PNG_SIZE, overlay_views, write_index

DIRECTIONS = {"R": (1, 0, 0), "L": (-1, 0, 0), "A": (0, 1, 0), "P": (0, -1, 0),
              "S": (0, 0, 1), "I": (0, 0, -1)}


def _predict(tmp_path: Path, path: Path, png: bool = True) -> dict:
    settings = PredictSettings(
        out=tmp_path / "out", png=png, force=True,  # a ball, not a brain: the checks refuse it
        inference=InferenceSettings(mode="full", device="cpu"),
    )
    return Predictor(settings, weights=_probe_weights("same")).predict(path)


@pytest.mark.parametrize("case", ["LAS-1mm", "PIR-permuted", "oblique-anisotropic"])
def test_overlay_lands_on_the_input_voxels_it_describes(tmp_path: Path, case: str) -> None:
    path, centre = _scan(tmp_path, case)
    record = _predict(tmp_path, path, png=False)
    loaded = load_image(path)
    age = nib.load(tmp_path / "out" / record["subject"] / "age_map.nii.gz")
    # the map's placement comes from the written file's affine, as a viewer would read it
    map_to_input = np.linalg.inv(loaded.image.affine) @ age.affine
    views = overlay_views(loaded, loaded.image.data > 0, np.asarray(age.dataobj), map_to_input)
    mean, std = record["whitening"]["mean"], record["whitening"]["std"]
    inner = RADIUS - 8 * np.sqrt(3) - 2.0  # every map cell used by the interpolation is inside

    assert [v.name for v in views] == ["sagittal", "coronal", "axial"]
    for view in views:
        nu, nv = view.image.shape
        uv = np.stack(np.meshgrid(np.arange(nu), np.arange(nv), indexing="ij")).reshape(2, -1)
        homog = np.vstack([uv, np.zeros(uv.shape[1]), np.ones(uv.shape[1])])
        ijk = view.to_input @ homog
        # the background is the input itself: exact voxels, no interpolation
        assert np.allclose(ijk[:3], np.round(ijk[:3]))
        idx = tuple(np.round(ijk[:3]).astype(int))
        np.testing.assert_array_equal(view.image.ravel(), loaded.image.data[idx])
        xyz = (loaded.image.affine @ ijk)[:3]
        # pixel axes point where the letters say (to within the obliquity of the scan)
        for axis, letter in ((0, view.letters[1]), (1, view.letters[3])):
            step = np.zeros(4)
            step[axis] = 1.0
            direction = (loaded.image.affine @ view.to_input @ step)[:3]
            cosine = direction @ DIRECTIONS[letter] / np.linalg.norm(direction)
            assert cosine > 0.8, (view.name, letter, direction)
        # the drawn map = the whitened input at each pixel's own world position
        inside = np.linalg.norm(xyz - centre[:, None], axis=0) < inner
        assert inside.sum() > 50, view.name
        overlay = view.overlay.ravel()[inside]
        expected = (linear_field(xyz[:, inside]) - mean) / std
        np.testing.assert_allclose(overlay, expected, atol=2e-3, err_msg=view.name)
        # outside the brain nothing is drawn
        assert np.isnan(view.overlay.ravel()[view.image.ravel() == 0]).all()
        # panels are drawn in mm: the extent is the slice's physical size
        zu, zv = (np.linalg.norm((loaded.image.affine @ view.to_input)[:3, a]) for a in (0, 1))
        x0, x1, y0, y1 = view.extent
        np.testing.assert_allclose((x1 - x0, y1 - y0), (nu * zu, nv * zv), rtol=1e-6)


def test_png_is_a_real_image_of_the_documented_size(tmp_path: Path, tiny_weights) -> None:
    from matplotlib.image import imread

    path, _ = _scan(tmp_path, "oblique-anisotropic")
    settings = PredictSettings(out=tmp_path / "out", weights=str(tiny_weights()), png=True,
                               force=True, inference=InferenceSettings(mode="full"))
    record = Predictor(settings).predict(path)
    png = tmp_path / "out" / record["subject"] / "age_map.png"
    assert record["outputs"]["png"] == "age_map.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(png)
    assert pixels.shape[:2] == (PNG_SIZE[1], PNG_SIZE[0])
    rgb = pixels[..., :3]
    assert rgb.std() > 0.05  # not a blank canvas
    colourful = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 0.2  # the coloured map, not just grey
    assert colourful.mean() > 0.02
    saved = json.loads((tmp_path / "out" / record["subject"] / "prediction.json").read_text())
    assert saved["outputs"]["png"] == "age_map.png"


def test_index_html_shows_every_picture_with_its_numbers(tmp_path: Path) -> None:
    out = tmp_path
    (out / "a").mkdir()
    (out / "a" / "age_map.png").write_bytes(b"\x89PNG")
    (out / "sub-01" / "anat").mkdir(parents=True)
    (out / "sub-01" / "anat" / "sub-01_desc-age_map.png").write_bytes(b"\x89PNG")
    rows = [
        {"subject": "a", "session": "", "path": "/d/a.nii.gz", "status": "ok", "age": "61.25",
         "p_female": "0.3", "rf": "9", "weights_id": "w", "warnings": "", "output":
         "a/prediction.json"},
        {"subject": "sub-01", "session": "", "path": "/d/sub-01_T1w.nii.gz", "status": "ok",
         "age": "40", "p_female": "0.9", "rf": "9", "weights_id": "w",
         "warnings": "weights w are UNTRAINED", "output": "sub-01/anat/sub-01_prediction.json"},
        {"subject": "<b>", "session": "", "path": "/d/<b>.nii", "status": "failed",
         "error": "input /d/<b>.nii is not a NIfTI", "output": ""},
    ]
    page = write_index(out, rows).read_text()
    assert "src='a/age_map.png'" in page and "age 61.2" in page and "P(female) 0.30" in page
    assert "src='sub-01/anat/sub-01_desc-age_map.png'" in page and "UNTRAINED" in page
    assert "is not a NIfTI" in page and "<b>" not in page.replace("<b>a", "").replace(
        "<b>sub-01", "")  # user text is escaped
    assert "2 ok, 1 failed" in page


def test_png_of_an_mgz_with_a_mask_file(tmp_path: Path, tiny_weights) -> None:
    """A skull-on-like input with a separate mask: the overlay follows the mask, not voxels > 0."""
    shape = (40, 44, 36)
    data = np.full(shape, 30.0, np.float32)  # "skull": non-zero everywhere
    data[8:32, 8:36, 8:28] = np.random.default_rng(0).uniform(50, 150, (24, 28, 20))
    mask = np.zeros(shape, np.float32)
    mask[8:32, 8:36, 8:28] = 1
    affine = make_affine(flips=(-1, -1, 1))
    img = nib.MGHImage(data, affine)
    nib.save(img, str(tmp_path / "scan.mgz"))
    save(mask, affine, tmp_path / "scan_mask.nii.gz")
    loaded = load_image(tmp_path / "scan.mgz")
    settings = PredictSettings(out=tmp_path / "out", weights=str(tiny_weights()), png=True,
                               mask=tmp_path / "scan_mask.nii.gz", force=True,
                               inference=InferenceSettings(mode="full"))
    record = Predictor(settings).predict(tmp_path / "scan.mgz")
    assert (tmp_path / "out" / "scan" / "age_map.png").exists()
    age = nib.load(tmp_path / "out" / "scan" / "age_map.nii.gz")
    views = overlay_views(loaded, mask > 0, np.asarray(age.dataobj),
                          np.linalg.inv(loaded.image.affine) @ age.affine)
    for view in views:
        drawn = np.isfinite(view.overlay)
        assert drawn.any() and not drawn[view.image == 30.0].any()
    assert record["mask"]["sha256"] is not None


def test_matplotlib_is_imported_only_to_draw() -> None:
    import subprocess
    import sys

    code = ("import sys; import brainbag.cli, brainbag.run.predict, brainbag.run.report; "
            "print('matplotlib' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False"]


def test_a_sex_only_model_gets_a_picture_of_its_sex_map(tmp_path: Path, tiny_weights) -> None:
    path, _ = _scan(tmp_path, "LAS-1mm")
    settings = PredictSettings(out=tmp_path / "out", png=True, force=True,
                               weights=str(tiny_weights(heads=("sex",))),
                               inference=InferenceSettings(mode="full"))
    record = Predictor(settings).predict(path)
    assert record["age"] is None and record["outputs"]["png"] == "age_map.png"
    assert (tmp_path / "out" / record["subject"] / "age_map.png").stat().st_size > 1000


def test_check_warnings_reach_the_png_and_index_html(tmp_path: Path, tiny_weights,
                                                     monkeypatch) -> None:
    """Issue 16: check warnings reached the console, TSV and JSON, but not the PNG or
    index.html, where a reviewer looks."""
    import brainbag.run.report as report
    from brainbag.run.predict import run_predict

    path, _ = _scan(tmp_path, "oblique-anisotropic")  # a ball: --force turns failures to warnings
    drawn: dict[str, list[str]] = {}
    real = report.save_overlay_png

    def spy(path, *args, **kwargs):
        drawn[Path(path).name] = list(args[6] if len(args) > 6 else kwargs.get("notes", ()))
        real(path, *args, **kwargs)

    monkeypatch.setattr(report, "save_overlay_png", spy)
    out = tmp_path / "out"
    settings = PredictSettings(out=out, weights=str(tiny_weights()), png=True, force=True,
                               inference=InferenceSettings(mode="full"))
    record = run_predict([path, path.with_name("gone.nii.gz")], settings)[0]
    checks = [w for w in record["warnings"] if "UNTRAINED" not in w]
    assert checks and any(w.startswith("--force: predicting although check") for w in checks)
    assert drawn[next(iter(drawn))] == checks
    page = (out / "index.html").read_text()
    for warning in checks:
        assert f"<li>warning: {html.escape(warning)}</li>" in page


def test_warnings_on_the_png_are_drawn_and_shortened(tmp_path: Path) -> None:
    from matplotlib.image import imread

    from brainbag.run.report import SliceView, save_overlay_png, short_warning

    assert short_warning("bias_field: 30 % across the brain; expected < 20 %; use --n4") == \
        "bias_field: 30 % across the brain"
    assert len(short_warning("x" * 300)) == 120
    image = np.zeros((40, 40), np.float32)
    image[10:30, 10:30] = 1.0
    overlay = np.full((40, 40), np.nan, np.float32)
    overlay[15:25, 15:25] = 50.0
    views = [SliceView(n, image, overlay, (0, 40, 0, 40), ("R", "L", "P", "A"), np.eye(4))
             for n in ("axial", "coronal", "sagittal")]
    plain, noted = tmp_path / "plain.png", tmp_path / "noted.png"
    save_overlay_png(plain, views, "t", "s", (20.0, 80.0))
    save_overlay_png(noted, views, "t", "s", (20.0, 80.0),
                     notes=["bias_field: 30 % across the brain; expected < 20 %"] * 6)
    a, b = imread(plain)[..., :3], imread(noted)[..., :3]
    assert a.shape == b.shape == (PNG_SIZE[1], PNG_SIZE[0], 3)
    rows = np.nonzero(np.abs(a - b).max(axis=(1, 2)) > 0.1)[0]
    assert rows.size and rows.min() > 0.15 * a.shape[0]  # the title and subtitle stay put
    yellow = (b[..., 0] > 0.8) & (b[..., 1] > 0.6) & (b[..., 2] < 0.5)
    assert yellow.sum() > yellow.size * 0.002


@pytest.mark.parametrize("count", [1, 3, 6])
def test_warnings_on_the_png_never_overlap_the_slices(count: int) -> None:
    """Issue 23: with several warnings, their text was drawn over the sagittal slice. The
    panels now shrink to leave the warnings a band of their own, wrapped if long."""
    from brainbag.run.report import SliceView, note_lines, overlay_figure

    views = []
    for name, (w, h) in (("sagittal", (216, 180)), ("coronal", (180, 180)),
                         ("axial", (180, 216))):
        image = np.ones((w, h), np.float32)
        views.append(SliceView(name, image, np.full((w, h), 40.0, np.float32), (0, w, 0, h),
                               ("P", "A", "I", "S"), np.eye(4)))
    notes = [f"bias_field: intensity varies {40 + k} % across the brain, more than in the "
             "weights' training images, and this sentence is long enough to need wrapping "
             "when it is drawn in full on the picture" for k in range(count)]
    fig = overlay_figure(views, "title", "line one\nline two", (20.0, 80.0), "UNTRAINED", "age",
                         notes)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    drawn = [t for t in fig.texts if t.get_gid() == "note"]
    assert [t.get_text() for t in reversed(drawn)] == note_lines(notes)
    assert len(drawn) >= min(count, 4)
    panels = [ax.get_window_extent(renderer) for ax in fig.axes]
    assert len(panels) == 4  # three slices and the colour bar
    for text in drawn:
        box = text.get_bbox_patch().get_window_extent(renderer)
        assert 0 <= box.x0 and box.x1 <= PNG_SIZE[0], text.get_text()  # never cut at the edge
        for panel in panels:
            assert not box.overlaps(panel), (text.get_text(), box, panel)
