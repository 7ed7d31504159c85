"""Image I/O and the one home of brainbag's geometry.

Conventions, stated once:

* World coordinates are the file's own NIfTI world (RAS+ millimetres; scanner or aligned space).
  MGZ files are read through nibabel, which reports them in the same RAS+ world.
* Arrays are indexed ``(i, j, k)`` as nibabel returns them, never SimpleITK's ``(z, y, x)``.
* Internally every volume is reoriented, by exact axis permutation and flipping only (no
  interpolation), so that ``i, j, k`` run closest to Right, Anterior, Superior. Oblique affines
  stay oblique; only the axis order and signs change.
* An *index transform* ``T`` is a 4x4 matrix mapping indices of a derived array to indices of its
  parent array. The derived array's affine is always ``A_parent @ T``; a chain of derivations is a
  product of index transforms. Every affine brainbag writes is built this way.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import nibabel as nib
import numpy as np

from brainbag.errors import InputError

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".mgz")
AXIS_CODES = ("R", "A", "S")
# A 0.5 mm whole-head scan is about 1e8 voxels; 2**28 (1 GiB as float32) is far beyond any T1.
MAX_VOXELS = 2**28
# deflate cannot expand data more than ~1032-fold: a larger declared size is a corrupt header
MAX_GZIP_RATIO = 1100
# what nibabel raises on a malformed file, besides ImageFileError (found by header fuzzing,
# tests/test_fuzz_headers.py): a file brainbag cannot parse is corrupt, never a crash
CORRUPT_FILE_ERRORS = (OSError, EOFError, ValueError, zlib.error, TypeError, IndexError,
                       KeyError, OverflowError, struct.error,
                       nib.spatialimages.HeaderDataError, nib.freesurfer.mghformat.MGHError)


def strip_image_suffix(name: str) -> str:
    """Return ``name`` without a trailing ``.nii``, ``.nii.gz`` or ``.mgz``."""
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def subject_name(path: Path) -> str:
    """Subject label of an input file: the name without image suffix and trailing ``_T1w``."""
    stem = strip_image_suffix(Path(path).name)
    if stem.endswith("_T1w") and len(stem) > 4:
        stem = stem[: -len("_T1w")]
    return stem


def is_image_path(path: Path) -> bool:
    return Path(path).name.lower().endswith(IMAGE_SUFFIXES)


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Image:
    """A 3D float32 array with its voxel-to-world affine."""

    data: np.ndarray
    affine: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.data.shape)  # type: ignore[return-value]

    @property
    def zooms(self) -> tuple[float, float, float]:
        return voxel_sizes(self.affine)


@dataclass(frozen=True)
class LoadedImage:
    """An image as found in its file, before any reorientation or resampling."""

    path: Path
    image: Image
    dtype: str
    sha256: str
    xform_code: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.image.shape

    @property
    def zooms(self) -> tuple[float, float, float]:
        return self.image.zooms


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Index bounds ``(lo, hi)`` of the True voxels of a 3D mask (``hi`` exclusive), or None when
    the mask is empty. Works on the mask's projections: no index list of its voxels is built."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        lo.append(int(hit[0]))
        hi.append(int(hit[-1]) + 1)
    return np.array(lo), np.array(hi)


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel edge lengths in mm: the norms of the affine's first three columns."""
    norms = np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))
    return (float(norms[0]), float(norms[1]), float(norms[2]))


def format_mm(zooms: tuple[float, ...]) -> str:
    return "x".join(f"{z:.3g}" for z in zooms) + " mm"


def axis_codes(affine: np.ndarray) -> str:
    """Orientation codes such as ``RAS``; ``?`` for an axis nibabel cannot name (an affine so
    skewed that two voxel axes point the same way)."""
    return "".join(code or "?" for code in nib.aff2axcodes(affine))


