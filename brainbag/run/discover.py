"""Finding the inputs of a run and where each one's outputs go.

``brainbag predict`` accepts image files, one folder of scans, one BIDS dataset or one list file:

* **image files** (``.nii``, ``.nii.gz``, ``.mgz``): outputs in ``OUT/<subject>/``, where
  ``<subject>`` is the file name without its image suffix and a trailing ``_T1w``.
* **a folder**: every image file under it (recursively, hidden files and folders and the output
  folder excluded); the sub-folder layout is mirrored: ``DIR/a/b/scan.nii.gz`` ->
  ``OUT/a/b/scan/``. The subject id is that relative path (``a/b/scan``).
* **a BIDS dataset** (a folder with ``dataset_description.json``): the
  ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` images; subject and session ids are taken from the file
  name's entities; outputs in BIDS-derivatives style,
  ``OUT/sub-X/[ses-Y/]anat/sub-X_[ses-Y_]..._desc-age_map.nii.gz`` and so on.
* **a list file** (``.txt``, ``.list`` or ``.lst``): one image path per line, relative paths
  relative to the list file; blank lines and lines starting with ``#`` are ignored; optional
  tab-separated columns: the scan's brain mask (may be empty), the person's age in years and
  recorded sex (F/M; empty or ``n/a`` when unknown). Outputs as for image files.

Masks come from ``--mask`` (one input), the list file's second column, or a ``--mask-pattern``
template such as ``{stem}_mask.nii.gz`` resolved next to each image.
"""

from __future__ import annotations

import json
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from brainbag.errors import InputError, UsageError
from brainbag.image.io import is_image_path, strip_image_suffix, subject_name
from brainbag.person.tables import parse_age, parse_sex
from brainbag.run.masks import (
    looks_like_mask,
    mask_beside,
    pairing_note,
    suggest_pattern,
    unpaired_note,
)

SourceKind = Literal["files", "folder", "bids", "list"]
LIST_SUFFIXES = (".txt", ".list", ".lst")
BIDS_T1W = re.compile(r"^(?P<prefix>sub-[A-Za-z0-9]+(?:_[a-z]+-[A-Za-z0-9]+)*)_T1w\.nii(?:\.gz)?$")
MASK_FIELDS = ("stem", "name", "subject", "session", "prefix")

#: Output file names. Plain layout: one folder per input holding these names. BIDS layout: the
#: names are ``<prefix>_<bids name>`` in the subject's ``anat`` folder.
OUTPUT_NAMES = {
    "age_map": ("age_map.nii.gz", "desc-age_map.nii.gz"),
    "sex_map": ("sex_map.nii.gz", "desc-sex_map.nii.gz"),
    "prediction": ("prediction.json", "prediction.json"),
    "png": ("age_map.png", "desc-age_map.png"),
    "conformed": ("conformed.nii.gz", "desc-conformed_T1w.nii.gz"),
    "brain_mask": ("brain_mask.nii.gz", "desc-brain_mask.nii.gz"),
}


@dataclass(frozen=True)
class OutputLocation:
    """Where one input's outputs go, relative to the output folder.

    ``prefix`` is None for the plain layout (the folder holds only this input's files and is
    replaced as a whole) and the BIDS file-name prefix (``sub-01_ses-1``) for the derivatives
    layout (the folder is shared by the subject's images; files are replaced one by one).
    """

    folder: Path
    prefix: str | None = None

    def name(self, kind: str) -> str:
        """File name of output ``kind`` (a key of :data:`OUTPUT_NAMES`)."""
        plain, bids = OUTPUT_NAMES[kind]
        return plain if self.prefix is None else f"{self.prefix}_{bids}"

    def relative(self, kind: str) -> Path:
        """Path of output ``kind`` relative to the output folder."""
        return self.folder / self.name(kind)

    @staticmethod
    def from_prediction(relative: str) -> OutputLocation:
        """Inverse of ``relative("prediction")``: the location of a ``prediction.json`` path."""
        path = Path(relative)
        suffix = "_" + OUTPUT_NAMES["prediction"][1]
        if path.name.endswith(suffix):
            return OutputLocation(path.parent, path.name[: -len(suffix)])
        return OutputLocation(path.parent)


