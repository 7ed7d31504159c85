"""Reading the small tables users hand to brainbag: participants, sessions, scans, splits.

One reader (``.tsv`` tab-separated, ``.csv`` comma-separated, a header row, lower-cased column
names) and one way to read an age and a sex, so a training table, a BIDS ``participants.tsv``,
a list file's extra columns and ``--participants`` accept the same spellings and give the same
errors. Missing values (empty, ``n/a``, ``NA``, ``unknown``...) read as None; a value that is
neither missing nor readable is an error naming the file, row and column.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

from brainbag.errors import InputError

FEMALE = {"f", "female", "w", "woman"}
MALE = {"m", "male", "man"}
MISSING = {"", "n/a", "na", "nan", "none", "-", "unknown", "?"}
#: the youngest and oldest ages (years) accepted as plausible in any table
AGE_LIMITS = (0.0, 150.0)
#: columns naming a participant, and a participant's sex, first found wins
ID_COLUMNS = ("participant_id", "observations", "subject", "subject_id")
SEX_COLUMNS = ("sex", "gender", "gender_text", "gender_code")


def parse_age(value: str | None, where: str, column: str = "age") -> float | None:
    """An age in years, or None for a missing value; anything else is an error.

    ``where`` names the file and row (``participants.tsv, row 3``) for the message.
    """
    text = (value or "").strip()
    if text.lower() in MISSING:
        return None
    try:
        age = float(text)
    except ValueError:
        raise InputError(f"{where}, column {column!r}: age {text!r} is not a number; write the "
                         "age in years (e.g. 42.5) or n/a when unknown") from None
    lo, hi = AGE_LIMITS
    if not math.isfinite(age) or age < lo or age > hi:
        raise InputError(f"{where}, column {column!r}: age {text!r} is not a plausible age in "
                         f"years ({lo:g}-{hi:g}); fix it or write n/a")
    return age


def parse_sex(value: str | None, where: str, column: str = "sex") -> str | None:
    """``"F"``/``"M"`` from the usual spellings; Cam-CAN ``gender_code`` 1 = male, 2 = female.
    Other and unknown values (``O``, ``other``, ``U``, ``n/a``...) read as None."""
    text = (value or "").strip().lower()
    if text in MISSING or text in {"o", "other", "u"}:
        return None
    if column == "gender_code":
        codes = {"1": "M", "2": "F"}
        if text in codes:
            return codes[text]
        raise InputError(f"{where}: gender_code {text!r} is not 1 (male) or 2 (female)")
    if text in FEMALE:
        return "F"
    if text in MALE:
        return "M"
    raise InputError(f"{where}, column {column!r}: sex {value!r} is not F/female or M/male "
                     "(or n/a when unknown)")


def read_table(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Rows of a .tsv or .csv file with lower-cased, stripped column names."""
    if not path.is_file():
        raise InputError(f"table not found: {path}")
    delimiter = "," if path.suffix.lower() == ".csv" else "\t"
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            try:
                header = [c.strip().lower() for c in next(reader)]
            except StopIteration:
                raise InputError(f"{path} is empty; expected a header row") from None
            rows = []
            for line in reader:
                if not any(cell.strip() for cell in line):
                    continue
                if len(line) != len(header):
                    raise InputError(
                        f"{path}, row {reader.line_num}: {len(line)} fields for {len(header)} "
                        f"columns; is it {'comma' if delimiter == ',' else 'tab'}-separated?"
                    )
                rows.append({k: v.strip() for k, v in zip(header, line, strict=True)})
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{path} could not be read as a table ({exc})") from exc
    return header, rows


def bare(text: str | None, prefix: str = "sub-") -> str:
    """``text`` stripped and without a leading BIDS ``prefix`` (``sub-``, ``ses-``); "" for
    None: the form in which ids from tables, folders and file names are compared."""
    return (text or "").strip().removeprefix(prefix)


def column(header: Sequence[str], names: Sequence[str]) -> str | None:
    """The first of ``names`` that is a column of ``header``."""
    return next((c for c in names if c in header), None)


def labels(row: dict[str, str], header: Sequence[str], where: str
           ) -> tuple[float | None, str | None]:
    """A row's age (``age`` column) and sex (the first of :data:`SEX_COLUMNS`), None where the
    table has no such column or the value is missing."""
    age = parse_age(row.get("age"), where) if "age" in header else None
    sex_col = column(header, SEX_COLUMNS)
    sex = parse_sex(row.get(sex_col), where, sex_col) if sex_col else None
    return age, sex
