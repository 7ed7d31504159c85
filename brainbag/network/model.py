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

Speed. Without autograd (``torch.no_grad`` / ``torch.inference_mode``) ``forward`` runs a fast
path that computes exactly the same function: channels-last (NDHWC) activations, the two stem
convolutions folded into one 1->32 3x3x3 convolution (``stem1`` is linear, bias-free and has one
input channel, so ``stem2(stem1(x))`` is a single convolution with weight ``W2 @ W1``; zero
padding commutes with it), InstanceNorm as float32 statistics plus one in-place scale-and-shift,
ReLU in place, and an explicit compute dtype (bfloat16 when called under ``torch.autocast`` with
that dtype; statistics, head and output stay float32). On CPU the norms whose consumers are all
convolutions are folded into them (:class:`Folded`: one in-place maximum per norm + ReLU) and
the statistics come from ATen's batch-norm kernel (:func:`_channels_last_stats`). With autograd
on, the module path runs, so training is unchanged; all paths share the parameters and the
state_dict keys.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
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
        self.shortcut: nn.Sequential | None = None
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

    def forward_fast(self, x: torch.Tensor, norm: bool) -> torch.Tensor:
        """Inference-only forward (no autograd): channels-last, in-place norm and ReLU."""
        out = _conv(x, self.conv1)
        _norm_act_(out, norm, relu=True)
        out = _conv(out, self.conv2)
        _norm_act_(out, norm, relu=True)
        out = _conv(out, self.conv3)
        residual = x
        if self.crop:
            c = self.crop
            residual = residual[:, :, c:-c, c:-c, c:-c]
        if self.shortcut is None:
            return _norm_add_relu_(out, norm, residual, residual_norm=False)
        return _norm_add_relu_(out, norm, _conv(residual, self.shortcut[0]), residual_norm=norm)

    def forward_folded(self, x: torch.Tensor | Folded) -> torch.Tensor:
        """Inference-only forward (InstanceNorm model, one sample) with the two inner norms
        folded (:class:`Folded`): each norm + ReLU inside the block is one pass over memory."""
        y = _norm_relu_folded(_conv_folded(x, self.conv1))
        y = _norm_relu_folded(_conv_folded(y, self.conv2))
        out = _conv_folded(y, self.conv3)
        c = self.crop
        if self.shortcut is None:
            assert isinstance(x, torch.Tensor)  # a block input is exact where it is added
            residual = x[:, :, c:-c, c:-c, c:-c] if c else x
            return _norm_add_relu_(out, True, residual, residual_norm=False)
        return _norm_add_relu_(out, True, _conv_folded(x, self.shortcut[0], crop=c),
                               residual_norm=True)


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
    #: Use the fast path when autograd is off (set False on an instance to time or test the
    #: plain module-by-module path).
    fast_inference = True

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Last-stage features ``(B, 1024, D, H, W)``; the fast path when autograd is off."""
        if self.fast_inference and not torch.is_grad_enabled():
            return self._features_fast(x)
        return self.features_reference(x)

    def features_reference(self, x: torch.Tensor) -> torch.Tensor:
        """The module-by-module forward (autograd-safe; what training differentiates)."""
        x = self.relu(self.stem_norm(self.stem2(self.stem1(x))))
        return self.stages(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Local prediction map: the linear head applied at every position."""
        f = self.features(x)
        with torch.autocast(f.device.type, enabled=False):  # the head runs in the model's dtype
            f = f.to(self.head.weight.dtype)
            out = torch.einsum("bcdhw,oc->bodhw", f, self.head.weight)
            return out + self.head.bias.view(1, -1, 1, 1, 1)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        """The dtype the fast path computes in: the autocast dtype if autocast is on."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.stem2.weight.dtype

    #: On CPU, run the fast path with every InstanceNorm folded into its neighbours
    #: (:class:`Folded`); set False on an instance to time or test the unfolded fast path.
    fold_norms = True

    def _features_fast(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.compute_dtype(x.device)
        norm = self.config.norm == "instance"
        if norm and self.fold_norms and x.device.type == "cpu":
            with torch.autocast(x.device.type, enabled=False):
                x = x.to(dtype=dtype, memory_format=torch.channels_last_3d)
                # the folded scales are per sample: one sample at a time (on CPU a batch is no
                # faster per sample, bench/scan_batch.py)
                parts = [self._features_folded(x[i : i + 1]) for i in range(x.shape[0])]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        with torch.autocast(x.device.type, enabled=False):
            h = self._stem_fast(x.to(dtype=dtype, memory_format=torch.channels_last_3d))
            _norm_act_(h, norm, relu=True)
            for stage in self.stages:
                assert isinstance(stage, nn.Sequential)
                for block in stage:
                    assert isinstance(block, Bottleneck)
                    h = block.forward_fast(h, norm)
        return h

    def _features_folded(self, x: torch.Tensor) -> torch.Tensor:
        # the stem's consumers are the first block's conv1 and projection shortcut, both 1x1
        # convolutions followed by a norm: its norm folds too
        h: torch.Tensor | Folded = _norm_relu_folded(self._stem_fast(x))
        for stage in self.stages:
            assert isinstance(stage, nn.Sequential)
            for block in stage:
                assert isinstance(block, Bottleneck)
                h = block.forward_folded(h)
        assert isinstance(h, torch.Tensor)
        return h

    def _stem_fast(self, x: torch.Tensor) -> torch.Tensor:
        return conv3d_fast(x, folded_stem_weight(self), 1, self.stem2.padding)

    def brain_fractions(self, masks: torch.Tensor) -> torch.Tensor:
        """:func:`cell_weights` of brain masks ``(B, X, Y, Z)`` on the grid of this network's
        input: the ``cells`` of masked pooling, on this network's map grid."""
        sizes = [self.map_size(int(n)) for n in masks.shape[1:]]
        return cell_weights(masks, self.stride, self.map_offset, sizes)

    def pooled(self, x: torch.Tensor, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Global prediction the way the network is trained: average, then linear.

        ``cells`` (``(B, D, H, W)`` on the map grid, e.g. :func:`cell_weights` of the brain mask)
        makes the average a weighted one: with brain fractions it is the mean over the brain
        (masked pooling), equal to the weighted mean of the local map because the head is linear.
        """
        f = self.features(x)
        if cells is None:
            return self.head(f.mean(dim=(2, 3, 4)))
        w = cells.to(f.dtype)[:, None]
        pooled = (f * w).sum(dim=(2, 3, 4)) / w.sum(dim=(2, 3, 4)).clamp_min(1e-6)
        return self.head(pooled.to(self.head.weight.dtype))


def cell_weights(
    mask: torch.Tensor, stride: int, offset: float, map_shape: tuple[int, ...] | list[int]
) -> torch.Tensor:
    """Fraction of brain-mask voxels in each map voxel's cell, ``(B, *map_shape)`` float32.

    ``mask`` is ``(B, X, Y, Z)`` on the grid the network saw. The cell of map voxel ``i`` spans
    voxels ``[stride*i + offset - stride/2, stride*i + offset + stride/2)`` along each axis
    (voxels outside the array count as not brain). These are the weights of masked pooling: the
    global prediction is the brain-fraction-weighted mean of the local map, so cells of
    background (which differ with the field of view) do not count.
    """
    lo = int(math.floor(offset - stride / 2))
    t = mask.to(torch.float32)[:, None]
    pad_before = max(0, -lo)
    t = t[..., max(0, lo):, max(0, lo):, max(0, lo):]
    pads: list[int] = []
    for m, have in zip(reversed(list(map_shape)), reversed(t.shape[2:]), strict=True):
        pads += [pad_before, max(0, stride * m - have - pad_before)]
    t = F.pad(t, pads)
    pooled = F.avg_pool3d(t, stride, stride)[:, 0]
    return pooled[:, : map_shape[0], : map_shape[1], : map_shape[2]]


def folded_stem_weight(model: BagNet3D) -> torch.Tensor:
    """The single 1->w 3x3x3 convolution equal to ``stem2(stem1(x))``: ``W2 @ W1``."""
    w1 = model.stem1.weight[:, 0, 0, 0, 0]  # (w,): stem1 maps 1 channel to w by scaling
    return torch.einsum("ocdhw,c->odhw", model.stem2.weight, w1).unsqueeze(1)


def _conv(x: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    assert isinstance(conv, nn.Conv3d)
    return conv3d_fast(x, conv.weight, conv.stride, conv.padding)


def conv3d_fast(
    x: torch.Tensor, weight: torch.Tensor, stride: Any, padding: Any,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """A bias-free Conv3d in ``x``'s dtype. On CPU, float32 and bfloat16 always go to oneDNN:
    PyTorch's own choice sends 1x1x1 convolutions to a slow im2col path that copies the
    channels-last input (with one thread or for small batches)."""
    weight = weight.to(x.dtype)
    if bias is not None:
        bias = bias.to(x.dtype)
    if weight.shape[1] == 1:
        # With one input channel torch cannot tell channels-last from contiguous and would
        # return an NCDHW output, which the next layer then copies: give it channels-last strides
        # (over dense memory: a model moved to channels_last_3d, as training does, may hand over
        # a weight with permuted strides).
        k = weight.shape[2:]
        weight = weight.contiguous()
        weight = weight.as_strided(weight.shape, (math.prod(k), 1, k[1] * k[2], k[2], 1))
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16):
        x = x.contiguous(memory_format=torch.channels_last_3d)
        return torch.ops.aten.mkldnn_convolution(x, weight, bias, list(_triple(padding)),
                                                 list(_triple(stride)), [1, 1, 1], 1)
    return F.conv3d(x, weight, bias, stride, padding)


# InstanceNorm statistics are reduced in chunks of about this many elements: each chunk is
# centred on its own mean while it is in cache and the chunks are combined exactly (Chan et al.),
# so one pass over memory gives float32-accurate mean and variance.
_STATS_CHUNK = 1 << 21
_EPS = 1e-5  # torch.nn.InstanceNorm3d's default, used by every norm of the model


def instance_stats(x: torch.Tensor, eps: float = _EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and 1/sqrt(var + eps) of ``(B, C, D, H, W)``, float32."""
    b, c = x.shape[:2]
    cl = x.is_contiguous(memory_format=torch.channels_last_3d)
    if x.device.type == "cpu" and cl and x.dtype in (torch.float32, torch.bfloat16) and (
            STATS_KERNEL):
        return _channels_last_stats(x, eps)
    if x.device.type == "cpu" and cl:
        v, dim = x.permute(0, 2, 3, 4, 1).reshape(b, -1, c), 1  # a view: (B, voxels, C)
    elif x.device.type == "cpu" and x.is_contiguous():
        v, dim = x.reshape(b, c, -1), 2  # (B, C, voxels)
    else:  # GPUs reduce fast and accurately in one kernel
        wide = x if x.dtype in (torch.float32, torch.float64) else x.float()
        var, mean = torch.var_mean(wide, dim=(2, 3, 4), correction=0)
        return mean, torch.rsqrt(var + eps)
    n = v.shape[dim]
    step = max(1, _STATS_CHUNK // (b * c))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    tmp = torch.empty(v.shape[:dim] + (min(step, n),) + v.shape[dim + 1 :], dtype=acc)
    means, m2s, counts = [], [], []
    for i in range(0, n, step):
        block = v.narrow(dim, i, min(step, n - i))
        t = tmp.narrow(dim, 0, block.shape[dim])
        if block.dtype == acc:
            m = block.mean(dim=dim, keepdim=True)
            torch.sub(block, m, out=t)
        else:
            t.copy_(block)
            m = t.mean(dim=dim, keepdim=True)
            t.sub_(m)
        means.append(m)
        m2s.append(t.square_().sum(dim=dim, keepdim=True))
        counts.append(block.shape[dim])
    mu = torch.cat(means, dim=dim)
    cnt = torch.tensor(counts, dtype=acc).view([-1 if d == dim else 1 for d in range(3)])
    mean = (mu * cnt).sum(dim=dim, keepdim=True) / n
    var = (torch.cat(m2s, dim=dim).sum(dim=dim) + (cnt * (mu - mean).square()).sum(dim=dim)) / n
    return mean.squeeze(dim), torch.rsqrt(var + eps)


class Folded(NamedTuple):
    """One sample's activation after InstanceNorm + ReLU, held as ``scale * data + offset`` per
    channel (``scale > 0``), for a consumer that is a convolution followed by InstanceNorm.

    ``relu(rstd * (y - mean))`` equals ``rstd * (max(y, mean) - mean)``: one in-place maximum
    turns a convolution's output ``y`` into ``data`` (instead of a scale-and-shift pass and a
    ReLU pass). The consumer takes the scale into its weights and the offset into its bias;
    where a padded convolution sees only part of the offset (at the border),
    :func:`_conv_folded` adds the difference. Only a norm whose every consumer is a convolution
    is folded: a residual add needs the activation itself.
    """

    data: torch.Tensor  # (1, C, D, H, W), channels-last, compute dtype
    scale: torch.Tensor  # (C,), float32 (float64 for a float64 model)
    offset: torch.Tensor  # (C,)


def _per_channel(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.dtype).view(1, -1, 1, 1, 1)


def _norm_relu_folded(y: torch.Tensor) -> Folded:
    """InstanceNorm + ReLU of a convolution's output, in place, as one maximum."""
    mean, rstd = (s[0] for s in instance_stats(y))
    threshold = mean.to(y.dtype)  # the same rounded mean in the data and in the offset
    torch.maximum(y, threshold.view(1, -1, 1, 1, 1), out=y)
    return Folded(y, rstd, -rstd * threshold.to(rstd.dtype))


def _conv_folded(a: torch.Tensor | Folded, conv: nn.Module, crop: int = 0) -> torch.Tensor:
    """``conv`` (bias-free) of an exact or folded activation."""
    assert isinstance(conv, nn.Conv3d)
    if isinstance(a, torch.Tensor):
        data = a[:, :, crop:-crop, crop:-crop, crop:-crop] if crop else a
        return conv3d_fast(data, conv.weight, conv.stride, conv.padding)
    weight = conv.weight.to(a.scale.dtype)
    data = a.data[:, :, crop:-crop, crop:-crop, crop:-crop] if crop else a.data
    # the offset's contribution away from the border, as the convolution's bias
    bias = torch.einsum("oczyx,c->o", weight, a.offset)
    y = conv3d_fast(data, weight * a.scale.view(1, -1, 1, 1, 1), conv.stride, conv.padding,
                    bias=bias)
    if any(p > 0 for p in _triple(conv.padding)):
        _add_border_offset_(y, conv, a.offset, tuple(data.shape[2:]))
    return y


def _triple(v: Any) -> tuple[int, int, int]:
    if isinstance(v, int):
        return (v, v, v)
    if isinstance(v, str) or len(v) != 3:
        raise ValueError(f"expected 3 integers, got {v!r}")
    return (int(v[0]), int(v[1]), int(v[2]))


def _add_border_offset_(
    y: torch.Tensor, conv: nn.Conv3d, offset: torch.Tensor, in_shape: tuple[int, ...]
) -> None:
    """Correct a padded convolution's output at the border, where zero padding cuts short the
    contribution of the input's constant ``offset`` (the bias added the interior's).

    Output voxels fall into a few classes per axis by which kernel taps land inside the input
    (for a 3-tap kernel: first, interior, last); the contribution is the same within a class, so
    at most 26 boxes (faces, edges, corners) get a constant each.
    """
    weight = conv.weight.to(offset.dtype)
    taps = torch.einsum("oczyx,c->ozyx", weight, offset)  # offset's contribution per tap
    stride, padding = _triple(conv.stride), _triple(conv.padding)
    groups: list[list[tuple[int, int, tuple[bool, ...]]]] = []  # per axis: (start, stop, taps in)
    for n_in, n_out, k, s, p in zip(in_shape, y.shape[2:], weight.shape[2:], stride, padding,
                                    strict=True):
        axis: list[tuple[int, int, tuple[bool, ...]]] = []
        for i in range(n_out):
            inside = tuple(0 <= i * s + t - p < n_in for t in range(k))
            if axis and axis[-1][2] == inside:
                axis[-1] = (axis[-1][0], i + 1, inside)
            else:
                axis.append((i, i + 1, inside))
        groups.append(axis)
    if all(len(axis) == 1 for axis in groups):
        return
    masks = [[torch.tensor(g[2], dtype=offset.dtype) for g in axis] for axis in groups]
    # the bias: the contribution at the largest class (the interior)
    ref = [max(range(len(axis)), key=lambda j, a=axis: a[j][1] - a[j][0])  # type: ignore[misc]
           for axis in groups]

    def contribution(iz: int, iy: int, ix: int) -> torch.Tensor:
        return torch.einsum("ozyx,z,y,x->o", taps, masks[0][iz], masks[1][iy], masks[2][ix])

    base = contribution(*ref)
    for iz, gz in enumerate(groups[0]):
        for iy, gy in enumerate(groups[1]):
            for ix, gx in enumerate(groups[2]):
                if [iz, iy, ix] == ref:
                    continue
                box = y[:, :, gz[0] : gz[1], gy[0] : gy[1], gx[0] : gx[1]]
                box.add_(_per_channel(contribution(iz, iy, ix) - base, y))


# :func:`_channels_last_stats`: ATen's kernel sums the rows of each column one after the other in
# float32, so its error grows with their number. 1024 rows per column keep rstd within 1e-7-5e-7
# of float64 (as accurate as the chunked reductions it replaced), and a random full-size RF 9
# network's fast float32 map within 0.02 y of the module path on the demo scan (8192 rows: 0.1 y;
# tests/test_fast_inference.py bounds it at 0.05 y). Measured on the development VM.
_STATS_ROWS = 1024
#: Use :func:`_channels_last_stats` (False: the chunked reductions below, as before issue 17;
#: for benchmarks and tests).
STATS_KERNEL = True
_STATS_PIECE = 1 << 20  # elements per kernel call, at most (about 4 MB of float32)


def _channels_last_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`instance_stats` of a CPU channels-last float32/bfloat16 tensor.

    Each sample is a (voxels, C) matrix in memory. A piece of ``K * L`` consecutive rows,
    viewed as a (K, L * C) matrix, is one call of ATen's batch-norm statistics kernel
    (``batch_norm_update_stats``: vectorised across columns, a mean pass then a centred variance
    pass, float32 accumulators also for bfloat16 when given float32 running statistics), which
    returns the mean and variance of each of L * C columns of K = 1024 rows; all are combined
    exactly in float64 (Chan et al.). Two reading passes over memory in few calls (220 for a
    full-size 32-channel activation), 2x faster than the chunked reductions it replaced.
    """
    b, c = x.shape[:2]
    n = x[0].numel() // c
    k = _STATS_ROWS
    lanes = max(1, min(64, _STATS_PIECE // (k * c)))
    piece = k * lanes
    full = n - n % piece
    # running statistics the kernel updates (momentum 0): float32 ones make it accumulate and
    # return float32 for bfloat16 input too
    scratch = torch.zeros(lanes * c), torch.ones(lanes * c)
    means, rstds = [], []
    for i in range(b):
        rows = x[i].permute(1, 2, 3, 0).reshape(n, c)  # a view
        mu, var, counts = [], [], []
        for start in range(0, full, piece):
            cols = rows[start : start + piece].view(k, lanes * c)
            m, v = torch.ops.aten.batch_norm_update_stats(cols, *scratch, 0.0)
            mu.append(m.view(lanes, c))
            var.append(v.view(lanes, c))
            counts += [k] * lanes
        for start in range(full, n, k):  # the rest, in pieces of at most k rows
            part = rows[start : start + k]
            m, v = torch.ops.aten.batch_norm_update_stats(part, scratch[0][:c], scratch[1][:c],
                                                          0.0)
            mu.append(m.view(1, c))
            var.append(v.view(1, c))
            counts.append(part.shape[0])
        mu_, var_ = torch.cat(mu).double(), torch.cat(var).double()
        w = torch.tensor(counts, dtype=torch.float64)[:, None] / n
        mean = (mu_ * w).sum(0)
        total = ((var_ + (mu_ - mean).square()) * w).sum(0)
        means.append(mean.float())
        rstds.append(torch.rsqrt(total + eps).float())
    return torch.stack(means), torch.stack(rstds)


def _norm_act_(x: torch.Tensor, norm: bool, relu: bool) -> torch.Tensor:
    """In place: InstanceNorm (no affine) if ``norm``, then ReLU if ``relu``."""
    if norm:
        mean, rstd = instance_stats(x)
        shape = (x.shape[0], x.shape[1], 1, 1, 1)
        scale = rstd.view(shape)
        torch.addcmul((-mean.view(shape) * scale).to(x.dtype), x, scale.to(x.dtype), out=x)
    if relu:
        x.relu_()
    return x


def _norm_add_relu_(
    x: torch.Tensor, norm: bool, residual: torch.Tensor, residual_norm: bool
) -> torch.Tensor:
    """In place: ``relu(norm(x) + residual)``, ``residual`` normalised too if ``residual_norm``;
    both normalisations go into two multiply-adds, with no normalised copy of the residual."""
    if not norm:
        return x.add_(residual).relu_()
    shape = (x.shape[0], x.shape[1], 1, 1, 1)
    mean, rstd = instance_stats(x)
    shift = -mean * rstd
    if residual_norm:
        r_mean, r_rstd = instance_stats(residual)
        shift = shift - r_mean * r_rstd
    torch.addcmul(shift.view(shape).to(x.dtype), x, rstd.view(shape).to(x.dtype), out=x)
    if residual_norm:
        torch.addcmul(x, residual, r_rstd.view(shape).to(x.dtype), out=x)
    else:
        x.add_(residual)
    return x.relu_()


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


def macs_estimate(
    config: BagNetConfig, shape: tuple[int, int, int], folded_stem: bool = False
) -> float:
    """Multiply-adds of one forward pass over ``shape`` (same padding), for benchmarks.

    ``folded_stem``: count the stem as the fast path runs it (one 1->w 3x3x3 convolution)
    instead of as the architecture defines it (1x1x1 1->w, then 3x3x3 w->w).
    """
    total = 0.0
    w = config.width

    def vox(s: list[int]) -> float:
        return float(math.prod(s))

    s = list(shape)
    if folded_stem:
        total += vox(s) * w * 27
    else:
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
