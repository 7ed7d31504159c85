"""BagNet-3D: a half-width 3D ResNet-50 body with a receptive field cut to 9, 17 or 33 mm.

Architecture as in BAGNET3D.md: 1x1x1 then 3x3x3 stem (32 channels), four bottleneck stages of
[3, 4, 6, 3] blocks with strides [2, 2, 2, 1] (total stride 8), InstanceNorm everywhere, no conv
bias, and a linear head applied at every position (the *local prediction map*); the global
prediction is the map's mean.

Padding. ``"same"`` (default, as the seed's 3D code) pads every 3x3x3 conv by 1: map voxel ``i`` is
centred on input voxel ``8 i`` and the map has ``ceil(n / 8)`` voxels per axis. ``"valid"`` pads
nothing: map voxel ``i`` is centred on input voxel ``8 i + (RF - 1) / 2`` and depends on exactly the
RF-sized cube around it; the residual is cropped by ``(k - 1) / 2`` on every side of all three axes
before the (strided) shortcut, so the two branches stay centred on the same voxels.

Models are built only through :data:`ARCHITECTURES` from plain data (name + kwargs).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import nn

BLOCKS = (3, 4, 6, 3)
STAGE_STRIDES = (2, 2, 2, 1)
EXPANSION = 4
STRIDE = 8
RF_KERNEL3: dict[int, tuple[int, int, int, int]] = {
    9: (1, 1, 0, 0),
    17: (1, 1, 1, 0),
    33: (1, 1, 1, 1),
    177: (3, 4, 6, 3),
}
HEAD_OUTPUTS = {"age": 1, "sex": 1}  # sex: one logit for P(female)

Padding = Literal["same", "valid"]


def layer_kernels(kernel3: tuple[int, ...]) -> list[tuple[int, int]]:
    """(kernel, stride) of every spatial conv along the main path, in order."""
    layers = [(1, 1), (3, 1)]  # stem
    for stage, (blocks, stride) in enumerate(zip(BLOCKS, STAGE_STRIDES, strict=True)):
        for b in range(blocks):
            k = 3 if b < kernel3[stage] else 1
            layers.append((k, stride if b == 0 else 1))
    return layers


def receptive_field(kernel3: tuple[int, ...]) -> int:
    """Receptive field in voxels: r += (k - 1) * J, J *= s over the main path."""
    r, jump = 1, 1
    for k, s in layer_kernels(kernel3):
        r += (k - 1) * jump
        jump *= s
    return r


@dataclass(frozen=True)
class BagNetConfig:
    """Plain-data description of a BagNet-3D; stored in every weights file."""

    rf: int = 9
    padding: Padding = "same"
    width: int = 32
    heads: tuple[str, ...] = ("age", "sex")
    norm: Literal["instance", "none"] = "instance"
    kernel3: tuple[int, int, int, int] = field(default=(1, 1, 0, 0))

    @classmethod
    def for_rf(cls, rf: int, **kwargs: Any) -> BagNetConfig:
        if rf not in RF_KERNEL3:
            raise ValueError(f"unknown receptive field {rf}; choose one of {sorted(RF_KERNEL3)}")
        return cls(rf=rf, kernel3=RF_KERNEL3[rf], **kwargs)

    def __post_init__(self) -> None:
        if receptive_field(self.kernel3) != self.rf:
            raise ValueError(f"kernel3 {self.kernel3} gives RF {receptive_field(self.kernel3)}, "
                             f"not {self.rf}")
        unknown = [h for h in self.heads if h not in HEAD_OUTPUTS]
        if unknown or not self.heads or len(set(self.heads)) != len(self.heads):
            raise ValueError(f"heads must be a non-empty subset of {list(HEAD_OUTPUTS)}, "
                             f"got {list(self.heads)}")
        if self.padding not in ("same", "valid"):
            raise ValueError(f"padding must be 'same' or 'valid', got {self.padding!r}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["heads"] = list(self.heads)
        d["kernel3"] = list(self.kernel3)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BagNetConfig:
        d = dict(d)
        d["heads"] = tuple(d.get("heads", ("age", "sex")))
        if "kernel3" in d:
            d["kernel3"] = tuple(d["kernel3"])
        else:
            d["kernel3"] = RF_KERNEL3[int(d["rf"])]
        return cls(**d)


def _norm(kind: str, channels: int) -> nn.Module:
    return nn.InstanceNorm3d(channels) if kind == "instance" else nn.Identity()


class Bottleneck(nn.Module):
    def __init__(
        self, cin: int, planes: int, stride: int, kernel: int, padding: Padding, norm: str
    ) -> None:
        super().__init__()
        cout = planes * EXPANSION
        pad = (kernel - 1) // 2 if padding == "same" else 0
        self.conv1 = nn.Conv3d(cin, planes, 1, bias=False)
        self.norm1 = _norm(norm, planes)
        self.conv2 = nn.Conv3d(planes, planes, kernel, stride=stride, padding=pad, bias=False)
        self.norm2 = _norm(norm, planes)
        self.conv3 = nn.Conv3d(planes, cout, 1, bias=False)
        self.norm3 = _norm(norm, cout)
        self.relu = nn.ReLU(inplace=True)
        self.crop = (kernel - 1) // 2 if padding == "valid" else 0
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv3d(cin, cout, 1, stride=stride, bias=False), _norm(norm, cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.norm1(self.conv1(x)))
        out = self.relu(self.norm2(self.conv2(out)))
        out = self.norm3(self.conv3(out))
        residual = x
        if self.crop:
            c = self.crop
            residual = residual[:, :, c:-c, c:-c, c:-c]
        if self.shortcut is not None:
            residual = self.shortcut(residual)
        return self.relu(out + residual)


class BagNet3D(nn.Module):
    """BagNet-3D. ``forward`` returns the local map ``(B, n_outputs, D, H, W)``."""

    def __init__(self, config: BagNetConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        pad = 1 if config.padding == "same" else 0
        self.stem1 = nn.Conv3d(1, w, 1, bias=False)
        self.stem2 = nn.Conv3d(w, w, 3, padding=pad, bias=False)
        self.stem_norm = _norm(config.norm, w)
        self.relu = nn.ReLU(inplace=True)
        stages = []
        cin = w
        for stage, (blocks, stride) in enumerate(zip(BLOCKS, STAGE_STRIDES, strict=True)):
            planes = w * 2**stage
            layer = []
            for b in range(blocks):
                kernel = 3 if b < config.kernel3[stage] else 1
                layer.append(
                    Bottleneck(cin, planes, stride if b == 0 else 1, kernel, config.padding,
                               config.norm)
                )
                cin = planes * EXPANSION
            stages.append(nn.Sequential(*layer))
        self.stages = nn.Sequential(*stages)
        self.n_features = cin
        self.head = nn.Linear(cin, sum(HEAD_OUTPUTS[h] for h in config.heads))
        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    # geometry, used by inference to place the map in the world -------------------------------
    stride = STRIDE

    @property
    def map_offset(self) -> float:
        return 0.0 if self.config.padding == "same" else (self.config.rf - 1) / 2

    @property
    def min_input(self) -> int:
        return 1 if self.config.padding == "same" else self.config.rf

    def map_size(self, n: int) -> int:
        """Number of map voxels along an axis of ``n`` input voxels (0 if too small)."""
        for k, s in layer_kernels(self.config.kernel3):
            if self.config.padding == "same":
                n = -(-n // s)
            else:
                n = (n - k) // s + 1 if n >= k else 0
        return max(n, 0)

    @property
    def head_index(self) -> dict[str, int]:
        return {h: i for i, h in enumerate(self.config.heads)}

    # forward ---------------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_norm(self.stem2(self.stem1(x))))
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Local prediction map: the linear head applied at every position."""
        f = self.features(x)
        out = torch.einsum("bcdhw,oc->bodhw", f, self.head.weight.to(f.dtype))
        return out + self.head.bias.to(out.dtype).view(1, -1, 1, 1, 1)

    def pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Global prediction the way the network is trained: average, then linear."""
        return self.head(self.features(x).mean(dim=(2, 3, 4)))


def count_parameters(model: nn.Module, include_head: bool = True) -> int:
    return sum(
        p.numel() for n, p in model.named_parameters() if include_head or not n.startswith("head")
    )


ARCHITECTURES: dict[str, Callable[[dict[str, Any]], nn.Module]] = {
    "bagnet3d": lambda kwargs: BagNet3D(BagNetConfig.from_dict(kwargs)),
}


def build_model(architecture: str, kwargs: dict[str, Any]) -> nn.Module:
    """Build a registered architecture from plain data (never from class names in files)."""
    try:
        builder = ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown architecture {architecture!r}; known: {sorted(ARCHITECTURES)}"
        ) from None
    return builder(kwargs)


def macs_estimate(config: BagNetConfig, shape: tuple[int, int, int]) -> float:
    """Multiply-adds of one forward pass over ``shape`` (same padding), for benchmarks."""
    total = 0.0
    w = config.width

    def vox(s: list[int]) -> float:
        return float(math.prod(s))

    s = list(shape)
    total += vox(s) * 1 * w  # stem1
    total += vox(s) * w * w * 27  # stem2
    cin = w
    for stage, (blocks, stride) in enumerate(zip(BLOCKS, STAGE_STRIDES, strict=True)):
        planes = w * 2**stage
        for b in range(blocks):
            st = stride if b == 0 else 1
            k = 3 if b < config.kernel3[stage] else 1
            out = [-(-n // st) for n in s]
            total += vox(s) * cin * planes  # conv1
            total += vox(out) * planes * planes * k**3  # conv2
            total += vox(out) * planes * planes * EXPANSION  # conv3
            if st != 1 or cin != planes * EXPANSION:
                total += vox(out) * cin * planes * EXPANSION
            cin = planes * EXPANSION
            s = out
    return total
