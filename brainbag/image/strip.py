"""Skull stripping built in: deepbet's networks on the image in memory, the mask on the input grid.

A raw T1 (skull on) is stripped with deepbet (Fisch et al. 2024, MIT licence, PyPI ``deepbet``):
two TorchScript networks that ship inside its wheel, so stripping runs offline. Only the exact
network files pinned here are loaded (their sha256 is checked first: a TorchScript archive is code).

Geometry, as everywhere in brainbag (:mod:`brainbag.image.io`): the input array is reoriented to
closest RAS+ by exact axis permutation and flips (what deepbet's own ``nib.as_closest_canonical``
does), the networks run on that array, and the mask is permuted and flipped back, so it lies on the
input's own grid (same shape and affine) and overlays the scan voxel for voxel.

deepbet is imported only when a scan is stripped (never for ``brainbag --help`` or a
skull-stripped input), and its networks are loaded once per process and device.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

from brainbag.errors import InputError, ProcessingError, WeightsError, one_line
from brainbag.image.io import LoadedImage, bounding_box, ras_transform, reorient, voxel_sizes

METHOD = "deepbet"
# the deepbet release whose networks are pinned below; the install hint names it
DEEPBET_PIN = "1.0.2"
INSTALL_HINT = f"pip install deepbet=={DEEPBET_PIN}"
# sha256 of the two TorchScript files in the deepbet 1.0.2 wheel (<site-packages>/data/models/),
# computed from the installed files and equal to the hashes in the wheel's RECORD
MODEL_SHA256 = {
    "model.pt": "de8ee7c69654d0dd3935dc4a5d84571d8ecf4637a6bfc01df399c4c2bc86e0fd",
    "bbox_model.pt": "39a7b2b5f799faa1391ea97bfcdc0b9299f20d84f2316a4ff8918dc4685e40aa",
}
# deepbet's own default: a voxel is brain where the network's brain probability exceeds it
THRESHOLD = 0.5

# Plausible volume of an adult brain mask (brain and the CSF inside its outline), in mL. deepbet's
# masks of every shared labelled scan (50 IXI at 2 mm, 9 IXI native, 72 OpenNeuro ds002748) and the
# two raw samples (1.55 L each) span 1.08-1.84 L, the 50 provided IXI masks 1.08-1.85 L (ages
# 19-74, both sexes). The bounds leave a wide margin for small and atrophied brains and for large
# heads, and still catch a mask that lost a hemisphere, leaked into the neck or the scalp, or
# found no brain at all.
MIN_BRAIN_ML = 800.0
MAX_BRAIN_ML = 2200.0
# A separate piece smaller than this is a speck (a few voxels left by a threshold), not a second
# piece of brain; a piece of this size or more (an eye is ~7 mL) makes the mask implausible.
MIN_PIECE_ML = 1.0


class StripperMissing(InputError):
    """A raw head needs stripping but deepbet cannot be imported."""


@dataclass(frozen=True, eq=False)
class StripResult:
    """A brain mask made by skull stripping, on the input's voxel grid."""

    mask: np.ndarray  # bool, the input array's shape; the input's affine places it
    version: str  # deepbet's installed version
    threshold: float
    volume_ml: float
    n_components: int  # 26-connected pieces of the mask, of any size
    seconds: float  # networks and post-processing, excluding the one-off network loading
    device: str = "cpu"
    method: str = METHOD
    model_sha256: dict[str, str] = field(default_factory=lambda: dict(MODEL_SHA256))

    def to_record(self) -> dict[str, Any]:
        """What prediction.json records about the stripping (JSON types only)."""
        return {
            "method": self.method,
            "version": self.version,
            "threshold": float(self.threshold),
            "volume_ml": round(float(self.volume_ml), 1),
            "n_components": int(self.n_components),
            "seconds": round(float(self.seconds), 2),
            "device": self.device,
            "model_sha256": dict(self.model_sha256),
        }


# --- loading deepbet (lazily, once per process and device) -------------------------------------

_EXTRACTORS: dict[str, Any] = {}
_EXTRACTOR_LOCK = threading.Lock()
# BrainExtraction keeps the bounding box of the last scan on itself (run_model sets it,
# postprocess reads it): one scan at a time per extractor
_RUN_LOCKS: dict[str, threading.Lock] = {}


def _import_deepbet(path: Path) -> Any:
    """deepbet's ``BrainExtraction`` class, or a one-line :class:`StripperMissing`."""
    try:
        from deepbet.bet import BrainExtraction
    except ImportError as exc:
        raise StripperMissing(
            f"{path} needs skull stripping, which brainbag does with deepbet, but deepbet could "
            f"not be imported ({one_line(str(exc))}): {INSTALL_HINT}, or pass a brain mask with "
            "--mask, or --strip never to refuse raw heads") from exc
    return BrainExtraction