def read_header(path: Path, what: str = "input") -> Any:
    """Open an image lazily: the header is parsed, no voxel data is read."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder, not an image file (.nii, .nii.gz, .mgz)")
    try:
        return nib.load(str(path))
    except nib.filebasedimages.ImageFileError as exc:
        raise InputError(
            f"{what} {path} is not a NIfTI or MGZ image ({exc}); "
            "brainbag reads .nii, .nii.gz and .mgz files"
        ) from exc
    except CORRUPT_FILE_ERRORS as exc:
        raise InputError(
            f"{what} {path} could not be read ({type(exc).__name__}: {exc}); "
            "the file is truncated or corrupt: copy or export it again"
        ) from exc


def load_image(path: Path, what: str = "input") -> LoadedImage:
    """Read a NIfTI or MGZ file into float32 ``(i, j, k)`` data and its affine.

    Accepts 3D images and 4D images holding a single volume. Raises :class:`InputError` with a
    one-line message for anything else.
    """
    path = Path(path)
    img = read_header(path, what)
    check_data_size(img, path, what)
    shape = tuple(int(n) for n in img.shape)
    proxy: Any
    if len(shape) == 4 and shape[3] == 1:
        proxy = img.dataobj[..., 0]
    elif len(shape) == 3:
        proxy = img.dataobj
    elif len(shape) == 4:
        raise InputError(
            f"{what} {path} is 4D with {shape[3]} volumes; brainbag needs one 3D T1 volume: "
            "extract it first (e.g. fslroi in out 0 1)"
        )
    else:
        raise InputError(
            f"{what} {path} has {len(shape)} dimensions {shape}; brainbag needs a 3D T1 volume"
        )
    if min(shape[:3]) < 2:
        raise InputError(
            f"{what} {path} has shape {shape[:3]}: a single slice, not a 3D volume"
        )
    try:
        if isinstance(img, nib.Nifti1Image) and _is_gzip(path):  # NIfTI-2 included
            data = _read_gzip_nifti(img, path, len(shape) == 4)
        else:
            verify_gzip(path)
            data = np.asarray(proxy, dtype=np.float32)
    except CORRUPT_FILE_ERRORS as exc:
        raise InputError(
            f"{what} {path}: image data could not be read ({_error_name(exc)}: {exc}); "
            "the file is truncated or corrupt: copy or export it again"
        ) from exc
    affine = np.asarray(img.affine, dtype=np.float64)
    check_pixdim(img, path, what)
    check_affine(affine, path, what)
    header = img.header
    xform_code = 1
    if isinstance(img, nib.Nifti1Image):  # includes NIfTI-2
        sform_code = int(header["sform_code"])
        qform_code = int(header["qform_code"])
        xform_code = sform_code or qform_code or 1
    return LoadedImage(
        path=path,
        image=Image(c_order(data), affine),
        dtype=str(header.get_data_dtype()),
        sha256=sha256_file(path),
        xform_code=xform_code,
    )


def c_order(data: np.ndarray) -> np.ndarray:
    """``data`` as a C-ordered array. NIfTI stores voxels in Fortran order; copying a 3D array
    into C order in one go is a cache-unfriendly transpose, so it is copied one (i, k) plane at
    a time (a few times faster, the same array)."""
    if data.flags.c_contiguous or data.ndim != 3 or not data.flags.f_contiguous:
        return np.ascontiguousarray(data)
    out = np.empty(data.shape, dtype=data.dtype)
    for j in range(data.shape[1]):
        out[:, j, :] = data[:, j, :]
    return out


def _is_gzip(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _read_gzip_nifti(img: Any, path: Path, single_volume_4d: bool) -> np.ndarray:
    """The voxels of a gzip-compressed NIfTI as float32, decompressed once: nibabel reads them
    from a gzip stream that is then read to its end, so that the CRC and length of every member
    are checked (what :func:`verify_gzip` does in a pass of its own). Raises like it."""
    import gzip

    with open(path, "rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as stream:
        image = type(img).from_file_map(
            {"image": nib.FileHolder(filename=str(path), fileobj=stream)})
        proxy = image.dataobj[..., 0] if single_volume_4d else image.dataobj
        data = np.asarray(proxy, dtype=np.float32)
        while stream.read(1 << 20):  # bounded reads: trailing data costs no memory
            pass
    return data


def _error_name(exc: BaseException) -> str:
    return "zlib.error" if isinstance(exc, zlib.error) else type(exc).__name__


def verify_gzip(path: Path, chunk: int = 1 << 20) -> None:
    """Decompress a gzip file to its end (keeping nothing) so that its CRC and length trailers
    are verified: reading the voxels alone stops where the data ends, so a file cut inside its
    8-byte trailer or with corrupt bytes that still inflate passes unnoticed. Files that do not
    start with the gzip magic are left to nibabel. Raises ``EOFError`` (truncated) or
    ``zlib.error`` (corrupt)."""
    with open(path, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return
        fh.seek(0)
        inflate = zlib.decompressobj(wbits=31)
        for data in iter(lambda: fh.read(chunk), b""):
            block = data
            while block:
                if inflate.eof:  # a member ended: another member follows, or zero padding
                    if not block.strip(b"\0"):
                        break
                    inflate = zlib.decompressobj(wbits=31)
                inflate.decompress(block, chunk)  # bounded output: a gzip bomb costs no memory
                block = inflate.unused_data if inflate.eof else inflate.unconsumed_tail
    if not inflate.eof:
        raise EOFError("compressed file ended before the end-of-stream marker was reached")


def declared_size(img: Any) -> tuple[int, int]:
    """Voxels per 3D volume and bytes of voxel data that an image's header declares."""
    shape = tuple(int(n) for n in img.shape)
    volumes = int(np.prod(shape[3:], dtype=np.float64)) if len(shape) > 3 else 1
    voxels = int(np.prod(shape[:3], dtype=np.float64))
    itemsize = int(img.header.get_data_dtype().itemsize)
    return voxels, voxels * volumes * itemsize


