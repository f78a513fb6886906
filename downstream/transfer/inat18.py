"""iNaturalist 2018 transfer (iBOT Tab. 7): ``python -m downstream.transfer.inat18``, stage ``transfer_inat18``.

The recipe is :mod:`downstream.transfer.common` (official evaluation/eval_cls.py); its values are the
``transfer.inat18`` sub-section of workflow/schemas/transfer.schema.yaml.
"""

from __future__ import annotations

from downstream.transfer import dataset_stage

__all__ = ["STAGE", "DEFAULTS", "run", "main"]

STAGE = "transfer_inat18"
#: Official ViT-S/16 recipe: workflow/schemas/transfer.schema.yaml (inat18), the one source.
DEFAULTS, run, main = dataset_stage(STAGE)

if __name__ == "__main__":
    main()
