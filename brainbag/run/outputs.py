"""Writing results: maps as NIfTI, prediction.json and predictions.tsv, all atomically.

Every file is written through :mod:`brainbag.files`: to a temporary name in its destination folder,
then renamed into place, so a crash or kill leaves the previous file or the complete new one.

Maps hold NaN where the map cell (the ``stride``-sized cube of conformed voxels around a map voxel)
contains no brain-mask voxel: NaN is transparent in FSLeyes and ignored by nibabel-based tools
that use ``np.nanmean``. The global prediction is the mean over *all* map voxels before this
masking (that is what the network computes); ``prediction.json`` also records the mean over the
brain cells.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainbag.files import atomic_path, write_text_atomic
from brainbag.person.clinical import READING_COLUMNS

if TYPE_CHECKING:  # imported where used: the table and JSON writers need neither
    import nibabel as nib

TSV_COLUMNS = (
    "subject", "session", "path", "input_sha256", "status", "age", "p_female", *READING_COLUMNS,
    "calibration", "rf", "weights_id", "weights_sha256", "mode", "warnings", "error", "seconds",
    "output",
)


def save_nifti_atomic(img: nib.Nifti1Image, path: Path) -> None:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))


def brain_cells(
    mask: np.ndarray, stride: int, offset: float, map_shape: Sequence[int]
) -> np.ndarray:
    """Boolean map-grid array: True where the map voxel's cell holds any brain-mask voxel.

    The cell of map voxel ``i`` spans conformed voxels ``[stride*i + offset - stride/2,
    stride*i + offset + stride/2)`` along each axis.
    """
    import torch

    from brainbag.network.model import cell_weights

    t = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None]
    return cell_weights(t, stride, offset, list(map_shape))[0].numpy() > 0


def display_range(values: np.ndarray, kind: str,
                  age_range: Sequence[float] | None = None) -> tuple[float, float]:
    """Default display range (cal_min, cal_max) for a map: 0-1 for P(female); for ages the
    weights' training age range (the same colours mean the same age in every scan), else the
    map's own 2nd-98th percentiles."""
    if kind == "sex":
        return 0.0, 1.0
    if age_range is not None and len(age_range) == 2 and age_range[1] > age_range[0]:
        return float(np.floor(age_range[0])), float(np.ceil(age_range[1]))
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(finite, [2, 98])
    if hi - lo < 1e-3:
        lo, hi = lo - 1.0, hi + 1.0
    return float(np.floor(lo)), float(np.ceil(hi))


def tsv_row(record: dict[str, Any]) -> dict[str, str]:
    """One predictions.tsv row from a result record (missing fields are empty)."""
    row = {}
    for col in TSV_COLUMNS:
        value = record.get(col, "")
        if value is None:
            value = ""
        elif isinstance(value, float):
            value = f"{value:.4f}" if col != "seconds" else f"{value:.2f}"
        elif isinstance(value, list | tuple):
            value = " | ".join(str(v) for v in value)
        row[col] = str(value).replace("\t", " ").replace("\n", " ")
    return row


def warning_list(value: Any) -> list[str]:
    """A record's ``warnings``: the list itself, or a table cell's ``" | "``-joined text."""
    if isinstance(value, list | tuple):
        return [str(v) for v in value]
    return [w for w in str(value or "").split(" | ") if w]


def write_tsv_atomic(path: Path, records: Sequence[dict[str, Any]]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=TSV_COLUMNS, delimiter="\t", lineterminator="\n")
    writer.writeheader()
    for record in records:
        writer.writerow(tsv_row(record))
    write_text_atomic(path, buf.getvalue())
