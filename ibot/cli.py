"""``ibot``: the one command for what a user does around the workflow (the console script of pyproject.toml).

Snakemake runs the DAG (``snakemake``, no flags: ``profiles/default``); ``ibot`` inspects, costs, compares,
shares and exports. Each subcommand is the same code as its ``python -m`` form, which keeps working:
``explain`` is ``python -m ibot.config explain``, ``export`` is :mod:`ibot.models.hub`, the others are
``python -m ibot.results <command>`` (:mod:`ibot.results.cli`). The stage command line stays
``python -m downstream <stage>``.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["build_parser", "main", "RESULTS_COMMANDS"]

#: The ``python -m ibot.results`` commands a user runs by hand (the others are steps of the workflow's rules).
RESULTS_COMMANDS = ("coverage", "plan", "evidence", "compare", "tables", "ablations", "dvc-track", "dvc-push", "dvc-pull")

_DESCRIPTION = ("iBOT reproduction: explain, cost, check coverage, compare, tabulate, share and export what the "
                "Snakemake workflow runs (the workflow itself: `snakemake`).")
_EPILOG = """examples:
  snakemake                                              # the embedded main job (profiles/default)
  ibot explain --model vit_tiny --stage linear           # what a stage runs with, value by value
  ibot plan --configfile config/paper.yaml               # GPU-hours of the paper before launching
  ibot coverage --configfile config/released.yaml        # paper numbers reproduced from released weights
  ibot coverage --configfile config/ablations.yaml       # the paper's 154 ablation numbers: planned, waiting, why not
  ibot compare embedded --paper                          # a finished run next to the paper
  ibot evidence --run-dir results/embedded --model vit_tiny --random-model vit_tiny_random
  ibot export results/embedded/vit_tiny/pretrain/teacher_backbone.pth --arch vit_tiny --depth 6 --out hub/
  ibot dvc-track --push                                  # version and share the pretrained checkpoints

'ibot COMMAND --help' says what a command does, with an example."""


def build_parser() -> argparse.ArgumentParser:
    from ibot.config import EXPLAIN_EXAMPLE, EXPLAIN_HELP, add_explain_arguments
    from ibot.models.hub import EXPORT_EXAMPLE, EXPORT_HELP, add_export_arguments
    from ibot.results.cli import add_commands

    parser = argparse.ArgumentParser(prog="ibot", description=_DESCRIPTION,
                                     epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, text, example, add_arguments in (("explain", EXPLAIN_HELP, EXPLAIN_EXAMPLE, add_explain_arguments),
                                               ("export", EXPORT_HELP, EXPORT_EXAMPLE, add_export_arguments)):
        p = sub.add_parser(name, help=text, description=f"{text}.", epilog=f"example:\n  {example}",
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_arguments(p)
    add_commands(sub, RESULTS_COMMANDS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from ibot.results.cli import run_command, split_passthrough

    own, smk = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    args = parser.parse_args(own)
    command = sub_parser(parser, args.command)
    if args.command in RESULTS_COMMANDS:
        run_command(args, smk)
        return 0
    if smk:
        parser.error(f"'{args.command}' takes no arguments after --")
    if args.command == "explain":
        from ibot.config import explain_command

        return explain_command(args, command)
    from ibot.models.hub import export_command

    return export_command(args, command)


def sub_parser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    """The parser of subcommand ``name`` (its errors then name the subcommand)."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices[name]


if __name__ == "__main__":
    raise SystemExit(main())
