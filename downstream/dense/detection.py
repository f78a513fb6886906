"""COCO object detection + instance segmentation: Cascade Mask R-CNN (FPN, 4conv1fc GIoU box heads)
on our ViT with the multi-scale adaptor, trained with mmdet and evaluated with its CocoMetric.

``python -m downstream detection --data <coco root> --out results/<run>/<model>/detection/metrics.json
[--checkpoint W] [--arch vit_small] [--config JSON]``. mmdet's work dir (logs, checkpoints, the
resolved config) is the stage's ``work/``; a requeued job resumes from its last checkpoint. Live
TensorBoard curves (mmdet's logged scalars, then the test metrics) in ``<out dir>/tb/``.

Reported (percent): ``bbox_AP, bbox_AP50, bbox_AP75, segm_AP, segm_AP50, segm_AP75``; one CocoMetric
did not produce is null with its reason (``extra["null_reasons"]``), never 0. The protocol label
says the schedule actually run (``cascade-mask-rcnn,1x`` only for the official one). Each reported
AP carries its percentile-bootstrap interval over the val images and the AP of random boxes drawn from
the training priors (:func:`detection_evidence`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

from downstream.dense.common import (CONFIG_DIR, configure_runtime, enable_tensorboard, env_world_size, norm_cfg,
                                     per_gpu_batch, resolved_out_indices, set_dataloader_workers, train_and_test)
from ibot.checkpoint import BackboneCheckpoint
from ibot.models.specs import ModelSpec
from ibot.run.context import StageContext
from ibot.uncertainty import baseline

__all__ = ["COCO_METRICS", "build_config", "protocol_label", "coco_metrics", "detection_evidence", "run"]

BASE_CONFIG = CONFIG_DIR / "cascade_mask_rcnn_vit_fpn_coco.py"


def coco_categories(data_root: Path) -> list[str]:
    """Category names of the val annotations, in file order (= mmdet label order)."""
    path = data_root / "annotations" / "instances_val2017.json"
    try:
        categories = json.loads(path.read_text())["categories"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"detection: cannot read the COCO categories from {path}: {error}") from error
    return [c["name"] for c in categories]


def _scales(short_sides: Sequence[int], max_size: int) -> list[tuple[int, int]]:
    return [(int(max_size), int(s)) for s in short_sides]


def build_config(config: Mapping[str, Any], model_spec: ModelSpec | Mapping[str, Any],
                 checkpoint: BackboneCheckpoint | None, data: str | Path, work_dir: str | Path, seed: int = 0,
                 world_size: int | None = None):
    """The mmengine Config of this run: the base config file with the project config applied."""
    from mmengine.config import Config

    world_size = world_size or env_world_size()
    model_spec = ModelSpec.of(model_spec)
    arch = model_spec.arch
    data_root = Path(data)
    cfg = Config.fromfile(str(BASE_CONFIG))

    # -- backbone -------------------------------------------------------------------------------
    from ibot.models.vision_transformer import ARCHITECTURES
    if arch not in ARCHITECTURES:
        raise ValueError(f"detection: unknown arch {arch!r}")
    embed_dim = ARCHITECTURES[arch].embed_dim
    norm = norm_cfg(world_size)
    cfg.model.backbone.update(
        arch=arch, patch_size=model_spec.patch_size, depth=model_spec.depth,
        drop_path_rate=float(config["drop_path"]),
        out_indices=config["out_indices"], final_norm=bool(config["final_norm"]), norm_cfg=norm,
        pretrained=str(checkpoint.path) if checkpoint else None, checkpoint_key=checkpoint.key if checkpoint else None)
    cfg.model.neck.in_channels = [embed_dim] * 4

    # -- classes ----------------------------------------------------------------------------------
    classes = coco_categories(data_root)
    num_classes = int(config["num_classes"] or len(classes))
    if num_classes != len(classes):
        raise ValueError(f"detection.num_classes: {num_classes}, but {data_root} has {len(classes)} categories")
    for head in cfg.model.roi_head.bbox_head:
        head.num_classes = num_classes
        head.norm_cfg = norm
    cfg.model.roi_head.mask_head.num_classes = num_classes

    # -- sampling sizes -------------------------------------------------------------------------------
    cfg.model.train_cfg.rpn_proposal.update(nms_pre=int(config["rpn_train_proposals"]),
                                            max_per_img=int(config["rpn_train_proposals"]))
    cfg.model.test_cfg.rpn.update(nms_pre=int(config["rpn_test_proposals"]),
                                  max_per_img=int(config["rpn_test_proposals"]))
    for stage_cfg in cfg.model.train_cfg.rcnn:
        stage_cfg.sampler.num = int(config["rcnn_sampler_num"])
    cfg.model.test_cfg.rcnn.score_thr = float(config["score_thr"])

    # -- widths (paper: 256 / 256 / 1024) -------------------------------------------------------------
    neck, conv, fc = int(config["neck_channels"]), int(config["head_conv_channels"]), int(config["head_fc_channels"])
    cfg.model.neck.out_channels = neck
    cfg.model.rpn_head.update(in_channels=neck, feat_channels=neck)
    roi = cfg.model.roi_head
    roi.bbox_roi_extractor.out_channels = neck
    roi.mask_roi_extractor.out_channels = neck
    for head in roi.bbox_head:
        head.update(in_channels=neck, conv_out_channels=conv, fc_out_channels=fc)
    roi.mask_head.update(in_channels=neck, conv_out_channels=conv)

    # -- data ---------------------------------------------------------------------------------------
    max_size = int(config["max_size"])
    train_scales = _scales(config["train_scales"], max_size)
    multi_scale = dict(type="RandomChoiceResize", scales=train_scales, keep_ratio=True)
    if config["crop_aug"]:
        augment = dict(type="RandomChoice", transforms=[
            [multi_scale],
            [dict(type="RandomChoiceResize", scales=_scales(config["crop_resize_scales"], max_size),
                  keep_ratio=True),
             dict(type="RandomCrop", crop_type="absolute_range", crop_size=tuple(config["crop_size"]),
                  allow_negative_crop=True),
             multi_scale]])
    else:
        augment = multi_scale
    cfg.train_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="RandomFlip", prob=0.5),
        augment,
        dict(type="PackDetInputs"),
    ]
    cfg.test_pipeline = [
        dict(type="LoadImageFromFile", backend_args=None),
        dict(type="Resize", scale=(max_size, int(config["test_scale"])), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True, with_mask=True),
        dict(type="PackDetInputs", meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]
    metainfo = dict(classes=tuple(classes))
    batch_size = int(config["batch_size"])
    train = cfg.train_dataloader
    train.batch_size = per_gpu_batch(batch_size, world_size, "detection")
    train.dataset.update(data_root=str(data_root), metainfo=metainfo, pipeline=cfg.train_pipeline)
    set_dataloader_workers(train, config["num_workers"])
    test = cfg.test_dataloader
    test.dataset.update(data_root=str(data_root), metainfo=metainfo, pipeline=cfg.test_pipeline)
    set_dataloader_workers(test, config["num_workers"])
    cfg.val_dataloader = test.copy()
    evaluator = dict(type="EvidenceCocoMetric", ann_file=str(data_root / "annotations" / "instances_val2017.json"),
                     metric=["bbox", "segm"], format_only=False, backend_args=None)
    cfg.val_evaluator = evaluator
    cfg.test_evaluator = dict(evaluator)

    # -- schedule and optimizer ---------------------------------------------------------------------------
    epochs = int(config["epochs"])
    cfg.train_cfg.max_epochs = epochs
    cfg.train_cfg.val_interval = epochs
    cfg.param_scheduler = [
        dict(type="LinearLR", start_factor=float(config["warmup_ratio"]), by_epoch=False, begin=0,
             end=int(config["warmup_iters"])),
        dict(type="MultiStepLR", begin=0, end=epochs, by_epoch=True, milestones=[int(m) for m in config["lr_steps"]],
             gamma=0.1),
    ]
    cfg.optim_wrapper.optimizer.update(lr=float(config["lr"]), weight_decay=float(config["weight_decay"]))
    cfg.optim_wrapper.paramwise_cfg = dict(
        layer_decay_rate=float(config["layer_decay"]), num_layers=None)
    cfg.auto_scale_lr = dict(enable=False, base_batch_size=batch_size)
    cfg.default_hooks.checkpoint.interval = int(config["checkpoint_interval"])

    configure_runtime(cfg, stage="detection", work_dir=Path(work_dir), seed=seed, amp=bool(config["amp"]),
                      log_interval=int(config["log_interval"]), val_interval=int(config["val_interval"]),
                      world_size=world_size)
    return cfg


#: Our metric -> mmdet CocoMetric's key (its values are fractions; ours percent).
COCO_METRICS = {"bbox_AP": "coco/bbox_mAP", "bbox_AP50": "coco/bbox_mAP_50", "bbox_AP75": "coco/bbox_mAP_75",
                "segm_AP": "coco/segm_mAP", "segm_AP50": "coco/segm_mAP_50", "segm_AP75": "coco/segm_mAP_75"}
#: CocoMetric's evaluation order (``metric=["bbox", "segm"]`` in :func:`build_config`).
COCO_TASKS = ("bbox", "segm")
#: The official 1x schedule (bytedance/ibot evaluation/README.md:75-76 ``lr_config.step=8,11
#: runner.max_epochs=12``; _base_/schedules/schedule_1x.py:10-11) and input scales
#: (configs/cascade_rcnn/vit_small_giou_4conv1f_coco_3x.py:112-135; test 1333x800).
OFFICIAL_SCHEDULE = {"epochs": 12, "lr_steps": [8, 11]}
OFFICIAL_SCALES = {"train_scales": list(range(480, 801, 32)), "max_size": 1333, "test_scale": 800, "crop_aug": True,
                   "crop_resize_scales": [400, 500, 600], "crop_size": [384, 600]}


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its resolved config: ``cascade-mask-rcnn,1x`` for the official schedule
    and scales, else e.g. ``cascade-mask-rcnn,2ep,steps=2,scales=96-128/128`` (never "1x" for a
    shortened schedule: the results join the paper's numbers only to the paper's protocol)."""
    epochs, steps = int(config["epochs"]), [int(s) for s in config["lr_steps"]]
    if {"epochs": epochs, "lr_steps": steps} == OFFICIAL_SCHEDULE:
        label = "cascade-mask-rcnn,1x"
    else:
        label = f"cascade-mask-rcnn,{epochs}ep,steps={'/'.join(map(str, steps)) or 'none'}"
    scales = {"train_scales": [int(s) for s in config["train_scales"]], "max_size": int(config["max_size"]),
              "test_scale": int(config["test_scale"]), "crop_aug": bool(config["crop_aug"]),
              "crop_resize_scales": [int(s) for s in config["crop_resize_scales"]],
              "crop_size": [int(s) for s in config["crop_size"]]}
    if scales != OFFICIAL_SCALES:
        train = scales["train_scales"]
        label += (f",scales={min(train)}-{max(train)}/{scales['test_scale']}"
                  f"{'' if scales['crop_aug'] else ',no-crop-aug'}")
    return label


