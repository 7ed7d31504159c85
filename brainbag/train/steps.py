"""One training step's ingredients: the loss, the pooled network, gradient accumulation over
micro-batches, the learning-rate schedule, and the batches themselves (random views cut on the
device from cached volumes, flips, intensity jitter, the masks of the cells). The loop that uses
them is :mod:`brainbag.train.trainer`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from brainbag.network.model import BagNet3D
from brainbag.train.augment import augment_intensity
from brainbag.train.config import TrainConfig
from brainbag.train.datasets import (
    Volume,
    crop_range,
)


@dataclass(frozen=True)
class LossSpec:
    """Which head outputs which target, and with what weight.

    ``local_weight`` > 0 adds the local loss (:meth:`local_per_sample`): every cell of the local
    map is trained on the subject's age and sex, the paper's premise that each patch carries
    evidence, and the way to make the map readable as local ages.
    """

    heads: tuple[str, ...]
    age_weight: float = 1.0
    sex_weight: float = 1.0
    local_weight: float = 0.0

    def per_sample(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of every sample: ``outputs`` (B, heads), ``targets`` (B, 2) = (age_std, female)."""
        outputs = outputs.to(targets.dtype)
        loss = torch.zeros(outputs.shape[0], dtype=targets.dtype, device=outputs.device)
        for i, head in enumerate(self.heads):
            if head == "age":
                loss = loss + self.age_weight * (outputs[:, i] - targets[:, 0]) ** 2
            else:
                loss = loss + self.sex_weight * nn.functional.binary_cross_entropy_with_logits(
                    outputs[:, i], targets[:, 1], reduction="none")
        return loss

    def local_per_sample(self, local: torch.Tensor, targets: torch.Tensor, brain: torch.Tensor
                         ) -> torch.Tensor:
        """The local loss of every sample: the brain-weighted mean over the local map's cells
        of each cell's loss against the subject's targets (the same terms and weights as
        :meth:`per_sample`: age MSE per cell on the standardised scale, sex BCE per cell).

        ``local`` ``(B, heads, D, H, W)`` is the local map, ``brain`` ``(B, D, H, W)`` each
        cell's brain fraction (:meth:`BagNet3D.brain_fractions`), normalised per sample here; a
        sample without brain cells contributes 0."""
        local = local.to(targets.dtype)
        dims = (1, 2, 3)
        w = brain.to(local.device, targets.dtype)
        w = w / w.sum(dim=dims, keepdim=True).clamp_min(1e-12)
        loss = torch.zeros(local.shape[0], dtype=targets.dtype, device=local.device)
        for i, head in enumerate(self.heads):
            if head == "age":
                cell = self.age_weight * (local[:, i] - targets[:, 0].view(-1, 1, 1, 1)) ** 2
            else:
                cell = self.sex_weight * nn.functional.binary_cross_entropy_with_logits(
                    local[:, i], targets[:, 1].view(-1, 1, 1, 1).expand_as(local[:, i]),
                    reduction="none")
            loss = loss + (cell * w).sum(dim=dims)
        return loss


