"""The ``brainbag`` command line: thin commands over the library.

Each command parses and validates its options, builds one settings object and makes one call into
the library. torch, nibabel and SimpleITK are imported inside the commands so ``--help`` is fast.
Library errors (:class:`brainbag.errors.BrainbagError`) become one red line and their exit code:
0 ok, 1 input or processing failure, 2 usage. ``--debug`` shows tracebacks.

One module per command group (:mod:`~brainbag.cli.predict`, :mod:`~brainbag.cli.calibrate`,
:mod:`~brainbag.cli.merge`, :mod:`~brainbag.cli.check`, :mod:`~brainbag.cli.weights`,
:mod:`~brainbag.cli.train` for train, crossval and evaluate), what they share in
:mod:`~brainbag.cli.common`; this module builds the app and registers the commands in the order
``--help`` lists them.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from brainbag import __version__
from brainbag.cli import calibrate, check, merge, predict, train, weights
from brainbag.cli.common import Command, Group, _state
from brainbag.errors import BrainbagError, one_line

app = typer.Typer(
    name="brainbag",
    help="Brain age and sex from a T1-weighted MRI with 3D BagNets, with local prediction maps.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="rich",
    cls=Group,
)


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


# Commands in the order --help lists them (weights, a group, is listed after the commands).
app.command(cls=Command)(predict.predict)
app.command(cls=Command)(calibrate.calibrate)
app.command(cls=Command)(merge.merge)
app.command(cls=Command)(check.check)
app.add_typer(weights.weights_app, name="weights")
app.command(cls=Command)(train.train)
app.command(cls=Command)(train.crossval)
app.command(cls=Command)(train.evaluate)


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except BrainbagError as exc:  # raised outside a command's own handling
        if _state["debug"]:
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(exc.exit_code)