def coco_metrics(raw: Mapping[str, Any]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Our metrics (percent) from CocoMetric's results, and why any of them is null.

    mmdet 3.3's CocoMetric evaluates the tasks in order and, when the predictions of a task over the
    whole val set are empty (``loadRes`` raises ``IndexError``), logs "The testing results of the
    whole dataset is empty." and stops (``break``; mmdet/evaluation/metrics/coco_metric.py:462-467):
    that task and the later ones have no entry.
    Their metrics are null with that reason, not 0 (pycocotools has no AP without detections).
    COCOeval's -1 (nothing to average, e.g. no ground truth) is null too. Any other gap (a task
    partly reported, a task missing before a reported one) is an error.
    """
    present = [any(k.startswith(f"coco/{task}_") for k in raw) for task in COCO_TASKS]
    if any(not p and later for i, p in enumerate(present) for later in present[i + 1:]):
        raise RuntimeError(f"detection: CocoMetric skipped a task but evaluated a later one (got {sorted(raw)})")
    metrics: dict[str, float | None] = {}
    reasons: dict[str, str] = {}
    for name, key in COCO_METRICS.items():
        task = key.removeprefix("coco/").split("_")[0]
        if not present[COCO_TASKS.index(task)]:
            metrics[name] = None
            reasons[name] = (f"mmdet CocoMetric produced no {key}: the {task} predictions on the whole val set "
                             "were empty (no detection above the score threshold), so COCO AP is undefined")
        elif key not in raw:
            raise RuntimeError(f"detection: CocoMetric reported {task} metrics without {key} (got {sorted(raw)})")
        elif float(raw[key]) < 0:
            metrics[name] = None
            reasons[name] = f"COCOeval returned {raw[key]} for {key}: nothing to evaluate (no ground truth)"
        else:
            metrics[name] = 100.0 * float(raw[key])
    return metrics, reasons


#: Bootstrap resamples of the val images: pycocotools' ``accumulate`` is pure Python (about 2 ms per
#: category and task on a CPU core), so 200 resamples keep the embedded run's added time near a second.
DETECTION_RESAMPLES = 200
#: Detections per image of the prior detector: COCO's usual ``maxDets`` (and the config's ``max_per_img``).
PRIOR_DETECTIONS = 100


def detection_evidence(metric: Any, metrics: Mapping[str, float | None], train_annotations: str | Path,
                       resamples: int = DETECTION_RESAMPLES, seed: int = 0
                       ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(intervals, baselines)`` of the reported APs from the ``COCOeval`` objects an
    :class:`downstream.dense.evidence.EvidenceCocoMetric` evaluated (none: nothing, e.g. off the main process).

    Interval: percentile bootstrap over the val images of the very evaluation that gave the value.
    Baseline: a detector that learned only what the training annotations say without looking at an
    image: :data:`PRIOR_DETECTIONS` boxes per val image with the training class frequencies and
    (relative) box sizes, placed uniformly, random scores, each box also its mask
    (:func:`downstream.dense.evidence.prior_detections`), scored by the same COCOeval settings. More
    informative than the 0 of an empty prediction: on large, few-class objects (the embedded set) chance
    overlaps alone reach a visible AP50.
    """
    from downstream.dense.evidence import coco_baseline, coco_bootstrap, prior_detections

    intervals: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    evaluated = getattr(metric, "evaluated", None) or {}
    detections = None
    for task, coco_eval in evaluated.items():
        names = {f"{task}_{stat}": stat for stat in ("AP", "AP50", "AP75")}
        if detections is None:
            detections = prior_detections(coco_eval.cocoGt, train_annotations, coco_eval.params.catIds,
                                          PRIOR_DETECTIONS, seed)
        chance = coco_baseline(coco_eval, detections)
        drawn = coco_bootstrap(coco_eval, resamples, seed) if len(coco_eval.params.imgIds) > 1 else {}
        for name, stat in names.items():
            if metrics.get(name) is None:
                continue
            if stat in drawn:
                intervals[name] = drawn[stat]
            if chance[stat] >= 0:
                baselines[name] = baseline(chance[stat], f"random boxes from the training class and box-size "
                                                         f"priors ({PRIOR_DETECTIONS}/image)")
    return intervals, baselines


