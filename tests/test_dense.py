"""Dense stages (mmdet detection, mmseg segmentation): the backbone wrapper registered in both
toolboxes, strict weight loading, layer decay, config building, schemas, tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from downstream.dense import detection, segmentation
from downstream.dense.backbone import IBOTViTDense, default_out_indices
from helpers import run_stage
from ibot.checkpoint import BackboneCheckpoint, CheckpointError, export_backbone
from ibot.config import deep_merge
from ibot.metrics import read_metrics
from ibot.models.layer_decay import vit_layer_id
from ibot.models.vision_transformer import build_backbone
from ibot.stages import section_defaults

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "vit_tiny", "patch_size": 16, "depth": 2}
DETECTION, SEGMENTATION = section_defaults("detection"), section_defaults("segmentation")


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> dict[str, Path]:
    """Small embedded COCO and ADE20K sets in the real layouts (the workflow's own generator)."""
    from ibot.data.embedded import EmbeddedSizes, generate
    sizes = EmbeddedSizes(coco_train=16, coco_val=6, coco_size=64, ade_train=16, ade_val=6, ade_size=64)
    return generate(tmp_path_factory.mktemp("dense_data"), seed=0, sets=["coco", "ade20k"], sizes=sizes)


# -- backbone --------------------------------------------------------------------------------------


def test_default_out_indices_follow_the_official_spacing() -> None:
    # bytedance/ibot: depth 12 -> configs/cascade_rcnn/vit_small_giou_4conv1f_coco_3x.py:33 and
    # semantic_segmentation/configs/upernet/vit_small_512_ade20k_160k.py:34; depth 24 ->
    # semantic_segmentation/configs/upernet/vit_large_512_ade20k_160k.py:34
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(6) == [1, 2, 3, 5]  # ours: the same spacing scaled to depth 6


@pytest.mark.parametrize("patch", [16, 8])
@pytest.mark.parametrize("size", [(64, 64), (96, 128), (100, 75), (33, 47)])
def test_backbone_levels_have_the_fpn_strides(patch: int, size: tuple[int, int]) -> None:
    torch.manual_seed(0)
    model = IBOTViTDense(arch="vit_tiny", patch_size=patch, depth=4).eval()
    height, width = size
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, height, width))
    assert model.out_strides == [4, 8, 16, 32] and len(outputs) == 4
    for stride, out in zip(model.out_strides, outputs):
        assert out.shape[:2] == (2, 192)
        assert tuple(out.shape[-2:]) == (math.ceil(height / stride), math.ceil(width / stride))
        assert torch.isfinite(out).all()


def test_padding_does_not_change_the_valid_region_tokens() -> None:
    """A non-multiple input equals the zero-padded input cropped back (pad right/bottom only)."""
    torch.manual_seed(0)
    model = IBOTViTDense(arch="vit_tiny", patch_size=16, depth=2, with_adaptor=False).eval()
    image = torch.randn(1, 3, 40, 56)
    padded = torch.nn.functional.pad(image, (0, 8, 0, 8))
    with torch.no_grad():
        a, b = model(image)[-1], model(padded)[-1]
    assert torch.allclose(a, b[:, :, :3, :4], atol=1e-5)


def test_final_norm_option_and_unused_norm_is_frozen() -> None:
    torch.manual_seed(0)
    det = IBOTViTDense(arch="vit_tiny", depth=2, final_norm=False)
    seg = IBOTViTDense(arch="vit_tiny", depth=2, final_norm=True)
    seg.load_state_dict(det.state_dict())
    assert not any(p.requires_grad for p in det.vit.norm.parameters())
    assert all(p.requires_grad for p in seg.vit.norm.parameters())
    x = torch.randn(1, 3, 32, 32)
    det.eval(), seg.eval()
    with torch.no_grad():
        raw, normed = det(x)[2], seg(x)[2]  # stride-16 level = identity adaptor
    tokens = raw.flatten(2).transpose(1, 2)
    assert torch.allclose(seg.vit.norm(tokens).transpose(1, 2).reshape_as(raw), normed, atol=1e-5)


def test_linear_variant_is_frozen_and_stays_in_eval() -> None:
    model = IBOTViTDense(arch="vit_tiny", patch_size=16, depth=4, with_adaptor=False, frozen=True,
                         final_norm=True, drop_path_rate=0.1)
    model.train()
    assert not model.vit.training and not any(p.requires_grad for p in model.parameters())
    outputs = model(torch.randn(1, 3, 48, 64))
    assert model.out_strides == [16] * 4 and all(o.shape == (1, 192, 3, 4) for o in outputs)
    assert not any(o.requires_grad for o in outputs)


