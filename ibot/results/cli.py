"""``python -m ibot.results <command>`` — results of the iBOT reproduction (the user-facing commands are
also subcommands of the ``ibot`` console script, :mod:`ibot.cli`).

The commands, each with an example: ``python -m ibot.results --help``, ``... <command> --help``.
Arguments after ``--`` (dvc-*) are passed to Snakemake, e.g. ``-- --configfile config/paper.yaml``.
``--remote NAME`` (dvc-*) picks a DVC remote other than the default; S3 credentials come from the AWS
environment variables or profile, checked before any transfer (see :mod:`ibot.results.dvc_tools`).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ibot.models.specs import ModelSpec
from ibot.stages import BACKBONE_STAGE



def _summary(args) -> None:
    from ibot.results.aggregate import (build_summary, find_metrics_files, load_metric_map, load_models_info,
                                        load_paper_protocols, load_reference, write_summary)

    files = [Path(f) for f in args.metrics] if args.metrics else find_metrics_files(args.run_dir) if args.run_dir else []
    info = load_models_info(args.config, args.models_json)
    summary = build_summary(files, info, reference=load_reference(args.reference),
                            metric_map=load_metric_map(args.mapping),
                            paper_protocols=load_paper_protocols(args.paper_protocols), default_seed=args.seed)
    write_summary(summary, args.out, args.flat)
    with_paper = int(summary["paper_value"].notna().sum())
    off = int((summary["paper_protocol"].notna() & ~summary["is_paper_protocol"]).sum())
    print(f"[results] {len(files)} metrics files -> {len(summary)} rows ({with_paper} with a paper value; {off} "
          f"with a paper experiment but another protocol/dataset, no paper value): {args.out}")


def _tables(args) -> None:
    from ibot.results.aggregate import aggregate, load_metric_map, load_reference, read_summaries
    from ibot.results.tables import write_tables

    agg = aggregate(read_summaries(args.summary))
    paths = write_tables(agg, args.out_dir, reference=load_reference(args.reference),
                         metric_map=load_metric_map(args.mapping), formats=args.formats)
    print(f"[results] {len(paths)} table files in {args.out_dir}")


def _ablations(args) -> None:
    from ibot.results.aggregate import load_models_info
    from ibot.results.ablations import write_ablation_tables

    models = json.dumps(load_models_info(args.config, args.models_json))
    written = write_ablation_tables(args.summary, models, args.out_dir, args.run)
    print(f"[results] ablation tables: {written}")
    if args.readme:
        from ibot.io import write_text_atomic
        from ibot.results.readme import replace_block

        body = written.read_text().split("\n", 2)[2]  # without the title line
        write_text_atomic(args.readme, replace_block(Path(args.readme).read_text(), args.block, body))


def _ablations_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--summary", required=True, help="the run's summary.csv")
    p.add_argument("--config", default=None, help="workflow config (models: their ablation settings)")
    p.add_argument("--models-json", default=None, help="models info as the summary rule passes it")
    p.add_argument("--out-dir", required=True, help="writes ablations.md and ablations.csv here")
    p.add_argument("--run", default="")
    p.add_argument("--readme", default=None, help="also fill this file's <!-- BLOCK:start/end --> block with them")
    p.add_argument("--block", default="ablations-embedded", help="the README block (default: ablations-embedded)")


def _plots(args) -> None:
    import pandas as pd

    from ibot.results.aggregate import aggregate, read_summaries
    from ibot.results.plots import make_plots

    agg = aggregate(read_summaries(args.summary)) if args.summary else aggregate(pd.DataFrame())
    paths = make_plots(args.run_dir, agg, args.out_dir, models=args.models, curves_dir=args.curves_dir)
    print(f"[results] {len(paths)} figures in {args.out_dir}")


def _attention(args) -> None:
    from ibot.results.attention import attention_figure, find_images

    images = find_images(args.images, args.num_images)
    attention_figure(ModelSpec.from_args(args), args.checkpoint, images, args.out, checkpoint_key=args.checkpoint_key,
                     img_size=args.img_size, title=args.title)
    print(f"[results] attention maps of {len(images)} images: {args.out}")


def _compare(args) -> None:
    from ibot.results.aggregate import load_models_info
    from ibot.results.compare import compare_paper, compare_runs, format_comparison, load_side

    info = load_models_info(args.config, args.models_json) or None
    a = load_side(args.run_a, args.results_dir, info)
    if args.paper or args.run_b is None:
        frame = compare_paper(a, by=args.by)
    else:
        frame = compare_runs(a, load_side(args.run_b, args.results_dir, info), by=args.by,
                             labels=("A", "B"), only_common=args.only_common)
    text = format_comparison(frame, "csv" if args.out and args.out.endswith(".csv") else "md")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"[results] comparison ({len(frame)} rows): {args.out}")
    else:
        sys.stdout.write(text)


def _dvc_track(args, smk: list[str]) -> None:
    from ibot.results.dvc_tools import check_remote, repo_root, rule_outputs, track

    root = repo_root()
    if args.push:  # a missing remote or credentials fails now, not after hashing the checkpoints
        check_remote(root, args.remote)
    files = args.files or rule_outputs(args.rule, smk, root)
    present = [f for f in files if (root / f).is_file()]
    for f in sorted(set(files) - set(present)):
        print(f"[dvc-track] not produced yet, skipped: {f}")
    dvc_files = track(present, root, push_to=args.remote, push_now=args.push)
    print("[dvc-track] commit these with git:\n  " + "\n  ".join(dvc_files) if dvc_files else "[dvc-track] nothing to track")


def _dvc_push(args, smk: list[str]) -> None:
    from ibot.results.dvc_tools import push, repo_root

    remote = push(args.targets, repo_root(), remote=args.remote)
    print(f"[dvc-push] up to date in {remote.describe()}")


def _dvc_pull(args, smk: list[str]) -> None:
    from ibot.results.dvc_tools import pull, repo_root

    result = pull(repo_root(), remote=args.remote, targets=args.targets, snakemake_args=smk, cores=args.cores,
                  touch=not args.no_touch)
    print(json.dumps(result, indent=2))


def _coverage(args) -> None:
    from ibot.config import load_workflow_config
    from ibot.io import write_text_atomic
    from ibot.results.coverage import coverage, format_coverage, planned_outputs

    from ibot.config import skipped_models
    from ibot.results.ablations import ablation_coverage, format_ablation_coverage

    config, _ = load_workflow_config(args.configfile)
    planned = planned_outputs(args.configfile)
    report = format_coverage(coverage(config, planned), args.configfile)
    ablations = format_ablation_coverage(ablation_coverage(config, planned, skipped=skipped_models(config)),
                                         args.configfile)
    if args.out:
        write_text_atomic(args.out, report + "\n" + ablations)
    headline = report.split("\n\n| table |")[0]
    print(headline + "\n")
    print(ablations.split("\n\n| table |")[0])
    if args.readme:
        from ibot.results.readme import replace_block

        # the main tables' headline, or the ablations' with its tables of files and reasons
        block = headline if args.part == "main" else ablations.split("\n\n| table |")[0]
        write_text_atomic(args.readme, replace_block(Path(args.readme).read_text(), args.block, block))


def _readme(args) -> None:
    from ibot.results.readme import write_readme_block

    print(write_readme_block(args.run_dir, args.readme, args.block))


def _evidence(args) -> None:
    from ibot.results.evidence import format_evidence

    report, ok = format_evidence(args.run_dir, args.model, args.random_model)
    print(report)
    if not ok:
        raise SystemExit(1)


def _evidence_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="results/<run> of a finished run (its summary.csv)")
    p.add_argument("--model", required=True, help="the evaluated model (models.<name>)")
    p.add_argument("--random-model", default=None, help="the same architecture at random init (models.<name>)")


def _plan(args) -> None:
    from ibot.results.plan import main_plan

    main_plan(args.configfile, args.device_kind, args.rates, args.json, overrides=args.config)


def _reference_args(p: argparse.ArgumentParser) -> None:
    from ibot.results.aggregate import METRIC_MAP_CSV, REFERENCE_CSV

    p.add_argument("--reference", default=str(REFERENCE_CSV), help="paper numbers (CSV)")
    p.add_argument("--mapping", default=str(METRIC_MAP_CSV), help="(stage, metric) -> reference row (CSV)")


def _summary_args(p: argparse.ArgumentParser) -> None:
    from ibot.results.aggregate import PAPER_PROTOCOLS_CSV

    p.add_argument("metrics", nargs="*", help="metrics files (default: every metrics.json under --run-dir)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--flat", default=None, help="also write {model: {stage: {metric: value}}} JSON (DVC metrics)")
    p.add_argument("--config", default=None, help="workflow config (models.<name>.paper_model)")
    p.add_argument("--models-json", default=None, help="model info JSON text or file (instead of --config)")
    p.add_argument("--seed", type=int, default=None, help="seed of records that do not state one")
    _reference_args(p)
    p.add_argument("--paper-protocols", default=str(PAPER_PROTOCOLS_CSV),
                   help="(paper model, stage) -> the dataset and protocol labels of the paper's experiment (CSV)")


def _tables_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("summary", nargs="+", help="summary.csv of one or more runs/seeds (pooled: mean ± std, n)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--formats", nargs="+", default=["md", "csv", "tex", "html"])
    _reference_args(p)


def _plots_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", action="append", required=True)
    p.add_argument("--summary", action="append", default=[])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--curves-dir", default=None, help="write down-sampled pretraining curves for dvc plots here")


def _attention_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None, help="backbone weights (none: random init)")
    p.add_argument("--checkpoint-key", default=None)
    ModelSpec.add_arguments(p)
    p.add_argument("--images", required=True, help="ImageFolder root (val/<class>/...) or a folder of images")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)


def _coverage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", nargs="+", default=[], help="as snakemake's (default: config/config.yaml)")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--readme", default=None, help="also fill this file's <!-- BLOCK:start/end --> block")
    p.add_argument("--block", default="coverage", help="the README block to fill (default: coverage)")
    p.add_argument("--part", choices=("main", "ablations"), default="main",
                   help="which report goes into the block: the main tables' headline or the ablations' summary")


def _readme_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="results/<run> of a finished run (its summary.csv, metrics)")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--block", default=None, help="marker name (default: the run name, <!-- embedded:start -->)")


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--configfile", nargs="+", default=[], help="as snakemake's (default: config/config.yaml)")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="as snakemake's --config, e.g. extra_stages=true")
    p.add_argument("--device-kind", default="nvidia-h200", help="a device of bench/measured_rates.json")
    p.add_argument("--rates", default=str(Path(__file__).resolve().parents[2] / "bench" / "measured_rates.json"))
    p.add_argument("--json", default=None, help="also write the jobs and their costs here")


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_a")
    p.add_argument("run_b", nargs="?")
    p.add_argument("--paper", action="store_true", help="compare RUN_A with the paper")
    p.add_argument("--by", default="model", choices=["model", "paper_model"])
    p.add_argument("--only-common", action="store_true")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--config", default=None)
    p.add_argument("--models-json", default=None)
    p.add_argument("--out", default=None, help=".md or .csv (default: Markdown on stdout)")


def _dvc_track_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rule", action="append", default=None, help="rules whose outputs to track (default: pretrain)")
    p.add_argument("--files", nargs="*", default=None, help="track these files instead")
    p.add_argument("--push", action="store_true", help="then dvc push (remote and credentials checked first)")
    p.add_argument("--remote", default=None, help="DVC remote to push to (default: core.remote)")


def _dvc_push_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("targets", nargs="*", help=".dvc files or paths (default: everything)")
    p.add_argument("--remote", default=None, help="DVC remote (default: core.remote)")


def _dvc_pull_args(p: argparse.ArgumentParser) -> None:
    _dvc_push_args(p)
    p.add_argument("--cores", type=int, default=1, help="cores for building missing upstream (datasets)")
    p.add_argument("--no-touch", action="store_true", help="only dvc pull")


@dataclass(frozen=True)
class Command:
    """One subcommand: what it does (``help``), an example (shown by ``--help``), its arguments, its function;
    ``passthrough``: it takes Snakemake arguments after ``--``."""

    help: str
    example: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    func: Callable[..., Any]
    passthrough: bool = False


#: Every command, in ``--help`` order. The ``ibot`` console script offers the user-facing ones.
COMMANDS: dict[str, Command] = {
    "summary": Command("metrics.json files of a run -> summary.csv (+ metrics_flat.json for DVC)",
                       "python -m ibot.results summary --config config/config.yaml --run-dir results/embedded "
                       "--out /tmp/summary.csv", _summary_args, _summary),
    "coverage": Command("which of the paper's numbers (main tables, then ablations) a config's plan produces, and why not",
                        "ibot coverage --configfile config/paper.yaml --out coverage.md", _coverage_args, _coverage),
    "ablations": Command("summary.csv -> the paper's ablation tables (rows = settings, ours beside the paper, deltas)",
                         "ibot ablations --config config/ablations.yaml --summary results/ablations/summary.csv "
                         "--out-dir results/ablations/tables", _ablations_args, _ablations),
    "plan": Command("estimated device-hours and wall time of every job of a config, before launching",
                    "ibot plan --configfile config/paper.yaml --device-kind nvidia-h200", _plan_args, _plan),
    "tables": Command("summary.csv of one or more runs/seeds -> paper-style tables (md, csv, tex, html)",
                      "ibot tables results/s0/summary.csv results/s1/summary.csv --out-dir results/seeds/tables",
                      _tables_args, _tables),
    "plots": Command("figures of a run (pretraining curves, linear sweep, robustness, ours vs paper)",
                     "python -m ibot.results plots --run-dir results/embedded --out-dir /tmp/plots",
                     _plots_args, _plots),
    "attention": Command("[CLS] attention maps of the last block for a few validation images",
                         "python -m ibot.results attention --arch vit_small --checkpoint W.pth "
                         "--images /datasets/imagenet/val --out attention.png", _attention_args, _attention),
    "readme": Command("fill README.md's block of a run with its figures (paper-table metrics per model, device, date)",
                      "python -m ibot.results readme --run-dir results/embedded", _readme_args, _readme),
    "evidence": Command("does every stage work: each number against its trivial baseline and the random-init model",
                        "ibot evidence --run-dir results/embedded --model vit_tiny --random-model vit_tiny_random",
                        _evidence_args, _evidence),
    "compare": Command("compare two runs (RUN_A RUN_B, each 'run' or 'run1,run2' pooled), or a run with the paper",
                       "ibot compare embedded --paper      # or: ibot compare s0,s1,s2 s3,s4 --by paper_model",
                       _compare_args, _compare),
    "dvc-track": Command("dvc add every output of the pretraining jobs (+ --push); commit the *.dvc pointers",
                         "ibot dvc-track --push -- --configfile config/paper.yaml", _dvc_track_args, _dvc_track,
                         passthrough=True),
    "dvc-push": Command("dvc push (rerun to resume an interrupted push)", "ibot dvc-push --remote s3",
                        _dvc_push_args, _dvc_push, passthrough=True),
    "dvc-pull": Command("dvc pull, then make Snakemake accept the pulled outputs (no pretraining rerun)",
                        "ibot dvc-pull --cores 2 -- --configfile config/paper.yaml", _dvc_pull_args, _dvc_pull,
                        passthrough=True),
}


def add_commands(sub: Any, names: Iterable[str] | None = None) -> None:
    """Add the commands (all, or those in ``names``) to an argparse subparsers object, each with its help,
    example and arguments; :func:`run_command` runs what was parsed."""
    for name in names or COMMANDS:
        command = COMMANDS[name]
        passthrough = " Arguments after -- go to Snakemake." if command.passthrough else ""
        p = sub.add_parser(name, help=command.help, description=f"{command.help}.{passthrough}",
                           epilog=f"example:\n  {command.example}", formatter_class=argparse.RawDescriptionHelpFormatter)
        command.add_arguments(p)
        p.set_defaults(results_command=name)


def run_command(args: argparse.Namespace, smk: list[str]) -> None:
    """Run a parsed command (``smk``: the Snakemake arguments after ``--``, passthrough commands only)."""
    command = COMMANDS[args.results_command]
    if not command.passthrough:
        if smk:
            raise SystemExit(f"'{args.results_command}' takes no arguments after --")
        command.func(args)
        return
    from ibot.results.dvc_tools import DVCError

    if getattr(args, "rule", "unset") is None:
        args.rule = [BACKBONE_STAGE.name]
    try:
        command.func(args, smk)
    except DVCError as error:  # the message says what failed and how to fix it: no traceback
        raise SystemExit(f"[{args.results_command}] error: {error}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ibot.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True))
    return parser


def split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` before ``--`` and the Snakemake arguments after it."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def main(argv: list[str] | None = None) -> None:
    own, smk = split_passthrough(list(sys.argv[1:] if argv is None else argv))
    run_command(build_parser().parse_args(own), smk)
