"""Progress and summary on the console: a Rich progress bar on a terminal, plain lines otherwise.

Everything here goes to the console it is given (the CLI passes stderr), so standard output keeps
only the results table.
"""

from __future__ import annotations

import time
from typing import Any

from brainbag.run.batch import RunPlan, RunSummary


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _rate(done: float, elapsed: float | None) -> float | None:
    """Inputs per second so far, or None before the first one."""
    return done / elapsed if done and elapsed else None


def describe_fix(fix: dict[str, Any]) -> str:
    """One line for a fix applied to an input (``prediction.json`` ``fixes``)."""
    if fix.get("name") == "n4":
        return (f"N4 bias-field correction (field varied {fix['field_range_percent']:.0f} %; "
                f"{fix['seconds']:.1f} s)")
    return str(fix.get("description", fix.get("name")))


def _ids(record: dict[str, Any]) -> str:
    return " ".join(str(x) for x in (record.get("subject"), record.get("session")) if x)


class ConsoleObserver:
    """Reports a run's progress: a bar with count, rate and ETA on a terminal, one plain line per
    input otherwise. Warnings are printed once each (the same warning for every input, such as
    untrained weights, appears once)."""

    def __init__(self, console: Any, plain: bool | None = None, debug: bool = False) -> None:
        self.console = console
        self.debug = debug
        self.png = False
        self.quiet = False
        self.plain = (not console.is_terminal) if plain is None else plain
        self.progress: Any = None
        self.task: Any = None
        self.total = 0
        self.done = 0
        self.t0 = time.perf_counter()
        self.seen_warnings: set[str] = set()

    def __enter__(self) -> ConsoleObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the progress bar (idempotent)."""
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def start(self, plan: RunPlan) -> None:
        """Print what the run will do and start the bar (on a terminal)."""
        from rich.markup import escape

        self.total = len(plan.todo)
        self.png = plan.png
        self.t0 = time.perf_counter()
        d = plan.discovery
        self.quiet = not d.batch  # one image file: its table says it all
        if self.quiet and plan.resumed:
            self.console.print(escape(
                f"brainbag: {plan.resumed[0].get('subject')} was done before with the same "
                f"input, weights and settings (--resume): its results in {plan.out} are shown, "
                "not computed again"), soft_wrap=True, highlight=False, style="dim")
            return
        if self.quiet and self.plain:
            return
        where = {"files": "", "folder": f" in folder {d.root}",
                 "bids": f" in BIDS dataset {d.root}", "list": f" listed in {d.root}"}[d.kind]
        line = f"brainbag: {len(d.items)} input(s){where}"
        if plan.resumed:
            line += (f"; {len(plan.resumed)} done before with the same input, weights and "
                     f"settings (skipped); {self.total} to run")
        self.console.print(escape(line), soft_wrap=True, highlight=False)
        for note in d.notes:
            self.console.print(escape(note), soft_wrap=True, highlight=False)
        if d.ignored:
            names = ", ".join(p.name for p in d.ignored[:5])
            names += " ..." if len(d.ignored) > 5 else ""
            self.console.print(
                escape(f"ignored {len(d.ignored)} file(s) that are not T1 images: {names}"),
                soft_wrap=True, highlight=False, style="dim")
        if self.plain or self.total == 0:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            ProgressColumn,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.text import Text

        # rate and ETA from the whole run so far (Rich's own need two samples and a window)
        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                rate = _rate(task.completed, task.elapsed)
                return Text(f"{rate * 60:.1f} scans/min" if rate else "-- scans/min",
                            style="progress.data.speed")

        class EtaColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                rate = _rate(task.completed, task.elapsed)
                left = (task.total or 0) - task.completed
                text = _duration(left / rate) if rate else "--"
                return Text(f"ETA {text}", style="progress.remaining")

        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            RateColumn(), TimeElapsedColumn(), EtaColumn(), console=self.console,
        )
        self.progress.start()
        self.task = self.progress.add_task("predicting", total=self.total)

    def result(self, record: dict[str, Any]) -> None:
        """Report one finished input: new warnings, a failure, and progress."""
        from rich.markup import escape

        self.done += 1
        for warning in record.get("warnings") or []:
            if warning in self.seen_warnings:
                continue
            self.seen_warnings.add(warning)
            style = "bold red" if "UNTRAINED" in warning else "yellow"
            self.console.print(f"[{style}]warning:[/] {escape(warning)}", soft_wrap=True)
        for fix in record.get("fixes") or []:
            if fix.get("name") != "resample":  # conform's warning already says so
                self.console.print(f"[cyan]fixed:[/] {escape(_ids(record))}: "
                                   f"{escape(describe_fix(fix))}", soft_wrap=True)
        if record.get("status") == "failed":
            self.console.print(f"[bold red]failed:[/] {escape(str(record.get('error')))}",
                               soft_wrap=True)
            if self.debug and record.get("traceback"):
                self.console.print(escape(record["traceback"]), soft_wrap=True, highlight=False)
        if self.plain and not self.quiet:
            rate = _rate(self.done, time.perf_counter() - self.t0) or 0.0
            eta = (self.total - self.done) / rate if rate > 0 else 0.0
            what = (f"ok, age {record['age']:.1f}, P(female) {record['p_female']:.2f}"
                    if record.get("status") == "ok" and record.get("age") is not None
                    and record.get("p_female") is not None else str(record.get("status")))
            if record.get("status") == "ok" and record.get("brain_age_gap") is not None:
                what += f", gap {record['brain_age_gap']:+.1f}"
                if record.get("brain_age_gap_corrected") is not None:
                    what += f" (corrected {record['brain_age_gap_corrected']:+.1f})"
            seconds = record.get("seconds")
            took = f", {seconds:.1f} s" if isinstance(seconds, float) else ""
            self.console.print(
                escape(f"[{self.done}/{self.total}] {_ids(record)}: {what}{took} "
                       f"({rate * 60:.1f} scans/min, ETA {_duration(eta)})"),
                soft_wrap=True, highlight=False)
        elif self.progress is not None:
            self.progress.update(self.task, advance=1,
                                 description=f"predicting {escape(_ids(record))}")


def print_summary(console: Any, summary: RunSummary, out: str, png: bool) -> None:
    """End-of-run summary: counts, failures with reasons, time per scan, where the results are."""
    from rich.markup import escape

    parts = [f"[green]{summary.ok} ok[/]"]
    if summary.resumed:
        parts[0] += f" ({summary.resumed} from an earlier run)"
    parts.append(f"[red]{summary.failed} failed[/]" if summary.failed else "0 failed")
    if summary.skipped:
        parts.append(f"[yellow]{summary.skipped} skipped[/]")
    speed = ""
    if summary.processed:
        speed = f"; {summary.processed} processed in {_duration(summary.wall_seconds)}"
        if summary.mean_seconds is not None:
            speed += f", {summary.mean_seconds:.1f} s per scan"
        if summary.scans_per_minute is not None:
            speed += f", {summary.scans_per_minute:.2f} scans/min"
    console.print(f"summary: {summary.total} input(s): " + ", ".join(parts) + escape(speed),
                  soft_wrap=True, highlight=False)
    for path, error in summary.failures:
        console.print(f"  [red]failed[/] {escape(path)}: {escape(error)}", soft_wrap=True,
                      highlight=False)
    extra = ", index.html" if png else ""
    console.print(escape(f"results in {out}/ (predictions.tsv{extra})"), soft_wrap=True,
                  highlight=False)


class StepStatus:
    """One line of progress for a long loop: a spinner on a terminal, one plain line per step
    otherwise (a log or a pipe would see nothing until the end)."""

    def __init__(self, console: Any, text: str) -> None:
        self.console = console
        self.plain = not console.is_terminal
        self.status: Any = None if self.plain else console.status(text, spinner="dots")

    def __enter__(self) -> StepStatus:
        if self.status is not None:
            self.status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.status is not None:
            self.status.stop()

    def update(self, text: str) -> None:
        """Show ``text`` as the current step."""
        if self.status is not None:
            self.status.update(text)
        else:
            self.console.print(text, markup=False, highlight=False, soft_wrap=True)
