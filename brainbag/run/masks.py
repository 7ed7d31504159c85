"""Masks that lie beside their scans in a folder: found by name, or a ``--mask-pattern`` suggested.

A folder of ``X_T1w.nii.gz`` with ``X_mask.nii.gz`` (or ``X_brain_mask``, ``X_desc-brain_mask``)
beside it is paired by name: ``X`` is the scan's ``{prefix}`` (its file name without image suffix
and ``_T1w``, or its BIDS prefix), the same rule ``--mask-pattern '{prefix}_mask.nii.gz'`` uses.
The masks are then no inputs of their own. Files that look like masks (``mask`` in the name) but
pair with no scan stay inputs, and :func:`suggest_pattern` finds the ``--mask-pattern`` that
would pair them. Plain functions of paths: :mod:`brainbag.run.discover` applies them.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

from brainbag.image.io import strip_image_suffix

#: what may follow a scan's {prefix} in the name of its mask, in the order tried
MASK_NAMES = ("_mask", "_brain_mask", "_desc-brain_mask")
MASK_SUFFIXES = (".nii.gz", ".nii", ".mgz")
_MASK_WORD = re.compile(r"mask", re.IGNORECASE)


def looks_like_mask(path: Path) -> bool:
    """A file whose name says it is a mask (``mask`` in it, any case)."""
    return bool(_MASK_WORD.search(strip_image_suffix(Path(path).name)))


def mask_beside(image: Path, prefix: str) -> Path | None:
    """The mask named ``{prefix}_mask`` (or ``_brain_mask``, ``_desc-brain_mask``; ``.nii.gz``,
    ``.nii`` or ``.mgz``) in ``image``'s folder, if one exists."""
    if not prefix:
        return None
    for name in MASK_NAMES:
        for suffix in MASK_SUFFIXES:
            candidate = Path(image).parent / f"{prefix}{name}{suffix}"
            if candidate.is_file() and candidate != Path(image):
                return candidate
    return None


def suggest_pattern(scans: Iterable[tuple[Path, dict[str, str]]], masks: Sequence[Path]
                    ) -> tuple[str, int] | None:
    """The ``--mask-pattern`` that pairs the most of ``masks`` with ``scans`` and how many.

    ``scans``: each scan's path and its template fields (``prefix``, ``stem``, ...). A template
    is a mask's file name with a scan's field written as ``{field}``, for scans in the mask's
    folder whose field occurs in the mask's name; the one that fits the most masks wins
    (``{prefix}`` before ``{stem}`` on a tie). None when no mask names a scan.
    """
    votes: Counter[str] = Counter()
    order = {"prefix": 0, "stem": 1}
    by_folder: dict[Path, list[dict[str, str]]] = {}
    for path, fields in scans:
        by_folder.setdefault(Path(path).parent, []).append(fields)
    for mask in masks:
        fits = set()
        for fields in by_folder.get(Path(mask).parent, []):
            for field in order:
                value = fields.get(field) or ""
                if len(value) >= 2 and value in mask.name:
                    fits.add(mask.name.replace(value, "{" + field + "}", 1))
        votes.update(fits)
    if not votes:
        return None
    best = max(votes.items(), key=lambda kv: (kv[1], -min(
        order[f] for f in order if "{" + f + "}" in kv[0])))
    return best[0], best[1]


def pairing_note(pairs: Sequence[tuple[Path, Path]]) -> str:
    """One line saying which masks were paired with which scans."""
    image, mask = pairs[0]
    return (f"paired {len(pairs)} scan(s) with the mask beside each, by name (e.g. {image.name} "
            f"+ {mask.name}); the masks are not taken for scans (--mask-pattern chooses "
            "other masks)")


def unpaired_note(masks: Sequence[Path], suggestion: tuple[str, int] | None) -> str:
    """One line about files that look like masks but pair with no scan."""
    text = (f"{len(masks)} file(s) look like masks (e.g. {masks[0].name}) but pair with no scan "
            "by name, so they are treated as scans")
    if suggestion is not None:
        return text + (f": --mask-pattern '{suggestion[0]}' would pair {suggestion[1]} of "
                       f"them")
    return text + ": if they are masks, name them <scan>_mask.nii.gz or pass --mask-pattern"
