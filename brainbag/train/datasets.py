"""Training and evaluation data: which images, which labels, which split, and the volume cache.

Layouts ``DATA`` may have:

Brain masks: an image's mask file is used when it has one; without one, a head (skull on) is
skull-stripped with deepbet and any other image is taken as skull-stripped (brain = voxels > 0),
decided exactly as ``predict`` decides (:func:`brainbag.image.masks.choose_brain_mask`); stripped
masks are kept in a :class:`~brainbag.image.masks.MaskCache` so each scan is stripped once.

* **participants table**: a ``.tsv`` (or ``.csv``) file with one row per image and the columns
  ``participant_id``, ``age``, ``sex``, ``t1w`` and optionally ``mask`` and ``split``; image paths
  are relative to the table's folder (``../shared/data/ixi/participants.tsv`` is one).
* **BIDS**: a folder with ``participants.tsv`` (``participant_id``, ``age``, ``sex``) and
  ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]``. A brain mask next to a T1w, named like it with
  ``_T1w`` replaced by ``_desc-brain_mask`` or ``_mask``, is used; otherwise brain = voxels > 0.
* **Cam-CAN as in the paper**: a folder with ``sub-<CCID>_T1w_stripped.nii.gz`` and
  ``sub-<CCID>_T1w_brain_mask.nii.gz`` (the published code's layout) or a BIDS tree without
  ``participants.tsv``; the paper's split files (``Observations``, ``age``, ``gender_code`` with
  1 = male, 2 = female) give the subjects, labels and split.

Splits. A split source is a folder holding ``train``, ``val`` and ``test`` ``.csv``/``.tsv``
files (``participant_id`` or ``Observations`` column), or a ``splits.tsv`` written by
``brainbag train`` (``participant_id`` and ``split`` columns). Without one, subjects (not images)
are split at random with a seed, so a subject with several images stays on one side. Participant
ids match with or without the BIDS ``sub-`` prefix.

Sex is ``"F"`` or ``"M"``; the network's sex head predicts P(female).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from brainbag.errors import InputError, UsageError
from brainbag.image.io import bounding_box, box_overlap
from brainbag.person.tables import ID_COLUMNS, MISSING, bare, column, labels, read_table
from brainbag.run.discover import discover_bids, read_description

if TYPE_CHECKING:
    from brainbag.image.io import LoadedImage
    from brainbag.image.masks import BrainMaskChoice, MaskCache, MaskNote
    from brainbag.image.preprocess import Conformed

SPLITS = ("train", "val", "test")
TABLE_SUFFIXES = (".tsv", ".csv")
_IMAGE_COLUMNS = ("t1w", "image", "path")


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image. ``sex`` is ``"F"``, ``"M"`` or None; ``split`` one of SPLITS or None.

    ``dataset`` is the data set the image comes from (a table's ``dataset`` column, else the
    table's or BIDS folder's name), ``site`` its ``site`` column, ``cohort`` its ``group`` column
    (e.g. ``control`` or ``depression``); None where the table has none.
    """

    participant_id: str
    t1w: Path
    mask: Path | None = None
    age: float | None = None
    sex: str | None = None
    split: str | None = None
    session: str | None = None
    dataset: str | None = None
    site: str | None = None
    cohort: str | None = None

    @property
    def group(self) -> str:
        """The key that keeps a subject's images together: the id without ``sub-``."""
        return bare(self.participant_id)


@dataclass
class DataSource:
    """Every image found in ``DATA``, with where its labels and split came from."""

    records: list[ImageRecord]
    layout: str
    root: Path
    name: str
    licence: str | None = None
    split_source: str | None = None

    def select(self, split: str) -> list[ImageRecord]:
        """Records of one split (``"all"`` = every record)."""
        if split == "all":
            return list(self.records)
        return [r for r in self.records if r.split == split]

    def counts(self) -> dict[str, int]:
        """Images per split (``none`` = not assigned)."""
        out = {s: 0 for s in SPLITS}
        for r in self.records:
            out[r.split or "none"] = out.get(r.split or "none", 0) + 1
        return out


def _split_value(value: str | None, where: str) -> str | None:
    text = (value or "").strip().lower()
    if text in MISSING:
        return None
    aliases = {"validation": "val", "valid": "val", "training": "train"}
    text = aliases.get(text, text)
    if text not in SPLITS:
        raise InputError(f"{where}: split {value!r} is not one of {', '.join(SPLITS)}")
    return text