def check_data_size(img: Any, path: Path, what: str = "input") -> None:
    """Refuse absurd headers before any voxel data is read or allocated.

    A volume larger than :data:`MAX_VOXELS`, or more data than the file can hold (uncompressed:
    more than its size; gzip-compressed: more than :data:`MAX_GZIP_RATIO` times its size), is a
    corrupt header or not a single T1 volume.
    """
    voxels, nbytes = declared_size(img)
    shape = "x".join(str(int(n)) for n in img.shape)
    if not img.shape or min(int(n) for n in img.shape) < 1:
        raise InputError(
            f"{what} {path}: the header declares dimensions {shape or 'none'}, not sizes of "
            "1 or more; the header is corrupt: export the scan again")
    if voxels > MAX_VOXELS:
        raise InputError(
            f"{what} {path}: the header declares {shape} = {voxels:,} voxels per volume, more "
            f"than brainbag accepts ({MAX_VOXELS:,}); the header is corrupt or this is not a "
            "brain T1: check the file, or resample it to 1 mm first"
        )
    file_bytes = Path(path).stat().st_size
    compressed = Path(path).name.lower().endswith((".gz", ".mgz"))
    offset = int(getattr(img.dataobj, "offset", 0) or 0)
    limit = file_bytes * MAX_GZIP_RATIO if compressed else file_bytes - offset
    if nbytes > limit:
        held = f"{file_bytes:,} bytes" + (" compressed" if compressed else "")
        raise InputError(
            f"{what} {path}: the header declares {shape} voxels ({nbytes:,} bytes of "
            f"{img.header.get_data_dtype()} data) but the file holds {held}; the file is "
            "truncated or its header is corrupt: copy or export it again"
        )