def deepbet_available() -> bool:
    """Whether deepbet is installed (found, not imported: importing it loads pandas and more)."""
    from importlib.util import find_spec

    try:
        return find_spec("deepbet") is not None
    except (ImportError, ValueError):  # a broken install, or a None entry in sys.modules
        return False


def deepbet_version() -> str:
    """The installed deepbet's version, or "" when it is not installed."""
    try:
        return metadata.version("deepbet")
    except metadata.PackageNotFoundError:
        return ""


def model_files() -> dict[str, Path]:
    """The two network files of the installed deepbet (``<site-packages>/data/models/``)."""
    from deepbet.utils import DATA_PATH

    return {name: Path(DATA_PATH) / "models" / name for name in MODEL_SHA256}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_model_files(files: dict[str, Path]) -> None:
    """Raise :class:`WeightsError` unless every file has its pinned sha256."""
    for name, path in files.items():
        try:
            found = _sha256(path)
        except OSError as exc:
            raise WeightsError(
                f"deepbet's network {path} could not be read ({type(exc).__name__}: {exc}); "
                f"reinstall it: pip install --force-reinstall deepbet=={DEEPBET_PIN}") from exc
        if found != MODEL_SHA256[name]:
            raise WeightsError(
                f"deepbet's network {path} has sha256 {found[:12]}..., not the pinned "
                f"{MODEL_SHA256[name][:12]}... of deepbet {DEEPBET_PIN} (installed: deepbet "
                f"{deepbet_version() or 'unknown'}); brainbag loads only the pinned networks: "
                f"pip install --force-reinstall deepbet=={DEEPBET_PIN}")


def _extractor(device: str, path: Path) -> tuple[Any, threading.Lock]:
    """deepbet's ``BrainExtraction`` for ``device``, built (imported, verified, loaded) once."""
    key = str(device)
    with _EXTRACTOR_LOCK:
        if key not in _EXTRACTORS:
            brain_extraction = _import_deepbet(path)
            files = model_files()
            verify_model_files(files)
            import torch

            with warnings.catch_warnings():  # torch 2.13 deprecates torch.jit.load; it works
                warnings.filterwarnings("ignore", category=DeprecationWarning,
                                        message=".*torch.jit.load")
                bet = brain_extraction(no_gpu=True, model_path=str(files["model.pt"]),
                                       bbox_model_path=str(files["bbox_model.pt"]))
            if torch.device(key).type != "cpu":  # an exact device ("cuda:1"), not deepbet's pick
                bet.model.to(torch.device(key))
                bet.bbox_model.to(torch.device(key))
            _EXTRACTORS[key] = bet
            _RUN_LOCKS[key] = threading.Lock()
        return _EXTRACTORS[key], _RUN_LOCKS[key]


@contextmanager
def thread_budget(threads: int | None) -> Iterator[None]:
    """Run the block under ``torch.set_num_threads(threads)`` and restore the old count (torch's
    setting is per process: concurrent blocks with different budgets would race)."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(threads)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --- geometry and mask measures ----------------------------------------------------------------


def to_ras_array(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``data`` reoriented to closest RAS+ (exact permutation and flips) and nibabel's
    orientation array that did it."""
    ornt, _ = ras_transform(affine, data.shape[:3])  # type: ignore[arg-type]
    return reorient(data, ornt), ornt


