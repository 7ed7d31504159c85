"""``brainbag check``: the checks of each scan: a table per scan, or one line per scan and its
failed and warning checks in a batch."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    ManifestOpt,
    MaskPatternOpt,
    StripOpt,
    StripOption,
    _console,
    fail,
)
from brainbag.errors import EXIT_FAILURE, BrainbagError, one_line


def check(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="T1 image(s) (.nii, .nii.gz, .mgz) or folders to search for them."),
    ],
    mask: Annotated[
        Path | None,
        typer.Option("--mask", help="Brain mask on the image grid (voxels > 0 = brain), as for "
                     "predict. Default: voxels > 0 of the image, or the mask predict would make "
                     "by skull stripping (not run here: those checks are skipped)."),
    ] = None,
    mask_pattern: MaskPatternOpt = None,
    strip: StripOption = StripOpt.auto,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the report as JSON: a list of objects with "
                           "path, name, status, found, expected, hint.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Every check of every scan; by default a "
                           "batch shows one line per scan and its failed and warning checks.")
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
                     ".safetensors file): their voxel size, brain view and the bias fields of "
                     "their training images. Nothing is downloaded or loaded but the file's "
                     "metadata."),
    ] = None,
    manifest: ManifestOpt = None,
) -> None:
    """Check whether scans fit the model: one table per scan, one row per check (for several
    scans, one line each and the checks that failed or warned; --verbose for every check).

    The voxel size, field of view and bias field are judged for the weights predict would use
    (the default for --rf 9 unless --rf or --weights says otherwise). Exit code 0 when no check
    fails (warnings allowed), 1 when any check fails.
    """
    from dataclasses import replace

    from rich.markup import escape

    from brainbag.image.checks import CheckOptions, run_checks
    from brainbag.run.discover import discover_checks
    from brainbag.weights.resolve import input_expectations

    try:
        expect = input_expectations(weights, rf, tuple(manifest or ()))
        found = discover_checks(list(inputs), mask, mask_pattern)
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
    options = CheckOptions(n4=n4, voxel_mm=expect.voxel_mm, view_xyz=expect.view_xyz,
                           bias_field=expect.bias_field, mode="auto", strip=strip.value)
    console = _console()
    err = _console(stderr=True)
    for note in found.notes:
        err.print(escape(note), soft_wrap=True, highlight=False)
    compact = len(found.items) > 1 and not verbose
    reports = []
    for item in found.items:
        report = run_checks(item.path, replace(options, mask=item.mask))
        reports.append(report)
        if not json_out:
            (_print_compact if compact else _print_report)(console, report)
        if report.failures:  # the line predict would refuse this input with
            err.print(f"[bold red]error:[/] {escape(one_line(report.refusal()))}",
                      soft_wrap=True)
    if json_out:
        import json

        typer.echo(json.dumps([row for r in reports for row in r.to_list()], indent=2))
    elif len(reports) > 1:
        failed = sum(1 for r in reports if r.failures)
        console.print(f"{len(reports)} scans checked: {failed} with failed checks, "
                      f"{sum(1 for r in reports if r.warnings and not r.failures)} with "
                      "warnings only" + ("" if verbose else "; --verbose shows every check"),
                      soft_wrap=True)
    if any(r.failures for r in reports):
        raise typer.Exit(EXIT_FAILURE)


_STATUS_STYLE = {"pass": "green", "warn": "yellow", "fail": "bold red", "skip": "dim"}


def _verdict(report: Any) -> str:
    return ("[bold red]does not fit the model[/]" if report.failures else
            "[yellow]fits, with warnings[/]" if report.warnings else "[green]fits the model[/]")


def _print_report(console: Any, report: Any) -> None:
    """Every check of one scan: a table whose check names and statuses are never cut."""
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"{escape(str(report.path))}: {_verdict(report)}", title_justify="left",
                  show_lines=True)
    names = max(len(r.name) for r in report.results)
    table.add_column("check", no_wrap=True, min_width=max(names, 5))
    table.add_column("status", no_wrap=True, min_width=6)
    for column in ("found", "expected", "fix"):
        table.add_column(column, overflow="fold")
    for r in report.results:
        style = _STATUS_STYLE[r.status]
        table.add_row(r.name, f"[{style}]{r.status}[/]", escape(r.found), escape(r.expected),
                      escape(r.hint))
    console.print(table)


def _print_compact(console: Any, report: Any) -> None:
    """One scan in a batch: its verdict on one line, then one line per failed or warning
    check."""
    from collections import Counter

    from rich.markup import escape

    counts = Counter(r.status for r in report.results)
    tally = ", ".join(f"{counts[s]} {w}" for s, w in (("fail", "failed"), ("warn", "warning"),
                                                     ("pass", "passed"), ("skip", "skipped"))
                      if counts[s])
    console.print(f"{escape(str(report.path))}: {_verdict(report)} ({tally})", soft_wrap=True,
                  highlight=False)
    for r in report.results:
        if r.status in ("fail", "warn"):
            console.print(f"  [{_STATUS_STYLE[r.status]}]{r.status}[/] {escape(r.message())}",
                          soft_wrap=True, highlight=False)
