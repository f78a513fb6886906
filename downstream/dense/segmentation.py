"""ADE20K semantic segmentation with mmseg: UperNet (+ auxiliary FCN head) on our ViT with the
multi-scale adaptor, or a linear head on the frozen ViT; evaluated with mmseg's IoUMetric.

``python -m downstream seg_upernet --data <ADEChallengeData2016> --out .../seg_upernet/metrics.json`` (or
``seg_linear``: the two stages share the ``segmentation`` section, each fixes its ``head``). mmseg's work
dir is the stage's ``work/``; a requeued job resumes from its last checkpoint. Live TensorBoard curves
in ``<out dir>/tb/``.

Classes: ``<data>/classes.txt`` (one name per line, line i = label i, 0 = ignore: the embedded
set) gives the class list; without it the dataset is the real ADE20K (150 classes, mmseg's
``ADE20KDataset``). Labels are read with ``reduce_zero_label=True`` either way.

Reported (percent): ``mIoU, mAcc`` (and ``aAcc`` in extra), each with its percentile-bootstrap interval
over the val images and the score of the training set's majority class predicted at every pixel
(:func:`segmentation_evidence`; aAcc's in ``extra["aAcc_evidence"]``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from downstream.dense.common import (CONFIG_DIR, configure_runtime, enable_tensorboard, env_world_size, norm_cfg,
                                     per_gpu_batch, resolved_out_indices, set_dataloader_workers, train_and_test)
from ibot.checkpoint import BackboneCheckpoint
from ibot.models.specs import ModelSpec
from ibot.run.context import StageContext
from ibot.uncertainty import baseline

__all__ = ["HEADS", "build_config", "protocol_label", "segmentation_evidence", "run"]

HEADS = {"upernet": CONFIG_DIR / "upernet_vit_ade20k.py", "linear": CONFIG_DIR / "linear_vit_ade20k.py"}
ADE20K_NUM_CLASSES = 150


def read_classes(data_root: Path) -> list[str] | None:
    path = data_root / "classes.txt"
    if not path.is_file():
        return None
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"segmentation: {path} lists no classes")
    return names


def build_config(config: Mapping[str, Any], model_spec: ModelSpec | Mapping[str, Any],
                 checkpoint: BackboneCheckpoint | None, data: str | Path, work_dir: str | Path, seed: int = 0,
                 world_size: int | None = None):
    """The mmengine Config of this run: the head's base config file with the project config applied."""
    from mmengine.config import Config

    from ibot.models.vision_transformer import ARCHITECTURES

    head = config["head"]
    if head not in HEADS:
        raise ValueError(f"segmentation.head: {head!r} is not one of {sorted(HEADS)}")
    world_size = world_size or env_world_size()
    model_spec = ModelSpec.of(model_spec)
    arch = model_spec.arch
    if arch not in ARCHITECTURES:
        raise ValueError(f"segmentation: unknown arch {arch!r}")
    embed_dim = ARCHITECTURES[arch].embed_dim
    data_root = Path(data)
    sub = config[head]
    norm = norm_cfg(world_size)
    cfg = Config.fromfile(str(HEADS[head]))

    # -- backbone -------------------------------------------------------------------------------
    backbone = cfg.model.backbone
    backbone.update(arch=arch, patch_size=model_spec.patch_size, depth=model_spec.depth,
                    out_indices=sub["out_indices"], final_norm=bool(sub["final_norm"]),
                    pretrained=str(checkpoint.path) if checkpoint else None,
                    checkpoint_key=checkpoint.key if checkpoint else None)
    if head == "upernet":
        backbone.update(drop_path_rate=float(sub["drop_path"]), norm_cfg=norm)

    # -- classes ----------------------------------------------------------------------------------
    classes = read_classes(data_root)
    if classes is not None:
        num_classes = len(classes)
        if config["num_classes"] not in (None, num_classes):
            raise ValueError(f"segmentation.num_classes: {config['num_classes']}, but {data_root}/classes.txt "
                             f"lists {num_classes} classes")
    else:
        num_classes = int(config["num_classes"] or ADE20K_NUM_CLASSES)

    # -- heads ------------------------------------------------------------------------------------
    decode = cfg.model.decode_head
    decode.update(num_classes=num_classes, norm_cfg=norm)
    if head == "upernet":
        decode.update(in_channels=[embed_dim] * 4, channels=int(sub["channels"] or embed_dim))
        aux = cfg.model.auxiliary_head
        aux.update(in_channels=embed_dim, num_classes=num_classes, norm_cfg=norm)
        aux.loss_decode.loss_weight = float(sub["aux_loss_weight"])
    else:
        levels = len(resolved_out_indices(backbone))
        decode.update(in_channels=[embed_dim] * levels, in_index=list(range(levels)),
                      channels=embed_dim * levels, with_bn=bool(sub["with_bn"]))
    crop = (int(config["crop_size"]), int(config["crop_size"]))
    stride = (int(config["slide_stride"]), int(config["slide_stride"]))
    cfg.model.test_cfg = dict(mode="slide", crop_size=crop, stride=stride)
    cfg.model.data_preprocessor.size = crop

    # -- data ---------------------------------------------------------------------------------------
    scale = tuple(int(s) for s in config["scale"])
    cfg.train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset
        dict(type="RandomResize", scale=scale, ratio_range=tuple(config["ratio_range"]), keep_ratio=True),
        dict(type="RandomCrop", crop_size=crop, cat_max_ratio=float(config["cat_max_ratio"])),
        dict(type="RandomFlip", prob=0.5),
        dict(type="PhotoMetricDistortion"),
        dict(type="PackSegInputs"),
    ]
    cfg.test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="LoadAnnotations"),  # reduce_zero_label comes from the dataset
        dict(type="PackSegInputs"),
    ]
    if classes is not None:  # a custom class list: label values as stored (BaseSegDataset never remaps)
        dataset = dict(type="BaseSegDataset", img_suffix=".jpg", seg_map_suffix=".png",
                       metainfo=dict(classes=tuple(classes)))
    else:
        dataset = dict(type="ADE20KDataset")
    total_batch = int(config["batch_size"])
    train = cfg.train_dataloader
    train.batch_size = per_gpu_batch(total_batch, world_size, "segmentation")
    train.dataset.update(data_root=str(data_root), pipeline=cfg.train_pipeline, reduce_zero_label=True, **dataset)
    set_dataloader_workers(train, config["num_workers"])
    test = cfg.test_dataloader
    test.dataset.update(data_root=str(data_root), pipeline=cfg.test_pipeline, reduce_zero_label=True, **dataset)
    set_dataloader_workers(test, config["num_workers"])
    cfg.val_dataloader = test.copy()
    cfg.val_evaluator = dict(type="IoUMetric", iou_metrics=["mIoU"])
    cfg.test_evaluator = dict(type="EvidenceIoUMetric", iou_metrics=["mIoU"])  # IoUMetric keeping per-image areas

    # -- schedule and optimizer ---------------------------------------------------------------------------
    iters, warmup = int(config["iters"]), int(config["warmup_iters"])
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=iters, val_interval=iters)
    schedulers = []
    if warmup > 0:
        schedulers.append(dict(type="LinearLR", start_factor=float(config["warmup_ratio"]), by_epoch=False,
                               begin=0, end=min(warmup, iters)))
    if iters > warmup:
        schedulers.append(dict(type="PolyLR", eta_min=float(config["min_lr"]), power=float(config["poly_power"]),
                               begin=warmup, end=iters, by_epoch=False))
    cfg.param_scheduler = schedulers
    if head == "upernet":
        lr = float(sub["lr"])
        cfg.optim_wrapper.paramwise_cfg = dict(
            layer_decay_rate=float(sub["layer_decay"]), num_layers=None)
    else:
        lr = float(sub["lr"])
    cfg.optim_wrapper.optimizer.update(lr=lr, weight_decay=float(config["weight_decay"]))
    cfg.default_hooks.checkpoint.interval = int(config["checkpoint_interval"])

    configure_runtime(cfg, stage=f"seg_{head}", work_dir=Path(work_dir), seed=seed, amp=bool(config["amp"]),
                      log_interval=int(config["log_interval"]), val_interval=int(config["val_interval"]),
                      world_size=world_size)
    return cfg


