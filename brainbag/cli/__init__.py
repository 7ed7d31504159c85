"""The ``brainbag`` command line: thin commands over the library.

Each command parses and validates its options, builds one settings object and makes one call into
the library. torch, nibabel and SimpleITK are imported inside the commands so ``--help`` is fast.
Library errors (:class:`brainbag.errors.BrainbagError`) become one red line and their exit code:
0 ok, 1 input or processing failure, 2 usage. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from brainbag import __version__
from brainbag.errors import EXIT_FAILURE, EXIT_USAGE, BrainbagError, UsageError, one_line

#: Help texts are rich markup: a literal ``[`` is written ``\\[`` (rich drops ``[default: 9]``
#: as an unknown style tag, which left help texts ending in " .").


def _default(text: str) -> str:
    """``[default: text]`` for a help text (escaped for rich markup)."""
    return f"\\[default: {text}]"


def _train_default(key: str) -> str:
    """``[default: ...]`` of a ``train`` option: its :class:`~brainbag.train.config.TrainConfig`
    default, so the help cannot drift from the configuration."""
    from brainbag.train.config import TrainConfig

    value = getattr(TrainConfig(), key)
    if isinstance(value, bool):
        return _default("on" if value else "off")
    return _default(" ".join(map(str, value)) if isinstance(value, list) else str(value))


def _flags_without_type(params: list[Any]) -> list[Any]:
    """On/off flags take no value: show no ``<bool>`` type for them in ``--help``."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A brainbag command: its flags show no value type in ``--help``."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class Group(TyperGroup):
    """The ``brainbag`` and ``brainbag weights`` groups: flags show no value type."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


app = typer.Typer(
    name="brainbag",
    help="Brain age and sex from a T1-weighted MRI with 3D BagNets, with local prediction maps.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
    cls=Group,
)

_state = {"debug": False}
EXIT_INTERRUPTED = 130
MAX_TABLE_ROWS = 40  # larger runs print only the summary; the full table is predictions.tsv


class Mode(str, Enum):
    auto = "auto"
    sliding = "sliding"
    full = "full"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionOpt(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class RecordedSex(str, Enum):
    F = "F"
    M = "M"


class MapSpaceOpt(str, Enum):
    model = "model"
    input = "input"


def _large_pages_for_torch() -> None:
    """Let torch's CPU allocator back large tensors with transparent huge pages.

    Every full-resolution activation is ~0.5-1 GB; filling a fresh 0.9 GB tensor took 0.15 s with
    4 KiB pages and 0.04 s with huge pages, after a first allocation of 0.3-0.9 s
    (bench/thp_first_touch.py, bench/README.md). torch reads the variable
    once, when it is imported, so this must run before the first ``import torch``; an explicit
    ``THP_MEM_ALLOC_ENABLE=0`` in the environment wins.
    """
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(exc: BaseException, code: int = EXIT_FAILURE) -> NoReturn:
    """Print one red line (or the traceback with --debug) and exit with ``code``."""
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc)
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/] {escape(one_line(str(exc)))}",
                                soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _exit_on_errors() -> Iterator[None]:
    """A domain error exits with its own code, a file-system error with 1; one red line each."""
    try:
        yield
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
    except OSError as exc:
        fail(BrainbagError(f"could not read or write a file: {exc}"))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"brainbag {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks for errors.")
    ] = False,
) -> None:
    """brainbag: brain age and sex from T1-weighted MRI."""
    _state["debug"] = debug
    if not debug:  # nibabel logs the header fixes it makes; brainbag's checks report them
        import logging

        logging.getLogger("nibabel").setLevel(logging.ERROR)


ManifestOpt = Annotated[
    list[Path] | None,
    typer.Option("--manifest", help="Extra weights manifest (JSON); repeatable. Searched before "
                 "$BRAINBAG_MANIFEST and the shipped manifest."),
]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option("--cache-dir", help="Weights cache folder \\[default: $BRAINBAG_CACHE_DIR, else "
                 "the HuggingFace hub cache]."),
]
OfflineOpt = Annotated[
    bool,
    typer.Option("--offline", help="Never use the network (also: HF_HUB_OFFLINE=1); weights must "
                 "be bundled or cached."),
]


@app.command(cls=Command)
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="T1 image(s) (.nii, .nii.gz, .mgz; skull-stripped unless masked), "
                       "or one folder of them (searched recursively), one BIDS dataset, or one "
                       "list file (.txt: one path per line)."),
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
                     "outside it are set to background. Default: voxels > 0 of the image."),
    ] = None,
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


@app.command(cls=Command)
def merge(
    out: Annotated[Path, typer.Argument(help="The output folder the shards wrote into.")],
) -> None:
    """Merge the tables of `predict --shard` runs into one predictions.tsv and index.html.

    Checks that every shard ran on the same inputs with the same weights and settings and that
    every input appears exactly once; lists inputs no shard finished. Exit code 0 when every
    input is ok, 1 when some failed or are missing, 2 when the shards do not belong together.
    """
    from rich.markup import escape

    from brainbag.run.shards import merge as merge_shards

    err = _console(stderr=True)
    try:
        result = merge_shards(out)
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
    ok = sum(1 for r in result.rows if r.get("status") == "ok")
    err.print(f"merged {result.shards} shards into {escape(str(out))}/predictions.tsv: "
              f"{len(result.rows)} inputs, {ok} ok, {len(result.failed)} failed, "
              f"{len(result.missing)} missing", soft_wrap=True)
    for path in result.failed:
        err.print(f"[red]failed:[/] {escape(path)}", soft_wrap=True)
    for path in result.missing:
        err.print(f"[yellow]missing:[/] {escape(path)}", soft_wrap=True)
    if result.running:
        err.print(f"[yellow]still running or interrupted:[/] {', '.join(result.running)} "
                  "(merge again when they finish; interrupted ones: rerun with --resume)",
                  soft_wrap=True)
    if result.failed or result.missing:
        raise typer.Exit(EXIT_FAILURE)


@app.command(cls=Command)
def check(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="T1 image(s) (.nii, .nii.gz, .mgz) or folders to search for them."),
    ],
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="Brain mask on the image grid (voxels > 0 = brain), as for "
                     "predict. Default: voxels > 0 of the image."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON: a list of objects with "
                           "path, name, status, found, expected, hint.")
    ] = False,
    n4: Annotated[
        bool, typer.Option("--n4", help="Also run N4 bias-field correction and report the "
                           "field left after it and its run time.")
    ] = False,
    rf: Annotated[
        int | None,
        typer.Option("--rf", help="Judge the scans for the default weights of this receptive "
                     "field, as predict --rf would use them (default: 9)."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Judge the scans for these weights (a manifest ID or a "
                     ".safetensors file): their voxel size and brain view. Nothing is "
                     "downloaded or loaded but the file's metadata."),
    ] = None,
    manifest: ManifestOpt = None,
) -> None:
    """Check whether scans fit the model: one table per scan, one row per check.

    The voxel size and field of view are judged for the weights predict would use (the default
    for --rf 9 unless --rf or --weights says otherwise). Exit code 0 when no check fails
    (warnings allowed), 1 when any check fails.
    """
    from brainbag.image.checks import CheckOptions, check_inputs
    from brainbag.weights.resolve import input_expectations

    if mask is not None and len(inputs) > 1:
        fail(UsageError("--mask applies to one input; check one input per run with --mask"),
             EXIT_USAGE)
    try:
        expect = input_expectations(weights, rf, tuple(manifest or ()))
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
    options = CheckOptions(mask=mask, n4=n4, voxel_mm=expect.voxel_mm, view_xyz=expect.view_xyz,
                           mode="auto")
    console = _console()
    err = _console(stderr=True)

    def show(report: Any) -> None:
        from rich.markup import escape

        if not json_out:
            _print_report(console, report)
        if report.failures:  # the line predict would refuse this input with
            err.print(f"[bold red]error:[/] {escape(one_line(report.refusal()))}",
                      soft_wrap=True)

    try:
        reports = check_inputs(list(inputs), options, on_report=show)
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
    if json_out:
        import json

        typer.echo(json.dumps([row for r in reports for row in r.to_list()], indent=2))
    elif len(reports) > 1:
        failed = sum(1 for r in reports if r.failures)
        console.print(f"{len(reports)} scans checked: {failed} with failed checks, "
                      f"{sum(1 for r in reports if r.warnings and not r.failures)} with "
                      "warnings only")
    if any(r.failures for r in reports):
        raise typer.Exit(EXIT_FAILURE)


_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _print_report(console: Any, report: Any) -> None:
    from rich.markup import escape
    from rich.table import Table

    failures, warnings = len(report.failures), len(report.warnings)
    verdict = ("[bold red]does not fit the model[/]" if failures else
               "[yellow]fits, with warnings[/]" if warnings else "[green]fits the model[/]")
    table = Table(title=f"{escape(str(report.path))}: {verdict}", title_justify="left",
                  show_lines=True)
    for column in ("check", "status", "found", "expected", "fix"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        style = _STATUS_STYLE[r.status]
        table.add_row(r.name, f"[{style}]{r.status}[/]", escape(r.found), escape(r.expected),
                      escape(r.hint))
    console.print(table)


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


weights_app = typer.Typer(
    name="weights",
    help="List, fetch, verify, describe and publish weights listed in the manifests.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    cls=Group,
)
app.add_typer(weights_app, name="weights")


def _hub(cache_dir: Path | None, offline: bool) -> Any:
    from brainbag.weights.hub import HubSettings

    return HubSettings.from_env(cache_dir=cache_dir, offline=offline)


def _catalog(manifest: list[Path] | None) -> Any:
    from brainbag.weights.manifest import load_catalog

    try:
        return load_catalog(manifest or ())
    except BrainbagError as exc:
        fail(exc, exc.exit_code)


def _select(catalog: Any, ids: list[str] | None) -> list[Any]:
    try:
        return [catalog.get(i) for i in ids] if ids else list(catalog.entries.values())
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
        return []


def _no_entries(catalog: Any) -> None:
    where = ", ".join(str(m) for m in catalog.manifests)
    _console(stderr=True).print(
        f"no weights are listed in the manifests ({where}): brainbag ships no trained weights "
        "yet. Add a manifest with --manifest FILE or $BRAINBAG_MANIFEST.", soft_wrap=True,
        markup=False)


@weights_app.command("list", cls=Command)
def weights_list(
    as_json: Annotated[
        bool, typer.Option("--json", help="A JSON list, one object per entry.")
    ] = False,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """List the weights in the manifests and whether a verified copy is on this machine."""
    import json

    from brainbag.weights.hub import entry_status

    catalog = _catalog(manifest)
    hub = _hub(cache_dir, offline=True)
    try:
        statuses = [entry_status(e, hub) for e in catalog.entries.values()]
    except (BrainbagError, OSError) as exc:
        fail(exc)
    if as_json:
        typer.echo(json.dumps([s.to_dict() for s in statuses], indent=2))
        return
    if not statuses:
        _no_entries(catalog)
        return
    from rich.table import Table

    table = Table(title="brainbag weights")
    for column in ("id", "RF", "heads", "default", "trained", "size (MB)", "status", "path"):
        table.add_column(column)
    for st in statuses:
        e = st.entry
        colour = {"ok": "green", "missing": "yellow", "mismatch": "red"}[st.status]
        table.add_row(
            e.id, str(e.rf), ",".join(e.heads), "yes" if e.default else "",
            "yes" if e.trained else "[red]NO[/]", f"{e.size / 1e6:.1f}",
            f"[{colour}]{st.status}[/]", str(st.path or "-"))
    console = _console()
    console.print(table)
    console.print(f"cache: {hub.cache_dir}", soft_wrap=True, markup=False)


@weights_app.command("fetch", cls=Command)
def weights_fetch(
    ids: Annotated[list[str] | None, typer.Argument(help="Weights IDs \\[default: all].")] = None,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Download (pinned commit) and verify weights into the cache; exit 1 if any fails."""
    from rich.markup import escape

    from brainbag.weights.hub import resolve_entry

    catalog = _catalog(manifest)
    entries = _select(catalog, ids)
    if not entries:
        _no_entries(catalog)
        return
    hub = _hub(cache_dir, offline)
    out, err = _console(), _console(stderr=True)
    failed = 0
    for entry in entries:
        try:
            resolved = resolve_entry(
                entry, hub, on_download=lambda e: err.print(
                    f"downloading {e.id} from {hub.endpoint} ...", markup=False))
        except (BrainbagError, OSError) as exc:
            failed += 1
            err.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
            continue
        out.print(f"[green]ok[/] {escape(entry.id)} ({resolved.source}) "
                  f"{escape(str(resolved.path))}", soft_wrap=True)
    if failed:
        raise typer.Exit(EXIT_FAILURE)