def check_pixdim(img: Any, path: Path, what: str = "input") -> None:
    """Refuse a NIfTI whose voxel sizes come from ``pixdim`` (no sform) when they are zero or
    not finite: nibabel then silently uses 1 mm, a size the file never stated."""
    if not isinstance(img, nib.Nifti1Image) or int(img.header["sform_code"]) > 0:
        return
    try:  # the header as stored: nibabel's loaded copy has zero pixdims already set to 1
        with nib.openers.ImageOpener(str(path)) as fh:
            raw = type(img.header).from_fileobj(fh, check=False)
    except CORRUPT_FILE_ERRORS:
        return
    pixdim = np.asarray(raw["pixdim"][1:4], dtype=np.float64)
    if np.all(np.isfinite(pixdim)) and np.all(pixdim != 0):
        return
    raise InputError(
        f"{what} {path}: the header's voxel sizes (pixdim) are "
        f"{'x'.join(f'{v:g}' for v in pixdim)} mm and no sform gives them: a degenerate "
        "header; set the voxel sizes (e.g. fslchpixdim) or export the scan again")


def check_affine(affine: np.ndarray, path: Path, what: str = "input") -> None:
    """Refuse affines that cannot place voxels in the world."""
    if not np.all(np.isfinite(affine)):
        raise InputError(f"{what} {path} has a non-finite affine; fix its header (sform/qform)")
    zooms = voxel_sizes(affine)
    if min(zooms) <= 0 or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(
            f"{what} {path} has a degenerate affine (voxel sizes {format_mm(zooms)}); "
            "fix its header (sform/qform)"
        )
    if None in nib.aff2axcodes(affine):
        raise InputError(
            f"{what} {path} has an affine so skewed that no anatomical direction can be given "
            f"to each voxel axis (orientation {axis_codes(affine)}); fix its header "
            "(sform/qform)")


def same_grid(
    shape_a: tuple[int, ...], affine_a: np.ndarray, shape_b: tuple[int, ...], affine_b: np.ndarray,
    atol_mm: float = 1e-3,
) -> bool:
    """True when two images share the voxel grid: same shape and the same world position for
    every voxel (to ``atol_mm``)."""
    if tuple(shape_a[:3]) != tuple(shape_b[:3]):
        return False
    diff = np.abs(np.asarray(affine_a) - np.asarray(affine_b))[:3]
    # a column error grows with the index it multiplies: bound the worst corner
    extent = np.array([*shape_a[:3], 1.0])
    return bool((diff @ extent).max() <= atol_mm)


# --- index transforms -------------------------------------------------------------------------


