"""``python -m ibot.train``: iBOT pretraining, i.e. ``python -m downstream pretrain`` (:mod:`ibot.run.cli`).

    python -m ibot.train --data imagenet=/data/imagenet/train --out results/myrun/vit_small/pretrain/metrics.json \
        --arch vit_small --resources '{"cluster": "slurm", "nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8}'

Outputs beside ``--out``: ``teacher_backbone.pth``, ``student_backbone.pth`` (released-weights layout), ``heads.pth``,
``train_log.csv`` and ``metrics.json``; the resumable state lives in ``work/`` (rerun the same command
to resume).
"""

from __future__ import annotations

import sys
from typing import Any, Sequence

from ibot.run.cli import main as stage_main


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main(["pretrain", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
