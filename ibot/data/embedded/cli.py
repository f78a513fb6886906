"""``python -m ibot.data.embedded --out DIR --seed 0 [--sets a,b] [--workers 2] [--size image_size=32 ...]``.

Prints ``{set: root}`` as JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from ibot.data.embedded.base import EmbeddedSizes
from ibot.data.embedded.sets import SETS, generate

__all__ = ["main"]


def _parse_size(item: str) -> tuple[str, int]:
    key, sep, value = item.partition("=")
    if not sep or key not in {f.name for f in dataclasses.fields(EmbeddedSizes)}:
        raise argparse.ArgumentTypeError(f"expected FIELD=INT with FIELD in EmbeddedSizes, got {item!r}")
    return key, int(value)


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; prints {set: root} as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m ibot.data.embedded",
        description="Deterministic generator of small synthetic datasets in the REAL on-disk formats.",
    )
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated subset of {','.join(SETS)}")
    parser.add_argument("--workers", type=int, default=1, help="processes (output does not depend on it)")
    parser.add_argument(
        "--size",
        type=_parse_size,
        action="append",
        default=[],
        metavar="FIELD=INT",
        help="override an EmbeddedSizes field",
    )
    args = parser.parse_args(argv)
    sizes = EmbeddedSizes(**dict(args.size))
    roots = generate(args.out, args.seed, [s for s in args.sets.split(",") if s], sizes, workers=args.workers)
    json.dump({k: str(v) for k, v in roots.items()}, sys.stdout, indent=2)
    print()
    return 0