def run(ctx: StageContext) -> dict[str, float | None]:
    """Train and test in mmdet (resuming from ``work/``), write metrics.json."""
    cfg = build_config(ctx.config, ctx.model, ctx.checkpoint, ctx.data_root, ctx.work.path, ctx.seed)
    enable_tensorboard(cfg, ctx.tb_dir)
    raw, evaluators = train_and_test(cfg)
    missing = sorted(v for v in COCO_METRICS.values() if v not in raw)
    metrics, null_reasons = coco_metrics(raw)
    intervals, baselines = {}, {}
    train, started = cfg.train_dataloader.dataset, time.time()
    for metric in evaluators:
        found = detection_evidence(metric, metrics, Path(train.data_root) / train.ann_file)
        intervals.update(found[0])
        baselines.update(found[1])
    print(f"[detection] intervals and baselines of {len(intervals)} metrics in {time.time() - started:.1f} s",
          flush=True)
    ctx.write_metrics(task="detection", dataset="coco", protocol=protocol_label(ctx.config), metrics=metrics,
                      null_reasons=null_reasons, intervals=intervals, baselines=baselines,
                      extra={"toolbox_metrics": raw, "missing_toolbox_metrics": missing, "work_dir": str(ctx.work.path),
                             "num_classes": cfg.model.roi_head.mask_head.num_classes,
                             "layer_decay": cfg.optim_wrapper.paramwise_cfg.layer_decay_rate,
                             "drop_path": cfg.model.backbone.drop_path_rate,
                             "batch_size": cfg.auto_scale_lr.base_batch_size,
                             "out_indices": resolved_out_indices(cfg.model.backbone)})
    return metrics
