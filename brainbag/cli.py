"""The ``brainbag`` command line: thin commands over the library.

Each command parses and validates its options, builds one settings object and makes one call into
the library. torch, nibabel and SimpleITK are imported inside the commands so ``--help`` is fast.
Library errors (:class:`brainbag.errors.BrainbagError`) become one red line and their exit code:
0 ok, 1 input or processing failure, 2 usage. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag import __version__
from brainbag.errors import EXIT_FAILURE, EXIT_USAGE, BrainbagError, UsageError

app = typer.Typer(
    name="brainbag",
    help="Brain age and sex from a T1-weighted MRI with 3D BagNets, with local prediction maps.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
)

_state = {"debug": False}


class Mode(str, Enum):
    sliding = "sliding"
    full = "full"


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class PrecisionOpt(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"


class MapSpaceOpt(str, Enum):
    model = "model"
    input = "input"


def _console(stderr: bool = False) -> Any:
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def fail(exc: BaseException, code: int = EXIT_FAILURE) -> None:
    """Print one red line (or the traceback with --debug) and exit with ``code``."""
    if _state["debug"]:
        import traceback

        traceback.print_exception(exc)
    from rich.markup import escape

    _console(stderr=True).print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
    raise typer.Exit(code)


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


@app.command()
def predict(
    inputs: Annotated[
        list[Path],
        typer.Argument(help="T1 image(s): .nii, .nii.gz or .mgz, skull-stripped unless --mask."),
    ],
    rf: Annotated[
        int | None,
        typer.Option("--rf", help="Receptive field in mm: 9, 17, 33 or 177 [default: 9, or the "
                     "RF of --weights]."),
    ] = None,
    weights: Annotated[
        str | None,
        typer.Option("--weights", help="Weights file (.safetensors written by brainbag)."),
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
        Mode, typer.Option("--mode", help="sliding: windows of the training crop size; full: the "
                           "whole volume in one pass.")
    ] = Mode.sliding,
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
    no_resample: Annotated[
        bool,
        typer.Option("--no-resample", help="Refuse inputs that are not 1 mm isotropic instead "
                     "of resampling them."),
    ] = False,
    map_space: Annotated[
        MapSpaceOpt,
        typer.Option("--map-space", help="model: maps on the network's 8 mm grid; input: "
                     "resampled onto the input image's own grid."),
    ] = MapSpaceOpt.model,
) -> None:
    """Predict brain age and P(female) and write local age and sex maps."""
    from brainbag.inference import InferenceSettings
    from brainbag.model import RF_KERNEL3
    from brainbag.predict import PredictSettings, run_predict

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
        ),
        resample=not no_resample,
        map_space=map_space.value,
    )
    if mask is not None and len(inputs) > 1:
        fail(UsageError("--mask applies to one input; give one input per run with --mask"),
             EXIT_USAGE)
    console = _console()
    err = _console(stderr=True)

    def show(record: dict[str, Any]) -> None:
        for warning in record.get("warnings", []):
            err.print(f"[yellow]warning:[/] {warning}", soft_wrap=True, markup=True)
        if record.get("status") == "failed":
            err.print(f"[bold red]failed:[/] {record['error']}", soft_wrap=True)

    try:
        with console.status("predicting...", spinner="dots"):
            records = run_predict(list(inputs), settings, on_result=show)
    except BrainbagError as exc:
        fail(exc, exc.exit_code)
        return
    except OSError as exc:
        fail(BrainbagError(f"could not read or write a file: {exc}"))
        return
    _print_table(console, records, out)
    if any(r.get("status") != "ok" for r in records):
        raise typer.Exit(EXIT_FAILURE)


def _print_table(console: Any, records: list[dict[str, Any]], out: Path) -> None:
    from rich.table import Table

    table = Table(title="brainbag predictions", show_lines=False)
    table.add_column("subject")
    table.add_column("age (years)", justify="right")
    table.add_column("P(female)", justify="right")
    table.add_column("RF", justify="right")
    table.add_column("mode")
    table.add_column("seconds", justify="right")
    table.add_column("status")
    for r in records:
        age = r.get("age")
        pf = r.get("p_female")
        table.add_row(
            str(r.get("subject")),
            f"{age:.1f}" if age is not None else "-",
            f"{pf:.2f}" if pf is not None else "-",
            str(r.get("rf") or "-"),
            str(r.get("mode") or "-"),
            f"{r.get('seconds', 0):.1f}",
            "[green]ok[/]" if r.get("status") == "ok" else "[red]failed[/]",
        )
    console.print(table)
    console.print(f"results in {out}/ (predictions.tsv, <subject>/prediction.json, maps)")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrainbagError as exc:  # raised outside a command's own handling
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
