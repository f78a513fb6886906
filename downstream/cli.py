"""The command line shared by every evaluation stage.

``python -m downstream.<stage> --checkpoint CKPT --data DIR --out .../metrics.json [...]``
parses the common arguments, merges the stage's config over its defaults and runs the stage's
entry function through the common submitit launcher (``--cluster local|slurm|debug``).
Snakemake rules call exactly this command, so a stage runs the same with or without Snakemake.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ibot.config import deep_merge, mapping_arg
from ibot.run.launcher import launch
from ibot.stages import STAGES

__all__ = ["stage_main"]


def build_parser(stage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m downstream.{stage}", description=description)
    parser.add_argument("--checkpoint", default=None,
                        help="backbone weights (our export, official iBOT/DINO file); omit for random init")
    parser.add_argument("--checkpoint-key", default=None, help="top-level key holding the weights (auto if omitted)")
    parser.add_argument("--arch", default="vit_small", help="backbone architecture (vit_tiny/small/base/large)")
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--depth", type=int, default=None, help="override the block count (embedded models)")
    parser.add_argument("--window-size", type=int, default=None, help="Swin attention window (swin_* archs)")
    parser.add_argument("--data", required=True, help="dataset root in its real on-disk layout")
    parser.add_argument("--out", required=True, help="metrics.json to write (other outputs go beside it)")
    parser.add_argument("--config", type=mapping_arg, default={}, help="stage config: JSON object or .json/.yaml file")
    parser.add_argument("--resources", type=mapping_arg, default={"cluster": "local"},
                        help="launcher resources (cluster, gpus_per_node, timeout_min, partition, ...)")
    parser.add_argument("--run", default="standalone", help="run name recorded in the metrics file")
    parser.add_argument("--model", default=None, help="model name recorded in the metrics file (default: arch)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def stage_main(stage: str, entry: str, defaults: Mapping[str, Any], argv: Sequence[str] | None = None,
               description: str = "", extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> Any:
    """Parse the common CLI, then run ``entry(**kwargs)`` through the launcher; returns its result.

    The entry receives: ``config`` (defaults ⊕ --config), ``model_spec``, ``checkpoint``,
    ``checkpoint_key``, ``data``, ``out``, ``run``, ``model``, ``seed``, one argument per file the
    registry says the stage needs from other stages (``--head`` for the robustness stages) and any
    extra arguments.
    """
    parser = build_parser(stage, description)
    for flag, (other, name) in getattr(STAGES.get(stage), "needs", {}).items():  # registry: files of other stages
        parser.add_argument(f"--{flag}", required=True, help=f"{name} written by the {other} stage")
    if extra_arguments:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    common = {"checkpoint", "checkpoint_key", "arch", "patch_size", "depth", "window_size", "data", "out", "config",
              "resources", "run", "model", "seed"}
    kwargs = dict(
        config=deep_merge(defaults, args.config, path=stage),
        # window_size only when set: ViT specs (and so their work-dir fingerprints) stay as they were
        model_spec={"arch": args.arch, "patch_size": args.patch_size, "depth": args.depth,
                    **({"window_size": args.window_size} if args.window_size is not None else {})},
        checkpoint=args.checkpoint, checkpoint_key=args.checkpoint_key, data=args.data, out=args.out,
        run=args.run, model=args.model or args.arch, seed=args.seed,
        **{k: v for k, v in vars(args).items() if k not in common},
    )
    out = Path(args.out)
    return launch(entry, kwargs, job_dir=out.parent / "job", resources=args.resources,
                  name=f"{stage}-{kwargs['model']}")