#: The official schedule length and crop (bytedance/ibot semantic_segmentation configs:
#: _base_/schedules/schedule_160k.py:7 ``max_iters=160000``; upernet/vit_small_512_ade20k_160k.py:20
#: ``crop_size = (512, 512)``; the linear configs share both).
OFFICIAL_ITERS, OFFICIAL_CROP = 160000, 512


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its resolved config: ``upernet,160k`` / ``linear,160k`` for the official
    schedule and crop, else e.g. ``upernet,12it,crop=64`` (never "160k" for a shortened schedule: the
    results join the paper's numbers only to the paper's protocol)."""
    iters, crop = int(config["iters"]), int(config["crop_size"])
    label = f"{config['head']},{'160k' if iters == OFFICIAL_ITERS else f'{iters}it'}"
    return label if crop == OFFICIAL_CROP else f"{label},crop={crop}"


#: Bootstrap resamples of the val images (a resample sums per-image class areas: milliseconds).
SEGMENTATION_RESAMPLES = 1000


def segmentation_evidence(metric: Any, train_seg_maps: Sequence[str | Path], reduce_zero_label: bool,
                          resamples: int = SEGMENTATION_RESAMPLES, seed: int = 0
                          ) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(intervals, baselines)`` of aAcc, mIoU, mAcc from the per-image areas an
    :class:`downstream.dense.evidence.EvidenceIoUMetric` kept (none: nothing, e.g. off the main process).

    Interval: percentile bootstrap over the val images (summed areas, mmseg's formulas). Baseline: the
    most frequent class of the training label maps (read as the dataset reads them) predicted at every
    evaluated val pixel, scored by the same formulas: the model that learned only the class prior.
    Training rather than val labels, so the baseline knows nothing of the images it is scored on.
    """
    from downstream.dense.evidence import constant_prediction_areas, iou_bootstrap, iou_summary, label_counts

    areas = getattr(metric, "areas", None)
    if areas is None:
        return {}, {}
    intervals = iou_bootstrap(metric, resamples, seed) if len(areas) > 1 else {}
    counts = label_counts(train_seg_maps, areas.shape[-1], reduce_zero_label)
    if not counts.any():
        raise ValueError(f"segmentation: the {len(train_seg_maps)} training label maps hold no labelled pixel")
    majority = int(np.argmax(counts))
    name = metric.dataset_meta["classes"][majority]
    constant = iou_summary(constant_prediction_areas(areas[:, 3], majority), metric)
    baselines = {key: baseline(value, f"majority training class ({name!r}) at every pixel")
                 for key, value in constant.items()}
    return intervals, baselines


