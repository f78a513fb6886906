"""Pretraining data: multi-crop augmentation, block-wise masking and datasets."""