# --- layouts -----------------------------------------------------------------------------------


def read_participants_table(path: Path) -> DataSource:
    """A table with one row per image (``t1w`` and optional ``mask`` paths relative to it)."""
    header, rows = read_table(path)
    id_col = column(header, ID_COLUMNS)
    img_col = column(header, _IMAGE_COLUMNS)
    if id_col is None or img_col is None:
        raise InputError(
            f"{path} has columns {header}; a participants table needs 'participant_id' and "
            "'t1w' (image path relative to the table) and usually 'age' and 'sex'"
        )
    base = path.parent
    records = []
    name = table_name(path)
    for n, row in enumerate(rows, start=2):
        where = f"{path}, row {n}"
        if not row[img_col]:
            raise InputError(f"{where}: empty {img_col!r} path")
        age, sex = labels(row, header, where)
        mask = row.get("mask") or None
        records.append(ImageRecord(
            participant_id=row[id_col],
            t1w=(base / row[img_col]),
            mask=(base / mask) if mask else None,
            age=age,
            sex=sex,
            split=_split_value(row.get("split"), where) if "split" in header else None,
            session=row.get("session_id") or row.get("session") or None,
            **_origin(row, name),
        ))
    if not records:
        raise InputError(f"{path} lists no images")
    # a table of several data sets (brainbag crossval's data.tsv) is named after them
    named = " + ".join(sorted({r.dataset for r in records if r.dataset})) \
        if "dataset" in header else ""
    return DataSource(records, "table", base, name=named or path.parent.name or str(path),
                      split_source=f"'split' column of {path}" if "split" in header else None)


def table_name(path: Path) -> str:
    """The dataset name of a table without a ``dataset`` column: its folder's name for a
    ``participants.tsv`` (``ixi/participants.tsv`` -> ``ixi``), else the file's stem."""
    if path.stem.lower() == "participants" and path.parent.name:
        return path.parent.name
    return path.stem


def _text(value: str | None) -> str | None:
    text = (value or "").strip()
    return None if text.lower() in MISSING else text


def _origin(row: dict[str, str], dataset: str) -> dict[str, str | None]:
    """A row's dataset, site and cohort (``dataset``, ``site`` and ``group`` columns)."""
    return {"dataset": _text(row.get("dataset")) or dataset, "site": _text(row.get("site")),
            "cohort": _text(row.get("group"))}


def _bids_mask(t1w: Path) -> Path | None:
    name = t1w.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith("_T1w" + suffix):
            stem = name[: -len("_T1w" + suffix)]
            for candidate in ("_desc-brain_mask", "_mask"):
                for ext in (".nii.gz", ".nii"):
                    path = t1w.with_name(stem + candidate + ext)
                    if path.exists():
                        return path
    return None


def _bids_images(root: Path) -> dict[str, list[tuple[Path, str | None]]]:
    """``(T1w, session)`` per subject (bare id), found as ``brainbag predict`` finds them."""
    found: dict[str, list[tuple[Path, str | None]]] = {}
    for item in discover_bids(root).items:
        found.setdefault(bare(item.subject), []).append((item.path, item.session))
    return found


def read_bids(root: Path) -> DataSource:
    """A BIDS folder: labels from participants.tsv, images from sub-*/[ses-*/]anat/*_T1w."""
    table = root / "participants.tsv"
    header, rows = read_table(table)
    if "participant_id" not in header:
        raise InputError(f"{table} has no 'participant_id' column (BIDS requires one)")
    records = []
    without = []
    found = _bids_images(root)
    for n, row in enumerate(rows, start=2):
        age, sex = labels(row, header, f"{table}, row {n}")
        images = found.get(bare(row["participant_id"]), [])
        if not images:
            without.append(row["participant_id"])
        for path, ses in images:
            records.append(ImageRecord(row["participant_id"], path, _bids_mask(path), age, sex,
                                       session=ses, **_origin(row, root.name)))
    if not records:
        raise InputError(
            f"{root}: participants.tsv lists {len(rows)} subjects but no "
            "sub-<id>/[ses-<id>/]anat/*_T1w.nii[.gz] image was found"
        )
    desc = read_description(root)
    source = DataSource(records, "bids", root, name=str(desc.get("Name") or root.name),
                        licence=desc.get("License"))
    if without:
        source.name += f" ({len(without)} listed subjects without a T1w image skipped)"
    return source


