"""Importing this module registers everything the dense configs name (``custom_imports``):
the backbone ``IBOTViTDense`` (mmdet and mmseg MODELS), the head ``IBOTLinearSegHead`` (mmseg
MODELS), ``IBOTLayerDecayOptimWrapperConstructor`` (mmengine OPTIM_WRAPPER_CONSTRUCTORS) and the
metrics ``EvidenceCocoMetric`` / ``EvidenceIoUMetric`` (mmdet / mmseg METRICS)."""

from __future__ import annotations

from downstream.dense import layer_decay  # noqa: F401  (registers the optimizer constructor)
from downstream.dense.backbone import IBOTViTDense, register as _register_backbone


def register_all() -> None:
    from downstream.dense.evidence import register as register_metrics

    _register_backbone()
    register_metrics()
    from mmseg.registry import MODELS as MMSEG_MODELS

    from downstream.dense.linear_head import IBOTLinearSegHead
    if MMSEG_MODELS.get("IBOTLinearSegHead") is not IBOTLinearSegHead:
        MMSEG_MODELS.register_module(name="IBOTLinearSegHead", module=IBOTLinearSegHead, force=True)


register_all()

__all__ = ["IBOTViTDense", "register_all"]
