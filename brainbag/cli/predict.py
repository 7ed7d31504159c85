"""``brainbag predict``: options to PredictSettings, one run, the results table."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    EXIT_INTERRUPTED,
    BatchSizeOpt,
    CacheDirOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    JobsOpt,
    ManifestOpt,
    MaskOpt,
    MaskPatternOpt,
    Mode,
    ModeOpt,
    N4Opt,
    NoResampleOpt,
    OfflineOpt,
    OverlapOpt,
    ParticipantsOpt,
    PrecisionOpt,
    PrecisionOption,
    RfOpt,
    StripOpt,
    StripOption,
    ThreadsOpt,
    WeightsOpt,
    WindowOpt,
    _console,
    _exit_on_errors,
    _large_pages_for_torch,
    _state,
    check_rf,
    fail,
    inference_settings,
)
from brainbag.errors import EXIT_FAILURE, BrainbagError

MAX_TABLE_ROWS = 40  # larger runs print only the summary; the full table is predictions.tsv


class RecordedSex(str, Enum):
    F = "F"
    M = "M"


class MapSpaceOpt(str, Enum):
    model = "model"
    input = "input"


def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="T1 image(s) (.nii, .nii.gz, .mgz; skull on or stripped), or one "
                       "folder of them (searched recursively), one BIDS dataset, or one list "
                       "file (.txt: one path per line)."),
    ],
    rf: RfOpt = None,
    weights: WeightsOpt = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder.")
    ] = Path("brainbag-results"),
    mask: MaskOpt = None,
    strip: StripOption = StripOpt.auto,
    mode: ModeOpt = Mode.auto,
    window: WindowOpt = (160, 160, 128),
    overlap: OverlapOpt = 0.25,
    batch_size: BatchSizeOpt = 1,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOption = PrecisionOpt.fp32,
    threads: ThreadsOpt = 0,
    no_resample: NoResampleOpt = False,
    map_space: Annotated[
        MapSpaceOpt,
        typer.Option("--map-space", help="model: maps on the network's own grid (every 8th "
                     "voxel at the weights' voxel size: 16 mm for the shipped 2 mm weights); "
                     "input: resampled onto the input image's own grid."),
    ] = MapSpaceOpt.model,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    force: ForceOpt = False,
    n4: N4Opt = False,
    save_conformed: Annotated[
        bool, typer.Option("--save-conformed", help="Also write conformed.nii.gz: the whitened "
                           "1 mm image the model sees, in world register with the input.")
    ] = False,
    mask_pattern: MaskPatternOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an earlier run in --out: skip inputs done "
                           "(ok) with the same input, weights and settings; redo the rest.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo every input even if --out already holds "
                           "results (replacing their outputs and rows).")
    ] = False,
    jobs: JobsOpt = 1,
    png: Annotated[
        bool | None,
        typer.Option("--png/--no-png", help="Write a PNG per input (three slices with the age "
                     "map) and index.html \\[default: on for a folder, dataset, list or several "
                     "files]."),
    ] = None,
    age: Annotated[
        float | None,
        typer.Option("--age", min=0, max=150, help="Chronological age in years of the one input "
                     "(adds the brain-age gap, raw and bias-corrected, and its flags)."),
    ] = None,
    sex: Annotated[
        RecordedSex | None,
        typer.Option("--sex", help="Recorded sex of the one input (noted when the sex call "
                     "contradicts it, flagged when P(female) strongly does)."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="Run shard K of N (K/N, e.g. 2/8) of the inputs into the "
                     "shared --out, or auto: K and N from a Slurm job array or torchrun "
                     "(LOCAL_RANK picks the GPU). The last shard to finish merges the tables; "
                     "see `brainbag merge`."),
    ] = None,
    participants: ParticipantsOpt = None,
    calibration: Annotated[
        Path | None,
        typer.Option("--calibration", help="A site calibration written by `brainbag calibrate` "
                     "for these weights: read the corrected gap, interval, flags and map-spread "
                     "range with it instead of the weights' own (see the README's \"Use on your "
                     "own scanner\")."),
    ] = None,
) -> None:
    """Predict brain age and P(female) and write local age and sex maps.

    With the chronological age (--age, --participants, a BIDS participants.tsv or a list file's
    columns) it also gives the brain-age gap, raw and bias-corrected; see the README's
    "Reading the numbers".
    """
    _large_pages_for_torch()
    from brainbag.run.predict import PredictSettings, run_predict

    check_rf(rf)
    settings = PredictSettings(
        out=out,
        rf=rf,
        weights=weights,
        mask=mask,
        inference=inference_settings(mode, window, overlap, batch_size, device, precision,
                                     threads),
        resample=not no_resample,
        map_space=map_space.value,
        manifests=tuple(manifest or ()),
        cache_dir=cache_dir,
        offline=offline,
        force=force,
        n4=n4,
        save_conformed=save_conformed,
        mask_pattern=mask_pattern,
        png=png,
        jobs=jobs,
        resume=resume,
        overwrite=overwrite,
        age=age,
        sex=sex.value if sex is not None else None,
        participants=participants,
        shard=shard,
        calibration=calibration,
        strip=strip.value,
    )
    import time

    from brainbag.run.batch import summarize
    from brainbag.run.progress import ConsoleObserver, print_summary

    console = _console()
    err = _console(stderr=True)
    t0 = time.perf_counter()
    try:
        with _exit_on_errors(), ConsoleObserver(err, debug=_state["debug"]) as observer:
            records = run_predict(list(inputs), settings, observer)
    except KeyboardInterrupt:
        from rich.markup import escape

        err.print(f"[bold red]interrupted:[/] finished inputs are in "
                  f"{escape(str(out))}/predictions.tsv; rerun with --resume to do the rest",
                  soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    summary = summarize(records, time.perf_counter() - t0)
    batch = len(records) > 1  # one input prints the same whether it ran now or earlier
    if len(records) <= MAX_TABLE_ROWS:
        _print_table(console, records, out, footer=not batch)
    if batch:
        print_summary(err, summary, str(out), bool(observer.png))
    if shard is not None:
        _print_shards(err, out)
    if any(r.get("status") != "ok" for r in records):
        raise typer.Exit(EXIT_FAILURE)


def _print_shards(console: Any, out: Path) -> None:
    """After a shard: how many shards are done, and whether their tables were merged."""
    from rich.markup import escape

    from brainbag.run.shards import all_finished, merge, shard_states

    states = shard_states(out)
    done = sum(1 for s in states if s.state == "complete")
    count = max((s.count for s in states), default=0)
    if all_finished(out, states):
        try:
            merge(out, write=False)
        except BrainbagError as exc:  # the shards do not belong together
            console.print(f"all {count} shards finished but cannot be merged:", soft_wrap=True)
            fail(exc, exc.exit_code)
        console.print(f"all {count} shards finished: merged into "
                      f"{escape(str(out))}/predictions.tsv", soft_wrap=True)
    else:
        console.print(f"{done} of {count} shards finished; the last one to finish merges "
                      f"(or run `brainbag merge {escape(str(out))}`)", soft_wrap=True)


def _print_table(console: Any, records: list[dict[str, Any]], out: Path, footer: bool = True
                 ) -> None:
    """The batch table; ids and statuses are never cut: other columns wrap, and below the width
    the table needs, one line per input instead."""
    from rich.markup import escape
    from rich.table import Table

    if len(records) == 1 and records[0].get("status") == "ok":
        _print_one(console, records[0])
        if footer:
            console.print(f"results in {escape(str(out))}/ (prediction.json and maps)",
                          soft_wrap=True)
        return
    rows = [_table_cells(r) for r in records]
    shown = [k for k in _CELLS if k in ("subject", "age", "interval", "sex", "rf", "seconds",
                                        "status") or any(row[k] not in ("", "-") for row in rows)]
    table = Table(title="brainbag predictions", show_lines=False)
    widths = []
    for key in shown:
        title, justify, keep = _CELLS[key]
        # every column at least as wide as its widest cell (and header word): only headers wrap
        widths.append(max([len(w) for w in title.split()]
                          + [len(_plain(row[key])) for row in rows]))
        table.add_column(title, justify=justify, no_wrap=keep, min_width=widths[-1])  # type: ignore[arg-type]
    for row in rows:
        table.add_row(*(row[k] if k == "status" else escape(row[k]) for k in shown))
    if sum(widths) + 3 * len(widths) + 1 <= console.width:  # cells, padding and borders
        console.print(table)
    else:  # too narrow for the table: one line per input, wrapped by the terminal, never cut
        for row in rows:
            console.print(_line(row), soft_wrap=True, highlight=False)
    worth = _model_worth(records)
    if worth:
        console.print(worth, soft_wrap=True)
    sources = sorted({_calibration_source(r) for r in records} - {""})
    if sources:
        console.print("gaps, intervals and flags read with "
                      + " and ".join(escape(_SOURCE_NAMES.get(s, f"site calibration {s}"))
                                     for s in sources), soft_wrap=True)
    if footer:
        console.print(f"results in {escape(str(out))}/ (predictions.tsv, prediction.json and "
                      "maps per input)", soft_wrap=True)


#: the batch table's cells: title, justification, and whether the cell is never wrapped or cut
_CELLS = {
    "subject": ("subject", "left", True),
    "session": ("session", "left", True),
    "age": ("age (years)", "right", False),
    "interval": ("90% interval", "right", False),
    "sex": ("sex, P(female)", "right", False),
    "sex_note": ("recorded sex", "left", False),
    "chronological_age": ("chron. age", "right", False),
    "gap": ("gap", "right", False),
    "corrected_gap": ("corrected gap", "right", False),
    "rf": ("RF", "right", False),
    "seconds": ("time (s)", "right", False),
    "status": ("status", "left", True),
}


def _line(row: dict[str, str]) -> str:
    """One input on one line (rich markup), for consoles too narrow for the table."""
    from rich.markup import escape

    def known(key: str) -> bool:
        return row[key] not in ("", "-")

    ids = " ".join(escape(row[k]) for k in ("subject", "session") if row[k])
    parts = []
    if known("age"):
        parts.append(f"age {row['age']} y" + (f" (90% {row['interval']})"
                                              if known("interval") else ""))
    if known("sex"):
        parts.append("sex " + row["sex"].replace("(", "(P(female) "))
    if known("sex_note"):
        parts.append(f"recorded {escape(row['sex_note'])}")
    if known("chronological_age"):
        parts.append(f"chron. age {row['chronological_age']}")
    if known("gap"):
        parts.append(f"gap {row['gap']}" + (f" (corrected {row['corrected_gap']})"
                                            if known("corrected_gap") else ""))
    parts.append(f"RF {row['rf']}")
    if known("seconds"):
        parts.append(f"{row['seconds']} s")
    return f"{ids}: {row['status']}; " + ", ".join(parts)


def _plain(markup: str) -> str:
    from rich.text import Text

    return Text.from_markup(markup).plain


def _table_cells(r: dict[str, Any]) -> dict[str, str]:
    """One input's cells (plain text; ``status`` is rich markup)."""
    from brainbag.run.report import number

    status = str(r.get("status"))
    shown = {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(status, f"[yellow]{status}[/]")
    if r.get("resumed"):
        shown += " (earlier run)"
    if r.get("warnings") and status == "ok":
        shown += " [yellow](warnings)[/]"
    interval = "-"
    if number(r.get("age_interval_low"), 0) != "-":
        interval = (f"{number(r.get('age_interval_low'), 0)}-"
                    f"{number(r.get('age_interval_high'), 0)}")
    sex = "-"
    if number(r.get("p_female"), 2) != "-":
        sex = f"{r.get('sex_call') or '?'} ({number(r.get('p_female'), 2)})"
    recorded = str(r.get("recorded_sex") or "")
    if recorded and r.get("sex_note"):
        recorded += f": model calls {r.get('sex_call')}"
    return {
        "subject": str(r.get("subject")),
        "session": str(r.get("session") or ""),
        "age": number(r.get("age"), 1),
        "interval": interval,
        "sex": sex,
        "sex_note": recorded,
        "chronological_age": number(r.get("chronological_age"), 1),
        "gap": number(r.get("brain_age_gap"), 1, sign=True),
        "corrected_gap": number(r.get("brain_age_gap_corrected"), 1, sign=True),
        "rf": str(r.get("rf") or "-"),
        "seconds": number(r.get("seconds"), 1),
        "status": shown,
    }


_SOURCE_NAMES = {"weights": "the weights' own calibration (their cross-validation)"}


def _calibration_source(r: dict[str, Any]) -> str:
    """The calibration a record (or a predictions.tsv row) was read with: ``weights``,
    ``site:<file name>``, or "" (none)."""
    value = r.get("calibration")
    if isinstance(value, dict):
        value = value.get("source")
    return str(value or "")


def _calibration_text(r: dict[str, Any]) -> tuple[str, str] | None:
    """(what, where) of a record's calibration for the one-input table."""
    source = _calibration_source(r)
    if not source:
        return None
    if source == "weights":
        return "weights' own", "their cross-validation"
    used = r.get("calibration")
    where = used.get("file") if isinstance(used, dict) else None
    return "site", str(where or source)


def _print_one(console: Any, r: dict[str, Any]) -> None:
    """One prediction as a person's numbers, one per line, each with how far to trust it."""
    from rich.markup import escape
    from rich.table import Table

    from brainbag.run.report import number

    reading = r.get("reading") or {}
    methods = reading.get("methods") or {}
    ids = " ".join(str(x) for x in (r.get("subject"), r.get("session")) if x)
    table = Table(title=f"brainbag: {escape(ids)}", title_justify="left", show_header=False,
                  box=None, padding=(0, 2))
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_column()
    if r.get("age") is not None:
        interval = ""
        if r.get("age_interval_low") is not None:
            level = (methods.get("age_interval") or {}).get("level", 0.9)
            interval = (f"{level:.0%} interval {r['age_interval_low']:.0f}-"
                        f"{r['age_interval_high']:.0f} y")
        table.add_row("predicted age", f"{r['age']:.1f} y", interval)
    if r.get("p_female") is not None:
        table.add_row("sex", str(r.get("sex_call") or "-"), f"P(female) {r['p_female']:.2f}")
    if r.get("chronological_age") is not None:
        table.add_row("chronological age", f"{r['chronological_age']:.1f} y",
                      escape(str(reading.get("demographics_source") or "")))
    if r.get("brain_age_gap") is not None:
        table.add_row("brain-age gap", f"{number(r['brain_age_gap'], 1, sign=True)} y",
                      "predicted - chronological")
    site = _calibration_source(r).startswith("site")
    if r.get("brain_age_gap_corrected") is not None:
        sd = (methods.get("brain_age_gap_corrected") or {}).get("corrected_gap_sd")
        healthy = "the site's healthy controls" if site else "healthy held-out adults"
        table.add_row("bias-corrected gap",
                      f"{number(r['brain_age_gap_corrected'], 1, sign=True)} y",
                      "de Lange & Cole 2020" + (f"; SD {sd:.1f} y in {healthy}" if sd else ""))
    if r.get("recorded_sex") is not None:
        note = r.get("sex_note")
        table.add_row("recorded sex", str(r["recorded_sex"]),
                      f"[yellow]model calls {r.get('sex_call')}[/] (P(female) "
                      f"{r['p_female']:.2f}): check the record" if note else "")
    if r.get("map_spread") is not None:
        ref = methods.get("map_spread") or {}
        scans = "site controls" if site else "held-out scans"
        table.add_row("map spread", f"{r['map_spread']:.1f} y",
                      f"{scans} {ref['p5']:.1f}-{ref['p95']:.1f} y" if ref else "")
    calibration = _calibration_text(r)
    if calibration:
        table.add_row("calibration", *(escape(x) for x in calibration))
    table.add_row("model", f"RF {r.get('rf')}", escape(str((r.get("weights") or {}).get("id"))
                                                       + f" · {r.get('mode')}"))
    console.print(table)
    for note in reading.get("notes") or []:
        console.print(f"note: {escape(note)}", soft_wrap=True)
    worth = _model_worth([r])
    if worth:
        console.print(worth, soft_wrap=True)


def _model_worth(records: list[dict[str, Any]]) -> str:
    """What the weights are worth, from their cross-validation, under every table."""
    for r in records:
        reading = r.get("reading") or {}
        model = reading.get("model") or {}
        if model.get("age_mae_years") is None:
            continue
        acc = model.get("sex_accuracy")
        lo, hi = reading.get("training_age_range") or (None, None)
        return (f"weights {(r.get('weights') or {}).get('id')}: cross-validated age MAE "
                f"{model['age_mae_years']:.1f} y"
                + (f", sex {acc:.0%} correct" if acc is not None else "")
                + (f", trained on ages {lo:.0f}-{hi:.0f}" if lo is not None else "")
                + "; sex is 'undetermined' when P(female) is near 0.5; read the interval, "
                "not the single number (README: Reading the numbers)")
    return ""
