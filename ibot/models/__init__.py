"""Model definitions shared by pretraining and every downstream stage."""

from ibot.models.vision_transformer import ARCHITECTURES, IBOTVisionTransformer, build_backbone

__all__ = ["ARCHITECTURES", "IBOTVisionTransformer", "build_backbone"]
