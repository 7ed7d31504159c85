"""``brainbag train``: the seed recipe, fast, resumable and multi-GPU.

One step = one effective batch (16 in the paper's recipe) of random crops with random left-right
flips, cut on the device from volumes cached in memory after the same preprocessing ``predict``
uses (:func:`brainbag.image.preprocess.conform`). Every norm in BagNet-3D is per-sample
InstanceNorm, so a real batch has exactly the gradient of the paper's 16 accumulated single-crop
steps; the batch is split into ``micro_batch`` forward passes only to fit memory (same gradient
again).

Loss per sample (averaged over the batch): ``age_loss_weight * (age_pred - age)^2`` on the
standardised age (training-set mean and std, stored in the weights) plus
``sex_loss_weight * BCE(sex_logit, female)``; both weights are 1 by default, which puts the two
terms on the same scale at the start (MSE of a standardised target ~1, BCE ~0.69). With
``local_weight`` > 0 the same terms for every cell of the local map, brain-weighted, are added
(:meth:`brainbag.train.steps.LossSpec.local_per_sample`).

Reproducibility: model initialisation uses ``seed``; each epoch's shuffle, crops and flips come
from a generator seeded with ``(seed, epoch)`` and drawn for the whole batch on every rank, so a run
on N processes sees the same crops as a run on one. Checkpoints hold model, optimizer, scheduler,
RNG states, epoch and the position inside the epoch; ``--resume`` continues exactly.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in
DistributedDataParallel; each rank takes every ``world``-th sample of each batch and scales its
loss so DDP's gradient average equals the single-process batch mean. Rank 0 writes all files.

This module is the loop (:class:`Trainer`, :func:`run_training`); one step's loss, gradients and
batches are in :mod:`brainbag.train.steps` (intensity augmentation in
:mod:`brainbag.train.augment`), the run's record (checkpoint format, metrics.tsv, reporters,
resume message) in :mod:`brainbag.train.record`, the data sets it records in
:mod:`brainbag.train.provenance`, the torchrun plumbing in :mod:`brainbag.train.distributed`.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from brainbag import __version__
from brainbag.errors import BrainbagError, InputError, ProcessingError, UsageError
from brainbag.files import atomic_path, write_text_atomic
from brainbag.image.masks import MaskCache, MaskNote, describe_sources, mask_sources
from brainbag.network.inference import bf16_supported
from brainbag.network.model import BagNet3D, BagNetConfig
from brainbag.train.config import TrainConfig, to_toml
from brainbag.train.datasets import (
    DataSource,
    ImageRecord,
    Volume,
    centre_start,
    discover,
    load_volumes,
    random_split,
    splits_tsv,
)
from brainbag.train.distributed import StopFlag, init_distributed
from brainbag.train.init import adopt, age_range_with, open_init, prepare
from brainbag.train.provenance import datasets_line, describe_datasets, patients_sentence
from brainbag.train.record import (
    CHECKPOINT_FORMAT,
    QuietReporter,
    Reporter,
    resume_message,
    write_metrics,
)
from brainbag.train.statistics import training_statistics
from brainbag.train.steps import (
    LossSpec,
    PooledNet,
    accumulate_gradients,
    augment_views,
    augmentation_text,
    draw_views,
    epoch_generator,
    jitter_intensity,
    loss_text,
    make_batch,
    make_masks,
    make_scheduler,
    pooled_and_local,
)
from brainbag.weights.card import model_card
from brainbag.weights.file import DEFAULT_PREPROCESSING, WeightsMeta, save_weights

#: settings a resumed run may change; any other flag must match the run's config
RESUMABLE = ("epochs", "device", "workers", "cache_device", "compile", "precision",
             "mask_cache")
EXIT_INTERRUPTED = 130


class TrainingInterrupted(BrainbagError):
    """Ctrl-C or SIGTERM: the state was saved; ``--resume`` continues."""

    exit_code = EXIT_INTERRUPTED


class TrainingDiverged(ProcessingError):
    """The loss became NaN or infinite."""


# --- the run -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    epochs: int
    best_epoch: int | None
    best: dict[str, float | None]
    weights: Path
    resumed_from: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    main: bool = True  # False on torchrun ranks other than 0 (they report nothing)


@dataclass
class _Labelled:
    records: list[ImageRecord]
    targets: torch.Tensor  # (n, 2): standardised age, female (NaN where missing)
    volumes: list[Volume] = field(default_factory=list)


class Trainer:
    """One training run; ``run()`` does it all. Use :func:`train` for the usual entry point."""

    def __init__(self, config: TrainConfig, reporter: Reporter | None = None,
                 resume: bool = False) -> None:
        config.validate()
        self.config = config
        self.out = Path(config.out)
        self.resume = resume
        self.dist, self.device = init_distributed(config.device)
        self.reporter: Reporter = reporter if (reporter is not None and self.dist.main) \
            else QuietReporter()
        self._resolve_speed_options()
        self.loss = LossSpec(config.heads, config.age_loss_weight, config.sex_loss_weight,
                             config.local_weight)
        self.stop = StopFlag()
        self.mask_notes: list[MaskNote] = []  # where each loaded volume's brain mask came from

    # setup -----------------------------------------------------------------------------------
    def _resolve_speed_options(self) -> None:
        """Precision and memory format from the configuration (again after a resume merged the
        run's own settings)."""
        self.precision = self._precision()
        self.channels_last = self.config.channels_last == "on" or (
            self.config.channels_last == "auto" and self.device.type == "cuda")

    def _precision(self) -> str:
        p = self.config.precision
        if p == "auto":
            return "bf16" if self.device.type == "cuda" and bf16_supported(self.device) \
                else "fp32"
        if p == "bf16" and not bf16_supported(self.device):
            self.reporter.message(f"warning: bf16 is not supported on this {self.device.type}; "
                                  "training in fp32")
            return "fp32"
        return p

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _data(self, checkpoint: dict[str, Any] | None) -> DataSource:
        c = self.config
        split = Path(c.split) if c.split else None
        if checkpoint is not None and (self.out / "splits.tsv").is_file():
            split = self.out / "splits.tsv"  # the run's own split, whatever made it
        source = discover(Path(c.data), split)
        if source.split_source is None:
            source.records = random_split(source.records, c.val_fraction, c.test_fraction,
                                          c.seed)
            source.split_source = (f"random by subject (seed {c.seed}, val {c.val_fraction}, "
                                   f"test {c.test_fraction})")
        return source

    def _labelled(self, records: list[ImageRecord], scaling: dict[str, float] | None,
                  what: str) -> _Labelled:
        heads = self.config.heads
        keep = [r for r in records
                if ("age" not in heads or r.age is not None)
                and ("sex" not in heads or r.sex is not None)]
        if len(keep) < len(records):
            self.reporter.message(
                f"warning: {len(records) - len(keep)} {what} images lack the "
                f"{'/'.join(heads)} label(s) and are left out")
        targets = torch.full((len(keep), 2), float("nan"), dtype=torch.float32)
        for i, r in enumerate(keep):
            if r.age is not None and scaling is not None:
                targets[i, 0] = (r.age - scaling["mean"]) / scaling["std"]
            if r.sex is not None:
                targets[i, 1] = 1.0 if r.sex == "F" else 0.0
        return _Labelled(keep, targets)

    def _age_scaling(self, train: list[ImageRecord]) -> dict[str, float] | None:
        if "age" not in self.config.heads:
            return None
        ages = np.array([r.age for r in train if r.age is not None], dtype=np.float64)
        if ages.size == 0:
            raise InputError(f"{self.config.data}: no training image has an age")
        std = float(ages.std())
        return {"mean": float(ages.mean()), "std": std if std > 1e-6 else 1.0}

    def _load(self, sets: list[_Labelled]) -> None:
        c = self.config
        dtype = torch.float16 if c.cache_dtype == "float16" else torch.float32
        records = [r for s in sets for r in s.records]
        t0 = time.perf_counter()
        done = [0]

        def progress(i: int, record: ImageRecord) -> None:
            done[0] += 1
            if done[0] % 25 == 0 or done[0] == len(records):
                self.reporter.message(f"loaded {done[0]}/{len(records)} volumes")

        volumes = load_volumes(records, c.workers, dtype, progress, spacing=c.voxel_mm,
                               cache=self.mask_cache(), device=str(self.device))
        self.mask_notes = [v.mask_note for v in volumes if v.mask_note is not None]
        self.reporter.message(describe_sources(self.mask_notes))
        nbytes = sum(v.nbytes for v in volumes)
        place = torch.device("cpu")
        if self.device.type == "cuda" and c.cache_device in ("auto", "device"):
            free, _ = torch.cuda.mem_get_info(self.device)
            if c.cache_device == "device" or nbytes < 0.4 * free:
                place = self.device
        for v in volumes:
            if place.type == "cuda":
                v.data = v.data.to(place)
                if v.mask is not None:
                    v.mask = v.mask.to(place)
            elif self.device.type == "cuda":
                v.data = v.data.pin_memory()
        self.reporter.message(
            f"cached {len(volumes)} volumes ({nbytes / 2**30:.2f} GiB {c.cache_dtype}, brain "
            f"bounding boxes) on {place.type} in {time.perf_counter() - t0:.1f} s")
        k = 0
        for s in sets:
            s.volumes = volumes[k:k + len(s.records)]
            k += len(s.records)

    def mask_cache(self) -> MaskCache:
        """Where stripped masks are kept: ``mask_cache``, else ``<out>/brain_masks``."""
        c = self.config
        return MaskCache(Path(c.mask_cache) if c.mask_cache else self.out / "brain_masks")

    def _model(self) -> BagNet3D:
        c = self.config
        torch.manual_seed(c.seed)
        return BagNet3D(BagNetConfig.for_rf(c.rf, width=c.width, heads=c.heads,
                                            padding=c.padding))

    # checkpoints -----------------------------------------------------------------------------
    def _checkpoint_path(self, name: str = "last.ckpt") -> Path:
        return self.out / name

    def _read_checkpoint(self) -> dict[str, Any] | None:
        path = self._checkpoint_path()
        if not self.resume:
            if path.exists():
                raise UsageError(
                    f"{self.out} already holds a training run ({path.name}); pass --resume to "
                    "continue it, or choose another --out")
            return None
        if not path.exists():
            raise UsageError(f"--resume: no checkpoint {path}; start the run without --resume")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises several types for corrupt files
            raise InputError(f"checkpoint {path} could not be read ({exc}); "
                             "best.ckpt may still be usable") from exc
        if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
            raise InputError(f"{path} is not a brainbag checkpoint")
        return ckpt

    def _merge_resumed_config(self, ckpt: dict[str, Any]) -> None:
        """The run's saved settings win; a flag or recipe may only change RESUMABLE ones."""
        saved = TrainConfig.from_dict(ckpt["config"], f"{self._checkpoint_path()}")
        given = self.config
        for key in saved.to_dict():
            if key in ("data", "out"):
                continue
            if key in RESUMABLE and key in self._explicit:
                continue
            if key in self._explicit and getattr(given, key) != getattr(saved, key):
                raise UsageError(
                    f"--resume continues {self.out} with its own settings ({key} = "
                    f"{getattr(saved, key)!r}), not {key} = {getattr(given, key)!r}: drop that "
                    "option (or recipe), or start a new run in another --out")
            setattr(given, key, getattr(saved, key))

    _explicit: frozenset[str] = frozenset()
    _split_source: str | None = None
    #: ``training.init`` of the weights: where fine-tuning started (None: random weights)
    _init: dict[str, Any] | None = None
    #: the model being trained (set before the first step)
    model: BagNet3D | None = None
    #: what the training images looked like (``training.statistics``), measured once per run
    _statistics: dict[str, Any] = {}

    def _save(self, state: dict[str, Any], best: bool) -> None:
        """Write ``last.ckpt`` (and, for a best epoch, ``best.ckpt`` first): the checkpoint that
        a resume trusts is always the last file to land."""
        if not self.dist.main:
            return
        path = self._checkpoint_path()
        if best:
            best_path = self._checkpoint_path("best.ckpt")
            with atomic_path(best_path) as tmp:
                torch.save(state, tmp)
            with atomic_path(path) as tmp:
                shutil.copyfile(best_path, tmp)
            return
        with atomic_path(path) as tmp:
            torch.save(state, tmp)

    # validation ------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, model: BagNet3D, val: _Labelled, scaling: dict[str, float] | None
                 ) -> dict[str, float | None]:
        """Loss, MAE (years) and accuracy on a deterministic view of every validation image.
        The loss is the training loss (the local term included when ``local_weight`` > 0)."""
        n = len(val.records)
        if n == 0:
            return {"val_loss": None, "val_mae": None, "val_accuracy": None}
        model.eval()
        crop = self.config.crop
        local_weight = self.config.local_weight
        outputs = torch.zeros((n, len(self.config.heads)), dtype=torch.float32,
                              device=self.device)
        local_losses = torch.zeros(n, dtype=torch.float32, device=self.device)
        targets = val.targets.to(self.device)
        mine = list(range(self.dist.rank, n, self.dist.world))
        micro = self.config.micro_batch or self.config.batch_size
        size = micro if self.config.val_view == "centre" else 1
        for b in range(0, len(mine), size):
            idx = mine[b:b + size]
            parts, masks = [], []
            for i in idx:
                v = val.volumes[i]
                start: Sequence[int]
                shape: Sequence[int]
                if self.config.view == "brain":
                    start, shape = v.brain_start(crop), crop
                elif self.config.val_view == "centre":
                    start = [centre_start(v.shape[a], crop[a]) for a in range(3)]
                    shape = crop
                else:
                    start, shape = (0, 0, 0), v.shape
                parts.append(v.crop(start, shape).to(self.device))
                if self.config.pooling == "brain" or local_weight > 0:
                    masks.append(v.crop_mask(start, shape))
            x = torch.stack(parts)[:, None]
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            brain = model.brain_fractions(torch.stack(masks)).to(self.device) if masks else None
            cells = brain if self.config.pooling == "brain" else None
            with self.autocast():
                if local_weight > 0:
                    assert brain is not None
                    pooled, local = pooled_and_local(model, x, cells)
                    outputs[idx] = pooled.float()
                    local_losses[idx] = self.loss.local_per_sample(
                        local.float(), targets[idx], brain).float()
                else:
                    outputs[idx] = model.pooled(x, cells).float()
        self.dist.all_sum(outputs)
        self.dist.all_sum(local_losses)
        model.train()
        losses = self.loss.per_sample(outputs, targets) + local_weight * local_losses
        result: dict[str, float | None] = {
            "val_loss": float(losses.mean()), "val_mae": None, "val_accuracy": None,
        }
        for i, head in enumerate(self.config.heads):
            if head == "age" and scaling is not None:
                err = (outputs[:, i] - targets[:, 0]).abs() * scaling["std"]
                result["val_mae"] = float(err.mean())
            elif head == "sex":
                pred = (outputs[:, i] > 0).float()
                result["val_accuracy"] = float((pred == targets[:, 1]).float().mean())
        return result

    def _best_key(self) -> tuple[str, bool]:
        """(metric, higher is better)."""
        m = self.config.best_metric
        if m == "auto":
            m = {"age": "val_mae", "sex": "val_accuracy", "both": "val_loss"}[self.config.task]
        return m, m == "val_accuracy"

    def _is_better(self, row: dict[str, Any], best: dict[str, Any] | None) -> bool:
        key, higher = self._best_key()
        if key == "last":  # validation is recorded, never used to choose
            return True
        value = row.get(key)
        if value is None:
            return row.get("val_loss") is None  # no validation set: keep the latest
        if best is None or best.get(key) is None:
            return True
        if value == best[key] and key == "val_accuracy":
            return float(row["val_loss"]) < float(best["val_loss"])
        return bool(value > best[key]) if higher else bool(value < best[key])

    # outputs ---------------------------------------------------------------------------------
    def _meta(self, model: BagNet3D, source: DataSource, scaling: dict[str, float] | None,
              train: _Labelled, val: _Labelled, epochs_done: int, best_row: dict[str, Any]
              ) -> WeightsMeta:
        c = self.config
        preprocessing = dict(DEFAULT_PREPROCESSING)
        preprocessing["window_xyz"] = list(c.crop)
        preprocessing["voxel_mm"] = c.voxel_mm
        # which brain masks the network learnt on: predict makes the same for the same scans
        preprocessing["brain_mask"], preprocessing["brain_mask_counts"] = mask_sources(
            n.label for n in self.mask_notes)
        if c.view == "brain":
            preprocessing["view_xyz"] = list(c.crop)
            preprocessing["view"] = ("a box of view_xyz voxels centred on the brain mask's "
                                     "bounding box (grown to hold a larger brain)")
        ages = [r.age for r in train.records if r.age is not None]
        datasets = describe_datasets(train.records, c.data_licence or source.licence)
        return WeightsMeta(
            id=self.out.resolve().name,
            architecture="bagnet3d",
            arch_kwargs=model.config.to_dict(),
            heads=list(model.config.heads),
            age_scaling=scaling,
            preprocessing=preprocessing,
            training={
                # the data actually used, counted from its images (never a recipe's text)
                "data": c.data_name or datasets_line(datasets),
                "licence": c.data_licence or source.licence or "not stated (set --data-licence)",
                "data_path": str(c.data),
                "layout": source.layout,
                "split": source.split_source,
                "images": {"train": len(train.records), "val": len(val.records)},
                "subjects": {"train": len({r.group for r in train.records}),
                             "val": len({r.group for r in val.records})},
                "datasets": datasets,
                "patients": patients_sentence(datasets),
                "recipe": c.recipe or "defaults (paper hyperparameters)",
                "task": c.task,
                "age_range": age_range_with(ages, self._init),
                "init": self._init,
                "sexes": {s: sum(r.sex == s for r in train.records) for s in ("F", "M")},
                "statistics": self._statistics,
                "loss": loss_text(c),
                "local_weight": c.local_weight,
                "augment": c.augment,
                "augmentation": augmentation_text(c),
                "epochs": epochs_done,
                "epochs_planned": c.epochs,
                "best_epoch": best_row.get("epoch"),
                "selected_by": self._best_key()[0],
                "validation": {k: best_row.get(k) for k in ("val_loss", "val_mae",
                                                            "val_accuracy")},
                "val_view": c.val_view,
                "seed": c.seed,
                "precision": self.precision,
                "config": c.to_dict(),
            },
            trained=True,
            pooling=c.pooling,
            code_version=__version__,
        )

    def _write_outputs(self, state: dict[str, Any], history: list[dict[str, Any]],
                       best: bool, model: BagNet3D, meta: WeightsMeta | None) -> None:
        """An epoch's files, in an order a kill at any point cannot spoil: the weights of a best
        epoch first, then the checkpoint that claims them, then metrics.tsv. A kill before the
        checkpoint lands resumes from the previous epoch and rewrites the same weights; a kill
        after it finds them already written (the checkpoint never claims weights that are not
        on disk, which left stale weights that resume never rewrote)."""
        if not self.dist.main:
            return
        # the best weights before the checkpoint that counts their epoch done: a kill between
        # the two then redoes that epoch, never resumes past it with older weights in place
        if best and meta is not None:
            self._write_weights(model, meta)
        self._save(state, best)
        write_metrics(self.out / "metrics.tsv", history)

    def _write_weights(self, model: BagNet3D, meta: WeightsMeta) -> None:
        """The predict-ready weights file and its model card."""
        save_weights(self.out / "weights.safetensors", model, meta)
        write_text_atomic(self.out / "MODEL_CARD.md", model_card(meta))

    # the loop --------------------------------------------------------------------------------
    def run(self, explicit: Iterable[str] = ()) -> TrainResult:
        """Train; ``explicit`` names the settings the user gave (checked on ``--resume``)."""
        self._explicit = frozenset(explicit)
        try:
            return self._run()
        finally:
            self.reporter.close()

    def _run(self) -> TrainResult:
        c = self.config
        ckpt = self._read_checkpoint()
        if ckpt is not None:
            self._merge_resumed_config(ckpt)
            self._resolve_speed_options()
            self.loss = LossSpec(c.heads, c.age_loss_weight, c.sex_loss_weight, c.local_weight)
            finished = self._finished(ckpt)
            if finished is not None:
                return finished
            self._init = ckpt.get("init")
        init = None
        if ckpt is None and c.init:  # fine-tuning: the weights' settings, before any volume
            init = open_init(c)
            for text in adopt(c, init, self._explicit):
                self.reporter.message(text)
        source = self._data(ckpt)
        if ckpt is not None and ckpt.get("split_source"):
            source.split_source = str(ckpt["split_source"])
        self._split_source = source.split_source
        train_records = source.select("train")
        if not train_records:
            raise InputError(f"{c.data}: no image in the train split")
        if ckpt is not None:
            scaling = ckpt["age_scaling"]
        elif init is not None and "age" in c.heads:  # the head's years stay the weights' years
            scaling = init.meta.age_scaling
        else:
            scaling = self._age_scaling(train_records)
        train = self._labelled(train_records, scaling, "training")
        val = self._labelled(source.select("val"), scaling, "validation")
        if not train.records:
            raise InputError(f"{c.data}: no training image has the labels task {c.task} needs")

        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.out / "config.toml", to_toml(
                c.to_dict(), f"brainbag {__version__} training configuration (resolved: flags > "
                             "recipe > defaults)\nrecipe: " + (c.recipe or "none")))
            write_text_atomic(self.out / "splits.tsv", splits_tsv(source.records))
        counts = source.counts()
        self.reporter.message(
            f"data: {source.name} ({source.layout}); images train {counts['train']}, val "
            f"{counts['val']}, test {counts['test']}; split: {source.split_source}")
        self._load([train, val])
        if self.dist.main:
            self._statistics = training_statistics(train.records, c.workers,
                                                   report=self.reporter.message,
                                                   cache=self.mask_cache(),
                                                   device=str(self.device))

        model = self._model()
        started = prepare(model, init, c)  # the weights' parameters; frozen stages (resume too)
        if started is not None:
            self._init = started
            self.reporter.message(f"fine-tuning weights {started['id']} (sha256 "
                                  f"{started['sha256'][:12]}...); frozen: "
                                  f"{', '.join(started['frozen']) or 'nothing'}")
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last_3d)  # type: ignore[call-overload]
        self.model = model
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad],
                                     lr=c.lr, eps=c.adam_eps, weight_decay=c.weight_decay)
        scheduler = make_scheduler(optimizer, c)
        history: list[dict[str, Any]] = []
        best: dict[str, Any] | None = None
        steps = math.ceil(len(train.records) / c.batch_size)
        start_epoch, start_step = 0, 0
        partial = [0.0, 0.0]
        resumed_state: dict[str, Any] | None = None
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            history = list(ckpt["history"])
            best = ckpt["best"]
            start_epoch, start_step = int(ckpt["epoch"]), int(ckpt["step"])
            partial = list(ckpt["partial"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            if self.device.type == "cuda" and ckpt["rng"].get("cuda") is not None:
                with contextlib.suppress(RuntimeError):
                    torch.cuda.set_rng_state(ckpt["rng"]["cuda"], self.device)
            resumed_state = ckpt
            self.reporter.message(f"{resume_message(start_epoch, start_step, steps)} "
                                  f"({self._checkpoint_path()})")
        del ckpt

        net: nn.Module = PooledNet(model)
        no_sync = None
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ddp = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
            net, no_sync = ddp, ddp.no_sync
        if c.compile:
            net = torch.compile(net)  # type: ignore[assignment]

        self.reporter.start(start_epoch, c.epochs, steps, start_epoch * steps + start_step)
        model.train()
        with self.stop:
            history, best = self._loop(
                model, net, no_sync, optimizer, scheduler, train, val, source, scaling,
                history, best, start_epoch, start_step, partial, resumed_state)
        if self.dist.main and not (self.out / "weights.safetensors").exists():
            meta = self._meta(model, source, scaling, train, val, len(history),
                              best or (history[-1] if history else {}))
            self._write_weights(model, meta)
        self.dist.barrier()
        return TrainResult(
            out=self.out, epochs=len(history), best_epoch=(best or {}).get("epoch"),
            best={k: (best or {}).get(k) for k in ("val_loss", "val_mae", "val_accuracy")},
            weights=self.out / "weights.safetensors",
            resumed_from=start_epoch if self.resume else None, history=history,
            main=self.dist.main)

    def _finished(self, ckpt: dict[str, Any]) -> TrainResult | None:
        """The result of a resumed run that has nothing left to do (every epoch done and its
        weights written), said before any volume is loaded; None when there is work left."""
        c = self.config
        weights = self.out / "weights.safetensors"
        done = int(ckpt["epoch"])
        if done < c.epochs or int(ckpt["step"]) or not weights.exists():
            return None
        history, best = list(ckpt["history"]), ckpt["best"]
        if self.dist.main:  # a kill after the last checkpoint may have left it one row short
            write_metrics(self.out / "metrics.tsv", history)
        self.reporter.message(f"nothing to do: {done} of {c.epochs} epochs done "
                              f"({self._checkpoint_path()}); pass a larger --epochs to train on")
        return TrainResult(
            out=self.out, epochs=len(history), best_epoch=(best or {}).get("epoch"),
            best={k: (best or {}).get(k) for k in ("val_loss", "val_mae", "val_accuracy")},
            weights=weights, resumed_from=done, history=history, main=self.dist.main)

    def _agree_stop(self) -> bool:
        """True when any rank was asked to stop (every rank must call this)."""
        flag = torch.tensor([float(self.stop.set)], device=self.device)
        return bool(self.dist.all_sum(flag)[0] > 0)

    def _loop(self, model: BagNet3D, net: nn.Module, no_sync: Any,
              optimizer: torch.optim.Optimizer, scheduler: Any, train: _Labelled,
              val: _Labelled, source: DataSource, scaling: dict[str, float] | None,
              history: list[dict[str, Any]], best: dict[str, Any] | None, start_epoch: int,
              start_step: int, partial: list[float], resumed_state: dict[str, Any] | None
              ) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
        c = self.config
        n = len(train.records)
        steps = math.ceil(n / c.batch_size)
        volumes = train.volumes
        targets_all = train.targets.to(self.device)
        for epoch in range(start_epoch, c.epochs):
            t_epoch = time.perf_counter()
            if resumed_state is not None and start_step > 0:
                perm = resumed_state["perm"].tolist()
                gen = torch.Generator()
                gen.set_state(resumed_state["generator"])
                seconds0 = float(resumed_state.get("epoch_seconds", 0.0))
            else:
                gen = epoch_generator(c.seed, epoch)
                perm = torch.randperm(n, generator=gen).tolist()
                partial, start_step, seconds0 = [0.0, 0.0], 0, 0.0
            resumed_state = None
            for step in range(start_step, steps):
                batch = perm[step * c.batch_size:(step + 1) * c.batch_size]
                views = draw_views(volumes, batch, c.crop, c.flip, gen, c.view, c.view_jitter)
                mine = list(range(self.dist.rank, len(batch), self.dist.world))
                weights = None
                if not mine:  # fewer samples than ranks in the last batch
                    mine, weights = [0], torch.zeros(1, device=self.device)
                idx = [batch[k] for k in mine]
                my_views = [views[k] for k in mine]
                x = make_batch(volumes, idx, my_views, c.crop, self.device, self.channels_last)
                cells = brain = None
                if (c.pooling == "brain" or c.intensity_jitter > 0 or c.augment > 0
                        or c.local_weight > 0):
                    masks = make_masks(volumes, idx, my_views, c.crop)
                    x = jitter_intensity(x, masks, c.intensity_jitter, gen, mine, len(batch))
                    if c.augment > 0:
                        x = augment_views(x, masks, volumes, batch, mine, gen, c.augment,
                                          self.channels_last)
                    if c.pooling == "brain" or c.local_weight > 0:
                        brain = model.brain_fractions(masks).to(self.device)
                        cells = brain if c.pooling == "brain" else None
                targets = targets_all[idx]
                loss_sum = accumulate_gradients(
                    net, x, targets, self.loss, c.micro_batch,
                    denominator=len(batch) / self.dist.world, autocast=self.autocast,
                    no_sync=no_sync, weights=weights, cells=cells, brain=brain)
                del x
                stats = torch.stack([loss_sum.float(),
                                     torch.tensor(float(self.stop.set), device=self.device)])
                self.dist.all_sum(stats)
                total, stop = float(stats[0]), bool(stats[1] > 0)
                if not math.isfinite(total):
                    last = history[-1]["epoch"] if history else 0
                    raise TrainingDiverged(
                        f"training loss is {total / len(batch)} (not finite) at epoch "
                        f"{epoch + 1}, step {step + 1}; stopped without saving this state. "
                        f"{self._checkpoint_path()} holds epoch {last}: lower --lr or check "
                        "the data for extreme values, then start again or --resume")
                if c.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                partial[0] += total
                partial[1] += len(batch)
                self.reporter.step(epoch, step, steps, total / len(batch))
                stop = stop or (self.stop.set and not self.dist.enabled)  # DDP: next step
                if stop and step + 1 < steps:
                    state = self._state(model, optimizer, scheduler, history, best, scaling,
                                        epoch, step + 1, partial, perm, gen,
                                        seconds0 + time.perf_counter() - t_epoch)
                    if self.dist.main:
                        self._save(state, best=False)
                    self.dist.barrier()
                    raise TrainingInterrupted(
                        f"interrupted at epoch {epoch + 1}, step {step + 1}/{steps}; saved "
                        f"{self._checkpoint_path()}: continue with the same command and --resume")
            lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            row: dict[str, Any] = {"epoch": epoch + 1, "train_loss": partial[0] / partial[1]}
            last_epoch = epoch + 1 == c.epochs
            if (epoch + 1) % c.val_every == 0 or last_epoch:
                row.update(self.validate(model, val, scaling))
            else:
                row.update({"val_loss": None, "val_mae": None, "val_accuracy": None})
            validated = (epoch + 1) % c.val_every == 0 or last_epoch
            is_best = validated and self._is_better(row, best)
            row["lr"] = lr
            row["seconds"] = seconds0 + time.perf_counter() - t_epoch
            history.append(row)
            if is_best:
                best = dict(row)
            state = self._state(model, optimizer, scheduler, history, best, scaling, epoch + 1,
                                0, [0.0, 0.0], None, None, 0.0)
            meta = self._meta(model, source, scaling, train, val, epoch + 1, best or row) \
                if is_best else None
            self._write_outputs(state, history, is_best, model, meta)
            self.dist.barrier()
            self.reporter.epoch({**row, "best": is_best})
            if self._agree_stop() and not last_epoch:
                raise TrainingInterrupted(
                    f"interrupted after epoch {epoch + 1}; saved {self._checkpoint_path()}: "
                    "continue with the same command and --resume")
        return history, best

    def _state(self, model: BagNet3D, optimizer: torch.optim.Optimizer, scheduler: Any,
               history: list[dict[str, Any]], best: dict[str, Any] | None,
               scaling: dict[str, float] | None, epoch: int, step: int, partial: list[float],
               perm: list[int] | None, gen: torch.Generator | None, seconds: float
               ) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "brainbag": __version__,
            "epoch": epoch,
            "step": step,
            "partial": list(partial),
            "perm": torch.tensor(perm) if perm is not None else None,
            "generator": gen.get_state() if gen is not None else None,
            "epoch_seconds": seconds,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(self.device)
                    if self.device.type == "cuda" else None},
            "history": history,
            "best": best,
            "age_scaling": scaling,
            "split_source": self._split_source,
            "init": self._init,
            "config": self.config.to_dict(),
        }


def run_training(config: TrainConfig, reporter: Reporter | None = None, resume: bool = False,
                 explicit: Iterable[str] = ()) -> TrainResult:
    """Run (or ``resume``) the training that ``config`` describes."""
    trainer = Trainer(config, reporter, resume)
    try:
        return trainer.run(explicit)
    finally:
        if trainer.dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


