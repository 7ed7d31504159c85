"""Which brain mask a scan gets: decided in one place for predict, check, train and evaluate.

:func:`choose_brain_mask` decides, in this order:

1. a mask file was given (``--mask``, ``--mask-pattern``, a list file's or a dataset's mask):
   it is used as it is (``"given"``);
2. else, when the scan is a head (the skull check's measure: its largest object is larger than
   :data:`~brainbag.image.checks.SKULL_OBJECT_LITRES`) or ``--strip always``, and not
   ``--strip never``: the scan is skull-stripped with deepbet (:mod:`brainbag.image.strip`) and
   the mask must pass :func:`~brainbag.image.strip.check_mask_plausible` (``"stripped"``);
3. else the scan is taken as skull-stripped: brain = voxels > 0 (``"nonzero"``).

A stripped mask is handed on exactly as a given one would be (conform masks the image with it).
:class:`MaskCache` keeps stripped masks in a folder, one file per image sha256, so that training,
evaluation and cross-validation strip each scan once. :func:`mask_image` makes the
``brain_mask.nii.gz`` a reviewer opens over the scan: uint8 on the input's grid, with the input's
own qform and sform.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from brainbag.errors import InputError, UsageError
from brainbag.files import atomic_path, write_json_atomic
from brainbag.image.checks import SKULL_OBJECT_LITRES
from brainbag.image.io import CORRUPT_FILE_ERRORS, LoadedImage, read_header
from brainbag.image.preprocess import load_mask
from brainbag.image.statistics import head_object_litres
from brainbag.image.strip import (
    DEEPBET_PIN,
    METHOD,
    THRESHOLD,
    StripResult,
    check_mask_plausible,
    strip_brain,
)

StripMode = Literal["auto", "always", "never"]
STRIP_MODES: tuple[str, ...] = ("auto", "always", "never")
MaskSource = Literal["given", "stripped", "nonzero"]
#: ``prediction.json``'s ``mask.source`` for each source
SOURCE_TEXT = {
    "given": "file",
    "stripped": "skull stripping (deepbet)",
    "nonzero": "voxels > 0 (input assumed skull-stripped)",
}


def check_strip_mode(mode: str) -> StripMode:
    """``mode`` if it is one of :data:`STRIP_MODES`, else a :class:`UsageError`."""
    if mode not in STRIP_MODES:
        raise UsageError(f"--strip must be one of {', '.join(STRIP_MODES)}, got {mode!r}")
    return mode  # type: ignore[return-value]


@dataclass(frozen=True)
class MaskNote:
    """What one scan's mask was, without the mask: for counting a dataset's sources."""

    source: MaskSource
    label: str  # "given", "deepbet 1.0.2" or "nonzero"
    cached: bool = False


@dataclass(frozen=True, eq=False)
class BrainMaskChoice:
    """The brain mask of one scan and where it came from."""

    source: MaskSource
    mask: np.ndarray | None  # bool, on the input grid; None for "nonzero" (conform: voxels > 0)
    path: Path | None = None  # the given mask file
    strip: StripResult | None = None  # what stripping made (source "stripped")
    head_litres: float | None = None  # the skull check's measure, when it was taken
    cached: bool = False  # the stripped mask came from a MaskCache

    @property
    def label(self) -> str:
        """``given``, ``deepbet 1.0.2`` or ``nonzero``: what the weights metadata records."""
        if self.strip is not None:
            return f"{self.strip.method} {self.strip.version or DEEPBET_PIN}"
        return self.source

    def note(self) -> MaskNote:
        """The source and label alone (the mask is left behind)."""
        return MaskNote(self.source, self.label, self.cached)


def skull_on(loaded: LoadedImage) -> tuple[bool, float]:
    """Whether the scan's largest object is a head rather than a brain (the skull check's
    measure and threshold), and that object's volume in litres."""
    litres = head_object_litres(loaded.image.data, loaded.zooms)
    return litres > SKULL_OBJECT_LITRES, litres


def choose_brain_mask(
    loaded: LoadedImage,
    mask_path: Path | None = None,
    mode: str = "auto",
    threads: int | None = None,
    device: str = "cpu",
    cache: MaskCache | None = None,
    head_litres: float | None = None,
) -> BrainMaskChoice:
    """The brain mask of ``loaded``: the given file, deepbet's (checked for plausibility: a
    one-line :class:`InputError` otherwise), or None for voxels > 0. See the module docstring.

    ``threads`` and ``device``: the run's budget for stripping. ``cache``: where stripped masks
    are kept between runs (none: strip every time). ``head_litres``: :func:`skull_on`'s measure
    when the caller has taken it.
    """
    mode = check_strip_mode(mode)
    if mask_path is not None:
        return BrainMaskChoice("given", load_mask(mask_path, loaded), path=Path(mask_path))
    if mode == "never":
        return BrainMaskChoice("nonzero", None)
    if head_litres is None:
        head, litres = skull_on(loaded)
    else:
        head, litres = head_litres > SKULL_OBJECT_LITRES, head_litres
    if not head and mode == "auto":
        return BrainMaskChoice("nonzero", None, head_litres=litres)
    result = cache.get(loaded) if cache is not None else None
    cached = result is not None
    if result is None:
        result = strip_brain(loaded, threads=threads, device=device)
    check_mask_plausible(result, loaded.zooms, loaded.path)
    if cache is not None and not cached:
        cache.put(loaded, result)
    return BrainMaskChoice("stripped", result.mask, strip=result, head_litres=litres,
                           cached=cached)


