"""How much brain a training crop of the seed recipe holds on unregistered scans.

    python bench/crop_brain_fraction.py

Draws 40 random 160x160x128 crops (``brainbag.train.steps.draw_views`` with ``view="crop"``, as
the seed recipe does; generator seed 0) from each of 10 IXI images conformed at 1 mm, and prints the
median and 10th percentile of the fraction of brain-mask voxels in a crop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from brainbag.train.datasets import discover, load_volume
from brainbag.train.steps import draw_views

REPO = Path(__file__).resolve().parents[1]
CROP = [160, 160, 128]


def main() -> None:
    source = discover(REPO.parent / "shared" / "data" / "ixi" / "participants.tsv")
    records = source.records[:: max(1, len(source.records) // 10)][:10]
    volumes = [load_volume(r) for r in records]  # 1 mm, as the seed recipe
    generator = torch.Generator().manual_seed(0)
    fractions = [float(v.crop_mask(start, CROP).mean())
                 for k, v in enumerate(volumes)
                 for start, _ in draw_views(volumes, [k] * 40, CROP, False, generator)]
    f = np.array(fractions)
    print(f"{len(volumes)} images x 40 draws of {'x'.join(map(str, CROP))} crops at 1 mm: "
          f"brain fraction median {np.median(f):.1%}, 10th percentile {np.percentile(f, 10):.1%}")


if __name__ == "__main__":
    main()
