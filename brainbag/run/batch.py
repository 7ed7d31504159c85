"""Batch runs: the results table, resume decisions, read-ahead of the next scans, the summary.

``predictions.tsv`` holds one row per input, keyed by the input's absolute path. It is rewritten
as a whole after every input, to a temporary file that is fsynced and renamed over the old one,
so a kill -9 at any moment leaves either the previous table or the new one, never a partial row.
Rows keep the order in which their inputs first appeared.
"""

from __future__ import annotations

import csv
import glob
import hashlib
import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from brainbag.errors import UsageError
from brainbag.run.discover import Discovery, ScanInput
from brainbag.run.lock import LOCK_NAME
from brainbag.run.outputs import TSV_COLUMNS, write_tsv_atomic

TSV_NAME = "predictions.tsv"
INDEX_NAME = "index.html"
#: Columns a table written by an earlier brainbag must have for its rows to be kept.
#: (brainbag 0.1 tables: the person's columns and ``output`` came later and may be missing)
REQUIRED_COLUMNS = ("subject", "session", "path", "input_sha256", "status", "age", "p_female",
                    "rf", "weights_id", "weights_sha256", "mode", "warnings", "error", "seconds")
#: Settings that change how fast a run is, not what it computes (left out of the fingerprint).
#: ``force`` is left out so that ``--resume --force`` redoes only the inputs whose checks failed
#: (forced results record it in prediction.json); optional outputs are checked by file instead.
#: ``calibration`` is a path: the Predictor adds the file's sha256 to the fingerprint instead.
NOT_RESULT_SETTINGS = {"out", "weights", "rf", "mask", "mask_pattern", "png", "jobs", "resume",
                       "overwrite", "manifests", "cache_dir", "offline", "force",
                       "save_conformed", "shard", "calibration"}
NOT_RESULT_INFERENCE = {"device", "batch_size", "threads"}

T = TypeVar("T")
R = TypeVar("R")


class ResultsTable:
    """``predictions.tsv`` in memory: rows keyed by input path, saved atomically."""

    def __init__(self, out: Path, path: Path | None = None) -> None:
        """The table of ``out`` (``predictions.tsv``), or the table at ``path`` (a shard's)."""
        self.path = Path(path) if path is not None else Path(out) / TSV_NAME
        self.rows: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh, delimiter="\t"):
                    if set(row) >= set(REQUIRED_COLUMNS) and row.get("path"):
                        self.rows[row["path"]] = {c: row.get(c) or "" for c in TSV_COLUMNS}

    def get(self, path: str) -> dict[str, Any] | None:
        """The row of input ``path`` (absolute), if any."""
        return self.rows.get(path)

    def put(self, row: dict[str, Any]) -> None:
        """Add or replace the row of ``row['path']`` (in place, keeping its position)."""
        self.rows[str(row["path"])] = row

    def save(self) -> None:
        """Write the whole table to a temporary file, fsync it and rename it into place."""
        write_tsv_atomic(self.path, list(self.rows.values()))


def check_output_folder(out: Path, resume: bool, overwrite: bool,
                        shard: tuple[str, Path] | None = None) -> None:
    """Refuse a non-empty output folder unless the run resumes or overwrites it.

    ``shard`` (its name and table): the folder may hold other shards' results, and this shard's
    own table only with ``--resume`` or ``--overwrite``."""
    if resume and overwrite:
        raise UsageError("give --resume or --overwrite, not both")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a folder")
    if shard is not None:
        name, table = shard
        if (out / TSV_NAME).exists() and not table.parent.is_dir():
            raise UsageError(f"output folder {out} holds the results of an ordinary run "
                             f"({TSV_NAME}, no {table.parent.name}/): shard into another --out")
        if table.exists() and not (resume or overwrite):
            raise UsageError(
                f"shard {name} already ran in {out} ({table}): pass --resume to finish it, "
                "--overwrite to redo its inputs, or choose another --out")
        return
    if resume or overwrite or not out.exists():
        return
    if any(p.name != LOCK_NAME for p in out.iterdir()):
        what = "results (predictions.tsv)" if (out / TSV_NAME).exists() else "files"
        raise UsageError(
            f"output folder {out} already holds {what}: pass --resume to finish it (inputs done "
            "with the same input, weights and settings are skipped), --overwrite to redo every "
            "input, or choose another --out"
        )


