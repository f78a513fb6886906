"""DAVIS-2017 semi-supervised metrics: region similarity J and boundary F-measure (Tab.16 "J&F").

The official evaluation package (``davis2017-evaluation``, github davisvideochallenge/davis2017-evaluation
at 30b698a) is not on the package registry (``pip download davis2017-evaluation``: no distribution), so
its definitions are ported here, numerically the same (it needs scikit-image only for ``disk``, which
is one line):

- J (``davis2017/metrics.py:db_eval_iou``): |pred ∩ gt| / |pred ∪ gt| per object per frame; 1 when
  both masks are empty.
- F (``metrics.py:db_eval_boundary`` / ``f_measure``, ``bound_th`` 0.008): one-pixel boundaries of
  both masks (``_seg2bmap``), each dilated by a disk of radius ``ceil(bound_th * image diagonal)``
  (``cv2.dilate`` with ``skimage.morphology.disk``); precision = predicted boundary pixels within the
  dilated true boundary / predicted boundary pixels, recall the other way; F = 2PR/(P+R), with the
  official conventions when a boundary is empty.
- Per object, the mean over the frames (``utils.db_statistics``: ``np.nanmean``); the semi-supervised
  task leaves out the first and the last frame (``evaluation.py``: ``all_gt_masks[:, 1:-1]``).
- J mean, F mean over all objects of all sequences; J&F mean = (J mean + F mean) / 2
  (``evaluation_method.py``: ``final_mean``). Here in percent, as the paper reports them.

Evidence (:func:`summary_evidence`): a percentile-bootstrap interval of each mean over the objects
(pairs of an object's J and F resampled together), and the trivial baseline the DAVIS benchmark
compares against, the first-frame mask copied to every frame, scored by the same code.

Objects are the ids 1..max of the first ground-truth frame (``davis.py:get_all_masks``: void 255 → 0,
``num_objects = max(masks[0])``); ground-truth void pixels are background, as there.

Deviation, only where the official evaluation stops: a result holding an id above the objects ends it
(``evaluation.py``: "an index higher than the number of objects"). Label propagation from a first
annotation with void pixels propagates 255 as a label of its own (``to_one_hot`` over 0..255 in
``eval_video_segmentation.py:167-179``); here a predicted 255 is void, scored as background like the
ground truth's, so such a sequence is evaluated instead of ending the stage. Any other id above the
objects still raises.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from ibot.uncertainty import baseline, bootstrap

__all__ = ["BOUND_TH", "VOID", "region_similarity", "seg2bmap", "disk", "boundary_f_measure", "object_masks",
           "evaluate_sequence", "summarize", "summary_evidence"]

#: Boundary tolerance as a fraction of the image diagonal (metrics.py: ``bound_th=0.008``).
BOUND_TH = 0.008
#: The DAVIS void label (``davis.py:get_all_masks``).
VOID = 255


def region_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    """J: intersection over union of two binary masks; 1 when both are empty (metrics.py:db_eval_iou)."""
    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} dimensions do not match")
    union = int(np.sum(gt | pred))
    return 1.0 if union == 0 else float(np.sum(gt & pred)) / union


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """One-pixel-wide boundary map of a binary mask, offset by 1/2 pixel towards the origin
    (metrics.py:_seg2bmap at full resolution, after D. Martin's BSDS code)."""
    seg = np.asarray(seg, dtype=bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def disk(radius: float) -> np.ndarray:
    """``skimage.morphology.disk``: the uint8 (2r+1)^2 structuring element of x^2 + y^2 <= r^2."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return (x**2 + y**2 <= radius**2).astype(np.uint8)


def boundary_f_measure(gt: np.ndarray, pred: np.ndarray, bound_th: float = BOUND_TH) -> float:
    """F: boundary F-measure of ``pred`` against ``gt`` (metrics.py:f_measure; ``bound_th`` >= 1 is pixels)."""
    import cv2

    gt, pred = np.asarray(gt, dtype=bool), np.asarray(pred, dtype=bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} dimensions do not match")
    bound_pix = bound_th if bound_th >= 1 else math.ceil(bound_th * np.linalg.norm(pred.shape))
    fg_boundary, gt_boundary = seg2bmap(pred), seg2bmap(gt)
    kernel = disk(bound_pix)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), kernel).astype(bool)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), kernel).astype(bool)
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = float(np.sum(fg_boundary & gt_dil)) / n_fg
        recall = float(np.sum(gt_boundary & fg_dil)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def object_masks(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """[num_objects, H, W] bool masks of ids 1..num_objects of a label map (255 = void counts as background)."""
    labels = np.where(np.asarray(labels) == VOID, 0, np.asarray(labels))
    return labels[None] == np.arange(1, num_objects + 1)[:, None, None]


def evaluate_sequence(gt_frames: Sequence[np.ndarray], pred_frames: Sequence[np.ndarray],
                      bound_th: float = BOUND_TH) -> tuple[np.ndarray, np.ndarray]:
    """Per-object mean J and F ([num_objects] each, fractions) of one sequence.

    ``gt_frames`` / ``pred_frames``: the label maps of every annotated frame in order (first included);
    the first and the last frame are left out as in the official semi-supervised evaluation.
    """
    if len(gt_frames) != len(pred_frames):
        raise ValueError(f"{len(gt_frames)} annotated frames but {len(pred_frames)} predicted ones")
    if len(gt_frames) < 3:
        raise ValueError(f"{len(gt_frames)} annotated frames: the evaluation leaves out the first and last, "
                         f"at least 3 are needed")
    num_objects = int(np.max(np.where(gt_frames[0] == VOID, 0, gt_frames[0])))
    if num_objects == 0:
        raise ValueError("the first annotated frame has no object")
    j = np.zeros((num_objects, len(gt_frames) - 2))
    f = np.zeros_like(j)
    for t, (gt, pred) in enumerate(zip(gt_frames[1:-1], pred_frames[1:-1])):
        highest = int(np.max(np.where(pred == VOID, 0, pred)))
        if highest > num_objects:  # evaluation.py: "an index higher than the number of objects"
            raise ValueError(f"prediction has object id {highest} > the {num_objects} objects of the first frame")
        gt_objects, pred_objects = object_masks(gt, num_objects), object_masks(pred, num_objects)
        for k in range(num_objects):
            j[k, t] = region_similarity(gt_objects[k], pred_objects[k])
            f[k, t] = boundary_f_measure(gt_objects[k], pred_objects[k], bound_th)
    return j.mean(axis=1), f.mean(axis=1)


def summarize(per_object: Mapping[str, tuple[float, float]]) -> dict[str, float]:
    """``jf_mean``, ``j_mean``, ``f_mean`` in percent over objects (``{"<seq>_<k>": (J, F)}`` fractions)."""
    if not per_object:
        raise ValueError("no objects to summarize")
    return _means(np.array(list(per_object.values()), dtype=np.float64))


def _means(scores: np.ndarray) -> dict[str, float]:
    """``jf_mean``, ``j_mean``, ``f_mean`` in percent of per-object (J, F) rows [object, 2]."""
    j_mean, f_mean = (100.0 * float(np.mean(scores[:, i])) for i in (0, 1))
    return {"jf_mean": (j_mean + f_mean) / 2, "j_mean": j_mean, "f_mean": f_mean}


def summary_evidence(per_object: Mapping[str, tuple[float, float]],
                     first_frame_copy: Mapping[str, tuple[float, float]], seed: int = 0
                     ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(intervals, baselines)`` of :func:`summarize`'s metrics: percentile bootstrap over the objects
    (each object's J and F drawn together; none for a single object) and the scores of the first-frame
    mask copied to every frame (``first_frame_copy``, per object as ``per_object``)."""
    scores = np.array(list(per_object.values()), dtype=np.float64)
    intervals = bootstrap(_means, scores, seed=seed) if len(scores) > 1 else {}
    baselines = {name: baseline(value, "first-frame mask copied to every frame")
                 for name, value in summarize(first_frame_copy).items()}
    return intervals, baselines
