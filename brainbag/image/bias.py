"""The bias-field check's judgement: a scan against the bias fields the weights saw in training.

The statistic is the one :func:`brainbag.image.fixes.estimate_bias` measures (``exp(p95 - p5) - 1``
of N4's log field over the brain: 0.3 = the field varies 30 %). Weights trained by brainbag record
its range, 5th, 50th and 95th percentile over their training images
(``training.statistics.bias_field`` in the metadata, :func:`summarize`). A scan whose field lies
inside the range the training images spanned is what the weights were trained on, whatever its
absolute value: the shipped weights saw raw IXI scans (fields of 20-50 %), so N4 would move such
a scan *away* from their training data. Outside the
range the check warns, and advises ``--n4`` only when N4 brings the field closer to the range
(measured on the scan); otherwise it says so in a neutral note. Weights without the record keep
the old threshold, and no fix is advised: nothing says whether it would help.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: The threshold for weights that do not record their training images' fields: bias-corrected
#: scans and templates measured < 11 %, uncorrected ones 19-50 % (README, "The checks").
UNRECORDED_MAX = 0.20
DEFINITION = ("exp(p95 - p5) - 1 of N4's log bias field over the brain mask (a quick N4 fit on "
              "a 6 mm copy; brainbag.image.fixes.estimate_bias), as `brainbag check` measures it "
              "on each training image")


def summarize(values: Sequence[float]) -> dict[str, Any] | None:
    """``training.statistics.bias_field`` of the training images' statistics (None when none
    could be measured)."""
    finite = np.array([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return None
    p5, p50, p95 = (float(v) for v in np.percentile(finite, [5, 50, 95]))
    return {"definition": DEFINITION, "n": int(finite.size), "min": round(float(finite.min()), 4),
            "p5": round(p5, 4), "p50": round(p50, 4), "p95": round(p95, 4),
            "max": round(float(finite.max()), 4)}


def _pct(value: float) -> str:
    return f"{100 * value:.0f} %"


def training_range(training: dict[str, Any]) -> tuple[float, float]:
    """The fields the training images spanned: their minimum to maximum (so that no training
    image is judged unlike its own training data), else their 5th-95th percentile."""
    low = training.get("min", training["p5"])
    high = training.get("max", training["p95"])
    return float(low), float(high)


def distance(value: float, low: float, high: float) -> float:
    """How far ``value`` lies outside ``[low, high]`` (0 inside)."""
    return max(low - value, value - high, 0.0)


@dataclass(frozen=True)
class BiasJudgement:
    """The bias-field check's row: status, what was found, what is expected, the advice."""

    status: str
    found: str
    expected: str
    hint: str = ""
    values: dict[str, Any] = field(default_factory=dict)


def judge(
    before: float,
    training: dict[str, Any] | None,
    after_n4: Callable[[], tuple[float, float]] | None,
    n4_asked: bool,
) -> BiasJudgement:
    """Judge a scan's bias-field statistic ``before``.

    ``training``: the weights' ``training.statistics.bias_field`` (None: not recorded).
    ``after_n4()`` runs N4 on the scan and returns (the statistic after it, N4's seconds); it is
    called only when needed: with ``n4_asked`` (``--n4``: the scan will be corrected, so the
    corrected field is what the weights see), or to decide whether to advise ``--n4`` for a scan
    outside the training range.
    """
    values: dict[str, Any] = {"field_range": before}
    found = f"intensity varies {_pct(before)} across the brain"
    if training is None or training.get("p5") is None or training.get("p95") is None:
        return _unrecorded(before, after_n4, n4_asked, found, values)
    low, high = training_range(training)
    values["training"] = {k: training.get(k) for k in ("n", "min", "p5", "p50", "p95", "max")}
    expected = (f"within the weights' training images: {_pct(low)}-{_pct(high)} "
                f"({training.get('n')} images; 5th-95th percentile {_pct(training['p5'])}-"
                f"{_pct(training['p95'])}, median {_pct(training['p50'])})")
    if n4_asked:
        assert after_n4 is not None
        after, seconds = after_n4()
        values.update(after_n4=after, n4_seconds=seconds)
        found += f"; after --n4 {_pct(after)} (N4 took {seconds:.1f} s)"
        if distance(after, low, high) == 0:
            return BiasJudgement("pass", found, expected, values=values)
        if distance(after, low, high) < distance(before, low, high):
            return BiasJudgement("warn", found, expected, "N4 brings it closer to the training "
                                 "images but not into their range: trust the result less",
                                 values)
        return BiasJudgement("warn", found, expected, "--n4 moves the scan away from what the "
                             "weights saw in training: drop --n4", values)
    if distance(before, low, high) == 0:
        return BiasJudgement("pass", found, expected, values=values)
    side = "more" if before > high else "less"
    found += f", {side} than in the weights' training images"
    if after_n4 is not None:
        after, seconds = after_n4()
        values.update(after_n4=after, n4_seconds=seconds)
        if distance(after, low, high) < distance(before, low, high):
            return BiasJudgement("warn", found, expected, f"pass --n4: N4 brings it to "
                                 f"{_pct(after)}, closer to the training images (measured "
                                 f"here, {seconds:.1f} s)", values)
        return BiasJudgement("warn", found, expected, f"note: N4 would not bring it closer "
                             f"(after N4: {_pct(after)}), so --n4 is not advised; the weights "
                             "have not seen such a field: trust the result less", values)
    return BiasJudgement("warn", found, expected, "the weights have not seen such a field: "
                         "trust the result less", values)


def _unrecorded(before: float, after_n4: Callable[[], tuple[float, float]] | None,
                n4_asked: bool, found: str, values: dict[str, Any]) -> BiasJudgement:
    """Weights that do not record their training images' fields: the fixed threshold, and no
    advice to correct (whether N4 helps depends on what the weights were trained on)."""
    expected = (f"field variation < {_pct(UNRECORDED_MAX)} (these weights do not record the "
                "fields of their training images)")
    if n4_asked:
        assert after_n4 is not None
        after, seconds = after_n4()
        values.update(after_n4=after, n4_seconds=seconds)
        found += f"; after --n4 {_pct(after)} (N4 took {seconds:.1f} s)"
        if after > UNRECORDED_MAX:
            return BiasJudgement("warn", found, expected, "N4 could not flatten it: check the "
                                 "brain mask and the image", values)
        return BiasJudgement("pass", found, expected, values=values)
    if before > UNRECORDED_MAX:
        return BiasJudgement("warn", found, expected, "note: whether --n4 helps depends on the "
                             "weights' training images (bias-corrected or not), which these "
                             "weights do not record; it is not advised", values)
    return BiasJudgement("pass", found, expected, values=values)