def remove_stale_staging(out: Path, items: Sequence[ScanInput] | None = None) -> list[Path]:
    """Remove staging folders and temporary files a killed run left behind.

    Only names brainbag itself creates are touched: hidden ``.*.partial-*`` / ``.*.old-*``
    folders and hidden temporary copies of the table and index in the output folder. With
    ``items`` (a shard, while other shards write into the same folder), only those inputs'
    staging folders.
    """
    removed: list[Path] = []
    out = Path(out)
    if not out.is_dir():
        return removed
    if items is not None:
        for item in items:
            final = out / item.location.folder
            parent, stem = ((final, item.location.prefix) if item.location.prefix
                            else (final.parent, final.name))
            for kind in ("partial", "old"):
                for path in parent.glob(f".{glob.escape(stem)}.{kind}-*"):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                        removed.append(path)
        return removed
    for pattern in (".*.partial-*", ".*.old-*"):
        for path in out.rglob(pattern):
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    for name in (TSV_NAME, INDEX_NAME, "dataset_description.json"):
        for path in out.glob(f".{name}.*"):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def settings_fingerprint(settings: dict[str, Any]) -> str:
    """sha256 of the settings that change results (``PredictSettings.to_dict()`` minus speed
    and location options); ``--resume`` redoes inputs done with other settings."""
    kept = {k: v for k, v in settings.items() if k not in NOT_RESULT_SETTINGS}
    if isinstance(kept.get("inference"), dict):
        kept["inference"] = {k: v for k, v in kept["inference"].items()
                             if k not in NOT_RESULT_INFERENCE}
    text = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def done_before(
    out: Path,
    item: ScanInput,
    row: dict[str, Any] | None,
    input_sha256: str,
    weights_sha256: str,
    fingerprint: str,
    mask_sha256: str | None,
    need: Sequence[str] = (),
) -> dict[str, Any] | None:
    """The saved ``prediction.json`` of ``item`` when an earlier run finished it with this very
    input, mask, weights and settings and its outputs (and the optional outputs ``need``, such
    as ``"png"``) are all still in place, so ``--resume`` can skip it; else None.

    ``row`` is the input's row in the table: an ``ok`` row must agree; a ``skipped`` row (or none)
    does not stop a finished input counting as done: the run that wrote it was interrupted or
    killed before its row was saved. A ``failed`` row means the last run could not do it.
    """
    row = row or {}
    status = row.get("status")
    if status not in (None, "ok", "skipped"):
        return None
    if status == "ok" and (row.get("input_sha256") != input_sha256
                           or row.get("weights_sha256") != weights_sha256):
        return None
    prediction = out / item.location.relative("prediction")
    try:
        saved = json.loads(prediction.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("settings_fingerprint") != fingerprint:
        return None
    if (saved.get("mask") or {}).get("sha256") != mask_sha256:
        return None
    if (saved.get("input") or {}).get("sha256") != input_sha256:
        return None
    if (saved.get("weights") or {}).get("sha256") != weights_sha256:
        return None
    people = item.demographics  # a changed age or sex changes the gap and the flags
    if (saved.get("chronological_age"), saved.get("recorded_sex")) != (people.age, people.sex):
        return None
    folder = prediction.parent
    if any(not (folder / name).exists() for name in (saved.get("outputs") or {}).values()):
        return None
    if not all((out / item.location.relative(kind)).exists() for kind in need):
        return None
    return saved


@dataclass
class Staged(Generic[R]):
    """The outcome of a stage run in a worker: its value or its exception, and its duration."""

    value: R | None
    error: BaseException | None
    seconds: float

    def get(self) -> R:
        """The stage's value; re-raises its exception."""
        if self.error is not None:
            raise self.error
        assert self.value is not None
        return self.value


def timed(fn: Callable[[T], R], item: T) -> Staged[R]:
    """``fn(item)`` as a :class:`Staged`: its value or its exception, and how long it took."""
    t0 = time.perf_counter()
    try:
        return Staged(fn(item), None, time.perf_counter() - t0)
    except Exception as exc:  # handed to the main thread, which decides
        return Staged(None, exc, time.perf_counter() - t0)


class _Ready(Generic[R]):
    def __init__(self, fn: Callable[[], Staged[R]]) -> None:
        self._fn = fn

    def result(self) -> Staged[R]:
        return self._fn()


def read_ahead(
    fn: Callable[[T], R], items: Iterable[T], jobs: int
) -> Iterator[tuple[T, Future[Staged[R]] | _Ready[R]]]:
    """Yield ``(item, handle)`` in order; ``handle.result()`` is ``fn(item)`` as a Staged.

    With ``jobs`` > 0, ``fn`` runs in ``jobs`` worker threads on the next ``jobs`` items while
    the caller works on the current one (reading and preprocessing overlap inference); at most
    ``jobs`` items are prepared ahead, which bounds memory. With ``jobs`` = 0, ``fn`` runs in the
    caller's thread when the handle is read.
    """
    if jobs <= 0:
        for item in items:
            yield item, _Ready(lambda item=item: timed(fn, item))  # type: ignore[misc]
        return
    pool = ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="brainbag-read")
    pending: deque[tuple[T, Future[Staged[R]]]] = deque()
    source = iter(items)
    try:
        for item in source:
            pending.append((item, pool.submit(timed, fn, item)))
            if len(pending) > jobs:
                yield pending.popleft()
        while pending:
            yield pending.popleft()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)