def pooled_and_local(model: BagNet3D, x: torch.Tensor, cells: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass giving the global output and the local map ``(B, heads, D, H, W)``.

    The map is the head applied at every position (as :meth:`BagNet3D.forward`); the global
    output is its mean over all cells, or its ``cells``-weighted mean (masked pooling). Because
    the head is linear this equals :meth:`BagNet3D.pooled` (average, then linear)."""
    local = model(x)
    if cells is None:
        return local.mean(dim=(2, 3, 4)), local
    w = cells.to(local.dtype)[:, None]
    pooled = (local * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp_min(1e-6)
    return pooled, local


class PooledNet(nn.Module):
    """``forward`` = the BagNet's global (average-then-linear) output, for DDP and compile;
    with ``local=True`` the global output and the local map (:func:`pooled_and_local`)."""

    def __init__(self, model: BagNet3D) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, cells: torch.Tensor | None = None, local: bool = False
                ) -> Any:
        if local:
            return pooled_and_local(self.model, x, cells)
        return self.model.pooled(x, cells)


def accumulate_gradients(
    net: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    loss: LossSpec,
    micro_batch: int,
    denominator: float,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    no_sync: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    weights: torch.Tensor | None = None,
    cells: torch.Tensor | None = None,
    brain: torch.Tensor | None = None,
) -> torch.Tensor:
    """Add to ``.grad`` the gradient of ``sum(per-sample loss) / denominator`` over ``x``, in
    forward passes of ``micro_batch`` samples; return the (detached) sum of the losses.

    ``weights`` (per sample, default 1) lets a rank with nothing to contribute still run the
    collective backward with a zero-weight sample. ``no_sync`` (DDP) skips the gradient all-reduce
    on every micro-batch but the last. ``cells`` (per sample, on the map grid) are the brain
    fractions of masked pooling (see :meth:`BagNet3D.pooled`). With ``loss.local_weight`` > 0 the
    per-sample loss adds ``local_weight`` times the local loss, weighted by ``brain`` (each
    cell's brain fraction, required then), from the same forward pass.
    """
    n = x.shape[0]
    micro = n if micro_batch <= 0 else micro_batch
    chunks = list(range(0, n, micro))
    total = torch.zeros((), dtype=targets.dtype, device=targets.device)
    if loss.local_weight > 0 and brain is None:
        raise ValueError("the local loss (local_weight > 0) needs the cells' brain fractions")
    for k, start in enumerate(chunks):
        part = slice(start, start + micro)
        sync = no_sync if (no_sync is not None and k < len(chunks) - 1) else None
        with sync() if sync is not None else contextlib.nullcontext():
            part_cells = None if cells is None else cells[part]
            with autocast():
                if loss.local_weight > 0:
                    outputs, local = net(x[part], part_cells, True)
                else:
                    outputs = net(x[part]) if part_cells is None else net(x[part], part_cells)
            losses = loss.per_sample(outputs, targets[part])
            if loss.local_weight > 0:
                assert brain is not None
                losses = losses + loss.local_weight * loss.local_per_sample(
                    local, targets[part], brain[part])
            if weights is not None:
                losses = losses * weights[part]
            (losses.sum() / denominator).backward()
        total = total + losses.detach().sum()
    return total


def make_scheduler(optimizer: torch.optim.Optimizer, c: TrainConfig) -> Any:
    """Per-epoch learning-rate schedule: ``step`` (x gamma every lr_step_epochs) or ``cosine``
    (linear warm-up over warmup_epochs, then half a cosine from lr to 0 at the last epoch)."""
    if c.lr_schedule == "cosine":
        warm, total = c.warmup_epochs, c.epochs

        def factor(epoch: int) -> float:
            if epoch < warm:
                return (epoch + 1) / warm
            span = max(1, total - warm)
            return 0.5 * (1 + math.cos(math.pi * min(epoch - warm, span) / span))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.StepLR(
        optimizer, step_size=c.lr_step_epochs or 10**9, gamma=c.lr_gamma)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_views(
    volumes: Sequence[Volume], indices: Sequence[int], crop: Sequence[int], flip: bool,
    generator: torch.Generator, view: str = "crop", jitter: int = 0,
) -> list[tuple[tuple[int, int, int], bool]]:
    """Random crop start and flip for each index.

    ``view="crop"``: uniform over every valid start of the conformed grid. ``view="brain"``: the
    ``crop`` box centred on the brain's bounding box (as predict places it), shifted by a
    uniform integer in ``[-jitter, jitter]`` voxels per axis.
    """
    draws = torch.randint(0, 2**62, (len(indices), 4), generator=generator).tolist()
    views = []
    for i, row in zip(indices, draws, strict=True):
        shape = volumes[i].shape
        start = []
        if view == "brain":
            centred = volumes[i].brain_start(crop)
            start = [centred[a] + row[a] % (2 * jitter + 1) - jitter for a in range(3)]
        else:
            for a in range(3):
                lo, hi = crop_range(shape[a], crop[a])
                start.append(lo + row[a] % (hi - lo + 1))
        views.append(((start[0], start[1], start[2]), bool(flip and row[3] % 2)))
    return views


def jitter_intensity(x: torch.Tensor, masks: torch.Tensor, amount: float,
                     generator: torch.Generator, mine: Sequence[int] | None = None,
                     batch: int | None = None) -> torch.Tensor:
    """In place: scale each sample's brain voxels (``masks`` > 0, ``(B, X, Y, Z)``) by a random
    factor in ``[1 - amount, 1 + amount]``; other voxels are multiplied by exactly 1.

    Under DDP ``x`` holds this rank's samples ``mine`` of a ``batch``: the factors are drawn for
    the whole batch on every rank (as the views are), so the generator stays in step across
    ranks and a sample gets the factor it gets in a single-process run."""
    if amount <= 0:
        return x
    drawn = 1 + amount * (2 * torch.rand(batch or x.shape[0], generator=generator) - 1)
    factors = drawn[list(mine)] if mine is not None else drawn
    brain = masks.to(x.device)[:, None] > 0
    return x.mul_(torch.where(brain, factors.to(x.device, x.dtype).view(-1, 1, 1, 1, 1), 1.0))


def augment_views(x: torch.Tensor, masks: torch.Tensor, volumes: Sequence[Volume],
                  batch: Sequence[int], mine: Sequence[int], generator: torch.Generator,
                  strength: float, channels_last: bool = False) -> torch.Tensor:
    """Intensity augmentation (:mod:`brainbag.train.augment`) of this rank's views ``x`` (the
    samples ``mine`` of ``batch``, with their ``masks`` ``(B, X, Y, Z)``). Every sample of the
    whole batch gets its own generator, seeded from ``generator`` on every rank, so N processes
    make the views one process makes."""
    seeds = torch.randint(0, 2**62, (len(batch),), generator=generator).tolist()
    gens = [torch.Generator().manual_seed(int(seeds[k])) for k in mine]
    background = torch.tensor([volumes[batch[k]].background for k in mine])
    x = augment_intensity(x, masks.to(x.device)[:, None], background, gens, strength)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_batch(
    volumes: Sequence[Volume], indices: Sequence[int],
    views: Sequence[tuple[tuple[int, int, int], bool]], crop: Sequence[int],
    device: torch.device, channels_last: bool,
) -> torch.Tensor:
    """Cut the crops (on the cache's device), flip left-right (x, the first axis), stack."""
    x = _cut(volumes, indices, views, crop, masks=False).to(device, non_blocking=True)[:, None]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


def make_masks(
    volumes: Sequence[Volume], indices: Sequence[int],
    views: Sequence[tuple[tuple[int, int, int], bool]], crop: Sequence[int],
) -> torch.Tensor:
    """The brain masks of the same views as :func:`make_batch`, ``(B, X, Y, Z)`` float32."""
    return _cut(volumes, indices, views, crop, masks=True)


def _cut(volumes: Sequence[Volume], indices: Sequence[int],
         views: Sequence[tuple[tuple[int, int, int], bool]], crop: Sequence[int], masks: bool
         ) -> torch.Tensor:
    parts = []
    for i, (start, flipped) in zip(indices, views, strict=True):
        c = volumes[i].crop_mask(start, crop) if masks else volumes[i].crop(start, crop)
        parts.append(torch.flip(c, dims=(0,)) if flipped else c)
    return torch.stack(parts)


def loss_text(c: TrainConfig) -> str:
    """The training loss in words, as the weights metadata and model card record it."""
    parts = []
    if "age" in c.heads:
        parts.append(f"{c.age_loss_weight:g} * MSE(standardised age)")
    if "sex" in c.heads:
        parts.append(f"{c.sex_loss_weight:g} * BCE(sex logit, female)")
    text = " + ".join(parts) + " of the pooled prediction"
    if c.local_weight > 0:
        text += (f" + {c.local_weight:g} * the same terms for every cell of the local map against "
                 "the subject's age and sex (brain-weighted mean over the cells)")
    return text


def augmentation_text(c: TrainConfig) -> str:
    """What was done to the training views, in words (metadata and model card)."""
    parts = ["random crops" if c.view == "crop" else "whole-brain view" + (
        f", shifted by up to {c.view_jitter} voxels" if c.view_jitter else "")]
    if c.flip:
        parts.append("left-right flips")
    if c.intensity_jitter > 0:
        parts.append(f"brain intensities scaled by a random factor within "
                     f"+-{c.intensity_jitter:g}")
    if c.augment > 0:
        parts.append(f"intensity augmentation, strength {c.augment:g} (gamma, bias field, blur, "
                     "noise; re-whitened within the brain)")
    return "; ".join(parts)
