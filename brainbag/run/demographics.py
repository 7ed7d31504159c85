"""The chronological age and recorded sex of each input, from wherever the user keeps them.

Sources, the first that applies:

1. ``--age YEARS`` / ``--sex F|M``: one image file only.
2. ``--participants TABLE``: any ``.tsv``/``.csv`` with ``participant_id`` and ``age`` and/or
   ``sex`` (optional ``session_id``, and ``t1w``/``image``/``path`` to match by file). A row
   matches an input by image path when the table has one, else by participant id (with or
   without ``sub-``) against the input's subject id or file name (without ``_T1w`` and image
   suffixes), and by session when the table has a session column. For any kind of input; for a
   BIDS dataset it replaces the dataset's own tables.
3. A BIDS dataset's own tables: ``participants.tsv`` (``age``, ``sex``), overridden per session
   by ``sub-X/sub-X_sessions.tsv`` and per image by ``sub-X/[ses-Y/]sub-X[_ses-Y]_scans.tsv``
   (``filename`` column) where those record an age (or sex).
4. A list file's third and fourth columns (read by :func:`brainbag.run.discover.read_list`).

Missing and ``n/a`` values leave the fields empty; an unreadable value is an error naming the
file, row and column (:mod:`brainbag.person.tables`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

from brainbag.errors import UsageError
from brainbag.image.io import subject_name
from brainbag.person.tables import (
    ID_COLUMNS,
    SEX_COLUMNS,
    bare,
    column,
    labels,
    parse_age,
    parse_sex,
    read_table,
)
from brainbag.run.discover import Demographics, Discovery, ScanInput

_SESSION_COLUMNS = ("session_id", "session")
_PATH_COLUMNS = ("t1w", "image", "path", "filename")
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class _Row:
    people: Demographics
    where: str


def _row_people(row: dict[str, str], header: list[str], table: Path, number: int) -> _Row:
    where = f"{table}, row {number}"
    age, sex = labels(row, header, where)
    return _Row(Demographics(age, sex, where), where)


def _index(table: Path, key_column: str, key: Callable[[str], K]) -> dict[K, _Row]:
    """The rows of an optional table (absent: {}) with a value in ``key_column``, by
    ``key(value)``."""
    if not table.is_file():
        return {}
    header, rows = read_table(table)
    return {key(row[key_column]): _row_people(row, header, table, number)
            for number, row in enumerate(rows, start=2) if row.get(key_column)}


class ParticipantsTable:
    """``--participants TABLE``: ages and sexes matched to inputs by path or id."""

    def __init__(self, path: Path) -> None:
        self.path = path
        header, rows = read_table(path)
        id_col = column(header, ID_COLUMNS)
        path_col = column(header, _PATH_COLUMNS)
        self.session_col = column(header, _SESSION_COLUMNS)
        if id_col is None and path_col is None:
            raise UsageError(f"--participants {path} has columns {header}; it needs "
                             "'participant_id' (or an image path column 't1w') and 'age' "
                             "and/or 'sex'")
        if "age" not in header and column(header, SEX_COLUMNS) is None:
            raise UsageError(f"--participants {path} has columns {header}; it needs an 'age' "
                             "and/or a 'sex' column")
        self.by_path: dict[Path, _Row] = {}
        self.by_id: dict[tuple[str, str | None], list[_Row]] = {}
        for number, row in enumerate(rows, start=2):
            entry = _row_people(row, header, path, number)
            if path_col and row.get(path_col):
                image = Path(row[path_col]).expanduser()
                image = image if image.is_absolute() else path.parent / image
                self.by_path[image.resolve()] = entry
            if id_col and row.get(id_col):
                session = bare(row.get(self.session_col or ""), "ses-")
                key = (bare(row[id_col]), session or None)
                self.by_id.setdefault(key, []).append(entry)
        self.ids = sorted({k[0] for k in self.by_id})

    def find(self, item: ScanInput) -> Demographics | None:
        """The demographics of ``item``, None when no row matches."""
        row = self.by_path.get(item.path.resolve())
        if row is not None:
            return row.people
        session = (bare(item.session, "ses-") or None) if self.session_col else None
        for name in dict.fromkeys((item.subject, subject_name(item.path))):
            found = self.by_id.get((bare(name), session))
            if found:
                first = found[0]
                for other in found[1:]:
                    if (other.people.age, other.people.sex) != (first.people.age,
                                                                first.people.sex):
                        raise UsageError(
                            f"--participants {self.path}: {first.where} and {other.where} give "
                            f"participant {name} different ages or sexes; add a session_id or "
                            "t1w column to tell the scans apart, or fix the table")
                return first.people
        return None


class BidsTables:
    """A BIDS dataset's participants, sessions and scans tables (each read once)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.participants = _index(root / "participants.tsv", "participant_id",
                                   bare)
        self._sessions: dict[str, dict[str, _Row]] = {}
        self._scans: dict[Path, dict[Path, _Row]] = {}

    def sessions(self, subject: str) -> dict[str, _Row]:
        if subject not in self._sessions:
            self._sessions[subject] = _index(self.root / subject / f"{subject}_sessions.tsv",
                                             "session_id", lambda v: bare(v, "ses-"))
        return self._sessions[subject]

    def scans(self, item: ScanInput) -> _Row | None:
        folder = self.root / item.subject / (item.session or "")
        prefix = item.subject + (f"_{item.session}" if item.session else "")
        table = folder / f"{prefix}_scans.tsv"
        if table not in self._scans:
            self._scans[table] = _index(table, "filename", lambda v: (folder / v).resolve())
        return self._scans[table].get(item.path.resolve())

    def find(self, item: ScanInput) -> Demographics | None:
        """Age and sex from the most specific table that records each."""
        levels = [self.scans(item)]
        if item.session:
            levels.append(self.sessions(item.subject).get(bare(item.session, "ses-")))
        levels.append(self.participants.get(bare(item.subject)))
        age = next((r for r in levels if r is not None and r.people.age is not None), None)
        sex = next((r for r in levels if r is not None and r.people.sex is not None), None)
        if age is None and sex is None:
            return None
        sources = list(dict.fromkeys(r.people.source for r in (age, sex) if r is not None))
        return Demographics(age.people.age if age else None, sex.people.sex if sex else None,
                            "; ".join(s for s in sources if s))


