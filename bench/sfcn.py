"""SFCN, the peer anchor: the UK Biobank brain-age network of Peng et al. 2021.

Peng, Gong, Beckmann, Vedaldi, Smith, "Accurate brain age prediction with lightweight deep
neural networks", Medical Image Analysis 68 (2021). Written here from the paper's description,
with random weights, only to time its forward pass next to BagNet-3D's:

* input 1 x 160 x 192 x 160 (1 mm, cropped);
* five blocks ``Conv3d 3x3x3 (padding 1) -> BatchNorm3d -> MaxPool3d(2) -> ReLU`` with 32, 64,
  128, 256, 256 channels, then a sixth block ``Conv3d 1x1x1 -> BatchNorm3d -> ReLU`` with 64
  channels (the paper's last block has no pooling and a 1x1x1 kernel);
* head: average pool over the remaining 5 x 6 x 5 grid, dropout, ``Conv3d 1x1x1`` to 40 age bins,
  log-softmax.
"""

from __future__ import annotations

import math

import torch
from torch import nn

CHANNELS = (32, 64, 128, 256, 256, 64)
INPUT_SHAPE = (160, 192, 160)
AGE_BINS = 40


class SFCN(nn.Module):
    def __init__(self, channels: tuple[int, ...] = CHANNELS, bins: int = AGE_BINS) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        cin = 1
        for i, cout in enumerate(channels):
            last = i == len(channels) - 1
            k = 1 if last else 3
            layers += [nn.Conv3d(cin, cout, k, padding=k // 2), nn.BatchNorm3d(cout)]
            if not last:
                layers.append(nn.MaxPool3d(2, stride=2))
            layers.append(nn.ReLU(inplace=True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Conv3d(cin, bins, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        f = f.mean(dim=(2, 3, 4), keepdim=True)
        return torch.log_softmax(self.classifier(self.dropout(f)).flatten(1), dim=1)


def sfcn_macs(shape: tuple[int, int, int] = INPUT_SHAPE, channels: tuple[int, ...] = CHANNELS
              ) -> float:
    """Multiply-adds of the convolutions of one forward pass."""
    total = 0.0
    s = list(shape)
    cin = 1
    for i, cout in enumerate(channels):
        k = 1 if i == len(channels) - 1 else 3
        total += math.prod(s) * cin * cout * k**3
        if i < len(channels) - 1:
            s = [n // 2 for n in s]
        cin = cout
    return total + cin * AGE_BINS
