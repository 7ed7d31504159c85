"""``brainbag train``, ``crossval`` and ``evaluate``: options to a config, one call."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from brainbag.cli.common import (
    EXIT_INTERRUPTED,
    CacheDirOpt,
    Device,
    ManifestOpt,
    Mode,
    OfflineOpt,
    PrecisionOpt,
    _console,
    _exit_on_errors,
    _train_default,
    fail,
)
from brainbag.errors import EXIT_USAGE, UsageError


class Task(str, Enum):
    age = "age"
    sex = "sex"
    both = "both"


class TrainPrecision(str, Enum):
    auto = "auto"
    fp32 = "fp32"
    bf16 = "bf16"


class ValView(str, Enum):
    centre = "centre"
    full = "full"


InitOpt = Annotated[
    str | None,
    typer.Option("--init", help="Fine-tune: start from these weights (a manifest weights ID or "
                 "a .safetensors file) instead of random ones; architecture, voxel size, view "
                 "and age scaling are theirs (see the finetune-small recipe) \\[default: "
                 "random]."),
]
FreezeOpt = Annotated[
    int | None,
    typer.Option("--freeze-stages", help="With --init: keep the stem and the first N of the 4 "
                 "stages as they are " + _train_default("freeze_stages") + "."),
]


class SplitName(str, Enum):
    all = "all"
    train = "train"
    val = "val"
    test = "test"


def train(
    data: Annotated[
        Path,
        typer.Argument(help="BIDS folder, participants table (.tsv: participant_id, age, sex, "
                       "t1w[, mask, split]) or Cam-CAN image folder (with --split)."),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder.")] = Path("runs/brainbag"),
    recipe: Annotated[
        str | None,
        typer.Option("--recipe", help="A recipe shipped with brainbag (ixi-open-v1; "
                     "camcan-paper: the paper's; finetune-small, with --init) or a .toml path "
                     "\\[default: ixi-open-v1, the recipe of the shipped weights]."),
    ] = None,
    split: Annotated[
        Path | None,
        typer.Option("--split", help="Split folder (train/val/test .csv) or splits.tsv "
                     "\\[default: the table's split column, else random by subject]."),
    ] = None,
    rf: Annotated[int | None, typer.Option("--rf", help="Receptive field: 9, 17, 33 or 177 "
                                           + _train_default("rf") + ".")] = None,
    task: Annotated[Task | None, typer.Option("--task", help="age, sex or both (one network, "
                                              "two heads) " + _train_default("task") + ".")
                    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the training "
                                               "images " + _train_default("epochs") + ".")
                      ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Effective batch "
                                 + _train_default("batch_size") + ".")] = None,
    micro_batch: Annotated[
        int | None,
        typer.Option("--micro-batch", help="Samples per forward pass (same gradient, less "
                     "memory) \\[default: the whole batch]."),
    ] = None,
    crop: Annotated[
        tuple[int, int, int] | None,
        typer.Option("--crop", help="Random crop size x y z " + _train_default("crop") + "."),
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Adam learning rate "
                                             + _train_default("lr") + ".")] = None,
    device: Annotated[
        Device | None, typer.Option("--device", help="auto = cuda when available "
                                    + _train_default("device") + ".")] = None,
    precision: Annotated[
        TrainPrecision | None,
        typer.Option("--precision", help="auto = bf16 autocast on GPU, fp32 on CPU "
                     + _train_default("precision") + "."),
    ] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="Seed of the initial weights, "
                                             "split and crops " + _train_default("seed") + ".")
                    ] = None,
    width: Annotated[
        int | None,
        typer.Option("--width", help="Stem channels (32 = the paper's half-width ResNet-50); "
                     "smaller for quick experiments " + _train_default("width") + "."),
    ] = None,
    val_view: Annotated[
        ValView | None,
        typer.Option("--val-view", help="Validation view: centre crop or full volume "
                     + _train_default("val_view") + "."),
    ] = None,
    val_fraction: Annotated[
        float | None, typer.Option("--val-fraction", help="Random split: share of subjects "
                                   "for validation " + _train_default("val_fraction") + ".")
    ] = None,
    test_fraction: Annotated[
        float | None, typer.Option("--test-fraction", help="Random split: share of subjects "
                                   "held out for test " + _train_default("test_fraction")
                                   + ".")] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the network "
                                  + _train_default("compile") + ".")
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Threads loading volumes "
                                 + _train_default("workers") + ".")
    ] = None,
    local_weight: Annotated[
        float | None, typer.Option("--local-weight", help="Weight of the loss on every cell of "
                                   "the local map (the subject's age and sex per cell) "
                                   + _train_default("local_weight") + ".")] = None,
    augment: Annotated[
        float | None, typer.Option("--augment", help="Intensity augmentation strength (gamma, "
                                   "bias field, blur, noise), 0 = off "
                                   + _train_default("augment") + ".")] = None,
    data_name: Annotated[
        str | None, typer.Option("--data-name", help="Training data name for the weights "
                                 "metadata \\[default: from the data].")] = None,
    data_licence: Annotated[
        str | None, typer.Option("--data-licence", help="Licence of the training data, "
                                 "recorded in the weights and model card.")] = None,
    init: InitOpt = None,
    freeze_stages: FreezeOpt = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its last.ckpt.")
    ] = False,
) -> None:
    """Train a BagNet-3D into a run folder, by default with the recipe of the shipped weights
    (ixi-open-v1); flags override the recipe."""
    from brainbag.train.config import resolve

    flags = {
        "split": str(split) if split is not None else None, "rf": rf,
        "task": task.value if task else None, "epochs": epochs, "batch_size": batch_size,
        "micro_batch": micro_batch, "crop": list(crop) if crop else None, "lr": lr,
        "device": device.value if device else None,
        "precision": precision.value if precision else None, "seed": seed, "width": width,
        "val_view": val_view.value if val_view else None, "val_fraction": val_fraction,
        "test_fraction": test_fraction, "compile": compile_model, "workers": workers,
        "local_weight": local_weight, "augment": augment,
        "data_name": data_name, "data_licence": data_licence, "init": init,
        "freeze_stages": freeze_stages,
    }
    with _exit_on_errors():
        config, explicit = resolve(str(data), str(out), recipe, flags)
    console = _console()
    from brainbag.train.record import ConsoleReporter
    from brainbag.train.trainer import TrainingInterrupted, run_training

    with _exit_on_errors():
        try:
            result = run_training(config, ConsoleReporter(console), resume, explicit)
        except TrainingInterrupted as exc:
            _console(stderr=True).print(f"[yellow]stopped:[/] {exc}", soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            _console(stderr=True).print("[yellow]stopped:[/] interrupted before training "
                                        "started; nothing was saved")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    if result.main:
        console.print(f"done: {result.epochs} epochs; best epoch {result.best_epoch}; "
                      f"weights in {result.weights}", soft_wrap=True)


def crossval(
    data: Annotated[
        list[Path],
        typer.Argument(help="Data in any layout `brainbag train` reads; several participants "
                       "tables (or BIDS folders) are pooled, each image keeping its data set "
                       "(the table's 'dataset' column, else its folder name), 'site' and "
                       "'group'.")],
    folds: Annotated[
        Path | None, typer.Option("--folds", help="Folds TSV (participant_id, fold), or the "
                                  "name of folds shipped with brainbag (ixi-5fold); made "
                                  "(stratified by data set, site, group and age; --k, --seed) "
                                  "when it does not exist \\[default: OUT/folds.tsv].")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "runs/crossval"),
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="Training recipe, as for train \\[default: "
                                 "ixi-open-v1].")] = None,
    rf: Annotated[int | None, typer.Option("--rf", help="Receptive field (overrides the "
                                           "recipe).")] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Epochs per fold (overrides "
                                               "the recipe).")] = None,
    width: Annotated[int | None, typer.Option("--width", help="Network width (overrides the "
                                              "recipe).")] = None,
    local_weight: Annotated[
        float | None, typer.Option("--local-weight", help="Weight of the loss on every cell "
                                   "of the local map (overrides the recipe).")] = None,
    augment: Annotated[
        float | None, typer.Option("--augment", help="Intensity augmentation strength, 0 = "
                                   "off (overrides the recipe).")] = None,
    k: Annotated[int, typer.Option("--k", help="Number of folds when making the folds file.")
                 ] = 5,
    seed: Annotated[int, typer.Option("--seed", help="Seed of a new folds file.")] = 0,
    leave_one_dataset_out: Annotated[
        bool, typer.Option("--leave-one-dataset-out", help="One fold per data set: train on "
                           "the others, test on it (a site never seen).")] = False,
    train_groups: Annotated[
        list[str] | None,
        typer.Option("--train-groups", help="Train only on these values of the 'group' "
                     "column (repeat, or comma-separated); the other groups are still "
                     "predicted and reported. Images without a group are trained on.")] = None,
    device: Annotated[Device | None, typer.Option("--device")] = None,
    init: InitOpt = None,
    freeze_stages: FreezeOpt = None,
) -> None:
    """Cross-validation grouped by subject: one model per fold, held-out predictions pooled and
    reported per data set, site and group next to two baselines fitted on the same training
    folds, the per-site training mean and a morphometric ridge regression (resumable)."""
    from brainbag.errors import UsageError
    from brainbag.train.config import find_folds, resolve
    from brainbag.train.crossval import run_crossval
    from brainbag.train.record import ConsoleReporter
    from brainbag.train.trainer import run_training

    flags = {"rf": rf, "epochs": epochs, "width": width, "local_weight": local_weight,
             "augment": augment, "device": device.value if device else None,
             "init": init, "freeze_stages": freeze_stages}
    groups = None if not train_groups else sorted(
        {g.strip() for value in train_groups for g in value.split(",") if g.strip()})
    with _exit_on_errors():
        if leave_one_dataset_out and folds is not None:
            raise UsageError("--folds and --leave-one-dataset-out exclude each other: the "
                             "folds of leave-one-dataset-out are the data sets")
        config, explicit = resolve(str(data[0]), str(out), recipe, flags)
    console = _console()

    def train_fold(c: Any, resume: bool) -> Any:
        return run_training(c, ConsoleReporter(console), resume, explicit)

    def on_fold(n: int, total: int) -> None:
        console.print(f"[bold]fold {n + 1}/{total}[/]")

    def on_message(text: str) -> None:
        console.print(text, soft_wrap=True, highlight=False, markup=False)

    with _exit_on_errors():
        try:
            result = run_crossval(data, find_folds(folds) if folds is not None else None,
                                  config, out, k=k, seed=seed, train=train_fold,
                                  on_fold=on_fold, leave_one_dataset_out=leave_one_dataset_out,
                                  train_groups=groups, on_message=on_message)
        except KeyboardInterrupt:
            _console(stderr=True).print(
                "[yellow]stopped:[/] interrupted; run the same command again to continue")
            raise typer.Exit(EXIT_INTERRUPTED) from None
    m = result.metrics
    for table in crossval_tables(m, leave_one_dataset_out):
        console.print(table)
    if m["train_groups"] is not None:
        console.print(f"trained on the groups {', '.join(m['train_groups'])} (and images "
                      "without a group); the other groups were predicted only", soft_wrap=True)
    console.print(f"results in {out}/ (predictions.tsv, metrics.json, table.tsv, "
                  "learning_curve.tsv; fold-K/run: each fold's training run)", soft_wrap=True)


def crossval_tables(m: dict[str, Any], leave_one_dataset_out: bool) -> list[Any]:
    """The printed figures of a cross-validation: an age table and a sex table, one row per
    subset (all, data sets, sites, groups), the network next to both baselines."""
    from rich.table import Table

    from brainbag.train.cvreport import crossval_rows
    from brainbag.train.evaluate import BIAS_SLOPE_NOTE

    scheme = "leave-one-dataset-out" if leave_one_dataset_out else f"{m['folds']} folds"
    title = f"brainbag crossval ({scheme}, {m['subjects']} subjects, held-out predictions)"
    baselines = ("site mean: the mean age (majority sex) of the training images of the same "
                 "site, or of all training images for a site never trained on. morph.: ridge "
                 "(logistic) regression on whole-brain volume and intensity numbers, fitted on "
                 "the training folds. The ratios to both are in table.tsv.")

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    age = Table(title=f"{title}: age (MAE in years)", caption=f"{baselines} {BIAS_SLOPE_NOTE}",
                caption_justify="left")
    sex = Table(title=f"{title}: sex")
    rows = crossval_rows(m)
    widest = max(len(row["subset"]) for row in rows)
    for table, cols in ((age, ("MAE", "site mean", "morph.", "r", "bias slope")),
                        (sex, ("accuracy", "site mean", "morph.", "AUC", "morph. AUC"))):
        table.add_column("subset", no_wrap=True, min_width=widest)
        table.add_column("n", justify="right")
        for col in cols:
            table.add_column(col, justify="right")
    for row in rows:
        age.add_row(row["subset"], str(row["n"]), f(row["age_mae"], ".2f"),
                    f(row["site_mean_mae"], ".2f"), f(row["morph_mae"], ".2f"),
                    f(row["age_r"], ".3f"), f(row["age_bias_slope"], ".3f"))
        sex.add_row(row["subset"], str(row["n"]), f(row["sex_accuracy"], ".1%"),
                    f(row["site_mean_accuracy"], ".1%"), f(row["morph_accuracy"], ".1%"),
                    f(row["sex_auc"], ".3f"), f(row["morph_auc"], ".3f"))
    return [age, sex]


def evaluate(
    data: Annotated[Path, typer.Argument(help="Data in any layout `brainbag train` reads.")],
    weights: Annotated[
        list[str] | None,
        typer.Option("--weights", help="A manifest weights ID (see `brainbag weights list`) or "
                     "a .safetensors file, as for predict; repeat to compare several "
                     "\\[default: the manifest's default for --rf]."),
    ] = None,
    rf: Annotated[
        int | None,
        typer.Option("--rf", help="Receptive field: 9, 17, 33 or 177; without --weights, the "
                     "manifests' default weights for it \\[default: 9, or the RF of --weights]."),
    ] = None,
    split: Annotated[
        SplitName, typer.Option("--split", help="Which images: all, or one split (from "
                                "--split-file or the splits.tsv beside the first weights).")
    ] = SplitName.all,
    split_file: Annotated[
        Path | None, typer.Option("--split-file", help="Split folder or a run's splits.tsv.")
    ] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.")] = Path(
        "brainbag-eval"),
    mode: Annotated[Mode, typer.Option("--mode", help="As for predict.")] = Mode.auto,
    window: Annotated[
        tuple[int, int, int], typer.Option("--window", help="Sliding window x y z.")
    ] = (160, 160, 128),
    overlap: Annotated[float, typer.Option("--overlap", help="As for predict.")] = 0.25,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Windows per pass.")] = 1,
    device: Annotated[Device, typer.Option("--device")] = Device.auto,
    precision: Annotated[PrecisionOpt, typer.Option("--precision")] = PrecisionOpt.fp32,
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Skip the scatter PNG.")] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Evaluate images that fail predict's input checks "
                           "(recorded per image in checks.json and predictions.tsv).")
    ] = False,
    mask_cache: Annotated[
        Path | None,
        typer.Option("--mask-cache", help="Images without a mask file are masked as predict "
                     "masks them (a head is stripped with deepbet): the folder that keeps the "
                     "stripped masks, one per image, e.g. a training run's brain_masks "
                     "\\[default: OUT/brain_masks]."),
    ] = None,
    manifest: ManifestOpt = None,
    cache_dir: CacheDirOpt = None,
    offline: OfflineOpt = False,
) -> None:
    """Age MAE, RMSE, r, bias; sex accuracy and AUC; per-image TSV and a scatter plot."""
    from brainbag.network.inference import InferenceSettings
    from brainbag.network.model import RF_KERNEL3
    from brainbag.train.evaluate import EvaluateSettings, run_evaluate, table_rows

    if rf is not None and rf not in RF_KERNEL3:
        fail(UsageError(f"--rf must be one of {sorted(RF_KERNEL3)}, got {rf}"), EXIT_USAGE)
    settings = EvaluateSettings(
        data=data, weights=tuple(weights or ()), rf=rf, manifests=tuple(manifest or ()),
        cache_dir=cache_dir, offline=offline, split=split.value, split_file=split_file, out=out,
        inference=InferenceSettings(mode=mode.value, window=tuple(window),  # type: ignore[arg-type]
                                    overlap=overlap, batch_size=batch_size,
                                    device=device.value, precision=precision.value),
        plot=not no_plot, force=force, mask_cache=mask_cache,
    )
    from brainbag.run.progress import StepStatus

    console = _console()
    with _exit_on_errors(), StepStatus(_console(stderr=True), "evaluating...") as status:
        def progress(k: int, n: int, record: Any) -> None:
            status.update(f"evaluating {k + 1}/{n}: {record.participant_id}")

        results = run_evaluate(settings, on_image=progress)
    from rich.table import Table

    from brainbag.train.evaluate import BIAS_SLOPE_NOTE

    table = Table(title=f"brainbag evaluate ({split.value}, {mode.value})",
                  caption=BIAS_SLOPE_NOTE, caption_justify="left")
    for col, justify in (("weights", "left"), ("RF", "right"), ("n", "right"),
                         ("age MAE", "right"), ("RMSE", "right"), ("r", "right"),
                         ("bias slope", "right"), ("sex acc.", "right"), ("AUC", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]

    def f(v: Any, fmt: str) -> str:
        return "-" if v is None else format(v, fmt)

    for row in table_rows(results):
        table.add_row(row["weights"], str(row["rf"]), str(row["n"]), f(row["age_mae"], ".2f"),
                      f(row["age_rmse"], ".2f"), f(row["age_r"], ".3f"),
                      f(row["age_bias_slope"], ".3f"), f(row["sex_accuracy"], ".1%"),
                      f(row["sex_auc"], ".3f"))
    console.print(table)
    if results and results[0].masks:
        console.print(results[0].masks, soft_wrap=True)
    console.print(f"results in {out}/ (<weights>/predictions.tsv, metrics.json, age_scatter.png"
                  + (", table.tsv)" if len(results) > 1 else ")"), soft_wrap=True)
