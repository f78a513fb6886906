"""``python -m ibot.train``: run iBOT pretraining through the common submitit launcher.

Example (embedded data, local process)::

    python -m ibot.train --config config/pretrain.yaml --arch vit_small --data /data/imagenet/train \
        --out-dir results/myrun/vit_small/pretrain --resources '{"cluster": "slurm", "nodes": 2, "gpus_per_node": 8, "tasks_per_node": 8}'

Outputs in ``--out-dir``: ``teacher_backbone.pth`` (released-weights layout), ``summary.json``,
``train_log.csv``; the resumable state lives in ``--out-dir/work`` (rerun the same command to resume).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from ibot.config import deep_merge, mapping_arg
from ibot.run.launcher import launch
from ibot.stages import stage_defaults

#: This process only launches the job: torch is imported by the job itself (see downstream/__main__.py).
DEFAULTS = stage_defaults("pretrain")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m ibot.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=mapping_arg, default={}, help="pretrain flags (JSON or .yaml/.json file)")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None)
    parser.add_argument("--window-size", type=int, default=None, help="Swin attention window (swin_* archs)")
    parser.add_argument("--data", required=True, help="ImageFolder root of the training images (e.g. imagenet/train)")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--resources", type=mapping_arg, default={"cluster": "local"})
    parser.add_argument("--run", default="standalone")
    parser.add_argument("--model", default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not Path(args.data).is_dir():
        parser.error(f"--data {args.data}: not a directory (expected an ImageFolder root: <class>/<image>)")
    kwargs = dict(config=deep_merge(DEFAULTS, args.config, path="pretrain"),
                  model_spec={"arch": args.arch, "patch_size": args.patch_size, "depth": args.depth,
                              **({"window_size": args.window_size} if args.window_size is not None else {})},
                  data=args.data, out_dir=args.out_dir, run=args.run, model=args.model or args.arch, seed=args.seed)
    return launch("ibot.train.pretrain:run", kwargs, job_dir=Path(args.out_dir) / "job", resources=args.resources,
                  name=f"pretrain-{kwargs['model']}")


if __name__ == "__main__":
    main()