@dataclass(frozen=True)
class Demographics:
    """The person's chronological age (years) and recorded sex ("F"/"M") at the scan, as the
    user gave them, and where they came from (None: not given)."""

    age: float | None = None
    sex: str | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {"chronological_age": self.age, "recorded_sex": self.sex, "source": self.source}


@dataclass(frozen=True)
class ScanInput:
    """One input of a run: the image, its ids, its mask and its output location."""

    path: Path
    subject: str
    location: OutputLocation
    session: str | None = None
    mask: Path | None = None
    mask_error: str | None = None  # a --mask-pattern that named a missing file
    demographics: Demographics = Demographics()

    @staticmethod
    def single(path: Path, mask: Path | None = None) -> ScanInput:
        """An image given on its own: outputs in ``<subject>/``."""
        name = subject_name(path)
        return ScanInput(Path(path), name, OutputLocation(Path(name)), mask=mask)


@dataclass
class Discovery:
    """What a run will process, in a stable order."""

    kind: SourceKind
    items: list[ScanInput]
    root: Path | None = None  # the folder, BIDS dataset or list file given
    ignored: list[Path] = field(default_factory=list)  # files found that are not images
    notes: list[str] = field(default_factory=list)  # one line each, e.g. masks paired by name

    @property
    def batch(self) -> bool:
        """True for folders, datasets and lists (or several files): one failure never stops
        the others, and PNGs are on by default."""
        return self.kind != "files" or len(self.items) > 1


def check_mask_pattern(pattern: str | None) -> None:
    """Refuse templates with unknown ``{fields}`` before anything runs."""
    if pattern is None:
        return
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
    except ValueError as exc:
        raise UsageError(f"--mask-pattern {pattern!r} is not a valid template ({exc})") from exc
    unknown = sorted({f for f in fields if f not in MASK_FIELDS})
    if unknown or not fields:
        raise UsageError(
            f"--mask-pattern {pattern!r} must use fields from "
            + ", ".join("{" + f + "}" for f in MASK_FIELDS)
            + (f"; unknown: {', '.join(unknown)}" if unknown else "; it has none")
            + " (example: {stem}_mask.nii.gz)"
        )


def mask_prefix(item: ScanInput) -> str:
    """What ``{prefix}`` means in a ``--mask-pattern``: the BIDS file-name prefix
    (``sub-01_ses-1``), else the file name without its image suffix and a trailing ``_T1w``.

    The one rule both for finding a scan's mask and for leaving masks out of a folder's inputs.
    """
    return item.location.prefix or subject_name(item.path)


def mask_for(pattern: str, item: ScanInput) -> Path:
    """The mask a ``--mask-pattern`` template names for ``item`` (relative to its folder)."""
    image = item.path
    name = pattern.format(stem=strip_image_suffix(image.name), name=image.name,
                          subject=item.subject, session=item.session or "",
                          prefix=mask_prefix(item))
    path = Path(name).expanduser()
    return path if path.is_absolute() else image.parent / path


def _folder_masks(found: Discovery, pattern: str | None) -> None:
    """The masks of a folder's or dataset's scans: ``--mask-pattern``'s (the files it names are
    no inputs), else the masks lying beside the scans, paired by name (:mod:`brainbag.run.masks`);
    files that look like masks but pair with nothing get a note with a fitting pattern."""
    if pattern is not None:
        masks = {mask_for(pattern, i).resolve() for i in found.items}
        found.items = [_with_mask(i, pattern) for i in found.items
                       if i.path.resolve() not in masks]
        return
    beside: dict[Path, Path] = {}
    for item in found.items:
        mask = None if looks_like_mask(item.path) else mask_beside(item.path, mask_prefix(item))
        if mask is not None:
            beside[item.path] = mask
    used = {m.resolve() for m in beside.values()}
    found.items = [replace(i, mask=beside.get(i.path, i.mask)) for i in found.items
                   if i.path.resolve() not in used]
    if beside:
        found.notes.append(pairing_note(list(beside.items())))
    loose = [i.path for i in found.items if looks_like_mask(i.path)]
    if loose:
        scans = [(i.path, {"prefix": mask_prefix(i), "stem": strip_image_suffix(i.path.name)})
                 for i in found.items if not looks_like_mask(i.path)]
        found.notes.append(unpaired_note(loose, suggest_pattern(scans, loose)))


