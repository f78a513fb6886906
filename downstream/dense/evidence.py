"""What the dense metrics mean on their val images: 95 % intervals over the images and what a model
that learned nothing scores on them (the ``intervals`` / ``baselines`` of :mod:`ibot.uncertainty`).

The toolboxes compute the reported numbers; two subclasses of their metrics keep what they computed
them from, so an interval resamples the very evaluation that gave the value and nothing is predicted
or matched again:

- :class:`EvidenceCocoMetric` (mmdet ``CocoMetric``) keeps each task's evaluated pycocotools
  ``COCOeval``. A bootstrap resample of the val images re-indexes its per-image results (``evalImgs``,
  one entry per category x area range x image, pycocotools cocoeval.py ``evaluate``) with the drawn
  images relabelled 0..n-1 (an image drawn twice counts twice) and runs ``accumulate`` + ``summarize``.
- :class:`EvidenceIoUMetric` (mmseg ``IoUMetric``) keeps the per-image class areas (intersection,
  union, prediction, label); a resample sums the drawn images' areas and applies IoUMetric's own
  ``total_area_to_metrics``.

Baselines: random boxes drawn from the training priors for detection (:func:`prior_detections`), the
training set's majority class predicted at every pixel for segmentation (:func:`constant_prediction_areas`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from mmdet.evaluation.metrics import CocoMetric
from mmseg.evaluation.metrics import IoUMetric
from PIL import Image

from ibot.uncertainty import bootstrap

__all__ = ["COCO_STATS", "EvidenceCocoMetric", "EvidenceIoUMetric", "register", "coco_stats",
           "coco_resampler", "coco_bootstrap", "prior_detections", "coco_baseline", "iou_summary", "iou_bootstrap",
           "constant_prediction_areas", "label_counts"]

#: Our AP name -> index in ``COCOeval.stats`` (cocoeval.py ``_summarizeDets``; mmdet coco_metric.py's
#: ``coco_metric_names``: mAP 0, mAP_50 1, mAP_75 2).
COCO_STATS = {"AP": 0, "AP50": 1, "AP75": 2}


class EvidenceCocoMetric(CocoMetric):
    """mmdet's ``CocoMetric`` (same numbers) that keeps each evaluated ``COCOeval`` in ``evaluated``
    (``{"bbox": ..., "segm": ...}``) for :func:`coco_bootstrap`; set on the main process only, as mmengine
    computes metrics there."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        from mmdet.evaluation.metrics import coco_metric

        evaluated: list[Any] = []
        toolbox_cocoeval = coco_metric.COCOeval

        class Recorded(toolbox_cocoeval):  # CocoMetric builds its COCOeval from this module name
            def evaluate(self) -> None:
                super().evaluate()
                evaluated.append(self)

        coco_metric.COCOeval = Recorded
        try:
            metrics = super().compute_metrics(results)
        finally:
            coco_metric.COCOeval = toolbox_cocoeval
        self.evaluated = {e.params.iouType: e for e in evaluated}
        return metrics


class EvidenceIoUMetric(IoUMetric):
    """mmseg's ``IoUMetric`` (same numbers) that keeps the per-image areas in ``areas``
    ([image, (intersect, union, pred, label), class], float64) for :func:`iou_bootstrap`."""

    def compute_metrics(self, results: list) -> dict[str, float]:
        self.areas = np.stack([np.stack([np.asarray(a, dtype=np.float64) for a in r]) for r in results])
        return super().compute_metrics(results)


def register() -> None:
    """Register both metrics in mmdet's / mmseg's METRICS (idempotent)."""
    from mmdet.registry import METRICS as MMDET_METRICS
    from mmseg.registry import METRICS as MMSEG_METRICS

    for registry, metric in ((MMDET_METRICS, EvidenceCocoMetric), (MMSEG_METRICS, EvidenceIoUMetric)):
        if registry.get(metric.__name__) is not metric:
            registry.register_module(name=metric.__name__, module=metric, force=True)


