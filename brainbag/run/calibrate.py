"""``brainbag calibrate``: predict a site's healthy controls, fit a site calibration on them.

The controls are found, matched to their ages and sexes, checked and predicted exactly as
``brainbag predict`` does (:func:`~brainbag.run.predict.run_discovered`: the same discovery,
participants tables, checks, fixes and inference, with the same weights options); the fit and
its thresholds are :mod:`brainbag.person.calibration`'s. The per-scan outputs go to a temporary
folder, removed afterwards (or to ``work``, kept, and reused by a later run with the same
folder); the calibration file is written atomically, once the fit succeeded, so a refusal,
an error or Ctrl-C leaves no calibration file and no temporary folder behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from brainbag.errors import InputError, UsageError
from brainbag.person.calibration import (
    LINES,
    MIN_CONTROLS,
    SiteCalibration,
    check_line,
    fit_site_calibration,
    write_site_calibration,
)
from brainbag.run.batch import RunObserver
from brainbag.run.demographics import add_demographics
from brainbag.run.discover import discover
from brainbag.run.predict import run_discovered
from brainbag.run.scan import PredictSettings, WeightsProvider


@dataclass(frozen=True)
class CalibrateSettings:
    """Everything ``brainbag calibrate`` was asked to do.

    ``predict`` holds the options shared with ``brainbag predict`` (weights, masks, checks,
    inference); its ``out`` is ignored (the predictions go to ``work`` or a temporary folder).
    """

    out: Path
    predict: PredictSettings
    line: str = "auto"
    name: str | None = None
    work: Path | None = None
    overwrite: bool = False


@dataclass
class CalibrateResult:
    """The fitted calibration (written to ``path``) and the controls' prediction records."""

    site: SiteCalibration
    path: Path
    records: list[dict[str, Any]]
    failed: list[dict[str, Any]] = field(default_factory=list)


#: failed controls named in the warning (the rest are counted)
MAX_NAMED_FAILURES = 3


def check_calibration_out(out: Path, overwrite: bool) -> None:
    """Refuse an ``--out`` that is a folder, or an existing file without ``overwrite``."""
    out = Path(out)
    if out.is_dir():
        raise UsageError(f"--out {out} is a folder; give the calibration file to write, e.g. "
                         f"{out / 'site-calibration.json'}")
    if out.exists() and not overwrite:
        raise UsageError(f"{out} already exists: pass --overwrite to replace it, or choose "
                         "another --out")


def run_calibrate(inputs: list[Path], settings: CalibrateSettings,
                  observer: RunObserver | None = None) -> CalibrateResult:
    """Predict the controls in ``inputs`` and fit, check and write their site calibration.

    Refused before any scan runs (one line each): a bad ``--line`` or ``--out``, fewer than
    :data:`~brainbag.person.calibration.MIN_CONTROLS` inputs with an age, weights that cannot
    be loaded, a line the ages or the weights rule out
    (:func:`~brainbag.person.calibration.check_line`). Refused after the predictions: fewer
    than that many controls predicted, or a slope the predictions do not support
    (:func:`~brainbag.person.calibration.fit_site_calibration`).
    """
    if settings.line not in LINES:
        raise UsageError(f"--line must be one of {', '.join(LINES)}, got {settings.line!r}")
    check_calibration_out(settings.out, settings.overwrite)
    p = settings.predict
    work = Path(settings.work) if settings.work is not None else None
    temporary = work is None
    if work is None:
        work = Path(tempfile.mkdtemp(prefix="brainbag-calibrate-"))
    try:
        discovery = add_demographics(discover(inputs, work, p.mask, p.mask_pattern),
                                     None, None, p.participants)
        aged = [item for item in discovery.items if item.demographics.age is not None]
        if len(aged) < MIN_CONTROLS:
            where = discovery.root or ", ".join(str(i) for i in inputs)
            raise InputError(
                f"{where}: {len(aged)} of {len(discovery.items)} scans have an age, a site "
                f"calibration needs at least {MIN_CONTROLS} controls with one: give "
                "--participants TABLE (participant_id, age, sex), a BIDS dataset with its "
                "participants.tsv, or a list file with an age column")
        weights = WeightsProvider(p).get()  # weights that cannot load stop it before any scan
        check_line(settings.line, [item.demographics.age for item in aged],
                   weights.meta.calibration or None, weights.id)
        predict = replace(p, out=work, png=False, resume=not temporary, overwrite=False,
                          age=None, sex=None, calibration=None, shard=None)
        records = run_discovered(replace(discovery, items=aged), predict, observer,
                                 keep_going=True, weights=weights)
        rows = [_numbers(r, work) for r in records]
        failed = [r for r in records if r.get("status") != "ok"]
        site = fit_site_calibration(
            [row.get("age") for row in rows],
            [item.demographics.age for item in aged],
            [item.demographics.sex for item in aged],
            [row.get("map_spread") for row in rows],
            weights.id, weights.sha256,
            ids=[" ".join(x for x in (item.subject, item.session) if x) for item in aged],
            p_female=[row.get("p_female") for row in rows],
            weights_calibration=weights.meta.calibration or None,
            weights_age_range=weights.meta.training.get("age_range"),
            line=settings.line, name=settings.name)
        skipped = len(discovery.items) - len(aged)
        if skipped:
            site.warnings.append(f"{skipped} of {len(discovery.items)} scans have no age and "
                                 "were not used")
        if failed:
            named = "; ".join(f"{r.get('subject')}: {r.get('error')}"
                              for r in failed[:MAX_NAMED_FAILURES])
            more = len(failed) - MAX_NAMED_FAILURES
            site.warnings.append(
                f"{len(failed)} controls could not be predicted and were left out ({named}"
                + (f"; and {more} more" if more > 0 else "") + ")")
        write_site_calibration(site, Path(settings.out))
        return CalibrateResult(site, Path(settings.out), records, failed)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)


def _numbers(record: dict[str, Any], work: Path) -> dict[str, Any]:
    """Predicted age, P(female) and map spread of a control: from the record of this run, or,
    for one an earlier run in ``work`` finished (its table row holds rounded text), from its
    ``prediction.json``. Empty for a control that failed."""
    if record.get("status") != "ok":
        return {}
    if record.get("resumed") and record.get("output"):
        try:
            record = json.loads((work / str(record["output"])).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
    return {k: record.get(k) for k in ("age", "p_female", "map_spread")}