def _with_mask(item: ScanInput, pattern: str | None) -> ScanInput:
    if pattern is None:
        return item
    mask = mask_for(pattern, item)
    error = None
    if not mask.exists():
        error = (f"no mask for {item.path}: --mask-pattern {pattern!r} gives {mask}, which does "
                 "not exist; add the mask or drop --mask-pattern")
    return replace(item, mask=mask, mask_error=error)


def is_bids(folder: Path) -> bool:
    """A BIDS dataset is a folder with a ``dataset_description.json``."""
    return (folder / "dataset_description.json").is_file()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _inside(path: Path, folder: Path | None) -> bool:
    if folder is None:
        return False
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


def discover_folder(folder: Path, out: Path | None = None) -> Discovery:
    """Every image under ``folder``; outputs mirror its sub-folders."""
    items: list[ScanInput] = []
    ignored: list[Path] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder)
        if _hidden(rel) or _inside(path, out):
            continue
        if not is_image_path(path):
            ignored.append(path)
            continue
        rel_id = rel.parent / subject_name(path)
        items.append(ScanInput(path, rel_id.as_posix(), OutputLocation(rel_id)))
    return Discovery("folder", items, root=folder, ignored=ignored)


def bids_entities(name: str) -> dict[str, str] | None:
    """Entities of a BIDS T1w file name, or None when it is not one."""
    match = BIDS_T1W.match(name)
    if not match:
        return None
    return dict(part.split("-", 1) for part in match.group("prefix").split("_"))


def discover_bids(root: Path, out: Path | None = None) -> Discovery:
    """The ``sub-*/[ses-*/]anat/*_T1w.nii[.gz]`` images of a BIDS dataset."""
    items: list[ScanInput] = []
    ignored: list[Path] = []
    candidates = sorted(
        set(root.glob("sub-*/anat/*_T1w.nii*")) | set(root.glob("sub-*/ses-*/anat/*_T1w.nii*"))
    )
    for path in candidates:
        if _inside(path, out) or not path.is_file():
            continue
        entities = bids_entities(path.name)
        if entities is None:
            ignored.append(path)
            continue
        subject = f"sub-{entities['sub']}"
        session = f"ses-{entities['ses']}" if "ses" in entities else None
        folders = path.relative_to(root).parts[:-2]
        if folders != (subject, *([session] if session else [])):
            raise UsageError(
                f"BIDS image {path} is named for {subject}"
                + (f"/{session}" if session else "")
                + f" but lies in {'/'.join(folders)}; fix its name or folder"
            )
        prefix = BIDS_T1W.match(path.name).group("prefix")  # type: ignore[union-attr]
        folder = Path(subject, *([session] if session else []), "anat")
        items.append(ScanInput(path, subject, OutputLocation(folder, prefix), session=session))
    return Discovery("bids", items, root=root, ignored=ignored)


@dataclass(frozen=True)
class ListEntry:
    """One line of a list file: the image, its mask and the person's age and sex (if given)."""

    image: Path
    mask: Path | None = None
    demographics: Demographics = Demographics()


LIST_COLUMNS = ("image path", "mask path", "age (years)", "sex (F/M)")


