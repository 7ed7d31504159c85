"""The predict pipeline's batch driver: one settings object, one call.

:func:`run_predict` runs a whole batch of :class:`~brainbag.run.scan.Predictor` calls (see
:mod:`brainbag.run.discover` for inputs and output layout, :mod:`brainbag.run.batch` for the
table and resume, :mod:`brainbag.run.shards` for ``--shard``): ``predictions.tsv`` gets one row
per input, saved after every input so a kill at any moment leaves a valid table. The per-scan
pipeline is :mod:`brainbag.run.scan`.
"""

from __future__ import annotations

import time
import traceback
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from brainbag import __version__
from brainbag.errors import (
    BrainbagError,
    OutputError,
    UsageError,
    WeightsError,
)
from brainbag.files import write_json_atomic
from brainbag.image.io import (
    sha256_file,
)
from brainbag.person.clinical import (
    READING_COLUMNS,
)
from brainbag.run.batch import (
    ResultsTable,
    RunObserver,
    RunPlan,
    Staged,
    check_output_folder,
    done_before,
    read_ahead,
    remove_stale_staging,
    timed,
)
from brainbag.run.demographics import add_demographics
from brainbag.run.discover import (
    Discovery,
    ScanInput,
    dataset_description,
    discover,
)
from brainbag.run.lock import OutputLock
from brainbag.run.scan import Inferred, Predictor, PredictSettings, Prepared
from brainbag.run.shards import (
    SHARDS_DIR,
    MergeError,
    MergeResult,
    Shard,
    ShardState,
    all_finished,
    assign,
    merge,
    parse_shard,
    start_state,
)
from brainbag.weights.file import LoadedWeights


def tsv_record(record: dict[str, Any]) -> dict[str, Any]:
    """The predictions.tsv fields of a prediction record."""
    weights = record.get("weights") or {}
    inp = record.get("input") or {}
    return {
        "subject": record.get("subject"),
        "session": record.get("session"),
        "path": inp.get("path", record.get("path")),
        "input_sha256": inp.get("sha256", record.get("input_sha256")),
        "status": record.get("status", "ok"),
        "age": record.get("age"),
        "p_female": record.get("p_female"),
        **{k: record.get(k) for k in READING_COLUMNS},
        "calibration": (record.get("calibration") or {}).get("source"),
        "rf": record.get("rf"),
        "weights_id": weights.get("id"),
        "weights_sha256": weights.get("sha256"),
        "mode": record.get("mode"),
        "warnings": record.get("warnings", []),
        "error": record.get("error"),
        "seconds": record.get("seconds"),
        "output": record.get("output"),
    }


