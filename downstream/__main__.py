"""``python -m downstream <stage> [--data ... --out ...]``: run any evaluation stage of the registry.

The same command line as ``python -m downstream.<module>`` (:mod:`downstream.cli`), but this process
never imports torch: the stage's code (torch, timm, mmdet, ...) is imported only by the job the
launcher starts (a local subprocess or a SLURM task). Importing it here too cost each Snakemake job a
second ~4 s torch import on the critical path (DINOv2 keeps its ``run/`` launchers light the same way).

    python -m downstream knn --checkpoint W.pth --data /path/to/imagenet --out results/x/knn/metrics.json
    python -m downstream --list
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from downstream.cli import stage_main
from ibot.stages import STAGES, stage_defaults

__all__ = ["main"]


def _evaluation_stages() -> list[str]:
    return [name for name in STAGES if name != "pretrain"]


def main(argv: Sequence[str] | None = None) -> Any:
    argv = list(sys.argv[1:] if argv is None else argv)
    names = _evaluation_stages()
    if not argv or argv[0] in ("-h", "--help", "--list"):
        print(__doc__.strip().splitlines()[0] + "\n\nstages:")
        for name in names:
            print(f"  {name:<18} {STAGES[name].description}")
        return None
    stage = argv[0]
    if stage not in names:
        raise SystemExit(f"python -m downstream: unknown stage {stage!r}; one of: {', '.join(names)}")
    spec = STAGES[stage]
    return stage_main(stage, f"{spec.module}:run", stage_defaults(stage), argv[1:], description=spec.description)


if __name__ == "__main__":
    main()
