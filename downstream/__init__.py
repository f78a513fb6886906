"""Downstream evaluations of pretrained backbones (classification, dense, robustness)."""