@weights_app.command("verify", cls=Command)
def weights_verify(
    ids: Annotated[list[str] | None, typer.Argument(help="Weights IDs \\[default: all].")] = None,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Hash every weights file present on this machine; exit 1 if any does not match."""
    from rich.markup import escape

    from brainbag.weights.hub import entry_status

    catalog = _catalog(manifest)
    entries = _select(catalog, ids)
    hub = _hub(cache_dir, offline=True)
    out, err = _console(), _console(stderr=True)
    bad = 0
    for entry in entries:
        try:
            st = entry_status(entry, hub)
        except (BrainbagError, OSError) as exc:
            fail(exc)
        for problem in st.problems:
            bad += 1
            err.print(f"[bold red]bad:[/] {escape(problem)}; run `brainbag weights fetch "
                      f"{escape(entry.id)}` to replace it", soft_wrap=True)
        if st.path is not None:
            out.print(f"[green]ok[/] {escape(entry.id)} {escape(str(st.path))}", soft_wrap=True)
        elif not st.problems:
            out.print(f"[yellow]not present[/] {escape(entry.id)}", soft_wrap=True)
    if not entries:
        _no_entries(catalog)
    if bad:
        raise typer.Exit(EXIT_FAILURE)


@weights_app.command("info", cls=Command)
def weights_info(
    weights_id: Annotated[str, typer.Argument(
        metavar="ID|FILE", help="Weights ID, or a .safetensors file written by brainbag.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the entry as JSON.")] = False,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Show the model card of one weights entry or weights file."""
    import json

    from brainbag.weights.file import is_weights_path
    from brainbag.weights.hub import entry_status

    if is_weights_path(weights_id):
        _file_info(Path(weights_id), as_json)
        return
    entry = _select(_catalog(manifest), [weights_id])[0]
    try:
        st = entry_status(entry, _hub(cache_dir, offline=True))
    except (BrainbagError, OSError) as exc:
        fail(exc)
    card = {**entry.to_dict(), "manifest": str(entry.manifest),
            "local": {"status": st.status, "path": str(st.path) if st.path else None,
                      "source": st.source, "problems": list(st.problems)}}
    if as_json:
        typer.echo(json.dumps(card, indent=2))
        return
    from rich.markup import escape

    console = _console()
    console.print(f"[bold]{escape(entry.id)}[/]" + (" (default)" if entry.default else ""))
    if not entry.trained:
        console.print("[bold red]UNTRAINED weights: their predictions mean nothing[/]")
    for key in ("description", "rf", "heads", "architecture", "arch_kwargs", "preprocessing",
                "training", "licence", "metrics", "sha256", "size", "sources", "manifest",
                "local"):
        value = card[key]
        text = value if isinstance(value, str) else json.dumps(value)
        console.print(f"[cyan]{key}[/]: {escape(str(text))}", soft_wrap=True)


def _file_info(path: Path, as_json: bool) -> None:
    """``weights info FILE``: the file's metadata, then its model card."""
    import json
    from dataclasses import asdict

    from rich.markup import escape

    from brainbag.weights.card import file_card

    with _exit_on_errors():
        card = file_card(path)
    if as_json:
        typer.echo(json.dumps(card.to_dict(), indent=2))
        return
    console = _console()
    meta = card.meta
    console.print(f"[bold]{escape(meta.id)}[/] ({escape(str(card.path))})", soft_wrap=True)
    if not meta.trained:
        console.print("[bold red]UNTRAINED weights: their predictions mean nothing[/]")
    fields = {**{k: v for k, v in asdict(meta).items() if k != "id"},
              "rf_mm": meta.rf_mm, "sha256": card.sha256, "size": card.size}
    for key, value in fields.items():
        text = value if isinstance(value, str) else json.dumps(value)
        console.print(f"[cyan]{key}[/]: {escape(str(text))}", soft_wrap=True)
    source = card.card_path or "written from the file's metadata"
    console.print(f"\n[bold]model card[/] ({escape(str(source))}):\n", soft_wrap=True)
    console.print(card.card, markup=False, highlight=False, soft_wrap=True)


@weights_app.command("publish", cls=Command)
def weights_publish(
    file: Annotated[Path, typer.Argument(help="A brainbag .safetensors weights file.")],
    repo: Annotated[str, typer.Option("--repo", help="HuggingFace repository ORG/NAME.")],
    weights_id: Annotated[str | None, typer.Option(
        "--id", help="Versioned weights ID \\[default: the ID in the file's metadata].")] = None,
    filename: Annotated[str | None, typer.Option(
        "--filename", help="File name in the repository \\[default: ID.safetensors].")] = None,
    branch: Annotated[str, typer.Option("--branch", help="Branch to commit to.")] = "main",
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    no_create: Annotated[bool, typer.Option(
        "--no-create-repo", help="Fail if the repository does not exist.")] = False,
    default: Annotated[bool, typer.Option(
        "--default", help="Mark the entry as the default for its RF.")] = False,
    licence: Annotated[str | None, typer.Option(
        "--licence", help="Licence of the weights \\[default: training.licence in the file].")
    ] = None,
    description: Annotated[str, typer.Option("--description", help="One-line description.")] = "",
    metrics: Annotated[Path | None, typer.Option(
        "--metrics", help="JSON list of {name, value, method, ...} measured for these weights.")
    ] = None,
    write: Annotated[Path | None, typer.Option(
        "--write", help="Also add the entry to this manifest file (created if absent).")] = None,
    message: Annotated[str | None, typer.Option("--message", help="Commit message.")] = None,
    cache_dir: CacheDirOpt = None,
) -> None:
    """Upload a weights file to a HuggingFace repo and print its manifest entry (JSON).

    The upload is checked by downloading it back by its commit hash and verifying its sha256.
    Authentication: HF_TOKEN or `hf auth login`; HF_ENDPOINT selects an internal hub.
    """
    import json

    from brainbag.weights.hub import PublishSettings, publish
    from brainbag.weights.manifest import add_entry

    settings = PublishSettings(
        file=file, repo_id=repo, weights_id=weights_id, filename=filename, branch=branch,
        private=private, create_repo=not no_create, default=default, licence=licence,
        description=description, metrics=metrics, write=write, commit_message=message)
    err = _console(stderr=True)
    try:
        result = publish(settings, _hub(cache_dir, offline=False))
        if write is not None:
            add_entry(write, result.entry)
    except (BrainbagError, OSError) as exc:
        fail(exc, getattr(exc, "exit_code", EXIT_FAILURE))
    if not result.entry.trained:
        err.print("[yellow]warning:[/] these weights are marked UNTRAINED", soft_wrap=True)
    err.print(f"published {result.commit_url}; verified download: {result.verified_path}",
              soft_wrap=True, markup=False)
    if write is not None:
        err.print(f"entry {result.entry.id} added to {write}", soft_wrap=True, markup=False)
    typer.echo(json.dumps(result.entry.to_dict(), indent=2))


class Task(str, Enum):
    age = "age"
    sex = "sex"
    both = "both"


class TrainPrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class ValView(str, Enum):
    centre = "centre"
    full = "full"


class SplitName(str, Enum):
    all = "all"
    train = "train"
    val = "val"
    test = "test"


@app.command(cls=Command)
def train(
    data: Annotated[
        Path,
        typer.Argument(help="BIDS folder, participants table (.tsv: participant_id, age, sex, "
                       "t1w[, mask, split]) or Cam-CAN image folder (with --split)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/brainbag"),
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help="Recipe name in training/recipes (e.g. camcan-paper) or a "
                     ".toml path \\[default: the paper's hyperparameters]."),
    ] = None,
    split: Annotated[
        Path | None,
        typer.Option("--split", help="Split folder (train/val/test .csv) or splits.tsv "
                     "\\[default: the table's split column, else random by subject]."),
    ] = None,
    rf: Annotated[int | None, typer.Option("--rf", help="Receptive field: 9, 17, 33 or 177 "
                                           + _train_default("rf") + ".")] = None,
    task: Annotated[Task | None, typer.Option("--task", help="age, sex or both (one network, "
                                              "two heads) " + _train_default("task") + ".")
                    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the training "
                                               "images " + _train_default("epochs") + ".")
                      ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Effective batch "
                                 + _train_default("batch_size") + ".")] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option("--micro-batch", help="Samples per forward pass (same gradient, less "
                     "memory) \\[default: the whole batch]."),
    ] = None,
    crop: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--crop", help="Random crop size x y z " + _train_default("crop") + "."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate "
                                             + _train_default("lr") + ".")] = None,
    device: Annotated[
        Device | None, typer.Option("--device", help="auto = cuda when available "
                                    + _train_default("device") + ".")] = None,
    precision: Annotated[
        TrainPrecision | None,
        typer.Option("--precision", help="auto = bf16 autocast on GPU, fp32 on CPU "
                     + _train_default("precision") + "."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the initial weights, "
                                             "split and crops " + _train_default("seed") + ".")
                    ] = None,
    width: Annotated[
        int | None,
        typer.Option("--width", help="Stem channels (32 = the paper's half-width ResNet-50); "
                     "smaller for quick experiments " + _train_default("width") + "."),
    ] = None,
    val_view: Annotated[
        ValView | None,
        typer.Option("--val-view", help="Validation view: centre crop or full volume "
                     + _train_default("val_view") + "."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Random split: share of subjects "
                                   "for validation " + _train_default("val_fraction") + ".")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option("--test-fraction", help="Random split: share of subjects "
                                   "held out for test " + _train_default("test_fraction")
                                   + ".")] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the network "
                                  + _train_default("compile") + ".")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Threads loading volumes "
                                 + _train_default("workers") + ".")
    ] = None,
    data_name: Annotated[
        str | None, typer.Option("--data-name", help="Training data name for the weights "
                                 "metadata \\[default: from the data].")] = None,
    data_licence: Annotated[
        str | None, typer.Option("--data-licence", help="Licence of the training data, "
                                 "recorded in the weights and model card.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last.ckpt.")
    ] = False,
) -> None:
    """Train a BagNet-3D (the seed recipe by default) into a run folder."""
    from brainbag.train.config import resolve

    flags = {
        "split": str(split) if split is not None else None, "rf": rf,
        "task": task.value if task else None, "epochs": epochs, "batch_size": batch_size,
        "micro_batch": micro_batch, "crop": list(crop) if crop else None, "lr": lr,
        "device": device.value if device else None,
        "precision": precision.value if precision else None, "seed": seed, "width": width,
        "val_view": val_view.value if val_view else None, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "compile": compile_model, "workers": workers,
        "data_name": data_name, "data_licence": data_licence,
    }
    with _exit_on_errors():
        config, explicit = resolve(str(data), str(out), recipe, flags)
    console = _console()
    from brainbag.train.record import ConsoleReporter
    from brainbag.train.trainer import TrainingInterrupted, run_training

    with _exit_on_errors():
        try:
            result = run_training(config, ConsoleReporter(console), resume, explicit)
        except TrainingInterrupted as exc:
            _console(stderr=True).print(f"[yellow]stopped:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _console(stderr=True).print("[yellow]stopped:[/] interrupted before training "
                                        "started; nothing was saved")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if result.main:
        console.print(f"done: {result.epochs} epochs; best epoch {result.best_epoch}; "
                      f"weights in {result.weights}", soft_wrap=True)


