"""``python -m downstream <stage>``: the one command line of every stage, generated from the registry.

    python -m downstream --list
    python -m downstream knn --data /datasets/imagenet --out out/knn/metrics.json --checkpoint W.pth
    python -m downstream pretrain --data imagenet=/datasets/imagenet/train --out out/pretrain/metrics.json \
        --arch vit_small --config '{"epochs": 100}' --resources '{"cluster": "slurm", "nodes": 2, ...}'

Each stage's options come from its registry entry (:mod:`ibot.stages`): the dataset kinds ``--data``
takes, the files of other stages it needs (``--head`` for the robustness stages), whether it reads a
backbone checkpoint. ``--config`` is resolved once here (the stage's schema defaults under it,
:func:`ibot.config.resolve_stage_config`; the Snakemake rules pass the config the workflow resolved),
the :class:`ibot.run.context.StageContext` is built and the launcher runs the stage through submitit
(``--resources``: a local process, SLURM tasks, or ``debug`` in this process). This process never
imports torch: the job does (DINOv2 keeps its ``run/`` launchers light the same way).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

from ibot.config import ConfigError, mapping_arg, resolve_stage_config
from ibot.models.specs import ModelSpec
from ibot.run.context import StageContext
from ibot.stages import STAGES, Stage

__all__ = ["build_parser", "context_from_args", "main"]


def _add_stage_parser(sub: Any, stage: Stage) -> None:
    kinds = ", ".join(stage.datasets)
    parser = sub.add_parser(stage.name, help=stage.description, description=f"{stage.name}: {stage.description}.")
    parser.add_argument("--data", action="append", required=True, metavar="[KIND=]PATH",
                        help=f"root of a dataset it reads in its real on-disk layout ({kinds}); a bare path is the "
                             f"{stage.datasets[0]} one")
    parser.add_argument("--out", required=True, type=Path, help="metrics.json to write (other outputs go beside it)")
    parser.add_argument("--config", type=mapping_arg, default={},
                        help=f"{stage.config_path} settings over the schema defaults: JSON object or .json/.yaml file")
    parser.add_argument("--resources", type=mapping_arg, default={"cluster": "local"},
                        help="launcher resources (cluster local|slurm|debug, nodes, gpus_per_node, timeout_min, ...)")
    ModelSpec.add_arguments(parser)
    if not stage.exports_backbone:
        parser.add_argument("--checkpoint", type=Path, default=None,
                            help="backbone weights (our export, official iBOT/DINO file); omit for random init")
        parser.add_argument("--checkpoint-key", default=None, help="top-level key of the weights (auto if omitted)")
    for flag, (other, name) in stage.needs.items():
        parser.add_argument(f"--{flag}", type=Path, required=True, help=f"{name} written by the {other} stage")
    parser.add_argument("--run", default="standalone", help="run name recorded in the metrics file")
    parser.add_argument("--model", default=None, help="model name recorded in the metrics file (default: arch)")
    parser.add_argument("--seed", type=int, default=0)
    if stage.resumable:
        parser.add_argument("--fresh", action="store_true",
                            help="recompute from scratch: move its work/ aside even if it matches (never deleted)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m downstream", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for stage in STAGES.values():
        _add_stage_parser(sub, stage)
    return parser


def _data_roots(stage: Stage, values: Sequence[str]) -> dict[str, Path]:
    """``--data [KIND=]PATH`` values by dataset kind; every root must exist (checked before any job)."""
    roots: dict[str, Path] = {}
    for value in values:
        kind, sep, path = value.partition("=")
        if not sep or kind not in stage.datasets:
            kind, path = stage.datasets[0], value
        if kind in roots:
            raise ConfigError(f"--data: two roots for {kind}")
        if not Path(path).exists():
            raise ConfigError(f"--data {value}: {path} does not exist (the {kind} dataset in its real layout)")
        roots[kind] = Path(path)
    return roots


def context_from_args(args: argparse.Namespace) -> StageContext:
    """The stage context of a parsed command line (config resolved, data roots checked)."""
    import uuid

    from ibot.checkpoint import BackboneCheckpoint
    from ibot.workdir import fresh_request

    stage = STAGES[args.stage]
    fresh = uuid.uuid4().hex if getattr(args, "fresh", False) else fresh_request(stage.name)
    checkpoint = getattr(args, "checkpoint", None)
    return StageContext(
        stage=stage.name, config=resolve_stage_config(stage.name, args.config), model=ModelSpec.from_args(args),
        out=args.out, data=_data_roots(stage, args.data),
        checkpoint=BackboneCheckpoint(checkpoint, args.checkpoint_key) if checkpoint else None,
        inputs={flag: getattr(args, flag) for flag in stage.needs}, run=args.run, model_name=args.model or "",
        seed=args.seed, fresh=fresh if stage.resumable else None)


def main(argv: Sequence[str] | None = None) -> Any:
    """Parse, build the context, run the stage through the launcher; returns the stage's result."""
    from ibot.run.launcher import launch

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] == "--list":
        print("stages (python -m downstream STAGE --help):")
        for name, stage in STAGES.items():
            print(f"  {name:<20} {stage.description}")
        return None
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        ctx = context_from_args(args)
    except ValueError as error:  # ConfigError, or a malformed fresh request
        parser.exit(2, f"python -m downstream {args.stage}: error: {error}\n")
    return launch("ibot.run.context:run_stage", {"ctx": ctx}, job_dir=ctx.dir / "job", resources=args.resources,
                  name=f"{ctx.stage}-{ctx.name}")
