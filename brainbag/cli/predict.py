"""``brainbag predict``: options to PredictSettings, one run, the results table."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    EXIT_INTERRUPTED,
    CacheDirOpt,
    Device,
    ManifestOpt,
    Mode,
    OfflineOpt,
    PrecisionOpt,
    StripOpt,
    StripOption,
    _console,
    _exit_on_errors,
    _large_pages_for_torch,
    _state,
    fail,
)
from brainbag.errors import EXIT_FAILURE, EXIT_USAGE, BrainbagError, UsageError

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
    rf: Annotated[
        int | None,
        typer.Option("--rf", help="Receptive field in mm: 9, 17, 33 or 177 \\[default: 9, or the "
                     "RF of --weights]."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="A manifest weights ID (see `brainbag weights list`) or "
                     "a .safetensors file written by brainbag \\[default: the manifest's default "
                     "for --rf]."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Output folder.")
    ] = Path("brainbag-results"),
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="Brain mask on the image grid (voxels > 0 = brain); voxels "
                     "outside it are set to background. Default: made by skull stripping for a "
                     "head (see --strip), else voxels > 0 of the image."),
    ] = None,
    strip: StripOption = StripOpt.auto,
    mode: Annotated[
        Mode, typer.Option("--mode", help="auto: what the weights were trained on (full for "
                           "whole-brain views, else sliding); sliding: windows of the training "
                           "crop size; full: the whole volume (or brain view) in one pass.")
    ] = Mode.auto,
    window: Annotated[
        tuple[int, int, int],
        typer.Option("--window", help="Sliding window size in voxels (x y z), multiples of 8."),
    ] = (160, 160, 128),
    overlap: Annotated[
        float, typer.Option("--overlap", help="Fraction of a window shared by neighbours, [0, 1).")
    ] = 0.25,
    batch_size: Annotated[
        int, typer.Option("--batch-size", help="Windows per forward pass (sliding mode).")
    ] = 1,
    device: Annotated[
        Device, typer.Option("--device", help="auto = cuda when available, else cpu.")
    ] = Device.auto,
    precision: Annotated[
        PrecisionOpt,
        typer.Option("--precision", help="bf16 autocast on GPUs and CPUs that support it."),
    ] = PrecisionOpt.fp32,
    threads: Annotated[
        int,
        typer.Option("--threads", help="CPU threads; 0 = one per physical core, at most the CPUs "
                     "this process may use and those other work leaves idle (by the 1-minute "
                     "load average): on a busy machine more threads are slower."),
    ] = 0,
    no_resample: Annotated[
        bool,
        typer.Option("--no-resample", help="Refuse inputs that are not 1 mm isotropic instead "
                     "of resampling them."),
    ] = False,
    map_space: Annotated[
        MapSpaceOpt,
        typer.Option("--map-space", help="model: maps on the network's own grid (every 8th "
                     "voxel at the weights' voxel size: 16 mm for the shipped 2 mm weights); "
                     "input: resampled onto the input image's own grid."),
    ] = MapSpaceOpt.model,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
    force: Annotated[
        bool, typer.Option("--force", help="Predict even when a check fails (recorded in "
                           "prediction.json).")
    ] = False,
    n4: Annotated[
        bool, typer.Option("--n4", help="N4 bias-field correction within the brain mask before "
                           "prediction.")
    ] = False,
    save_conformed: Annotated[
        bool, typer.Option("--save-conformed", help="Also write conformed.nii.gz: the whitened "
                           "1 mm image the model sees, in world register with the input.")
    ] = False,
    mask_pattern: Annotated[
        str | None,
        typer.Option("--mask-pattern", help="Mask next to each image, as a template with "
                     "{stem} {name} {subject} {session} {prefix}, e.g. '{stem}_mask.nii.gz' "
                     "(relative to the image's folder). A missing mask fails that input."),
    ] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Finish an earlier run in --out: skip inputs done "
                           "(ok) with the same input, weights and settings; redo the rest.")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Redo every input even if --out already holds "
                           "results (replacing their outputs and rows).")
    ] = False,
    jobs: Annotated[
        int, typer.Option("--jobs", "-j", min=0, help="Worker threads that read and preprocess "
                          "the next scans while the current one runs; 0 = no overlap.")
    ] = 1,
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
        typer.Option("--sex", help="Recorded sex of the one input (flags a strong "
                     "disagreement with the predicted P(female))."),
    ] = None,
    shard: Annotated[
        str | None,
        typer.Option("--shard", help="Run shard K of N (K/N, e.g. 2/8) of the inputs into the "
                     "shared --out, or auto: K and N from a Slurm job array or torchrun "
                     "(LOCAL_RANK picks the GPU). The last shard to finish merges the tables; "
                     "see `brainbag merge`."),
    ] = None,
    participants: Annotated[
        Path | None,
        typer.Option("--participants", help="Table (.tsv/.csv) of participant_id (or t1w "
                     "paths) with age and/or sex, matched to the inputs by file name or path. "
                     "Without it: a BIDS dataset's participants.tsv, sessions.tsv and "
                     "*_scans.tsv; a list file's third and fourth columns."),
    ] = None,
) -> None:
    """Predict brain age and P(female) and write local age and sex maps.

    With the chronological age (--age, --participants, a BIDS participants.tsv or a list file's
    columns) it also gives the brain-age gap, raw and bias-corrected; see the README's
    "Reading the numbers".
    """
    _large_pages_for_torch()
    from brainbag.network.inference import InferenceSettings
    from brainbag.network.model import RF_KERNEL3
    from brainbag.run.predict import PredictSettings, run_predict

    if rf is not None and rf not in RF_KERNEL3:
        fail(UsageError(f"--rf must be one of {sorted(RF_KERNEL3)}, got {rf}"), EXIT_USAGE)
    settings = PredictSettings(
        out=out,
        rf=rf,
        weights=weights,
        mask=mask,
        inference=InferenceSettings(
            mode=mode.value,
            window=tuple(window),  # type: ignore[arg-type]
            overlap=overlap,
            batch_size=batch_size,
            device=device.value,
            precision=precision.value,
            threads=threads,
        ),
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
    batch = len(records) > 1 or bool(summary.resumed)
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
    from rich.markup import escape
    from rich.table import Table

    from brainbag.run.report import number

    if len(records) == 1 and records[0].get("status") == "ok":
        _print_one(console, records[0])
        if footer:
            console.print(f"results in {out}/ (prediction.json and maps)")
        return
    table = Table(title="brainbag predictions", show_lines=False)
    table.add_column("subject")
    sessions = any(r.get("session") for r in records)
    if sessions:
        table.add_column("session")
    table.add_column("age (years)", justify="right")
    table.add_column("90% interval", justify="right")
    table.add_column("sex (P(female))", justify="right")
    people = any(r.get("chronological_age") is not None for r in records)
    if people:
        table.add_column("chron. age", justify="right")
        table.add_column("gap", justify="right")
        table.add_column("corrected gap", justify="right")
    table.add_column("RF", justify="right")
    table.add_column("seconds", justify="right")
    table.add_column("status")
    for r in records:
        status = str(r.get("status"))
        shown = {"ok": "[green]ok[/]", "failed": "[red]failed[/]"}.get(status,
                                                                       f"[yellow]{status}[/]")
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
        table.add_row(
            escape(str(r.get("subject"))),
            *([escape(str(r.get("session") or ""))] if sessions else []),
            number(r.get("age"), 1),
            interval,
            sex,
            *([number(r.get("chronological_age"), 1),
               number(r.get("brain_age_gap"), 1, sign=True),
               number(r.get("brain_age_gap_corrected"), 1, sign=True)] if people else []),
            str(r.get("rf") or "-"),
            number(r.get("seconds"), 1),
            shown,
        )
    console.print(table)
    worth = _model_worth(records)
    if worth:
        console.print(worth, soft_wrap=True)
    if footer:
        console.print(f"results in {out}/ (predictions.tsv, prediction.json and maps per input)")


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
    if r.get("brain_age_gap_corrected") is not None:
        sd = (methods.get("brain_age_gap_corrected") or {}).get("corrected_gap_sd")
        table.add_row("bias-corrected gap",
                      f"{number(r['brain_age_gap_corrected'], 1, sign=True)} y",
                      "de Lange & Cole 2020" + (f"; SD {sd:.1f} y in healthy held-out adults"
                                                if sd else ""))
    if r.get("recorded_sex") is not None:
        table.add_row("recorded sex", str(r["recorded_sex"]), "")
    if r.get("map_spread") is not None:
        ref = methods.get("map_spread") or {}
        table.add_row("map spread", f"{r['map_spread']:.1f} y",
                      f"held-out scans {ref['p5']:.1f}-{ref['p95']:.1f} y" if ref else "")
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