def _camcan_image(root: Path, ccid: str, bids: dict[str, list[tuple[Path, str | None]]]
                  ) -> tuple[Path, Path | None] | None:
    flat = root / f"sub-{ccid}_T1w_stripped.nii.gz"
    if flat.exists():
        mask = root / f"sub-{ccid}_T1w_brain_mask.nii.gz"
        return flat, mask if mask.exists() else None
    images = bids.get(ccid)
    if images:
        return images[0][0], _bids_mask(images[0][0])
    return None


def read_camcan(root: Path, split: Path) -> DataSource:
    """Cam-CAN images under ``root`` with subjects, labels and split from the split files."""
    tables = split_tables(split)
    records = []
    missing = []
    bids = _bids_images(root)
    for name, table in tables.items():
        header, rows = read_table(table)
        id_col = column(header, ID_COLUMNS)
        if id_col is None:
            raise InputError(f"{table} has no 'Observations' or 'participant_id' column")
        for n, row in enumerate(rows, start=2):
            ccid = bare(row[id_col])
            age, sex = labels(row, header, f"{table}, row {n}")
            found = _camcan_image(root, ccid, bids)
            if found is None:
                missing.append(ccid)
                continue
            records.append(ImageRecord(ccid, found[0], found[1], age, sex, split=name))
    if missing:
        raise InputError(
            f"{root}: {len(missing)} subjects of the split files in {split} have no image "
            f"(first: {missing[0]}); expected sub-<CCID>_T1w_stripped.nii.gz (+ "
            "sub-<CCID>_T1w_brain_mask.nii.gz) or sub-<CCID>/anat/sub-<CCID>_T1w.nii.gz"
        )
    return DataSource(records, "camcan", root, name="Cam-CAN", split_source=str(split))


def split_tables(split: Path) -> dict[str, Path]:
    """``{"train": path, "val": path, "test": path}`` of a split folder (missing ones left out)."""
    if not split.is_dir():
        raise InputError(f"split folder not found: {split}")
    found = {}
    for name in SPLITS:
        for suffix in (".csv", ".tsv"):
            if (split / f"{name}{suffix}").is_file():
                found[name] = split / f"{name}{suffix}"
                break
    if "train" not in found:
        raise InputError(f"split folder {split} has no train.csv or train.tsv")
    return found


def read_split_source(split: Path) -> dict[str, str]:
    """``{bare participant id: split}`` from a split folder or a splits.tsv file."""
    assignment: dict[str, str] = {}
    if split.is_dir():
        for name, table in split_tables(split).items():
            header, rows = read_table(table)
            id_col = column(header, ID_COLUMNS)
            if id_col is None:
                raise InputError(f"{table} has no 'participant_id' or 'Observations' column")
            for row in rows:
                _assign(assignment, bare(row[id_col]), name, split)
        return assignment
    header, rows = read_table(split)
    id_col = column(header, ID_COLUMNS)
    if id_col is None or "split" not in header:
        raise InputError(f"{split} needs 'participant_id' and 'split' columns, has {header}")
    for n, row in enumerate(rows, start=2):
        value = _split_value(row["split"], f"{split}, row {n}")
        if value is not None:
            _assign(assignment, bare(row[id_col]), value, split)
    return assignment


def _assign(assignment: dict[str, str], pid: str, name: str, source: Path) -> None:
    if assignment.get(pid, name) != name:
        raise InputError(
            f"{source}: subject {pid} is in both {assignment[pid]} and {name}; a subject's "
            "images must stay on one side of a split"
        )
    assignment[pid] = name


def discover(data: Path, split: Path | None = None) -> DataSource:
    """Find every image and label in ``data`` and assign splits from ``split`` when given."""
    data = Path(data)
    if not data.exists():
        raise InputError(f"training data not found: {data}")
    if data.is_file():
        if data.suffix.lower() not in TABLE_SUFFIXES:
            raise InputError(f"{data} is not a participants table (.tsv or .csv) or a folder")
        source = read_participants_table(data)
    elif (data / "participants.tsv").is_file() and any(data.glob("sub-*/")):
        source = read_bids(data)
    elif split is not None and split.is_dir():
        return read_camcan(data, split)
    elif (data / "participants.tsv").is_file():
        source = read_participants_table(data / "participants.tsv")
    else:
        raise InputError(
            f"{data}: no participants.tsv and no split files; give a BIDS folder, a participants "
            "table (.tsv with participant_id, age, sex, t1w) or Cam-CAN images with --split"
        )
    if split is not None:
        source = apply_split(source, split)
    check_grouped(source.records)
    return source


