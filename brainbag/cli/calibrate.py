"""``brainbag calibrate``: options to CalibrateSettings, one call, what was fitted."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from brainbag.cli.common import (
    EXIT_INTERRUPTED,
    BatchSizeOpt,
    CacheDirOpt,
    Device,
    DeviceOpt,
    ForceOpt,
    JobsOpt,
    ManifestOpt,
    MaskOpt,
    MaskPatternOpt,
    Mode,
    ModeOpt,
    N4Opt,
    NoResampleOpt,
    OfflineOpt,
    OverlapOpt,
    ParticipantsOpt,
    PrecisionOpt,
    PrecisionOption,
    RfOpt,
    ThreadsOpt,
    WeightsOpt,
    WindowOpt,
    _console,
    _exit_on_errors,
    _large_pages_for_torch,
    _state,
    check_rf,
    inference_settings,
)


class Line(str, Enum):
    auto = "auto"
    full = "full"
    offset = "offset"


def calibrate(
    controls: Annotated[
        list[Path],
        typer.Argument(help="Healthy controls scanned at one site, with their ages: a BIDS "
                       "dataset (participants.tsv), a folder or image files with "
                       "--participants TABLE, or a list file (.txt) with an age column."),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The site calibration file to write (JSON).")
    ] = Path("site-calibration.json"),
    line: Annotated[
        Line, typer.Option("--line", help="Bias line: full fits slope and intercept on the "
                           "controls; offset keeps the weights' slope and fits the intercept; "
                           "auto: full when the controls can tell their slope (10 or more over "
                           "at least 5 years), else offset.")
    ] = Line.auto,
    name: Annotated[
        str | None, typer.Option("--name", help="A name for the site or scanner, recorded in "
                                 "the file.")
    ] = None,
    work: Annotated[
        Path | None,
        typer.Option("--work", help="Keep the controls' predictions (maps, prediction.json, "
                     "predictions.tsv) in this folder; a rerun with the same folder reuses "
                     "them \\[default: a temporary folder, removed].")
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --out if it exists.")
    ] = False,
    participants: ParticipantsOpt = None,
    rf: RfOpt = None,
    weights: WeightsOpt = None,
    mask: MaskOpt = None,
    mask_pattern: MaskPatternOpt = None,
    mode: ModeOpt = Mode.auto,
    window: WindowOpt = (160, 160, 128),
    overlap: OverlapOpt = 0.25,
    batch_size: BatchSizeOpt = 1,
    device: DeviceOpt = Device.auto,
    precision: PrecisionOption = PrecisionOpt.fp32,
    threads: ThreadsOpt = 0,
    jobs: JobsOpt = 1,
    no_resample: NoResampleOpt = False,
    n4: N4Opt = False,
    force: ForceOpt = False,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Fit a site calibration on healthy controls from your scanner, for `predict --calibration`.

    Predicts the controls as predict does (same weights, checks and inference), fits the bias
    line, interval and map-spread range on them, and writes one JSON file for these weights;
    see the README's "Use on your own scanner".
    """
    _large_pages_for_torch()
    from brainbag.run.calibrate import CalibrateSettings, check_calibration_out, run_calibrate
    from brainbag.run.predict import PredictSettings
    from brainbag.run.progress import ConsoleObserver

    check_rf(rf)
    with _exit_on_errors():
        check_calibration_out(out, overwrite)  # before the weights load
    settings = CalibrateSettings(
        out=out,
        predict=PredictSettings(
            out=Path("."),  # unused: the predictions go to --work or a temporary folder
            rf=rf, weights=weights, mask=mask,
            inference=inference_settings(mode, window, overlap, batch_size, device, precision,
                                         threads),
            resample=not no_resample, manifests=tuple(manifest or ()), cache_dir=cache_dir,
            offline=offline, force=force, n4=n4, mask_pattern=mask_pattern, jobs=jobs,
            participants=participants,
        ),
        line=line.value, name=name, work=work, overwrite=overwrite,
    )
    from rich.markup import escape

    console = _console()
    err = _console(stderr=True)
    try:
        with _exit_on_errors(), ConsoleObserver(err, debug=_state["debug"]) as observer:
            result = run_calibrate(list(controls), settings, observer)
    except KeyboardInterrupt:
        err.print("[bold red]interrupted:[/] no calibration written", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    from brainbag.person.calibration import describe, format_effect

    for text in describe(result.site) + format_effect(result.site.effect):
        console.print(escape(text), soft_wrap=True)
    for warning in result.site.warnings:
        err.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    console.print(escape(f"wrote {result.path}; use it with: brainbag predict ... --weights "
                         f"{weights or result.site.weights_id} --calibration {result.path}"),
                  soft_wrap=True)
