"""Linear semantic-segmentation head over frozen ViT features (mmseg decode head).

Official iBOT ``configs/linear/*``: the patch tokens of blocks [3, 5, 7, 11] (after the final
norm, ``out_with_norm=true``), all at stride 16, are concatenated (``resize_concat``) and
classified per token by one 1×1 conv: mmseg's ``FCNHead(num_convs=0, concat_input=False,
dropout_ratio=0)``. ``IBOTLinearSegHead`` is exactly that, plus an optional BatchNorm before the
classifier (``with_bn=True``; off in the official protocol, on in e.g. DINOv2's linear head).
"""

from __future__ import annotations

from mmseg.models.decode_heads.decode_head import BaseDecodeHead
from torch import Tensor, nn

__all__ = ["IBOTLinearSegHead"]


class IBOTLinearSegHead(BaseDecodeHead):
    def __init__(self, with_bn: bool = False, **kwargs) -> None:
        kwargs.setdefault("input_transform", "resize_concat")
        kwargs.setdefault("dropout_ratio", 0.0)
        super().__init__(**kwargs)
        if self.in_channels != self.channels:
            raise ValueError(f"IBOTLinearSegHead: channels ({self.channels}) must equal the concatenated "
                             f"input channels ({self.in_channels})")
        self.with_bn = bool(with_bn)
        norm = (self.norm_cfg or {}).get("type", "BN")
        self.bn = (nn.SyncBatchNorm(self.channels) if norm == "SyncBN" else nn.BatchNorm2d(self.channels)) \
            if self.with_bn else nn.Identity()

    def forward(self, inputs: list[Tensor]) -> Tensor:
        return self.cls_seg(self.bn(self._transform_inputs(inputs)))