def discover_all(paths: Sequence[Path]) -> DataSource:
    """Every image of several ``DATA`` (participants tables, BIDS folders) as one source.

    Each record keeps its dataset (the table's ``dataset`` column, else its name, see
    :func:`table_name`). Participant ids must be unique across the data (a subject's images are
    kept together by id): the same id in two of them is refused, and so are two data sets of
    the same name."""
    if not paths:
        raise UsageError("give at least one training table or data folder")
    sources = [discover(Path(p)) for p in paths]
    if len(sources) == 1:
        return sources[0]
    owner: dict[str, Path] = {}
    named: dict[str, Path] = {}
    for path, source in zip(paths, sources, strict=True):
        for name in sorted({r.dataset or source.name for r in source.records}):
            if named.setdefault(name, Path(path)) != Path(path):
                raise InputError(
                    f"{path} and {named[name]} are both data set {name!r}; give one of them a "
                    "'dataset' column (or put both in one table) so that figures per data set "
                    "stay apart")
        for r in source.records:
            first = owner.setdefault(r.group, Path(path))
            if first != Path(path):
                raise InputError(
                    f"subject {r.participant_id} is in both {first} and {path}; participant ids "
                    "must be unique across the tables (prefix them with the data set, e.g. "
                    "ds002748-sub-01), or put a subject's images in one table")
    records = [replace(r, dataset=r.dataset or s.name) for s in sources for r in s.records]
    roots = [str(s.root.resolve()) for s in sources]
    return DataSource(records, "tables", Path(os.path.commonpath(roots)),
                      name=" + ".join(s.name for s in sources))


COMBINED_COLUMNS = ("participant_id", "session", "age", "sex", "dataset", "site", "group",
                    "t1w", "mask")


def combined_table(records: Sequence[ImageRecord]) -> str:
    """A participants table of ``records`` with absolute image paths, which
    :func:`read_participants_table` reads back to the same records (split aside)."""
    lines = ["\t".join(COMBINED_COLUMNS)]
    for r in records:
        values = [r.participant_id, r.session or "", "" if r.age is None else repr(r.age),
                  r.sex or "", r.dataset or "", r.site or "", r.cohort or "",
                  str(r.t1w.resolve()), str(r.mask.resolve()) if r.mask else ""]
        if any("\t" in v or "\n" in v for v in values):
            raise InputError(f"{r.t1w}: a tab or line break in a value of {r.participant_id} "
                             "cannot be written to a table")
        lines.append("\t".join(values))
    return "\n".join(lines) + "\n"


def apply_split(source: DataSource, split: Path) -> DataSource:
    """Assign every record the split its participant has in ``split``; unlisted ones get none."""
    assignment = read_split_source(split)
    records = [replace(r, split=assignment.get(r.group)) for r in source.records]
    if not any(r.split == "train" for r in records):
        raise InputError(
            f"no image of {source.root} belongs to a subject in the train split of {split}; "
            "do the participant ids match?"
        )
    return replace(source, records=records, split_source=str(split))


