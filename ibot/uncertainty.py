"""What a metric means on its data: its 95 % interval and the trivial baseline it must beat.

Every stage records, beside each table metric, an ``intervals`` entry (how far the number can move by
the draw of its evaluation items) and a ``baselines`` entry (what a model that learned nothing gets on
the same items: chance for balanced classes, the majority class, a random ranking, the first-frame
mask copied to every frame...). Without them a small evaluation cannot tell a working stage from a
broken one; with them the tables and the end-to-end test can (``interval excludes the baseline``).

- Accuracies over ``n`` items: Wilson score interval (``scipy.stats.binomtest(...).proportion_ci``),
  well-behaved near 0 and 100 % where the normal approximation is not.
- Anything else (mAP over queries, J&F over objects, NMI/ARI over images, mIoU and AP over images):
  bootstrap over the evaluation items (``scipy.stats.bootstrap``, percentile or BCa, fixed seed, so a
  rerun writes the same interval).

All values are in the metric's own unit (percent for accuracies).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

__all__ = ["CONFIDENCE", "BOOTSTRAP_RESAMPLES", "interval", "baseline", "wilson", "accuracy_interval",
           "bootstrap", "chance_topk", "majority_accuracy", "accuracy_evidence", "check_evidence"]

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


def interval(low: float, high: float, method: str, n: int) -> dict[str, Any]:
    """One ``intervals`` entry: bounds (metric unit), how they were computed, over how many items."""
    return {"low": float(low), "high": float(high), "method": method, "n": int(n), "confidence": CONFIDENCE}


def baseline(value: float, kind: str) -> dict[str, Any]:
    """One ``baselines`` entry: what a model that learned nothing scores (``kind`` says which model)."""
    return {"value": float(value), "kind": kind}


def wilson(successes: int, n: int, scale: float = 100.0) -> dict[str, Any]:
    """Wilson score interval of ``successes`` out of ``n`` (times ``scale``: percent by default)."""
    from scipy.stats import binomtest

    if n <= 0:
        raise ValueError(f"wilson: no items (n={n})")
    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return interval(scale * ci.low, scale * ci.high, "wilson", n)


def accuracy_interval(accuracy_percent: float, n: int) -> dict[str, Any]:
    """Wilson interval of an accuracy in percent over ``n`` items (exact counts: ``round(acc * n)``)."""
    return wilson(round(accuracy_percent * n / 100.0), n)


def bootstrap(statistic: Callable[..., Mapping[str, float]], *samples: Sequence | np.ndarray,
              seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES, method: str = "percentile"
              ) -> dict[str, dict[str, Any]]:
    """Bootstrap intervals of the metrics ``statistic(*samples)`` returns (``{name: value}``), resampling
    the items (rows) of all ``samples`` together: one evaluation per resample serves every metric.
    Returns ``{name: interval}``. ``method="BCa"`` corrects a statistic that resampling biases (NMI
    rises with the duplicated items; costs one extra evaluation per item, the jackknife)."""
    from scipy.stats import bootstrap as scipy_bootstrap

    arrays = [np.asarray(s) for s in samples]
    items = len(arrays[0])
    if items < 2:
        raise ValueError(f"bootstrap: need at least 2 items, got {items}")
    names = list(statistic(*arrays))

    def vector(index: np.ndarray) -> np.ndarray:  # scipy resamples the item indices; every array follows them
        values = statistic(*(a[index.astype(int)] for a in arrays))
        return np.array([values[name] for name in names], dtype=float)

    result = scipy_bootstrap((np.arange(items),), vector, vectorized=False, paired=False,
                             confidence_level=CONFIDENCE, n_resamples=resamples, method=method,
                             rng=np.random.default_rng(seed))
    out = {}
    for name, low, high in zip(names, np.atleast_1d(result.confidence_interval.low),
                               np.atleast_1d(result.confidence_interval.high)):
        if not (math.isfinite(low) and math.isfinite(high)):  # a constant statistic: no spread
            low = high = float(statistic(*arrays)[name])
        out[name] = interval(low, high, f"bootstrap-{method}", items)
    return out


def chance_topk(num_classes: int, k: int = 1) -> float:
    """Top-k accuracy (percent) of a uniform random guess over ``num_classes`` balanced classes."""
    return 100.0 * min(k, num_classes) / num_classes


def majority_accuracy(labels: Sequence[int] | np.ndarray) -> float:
    """Accuracy (percent) of always predicting the most frequent label: the trivial baseline of an
    accuracy, equal to chance on a balanced set and above it on an unbalanced one."""
    labels = np.asarray(labels)
    return 100.0 * float(np.bincount(labels).max()) / len(labels)


def accuracy_evidence(metrics: Mapping[str, float | None], labels: Sequence[int] | np.ndarray,
                      num_classes: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(intervals, baselines)`` of accuracies in percent over the items with true ``labels``.

    Interval: Wilson over ``len(labels)``. Baseline: the top-k share of the k most frequent labels
    (k = 5 for a metric named ``*top5*``, else 1): what a model that always predicts the commonest
    classes scores; named chance when the classes are balanced (then it is k / classes).
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes or 0)
    ranked = np.sort(counts)[::-1]
    balanced = ranked[0] == ranked[-1]
    intervals, baselines = {}, {}
    for name, value in metrics.items():
        if value is None:
            continue
        k = 5 if "top5" in name else 1
        intervals[name] = accuracy_interval(value, len(labels))
        kind = (f"chance ({k}/{len(counts)} balanced classes)" if balanced
                else "majority class" if k == 1 else f"{k} most frequent classes")
        baselines[name] = baseline(100.0 * ranked[:k].sum() / len(labels), kind)
    return intervals, baselines


def check_evidence(metrics: Mapping[str, float | None], intervals: Mapping[str, Any],
                   baselines: Mapping[str, Any], where: str) -> None:
    """Intervals and baselines name metrics of the record, with finite numbers and ``low <= high``."""
    for kind, entries, fields in (("interval", intervals, ("low", "high")), ("baseline", baselines, ("value",))):
        for name, entry in entries.items():
            if name not in metrics:
                raise ValueError(f"{where}: {kind} for {name!r}, which is not a metric of the record")
            if not isinstance(entry, Mapping) or any(
                    not isinstance(entry.get(f), (int, float)) or not math.isfinite(entry[f]) for f in fields):
                raise ValueError(f"{where}: {kind} of {name!r} needs finite {fields}: {entry!r}")
    for name, entry in intervals.items():
        if entry["low"] > entry["high"]:
            raise ValueError(f"{where}: interval of {name!r} has low > high: {entry!r}")