# -- detection -----------------------------------------------------------------------------------------
def coco_stats(coco_eval: Any, accumulated_as: Mapping[int, int] | None = None) -> dict[str, float]:
    """AP, AP50, AP75 (percent) of an evaluated ``COCOeval`` after ``accumulate()``, as ``summarize`` computes
    them (cocoeval.py ``_summarize``/``_summarizeDets``): the mean precision over IoU thresholds (or at IoU
    0.5 / 0.75), recall thresholds and categories, ignoring -1 (nothing to evaluate), in the ``all`` area
    range, at 100 detections for AP and at ``maxDets[2]`` for AP50/AP75 (mmdet passes 100, 300, 1000);
    -1 when nothing is left. ``accumulated_as`` names, for a maxDets value, the one accumulated in its
    place (same truncation)."""
    params = coco_eval.eval["params"]
    precision = coco_eval.eval["precision"][:, :, :, params.areaRngLbl.index("all")]  # [iou, recall, class, maxDet]
    ious = np.asarray(params.iouThrs)

    def mean(values: np.ndarray) -> float:
        values = values[values > -1]
        return 100.0 * float(np.mean(values)) if values.size else -1.0

    def at(max_dets: int) -> np.ndarray:
        max_dets = (accumulated_as or {}).get(max_dets, max_dets)
        return precision[..., [i for i, m in enumerate(params.maxDets) if m == max_dets]]

    most = coco_eval.params.maxDets[2]
    return {"AP": mean(at(100)), "AP50": mean(at(most)[np.flatnonzero(ious == 0.5)]),
            "AP75": mean(at(most)[np.flatnonzero(ious == 0.75)])}


def coco_resampler(coco_eval: Any) -> Callable[[np.ndarray], dict[str, float]]:
    """AP, AP50, AP75 (percent) of an evaluated ``COCOeval`` on a resample of its val images (positions
    in ``params.imgIds``; an image drawn twice counts twice).

    ``evalImgs`` is re-indexed for the drawn images, renumbered 0..n-1, and accumulated for what the
    three APs read only: the ``all`` area range, 100 and ``maxDets[2]`` detections, once when both keep
    every detection of every image (``_paramsEval`` keeps the layout of ``evalImgs``, cocoeval.py
    ``accumulate``). The identity resample gives the toolbox's values.
    """
    evaluated = coco_eval._paramsEval
    table = np.empty(len(coco_eval.evalImgs), dtype=object)
    table[:] = coco_eval.evalImgs
    table = table.reshape(-1, len(evaluated.areaRng), len(evaluated.imgIds))  # [category, area range, image]
    keep = coco_eval.params.areaRngLbl.index("all")
    # truncating to m >= the most detections an image holds keeps them all: such m accumulate alike
    most = max([len(e["dtScores"]) for e in coco_eval.evalImgs if e is not None] + [1])
    accumulated_as = {m: min(m, most) for m in {100, coco_eval.params.maxDets[2]}}

    def resampled(index: np.ndarray) -> dict[str, float]:
        drawn = copy.copy(coco_eval)
        drawn.evalImgs = table[:, :, np.asarray(index, dtype=np.int64)].ravel().tolist()
        drawn._paramsEval, params = copy.copy(evaluated), copy.copy(coco_eval.params)
        drawn._paramsEval.imgIds = params.imgIds = list(range(len(index)))
        params.areaRng, params.areaRngLbl = [params.areaRng[keep]], ["all"]
        # (accumulate takes the maxDets of params found in _paramsEval; evalImgs' layout ignores maxDets)
        params.maxDets = drawn._paramsEval.maxDets = sorted(set(accumulated_as.values()))
        with contextlib.redirect_stdout(io.StringIO()):
            drawn.accumulate(params)
        return coco_stats(drawn, accumulated_as)

    return resampled


