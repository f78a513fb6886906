"""Transfer learning by fine-tuning on smaller datasets (iBOT Tab. 7), one stage per dataset.

``python -m downstream.transfer.<dataset> --data <root> --out .../transfer_<dataset>/metrics.json``
for ``cifar10``, ``cifar100``, ``inat18``, ``inat19``, ``flowers`` and ``cars``: each a registry stage
(``transfer_<dataset>``, its own DAG job) configured by the ``transfer.<dataset>`` sub-section of
``workflow/schemas/transfer.schema.yaml`` and reading the dataset kind of the same name.

Why one module per dataset: a stage's module is what the rule runs and what carries its ``DEFAULTS``
(the registry contract), and the datasets' recipes differ (lr, epochs, random erasing). These modules
stay light (no torch at import: the CLI only submits the job); the recipe, shared by all, is in
:mod:`downstream.transfer.common`, the dataset readers in :mod:`ibot.data.transfer_sets`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from downstream.cli import stage_main
from ibot.data.kinds import DATASET_KINDS
from ibot.stages import get_stage, stage_defaults

__all__ = ["stage_cli", "dataset_stage"]


def stage_cli(stage: str, argv: Sequence[str] | None = None) -> Any:
    """The command line of transfer stage ``stage`` (runs ``downstream.transfer.<dataset>:run`` in the job)."""
    kind = get_stage(stage).subsection
    return stage_main(stage, f"downstream.transfer.{kind}:run", stage_defaults(stage), argv,
                      description=f"Fine-tuning transfer to {DATASET_KINDS[str(kind)].title} "
                                  "(iBOT Tab. 7, DeiT recipe of evaluation/eval_cls.py).")


def dataset_stage(stage: str) -> tuple[dict[str, Any], Callable[..., dict[str, float]], Callable[..., Any]]:
    """``(DEFAULTS, run, main)`` of the per-dataset module of transfer stage ``stage`` (the six modules
    differ only in their stage name)."""

    def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
            checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int) -> dict[str, float]:
        from downstream.transfer.common import run_transfer  # torch is imported in the job only
        return run_transfer(stage, config, model_spec, checkpoint, checkpoint_key, data, out, run, model, seed)

    def main(argv: Sequence[str] | None = None) -> Any:
        return stage_cli(stage, argv)

    return stage_defaults(stage), run, main
