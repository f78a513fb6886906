"""CIFAR-10 transfer (iBOT Tab. 7): ``python -m downstream.transfer.cifar10``, stage ``transfer_cifar10``.

The recipe is :mod:`downstream.transfer.common` (official evaluation/eval_cls.py); its values are the
``transfer.cifar10`` sub-section of workflow/schemas/transfer.schema.yaml.
"""

from __future__ import annotations

from downstream.transfer import dataset_stage

__all__ = ["STAGE", "DEFAULTS", "run", "main"]

STAGE = "transfer_cifar10"
#: Official ViT-S/16 recipe: workflow/schemas/transfer.schema.yaml (cifar10), the one source.
DEFAULTS, run, main = dataset_stage(STAGE)

if __name__ == "__main__":
    main()