def random_split(
    records: Sequence[ImageRecord], val_fraction: float, test_fraction: float, seed: int
) -> list[ImageRecord]:
    """Split by subject at random: a subject's images all go to one side.

    Subjects are shuffled with ``seed``; the first ``round(val_fraction * n)`` go to val, the next
    ``round(test_fraction * n)`` to test (at least one each when the fraction is > 0 and there are
    enough subjects), the rest to train.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise UsageError(
            f"val and test fractions must be in [0, 1) with a sum below 1, got {val_fraction} "
            f"and {test_fraction}"
        )
    groups = sorted({r.group for r in records})
    order = np.random.default_rng(seed).permutation(len(groups))
    n = len(groups)

    def count(fraction: float) -> int:
        return max(1, round(fraction * n)) if fraction > 0 and n >= 3 else 0

    n_val, n_test = count(val_fraction), count(test_fraction)
    assignment = {}
    for rank, i in enumerate(order):
        assignment[groups[i]] = (
            "val" if rank < n_val else "test" if rank < n_val + n_test else "train"
        )
    return [replace(r, split=assignment[r.group]) for r in records]


def check_grouped(records: Iterable[ImageRecord]) -> None:
    """Refuse a split that puts one subject's images on two sides."""
    seen: dict[str, str | None] = {}
    for r in records:
        if r.group in seen and seen[r.group] != r.split:
            raise InputError(
                f"subject {r.participant_id} has images in both {seen[r.group]} and {r.split}; "
                "a subject's images must stay on one side of a split"
            )
        seen[r.group] = r.split


SPLITS_TSV_COLUMNS = ("participant_id", "session", "split", "age", "sex", "t1w", "mask",
                      "dataset", "site", "group")


def splits_tsv(records: Sequence[ImageRecord]) -> str:
    """The text of a ``splits.tsv`` recording which image went to which split."""
    lines = ["\t".join(SPLITS_TSV_COLUMNS)]
    for r in records:
        values = [r.participant_id, r.session or "", r.split or "",
                  "" if r.age is None else f"{r.age:g}", r.sex or "", str(r.t1w),
                  str(r.mask) if r.mask else "", r.dataset or "", r.site or "", r.cohort or ""]
        lines.append("\t".join(v.replace("\t", " ") for v in values))
    return "\n".join(lines) + "\n"


# --- volumes -----------------------------------------------------------------------------------


