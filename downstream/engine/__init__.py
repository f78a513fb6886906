"""The shared engine of the evaluations (the way DINOv2 keeps ``eval/setup.py``, ``eval/utils.py`` and
``eval/metrics.py``): stages import it and never each other.

- :mod:`~downstream.engine.setup`: device, precision, seeding, logging, the evaluated backbone;
- :mod:`~downstream.engine.data`: the official transforms, ImageFolder datasets, DDP-aware loaders;
- :mod:`~downstream.engine.features`: feature extraction gathered across processes, the k-NN and
  linear-probe features;
- :mod:`~downstream.engine.metrics`: exact top-k under DDP padding, classification evaluation, the
  weighted k-NN classifier;
- :mod:`~downstream.engine.linear`: the linear-probe sweep (one pass, many learning rates), its
  saved head and the classifier the robustness stages load;
- :mod:`~downstream.engine.finetune`: the one fine-tuning loop (model, AdamW groups with layer decay,
  timm schedulers, mixup/cutmix, AMP, accumulation, resume, live curves), used by fine-tuning,
  transfer learning and semi-supervised fine-tuning;
- :mod:`~downstream.engine.fp16_master`: the official ``--enable_deepspeed`` fp16 engine (fp16 model,
  fp32 master weights, dynamic loss scale) behind ``finetune.precision: deepspeed_fp16``.
"""
