"""Stanford Cars transfer (iBOT Tab. 7): ``python -m downstream.transfer.cars``, stage ``transfer_cars``.

The recipe is :mod:`downstream.transfer.common` (official evaluation/eval_cls.py); its values are the
``transfer.cars`` sub-section of workflow/schemas/transfer.schema.yaml.
"""

from __future__ import annotations

from downstream.transfer import dataset_stage

__all__ = ["STAGE", "DEFAULTS", "run", "main"]

STAGE = "transfer_cars"
#: Official ViT-S/16 recipe: workflow/schemas/transfer.schema.yaml (cars), the one source.
DEFAULTS, run, main = dataset_stage(STAGE)

if __name__ == "__main__":
    main()