def ras_transform(affine: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Orientation and index transform that reorient an array to closest RAS+.

    Returns ``(ornt, T)`` where ``ornt`` is nibabel's orientation array (to apply to the data) and
    ``T`` maps reoriented indices to the original indices.
    """
    ornt = nib.orientations.io_orientation(affine)
    transform = nib.orientations.inv_ornt_aff(ornt, shape)
    return ornt, np.asarray(transform, dtype=np.float64)


def reorient(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(nib.orientations.apply_orientation(data, ornt))


def to_ras(image: Image) -> tuple[Image, np.ndarray]:
    """Reorient an image to closest RAS+ by axis permutation and flips; exact, no resampling.

    Returns the reoriented image and the index transform to the original array.
    """
    ornt, transform = ras_transform(image.affine, image.shape)
    return Image(reorient(image.data, ornt), image.affine @ transform), transform


def isotropic_grid(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: float = 1.0
) -> tuple[tuple[int, int, int], np.ndarray]:
    """A grid of ``spacing`` mm voxels covering the same field of view, centred on it.

    Returns the new shape and the index transform from the new grid to the old one. The new grid
    keeps the old axes' directions, so the new affine is ``affine @ T`` with column norms
    ``spacing``.
    """
    zooms = np.array(voxel_sizes(affine))
    n = np.array(shape, dtype=np.float64)
    m = np.maximum(1, np.round(n * zooms / spacing)).astype(int)
    scale = spacing / zooms
    offset = (n - 1) / 2 - (m - 1) / 2 * scale
    transform = np.eye(4)
    transform[:3, :3] = np.diag(scale)
    transform[:3, 3] = offset
    return (int(m[0]), int(m[1]), int(m[2])), transform


def box_overlap(
    start: Sequence[int], size: Sequence[int], shape: Sequence[int],
    origin: Sequence[int] = (0, 0, 0),
) -> tuple[tuple[slice, ...], tuple[slice, ...]] | None:
    """Where a box of ``size`` voxels starting at ``start`` overlaps an array of ``shape`` whose
    first voxel sits at ``origin`` on the same grid: ``(slices into the array, slices into the
    box)``, or None when they do not overlap. For cutting views that may leave the array."""
    src, dst = [], []
    for a in range(len(size)):
        lo = max(start[a], origin[a])
        hi = min(start[a] + size[a], origin[a] + shape[a])
        if hi <= lo:
            return None
        src.append(slice(lo - origin[a], hi - origin[a]))
        dst.append(slice(lo - start[a], hi - start[a]))
    return tuple(src), tuple(dst)


def smooth_gaussian(data: np.ndarray, sigmas: Sequence[float]) -> np.ndarray:
    """Gaussian smoothing with ``sigmas`` in voxels of each axis (SimpleITK's recursive Gaussian,
    in index space, as :func:`resample`)."""
    import SimpleITK as sitk

    # SimpleITK reads a C-ordered (i, j, k) array as (z, y, x): the sigmas go reversed and the
    # result comes back as (i, j, k), with no transposing copy either way
    img = sitk.GetImageFromArray(np.ascontiguousarray(data, np.float32))
    out = sitk.SmoothingRecursiveGaussian(img, [max(float(s), 1e-6) for s in reversed(sigmas)])
    return sitk.GetArrayFromImage(out)


def anchored_grid(
    shape: tuple[int, int, int], affine: np.ndarray, spacing: float = 1.0
) -> tuple[tuple[int, int, int], np.ndarray]:
    """Like :func:`isotropic_grid`, but with voxel centres on a lattice fixed in the world.

    The new grid's centres are the points ``origin + spacing * k`` (integer ``k``, along the old
    axes' directions), where ``origin`` is the world point (0, 0, 0): cropping or padding the
    input (which moves its affine, not the anatomy) therefore gives the same samples of the
    anatomy, and so the same prediction. The grid is within half a new voxel of the centred one
    and has one more voxel per axis, so it still covers the whole field of view.
    """
    m, centred = isotropic_grid(shape, affine, spacing)
    scale = np.diag(centred[:3, :3])
    origin = np.linalg.solve(np.asarray(affine, dtype=np.float64), [0.0, 0.0, 0.0, 1.0])[:3]
    first = centred[:3, 3]
    transform = centred.copy()
    transform[:3, 3] = origin + scale * np.floor((first - origin) / scale + 1e-6)
    return (m[0] + 1, m[1] + 1, m[2] + 1), transform


def map_transform(stride: int, start: tuple[int, int, int], offset: float) -> np.ndarray:
    """Index transform from a prediction map to the array the network saw.

    Map voxel ``i`` along an axis is centred on input voxel ``stride * i + start + offset``:
    ``start`` is where the processed region begins (window start or crop) and ``offset`` is 0 for
    "same" padding and ``(RF - 1) / 2`` for "valid" padding (BAGNET3D.md).
    """
    transform = np.eye(4)
    transform[:3, :3] = np.diag([float(stride)] * 3)
    transform[:3, 3] = np.asarray(start, dtype=np.float64) + offset
    return transform


def resample(
    data: np.ndarray,
    transform: np.ndarray,
    out_shape: tuple[int, int, int],
    interpolation: Literal["linear", "nearest"] = "linear",
    fill: float = 0.0,
    extrapolate: bool = False,
    data_start: Sequence[int] = (0, 0, 0),
    out_start: Sequence[int] = (0, 0, 0),
) -> np.ndarray:
    """Resample ``data`` onto a new grid given the index transform from new to old indices.

    Uses SimpleITK in index space (unit spacing, identity direction), so the result does not depend
    on world conventions (RAS vs LPS) and oblique or flipped affines need no special case.
    Points outside the old grid get ``fill`` unless ``extrapolate`` (nearest value).

    ``data`` may be a box cut from the old grid, starting at its index ``data_start``, and the
    result a box of the new grid starting at ``out_start``: the transform is the whole grids'.
    Nearest-neighbour samples (ties included) are then the whole grids', to the last bit, when
    ``data`` spans the old grid's first axis and the result the new grid's: SimpleITK steps
    along its x axis from each line's first voxel, accumulating the step, and for
    ``"nearest"`` its x is our first axis, as it always was. Linear samples agree to rounding.
    """
    import SimpleITK as sitk

    # SimpleITK reads a C-ordered (i, j, k) array as (z, y, x). Linear: passed as it is, the
    # transform's axes reversed (no transposing copy). Nearest: transposed, so that the
    # near-ties of a transform fall as they always have.
    order = [0, 1, 2] if interpolation == "nearest" else [2, 1, 0]
    src = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(*order[::-1])))
    src.SetOrigin([float(data_start[a]) for a in order])
    ref = sitk.Image([int(out_shape[a]) for a in order], src.GetPixelID())
    ref.SetOrigin([float(out_start[a]) for a in order])
    affine = sitk.AffineTransform(3)
    affine.SetMatrix([float(v) for v in transform[np.ix_(order, order)].ravel()])
    affine.SetTranslation([float(transform[a, 3]) for a in order])
    interp = sitk.sitkLinear if interpolation == "linear" else sitk.sitkNearestNeighbor
    out = sitk.Resample(src, ref, affine, interp, float(fill), src.GetPixelID(), extrapolate)
    return np.ascontiguousarray(sitk.GetArrayFromImage(out).transpose(*order[::-1]))

def resample_masked(
    values: np.ndarray,
    grid_to_values: np.ndarray,
    out_shape: tuple[int, int, int],
    out_mask: np.ndarray,
) -> np.ndarray:
    """Resample an array that is NaN where it has no value (a map outside the brain) onto a grid.

    ``grid_to_values`` is the index transform from the new grid to ``values``' indices. Linear
    interpolation of the finite values, normalised by the interpolated weight of finite cells, so
    NaN cells do not bleed into their neighbours; NaN where ``out_mask`` is False or no finite
    cell is near.
    """
    valid = np.isfinite(values)
    filled = np.where(valid, values, 0.0).astype(np.float32)
    num = resample(filled, grid_to_values, out_shape, "linear", extrapolate=True)
    den = resample(valid.astype(np.float32), grid_to_values, out_shape, "linear",
                   extrapolate=True)
    out = np.full(out_shape, np.nan, dtype=np.float32)
    ok = (den > 1e-3) & np.asarray(out_mask, dtype=bool)
    out[ok] = num[ok] / den[ok]
    return out


# --- writing ----------------------------------------------------------------------------------


def make_nifti(
    data: np.ndarray,
    affine: np.ndarray,
    xform_code: int = 1,
    cal_range: tuple[float, float] | None = None,
    description: str = "",
) -> nib.Nifti1Image:
    """A float32 NIfTI-1 image with qform and sform both set to ``affine``."""
    img = nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine)
    img.set_sform(affine, code=int(xform_code))
    img.set_qform(affine, code=int(xform_code))
    img.header.set_xyzt_units("mm")
    if cal_range is not None:
        img.header["cal_min"], img.header["cal_max"] = (float(cal_range[0]), float(cal_range[1]))
    if description:
        img.header["descrip"] = description.encode("ascii", "replace")[:79]
    return img
