"""``brainbag weights``: list, fetch, verify, describe and publish weights."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    CacheDirOpt,
    Command,
    Group,
    ManifestOpt,
    OfflineOpt,
    _console,
    _exit_on_errors,
    fail,
)
from brainbag.errors import EXIT_FAILURE, BrainbagError

weights_app = typer.Typer(
    name="weights",
    help="List, fetch, verify, describe and publish weights listed in the manifests.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    cls=Group,
)


#: the narrowest the path column of `weights list` gets before the list becomes one line per entry
PATH_WIDTH = 12


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
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    console = _console()
    rows = []
    for st in statuses:
        e = st.entry
        colour = {"ok": "green", "missing": "yellow", "mismatch": "red"}[st.status]
        rows.append((escape(e.id), str(e.rf), ",".join(e.heads), "yes" if e.default else "",
                     "yes" if e.trained else "[red]NO[/]", f"{e.size / 1e6:.1f}",
                     f"[{colour}]{st.status}[/]", escape(str(st.path or "-"))))
    titles = ("id", "RF", "heads", "default", "trained", "size (MB)", "status", "path")
    # every column but the path as wide as its widest cell (ids and statuses are never cut or
    # folded); the path folds, at least PATH_WIDTH wide; else one line per entry
    widths = [max([len(t)] + [Text.from_markup(r[i]).cell_len for r in rows])
              for i, t in enumerate(titles[:-1])] + [PATH_WIDTH]
    if sum(widths) + 3 * len(widths) + 1 <= console.width:  # + padding and borders
        table = Table(title="brainbag weights")
        for column, width in zip(titles, widths, strict=True):
            table.add_column(column, no_wrap=column != "path", overflow="fold", min_width=width)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    else:  # too narrow for the table: one line per entry
        for r in rows:
            console.print(f"{r[0]}: {r[6]}; RF {r[1]}, heads {r[2]}"
                          + (", default" if r[3] else "") + f", trained {r[4]}, {r[5]} MB, "
                          f"path {r[7]}", soft_wrap=True, highlight=False)
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
