"""A training run's bookkeeping: the checkpoint format, the per-epoch metrics table
(``metrics.tsv``), the reporters that show progress, the resume message and the run folder's
resolved configuration. The loop that writes them is :mod:`brainbag.train.trainer`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from brainbag.files import write_text_atomic
from brainbag.train.config import TrainConfig, read_toml

CHECKPOINT_FORMAT = "brainbag-checkpoint/1"


METRICS_COLUMNS = ("epoch", "train_loss", "val_loss", "val_mae", "val_accuracy", "lr", "seconds")


class Reporter(Protocol):
    def message(self, text: str) -> None: ...

    def start(self, first_epoch: int, epochs: int, steps: int, done_steps: int) -> None: ...

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None: ...

    def epoch(self, row: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class QuietReporter:
    """Reports nothing (ranks other than 0, tests)."""

    def message(self, text: str) -> None:
        pass

    def start(self, first_epoch: int, epochs: int, steps: int, done_steps: int) -> None:
        pass

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        pass

    def epoch(self, row: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def format_row(row: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {row['epoch']}/{epochs}", f"train_loss {row['train_loss']:.4f}"]
    for key, fmt in (("val_loss", ".4f"), ("val_mae", ".2f"), ("val_accuracy", ".3f")):
        if row.get(key) is not None:
            parts.append(f"{key} {row[key]:{fmt}}")
    parts += [f"lr {row['lr']:.3g}", f"{row['seconds']:.1f} s"]
    if row.get("best"):
        parts.append("(best)")
    return "  ".join(parts)


class ConsoleReporter:
    """A Rich progress bar (epoch, step, loss, ETA) on a terminal; plain lines otherwise."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.progress: Any = None
        self.task: Any = None
        self.epochs = 0

    def message(self, text: str) -> None:
        self.console.print(text, soft_wrap=True, highlight=False, markup=False)

    def start(self, first_epoch: int, epochs: int, steps: int, done_steps: int) -> None:
        self.epochs = epochs
        if not self.console.is_terminal:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]{task.fields[label]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), console=self.console, transient=False,
        )
        self.progress.start()
        self.task = self.progress.add_task(
            "train", total=epochs * steps, completed=done_steps,
            label=f"epoch {first_epoch + 1}/{epochs}", loss="-",
        )

    def step(self, epoch: int, step: int, steps: int, loss: float) -> None:
        if self.progress is not None:
            self.progress.update(self.task, advance=1, loss=f"{loss:.4f}",
                                 label=f"epoch {epoch + 1}/{self.epochs} step {step + 1}/{steps}")

    def epoch(self, row: dict[str, Any]) -> None:
        line = format_row(row, self.epochs)
        if self.progress is not None:
            self.progress.console.print(line, highlight=False, markup=False)
        else:
            self.console.print(line, highlight=False, markup=False, soft_wrap=True)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


def write_metrics(path: Path, history: Sequence[dict[str, Any]]) -> None:
    lines = ["\t".join(METRICS_COLUMNS)]
    for row in history:
        cells = []
        for col in METRICS_COLUMNS:
            v = row.get(col)
            if v is None:
                cells.append("")
            elif col == "epoch":
                cells.append(str(int(v)))
            elif col == "seconds":
                cells.append(f"{v:.2f}")
            else:
                cells.append(f"{v:.8g}")
        lines.append("\t".join(cells))
    write_text_atomic(path, "\n".join(lines) + "\n")


def resume_message(epoch: int, step: int, steps: int) -> str:
    """Where a resumed run continues, in the words of the interruption it continues from
    ("interrupted at epoch 9, step 2/3" or "interrupted after epoch 8"): ``epoch`` epochs and
    ``step`` steps of the next one are done."""
    if step:
        return (f"resumed from epoch {epoch + 1}, step {step}/{steps}: continuing with step "
                f"{step + 1}/{steps}")
    return f"resumed after epoch {epoch}: continuing with epoch {epoch + 1}"


def read_run_config(out: Path) -> TrainConfig:
    """The resolved configuration a run wrote to ``out/config.toml``."""
    return TrainConfig.from_dict(read_toml(out / "config.toml"), str(out / "config.toml"))