def add_demographics(
    discovery: Discovery,
    age: float | None = None,
    sex: str | None = None,
    participants: Path | None = None,
) -> Discovery:
    """``discovery`` with each input's chronological age and recorded sex filled in."""
    if age is not None or sex is not None:
        if discovery.kind != "files" or len(discovery.items) != 1:
            raise UsageError("--age and --sex apply to one image file; for several give a list "
                             "file with age and sex columns, --participants TABLE, or a BIDS "
                             "dataset's participants.tsv")
        if participants is not None:
            raise UsageError("give --age/--sex or --participants, not both")
        people = Demographics(
            parse_age(None if age is None else repr(float(age)), "--age", "--age"),
            parse_sex(sex, "--sex", "--sex"), "command line (--age/--sex)")
        discovery.items = [replace(discovery.items[0], demographics=people)]
        return discovery
    source: ParticipantsTable | BidsTables | None = None
    if participants is not None:
        source = ParticipantsTable(participants)
    elif discovery.kind == "bids" and discovery.root is not None:
        source = BidsTables(discovery.root)
    if source is None:
        return discovery
    items = []
    for item in discovery.items:
        found = source.find(item)
        items.append(replace(item, demographics=found) if found is not None else item)
    if isinstance(source, ParticipantsTable) and items and not any(
            i.demographics.source for i in items):
        example = ", ".join(source.ids[:3]) or "none"
        raise UsageError(
            f"--participants {participants} matches none of the {len(items)} inputs (its "
            f"participant ids: {example}...; the inputs' ids: "
            f"{', '.join(i.subject for i in items[:3])}...); make the participant_id column "
            "hold the file names without _T1w and suffix, or add a t1w column with the paths")
    discovery.items = items
    return discovery
