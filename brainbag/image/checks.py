"""Checks as data: does a scan fit what the model was trained on?

Each check is a small function of a :class:`CheckContext` returning a :class:`CheckResult` (name,
status, what was found, what is expected, and the fix). :func:`run_checks` runs every check, even
after one fails; a check whose input is missing (for example the image could not be read) is
reported as ``skip`` with the reason. ``brainbag check`` renders the results; ``brainbag
predict`` runs the same list, refuses on ``fail`` (unless ``--force``), records warnings and
applies fixes (resampling to 1 mm, N4 with ``--n4``).

The model expects a skull-stripped, bias-corrected, 1 mm isotropic T1 of an adult brain. The
thresholds below are stated with the measurements that justify them (README, "Checks").
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from brainbag.errors import BrainbagError, InputError, one_line
from brainbag.image.io import (
    CORRUPT_FILE_ERRORS,
    MAX_VOXELS,
    LoadedImage,
    axis_codes,
    bounding_box,
    check_affine,
    check_data_size,
    check_pixdim,
    declared_size,
    format_mm,
    load_image,
    read_header,
)
from brainbag.image.statistics import (
    Box,
    ValueRange,
    border_contact,
    brain_extent_mm,
    component_fractions,
    crop_to_box,
    distinct_at_least,
    head_object_litres,
    obliquity_degrees,
    skewness_along_world,
    value_range,
)
from brainbag.image.strip import INSTALL_HINT, deepbet_available

Status = Literal["pass", "warn", "fail", "skip"]

# voxel size: 1 mm passes (as preprocess.needs_resampling decides), coarser than 3 mm or more
# anisotropic than 3:1 fails (1 mm resampling would invent the missing detail)
SPACING_TOLERANCE_MM = 0.01
MAX_VOXEL_MM = 3.0
MAX_ANISOTROPY = 3.0
# obliquity is kept (conform never resamples into world axes), so the network sees the brain
# rotated by this angle: beyond it, the view differs from training more than head tilt does
MAX_OBLIQUITY_DEG = 30.0
# skull: volume of the largest non-background object. Measured (README): skull-stripped scans
# 1.13-2.08 L, skull-on heads 3.09-5.27 L; the threshold is their geometric midpoint.
SKULL_OBJECT_LITRES = 2.5
# brain mask volume, litres: pass range, and the wider range beyond which it cannot be a brain
BRAIN_PASS_LITRES = (0.8, 2.3)
BRAIN_WARN_LITRES = (0.5, 2.8)
MAIN_COMPONENT_PASS = 0.95
MAIN_COMPONENT_WARN = 0.5
# anatomy: a brain is egg-shaped, broader at the back, so its voxels' A-P coordinate has a
# positive skewness (measured 0.15-0.30 on 66 brains; 0.01 on a scan whose header swaps axes)
MIN_AP_SKEWNESS = 0.07
# field of view: the crop the network was trained on, voxels along x, y, z (1 mm)
TRAINING_CROP = (160, 160, 128)
# brain area allowed on an image border (cm^2): the brainstem leaves through the inferior border
BORDER_CM2 = 1.0
INFERIOR_BORDER_CM2 = 10.0
MIN_DISTINCT_VALUES = 10
STRIPPING_TOOLS = "HD-BET, SynthStrip, FSL bet, ANTs antsBrainExtraction.sh"


@dataclass(frozen=True)
class CheckResult:
    """One row of a check report."""

    name: str
    status: Status
    found: str
    expected: str
    hint: str = ""
    values: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "found": self.found,
                "expected": self.expected, "hint": self.hint}

    def message(self) -> str:
        """One line: what failed or warned, what was expected, and the fix."""
        text = f"{self.name}: {self.found}; expected {self.expected}"
        return f"{text}; {self.hint}" if self.hint else text


@dataclass(frozen=True)
class CheckOptions:
    """What the checks need to know about how the scan will be used."""

    mask: Path | None = None
    resample: bool = True
    mode: str = "sliding"
    n4: bool = False
    #: the weights' voxel size (mm) and brain view (voxels at that size; None: sliding crops)
    voxel_mm: float = 1.0
    view_xyz: tuple[int, int, int] | None = None
    #: --strip: "auto" strips a head without a mask when predicting, "always" every scan
    #: without a mask, "never" none (a head then fails the skull check)
    strip: str = "auto"
    #: set by predict when the mask it passes was made by skull stripping: "deepbet 1.0.2"
    stripped: str | None = None
    #: the weights' ``training.statistics.bias_field`` (None: not recorded; brainbag.image.bias)
    bias_field: dict[str, Any] | None = None


@dataclass
class CheckReport:
    """Results of every check on one input."""

    path: Path
    results: list[CheckResult]
    seconds: float
    n4: Any = None  # fixes.N4Result when the bias check ran N4 (options.n4)
    read_error: str | None = None  # why the image could not be loaded, as predict says it

    @property
    def failures(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "fail"]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "warn"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def get(self, name: str) -> CheckResult:
        return next(r for r in self.results if r.name == name)

    def failure_message(self, override: str = "--force predicts anyway") -> str:
        """One line for the first failed check, naming the file and the others that failed."""
        first, *rest = self.failures
        text = f"{self.path}: check {first.message()}"
        if rest:
            text += f" (also failed: {', '.join(r.name for r in rest)})"
        return f"{text}; {override}"

    def summary(self) -> str:
        """One word or a few: ``pass``, ``warn: names`` or ``fail: names`` (a table cell)."""
        if self.failures:
            return "fail: " + ", ".join(r.name for r in self.failures)
        if self.warnings:
            return "warn: " + ", ".join(r.name for r in self.warnings)
        return "pass"

    def refusal(self) -> str:
        """The one-line error ``predict`` gives for this input: the reader's error when the
        image cannot be loaded, else :meth:`failure_message`."""
        return self.read_error or self.failure_message()

    def to_list(self) -> list[dict[str, Any]]:
        return [{"path": str(self.path), **r.to_dict()} for r in self.results]


class Skip(Exception):
    """Raised inside a check when what it needs is unavailable; the check is reported as skip."""


@dataclass(frozen=True)
class BrainMask:
    mask: np.ndarray
    source: str  # "--mask FILE", "deepbet 1.0.2 (skull stripping)" or "voxels > 0"
    litres: float
    from_file: bool  # a real mask (a file, or made by skull stripping), not voxels > 0


class CheckContext:
    """The inputs of the checks, computed lazily and once: header, data, the values' range, the
    brain mask and its bounding box, the head object. What several checks share is computed
    here once; a check that looks at the brain reads the mask cut to its bounding box.

    ``loaded`` and ``mask`` let ``predict`` pass what it has already read.
    """

    def __init__(self, path: Path, options: CheckOptions, loaded: LoadedImage | None = None,
                 mask: np.ndarray | None = None, head_litres: float | None = None) -> None:
        self.path = Path(path)
        self.options = options
        self._loaded = loaded
        self._mask = mask
        self._errors: dict[str, str] = {}
        self._values: dict[str, Any] = {} if head_litres is None else {"head": head_litres}
        self.n4: Any = None

    def _cached(self, key: str, compute: Callable[[], Any], skip: str) -> Any:
        if key in self._errors:
            raise Skip(f"{skip}: {self._errors[key]}")
        if key not in self._values:
            try:
                self._values[key] = compute()
            except InputError as exc:
                self._errors[key] = str(exc)
                raise Skip(f"{skip}: {exc}") from exc
        return self._values[key]

    def header(self) -> Any:
        """The lazily opened image (header only)."""
        return self._cached("header", lambda: read_header(self.path), "file not readable")

    def loaded(self) -> LoadedImage:
        """The image data (size guard, dimensions and affine already checked by io)."""
        if self._loaded is not None:
            return self._loaded
        return self._cached("loaded", lambda: load_image(self.path), "image not loaded")  # type: ignore[no-any-return]

    @property
    def zooms(self) -> tuple[float, float, float]:
        return self.loaded().zooms

    def read_failed(self) -> bool:
        """True when the header reads and declares one sane volume but the data does not load
        (a truncated or corrupt file): the failure no header-only check reports."""
        if "loaded" not in self._errors:
            return False
        try:
            img = self.header()
            check_data_size(img, self.path)
        except (Skip, InputError):
            return False
        shape = img.shape
        return (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)) and min(shape[:3]) >= 2

    @property
    def has_mask(self) -> bool:
        """A mask was given (a file, or predict's array)."""
        return self._mask is not None or self.options.mask is not None

    def will_strip(self) -> bool:
        """No mask yet, and predict would make one by skull stripping (a head, or --strip
        always; never with --strip never): the decision of
        :func:`brainbag.image.masks.choose_brain_mask`."""
        if self.has_mask or self.options.strip == "never":
            return False
        return self.options.strip == "always" or self.head_litres() > SKULL_OBJECT_LITRES

    def brain(self) -> BrainMask:
        """The brain mask the model will use: ``--mask``, predict's stripped mask, or voxels > 0;
        :class:`Skip` when predict would strip the scan first (the networks do not run here)."""
        if "brain" not in self._values and "brain" not in self._errors and self.will_strip():
            raise Skip("the brain mask will be made by skull stripping (deepbet) when "
                       "predicting")
        return self._cached("brain", self._brain, "no brain mask")  # type: ignore[no-any-return]

    def _brain(self) -> BrainMask:
        from brainbag.image.preprocess import load_mask

        loaded = self.loaded()
        voxel_l = float(np.prod(loaded.zooms)) / 1e6
        if self._mask is not None or self.options.mask is not None:
            mask = self._mask
            if mask is None:
                assert self.options.mask is not None
                mask = load_mask(self.options.mask, loaded)
            mask = np.asarray(mask, dtype=bool)
            source = (f"--mask {self.options.mask.name}" if self.options.mask else
                      f"{self.options.stripped} (skull stripping)" if self.options.stripped
                      else "--mask")
            return BrainMask(mask, source, float(np.count_nonzero(mask)) * voxel_l, True)
        data = loaded.image.data
        # NaN > 0 is False; only +inf needs the finite test
        mask = (data > 0) if self.value_range().finite else (np.isfinite(data) & (data > 0))
        return BrainMask(mask, "voxels > 0", float(np.count_nonzero(mask)) * voxel_l, False)

    def value_range(self) -> ValueRange:
        """Non-finite voxels and the finite range of the data."""
        return self._cached("range", lambda: value_range(self.loaded().image.data),  # type: ignore[no-any-return]
                            "image not loaded")

    def brain_box(self) -> Box | None:
        """Bounding box of the brain mask (None when it is empty)."""
        return self._cached("box", lambda: bounding_box(self.brain().mask), "no brain mask")  # type: ignore[no-any-return]

    def brain_crop(self) -> tuple[np.ndarray, np.ndarray]:
        """The brain mask cut to its bounding box (a view) and the box's first voxel."""
        return crop_to_box(self.brain().mask, self.brain_box())

    def head_litres(self) -> float:
        """Volume of the largest non-background object (holes filled), in litres."""
        return self._cached("head", self._head_litres, "image not loaded")  # type: ignore[no-any-return]

    def _head_litres(self) -> float:
        loaded = self.loaded()
        return head_object_litres(loaded.image.data, loaded.zooms,
                                  finite=self.value_range().finite)

    def usable_brain(self) -> BrainMask:
        """The brain mask, or :class:`Skip` when it cannot stand for the brain."""
        brain = self.brain()
        if not brain.from_file and self.head_litres() > SKULL_OBJECT_LITRES:
            raise Skip("needs a brain mask: the skull is on and no --mask was given")
        lo, hi = BRAIN_WARN_LITRES
        if not lo <= brain.litres <= hi:
            raise Skip(f"needs a plausible brain mask ({brain.source} is {brain.litres:.2f} L)")
        return brain


def _format_name(img: Any) -> str:
    return {"Nifti1Image": "NIfTI-1", "Nifti2Image": "NIfTI-2", "MGHImage": "MGZ"}.get(
        type(img).__name__, type(img).__name__)


def _xform(header: Any, which: str) -> str:
    code = int(header[f"{which}_code"])
    return f"{which} {header.get_value_label(f'{which}_code')} ({code})"


def _litres(value: float) -> str:
    return f"{value:.2f} L"


# --- the checks --------------------------------------------------------------------------------


def check_file(ctx: CheckContext) -> CheckResult:
    """Readable as NIfTI or MGZ."""
    expected = "a readable NIfTI (.nii, .nii.gz) or MGZ (.mgz) image"
    try:
        img = ctx.header()
    except Skip as exc:
        return CheckResult("file", "fail", ctx._errors.get("header", str(exc)), expected,
                           "check the path; export the scan to NIfTI (e.g. dcm2niix) if needed")
    found = f"{_format_name(img)}, {img.header.get_data_dtype()}, " + "x".join(
        str(n) for n in img.shape)
    return CheckResult("file", "pass", found, expected)


def check_size(ctx: CheckContext) -> CheckResult:
    """Size guard: the header's voxel count and data size, before anything is allocated."""
    img = ctx.header()
    expected = f"at most {MAX_VOXELS / 1e6:.0f} M voxels, and no more data than the file holds"
    voxels, nbytes = declared_size(img)
    found = f"{voxels / 1e6:.1f} M voxels, {nbytes / 1e6:.1f} MB of voxel data"
    try:
        check_data_size(img, ctx.path)
    except InputError as exc:
        return CheckResult("size", "fail", str(exc).split(": ", 1)[-1].split(";")[0], expected,
                           "the header is corrupt, the file truncated, or this is not one T1 "
                           "volume: export the scan again", {"voxels": voxels, "bytes": nbytes})
    return CheckResult("size", "pass", found, expected, values={"voxels": voxels, "bytes": nbytes})


def check_dimensions(ctx: CheckContext) -> CheckResult:
    """3D, or 4D with a single volume."""
    shape = tuple(int(n) for n in ctx.header().shape)
    expected = "one 3D volume (3D, or 4D with a single volume)"
    text = "x".join(str(n) for n in shape)
    if len(shape) == 3 or (len(shape) == 4 and shape[3] == 1):
        if min(shape[:3]) < 2:
            return CheckResult("dimensions", "fail", f"{text}: a single slice", expected,
                               "brainbag needs a 3D T1 volume, not a 2D slice")
        found = f"3D {text}" if len(shape) == 3 else f"4D {text} (one volume)"
        return CheckResult("dimensions", "pass", found, expected)
    if len(shape) == 4:
        return CheckResult("dimensions", "fail", f"4D {text}: {shape[3]} volumes", expected,
                           "extract the T1 volume first (e.g. fslroi in out 0 1)")
    return CheckResult("dimensions", "fail", f"{len(shape)}D {text}", expected,
                       "brainbag needs one 3D T1 volume")


def check_header(ctx: CheckContext) -> CheckResult:
    """Voxel sizes and affine sane; qform and sform agree when both are set."""
    import nibabel as nib

    img = ctx.header()
    affine = np.asarray(img.affine, dtype=np.float64)
    expected = "positive finite voxel sizes, an invertible affine, qform = sform when both set"
    try:
        check_pixdim(img, ctx.path)
        check_affine(affine, ctx.path)
    except InputError as exc:
        return CheckResult("header", "fail", str(exc).split(" has ", 1)[-1].split(";")[0],
                           expected, "fix the header's sform/qform (e.g. fslorient) or export "
                           "the scan again")
    if not isinstance(img, nib.Nifti1Image):  # MGZ (NIfTI-2 subclasses Nifti1Image)
        return CheckResult("header", "pass", f"{_format_name(img)} vox2ras", expected)
    hdr = img.header
    qcode, scode = int(hdr["qform_code"]), int(hdr["sform_code"])
    if qcode == 0 and scode == 0:
        return CheckResult(
            "header", "warn", "qform_code = sform_code = 0: the header gives no orientation",
            expected, "left/right and the other axes are guessed; set the orientation (e.g. "
            "fslorient, or re-export with dcm2niix)")
    if qcode > 0 and scode > 0:
        try:
            q, s = hdr.get_qform(), hdr.get_sform()
        except CORRUPT_FILE_ERRORS as exc:  # e.g. a quaternion that is not a rotation
            return CheckResult(
                "header", "warn", f"the qform is invalid ({one_line(str(exc))})", expected,
                "brainbag (like FSL and nibabel) uses the sform; viewers that use the qform "
                "cannot place the scan: fix the header (e.g. fslorient -copysform2qform)")
        dims = (*img.shape[:3], 1, 1, 1)[:3]  # a 0D-2D header (dim[0] < 3) still has 3 axes
        corners = np.array(np.meshgrid(*[[0, max(int(n) - 1, 0)] for n in dims],
                                       indexing="ij"))
        ijk = np.vstack([corners.reshape(3, -1), np.ones((1, 8))])
        shift = float(np.abs((q - s) @ ijk)[:3].max())
        if shift > 1.0:
            return CheckResult(
                "header", "warn", f"qform and sform disagree by up to {shift:.1f} mm", expected,
                "brainbag (like FSL and nibabel) uses the sform; viewers that use the qform "
                "place the scan elsewhere: fix the header so both agree",
                {"qform_sform_mm": shift})
        return CheckResult("header", "pass", f"{_xform(hdr, 'sform')} = {_xform(hdr, 'qform')}",
                           expected)
    which, other = ("sform", "qform") if scode else ("qform", "sform")
    return CheckResult("header", "pass", f"{_xform(hdr, which)}, {other} unset", expected)


def check_values(ctx: CheckContext) -> CheckResult:
    """The voxel data reads to its end (gzip CRC included); finite values, not constant."""
    expected = "voxel data that reads to the end, finite values that vary"
    try:
        found = ctx.value_range()
    except Skip:
        if not ctx.read_failed():
            raise
        return CheckResult("values", "fail", ctx._errors["loaded"], expected,
                           "copy or export the scan again")
    bad = found.non_finite
    if bad:
        return CheckResult("values", "fail", f"{bad:,} NaN or infinite voxels", expected,
                           "replace them (e.g. fslmaths in -nan out) and check how the file was "
                           "made", {"non_finite": bad})
    lo, hi = found.lo, found.hi
    if hi <= lo:
        return CheckResult("values", "fail", f"every voxel is {lo:g}", expected,
                           "this image holds no anatomy: check the file")
    return CheckResult("values", "pass", "all finite, not constant", expected)


def check_intensity(ctx: CheckContext) -> CheckResult:
    """Intensity range and data type plausible for a T1 magnitude image."""
    loaded = ctx.loaded()
    data = loaded.image.data
    expected = (f"a magnitude image: >= {MIN_DISTINCT_VALUES} distinct values, no negative "
                "values (any scale: brainbag whitens within the brain)")
    rng = ctx.value_range()
    if rng.non_finite == data.size:
        raise Skip("no finite values")
    finite = data.ravel() if rng.finite else data[np.isfinite(data)]
    lo, hi = rng.lo, rng.hi
    found = f"{loaded.dtype}, {lo:.4g} to {hi:.4g}"
    # distinct values among up to 2 M voxels: a lower bound unless fewer than the minimum
    sample = finite[:: max(1, finite.size // 2_000_000)]
    distinct = distinct_at_least(sample, MIN_DISTINCT_VALUES)
    values = {"min": lo, "max": hi, "dtype": loaded.dtype, "distinct_values": distinct}
    if distinct < MIN_DISTINCT_VALUES:
        return CheckResult("intensity", "fail", f"{found}: only {distinct} distinct values",
                           expected, "this looks like a mask or label map, not a T1: pass the "
                           "T1 image (and the mask with --mask)", values)
    threshold = -0.01 * max(abs(hi), 1e-12)
    negative = 0.0
    if lo < threshold:  # else no voxel is below it: no pass over the data
        nonzero = int(np.count_nonzero(finite))
        negative = int(np.count_nonzero(finite < threshold)) / nonzero if nonzero else 0.0
    values["negative_fraction"] = negative
    if negative > 0.01:
        return CheckResult("intensity", "warn", f"{found}: {100 * negative:.0f} % of the "
                           "non-zero voxels are negative", expected, "looks already normalised "
                           "(z-scored) or not a magnitude image; brainbag expects raw T1 "
                           "intensities with a zero background", values)
    return CheckResult("intensity", "pass", found, expected, values=values)


def check_voxel_size(ctx: CheckContext) -> CheckResult:
    """The weights' voxel size passes (finer voxels too, for weights coarser than 1 mm: they are
    smoothed and resampled, as in training); other sizes are resampled; very coarse or
    anisotropic fails."""
    zooms = ctx.zooms
    target = ctx.options.voxel_mm
    expected = (f"{target:g} mm isotropic (the weights' voxel size; others resampled; fail "
                f"above {MAX_VOXEL_MM:g} mm or {MAX_ANISOTROPY:g}:1 anisotropy)")
    found = format_mm(zooms)
    values = {"voxel_mm": list(zooms)}
    ratio = max(zooms) / min(zooms)
    if max(zooms) > MAX_VOXEL_MM or ratio > MAX_ANISOTROPY:
        what = "too coarse" if max(zooms) > MAX_VOXEL_MM else f"{ratio:.1f}:1 anisotropic"
        return CheckResult("voxel_size", "fail", f"{found} ({what})", expected,
                           "the model needs ~1 mm 3D T1 detail: use a 3D T1 acquisition "
                           "(e.g. MPRAGE) at about 1 mm", values)
    if all(abs(z - target) <= SPACING_TOLERANCE_MM for z in zooms):
        return CheckResult("voxel_size", "pass", found, expected, values=values)
    if not ctx.options.resample:
        return CheckResult("voxel_size", "fail", f"{found} (not {target:g} mm, --no-resample)",
                           expected, "drop --no-resample to let brainbag resample it", values)
    if target > 1.0 + SPACING_TOLERANCE_MM and max(zooms) <= target + SPACING_TOLERANCE_MM:
        return CheckResult("voxel_size", "pass", f"{found}: smoothed and resampled to "
                           f"{target:g} mm, as the weights were trained", expected,
                           values=values)
    return CheckResult("voxel_size", "warn", f"{found}: will be resampled to {target:g} mm "
                       "isotropic",
                       expected, "fine for most scans; resample yourself to control the "
                       "interpolation", values)


def check_orientation(ctx: CheckContext) -> CheckResult:
    """Axis codes and obliquity, reported; reorientation is handled, extreme obliquity warns."""
    affine = ctx.loaded().image.affine
    codes = axis_codes(affine)
    angle = obliquity_degrees(affine)
    expected = (f"any axis order (reoriented to RAS exactly); obliquity <= "
                f"{MAX_OBLIQUITY_DEG:g} deg")
    found = f"{codes}, " + (f"oblique by {angle:.1f} deg" if angle > 0.05 else "not oblique")
    values = {"axis_codes": codes, "obliquity_deg": angle}
    if angle > MAX_OBLIQUITY_DEG:
        return CheckResult("orientation", "warn", found, expected,
                           "brainbag keeps the oblique grid (no interpolation), so the model "
                           "sees the brain rotated by this much: reslice it to the scanner "
                           "axes or a template first", values)
    return CheckResult("orientation", "pass", found, expected, values=values)


def check_skull(ctx: CheckContext) -> CheckResult:
    """Skull-stripped, or a brain mask given (heuristic: size of the largest bright object)."""
    litres = ctx.head_litres()
    expected = (f"skull-stripped (largest object <= {SKULL_OBJECT_LITRES:g} L, a brain), "
                "or --mask")
    values: dict[str, Any] = {"object_litres": litres}
    skull_on = litres > SKULL_OBJECT_LITRES
    found = (f"skull on: head object {_litres(litres)}" if skull_on
             else f"skull-stripped: brain object {_litres(litres)}")
    stripped = ctx.options.stripped
    if stripped is not None:  # predict made the mask by skull stripping
        values["stripped"] = stripped
        how = "" if skull_on else " (--strip always)"
        return CheckResult("skull_stripped", "pass", f"{found}; stripped ({stripped}){how}",
                           expected, values=values)
    if ctx.will_strip():
        why = "" if skull_on else " (--strip always)"
        if not deepbet_available():
            return CheckResult("skull_stripped", "fail", f"{found}; needs skull stripping{why}, "
                               "but deepbet is not installed", expected,
                               f"{INSTALL_HINT}, or pass --mask brain_mask.nii.gz", values)
        values["will_strip"] = True
        return CheckResult("skull_stripped", "pass", f"{found}; will be stripped (deepbet) "
                           f"when predicting{why}", expected, values=values)
    if skull_on and not ctx.has_mask:
        return CheckResult("skull_stripped", "fail", found, expected,
                           f"strip the skull first ({STRIPPING_TOOLS}) or pass --mask "
                           "brain_mask.nii.gz", values)
    if skull_on:
        found += "; the brain mask removes it"
    return CheckResult("skull_stripped", "pass", found, expected, values=values)


def check_brain_mask(ctx: CheckContext) -> CheckResult:
    """On the image grid, non-empty, plausible volume, one main connected component."""
    lo, hi = BRAIN_PASS_LITRES
    expected = f"{lo:g}-{hi:g} L, one main connected piece, on the image grid"
    try:
        brain = ctx.brain()
    except Skip:
        if "brain" not in ctx._errors:
            raise
        return CheckResult("brain_mask", "fail", ctx._errors["brain"], expected,
                           "pass a mask on the image's own grid")
    values: dict[str, Any] = {"source": brain.source, "litres": brain.litres}
    fix = ("check the mask: it should cover the brain only" if brain.from_file else
           "brain = voxels > 0, so the image must be skull-stripped with a zero background; "
           "or pass --mask")
    if brain.litres == 0:
        return CheckResult("brain_mask", "fail", f"{brain.source}: empty", expected, fix, values)
    found = f"{brain.source}: {_litres(brain.litres)}"
    wlo, whi = BRAIN_WARN_LITRES
    if not wlo <= brain.litres <= whi:
        return CheckResult("brain_mask", "fail", f"{found}, not a brain volume", expected, fix,
                           values)
    pieces, main = component_fractions(ctx.brain_crop()[0])
    values.update(components=pieces, main_component_fraction=main)
    if main < MAIN_COMPONENT_WARN:
        return CheckResult("brain_mask", "fail", f"{found} in {pieces} pieces, the largest "
                           f"only {100 * main:.0f} %", expected, fix, values)
    status: Status = "pass"
    notes = []
    if not lo <= brain.litres <= hi:
        status = "warn"
        notes.append("unusual volume for an adult brain")
    if main < MAIN_COMPONENT_PASS:
        status = "warn"
        notes.append(f"the largest of {pieces} pieces holds {100 * main:.0f} %")
    if notes:
        return CheckResult("brain_mask", status, f"{found}; {'; '.join(notes)}", expected, fix,
                           values)
    return CheckResult("brain_mask", status, f"{found}, {100 * main:.2f} % in one piece",
                       expected, values=values)


def check_anatomy(ctx: CheckContext) -> CheckResult:
    """The brain's shape agrees with the header's anterior-posterior axis."""
    ctx.usable_brain()  # skips when the mask cannot stand for the brain
    crop, start = ctx.brain_crop()
    skew = skewness_along_world(crop, ctx.loaded().image.affine, start=start)
    expected = (f"brain broader at the back than at the front along the header's A-P axis "
                f"(skewness >= {MIN_AP_SKEWNESS:g})")
    values = {"skewness_xyz": [round(float(s), 3) for s in skew]}
    if skew[1] >= MIN_AP_SKEWNESS:
        return CheckResult("anatomy", "pass", f"front-back shape along the header's A-P axis "
                           f"(skewness {skew[1]:+.2f})", expected, values=values)
    axis = int(np.argmax(np.abs(skew)))
    if axis == 1:
        where = "reversed along the header's A-P axis (front and back swapped?)"
    else:
        where = f"along the header's {('L-R', 'A-P', 'S-I')[axis]} axis, not A-P"
    found = (f"the brain's front-back asymmetry lies {where} (skewness x {skew[0]:+.2f}, "
             f"y {skew[1]:+.2f}, z {skew[2]:+.2f})")
    return CheckResult("anatomy", "warn", found, expected, "the header's orientation may be "
                       "wrong (axes swapped or flipped): check the scan in a viewer against its "
                       "labels", values)


def check_field_of_view(ctx: CheckContext) -> CheckResult:
    """The whole brain is in the image; compare it with the training crop."""
    brain = ctx.usable_brain()
    affine = ctx.loaded().image.affine
    bounds = ctx.brain_box()
    extent = brain_extent_mm(brain.mask, affine, bounds)
    contact = border_contact(brain.mask, affine, bounds)
    cut = [f"{side} ({area:.0f} cm^2)" for side, area in contact.items()
           if area > (INFERIOR_BORDER_CM2 if side == "inferior" else BORDER_CM2)]
    view = ctx.options.view_xyz
    box = ([round(v * ctx.options.voxel_mm) for v in view] if view is not None
           else list(TRAINING_CROP))
    crop = "x".join(str(c) for c in box)
    shown = [round(e) for e in extent]  # compared as shown: 160 mm is not larger than 160
    size = "x".join(str(e) for e in shown)
    expected = ("brain inside the image; " + (f"the weights see a {crop} mm box around the "
                f"brain (x y z)" if view is not None else
                f"model trained on {crop} mm crops (x y z)"))
    values = {"brain_extent_mm": list(extent), "border_cm2": contact}
    if cut:
        return CheckResult("field_of_view", "warn", f"brain {size} mm touches the image border: "
                           + ", ".join(cut), expected, "part of the brain may be cut off: use a "
                           "scan covering the whole brain", values)
    if view is not None:
        larger = [ax for ax, e, c in zip("xyz", shown, box, strict=True) if e > c]
        if larger:
            return CheckResult("field_of_view", "warn", f"brain {size} mm, larger than the "
                               f"weights' {crop} mm view along {', '.join(larger)}", expected,
                               "the view grows to hold the brain, so the network sees more "
                               "than in training: an unusually large brain or a mask that "
                               "includes non-brain tissue; check the mask", values)
        return CheckResult("field_of_view", "pass", f"brain {size} mm, within the weights' "
                           f"{crop} mm view", expected, values=values)
    larger = [ax for ax, e, c in zip("xyz", shown, box, strict=True) if e > c]
    if larger and ctx.options.mode == "full":
        return CheckResult("field_of_view", "warn", f"brain {size} mm, larger than the crop "
                           f"along {', '.join(larger)}", expected, "--mode full shows the model "
                           "the whole brain at once, unlike training: prefer --mode sliding",
                           values)
    found = f"brain {size} mm" + (f", larger than the crop along {', '.join(larger)}: sliding "
                                  "windows cover it" if larger else ", within one crop")
    return CheckResult("field_of_view", "pass", found, expected, values=values)


def check_bias_field(ctx: CheckContext) -> CheckResult:
    """Low-frequency intensity non-uniformity within the brain, as N4 estimates it, judged
    against the fields of the weights' training images (:mod:`brainbag.image.bias`)."""
    from brainbag.image.bias import judge
    from brainbag.image.fixes import estimate_bias, n4_correct

    brain = ctx.usable_brain()
    loaded = ctx.loaded()
    estimate = estimate_bias(loaded.image.data, brain.mask, loaded.zooms, box=ctx.brain_box())

    def after_n4() -> tuple[float, float]:
        ctx.n4 = n4_correct(loaded.image.data, brain.mask, loaded.zooms)
        return estimate_bias(ctx.n4.data, brain.mask, loaded.zooms,
                             box=ctx.brain_box()).range, ctx.n4.seconds

    verdict = judge(estimate.range, ctx.options.bias_field, after_n4, ctx.options.n4)
    if not ctx.options.n4:
        ctx.n4 = None  # a trial N4 (to decide on advice) is not a fix the scan asked for
    return CheckResult("bias_field", verdict.status, verdict.found, verdict.expected,  # type: ignore[arg-type]
                       verdict.hint, {**verdict.values, "seconds": estimate.seconds})


def measure_bias_field(path: Path, mask: Path | None = None, loaded: LoadedImage | None = None,
                       brain: np.ndarray | None = None) -> float | None:
    """The bias-field check's statistic of one scan (None when the check cannot run: no usable
    brain mask), as recorded for the training images of new weights. ``loaded`` and ``brain``
    (a mask array on its grid, e.g. one made by skull stripping) stand for the files."""
    from brainbag.image.fixes import estimate_bias

    ctx = CheckContext(Path(path), CheckOptions(mask=mask), loaded, brain)
    try:
        usable = ctx.usable_brain()
        image = ctx.loaded()
        return estimate_bias(image.image.data, usable.mask, image.zooms,
                             box=ctx.brain_box()).range
    except (Skip, InputError):
        return None


CHECKS: dict[str, Callable[[CheckContext], CheckResult]] = {
    "file": check_file,
    "size": check_size,
    "dimensions": check_dimensions,
    "header": check_header,
    "values": check_values,
    "intensity": check_intensity,
    "voxel_size": check_voxel_size,
    "orientation": check_orientation,
    "skull_stripped": check_skull,
    "brain_mask": check_brain_mask,
    "anatomy": check_anatomy,
    "field_of_view": check_field_of_view,
    "bias_field": check_bias_field,
}
CHECK_NAMES = tuple(CHECKS)
#: the checks that need no brain mask: predict runs them before it strips a scan, so a scan they
#: refuse (unreadable, 4D, a broken header, 5 m voxels) is refused as it was, never stripped
BEFORE_STRIPPING = ("file", "size", "dimensions", "header", "values", "intensity", "voxel_size",
                    "orientation")


def run_checks(
    path: Path, options: CheckOptions | None = None, loaded: LoadedImage | None = None,
    mask: np.ndarray | None = None, names: Sequence[str] | None = None,
    head_litres: float | None = None,
) -> CheckReport:
    """Run every check (or those in ``names``) on one input, in order, whatever their outcome;
    a check that cannot run is reported as ``skip``.

    ``loaded`` and ``mask`` are used instead of reading the files again (``predict`` has them),
    and ``head_litres`` (:func:`brainbag.image.statistics.head_object_litres`) instead of
    measuring the head again.
    """
    unknown = set(names or ()) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown checks {sorted(unknown)}; known: {', '.join(CHECKS)}")
    t0 = time.perf_counter()
    ctx = CheckContext(Path(path), options or CheckOptions(), loaded, mask, head_litres)
    results: list[CheckResult] = []
    for name, check in CHECKS.items():
        if names is not None and name not in names:
            continue
        try:
            results.append(check(ctx))
        except Skip as exc:
            results.append(CheckResult(name, "skip", f"not checked: {exc}", "", ""))
        except BrainbagError as exc:
            results.append(CheckResult(name, "fail", str(exc), "", ""))
    read_error = ctx._errors.get("loaded") if loaded is None else None
    return CheckReport(Path(path), results, time.perf_counter() - t0, ctx.n4, read_error)