def from_ras_array(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    """Undo :func:`to_ras_array`: back to the input array's axis order and directions."""
    back = nib.orientations.ornt_transform(np.array([[0, 1], [1, 1], [2, 1]]), ornt)
    return reorient(data, back)


def component_sizes(mask: np.ndarray) -> np.ndarray:
    """Voxel counts of the 26-connected pieces of a 3D mask, largest first (empty: no piece)."""
    import SimpleITK as sitk

    box = bounding_box(np.asarray(mask, dtype=bool))
    if box is None:
        return np.zeros(0, dtype=np.int64)
    (i0, j0, k0), (i1, j1, k1) = box  # pieces lie inside the mask's box: a quarter of a head scan
    image = sitk.GetImageFromArray(np.ascontiguousarray(mask[i0:i1, j0:j1, k0:k1], np.uint8))
    # a copy: a view (GetArrayViewFromImage) of the temporary label image would outlive it
    labels = sitk.GetArrayFromImage(sitk.ConnectedComponent(image, True))
    sizes = np.bincount(labels.ravel())[1:]
    return np.sort(sizes[sizes > 0])[::-1]


def voxel_ml(zooms: tuple[float, ...]) -> float:
    return float(math.prod(float(z) for z in zooms[:3])) / 1000.0


# --- stripping ---------------------------------------------------------------------------------


def strip_brain(loaded: LoadedImage, threads: int | None = None,
                device: str = "cpu") -> StripResult:
    """Skull-strip ``loaded`` with deepbet; the mask is on the input's grid (shape and affine).

    ``threads``: torch's thread count while stripping (the run's budget), restored afterwards.
    ``device``: where the networks run ("cpu", "cuda", "cuda:1"). Does not judge the mask: call
    :func:`check_mask_plausible` before using it.
    """
    path = Path(loaded.path)
    bet, run_lock = _extractor(device, path)
    version = deepbet_version()
    affine = loaded.image.affine
    data = loaded.image.data
    x, ornt = to_ras_array(data, affine)
    # deepbet's networks get a float32 array of their own; it turns NaN into 0 but +-inf into
    # +-3.4e38, which would wreck its percentile normalisation: no finite value, no signal
    x = np.where(np.isfinite(x), x, np.float32(0.0)).astype(np.float32, copy=True)
    with thread_budget(threads), run_lock:
        start = time.perf_counter()
        try:
            probability = bet.run_model(x)
            mask = bet.postprocess(probability > THRESHOLD, 0)
        except (AssertionError, ValueError) as exc:  # no foreground, or no component at all
            raise InputError(
                f"{path}: skull stripping (deepbet) found no brain in this image "
                f"({one_line(str(exc)) or type(exc).__name__}); check that it is a T1 of a head, "
                "or pass a brain mask with --mask") from exc
        except RuntimeError as exc:
            raise ProcessingError(
                f"{path}: skull stripping (deepbet) failed on {device} "
                f"({one_line(str(exc))[:300]})") from exc
        seconds = time.perf_counter() - start
    mask = from_ras_array(np.asarray(mask, dtype=bool), ornt)
    if mask.shape != data.shape:  # the orientation round trip is exact; never expected
        raise ProcessingError(
            f"{path}: the brain mask came back with shape {mask.shape}, not the input's "
            f"{data.shape}")
    sizes = component_sizes(mask)
    return StripResult(
        mask=mask,
        version=version,
        threshold=THRESHOLD,
        volume_ml=float(sizes.sum()) * voxel_ml(voxel_sizes(affine)),
        n_components=int(sizes.size),
        seconds=seconds,
        device=str(device),
    )


def check_mask_plausible(result_or_mask: StripResult | np.ndarray, zooms: tuple[float, ...],
                         path: Path | str) -> None:
    """Raise a one-line :class:`InputError` when a brain mask is not a plausible adult brain:
    its volume is outside :data:`MIN_BRAIN_ML`-:data:`MAX_BRAIN_ML`, or it is in more than one
    piece of :data:`MIN_PIECE_ML` or more. ``zooms`` are the mask's voxel sizes in mm."""
    stripped = isinstance(result_or_mask, StripResult)
    mask = result_or_mask.mask if isinstance(result_or_mask, StripResult) else result_or_mask
    mask = np.asarray(mask, dtype=bool)
    unit = voxel_ml(zooms)
    sizes = component_sizes(mask)
    volume = float(sizes.sum()) * unit
    if stripped:
        what = "the brain mask made by skull stripping (deepbet)"
        fix = ("check that it is a T1 of a whole adult head, or strip it yourself and pass "
               "the mask with --mask")
    else:
        what = "the brain mask"
        fix = "check the mask (open it over the scan) and make it again"
    bounds = f"an adult brain is {MIN_BRAIN_ML / 1000:g}-{MAX_BRAIN_ML / 1000:g} L"
    if volume < MIN_BRAIN_ML or volume > MAX_BRAIN_ML:
        size = ("empty" if volume == 0 else f"{volume:.0f} mL" if volume < 100
                else f"{volume / 1000:.2f} L")
        raise InputError(f"{path}: {what} is {size}; {bounds}: {fix}")
    pieces = sizes[sizes * unit >= MIN_PIECE_ML]
    if pieces.size > 1:
        listed = ", ".join(f"{n * unit:.0f} mL" for n in pieces[:4])
        more = f" and {pieces.size - 4} more" if pieces.size > 4 else ""
        raise InputError(
            f"{path}: {what} is in {pieces.size} separate pieces ({listed}{more}), not one "
            f"brain; {fix}")