@dataclass
class RunPlan:
    """What a run is about to do; given to the observer before the first input."""

    discovery: Discovery
    todo: list[ScanInput]
    resumed: list[dict[str, Any]]
    out: Path
    png: bool


class RunObserver(Protocol):
    """Progress reporting: called before the first input and after every input."""

    def start(self, plan: RunPlan) -> None:
        """Called once, before the first input."""

    def result(self, record: dict[str, Any]) -> None:
        """Called after every input, in input order, once its row is saved."""


@dataclass
class RunSummary:
    """Counts, failures and speed of a finished (or interrupted) run."""

    total: int
    ok: int
    failed: int
    skipped: int
    resumed: int
    processed: int
    wall_seconds: float
    mean_seconds: float | None
    failures: list[tuple[str, str]] = field(default_factory=list)

    @property
    def scans_per_minute(self) -> float | None:
        """Inputs processed by this run per minute of wall time."""
        if self.processed == 0 or self.wall_seconds <= 0:
            return None
        return 60.0 * self.processed / self.wall_seconds


def summarize(records: list[dict[str, Any]], wall_seconds: float) -> RunSummary:
    """Summary of a run's records (``resumed`` records were done by an earlier run)."""
    ran = [r for r in records if not r.get("resumed") and r.get("status") != "skipped"]
    seconds = [float(r["seconds"]) for r in ran if r.get("seconds") not in (None, "")]
    return RunSummary(
        total=len(records),
        ok=sum(r.get("status") == "ok" for r in records),
        failed=sum(r.get("status") == "failed" for r in records),
        skipped=sum(r.get("status") == "skipped" for r in records),
        resumed=sum(bool(r.get("resumed")) for r in records),
        processed=len(ran),
        wall_seconds=wall_seconds,
        mean_seconds=sum(seconds) / len(seconds) if seconds else None,
        failures=[(str(r.get("path")), str(r.get("error")))
                  for r in records if r.get("status") == "failed"],
    )
