"""Model definitions shared by pretraining and every downstream stage.

The names are imported lazily: ``ibot.models.specs`` (the torch-free architecture registry) must be
importable without torch (the Snakefile validates configs with it).
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["ARCHITECTURES", "IBOTSwinTransformer", "IBOTVisionTransformer", "build_backbone"]
_HOME = {"ARCHITECTURES": "ibot.models.specs", "IBOTSwinTransformer": "ibot.models.swin_transformer",
         "IBOTVisionTransformer": "ibot.models.vision_transformer", "build_backbone": "ibot.models.vision_transformer"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(_HOME[name]), name)
    raise AttributeError(f"module 'ibot.models' has no attribute {name!r}")
