"""Robustness evaluations of a frozen backbone + its linear-probe head (iBOT Tab. 8).

One stage per benchmark, each ``python -m downstream <stage> --head linear/head.pth ...``:

- ``imagenet_c``: ImageNet-C top-1 per corruption x severity; unnormalised mean error over the
  19 corruptions (the paper's number) and AlexNet-normalised mCE over the 15 standard ones;
- ``imagenet_a`` / ``imagenet_r`` (:mod:`.class_subset`): top-1 with logits restricted to the dataset's
  class subset;
- ``bg_challenge``: ImageNet-9 background variants (1000-way argmax mapped to 9 super-classes);
- ``occlusion``: salient / non-salient / random patch drop curves and patch shuffle on ImageNet val.

Shared machinery (head loading, datasets, eval loop, metrics) is in :mod:`.common`.
"""