@app.command(cls=Command)
def crossval(
    data: Annotated[Path, typer.Argument(help="Data in any layout `brainbag train` reads.")],
    folds: Annotated[
        Path, typer.Option("--folds", help="Folds TSV (participant_id, fold); made (stratified "
                           "by source and age, --seed) when it does not exist.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "runs/crossval"),
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="Training recipe (as for train).")] = None,
    rf: Annotated[int | None, typer.Option("--rf", help="Receptive field (overrides the "
                                           "recipe).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs per fold (overrides "
                                               "the recipe).")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Network width (overrides the "
                                              "recipe).")] = None,
    k: Annotated[int, typer.Option("--k", help="Number of folds when making the folds file.")
                 ] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of a new folds file.")] = 0,
    device: Annotated[Device | None, typer.Option("--device")] = None,
) -> None:
    """K-fold cross-validation grouped by subject: one model per fold, held-out predictions
    pooled and compared with the predict-the-training-mean baseline (resumable)."""
    from brainbag.train.config import resolve
    from brainbag.train.crossval import crossval_rows, run_crossval
    from brainbag.train.record import ConsoleReporter
    from brainbag.train.trainer import run_training

    flags = {"rf": rf, "epochs": epochs, "width": width,
             "device": device.value if device else None}
    with _exit_on_errors():
        config, explicit = resolve(str(data), str(out), recipe, flags)
    console = _console()

    def train_fold(c: Any, resume: bool) -> Any:
        return run_training(c, ConsoleReporter(console), resume, explicit)

    def on_fold(n: int, total: int) -> None:
        console.print(f"[bold]fold {n + 1}/{total}[/]")

    with _exit_on_errors():
        try:
            result = run_crossval(data, folds, config, out, k=k, seed=seed, train=train_fold,
                                  on_fold=on_fold)
        except KeyboardInterrupt:
            _console(stderr=True).print(
                "[yellow]stopped:[/] interrupted; run the same command again to continue")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    from rich.table import Table

    from brainbag.train.evaluate import BIAS_SLOPE_NOTE

    table = Table(title=f"brainbag crossval ({result.metrics['folds']} folds, "
                        f"{result.metrics['subjects']} subjects, held-out predictions)",
                  caption=BIAS_SLOPE_NOTE, caption_justify="left")
    for col in ("group", "n", "age MAE", "baseline MAE", "ratio", "r", "bias slope",
                "sex acc.", "baseline acc.", "AUC"):
        table.add_column(col, justify="left" if col == "group" else "right")

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in crossval_rows(result.metrics):
        table.add_row(row["group"], str(row["n"]), f(row["age_mae"], ".2f"),
                      f(row["baseline_mae"], ".2f"), f(row["mae_ratio"], ".2f"),
                      f(row["age_r"], ".3f"), f(row["age_bias_slope"], ".3f"),
                      f(row["sex_accuracy"], ".1%"), f(row["baseline_accuracy"], ".1%"),
                      f(row["sex_auc"], ".3f"))
    console.print(table)
    console.print(f"results in {out}/ (predictions.tsv, metrics.json, table.tsv; "
                  "fold-K/run: each fold's training run)", soft_wrap=True)


