"""What every command shares: the command classes, option types, errors as one red line."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from brainbag.errors import EXIT_FAILURE, BrainbagError, one_line

#: Help texts are rich markup: a literal ``[`` is written ``\\[`` (rich drops ``[default: 9]``
#: as an unknown style tag, which left help texts ending in " .").


def _default(text: str) -> str:
    """``[default: text]`` for a help text (escaped for rich markup)."""
    return f"\\[default: {text}]"


def _train_default(key: str) -> str:
    """``[default: ...]`` of a ``train`` option: its value in the configuration ``train`` uses
    without options (the defaults and the default recipe), so the help cannot drift from it."""
    from brainbag.train.config import default_config

    value = getattr(default_config(), key)
    if isinstance(value, bool):
        return _default("on" if value else "off")
    return _default(" ".join(map(str, value)) if isinstance(value, list) else str(value))


def _flags_without_type(params: list[Any]) -> list[Any]:
    """On/off flags take no value: show no ``<bool>`` type for them in ``--help``."""
    for param in params:
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""
    return params


def reflow(text: str | None) -> str | None:
    """A docstring's paragraphs as one line each: Typer's rich help keeps the source's line
    breaks, which left ragged lines (a short line after every break) at any terminal width."""
    if not text:
        return text
    import inspect

    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


class Command(TyperCommand):
    """A brainbag command: its flags show no value type in ``--help``, and its help text wraps
    to the terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


class Group(TyperGroup):
    """The ``brainbag`` and ``brainbag weights`` groups: flags show no value type, and help
    texts wrap to the terminal."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = reflow(self.help)

    def get_params(self, ctx: Any) -> list[Any]:
        return _flags_without_type(super().get_params(ctx))


_state = {"debug": False}
EXIT_INTERRUPTED = 130


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


class StripOpt(str, Enum):
    auto = "auto"
    always = "always"
    never = "never"


StripOption = Annotated[
    StripOpt,
    typer.Option("--strip", help="Skull stripping of inputs without a mask, with deepbet: auto "
                 "= heads (skull on) only, always = every input, never = refuse heads."),
]

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

# Options `predict` and `calibrate` share: the weights, the inputs' masks and tables, the checks
# and the inference (calibrate predicts its controls the way predict does).
RfOpt = Annotated[
    int | None,
    typer.Option("--rf", help="Receptive field in mm: 9, 17, 33 or 177 \\[default: 9, or the "
                 "RF of --weights]."),
]
WeightsOpt = Annotated[
    str | None,
    typer.Option("--weights", help="A manifest weights ID (see `brainbag weights list`) or "
                 "a .safetensors file written by brainbag \\[default: the manifest's default "
                 "for --rf]."),
]
MaskOpt = Annotated[
    Path | None,
    typer.Option("--mask", help="Brain mask on the image grid (voxels > 0 = brain); voxels "
                 "outside it are set to background. Default: made by skull stripping for a "
                 "head (see --strip), else voxels > 0 of the image."),
]
ModeOpt = Annotated[
    Mode, typer.Option("--mode", help="auto: what the weights were trained on (full for "
                       "whole-brain views, else sliding); sliding: windows of the training "
                       "crop size; full: the whole volume (or brain view) in one pass.")
]
WindowOpt = Annotated[
    tuple[int, int, int],
    typer.Option("--window", help="Sliding window size in voxels (x y z), multiples of 8."),
]
OverlapOpt = Annotated[
    float, typer.Option("--overlap", help="Fraction of a window shared by neighbours, [0, 1).")
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", help="Windows per forward pass (sliding mode).")
]
DeviceOpt = Annotated[Device, typer.Option("--device", help="auto = cuda when available, else "
                                           "cpu.")]
PrecisionOption = Annotated[
    PrecisionOpt,
    typer.Option("--precision", help="bf16 autocast on GPUs and CPUs that support it."),
]
ThreadsOpt = Annotated[
    int,
    typer.Option("--threads", help="CPU threads; 0 = one per physical core, at most the CPUs "
                 "this process may use and those other work leaves idle (by the 1-minute "
                 "load average): on a busy machine more threads are slower."),
]
NoResampleOpt = Annotated[
    bool,
    typer.Option("--no-resample", help="Refuse inputs that are not 1 mm isotropic instead "
                 "of resampling them."),
]
ForceOpt = Annotated[
    bool, typer.Option("--force", help="Predict even when a check fails (recorded in "
                       "prediction.json).")
]
N4Opt = Annotated[
    bool, typer.Option("--n4", help="N4 bias-field correction within the brain mask before "
                       "prediction.")
]
MaskPatternOpt = Annotated[
    str | None,
    typer.Option("--mask-pattern", help="Mask next to each image, as a template with "
                 "{stem} {name} {subject} {session} {prefix}, e.g. '{prefix}_mask.nii.gz' "
                 "(relative to the image's folder). A missing mask fails that input. Without "
                 "it, a folder's masks lying beside their scans (<prefix>_mask, _brain_mask or "
                 "_desc-brain_mask) are used."),
]
JobsOpt = Annotated[
    int, typer.Option("--jobs", "-j", min=0, help="Worker threads that read and preprocess "
                      "the next scans while the current one runs; 0 = no overlap.")
]
ParticipantsOpt = Annotated[
    Path | None,
    typer.Option("--participants", help="Table (.tsv/.csv) of participant_id (or t1w "
                 "paths) with age and/or sex, matched to the inputs by file name or path. "
                 "Without it: a BIDS dataset's participants.tsv, sessions.tsv and "
                 "*_scans.tsv; a list file's third and fourth columns."),
]


def check_rf(rf: int | None) -> None:
    """Refuse an --rf no BagNet-3D has (exit 2, one line)."""
    from brainbag.network.model import RF_KERNEL3

    if rf is not None and rf not in RF_KERNEL3:
        from brainbag.errors import EXIT_USAGE, UsageError

        fail(UsageError(f"--rf must be one of {sorted(RF_KERNEL3)}, got {rf}"), EXIT_USAGE)


def inference_settings(mode: Mode, window: tuple[int, int, int], overlap: float,
                       batch_size: int, device: Device, precision: PrecisionOpt,
                       threads: int) -> Any:
    """The :class:`~brainbag.network.inference.InferenceSettings` of the shared options."""
    from brainbag.network.inference import InferenceSettings

    return InferenceSettings(
        mode=mode.value,
        window=tuple(window),  # type: ignore[arg-type]
        overlap=overlap,
        batch_size=batch_size,
        device=device.value,
        precision=precision.value,
        threads=threads,
    )