def mask_sources(labels: Iterable[str]) -> tuple[str, dict[str, int]]:
    """What a set of scans' masks were (:attr:`BrainMaskChoice.label` each): one label when they
    agree, else ``mixed: given 40, deepbet 1.0.2 10``; and the count of each label."""
    counts = dict(Counter(labels))
    if len(counts) == 1:
        return next(iter(counts)), counts
    if not counts:
        return "none", counts
    return "mixed: " + ", ".join(f"{k} {n}" for k, n in sorted(counts.items())), counts


def describe_sources(notes: Iterable[MaskNote]) -> str:
    """One line for a dataset: ``brain masks: 40 given, 10 stripped (deepbet 1.0.2; 10 from the
    cache), 2 voxels > 0``."""
    given = stripped = cached = nonzero = 0
    labels = set()
    for n in notes:
        if n.source == "given":
            given += 1
        elif n.source == "stripped":
            stripped += 1
            cached += n.cached
            labels.add(n.label)
        else:
            nonzero += 1
    how = ", ".join(sorted(labels)) or f"{METHOD} {DEEPBET_PIN}"
    from_cache = f"; {cached} from the cache" if cached else ""
    return (f"brain masks: {given} given, {stripped} stripped ({how}{from_cache}), {nonzero} "
            "voxels > 0")


# --- the written mask --------------------------------------------------------------------------


def mask_image(mask: np.ndarray, loaded: LoadedImage,
               description: str = "brainbag brain mask") -> nib.Nifti1Image:
    """``mask`` as a uint8 NIfTI on ``loaded``'s grid: the input's own header geometry (qform,
    sform and their codes, voxel sizes) when it is a NIfTI whose affine is the one brainbag read,
    else the affine as both qform and sform. Opens over the scan in any viewer."""
    data = np.asarray(mask, dtype=np.uint8)
    affine = loaded.image.affine
    img: nib.Nifti1Image | None = None
    try:
        source = read_header(loaded.path)
    except InputError:
        source = None
    if isinstance(source, nib.Nifti1Image) and not isinstance(source, nib.Nifti2Image):
        header = source.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1.0, 0.0)
        candidate = nib.Nifti1Image(data, None, header=header)
        try:
            same = np.allclose(candidate.header.get_best_affine(), affine, atol=1e-4)
        except CORRUPT_FILE_ERRORS:
            same = False
        if same:
            img = candidate
    if img is None:
        img = nib.Nifti1Image(data, affine)
        img.set_sform(affine, code=int(loaded.xform_code))
        img.set_qform(affine, code=int(loaded.xform_code))
    header = img.header
    header.set_xyzt_units("mm")
    header["cal_min"], header["cal_max"] = 0.0, 1.0
    header["descrip"] = description.encode("ascii", "replace")[:79]
    header["intent_code"] = 0
    return img


# --- the cache of stripped masks -----------------------------------------------------------------


class MaskCache:
    """Stripped masks kept in ``folder``: ``<image sha256>_deepbet-1.0.2-threshold-0.5.nii.gz``
    (the mask, as :func:`mask_image` writes it) and ``.json`` (its strip record). A file that
    does not fit the image (another grid, unreadable) is ignored and the image stripped again."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def paths(self, loaded: LoadedImage) -> tuple[Path, Path]:
        """The mask file and its record for this image."""
        stem = f"{loaded.sha256}_{METHOD}-{DEEPBET_PIN}-threshold-{THRESHOLD:g}"
        return self.folder / f"{stem}.nii.gz", self.folder / f"{stem}.json"

    def get(self, loaded: LoadedImage) -> StripResult | None:
        """The stripped mask of this very image (by sha256), or None."""
        image_path, record_path = self.paths(loaded)
        try:
            record: dict[str, Any] = json.loads(record_path.read_text("utf-8"))
            img: Any = nib.load(str(image_path))
            mask = np.asarray(img.dataobj) > 0
        except (*CORRUPT_FILE_ERRORS, nib.filebasedimages.ImageFileError):
            return None
        if mask.shape != tuple(loaded.shape) or not np.allclose(
                img.affine, loaded.image.affine, atol=1e-4):
            return None
        try:
            return StripResult(
                mask=mask, version=str(record["version"]), threshold=float(record["threshold"]),
                volume_ml=float(record["volume_ml"]), n_components=int(record["n_components"]),
                seconds=float(record["seconds"]), device=str(record.get("device", "cpu")))
        except (KeyError, TypeError, ValueError):
            return None

    def put(self, loaded: LoadedImage, result: StripResult) -> None:
        """Keep ``result`` for this image (written atomically: mask first, then its record)."""
        image_path, record_path = self.paths(loaded)
        with atomic_path(image_path) as tmp:
            nib.save(mask_image(result.mask, loaded, "brainbag brain mask (deepbet)"), str(tmp))
        write_json_atomic(record_path,
                          {**result.to_record(), "image": str(loaded.path),
                           "image_sha256": loaded.sha256})