@dataclass
class Volume:
    """A conformed, whitened volume trimmed to its brain's bounding box.

    ``data`` holds the conformed array's voxels ``offset`` to ``offset + data.shape``; every voxel
    outside that box equals ``background`` (voxels outside the brain mask are whitened zeros), so
    any view of the full ``shape`` is rebuilt exactly by :meth:`crop`.
    """

    data: Any  # torch.Tensor (X, Y, Z)
    offset: tuple[int, int, int]
    shape: tuple[int, int, int]
    background: float
    mask: Any = None  # torch.Tensor (X, Y, Z) bool, the brain mask on ``data``'s box
    brain: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None  # mask bbox [lo, hi)
    mask_note: MaskNote | None = None  # where the brain mask came from (given, stripped, > 0)

    def crop(self, start: Sequence[int], size: Sequence[int]) -> Any:
        """The ``size`` view of the full conformed array starting at ``start`` (may be negative
        or run past the end: those voxels are background), as float32 on ``data``'s device."""
        return self._view(self.data, start, size, self.background)

    def crop_mask(self, start: Sequence[int], size: Sequence[int]) -> Any:
        """The brain mask over the same view as :meth:`crop` (float32, 0 outside)."""
        if self.mask is None:
            raise ValueError("this volume was loaded without its mask")
        return self._view(self.mask, start, size, 0.0)

    def _view(self, box: Any, start: Sequence[int], size: Sequence[int], fill: float) -> Any:
        """``size`` voxels of the full grid from ``start``, cut from ``box`` (which holds the
        voxels from ``offset`` on) and ``fill`` elsewhere, as float32 on ``data``'s device."""
        import torch

        out = torch.full(tuple(size), fill, dtype=torch.float32, device=self.data.device)
        overlap = box_overlap(start, size, box.shape, self.offset)
        if overlap is not None:
            out[overlap[1]] = box[overlap[0]].to(torch.float32)
        return out

    def brain_start(self, size: Sequence[int]) -> tuple[int, int, int]:
        """Start of the ``size`` view centred on the brain's bounding box (as predict's
        :func:`brainbag.network.inference.brain_view`, without growing: a larger brain is cut)."""
        lo, hi = self.brain if self.brain is not None else (
            self.offset, tuple(o + n for o, n in zip(self.offset, self.data.shape, strict=True)))
        return (lo[0] - (size[0] - (hi[0] - lo[0])) // 2,
                lo[1] - (size[1] - (hi[1] - lo[1])) // 2,
                lo[2] - (size[2] - (hi[2] - lo[2])) // 2)

    @property
    def nbytes(self) -> int:
        return int(self.data.numel() * self.data.element_size())


def record_mask(record: ImageRecord, cache: MaskCache | None = None, device: str = "cpu",
                loaded: LoadedImage | None = None) -> tuple[LoadedImage, BrainMaskChoice]:
    """One image read (unless ``loaded`` is given) and its brain mask, chosen as ``predict``
    chooses it (given file, deepbet for a head, else voxels > 0); stripped masks go through
    ``cache``. Returns ``(LoadedImage, BrainMaskChoice)``."""
    from brainbag.image.io import load_image
    from brainbag.image.masks import choose_brain_mask

    loaded = loaded if loaded is not None else load_image(record.t1w)
    return loaded, choose_brain_mask(loaded, record.mask, "auto", device=device, cache=cache)


def prepare_record(record: ImageRecord, spacing: float = 1.0, cache: MaskCache | None = None,
                   device: str = "cpu") -> tuple[Conformed, MaskNote]:
    """Read one image, choose its brain mask (:func:`record_mask`) and conform it with the code
    ``predict`` uses; returns the conformed image and where its mask came from."""
    from brainbag.image.preprocess import conform

    loaded, choice = record_mask(record, cache, device)
    return conform(loaded, choice.mask, spacing=spacing), choice.note()


def conform_record(record: ImageRecord, spacing: float = 1.0, cache: MaskCache | None = None,
                   device: str = "cpu") -> Conformed:
    """Read one image, choose its mask and conform it with the code ``predict`` uses."""
    return prepare_record(record, spacing, cache, device)[0]


def load_volume(record: ImageRecord, dtype: Any = None, spacing: float = 1.0,
                cache: MaskCache | None = None, device: str = "cpu") -> Volume:
    """Read, mask (as ``predict`` does, stripped masks through ``cache``), conform (at
    ``spacing`` mm) and trim one image."""
    import torch

    conformed, note = prepare_record(record, spacing, cache, device)
    data = conformed.image.data
    background = float(np.float32(conformed.background))
    bounds = bounding_box((data != np.float32(background)) | conformed.mask)
    lo, hi = bounds if bounds is not None else (np.zeros(3, int), np.ones(3, int))
    box = data[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    tensor = torch.from_numpy(np.ascontiguousarray(box))
    if dtype is not None:
        tensor = tensor.to(dtype)
    mask = torch.from_numpy(np.ascontiguousarray(conformed.mask[lo[0]:hi[0], lo[1]:hi[1],
                                                                lo[2]:hi[2]]))
    brain = bounding_box(conformed.mask)
    brain_box = None if brain is None else (
        tuple(int(v) for v in brain[0]), tuple(int(v) for v in brain[1]))
    return Volume(tensor, (int(lo[0]), int(lo[1]), int(lo[2])), conformed.image.shape, background,
                  mask, brain_box, note)  # type: ignore[arg-type]


def load_volumes(
    records: Sequence[ImageRecord], workers: int = 4, dtype: Any = None,
    on_loaded: Any = None, spacing: float = 1.0, cache: MaskCache | None = None,
    device: str = "cpu",
) -> list[Volume]:
    """Load, mask and conform every record, ``workers`` at a time (decompression releases the
    GIL; stripping takes deepbet's lock, one scan at a time). Stripped masks go through
    ``cache``, stripping runs on ``device``.

    ``on_loaded(i, record)`` is called after each volume, in completion order.
    """
    def one(i: int) -> Volume:
        volume = load_volume(records[i], dtype, spacing, cache, device)
        if on_loaded is not None:
            on_loaded(i, records[i])
        return volume

    if workers <= 1 or len(records) <= 1:
        return [one(i) for i in range(len(records))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(records))))


def crop_range(n: int, size: int) -> tuple[int, int]:
    """Lowest and highest crop start (inclusive) along an axis of ``n`` voxels for ``size``.

    Random crops draw uniformly from this range: every start from ``0`` to ``n - size`` is
    reachable (the published code's ``randint(n - size)`` crashed when ``n == size`` and never
    picked the last start). When the volume is smaller than the crop the range is
    ``[n - size, 0]``: the volume lands anywhere inside the crop, the rest is background.
    """
    return min(0, n - size), max(0, n - size)


def centre_start(n: int, size: int) -> int:
    """Start of the centred crop (negative when the volume is smaller: centred in padding)."""
    return (n - size) // 2