def read_list(list_file: Path) -> list[ListEntry]:
    """One :class:`ListEntry` per non-empty, non-comment line of a list file."""
    try:
        text = list_file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"list file {list_file} could not be read ({exc})") from exc
    entries: list[ListEntry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        fields = [f.strip() for f in line.split("\t")]
        if len(fields) > len(LIST_COLUMNS) or not fields[0]:
            raise UsageError(
                f"list file {list_file}, line {number}: {line!r} should be an image path, "
                "optionally followed by tab-separated " + ", ".join(LIST_COLUMNS[1:])
            )
        fields += [""] * (len(LIST_COLUMNS) - len(fields))
        image = _relative_to(Path(fields[0]).expanduser(), list_file.parent)
        mask = _relative_to(Path(fields[1]).expanduser(), list_file.parent) if fields[1] else None
        where = f"list file {list_file}, line {number}"
        age = parse_age(fields[2], where, column="3 (age)")
        sex = parse_sex(fields[3], where, column="4 (sex)")
        people = Demographics(age, sex, f"{list_file}, line {number}") if (
            age is not None or sex is not None) else Demographics()
        entries.append(ListEntry(image, mask, people))
    return entries


def _list_line(path: Path, list_file: Path) -> str:
    """A list file's entry as written in the file (undoing :func:`_relative_to`)."""
    try:
        return str(path.relative_to(list_file.parent))
    except ValueError:
        return str(path)


def _relative_to(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else base / path


def is_list_file(path: Path) -> bool:
    """A list of scans: a ``.txt``, ``.list`` or ``.lst`` file."""
    return path.suffix.lower() in LIST_SUFFIXES and not path.is_dir()


def _check_collisions(items: Sequence[ScanInput], hint: str) -> None:
    seen: dict[Path, Path] = {}
    for item in items:
        key = item.location.relative("prediction")
        if key in seen and seen[key] != item.path:
            raise UsageError(
                f"{item.path} and {seen[key]} both map to output {item.location.folder}; {hint}"
            )
        seen[key] = item.path
    folders = {item.location.folder for item in items if item.location.prefix is None}
    for folder in folders:
        for parent in folder.parents:
            if parent in folders:
                raise UsageError(
                    f"output folder {parent} (for a scan) would contain the output folder "
                    f"{folder} of another scan; rename {parent} or its image"
                )


def check_output_names(items: Sequence[ScanInput], out: Path | None) -> None:
    """Refuse, before anything is written, an input whose subject or session name cannot name a
    folder inside ``out``: empty, ``.`` or ``..`` (file names such as ``...nii.gz``), or a
    location that resolves outside it."""
    for item in items:
        parts = item.location.folder.parts
        name = item.location.folder.as_posix() if item.location.prefix else item.subject
        bad = [p for p in (item.subject, item.session) if p is not None
               and p.strip() in ("", ".", "..")]
        bad += [p for p in parts if p.strip() in ("", ".", "..")]
        why = ""
        if bad or not parts or item.location.folder.is_absolute():
            why = f"the subject or session name {bad[0] if bad else name!r}"
        elif out is not None:
            root = Path(out).resolve()
            target = (Path(out) / item.location.folder).resolve()
            if target == root or root not in target.parents:
                why = f"the output folder {target}, outside --out"
        if why:
            raise UsageError(
                f"{item.path}: its file name gives {why}, which cannot hold its results"
                + (f" inside --out {out}" if out is not None else "")
                + "; nothing was written: rename the file (e.g. scan01_T1w.nii.gz)")


def discover(
    inputs: Sequence[Path],
    out: Path | None = None,
    mask: Path | None = None,
    mask_pattern: str | None = None,
) -> Discovery:
    """Expand the command line's inputs into the run's list of scans.

    One folder, BIDS dataset or list file, or any number of image files. Missing image files are
    kept (they become failed rows); a missing folder or list file is a usage error.
    """
    check_mask_pattern(mask_pattern)
    if not inputs:
        raise UsageError("no input given: pass image files, a folder, a BIDS dataset or a list")
    inputs = [Path(p) for p in inputs]
    containers = [p for p in inputs if p.is_dir() or is_list_file(p)]
    if containers and len(inputs) > 1:
        raise UsageError(
            f"{containers[0]} is a folder or list file: give exactly one folder, BIDS dataset "
            "or list file, or any number of image files"
        )
    if mask is not None and (containers or len(inputs) > 1):
        raise UsageError("--mask applies to one input; for several use --mask-pattern or a "
                         "list file with a mask column")
    if mask is not None and mask_pattern is not None:
        raise UsageError("give --mask or --mask-pattern, not both")

    if containers and containers[0].is_dir():
        root = containers[0]
        if out is not None and _inside(root, out):
            raise UsageError(f"--out {out} is the input folder {root} or contains it; "
                             "write the results somewhere else")
        found = discover_bids(root, out) if is_bids(root) else discover_folder(root, out)
        _folder_masks(found, mask_pattern)
        check_output_names(found.items, out)
        _check_collisions(found.items, "rename one of them")
        return found

    if containers:
        list_file = containers[0]
        if not list_file.exists():
            raise UsageError(f"list file not found: {list_file}")
        entries = read_list(list_file)
        if not entries:
            raise UsageError(f"list file {list_file} names no image (one path per line)")
        if not any(is_image_path(entry.image) for entry in entries):
            first = entries[0].image
            raise UsageError(
                f"{list_file} is not a list of scans: no line is an image path (.nii, .nii.gz, "
                f".mgz; the first line reads {_list_line(first, list_file)!r}); give image files "
                "or a folder, or a list file with one image path per line"
            )
        items: list[ScanInput] = []
        seen: set[Path] = set()
        for entry in entries:
            key = entry.image.resolve()
            if key in seen:
                continue
            seen.add(key)
            item = replace(ScanInput.single(entry.image, entry.mask),
                           demographics=entry.demographics)
            items.append(_with_mask(item, mask_pattern) if entry.mask is None else item)
        check_output_names(items, out)
        _check_collisions(items, "predict their folder instead (it mirrors sub-folders) or "
                          "use different --out folders")
        return Discovery("list", items, root=list_file)

    items = []
    seen = set()
    for image in inputs:
        if image.resolve() in seen:
            continue
        seen.add(image.resolve())
        items.append(_with_mask(ScanInput.single(image, mask), mask_pattern))
    check_output_names(items, out)
    _check_collisions(items, "rename one or predict them into different --out folders")
    return Discovery("files", items)


def discover_checks(inputs: Sequence[Path], mask: Path | None = None,
                    mask_pattern: str | None = None) -> Discovery:
    """The scans ``brainbag check`` looks at: files as given, and every image under each folder
    (recursively, hidden files and folders skipped), with their masks as ``predict`` finds them
    (``--mask``, ``--mask-pattern``, or masks beside the scans). A folder without images is an
    error."""
    check_mask_pattern(mask_pattern)
    if mask is not None and len(inputs) > 1:
        raise UsageError("--mask applies to one input; check one input per run with --mask")
    if mask is not None and mask_pattern is not None:
        raise UsageError("give --mask or --mask-pattern, not both")
    checks = Discovery("files", [])
    for path in map(Path, inputs):
        if not path.is_dir():
            checks.items.append(_with_mask(ScanInput.single(path, mask), mask_pattern))
            continue
        found = discover_folder(path)
        if not found.items:
            raise InputError(f"folder {path} holds no .nii, .nii.gz or .mgz files")
        if mask is not None:
            found.items = [replace(i, mask=mask) for i in found.items]
        else:
            _folder_masks(found, mask_pattern)
        checks.items += found.items
        checks.notes += found.notes
    return checks


def read_description(root: Path) -> dict[str, Any]:
    """A BIDS dataset's own ``dataset_description.json`` ({} when missing or unreadable)."""
    try:
        desc = json.loads((root / "dataset_description.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return desc if isinstance(desc, dict) else {}


def dataset_description(source: Path, version: str) -> dict[str, object]:
    """``dataset_description.json`` of the derivatives brainbag writes for a BIDS dataset."""
    name = read_description(source).get("Name")
    return {
        "Name": f"brainbag predictions{' for ' + name if name else ''}",
        "BIDSVersion": "1.9.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{
            "Name": "brainbag",
            "Version": version,
            "Description": "brain age and sex from T1w MRI with 3D BagNets: global predictions "
                           "(*_prediction.json, predictions.tsv) and local maps (*_desc-age_map, "
                           "*_desc-sex_map)",
        }],
        "SourceDatasets": [{"URL": source.resolve().as_uri()}],
    }
