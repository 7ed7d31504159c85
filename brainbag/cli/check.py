"""``brainbag check``: the checks of each scan, one table per scan."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    ManifestOpt,
    StripOpt,
    StripOption,
    _console,
    fail,
)
from brainbag.errors import EXIT_FAILURE, EXIT_USAGE, BrainbagError, UsageError, one_line


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
    strip: StripOption = StripOpt.auto,
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
                           mode="auto", strip=strip.value)
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
