"""Intervals and baselines (ibot.uncertainty), their place in the metrics schema, and the evidence checks
(ibot.results.evidence) against hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from ibot.metrics import read_metrics, write_metrics
from ibot.uncertainty import (accuracy_evidence, accuracy_interval, baseline, bootstrap, chance_topk, interval,
                              majority_accuracy, wilson)


def test_wilson_interval_matches_the_closed_form() -> None:
    # Wilson score interval: (p + z²/2n ± z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n), z = 1.959964
    k, n, z = 113, 400, 1.959963984540054
    p = k / n
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    expected = ((centre - half) / (1 + z * z / n) * 100, (centre + half) / (1 + z * z / n) * 100)
    got = wilson(k, n)
    assert (got["low"], got["high"]) == pytest.approx(expected, abs=1e-9)
    assert got["method"] == "wilson" and got["n"] == 400 and got["confidence"] == 0.95
    assert accuracy_interval(28.25, 400) == got  # 28.25 % of 400 images = 113 hits
    edge = wilson(0, 50)  # no hit: the interval still has width (a normal approximation would give [0, 0])
    assert edge["low"] == pytest.approx(0.0, abs=1e-12) and edge["high"] > 5.0
    with pytest.raises(ValueError, match="no items"):
        wilson(0, 0)


def test_chance_and_majority_baselines() -> None:
    assert chance_topk(10) == 10.0 and chance_topk(10, 5) == 50.0 and chance_topk(3, 5) == 100.0
    assert majority_accuracy([0, 0, 0, 1]) == 75.0
    intervals, baselines = accuracy_evidence({"top1": 50.0, "top5": 90.0}, np.arange(200) % 10, 10)
    assert baselines["top1"] == {"value": 10.0, "kind": "chance (1/10 balanced classes)"}
    assert baselines["top5"]["value"] == 50.0 and intervals["top5"]["n"] == 200
    # unbalanced: the commonest classes, not 1/classes
    _, skewed = accuracy_evidence({"top1": 80.0, "top5": 99.0}, [0] * 70 + [1] * 20 + [2] * 10, 3)
    assert skewed["top1"] == {"value": 70.0, "kind": "majority class"}
    assert skewed["top5"]["value"] == 100.0  # 3 classes: any 5 guesses hold the answer
    # a class absent from the labels makes the set unbalanced even if the others are equal
    assert accuracy_evidence({"top1": 1.0}, [0, 1], 3)[1]["top1"]["kind"] == "majority class"


def test_bootstrap_resamples_items_together() -> None:
    hits = np.array([1] * 30 + [0] * 70)
    result = bootstrap(lambda h: {"acc": 100.0 * h.mean()}, hits)["acc"]
    assert result["n"] == 100 and result["method"] == "bootstrap-percentile"
    assert 19.0 < result["low"] < 30.0 < result["high"] < 41.0  # close to Wilson's [21.9, 39.6]
    # paired: labels and predictions are drawn together, so a perfect classifier stays at 100
    labels = np.arange(40) % 4
    perfect = bootstrap(lambda y, p: {"acc": 100.0 * (y == p).mean()}, labels, labels.copy())["acc"]
    assert perfect["low"] == perfect["high"] == 100.0
    with pytest.raises(ValueError, match="at least 2"):
        bootstrap(lambda x: {"m": float(x.mean())}, [1.0])


def _record(tmp_path, **evidence):
    return write_metrics(tmp_path / "metrics.json", run="r", model="m", stage="knn", task="knn", dataset="d",
                         protocol="p", metrics={"top1": 40.0}, config={}, wall_time_s=1.0, **evidence)


def test_metrics_files_carry_and_check_the_evidence(tmp_path) -> None:
    _record(tmp_path, intervals={"top1": interval(35.0, 45.0, "wilson", 400)},
            baselines={"top1": baseline(10.0, "chance")})
    record = read_metrics(tmp_path / "metrics.json")
    assert record["intervals"]["top1"]["low"] == 35.0 and record["baselines"]["top1"]["kind"] == "chance"
    with pytest.raises(ValueError, match="not a metric of the record"):
        _record(tmp_path, baselines={"top5": baseline(50.0, "chance")})
    with pytest.raises(ValueError, match="low > high"):
        _record(tmp_path, intervals={"top1": interval(45.0, 35.0, "wilson", 400)})
    with pytest.raises(ValueError, match="finite"):
        _record(tmp_path, baselines={"top1": {"value": float("nan"), "kind": "chance"}})


def _summary(rows):
    columns = ["model", "stage", "metric", "value", "ci_low", "ci_high", "baseline", "baseline_kind",
               "higher_is_better", "column"]
    return pd.DataFrame([dict(zip(columns, row)) for row in rows], columns=columns).assign(group="main")


def test_evidence_checks_by_hand() -> None:
    from ibot.results.evidence import baseline_checks, random_init_checks

    summary = _summary([
        ("ours", "knn", "top1_k20", 41.5, 36.8, 46.4, 10.0, "chance", True, "k-NN"),
        ("ours", "linear", "top1", 12.0, 9.0, 15.0, 10.0, "chance", True, "Linear"),  # interval holds chance
        ("ours", "imagenet_c", "mean_error_19", 52.9, 51.5, 54.4, 90.0, "uniform", False, "IN-C"),  # lower is better
        ("ours", "unsupervised", "nmi", 28.7, math.nan, math.nan, 7.0, "shuffled", True, "NMI"),  # no interval
        ("ours", "bg_challenge", "only_bg_t", 9.0, 6.0, 12.0, 11.1, "chance", True, "Only-BG-T"),  # not a signal
        ("rand", "knn", "top1_k20", 34.0, 29.5, 38.7, 10.0, "chance", True, "k-NN"),
        ("rand", "linear", "top1", 11.0, 8.0, 14.0, 10.0, "chance", True, "Linear"),
    ])
    checks = baseline_checks(summary, "ours").set_index("stage")
    assert "bg_challenge" not in checks.index
    assert baseline_checks(summary.assign(group="coverage"), "ours").empty  # numbers outside the main tables
    assert checks.at["knn", "above"] and checks.at["imagenet_c", "above"] and checks.at["unsupervised", "above"]
    assert not checks.at["linear", "above"]
    versus = random_init_checks(summary, "ours", "rand").set_index("family")
    assert versus.at["k-NN", "beats"]  # 34.0 below [36.8, 46.4]
    assert not versus.at["linear", "beats"]  # 11.0 inside [9.0, 15.0]
    assert not versus.at["robustness (clean)", "beats"]  # Tab. 8's clean accuracy is the linear probe's
    assert not versus.at["fine-tuning", "beats"]  # no number at all is not a win


def test_a_family_of_disjoint_sets_is_judged_on_its_pooled_images() -> None:
    """Transfer: 500 val images per set, a few points of gain per set (inside each set's interval) and
    the same gain over the 1,000 pooled images (beyond the pooled interval)."""
    from ibot.results.evidence import random_init_checks

    rows = [("ours", "transfer_cifar10", "top1", 35.8, 31.7, 40.1, 10.0, "chance", True, "CIFAR-10"),
            ("ours", "transfer_cifar100", "top1", 34.6, 30.6, 38.9, 10.0, "chance", True, "CIFAR-100"),
            ("ours", "transfer_flowers", "top1", 90.0, 87.0, 92.5, 10.0, "chance", True, "Flowers"),  # no random
            ("rand", "transfer_cifar10", "top1", 32.0, 28.0, 36.3, 10.0, "chance", True, "CIFAR-10"),
            ("rand", "transfer_cifar100", "top1", 31.0, 27.1, 35.2, 10.0, "chance", True, "CIFAR-100")]
    summary = _summary(rows).assign(ci_method="wilson", ci_n=500)
    per_set_low = summary[summary["model"] == "ours"]["ci_low"].head(2)
    assert (per_set_low < summary[summary["model"] == "rand"]["value"].to_numpy()).all()  # each set alone: no
    row = random_init_checks(summary, "ours", "rand").set_index("family").loc["transfer"]
    assert row["stage"] == "transfer_cifar10+transfer_cifar100"  # only the sets both models ran
    assert row["value"] == pytest.approx(35.2) and row["random_init"] == pytest.approx(31.5)
    assert row["ci_low"] == pytest.approx(wilson(352, 1000)["low"]) and row["beats"]
    with pytest.raises(ValueError, match="Wilson"):
        random_init_checks(summary.assign(ci_method="bootstrap-percentile"), "ours", "rand")
