"""CIFAR-100 transfer (iBOT Tab. 7): ``python -m downstream.transfer.cifar100``, stage ``transfer_cifar100``.

The recipe is :mod:`downstream.transfer.common` (official evaluation/eval_cls.py); its values are the
``transfer.cifar100`` sub-section of workflow/schemas/transfer.schema.yaml.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from downstream.transfer import stage_cli
from ibot.stages import stage_defaults

__all__ = ["STAGE", "DEFAULTS", "run", "main"]

STAGE = "transfer_cifar100"
#: Official ViT-S/16 recipe: workflow/schemas/transfer.schema.yaml (cifar100), the one source.
DEFAULTS: dict[str, Any] = stage_defaults(STAGE)


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int) -> dict[str, float]:
    from downstream.transfer.common import run_transfer  # torch is imported in the job only
    return run_transfer(STAGE, config, model_spec, checkpoint, checkpoint_key, data, out, run, model, seed)


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_cli(STAGE, argv)


if __name__ == "__main__":
    main()