@app.command(cls=Command)
def evaluate(
    data: Annotated[Path, typer.Argument(help="Data in any layout `brainbag train` reads.")],
    weights: Annotated[
        list[Path], typer.Option("--weights", help="Weights file; repeat to compare several.")
    ],
    split: Annotated[
        SplitName, typer.Option("--split", help="Which images: all, or one split (from "
                                "--split-file or the splits.tsv beside the first weights).")
    ] = SplitName.all,
    split_file: Annotated[
        Path | None, typer.Option("--split-file", help="Split folder or a run's splits.tsv.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "brainbag-eval"),
    mode: Annotated[Mode, typer.Option("--mode", help="As for predict.")] = Mode.auto,
    window: Annotated[
        tuple[int, int, int], typer.Option("--window", help="Sliding window x y z.")
    ] = (160, 160, 128),
    overlap: Annotated[float, typer.Option("--overlap", help="As for predict.")] = 0.25,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per pass.")] = 1,
    device: Annotated[Device, typer.Option("--device")] = Device.auto,
    precision: Annotated[PrecisionOpt, typer.Option("--precision")] = PrecisionOpt.fp32,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the scatter PNG.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Evaluate images that fail predict's input checks "
                           "(recorded per image in checks.json and predictions.tsv).")
    ] = False,
) -> None:
    """Age MAE, RMSE, r, bias; sex accuracy and AUC; per-image TSV and a scatter plot."""
    from brainbag.network.inference import InferenceSettings
    from brainbag.train.evaluate import EvaluateSettings, run_evaluate, table_rows

    settings = EvaluateSettings(
        data=data, weights=tuple(weights), split=split.value, split_file=split_file, out=out,
        inference=InferenceSettings(mode=mode.value, window=tuple(window),  # type: ignore[arg-type]
                                    overlap=overlap, batch_size=batch_size,
                                    device=device.value, precision=precision.value),
        plot=not no_plot, force=force,
    )
    from brainbag.run.progress import StepStatus

    console = _console()
    with _exit_on_errors(), StepStatus(_console(stderr=True), "evaluating...") as status:
        def progress(k: int, n: int, record: Any) -> None:
            status.update(f"evaluating {k + 1}/{n}: {record.participant_id}")

        results = run_evaluate(settings, on_image=progress)
    from rich.table import Table

    from brainbag.train.evaluate import BIAS_SLOPE_NOTE

    table = Table(title=f"brainbag evaluate ({split.value}, {mode.value})",
                  caption=BIAS_SLOPE_NOTE, caption_justify="left")
    for col, justify in (("weights", "left"), ("RF", "right"), ("n", "right"),
                         ("age MAE", "right"), ("RMSE", "right"), ("r", "right"),
                         ("bias slope", "right"), ("sex acc.", "right"), ("AUC", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in table_rows(results):
        table.add_row(row["weights"], str(row["rf"]), str(row["n"]), f(row["age_mae"], ".2f"),
                      f(row["age_rmse"], ".2f"), f(row["age_r"], ".3f"),
                      f(row["age_bias_slope"], ".3f"), f(row["sex_accuracy"], ".1%"),
                      f(row["sex_auc"], ".3f"))
    console.print(table)
    console.print(f"results in {out}/ (<weights>/predictions.tsv, metrics.json, age_scatter.png"
                  + (", table.tsv)" if len(results) > 1 else ")"), soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrainbagError as exc:  # raised outside a command's own handling
        if _state["debug"]:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