def run(ctx: StageContext) -> dict[str, float]:
    """Train and test in mmseg (resuming from ``work/``), write metrics.json."""
    cfg = build_config(ctx.config, ctx.model, ctx.checkpoint, ctx.data_root, ctx.work.path, ctx.seed)
    enable_tensorboard(cfg, ctx.tb_dir)
    raw, evaluators = train_and_test(cfg)
    missing = [k for k in ("mIoU", "mAcc") if k not in raw]
    if missing:
        raise RuntimeError(f"segmentation: IoUMetric returned no {missing} (got {sorted(raw)})")
    metrics = {"mIoU": raw["mIoU"], "mAcc": raw["mAcc"]}  # IoUMetric reports percent
    train, started = cfg.train_dataloader.dataset, time.time()
    train_maps = sorted((Path(train.data_root) / train.data_prefix["seg_map_path"]).rglob(
        f"*{train.get('seg_map_suffix', '.png')}"))
    intervals, baselines = {}, {}
    for metric in evaluators:
        found = segmentation_evidence(metric, train_maps, bool(train.reduce_zero_label))
        intervals.update(found[0])
        baselines.update(found[1])
    print(f"[seg] intervals and baselines in {time.time() - started:.1f} s", flush=True)
    ctx.write_metrics(task="semantic_seg", dataset="ade20k", protocol=protocol_label(ctx.config), metrics=metrics,
                      intervals={k: v for k, v in intervals.items() if k in metrics},
                      baselines={k: v for k, v in baselines.items() if k in metrics},
                      extra={"toolbox_metrics": raw, "work_dir": str(ctx.work.path),
                             "aAcc_evidence": {"interval": intervals.get("aAcc"), "baseline": baselines.get("aAcc")},
                             "num_classes": cfg.model.decode_head.num_classes,
                             "lr": cfg.optim_wrapper.optimizer.lr,
                             "layer_decay": (cfg.optim_wrapper.get("paramwise_cfg") or {}).get("layer_decay_rate"),
                             "iters": cfg.train_cfg.max_iters,
                             "out_indices": resolved_out_indices(cfg.model.backbone)})
    return metrics
