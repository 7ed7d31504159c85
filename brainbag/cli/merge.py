"""``brainbag merge``: merge the tables of ``predict --shard`` runs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from brainbag.cli.common import (
    _console,
    fail,
)
from brainbag.errors import EXIT_FAILURE, BrainbagError


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
