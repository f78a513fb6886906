"""Model definitions shared by pretraining and every downstream stage."""

from ibot.models.vision_transformer import ARCHITECTURES, IBOTSwinTransformer, IBOTVisionTransformer, build_backbone

__all__ = ["ARCHITECTURES", "IBOTSwinTransformer", "IBOTVisionTransformer", "build_backbone"]
