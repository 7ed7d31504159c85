"""What weights record about their training images, so that checks can judge a new scan against
what the weights saw: today the bias-field statistic (:mod:`brainbag.image.bias`).

Measured on each training image as ``brainbag check`` measures it on an input (the image as
given, with its mask), in worker threads; written to ``training.statistics`` in the weights
metadata by the trainer, and by ``training/bias_statistics.py`` for weights trained before.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from brainbag.errors import BrainbagError
from brainbag.image.bias import summarize
from brainbag.image.checks import measure_bias_field
from brainbag.image.masks import MaskCache
from brainbag.train.datasets import ImageRecord, record_mask


def bias_field_values(records: Sequence[ImageRecord], workers: int = 2,
                      on_done: Callable[[int, ImageRecord, float | None], None] | None = None,
                      cache: MaskCache | None = None, device: str = "cpu"
                      ) -> list[float | None]:
    """The bias-field statistic of every record (None where the check cannot run), with the
    brain mask training and ``predict`` choose (a given file, the stripped mask of a head from
    ``cache``, else voxels > 0)."""
    def one(i: int) -> float | None:
        record = records[i]
        try:
            loaded, choice = record_mask(record, cache, device)
        except BrainbagError:
            value = None
        else:
            value = measure_bias_field(record.t1w, record.mask, loaded, choice.mask)
        if on_done is not None:
            on_done(i, records[i], value)
        return value

    if workers <= 1 or len(records) <= 1:
        return [one(i) for i in range(len(records))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(len(records))))


def training_statistics(records: Sequence[ImageRecord], workers: int = 2,
                        on_done: Callable[[int, ImageRecord, float | None], None] | None = None,
                        report: Callable[[str], None] | None = None,
                        cache: MaskCache | None = None, device: str = "cpu") -> dict[str, Any]:
    """``training.statistics`` of weights trained on ``records`` ({} when nothing could be
    measured); ``report`` gets one line saying what was measured and how long it took."""
    t0 = time.perf_counter()
    bias = summarize([v for v in bias_field_values(records, workers, on_done, cache, device)
                      if v is not None])
    if report is not None:
        report(f"bias field of {bias['n']} of {len(records)} training images: "
               f"{100 * bias['p5']:.1f}-{100 * bias['p95']:.1f} % (5th-95th percentile; "
               f"{time.perf_counter() - t0:.1f} s)" if bias else
               "bias field of the training images: not measurable (no usable brain mask)")
    return {"bias_field": bias} if bias is not None else {}
