"""Does every stage work? A run's numbers against their trivial baselines and the random-init model.

A stage that ignores its weights, or scores against shuffled labels, writes a metrics file as valid as
a working one. What tells them apart is the evidence each record carries (:mod:`ibot.uncertainty`):

- **above its baseline**: a metric's 95 % interval lies entirely on the good side of what a model that
  learned nothing scores on the same items (chance, majority class, random ranking, first-frame copy,
  random boxes, shuffled clusters, uniform guess), or its value does where it has no interval;
- **beats random init**: in every family pretraining is meant to help (:data:`FAMILIES`), the
  pretrained model's number exceeds the random-init model's by more than its own interval, i.e. the
  random-init number lies outside (below) the pretrained number's 95 % interval; a family of disjoint
  datasets (:data:`POOLED`: transfer) is judged on the accuracy pooled over the sets both models ran.

``ibot evidence --run-dir results/embedded --model vit_tiny --random-model vit_tiny_random`` prints both
checks (exit status 1 if one fails);
``tests/test_pipeline_e2e.py`` asserts them on the embedded run.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import pandas as pd

from ibot.stages import TRANSFER_DATASETS
from ibot.uncertainty import wilson

__all__ = ["FAMILIES", "POOLED", "NOT_SIGNAL", "baseline_checks", "random_init_checks", "read_summary",
           "format_evidence"]

#: Per family pretraining is meant to help: the (stage, metric) pairs whose pretrained number must beat
#: random init (the stage's headline number; every transfer set).
FAMILIES: dict[str, tuple[tuple[str, str], ...]] = {
    "k-NN": (("knn", "top1_k20"),),
    "linear": (("linear", "top1"),),
    "fine-tuning": (("finetune", "top1"),),
    "semi-supervised": (("semi_supervised", "finetune_10pct_top1"),),  # Tab. 4 fine-tunes
    "unsupervised": (("unsupervised", "acc"),),
    "transfer": tuple((f"transfer_{d}", "top1") for d in TRANSFER_DATASETS),
    "detection": (("detection", "bbox_AP50"),),
    "segmentation": (("seg_linear", "mIoU"),),
    "retrieval": (("retrieval", "roxford5k_medium_map"), ("retrieval", "rparis6k_medium_map")),
    "video segmentation": (("video_segmentation", "jf_mean"),),
    "robustness (clean)": (("linear", "top1"),),  # Tab. 8's "Clean": the robustness model is the linear probe
}

#: Families whose sets are disjoint (each its own val images): their number is the accuracy pooled over
#: the sets both models ran, with the Wilson interval of the pooled count (a few points of gain per
#: set is beyond a 500-image interval, not beyond the pooled one).
POOLED: frozenset[str] = frozenset({"transfer"})

#: Metrics whose baseline is not a floor for a working stage: the ImageNet-9 variants without the object
#: (a model that uses the object is near chance there), the background gap, and ImageNet-A, hard by
#: construction (the real set is filtered to fool a ResNet-50, which scores below chance on it; the
#: embedded one adds decoy objects of other classes).
NOT_SIGNAL: frozenset[tuple[str, str]] = frozenset({
    ("bg_challenge", "no_fg"), ("bg_challenge", "only_bg_b"), ("bg_challenge", "only_bg_t"),
    ("bg_challenge", "bg_gap"), ("imagenet_a", "top1"), ("imagenet_r", "top1")})


def _higher_is_better(row: Mapping) -> bool:
    value = row.get("higher_is_better")
    return True if value is None or (isinstance(value, float) and math.isnan(value)) else bool(value)


def baseline_checks(summary: pd.DataFrame, model: str) -> pd.DataFrame:
    """One row per metric of ``model`` the paper's main tables report (``column`` set; not the
    ``coverage`` group of numbers printed elsewhere, e.g. AP75) that has a baseline: value, interval,
    baseline and ``above`` (the interval, or the value without one, is beyond it)."""
    rows = summary[(summary["model"] == model) & summary["column"].notna() & summary["baseline"].notna()
                   & (summary["group"] != "coverage")]
    rows = rows[[(s, m) not in NOT_SIGNAL for s, m in zip(rows["stage"], rows["metric"])]]
    rows = rows.drop_duplicates(["stage", "metric"])
    out = []
    for row in rows.to_dict("records"):
        higher = _higher_is_better(row)
        bound = row["ci_low"] if higher else row["ci_high"]
        bound = row["value"] if pd.isna(bound) else bound
        above = bool(bound > row["baseline"]) if higher else bool(bound < row["baseline"])
        out.append({"stage": row["stage"], "metric": row["metric"], "value": row["value"], "ci_low": row["ci_low"],
                    "ci_high": row["ci_high"], "baseline": row["baseline"], "baseline_kind": row["baseline_kind"],
                    "higher_is_better": higher, "above": above})
    return pd.DataFrame(out, columns=["stage", "metric", "value", "ci_low", "ci_high", "baseline", "baseline_kind",
                                      "higher_is_better", "above"])


def random_init_checks(summary: pd.DataFrame, model: str, random_model: str) -> pd.DataFrame:
    """One row per :data:`FAMILIES` pair that both models ran (one pooled row for a :data:`POOLED`
    family): the pretrained value and interval, the random-init value and ``beats`` (random init below
    the pretrained interval). A family neither model ran in full gets a row with ``beats`` false."""
    def lookup(name: str, stage: str, metric: str) -> dict | None:
        hit = summary[(summary["model"] == name) & (summary["stage"] == stage) & (summary["metric"] == metric)]
        return None if hit.empty or pd.isna(hit.iloc[0]["value"]) else hit.iloc[0].to_dict()

    out = []
    for family, pairs in FAMILIES.items():
        both = [(stage, metric, ours, rand) for stage, metric in pairs
                if (ours := lookup(model, stage, metric)) is not None
                and (rand := lookup(random_model, stage, metric)) is not None]
        if family in POOLED and both:
            out.append(_pooled_row(family, both))
            continue
        for stage, metric, ours, rand in both:
            low = ours["value"] if pd.isna(ours["ci_low"]) else ours["ci_low"]
            out.append({"family": family, "stage": stage, "metric": metric, "value": ours["value"],
                        "ci_low": ours["ci_low"], "ci_high": ours["ci_high"], "random_init": rand["value"],
                        "beats": bool(low > rand["value"])})
        if not both:
            out.append({"family": family, "stage": "", "metric": "", "value": None, "ci_low": None, "ci_high": None,
                        "random_init": None, "beats": False})
    return pd.DataFrame(out, columns=["family", "stage", "metric", "value", "ci_low", "ci_high", "random_init",
                                      "beats"])


def _pooled_row(family: str, both: list[tuple[str, str, dict, dict]]) -> dict:
    """The accuracy over the pooled val images of a family's disjoint sets (each set's accuracy weighted
    by its image count), its Wilson interval, and random init's pooled accuracy over the same sets."""
    if any(ours["ci_method"] != "wilson" or pd.isna(ours["ci_n"]) for _, _, ours, _ in both):
        raise ValueError(f"family {family!r}: pooling needs Wilson intervals with their item counts")
    counts = [float(ours["ci_n"]) for _, _, ours, _ in both]
    hits = sum(ours["value"] / 100.0 * n for (_, _, ours, _), n in zip(both, counts))
    pooled = wilson(round(hits), round(sum(counts)))
    random_value = sum(rand["value"] * n for (_, _, _, rand), n in zip(both, counts)) / sum(counts)
    return {"family": family, "stage": "+".join(stage for stage, _, _, _ in both), "metric": both[0][1],
            "value": 100.0 * hits / sum(counts), "ci_low": pooled["low"], "ci_high": pooled["high"],
            "random_init": random_value, "beats": bool(pooled["low"] > random_value)}


def read_summary(run_dir: str | Path) -> pd.DataFrame:
    """A run's ``summary.csv``."""
    from ibot.results.aggregate import read_summaries

    return read_summaries([Path(run_dir) / "summary.csv"])


def format_evidence(run_dir: str | Path, model: str, random_model: str | None = None) -> tuple[str, bool]:
    """Both checks of a run as Markdown, and whether every one holds."""
    summary = read_summary(run_dir)
    if model not in set(summary["model"]):
        raise ValueError(f"{run_dir}/summary.csv: no model {model!r} (models: {sorted(set(summary['model']))})")
    checks = baseline_checks(summary, model)
    text = [f"**{model}: every number against its trivial baseline** (interval beyond it: above)", "",
            checks.to_markdown(index=False, floatfmt=".1f")]
    ok = bool(checks["above"].all())
    if random_model:
        versus = random_init_checks(summary, model, random_model)
        text += ["", f"**{model} vs {random_model}** (random init below the pretrained interval: beats)", "",
                 versus.to_markdown(index=False, floatfmt=".1f")]
        ok = ok and bool(versus["beats"].all())
    return "\n".join(text), ok