def coco_bootstrap(coco_eval: Any, resamples: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Percentile-bootstrap intervals of AP, AP50, AP75 (percent) over the val images of an evaluated
    ``COCOeval`` (:func:`coco_resampler`)."""
    return bootstrap(coco_resampler(coco_eval), np.arange(len(coco_eval._paramsEval.imgIds)),
                     resamples=resamples, seed=seed)


def prior_detections(gt: Any, train_annotations: str | Path, cat_ids: Sequence[int], per_image: int,
                     seed: int) -> list[dict[str, Any]]:
    """Detections of a detector that learned only the training priors: per val image of ``gt`` (a
    pycocotools COCO), ``per_image`` boxes whose category follows the training class frequencies, whose
    (width, height) relative to the image is a training box's (drawn uniformly), placed uniformly inside
    the image, with uniform random scores. Each carries its box and the box's mask (RLE)."""
    from pycocotools import mask as mask_utils

    train = json.loads(Path(train_annotations).read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in train["images"]}
    anns = [a for a in train["annotations"] if not a.get("iscrowd", 0) and a["category_id"] in set(cat_ids)]
    if not anns:
        raise ValueError(f"{train_annotations}: no training box of the evaluated categories")
    frequency = Counter(a["category_id"] for a in anns)
    counts = np.array([frequency[c] for c in cat_ids], dtype=np.float64)
    relative = np.array([(a["bbox"][2] / sizes[a["image_id"]][0], a["bbox"][3] / sizes[a["image_id"]][1])
                         for a in anns])
    rng = np.random.default_rng(seed)
    detections = []
    for image_id in sorted(gt.getImgIds()):
        width, height = gt.imgs[image_id]["width"], gt.imgs[image_id]["height"]
        wh = relative[rng.integers(len(relative), size=per_image)] * (width, height)
        xy = rng.uniform(size=(per_image, 2)) * ((width, height) - wh)
        boxes = np.concatenate([xy, wh], axis=1)
        categories = rng.choice(np.asarray(cat_ids), size=per_image, p=counts / counts.sum())
        masks = mask_utils.frPyObjects(np.ascontiguousarray(boxes, dtype=np.float64), height, width)
        for box, category, score, rle in zip(boxes, categories, rng.uniform(size=per_image), masks):
            detections.append({"image_id": image_id, "category_id": int(category), "bbox": box.tolist(),
                               "score": float(score), "segmentation": rle})
    return detections


def coco_baseline(like: Any, detections: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """AP, AP50, AP75 (percent) of ``detections`` evaluated as ``like`` (an evaluated ``COCOeval``: same
    ground truth, task, categories, images, maxDets, IoU thresholds). Mask detections lose their box,
    as in mmdet's CocoMetric (coco_metric.py: ``x.pop('bbox')`` for segm)."""
    from pycocotools.cocoeval import COCOeval

    iou_type = like.params.iouType
    keys = ("image_id", "category_id", "score", "bbox" if iou_type == "bbox" else "segmentation")
    results = [{k: d[k] for k in keys} for d in detections]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(like.cocoGt, like.cocoGt.loadRes(results), iou_type)
        for name in ("catIds", "imgIds", "maxDets", "iouThrs"):
            setattr(coco_eval.params, name, copy.copy(getattr(like.params, name)))
        coco_eval.evaluate()
        coco_eval.accumulate()
    return coco_stats(coco_eval)


# -- semantic segmentation ---------------------------------------------------------------------------------
def iou_summary(areas: np.ndarray, metric: IoUMetric) -> dict[str, float]:
    """aAcc, mIoU, mAcc... (percent, unrounded) of the per-image ``areas`` [image, 4, class] summed, by
    ``metric``'s settings and mmseg's own formulas (iou_metric.py ``compute_metrics``)."""
    total = torch.from_numpy(np.asarray(areas, dtype=np.float64).sum(axis=0))
    values = metric.total_area_to_metrics(*total, metric.metrics, metric.nan_to_num, metric.beta)
    return {(name if name == "aAcc" else f"m{name}"): 100.0 * float(np.nanmean(np.asarray(value)))
            for name, value in values.items()}


def iou_bootstrap(metric: EvidenceIoUMetric, resamples: int, seed: int = 0) -> dict[str, dict[str, Any]]:
    """Intervals of the summary metrics (aAcc, mIoU, mAcc...) over the val images ``metric`` evaluated."""
    return bootstrap(lambda areas: iou_summary(areas, metric), metric.areas, resamples=resamples, seed=seed)


def constant_prediction_areas(label_areas: np.ndarray, label: int) -> np.ndarray:
    """Per-image areas [image, 4, class] of predicting ``label`` at every evaluated pixel, from the
    ground-truth areas [image, class] (ignored pixels are not evaluated: iou_metric.py ``intersect_and_union``)."""
    label_areas = np.asarray(label_areas, dtype=np.float64)
    pred, intersect = np.zeros_like(label_areas), np.zeros_like(label_areas)
    pred[:, label] = label_areas.sum(axis=1)
    intersect[:, label] = label_areas[:, label]
    return np.stack([intersect, pred + label_areas - intersect, pred, label_areas], axis=1)


def label_counts(seg_maps: Sequence[str | Path], num_classes: int, reduce_zero_label: bool) -> np.ndarray:
    """Pixels per class [num_classes] over label maps, read as mmseg's ``LoadAnnotations`` does
    (``reduce_zero_label``: 0 is ignored, label i counts as class i - 1)."""
    counts = np.zeros(256, dtype=np.int64)
    for path in seg_maps:
        counts += np.bincount(np.asarray(Image.open(path)).ravel(), minlength=256)[:256]
    return counts[1:num_classes + 1] if reduce_zero_label else counts[:num_classes]