def _input_sha256(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None


def _failed_record(
    item: ScanInput,
    status: str,
    error: str,
    seconds: float | None,
    settings: PredictSettings,
    weights: LoadedWeights | None,
) -> dict[str, Any]:
    return {
        "subject": item.subject,
        "session": item.session,
        "path": str(item.path.resolve()),
        "input_sha256": _input_sha256(item.path) if status == "failed" else None,
        "status": status,
        "error": error,
        "seconds": seconds,
        "rf": weights.meta.rf if weights is not None else settings.rf,
        "mode": settings.inference.mode,
        "weights": {"id": weights.id, "sha256": weights.sha256} if weights else {},
        "warnings": [],
    }


def _naming(exc: BaseException, path: Path) -> BaseException:
    """``exc`` with the input's path in front when its message does not name the file (errors of
    preprocessing and inference on a single input, such as a constant brain)."""
    if not isinstance(exc, BrainbagError) or str(path) in str(exc):
        return exc
    named = type(exc)(f"{path}: {exc}")
    named.__cause__ = exc
    return named


def _write_error(item: ScanInput, out: Path, exc: OSError) -> OutputError:
    """The run-level error of outputs that cannot be written (nothing of the input is kept)."""
    why = exc.strerror or str(exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return OutputError(
        f"could not write the outputs of {item.path} in {out}: {why}{where}; nothing of this "
        "input was kept: free some space or fix the folder's permissions, then rerun with "
        "--resume")


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, BrainbagError):
        return str(exc)
    if isinstance(exc, OSError):
        return f"could not read or write a file: {exc}"
    return f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"


def _resumed(
    predictor: Predictor, items: list[ScanInput], table: ResultsTable
) -> tuple[list[ScanInput], dict[str, dict[str, Any]]]:
    """Split ``items`` into those to run and the rows of those an earlier run finished."""
    weights = predictor.weights.get()
    need = [kind for kind, wanted in (("png", predictor.settings.png),
                                      ("conformed", predictor.settings.save_conformed)) if wanted]
    todo: list[ScanInput] = []
    done: dict[str, dict[str, Any]] = {}
    for item in items:
        key = str(item.path.resolve())
        row = table.get(key)
        written = (predictor.settings.out / item.location.relative("prediction")).is_file()
        sha = _input_sha256(item.path) if written and item.path.is_file() else None
        mask_sha = _input_sha256(item.mask) if item.mask is not None else None
        saved = None
        if sha is not None and (item.mask is None or mask_sha is not None):
            saved = done_before(predictor.settings.out, item, row, sha, weights.sha256,
                                predictor.fingerprint, mask_sha, need)
        if saved is None:
            todo.append(item)
            continue
        # the record as the run that made it returned it: prediction.json, with the fields the
        # table adds (the table's row holds text, not the numbers a console prints)
        record = {**saved, "status": "ok", "path": key,
                  "seconds": (saved.get("timings_s") or {}).get("total"),
                  "output": item.location.relative("prediction").as_posix()}
        if row is None or row.get("status") != "ok":  # finished, but its row was not saved
            table.put(tsv_record(record))
        done[key] = {**record, "resumed": True}
    return todo, done


def run_predict(
    inputs: list[Path],
    settings: PredictSettings,
    observer: RunObserver | None = None,
    keep_going: bool | None = None,
) -> list[dict[str, Any]]:
    """Predict every input (image files, one folder, one BIDS dataset or one list file).

    In a batch (``keep_going``, the default for anything but a single image file) an input that
    fails is recorded as a failed row and the others still run. With a single image file, its
    error is raised and nothing is written. Errors that concern the whole run (no weights, bad
    options, an output folder that already holds results) always stop it.

    Returns one record per input in the run's order: results of this run, rows of inputs an
    earlier run already finished (``"resumed": True``, with ``--resume``), and ``skipped`` rows
    of inputs not reached when the run was interrupted (KeyboardInterrupt is re-raised).
    """
    discovery = add_demographics(
        discover(inputs, settings.out, settings.mask, settings.mask_pattern),
        settings.age, settings.sex, settings.participants)
    return run_discovered(discovery, settings, observer, keep_going)


def run_discovered(
    discovery: Discovery,
    settings: PredictSettings,
    observer: RunObserver | None = None,
    keep_going: bool | None = None,
    weights: LoadedWeights | None = None,
) -> list[dict[str, Any]]:
    """:func:`run_predict` on inputs already discovered, holding the output folder's lock
    (:mod:`brainbag.run.lock`) for the whole run: a second run on the same ``--out`` is refused.
    With ``settings.shard``, only that shard's inputs (:mod:`brainbag.run.shards`).
    ``weights``: weights already loaded, used in place of ``settings.weights``."""
    if settings.shard is not None:
        return _run_shard(discovery, settings, observer)
    with OutputLock(settings.out):
        return BatchRun(discovery, settings, observer, keep_going, weights=weights).run()


def _run_shard(discovery: Discovery, settings: PredictSettings,
               observer: RunObserver | None) -> list[dict[str, Any]]:
    """Shard K of N: its inputs, its own table and state in ``OUT/shards``, a shared lock on the
    output folder and an exclusive one on the shard; the last shard to finish merges."""
    assert settings.shard is not None
    shard = parse_shard(settings.shard)
    if shard.local_rank is not None and settings.inference.device in ("auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # torchrun: LOCAL_RANK picks this process's GPU
            settings = replace(settings, inference=replace(
                settings.inference, device=f"cuda:{shard.local_rank}"))
    if not discovery.items:
        raise _no_images(discovery)
    mine = replace(discovery, items=assign(discovery.items, shard))
    with OutputLock(settings.out, shared=True), OutputLock(
            Path(settings.out) / SHARDS_DIR, name=f".{shard.name}.lock",
            what=f"shard {shard.name} of output folder"):
        run = BatchRun(mine, settings, observer, keep_going=True,
                       shard=(shard, discovery.items))
        return run.run()


ShardPlan = tuple[Shard, list[ScanInput]]


Outcome = Future[Staged[dict[str, Any]]] | Staged[dict[str, Any]]


class BatchRun:
    """One run over discovered inputs: read ahead, infer, write in the background, and record
    every result in input order in ``predictions.tsv`` (saved after each one)."""

    def __init__(
        self,
        discovery: Discovery,
        settings: PredictSettings,
        observer: RunObserver | None = None,
        keep_going: bool | None = None,
        shard: ShardPlan | None = None,
        weights: LoadedWeights | None = None,
    ) -> None:
        """``shard``: this run is that shard of all the given inputs (``discovery`` holds only
        the shard's own); ``weights``: weights already loaded (else ``settings``' are)."""
        if settings.jobs < 0:
            raise UsageError(f"--jobs must be >= 0, got {settings.jobs}")
        if settings.png is None:
            settings = replace(settings, png=discovery.batch or shard is not None)
        self.shard = shard
        check_output_folder(settings.out, settings.resume, settings.overwrite,
                            (shard[0].name, shard[0].table(settings.out)) if shard else None)
        if not discovery.items and shard is None:  # a shard may have none: N > inputs
            raise _no_images(discovery)
        self.discovery = discovery
        self.settings = settings
        self.observer = observer
        self.keep_going = discovery.batch if keep_going is None else keep_going
        self.predictor = Predictor(settings, weights)
        # a site calibration for other weights is refused before any scan runs
        self.predictor.site_calibration()
        self.records: dict[str, dict[str, Any]] = {}
        self.pending: deque[tuple[ScanInput, Outcome, float]] = deque()
        self.wrote = False
        self.merged: MergeResult | None = None  # set by the shard that merged all shards

    def run(self) -> list[dict[str, Any]]:
        """Run every input not already done; return one record per input, in input order."""
        settings = self.settings
        remove_stale_staging(settings.out, self.discovery.items if self.shard else None)
        self.table = ResultsTable(settings.out, self.shard[0].table(settings.out)
                                  if self.shard else None)
        state = self._start_shard() if self.shard else None
        todo, done = (_resumed(self.predictor, self.discovery.items, self.table)
                      if settings.resume else (list(self.discovery.items), {}))
        if done:  # rows rebuilt for inputs finished without a saved row are kept at once
            self.table.save()
        if self.observer is not None:
            self.observer.start(RunPlan(self.discovery, todo, list(done.values()), settings.out,
                                        bool(settings.png)))
        # one writer thread writes outputs while the next input runs through the network
        writer = ThreadPoolExecutor(1, thread_name_prefix="brainbag-write") \
            if settings.jobs else None
        current: ScanInput | None = None
        try:
            for item, handle in read_ahead(self.predictor.prepare, todo, settings.jobs):
                current = item
                self._run_one(item, handle.result(), writer)
                current = None
                self._settle(block_until=1)
            self._settle(block_until=0)
        except KeyboardInterrupt:
            try:  # inputs whose outputs are written (or being written) get their own rows
                self._settle(block_until=0)
            finally:  # even if a second Ctrl-C stops that
                self._mark_skipped(todo, current)
                if state is not None:
                    state.state = "interrupted"
                    state.save(settings.out)
            raise
        finally:
            if writer is not None:
                writer.shutdown(wait=True, cancel_futures=True)
            # a shard leaves index.html to the merge
            if state is None and (self.wrote or done) and settings.png:
                from brainbag.run.report import write_index

                write_index(settings.out, list(self.table.rows.values()))
        if state is not None:
            self.table.save()  # a shard with nothing left to do still leaves its table
            self._finish_shard(state)
        return [self.records.get(k) or done[k]
                for k in (str(i.path.resolve()) for i in self.discovery.items)]

    def _start_shard(self) -> ShardState:
        assert self.shard is not None
        shard, everything = self.shard
        weights = self.predictor.weights.get()
        return start_state(self.settings.out, shard, everything, self.discovery.items,
                           weights.sha256, weights.id, self.predictor.fingerprint,
                           bool(self.settings.png))

    def _finish_shard(self, state: ShardState) -> None:
        """Mark the shard complete; the last one to finish merges the shards' tables."""
        state.finish(self.settings.out)
        if all_finished(self.settings.out):
            try:
                self.merged = merge(self.settings.out)
            except MergeError:
                pass  # this shard's results are kept; `brainbag merge` says what is wrong

    def _run_one(self, item: ScanInput, staged: Staged[Prepared],
                 writer: ThreadPoolExecutor | None) -> None:
        t0 = time.perf_counter()
        try:
            prepared = staged.get()
            inferred = self.predictor.infer(prepared)
        except Exception as exc:
            record = self._failed(item, exc, staged.seconds + time.perf_counter() - t0)
            self.pending.append((item, Staged(record, None, 0.0), 0.0))
            return
        spent = staged.seconds + time.perf_counter() - t0
        job = (prepared, inferred)
        outcome: Outcome = (timed(self._write, job) if writer is None
                            else writer.submit(timed, self._write, job))
        self.pending.append((item, outcome, spent))

    def _write(self, job: tuple[Prepared, Inferred]) -> dict[str, Any]:
        return self.predictor.write(*job)

    def _settle(self, block_until: int) -> None:
        """Record finished results in input order, waiting while more than ``block_until``
        are pending."""
        while self.pending and (len(self.pending) > block_until
                                or not isinstance(self.pending[0][1], Future)
                                or self.pending[0][1].done()):
            item, outcome, spent = self.pending.popleft()
            staged = outcome.result() if isinstance(outcome, Future) else outcome
            try:
                record = staged.get()
            except OSError as exc:  # the outputs cannot be written: no later input can be
                raise _write_error(item, self.settings.out, exc) from exc
            except Exception as exc:
                record = self._failed(item, exc, spent + staged.seconds)
            self._keep(item, record)

    def _failed(self, item: ScanInput, exc: BaseException, seconds: float) -> dict[str, Any]:
        """The failed row of ``item``; re-raises run-level errors and, outside a batch, all."""
        if isinstance(exc, (WeightsError, UsageError)):
            raise exc
        if not self.keep_going:
            raise _naming(exc, item.path)
        record = _failed_record(item, "failed", _error_text(exc), seconds, self.settings,
                                self.predictor.weights.loaded)
        record["traceback"] = "".join(traceback.format_exception(exc))
        return record

    def _keep(self, item: ScanInput, record: dict[str, Any]) -> None:
        self.records[str(item.path.resolve())] = record
        if self.discovery.kind == "bids" and not self.wrote:
            _write_dataset_description(self.settings.out, self.discovery)
        self.table.put(tsv_record(record))
        self.table.save()
        self.wrote = True
        if self.observer is not None:
            self.observer.result(record)

    def _mark_skipped(self, todo: list[ScanInput], current: ScanInput | None) -> None:
        """Give inputs without a result (and without an earlier row other than ``skipped``) a
        ``skipped`` row saying whether the run stopped while processing them (``current``) or
        before reaching them."""
        for item in todo:
            key = str(item.path.resolve())
            earlier = self.table.get(key)
            if key not in self.records and (earlier is None or earlier["status"] == "skipped"):
                error = ("run interrupted while this input was being processed (nothing of it "
                         "was written)" if item == current else
                         "run interrupted before this input")
                self.table.put(tsv_record(_failed_record(
                    item, "skipped", f"{error}; rerun with --resume", None, self.settings,
                    self.predictor.weights.loaded)))
                self.wrote = True
        if self.wrote:
            self.table.save()


def _no_images(discovery: Discovery) -> UsageError:
    where = ("(BIDS: sub-*/[ses-*/]anat/*_T1w.nii[.gz])" if discovery.kind == "bids"
             else "(.nii, .nii.gz, .mgz)")
    return UsageError(f"no T1 image found in {discovery.root} {where}")


def _write_dataset_description(out: Path, discovery: Discovery) -> None:
    """``dataset_description.json`` of BIDS derivatives; one written by someone else is kept."""
    path = out / "dataset_description.json"
    if not path.exists() and discovery.root is not None:
        write_json_atomic(path, dataset_description(discovery.root, __version__))


__all__ = ["BrainbagError", "PredictSettings", "Predictor", "run_predict"]
