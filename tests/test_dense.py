"""Dense stages (mmdet detection, mmseg segmentation): the backbone wrapper registered in both
toolboxes, strict weight loading, layer decay, config building, schemas, tiny end-to-end runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("mmdet")
pytest.importorskip("mmseg")

from downstream.dense import detection, segmentation  # noqa: E402
from downstream.dense.backbone import IBOTViTDense, default_out_indices  # noqa: E402
from downstream.dense.layer_decay import layer_id  # noqa: E402
from ibot.checkpoint import CheckpointError, export_backbone  # noqa: E402
from ibot.config import deep_merge  # noqa: E402
from ibot.metrics import read_metrics  # noqa: E402
from ibot.models.vision_transformer import build_backbone  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = {"arch": "vit_tiny", "patch_size": 16, "depth": 2}


@pytest.fixture(scope="module")
def dense_data(tmp_path_factory) -> dict[str, Path]:
    """Small embedded COCO and ADE20K sets in the real layouts (the workflow's own generator)."""
    from ibot.data.embedded import EmbeddedSizes, generate
    sizes = EmbeddedSizes(coco_train=16, coco_val=6, coco_size=64, ade_train=16, ade_val=6, ade_size=64)
    return generate(tmp_path_factory.mktemp("dense_data"), seed=0, sets=["coco", "ade20k"], sizes=sizes)


# -- backbone --------------------------------------------------------------------------------------


def test_default_out_indices_follow_the_official_spacing() -> None:
    assert default_out_indices(12) == [3, 5, 7, 11]
    assert default_out_indices(24) == [7, 11, 15, 23]
    assert default_out_indices(6) == [1, 2, 3, 5]


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
    assert layer_id("backbone.vit.blocks.3.attn.qkv.weight", 4) == 4
    assert layer_id("backbone.vit.norm.weight", 4) == 5
    assert layer_id("roi_head.bbox_head.0.fc_cls.weight", 4) == 5
    assert layer_id("backbone.adaptor.0.0.weight", 4) == 5


# -- config and schema ----------------------------------------------------------------------------------


def _schema_defaults(schema: dict) -> dict:
    out = {}
    for key, sub in schema["properties"].items():
        out[key] = _schema_defaults(sub) if sub.get("type") == "object" and "properties" in sub else sub["default"]
    return out


@pytest.mark.parametrize("module,section", [(detection, "detection"), (segmentation, "segmentation")])
def test_schema_defaults_equal_module_defaults(module, section: str) -> None:
    import jsonschema
    schema = yaml.safe_load((ROOT / f"workflow/schemas/{section}.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    assert _schema_defaults(schema) == module.DEFAULTS
    jsonschema.validate(module.DEFAULTS, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**module.DEFAULTS, "unknown_key": 1}, schema)


def test_detection_config_applies_the_project_config(dense_data, tmp_path: Path) -> None:
    ckpt = tmp_path / "w.pth"
    export_backbone(build_backbone("vit_small", depth=2, masked_im_modeling=False), ckpt, meta={})
    cfg = detection.build_config(detection.DEFAULTS, {"arch": "vit_small", "patch_size": 16, "depth": 2}, str(ckpt),
                                 None, str(dense_data["coco"]), tmp_path / "work", world_size=1)
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
    base = detection.build_config(detection.DEFAULTS, {"arch": "vit_base", "patch_size": 16, "depth": 2}, None, None,
                                  str(dense_data["coco"]), tmp_path / "w2", world_size=2)
    assert base.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.75 and base.model.backbone.drop_path_rate == 0.2
    sync = "SyncBN" if torch.cuda.is_available() else "BN"  # torch's SyncBatchNorm has no CPU kernel
    assert base.train_dataloader.batch_size == 8 and base.model.backbone.norm_cfg["type"] == sync
    assert base.launcher == "pytorch"


def test_segmentation_config_applies_the_project_config(dense_data, tmp_path: Path) -> None:
    ade = dense_data["ade20k"]
    classes = (ade / "classes.txt").read_text().split()
    up = segmentation.build_config(segmentation.DEFAULTS, {"arch": "vit_small", "patch_size": 16, "depth": None},
                                   None, None, str(ade), tmp_path / "work", world_size=1)
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
    assert up.model.backbone.final_norm is True and up.model.backbone.out_indices is None
    lin = segmentation.build_config(deep_merge(segmentation.DEFAULTS, {"head": "linear"}),
                                    {"arch": "vit_base", "patch_size": 16, "depth": None}, None, None,
                                    str(ade), tmp_path / "w2", world_size=1)
    assert lin.model.backbone.frozen and not lin.model.backbone.with_adaptor
    assert lin.model.decode_head.channels == 4 * 768 and lin.optim_wrapper.optimizer.lr == 8e-4
    assert "paramwise_cfg" not in lin.optim_wrapper
    (tmp_path / "real").mkdir()  # no classes.txt: the real ADE20K (150 classes, ADE20KDataset)
    real = segmentation.build_config(segmentation.DEFAULTS, {"arch": "vit_base", "patch_size": 16, "depth": None},
                                     None, None, str(tmp_path / "real"), tmp_path / "w3", world_size=1)
    assert real.train_dataloader.dataset.type == "ADE20KDataset" and real.model.decode_head.num_classes == 150
    assert real.model.decode_head.channels == 768 and real.optim_wrapper.paramwise_cfg.layer_decay_rate == 0.65


# -- end to end (tiny) -------------------------------------------------------------------------------------

TINY_DET = {"epochs": 1, "lr_steps": [1], "warmup_iters": 2, "batch_size": 2, "train_scales": [64], "max_size": 107,
            "crop_aug": False, "test_scale": 64, "rpn_train_proposals": 100, "rpn_test_proposals": 50,
            "rcnn_sampler_num": 32, "score_thr": 0.0, "neck_channels": 32, "head_conv_channels": 32,
            "head_fc_channels": 64, "num_workers": 0, "log_interval": 4}
TINY_SEG = {"iters": 12, "warmup_iters": 3, "batch_size": 2, "crop_size": 64, "slide_stride": 43, "scale": [256, 64],
            "num_workers": 0, "log_interval": 4, "checkpoint_interval": 12}


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
    metrics = detection.run(deep_merge(detection.DEFAULTS, TINY_DET), TINY, str(weights), None,
                            str(dense_data["coco"]), str(out), "run", "tiny", 0)
    record = read_metrics(out)
    assert record["stage"] == "detection" and record["task"] == "detection"
    assert set(record["metrics"]) == {"bbox_AP", "bbox_AP50", "bbox_AP75", "segm_AP", "segm_AP50", "segm_AP75"}
    assert record["metrics"] == pytest.approx(metrics)
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in metrics.values())
    raw = record["extra"]["toolbox_metrics"]  # computed by mmdet's CocoMetric (not defaulted)
    assert "coco/bbox_mAP" in raw and "coco/segm_mAP" in raw and record["extra"]["missing_toolbox_metrics"] == []
    assert record["checkpoint"]["path"] == str(weights)
    assert (out.parent / "work" / "last_checkpoint").is_file()


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("head", ["upernet", "linear"])
def test_tiny_segmentation_end_to_end_and_resume(dense_data, tmp_path: Path, head: str) -> None:
    out = tmp_path / f"results/run/tiny/seg_{head}/metrics.json"
    config = deep_merge(segmentation.DEFAULTS, {**TINY_SEG, "head": head})
    spec = {**TINY, "patch_size": 8}
    weights = _weights(tmp_path, patch=8)
    metrics = segmentation.run(config, spec, str(weights), None, str(dense_data["ade20k"]), str(out), "run", "tiny", 0)
    record = read_metrics(out)
    assert record["stage"] == f"seg_{head}" and record["task"] == "semantic_seg"
    assert record["protocol"] == f"{head}-160k"
    assert set(record["metrics"]) == {"mIoU", "mAcc"}
    assert all(math.isfinite(v) and 0.0 <= v <= 100.0 for v in metrics.values())
    assert "aAcc" in record["extra"]["toolbox_metrics"]  # mmseg's IoUMetric
    # a requeued job resumes from work/last_checkpoint: nothing left to train, same numbers
    work = out.parent / "work"
    assert (work / "iter_12.pth").is_file()
    again = segmentation.run(config, spec, str(weights), None, str(dense_data["ade20k"]), str(out), "run", "tiny", 0)
    assert again == pytest.approx(metrics, abs=0.02)