def test_registered_in_mmdet_and_mmseg() -> None:
    import downstream.dense.registry  # noqa: F401
    from mmdet.registry import MODELS as MMDET
    from mmseg.registry import MODELS as MMSEG
    for registry in (MMDET, MMSEG):
        model = registry.build(dict(type="IBOTViTDense", arch="vit_tiny", depth=2))
        assert isinstance(model, IBOTViTDense)
    head = MMSEG.build(dict(type="IBOTLinearSegHead", in_channels=[8, 8], in_index=[0, 1], channels=16,
                            num_classes=3, with_bn=True))
    logits = head([torch.randn(2, 8, 4, 4), torch.randn(2, 8, 4, 4)])
    assert logits.shape == (2, 3, 4, 4)


# -- weights ----------------------------------------------------------------------------------------


def test_pretrained_weights_load_strictly(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build_backbone("vit_tiny", patch_size=16, depth=2, masked_im_modeling=False)
    path = tmp_path / "teacher_backbone.pth"
    export_backbone(source, path, meta={"arch": "vit_tiny"})
    for kwargs in ({"pretrained": str(path)}, {"init_cfg": {"type": "Pretrained", "checkpoint": str(path)}}):
        model = IBOTViTDense(arch="vit_tiny", depth=2, **kwargs)
        model.init_weights()
        loaded = model.vit.state_dict()
        expected = source.state_dict()
        assert set(loaded) == set(expected)  # no backbone key left at its random init
        for key, value in expected.items():
            assert torch.equal(loaded[key], value), key
    # the official training-checkpoint layout goes through the same loader
    official = tmp_path / "checkpoint.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()}, "epoch": 1}, official)
    model = IBOTViTDense(arch="vit_tiny", depth=2, pretrained=str(official), checkpoint_key="teacher")
    model.init_weights()
    assert torch.equal(model.vit.blocks[1].mlp.fc1.weight, source.blocks[1].mlp.fc1.weight)


@pytest.mark.parametrize("wrong", [dict(arch="vit_small", depth=2), dict(arch="vit_tiny", depth=3)])
def test_wrong_architecture_checkpoint_raises(tmp_path: Path, wrong: dict) -> None:
    path = tmp_path / "w.pth"
    export_backbone(build_backbone(**wrong, masked_im_modeling=False), path, meta={})
    model = IBOTViTDense(arch="vit_tiny", depth=2, pretrained=str(path))
    with pytest.raises(CheckpointError, match="does not match"):
        model.init_weights()


# -- layer decay -----------------------------------------------------------------------------------


class _Detector(nn.Module):
    def __init__(self, depth: int = 4) -> None:
        super().__init__()
        self.backbone = IBOTViTDense(arch="vit_tiny", patch_size=16, depth=depth)
        self.neck = nn.Conv2d(192, 8, 1)


def test_layer_decay_scales_per_block() -> None:
    import downstream.dense.registry  # noqa: F401
    from mmengine.optim import build_optim_wrapper

    depth, decay, lr, wd = 4, 0.75, 1e-3, 0.05
    model = _Detector(depth)
    wrapper = build_optim_wrapper(model, dict(
        optimizer=dict(type="AdamW", lr=lr, weight_decay=wd),
        constructor="IBOTLayerDecayOptimWrapperConstructor", paramwise_cfg=dict(layer_decay_rate=decay)))
    by_param = {id(p): g for g in wrapper.optimizer.param_groups for p in g["params"]}
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    assert {id(named[n]) for n in trainable} == set(by_param)  # every trainable parameter, once
    for name in trainable:
        group = by_param[id(named[name])]
        if name.startswith("backbone.vit.blocks."):
            block = int(name.split(".")[3])
            expected = decay ** (depth - block)
        elif name.startswith(("backbone.vit.cls_token", "backbone.vit.pos_embed", "backbone.vit.patch_embed.")):
            expected = decay ** (depth + 1)
        else:  # adaptor, neck, heads
            expected = 1.0
        assert group["lr"] == pytest.approx(lr * expected), name
        no_decay = named[name].ndim == 1 or name.endswith(".bias") or name.endswith(("pos_embed", "cls_token"))
        assert group["weight_decay"] == (0.0 if no_decay else wd), name
    for name in ("backbone.vit.blocks.3.attn.qkv.weight", "backbone.vit.norm.weight",
                 "roi_head.bbox_head.0.fc_cls.weight", "backbone.adaptor.0.0.weight"):
        assert vit_layer_id(name, depth, prefix="backbone.vit.") == (4 if ".blocks.3." in name else 5), name


# -- config and schema ----------------------------------------------------------------------------------


_DET = "evaluation/object_detection/configs"
_DET_S = f"{_DET}/cascade_rcnn/vit_small_giou_4conv1f_coco_3x.py"
_DET_MODEL = f"{_DET}/_base_/models/cascade_mask_rcnn_vit_fpn.py"
#: bytedance/ibot (commit da316d8) COCO detection as evaluation/README.md:71-87 runs it (``run.sh coco_det ...
#: lr_config.step=8,11 runner.max_epochs=12``), transcribed with the line of each value. The defaults are the
#: ViT-S/16 recipe; other models' values are their recipes' (config/paper/), checked by tests/test_recipes.py.
OFFICIAL_DETECTION = {
    "epochs": (12, "evaluation/README.md:76 runner.max_epochs=12"),
    "lr_steps": ([8, 11], "evaluation/README.md:75 lr_config.step=8,11"),
    "warmup_iters": (500, f"{_DET}/_base_/schedules/schedule_1x.py:8"),
    "warmup_ratio": (0.001, f"{_DET}/_base_/schedules/schedule_1x.py:9"),
    "lr": (1e-4, f"{_DET_S}:148 AdamW lr"),
    "layer_decay": (0.8, "evaluation/README.md:77 (ViT-S/16)"),
    "drop_path": (0.1, f"{_DET_S}:32"),
    "batch_size": (4 * 8, "evaluation/README.md:73-74 samples_per_gpu=4, 8 GPUs (ViT-S/16)"),
    "weight_decay": (0.05, f"{_DET_S}:148 AdamW weight_decay"),
    "train_scales": (list(range(480, 801, 32)), f"{_DET_S}:113-115 (480..800, 1333)"),
    "max_size": (1333, f"{_DET_S}:113-115; {_DET}/_base_/datasets/coco_instance.py:19"),
    "crop_aug": (True, f"{_DET_S}:109-137 AutoAugment policy with the crop"),
    "crop_resize_scales": ([400, 500, 600], f"{_DET_S}:121"),
    "crop_size": ([384, 600], f"{_DET_S}:124-127 absolute_range crop"),
    "test_scale": (800, f"{_DET}/_base_/datasets/coco_instance.py:19 img_scale=(1333, 800)"),
    "final_norm": (False, "object_detection/mmcv_custom/register_backbone.py:46,70-71 out_with_norm=False"),
    "rpn_train_proposals": (2000, f"{_DET_MODEL}:133-135 nms_pre / max_per_img"),
    "rpn_test_proposals": (1000, f"{_DET_MODEL}:194-196 nms_pre / max_per_img"),
    "rcnn_sampler_num": (512, f"{_DET_MODEL}:149,166,183 sampler num"),
    "score_thr": (0.05, f"{_DET_MODEL}:200"),
    "neck_channels": (256, f"{_DET_S}:38 FPN out_channels"),
    "head_conv_channels": (256, f"{_DET_S}:47 conv_out_channels"),
    "head_fc_channels": (1024, f"{_DET_S}:48 fc_out_channels"),
    "amp": (True, f"{_DET_S}:157-164 DistOptimizerHook use_fp16=True"),
    "checkpoint_interval": (1, f"{_DET}/_base_/default_runtime.py:1"),
    "num_workers": (2, f"{_DET}/_base_/datasets/coco_instance.py:32 workers_per_gpu"),
    "log_interval": (50, f"{_DET}/_base_/default_runtime.py:4"),
}
#: Ours without an official value: derived from the data/depth (None), or only when to validate.
DETECTION_OWN_SETTINGS = {"out_indices": None, "num_classes": None, "val_interval": 0}

_SEG = "evaluation/semantic_segmentation/configs"
_SEG_S = f"{_SEG}/upernet/vit_small_512_ade20k_160k.py"
#: ADE20K as evaluation/README.md:89-113 runs it (UperNet; linear head: README.md:99-105).
OFFICIAL_SEGMENTATION = {
    "iters": (160000, f"{_SEG}/_base_/schedules/schedule_160k.py:7"),
    "warmup_iters": (1500, f"{_SEG_S}:60"),
    "warmup_ratio": (1e-6, f"{_SEG_S}:61"),
    "poly_power": (1.0, f"{_SEG_S}:62"),
    "min_lr": (0.0, f"{_SEG_S}:62"),
    "weight_decay": (0.05, f"{_SEG_S}:54; {_SEG}/linear/vit_base_512_ade20k_160k.py:64"),
    "batch_size": (4 * 4, "evaluation/README.md:93-94 (ViT-S: 4 GPUs x 4); :109-110 (ViT-B: 8 x 2)"),
    "crop_size": (512, f"{_SEG_S}:20"),
    "slide_stride": (341, f"{_SEG_S}:45"),
    "scale": ([2048, 512], f"{_SEG}/_base_/datasets/ade20k.py:10"),
    "ratio_range": ([0.5, 2.0], f"{_SEG}/_base_/datasets/ade20k.py:10"),
    "cat_max_ratio": (0.75, f"{_SEG}/_base_/datasets/ade20k.py:11"),
    "amp": (True, f"{_SEG_S}:67-78 IterBasedRunnerAmp, use_fp16=True"),
    "num_workers": (4, f"{_SEG}/_base_/datasets/ade20k.py:36 workers_per_gpu"),
    "log_interval": (50, f"{_SEG}/_base_/default_runtime.py:3"),
    "upernet": {
        "lr": (3e-5, "evaluation/README.md:96 optimizer.lr=3e-5 (ViT-S/16)"),
        "layer_decay": (0.9, f"{_SEG_S}:56"),
        "drop_path": (0.1, f"{_SEG_S}:33"),
        "aux_loss_weight": (0.4, f"{_SEG}/_base_/models/upernet.py:53"),
        "final_norm": (True, "evaluation/README.md:95 model.backbone.out_with_norm=true"),
    },
    "linear": {
        "lr": (3e-5, f"{_SEG}/linear/vit_small_512_ade20k_160k.py:64 (ViT-S/16; no README command)"),
        "final_norm": (False, "semantic_segmentation/mmcv_custom/register_backbone.py:24, :37-38 out_with_norm=False "
                              "(no ViT-S/16 linear command; ViT-B/16's is README.md:103)"),
        "with_bn": (False, f"{_SEG}/linear/vit_base_512_ade20k_160k.py:42-51 FCNHead num_convs=0: no norm layer"),
    },
}
#: Ours without an official value: set by the rule, derived from the data/depth/width (None), or
#: checkpoint/validation frequency (official 64000, schedule_160k.py:8-9; no effect on the result).
SEGMENTATION_OWN_SETTINGS = {"head": "upernet", "num_classes": None, "val_interval": 0, "checkpoint_interval": 16000,
                             "upernet": {"channels": None, "out_indices": None},
                             "linear": {"out_indices": None}}


def _check_official(ours: dict, official: dict, own: dict, where: str) -> None:
    assert set(ours) == set(official) | set(own), where
    for key, value in official.items():
        if isinstance(value, dict):
            _check_official(ours[key], value, own.get(key, {}), f"{where}.{key}")
            continue
        expected, source = value
        assert ours[key] == expected, f"{where}.{key}: ours {ours[key]!r}, official {expected!r} ({source})"
    for key, value in own.items():
        if not isinstance(value, dict):
            assert ours[key] == value, f"{where}.{key}"


def test_detection_defaults_equal_the_official_values() -> None:
    _check_official(DETECTION, OFFICIAL_DETECTION, DETECTION_OWN_SETTINGS, "detection")


def test_segmentation_defaults_equal_the_official_values() -> None:
    _check_official(SEGMENTATION, OFFICIAL_SEGMENTATION, SEGMENTATION_OWN_SETTINGS, "segmentation")


@pytest.mark.parametrize("section", ["detection", "segmentation"])
def test_schema_is_closed(section: str) -> None:
    import jsonschema
    defaults = {"detection": DETECTION, "segmentation": SEGMENTATION}[section]
    schema = yaml.safe_load((ROOT / f"workflow/schemas/{section}.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(defaults, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**defaults, "unknown_key": 1}, schema)


def test_detection_config_applies_the_project_config(dense_data, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    export_backbone(build_backbone("vit_small", depth=2, masked_im_modeling=False), ckpt, meta={})
    cfg = detection.build_config(DETECTION, {"arch": "vit_small", "patch_size": 16, "depth": 2},
                                 BackboneCheckpoint(ckpt), str(dense_data["coco"]), tmp_path / "work", world_size=1)
    classes = [c["name"] for c in json.loads(
        (dense_data["coco"] / "annotations/instances_val2017.json").read_text())["categories"]]
    assert cfg.model.backbone.pretrained == str(ckpt) and cfg.model.backbone.drop_path_rate == 0.1
    assert cfg.model.neck.in_channels == [384] * 4
    assert all(h.num_classes == len(classes) and h.norm_cfg["type"] == "BN" and h.reg_decoded_bbox
               and h.loss_bbox["type"] == "GIoULoss" for h in cfg.model.roi_head.bbox_head)
    assert cfg.model.roi_head.mask_head.num_classes == len(classes)
    assert cfg.train_dataloader.dataset.metainfo["classes"] == tuple(classes)
    assert cfg.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.8  # official ViT-S
    assert cfg.train_dataloader.batch_size == 32 and cfg.launcher == "none" and cfg.resume is True
    assert cfg.param_scheduler[1]["milestones"] == [8, 11] and cfg.train_cfg.max_epochs == 12
    scales = cfg.train_pipeline[3]["transforms"][0][0]["scales"]
    assert [s[1] for s in scales] == list(range(480, 801, 32)) and all(s[0] == 1333 for s in scales)
    vit_b = {"layer_decay": 0.75, "drop_path": 0.2, "batch_size": 16}  # its recipe's (config/paper/vit_base.yaml)
    base = detection.build_config({**DETECTION, **vit_b}, {"arch": "vit_base", "patch_size": 16, "depth": 2},
                                  None, str(dense_data["coco"]), tmp_path / "w2", world_size=2)
    assert base.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.75 and base.model.backbone.drop_path_rate == 0.2
    sync = "SyncBN" if torch.cuda.is_available() else "BN"  # torch's SyncBatchNorm has no CPU kernel
    assert base.train_dataloader.batch_size == 8 and base.model.backbone.norm_cfg["type"] == sync
    assert base.launcher == "pytorch"


def test_segmentation_config_applies_the_project_config(dense_data, tmp_path: Path) -> None:
    ade = dense_data["ade20k"]
    classes = (ade / "classes.txt").read_text().split()
    up = segmentation.build_config(SEGMENTATION, {"arch": "vit_small", "patch_size": 16, "depth": None},
                                   None, str(ade), tmp_path / "work", world_size=1)
    assert up.model.decode_head.type == "UPerHead" and up.model.decode_head.channels == 384
    assert up.model.decode_head.pool_scales == (1, 2, 3, 6)
    assert up.model.auxiliary_head.in_index == 2 and up.model.auxiliary_head.loss_decode.loss_weight == 0.4
    assert up.model.decode_head.num_classes == len(classes) == up.model.auxiliary_head.num_classes
    assert up.train_dataloader.dataset.type == "BaseSegDataset"
    assert up.train_dataloader.dataset.metainfo["classes"] == tuple(classes)
    assert up.train_dataloader.dataset.reduce_zero_label is True
    assert up.optim_wrapper.optimizer.lr == 3e-5 and up.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.9
    assert up.model.test_cfg == dict(mode="slide", crop_size=(512, 512), stride=(341, 341))
    assert up.train_cfg.max_iters == 160000 and up.param_scheduler[0]["end"] == 1500
    assert up.param_scheduler[1]["power"] == 1.0 and up.param_scheduler[1]["eta_min"] == 0.0
    assert up.model.backbone.final_norm is True and up.model.backbone.out_indices is None  # README.md:95
    lin = segmentation.build_config(deep_merge(SEGMENTATION, {"head": "linear", "linear": {"lr": 8e-4}}),
                                    {"arch": "vit_base", "patch_size": 16, "depth": None}, None,
                                    str(ade), tmp_path / "w2", world_size=1)
    assert lin.model.backbone.frozen and not lin.model.backbone.with_adaptor
    assert lin.model.decode_head.channels == 4 * 768 and lin.optim_wrapper.optimizer.lr == 8e-4
    assert "paramwise_cfg" not in lin.optim_wrapper
    (tmp_path / "real").mkdir()  # no classes.txt: the real ADE20K (150 classes, ADE20KDataset)
    real = segmentation.build_config(deep_merge(SEGMENTATION, {"upernet": {"layer_decay": 0.65}}),
                                     {"arch": "vit_base", "patch_size": 16, "depth": None},
                                     None, str(tmp_path / "real"), tmp_path / "w3", world_size=1)
    assert real.train_dataloader.dataset.type == "ADE20KDataset" and real.model.decode_head.num_classes == 150
    assert real.model.decode_head.channels == 768 and real.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.65


# -- protocol labels and null metrics -----------------------------------------------------------------


def test_protocol_labels_say_what_ran() -> None:
    assert detection.protocol_label(DETECTION) == "cascade-mask-rcnn,1x"
    assert detection.protocol_label({**DETECTION, "epochs": 36, "lr_steps": [27, 33]}) == \
        "cascade-mask-rcnn,36ep,steps=27/33"  # the official configs' own 3x schedule is not the paper's 1x
    assert detection.protocol_label({**DETECTION, "lr_steps": [9, 11]}) == "cascade-mask-rcnn,12ep,steps=9/11"
    assert detection.protocol_label({**DETECTION, "test_scale": 640}) == \
        "cascade-mask-rcnn,1x,scales=480-800/640"
    for head in ("upernet", "linear"):
        config = {**SEGMENTATION, "head": head}
        assert segmentation.protocol_label(config) == f"{head},160k"
        assert segmentation.protocol_label({**config, "iters": 80000}) == f"{head},80000it"
        assert segmentation.protocol_label({**config, "crop_size": 640}) == f"{head},160k,crop=640"


def test_coco_metrics_are_null_with_a_reason_when_cocometric_produced_none() -> None:
    full = {f"coco/{task}_mAP{suffix}": 0.25 for task in ("bbox", "segm") for suffix in ("", "_50", "_75")}
    metrics, reasons = detection.coco_metrics(full)
    assert metrics == {name: 25.0 for name in detection.COCO_METRICS} and reasons == {}
    # no detection at all: CocoMetric stops at bbox, nothing is reported (not an AP of 0)
    metrics, reasons = detection.coco_metrics({})
    assert all(v is None for v in metrics.values()) and set(reasons) == set(metrics)
    assert "empty" in reasons["bbox_AP"]
    # COCOeval's -1 (nothing to evaluate) is null too
    metrics, reasons = detection.coco_metrics({**full, "coco/segm_mAP_75": -1.0})
    assert metrics["segm_AP75"] is None and set(reasons) == {"segm_AP75"} and metrics["segm_AP"] == 25.0
    # any other gap is an error, not a number
    with pytest.raises(RuntimeError, match="without coco/bbox_mAP_75"):
        detection.coco_metrics({k: v for k, v in full.items() if k != "coco/bbox_mAP_75"})
    with pytest.raises(RuntimeError, match="skipped a task"):
        detection.coco_metrics({k: v for k, v in full.items() if k.startswith("coco/segm")})


# -- intervals and baselines ------------------------------------------------------------------------------

def _toy_coco(boxes: list[list[float]], size: int = 100) -> Any:
    """A pycocotools ground truth of one category: image i (id i + 1) holds one box ``boxes[i]``."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    gt = COCO()
    gt.dataset = {"images": [{"id": i + 1, "width": size, "height": size} for i in range(len(boxes))],
                  "annotations": [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": box,
                                   "area": box[2] * box[3], "iscrowd": 0} for i, box in enumerate(boxes)],
                  "categories": [{"id": 1, "name": "a"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def _toy_eval(gt: Any, detections: list[dict]) -> Any:
    """COCOeval of ``detections`` as mmdet's CocoMetric sets it up (maxDets 100/300/1000)."""
    import contextlib
    import io

    from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(gt, gt.loadRes(detections), "bbox")
        coco_eval.params.maxDets = [100, 300, 1000]
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def test_detection_interval_resamples_the_val_images() -> None:
    from downstream.dense import evidence
    box = [10.0, 10.0, 40.0, 40.0]
    # image 1 perfectly detected, image 2 missed: AP = 51/101 (recall 0..0.5 at precision 1);
    # resamples of image 1 twice score 100, of image 2 twice 0 (a quarter of them each)
    coco_eval = _toy_eval(_toy_coco([box, box]), [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9}])
    assert evidence.coco_stats(coco_eval) == pytest.approx({k: 100 * coco_eval.stats[i] for k, i in
                                                            evidence.COCO_STATS.items()})
    assert evidence.coco_stats(coco_eval)["AP"] == pytest.approx(100 * 51 / 101)
    resampled = evidence.coco_resampler(coco_eval)
    assert resampled(np.array([0, 1])) == pytest.approx(evidence.coco_stats(coco_eval))  # identity
    assert resampled(np.array([0, 0]))["AP"] == pytest.approx(100.0)
    assert resampled(np.array([1, 1]))["AP"] == 0.0
    drawn = evidence.coco_bootstrap(coco_eval, 200)
    assert {name: (i["low"], i["high"], i["n"]) for name, i in drawn.items()} == {
        name: (0.0, 100.0, 2) for name in ("AP", "AP50", "AP75")}
    # a duplicated image counts twice: the resample [0, 0, 2] is the set of those three images
    boxes = [box, box, [50.0, 50.0, 30.0, 30.0]]
    dets = [{"image_id": 1, "category_id": 1, "bbox": box, "score": 0.9},
            {"image_id": 2, "category_id": 1, "bbox": [55.0, 5.0, 40.0, 40.0], "score": 0.8},
            {"image_id": 3, "category_id": 1, "bbox": [50.0, 50.0, 30.0, 28.0], "score": 0.3}]
    three = _toy_eval(_toy_coco(boxes), dets)
    same = _toy_eval(_toy_coco([box, box, boxes[2]]),
                     [{**dets[0], "image_id": 1}, {**dets[0], "image_id": 2}, {**dets[2], "image_id": 3}])
    assert evidence.coco_resampler(three)(np.array([0, 0, 2])) == pytest.approx(evidence.coco_stats(same))
    assert evidence.coco_stats(same) != pytest.approx(evidence.coco_stats(three))
    interval = evidence.coco_bootstrap(three, 200)["AP"]
    assert interval["low"] <= evidence.coco_stats(three)["AP"] <= interval["high"]
    # 150 detections on image 1, its object found by the 120th: counted by AP50 (1000 detections), not AP (100)
    crowded = [{"image_id": 1, "category_id": 1, "bbox": [60.0, 60.0, 10.0, 10.0], "score": 1.0 - i / 200}
               for i in range(150)]
    crowded[119]["bbox"] = box
    many = _toy_eval(_toy_coco([box, box]), crowded + [{**dets[0], "image_id": 2}])
    expected = {k: 100 * many.stats[i] for k, i in evidence.COCO_STATS.items()}
    assert expected["AP"] < expected["AP50"] and evidence.coco_stats(many) == pytest.approx(expected)
    assert evidence.coco_resampler(many)(np.array([0, 1])) == pytest.approx(expected)


def test_detection_baseline_is_random_boxes_from_the_training_priors(tmp_path: Path) -> None:
    from downstream.dense import evidence
    gt = _toy_coco([[0.0, 0.0, 100.0, 100.0], [0.0, 0.0, 100.0, 100.0]])  # each val object fills its image

    def train_with(relative: float) -> Path:
        path = tmp_path / f"train_{relative}.json"
        path.write_text(json.dumps({
            "images": [{"id": 7, "width": 200, "height": 50}], "categories": [{"id": 1, "name": "a"}],
            "annotations": [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                             "bbox": [0.0, 0.0, 200.0 * relative, 50.0 * relative]}]}))
        return path

    like = _toy_eval(gt, [{"image_id": 1, "category_id": 1, "bbox": [0.0, 0.0, 100.0, 100.0], "score": 0.5}])
    # training boxes fill their image: one random box per image is the whole image, every object found
    whole = evidence.prior_detections(gt, train_with(1.0), [1], per_image=1, seed=0)
    assert [d["bbox"] for d in whole] == [pytest.approx([0.0, 0.0, 100.0, 100.0])] * 2
    assert evidence.coco_baseline(like, whole) == pytest.approx({"AP": 100.0, "AP50": 100.0, "AP75": 100.0})
    # training boxes a tenth of their image's sides: no random box reaches IoU 0.5 with a whole image
    tenth = evidence.prior_detections(gt, train_with(0.1), [1], per_image=100, seed=0)
    assert len(tenth) == 200 and all(d["bbox"][2:] == pytest.approx([10.0, 10.0]) for d in tenth)
    assert evidence.coco_baseline(like, tenth) == {"AP": 0.0, "AP50": 0.0, "AP75": 0.0}
    # and as the stage writes them: every reported AP gets an interval and a baseline
    class Recorded:
        evaluated = {"bbox": like}
    intervals, baselines = detection.detection_evidence(
        Recorded(), {"bbox_AP": 100.0, "bbox_AP50": 100.0, "bbox_AP75": None}, train_with(0.1))
    assert set(intervals) == set(baselines) == {"bbox_AP", "bbox_AP50"}
    assert baselines["bbox_AP"]["value"] == 0.0 and "random boxes" in baselines["bbox_AP"]["kind"]


def _iou_metric(labels: list[np.ndarray], preds: list[np.ndarray], classes: int = 3) -> Any:
    """An EvidenceIoUMetric that evaluated ``preds`` against ``labels`` (255 ignored) through mmseg."""
    from downstream.dense.evidence import EvidenceIoUMetric
    metric = EvidenceIoUMetric(iou_metrics=["mIoU"])
    metric.dataset_meta = {"classes": tuple("abcdefgh"[:classes])}
    for label, pred in zip(labels, preds):
        metric.results.append(metric.intersect_and_union(torch.as_tensor(pred), torch.as_tensor(label), classes, 255))
    return metric


def test_segmentation_interval_and_majority_class_baseline(tmp_path: Path) -> None:
    from PIL import Image

    from downstream.dense import evidence
    # image 1: 6 px of class 0, 2 of class 1; image 2: 2 of class 0, 2 of class 1, 4 of class 2
    labels = [np.array([[0, 0, 0, 0], [0, 0, 1, 1]]), np.array([[0, 0, 1, 1], [2, 2, 2, 2]])]
    # image 1 segmented perfectly, image 2 wholly wrong (class 0 <-> 2, 1 -> 0) and one ignored pixel
    preds = [labels[0].copy(), np.array([[2, 2, 0, 0], [0, 0, 0, 0]])]
    labels[1][0, 0] = 255
    metric = _iou_metric(labels, preds)
    official = metric.compute_metrics(list(metric.results))
    assert evidence.iou_summary(metric.areas, metric) == pytest.approx(
        {k: float(v) for k, v in official.items()}, abs=0.005)  # IoUMetric rounds to 2 decimals
    drawn = evidence.iou_bootstrap(metric, 200)
    assert evidence.iou_summary(metric.areas[[0, 0]], metric)["mIoU"] == 100.0  # class 2 absent: NaN, skipped
    assert drawn["aAcc"]["low"] == 0.0 and drawn["aAcc"]["high"] == 100.0 and drawn["mIoU"]["n"] == 2
    # class 0 predicted everywhere: label areas [7, 4, 4] (1 px ignored) -> IoU [7/15, 0, 0], Acc [1, 0, 0]
    constant = evidence.iou_summary(evidence.constant_prediction_areas(metric.areas[:, 3], 0), metric)
    assert constant == pytest.approx({"aAcc": 100 * 7 / 15, "mIoU": 100 * 7 / 15 / 3, "mAcc": 100 / 3})
    # the same areas as mmseg computes for a constant prediction (ignored pixels left out)
    same = _iou_metric(labels, [np.zeros_like(label) for label in labels])
    same.compute_metrics(list(same.results))
    assert np.array_equal(evidence.constant_prediction_areas(metric.areas[:, 3], 0), same.areas)
    # the stage's baseline: the training maps' majority (label 3 = class 2 once zero is reduced)
    maps = []
    for i, values in enumerate(([3, 3, 3, 1], [0, 0, 0, 3])):
        maps.append(tmp_path / f"train_{i}.png")
        Image.fromarray(np.array([values], dtype=np.uint8)).save(maps[-1])
    assert list(evidence.label_counts(maps, 3, reduce_zero_label=True)) == [1, 0, 4]
    intervals, baselines = segmentation.segmentation_evidence(metric, maps, reduce_zero_label=True, resamples=200)
    assert set(intervals) == set(baselines) == {"aAcc", "mIoU", "mAcc"}
    assert baselines["aAcc"]["value"] == pytest.approx(100 * 4 / 15) and "'c'" in baselines["aAcc"]["kind"]
    assert baselines["mIoU"]["value"] == pytest.approx(100 * 4 / 15 / 3)


# -- end to end (tiny) -------------------------------------------------------------------------------------

TINY_DET = {"epochs": 1, "lr_steps": [1], "warmup_iters": 2, "batch_size": 2, "train_scales": [64], "max_size": 107,
            "crop_aug": False, "test_scale": 64, "rpn_train_proposals": 100, "rpn_test_proposals": 50,
            "rcnn_sampler_num": 32, "score_thr": 0.0, "neck_channels": 32, "head_conv_channels": 32,
            "head_fc_channels": 64, "num_workers": 0, "log_interval": 4}
TINY_SEG = {"iters": 12, "warmup_iters": 3, "batch_size": 2, "crop_size": 64, "slide_stride": 43, "scale": [256, 64],
            "num_workers": 0, "log_interval": 4, "checkpoint_interval": 12}


def _argv(spec: dict, weights: Path, data: Path, out: Path, config: dict) -> list[str]:
    from ibot.models.specs import ModelSpec
    return ["--data", str(data), "--out", str(out), "--checkpoint", str(weights), "--config", json.dumps(config),
            "--run", "run", "--model", "tiny", *ModelSpec.of(spec).cli_args()]


def _weights(tmp_path: Path, patch: int = 16) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "teacher_backbone.pth"
    export_backbone(build_backbone("vit_tiny", patch_size=patch, depth=2, masked_im_modeling=False), path, meta={})
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_detection_end_to_end(dense_data, tmp_path: Path) -> None:
    out = tmp_path / "results/run/tiny/detection/metrics.json"
    weights = _weights(tmp_path)
    metrics = run_stage("detection", _argv(TINY, weights, dense_data["coco"], out, TINY_DET))
    record = read_metrics(out)
    assert record["stage"] == "detection" and record["task"] == "detection"
    assert set(record["metrics"]) == {"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"}
    assert record["metrics"] == pytest.approx(metrics)
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in metrics.values())
    assert record["protocol"] == "cascade-mask-rcnn,1ep,steps=1,scales=64-64/64,no-crop-aug"
    raw = record["extra"]["toolbox_metrics"]  # computed by mmdet's CocoMetric (not defaulted)
    assert "coco/bbox_mAP" in raw and "coco/segm_mAP" in raw and record["extra"]["missing_toolbox_metrics"] == []
    # every AP with its bootstrap interval over the 6 val images and the random-box baseline
    assert set(record["intervals"]) == set(record["baselines"]) == set(metrics)
    for name, interval in record["intervals"].items():
        assert 0.0 <= interval["low"] <= interval["high"] <= 100.0 and interval["n"] == 6, (name, interval)
        assert 0.0 <= record["baselines"][name]["value"] <= 100.0
    assert "random boxes" in record["baselines"]["segm_AP"]["kind"]
    assert record["checkpoint"]["path"] == str(weights)
    assert (out.parent / "work" / "last_checkpoint").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_tiny_segmentation_end_to_end_and_resume(dense_data, tmp_path: Path, head: str) -> None:
    out = tmp_path / f"results/run/tiny/seg_{head}/metrics.json"
    argv = _argv({**TINY, "patch_size": 8}, _weights(tmp_path, patch=8), dense_data["ade20k"], out, TINY_SEG)
    metrics = run_stage(f"seg_{head}", argv)
    record = read_metrics(out)
    assert record["stage"] == f"seg_{head}" and record["task"] == "semantic_seg"
    assert record["protocol"] == f"{head},12it,crop=64"  # what ran, not the paper's 160k
    assert set(record["metrics"]) == {"mIoU", "mAcc"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in metrics.values())
    assert "aAcc" in record["extra"]["toolbox_metrics"]  # mmseg's IoUMetric
    # bootstrap intervals over the 6 val images, the majority training class as baseline
    assert set(record["intervals"]) == set(record["baselines"]) == {"mIoU", "mAcc"}
    for name, interval in record["intervals"].items():
        assert 0.0 <= interval["low"] <= interval["high"] <= 100.0 and interval["n"] == 6, (name, interval)
        assert "majority training class" in record["baselines"][name]["kind"]
    assert record["extra"]["aAcc_evidence"]["interval"]["n"] == 6
    # a requeued job resumes from work/last_checkpoint: nothing left to train, same numbers
    work = out.parent / "work"
    assert (work / "iter_12.pth").is_file()
    again = run_stage(f"seg_{head}", argv)
    assert again == pytest.approx(metrics, abs=0.02)
