"""Pictures for quick review: one PNG per input and an ``index.html`` for the output folder.

The PNG shows three orthogonal slices through the centre of the brain (sagittal, coronal, axial)
of the *input* image, with the local age map drawn on top and, when brainbag made the brain mask
by skull stripping, the mask's outline, so that a reviewer sees a bad mask at a glance. Slices
are taken from the input reoriented to closest RAS+ by axis permutation and flips only (no
interpolation of the input), and the map is resampled onto exactly those slice voxels with the
map's own index transform, so every coloured pixel sits on the input voxel it describes. Panels
are drawn in millimetres (anisotropic voxels keep their true aspect), in neurological convention
(the subject's left on the left in coronal and axial views), with the anatomical directions
written at the edges.

matplotlib is imported only inside :func:`save_overlay_png`, through its object-oriented API and
the Agg canvas (no pyplot, no display, safe in worker threads).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brainbag.files import write_text_atomic
from brainbag.image.io import (
    LoadedImage,
    bounding_box,
    ras_transform,
    reorient,
    resample_masked,
    voxel_sizes,
)
from brainbag.run.discover import OutputLocation
from brainbag.run.outputs import warning_list

FIGSIZE_IN = (12.0, 4.6)
DPI = 100
MAX_PNG_NOTES = 4  # warnings drawn on a PNG; the rest are counted
OUTLINE_COLOUR = "#00e5ff"  # the brain mask's outline (cyan: apart from the turbo age colours)
#: Pixel size (width, height) of every PNG brainbag writes.
PNG_SIZE = (round(FIGSIZE_IN[0] * DPI), round(FIGSIZE_IN[1] * DPI))
VIEWS = (
    # name, fixed RAS axis, (horizontal, vertical) axes, edge letters (left, right, bottom, top)
    ("sagittal", 0, (1, 2), ("P", "A", "I", "S")),
    ("coronal", 1, (0, 2), ("L", "R", "I", "S")),
    ("axial", 2, (0, 1), ("L", "R", "P", "A")),
)


@dataclass
class SliceView:
    """One panel: an input slice and the map on the same pixels.

    ``image[u, v]`` and ``overlay[u, v]`` are indexed (horizontal, vertical), both increasing
    toward the second and fourth ``letters``; ``extent`` is (left, right, bottom, top) in mm
    (the panel shows the brain's bounding box plus a margin).
    ``to_input`` maps ``(u, v)`` (as ``[u, v, 0, 1]``) to indices of the input file's array.
    """

    name: str
    image: np.ndarray
    overlay: np.ndarray
    extent: tuple[float, float, float, float]
    letters: tuple[str, str, str, str]
    to_input: np.ndarray
    outline: np.ndarray | None = None  # the brain mask on the same pixels, to draw its outline


def overlay_views(
    loaded: LoadedImage,
    brain: np.ndarray,
    values: np.ndarray,
    map_to_input: np.ndarray,
    outline: bool = False,
) -> list[SliceView]:
    """Sagittal, coronal and axial slices through the brain's centre with the map on them.

    ``brain`` is the brain mask on the input grid, ``values`` the map (NaN outside the brain) and
    ``map_to_input`` the index transform from map voxels to input voxels. ``outline``: each view
    also carries the mask's slice, for :func:`save_overlay_png` to draw its outline.
    """
    ornt, ras_to_input = ras_transform(loaded.image.affine, loaded.shape)
    data = reorient(loaded.image.data, ornt)
    mask = reorient(np.asarray(brain, dtype=bool), ornt)
    zooms = voxel_sizes(loaded.image.affine @ ras_to_input)
    centre = slice_indices(mask, zooms)
    # every panel shows the brain's bounding box plus a margin, not the whole field of view
    box = bounding_box(mask)
    if box is not None:
        margin = np.ceil(6.0 / np.array(zooms)).astype(int)
        lo = np.maximum(box[0] - margin, 0)
        hi = np.minimum(box[1] + margin, data.shape)
    else:
        lo, hi = np.zeros(3, int), np.array(data.shape)
    input_to_map = np.linalg.inv(map_to_input)
    views: list[SliceView] = []
    for name, axis, (u, v), letters in VIEWS:
        index = [slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True)]
        index[axis] = slice(int(centre[axis]), int(centre[axis]) + 1)
        slab_shape = tuple(s.stop - s.start for s in index)
        slab_to_ras = np.eye(4)
        slab_to_ras[:3, 3] = [s.start for s in index]
        slab_to_input = ras_to_input @ slab_to_ras
        overlay = resample_masked(values, input_to_map @ slab_to_input,
                                  slab_shape, mask[tuple(index)])  # type: ignore[arg-type]
        plane = np.eye(4)[:, [u, v, 3]]  # (u, v, 1) -> slab index with the fixed axis at 0
        to_input = slab_to_input @ np.insert(plane, 2, 0.0, axis=1)
        u0, v0 = index[u].start, index[v].start
        views.append(SliceView(
            name=name,
            image=np.squeeze(data[tuple(index)], axis=axis),
            overlay=np.squeeze(overlay, axis=axis),
            extent=(u0 * zooms[u], (u0 + slab_shape[u]) * zooms[u],
                    v0 * zooms[v], (v0 + slab_shape[v]) * zooms[v]),
            letters=letters,
            to_input=to_input,
            outline=np.squeeze(mask[tuple(index)], axis=axis) if outline else None,
        ))
    return views


def slice_indices(mask: np.ndarray, zooms: tuple[float, float, float],
                  search_mm: float = 20.0) -> np.ndarray:
    """Slices through the brain's centre of mass; the sagittal one moved to the slice with the
    most brain voxels within ``search_mm`` of the centre, away from the sparse midline."""
    if not mask.any():
        return (np.array(mask.shape) - 1) // 2
    centre = np.round(np.argwhere(mask).mean(axis=0)).astype(int)
    chosen = centre.copy()
    for axis in (0,):
        other = tuple(a for a in range(3) if a != axis)
        area = mask.sum(axis=other)
        reach = int(search_mm / zooms[axis])
        lo, hi = max(0, centre[axis] - reach), min(mask.shape[axis], centre[axis] + reach + 1)
        chosen[axis] = lo + int(np.argmax(area[lo:hi]))
    return chosen


def save_overlay_png(
    path: Path,
    views: list[SliceView],
    title: str,
    subtitle: str,
    value_range: tuple[float, float],
    warning: str | None = None,
    label: str = "local predicted age (years)",
    notes: Sequence[str] = (),
    outline_label: str | None = None,
) -> None:
    """Draw the three panels with the map overlaid and write a ``PNG_SIZE`` PNG to ``path``
    (see :func:`overlay_figure`)."""
    fig = overlay_figure(views, title, subtitle, value_range, warning, label, notes,
                         outline_label)
    with open(Path(path), "wb") as fh:
        fig.savefig(fh, format="png", dpi=DPI, facecolor="black")


#: warnings on a PNG: font size (points), characters per line before wrapping, and the height of
#: one line as a fraction of the figure; the panels shrink to leave the lines their own band
NOTE_FONT = 8.5
NOTE_CHARS = 150
NOTE_LINE = 0.042
PANELS_TOP = 0.80


def note_lines(notes: Sequence[str]) -> list[str]:
    """The warning lines drawn on a PNG: up to ``MAX_PNG_NOTES`` warnings shortened by
    :func:`short_warning`, each wrapped to ``NOTE_CHARS`` characters, and a count of the rest."""
    import textwrap

    shown = [f"warning: {short_warning(n)}" for n in notes[:MAX_PNG_NOTES]]
    if len(notes) > MAX_PNG_NOTES:
        shown.append(f"and {len(notes) - MAX_PNG_NOTES} more warnings: see prediction.json")
    return [line for note in shown
            for line in textwrap.wrap(note, NOTE_CHARS, subsequent_indent="    ")]


def overlay_figure(
    views: list[SliceView],
    title: str,
    subtitle: str,
    value_range: tuple[float, float],
    warning: str | None = None,
    label: str = "local predicted age (years)",
    notes: Sequence[str] = (),
    outline_label: str | None = None,
) -> Any:
    """The review figure (a matplotlib ``Figure`` on an Agg canvas, ``PNG_SIZE`` pixels).

    ``warning`` is drawn in red under the title (untrained weights); ``notes`` (the input's check
    and other warnings, shortened by :func:`short_warning` and wrapped) in yellow in a band at
    the bottom, below the panels, which shrink to leave it free. Views with an ``outline`` get
    the brain mask's outline in :data:`OUTLINE_COLOUR`, named by ``outline_label`` above the
    panels, on the right.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE_IN, dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    lines = note_lines(notes)
    bottom = 0.02 + (len(lines) * NOTE_LINE + 0.01 if lines else 0.0)
    height = PANELS_TOP - bottom
    image_values = np.concatenate([view.image[view.image > 0].ravel() for view in views])
    lo, hi = (np.percentile(image_values, [1, 99.5]) if image_values.size
              else (0.0, 1.0))
    shown = None
    for i, view in enumerate(views):
        ax = fig.add_axes((0.01 + i * 0.305, bottom, 0.29, height))
        ax.set_facecolor("black")
        ax.imshow(view.image.T, cmap="gray", origin="lower", extent=view.extent,
                  vmin=float(lo), vmax=float(hi), interpolation="nearest")
        shown = ax.imshow(np.ma.masked_invalid(view.overlay.T), cmap="turbo", alpha=0.55,
                          origin="lower", extent=view.extent, vmin=value_range[0],
                          vmax=value_range[1], interpolation="nearest")
        if view.outline is not None and view.outline.any() and not view.outline.all():
            # origin and extent as imshow's: the line runs between brain and non-brain pixels
            ax.contour(view.outline.T.astype(np.float32), levels=[0.5], colors=OUTLINE_COLOUR,
                       linewidths=1.0, origin="lower", extent=view.extent)
        ax.set_aspect("equal")
        ax.set_axis_off()
        x0, x1, y0, y1 = view.extent
        xm, ym = (x0 + x1) / 2, (y0 + y1) / 2
        left, right, low, top = view.letters
        for x, y, letter, ha, va in ((x0, ym, left, "left", "center"),
                                     (x1, ym, right, "right", "center"),
                                     (xm, y0, low, "center", "bottom"),
                                     (xm, y1, top, "center", "top")):
            ax.text(x, y, letter, ha=ha, va=va, color="white", fontsize=11, fontweight="bold")
        ax.text(0.0, 1.0, view.name, ha="left", va="top", color="0.7", fontsize=9,
                transform=ax.transAxes)
    if shown is not None:
        cax = fig.add_axes((0.93, bottom + 0.06 * height / 0.78, 0.015, height * 0.68 / 0.78))
        bar = fig.colorbar(shown, cax=cax)
        bar.set_label(label, color="white")
        bar.ax.tick_params(colors="white")
    fig.text(0.5, 0.955, title, ha="center", va="center", color="white", fontsize=14,
             fontweight="bold")
    fig.text(0.5, 0.895, subtitle, ha="center", va="center", color="0.75", fontsize=9)
    if warning:
        fig.text(0.5, 0.85, warning, ha="center", va="center", color="#ff4d4d", fontsize=10,
                 fontweight="bold")
    for i, line in enumerate(reversed(lines)):
        fig.text(0.012, 0.015 + i * NOTE_LINE, line, ha="left", va="bottom", color="#ffcc66",
                 fontsize=NOTE_FONT, gid="note",
                 bbox={"facecolor": "black", "alpha": 0.7, "edgecolor": "none", "pad": 1.5})
    if outline_label and any(view.outline is not None for view in views):
        fig.text(0.92, 0.815, outline_label, ha="right", va="bottom", color=OUTLINE_COLOUR,
                 fontsize=8.5)
    return fig


def _signed(value: Any) -> str:
    return f"{number(value, 1, sign=True)} y"


def reading_text(row: dict[str, Any]) -> tuple[str, str]:
    """The prediction as a person's numbers (age with its interval, sex call, gap) and the
    gap line, from a record or a predictions.tsv row (values may be strings)."""
    parts = []
    if _present(row.get("age")):
        age = f"age {number(row.get('age'), 1)} y"
        if _present(row.get("age_interval_low")):
            age += (f" (90% interval {number(row.get('age_interval_low'), 0)}-"
                    f"{number(row.get('age_interval_high'), 0)})")
        parts.append(age)
    if _present(row.get("p_female")):
        call = row.get("sex_call") or "-"
        parts.append(f"sex {call} (P(female) {number(row.get('p_female'), 2)})")
    gap = ""
    if _present(row.get("chronological_age")):
        gap = f"chronological age {number(row.get('chronological_age'), 1)} y"
        if _present(row.get("brain_age_gap")):
            gap += f" · gap {_signed(row.get('brain_age_gap'))}"
        if _present(row.get("brain_age_gap_corrected")):
            gap += f" (bias-corrected {_signed(row.get('brain_age_gap_corrected'))})"
    if _present(row.get("recorded_sex")):
        gap += (" · " if gap else "") + f"recorded sex {row.get('recorded_sex')}"
        if _present(row.get("sex_note")):
            gap += f" (model calls {row.get('sex_call')})"
    return "   ·   ".join(parts), gap


def calibration_label(value: Any) -> str:
    """Which calibration the numbers were read with, for a picture or a page: "weights' own
    calibration", "site calibration <file name>", or "" (none). ``value`` is a record's
    ``calibration`` (a dict) or a predictions.tsv cell (its source)."""
    source = value.get("source") if isinstance(value, dict) else value
    if not source:
        return ""
    source = str(source)
    if source == "weights":
        return "weights' own calibration"
    return "site calibration " + (source.split(":", 1)[1] if ":" in source else source)


def _present(value: Any) -> bool:
    return value is not None and value != ""


def short_warning(text: str, limit: int = 120) -> str:
    """A warning cut to fit one line of a PNG: a check's "name: found" (without its expected
    value and fix), else the text, at most ``limit`` characters."""
    text = text.split("; expected ", 1)[0]
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def png_title(record: dict[str, Any]) -> tuple[str, str]:
    """Title (ids, age with interval, sex call, gap) and subtitle (model and what it is worth,
    mode, file) of one input's PNG."""
    ids = " ".join(str(x) for x in (record.get("subject"), record.get("session")) if x)
    numbers, gap = reading_text(record)
    title = "   ·   ".join(x for x in (ids, numbers) if x)
    weights = record.get("weights") or {}
    model = (record.get("reading") or {}).get("model") or {}
    worth = []
    if model.get("age_mae_years") is not None:
        worth.append(f"age MAE {model['age_mae_years']:.1f} y")
    if model.get("sex_accuracy") is not None:
        worth.append(f"sex {model['sex_accuracy']:.0%} correct")
    subtitle = (f"RF {record.get('rf')} · weights {weights.get('id')}"
                + (f" (cross-validated: {', '.join(worth)})" if worth else "")
                + f" · {record.get('mode')} · "
                f"{Path(str((record.get('input') or {}).get('path'))).name}")
    calibration = calibration_label(record.get("calibration"))
    if gap:
        subtitle = gap + (f" · {calibration}" if calibration else "") + "\n" + subtitle
    elif calibration:
        subtitle += f" · {calibration}"
    return title, subtitle


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #111; color: #ddd; margin: 1.5em; }}
h1 {{ font-size: 1.3em; }} a {{ color: #9cf; }}
.grid {{ display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr));
         gap: 1em; }}
figure {{ margin: 0; background: #000; padding: .5em; }} img {{ width: 100%; }}
figcaption {{ font-size: .9em; padding-top: .3em; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
td, th {{ border: 1px solid #444; padding: .2em .5em; text-align: left; }}
.failed {{ color: #ff6b6b; }} .warn {{ color: #ffcc66; }}
</style></head><body>
<h1>{title}</h1>
<p>{counts} · table: <a href="predictions.tsv">predictions.tsv</a></p>
{failures}
<div class="grid">
{cards}
</div>
</body></html>
"""


def write_index(out: Path, rows: list[dict[str, Any]], title: str = "brainbag predictions"
                ) -> Path:
    """Write ``out/index.html``: every input's PNG with its numbers, failures listed first."""
    e = html.escape
    ok = [r for r in rows if r.get("status") == "ok"]
    failed = [r for r in rows if r.get("status") == "failed"]
    skipped = [r for r in rows if r.get("status") in ("skipped", "missing")]
    cards = []
    for row in ok:
        ids = " ".join(x for x in (row.get("subject"), row.get("session")) if x)
        numbers, gap = reading_text(row)
        numbers = " · ".join(x for x in (numbers, gap, calibration_label(row.get("calibration")))
                             if x)
        warnings = warning_list(row.get("warnings"))
        warn = ("<br><span class='failed'>UNTRAINED weights: the numbers mean nothing</span>"
                if any("UNTRAINED" in w for w in warnings) else "")
        checks = [w for w in warnings if "UNTRAINED" not in w]
        if checks:
            warn += "<ul class='warn'>" + "".join(
                f"<li>warning: {e(w)}</li>" for w in checks) + "</ul>"
        picture = "<p>(no picture)</p>"
        if row.get("output"):
            png = OutputLocation.from_prediction(str(row["output"])).relative("png")
            if (out / png).exists():
                picture = (f"<a href='{e(png.as_posix())}'><img loading='lazy' "
                           f"src='{e(png.as_posix())}' alt='{e(ids)}'></a>")
        cards.append(f"<figure>{picture}<figcaption><b>{e(ids)}</b> · {e(numbers)} · RF "
                     f"{e(str(row.get('rf')))} · {e(str(row.get('weights_id')))}{warn}"
                     "</figcaption></figure>")
    failures = ""
    if failed or skipped:
        lines = "".join(
            f"<tr><td class='failed'>{e(str(r.get('status')))}</td><td>{e(str(r.get('path')))}"
            f"</td><td>{e(str(r.get('error')))}</td></tr>" for r in failed + skipped)
        failures = f"<table><tr><th>status</th><th>input</th><th>reason</th></tr>{lines}</table>"
    counts = f"{len(ok)} ok, {len(failed)} failed" + (f", {len(skipped)} skipped or missing"
                                                      if skipped else "")
    page = _PAGE.format(title=e(title), counts=e(counts), failures=failures,
                        cards="\n".join(cards))
    path = Path(out) / "index.html"
    write_text_atomic(path, page)
    return path


def number(value: Any, digits: int, sign: bool = False) -> str:
    """``value`` (a number or a table cell's text) with ``digits`` decimals, signed with
    ``sign``; "-" when it is not a number."""
    try:
        return f"{float(value):{'+' if sign else ''}.{digits}f}"
    except (TypeError, ValueError):
        return "-"
