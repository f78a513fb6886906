"""``python -m ibot.results <command>`` — results of the iBOT reproduction.

  summary     metrics.json files of a run -> summary.csv (+ metrics_flat.json for DVC)
  coverage    which of the paper's iBOT numbers a config's Snakemake plan produces, and why not
  plan        estimated device-hours and wall time of every job of a config, from measured rates
  tables      summary.csv of one or more runs/seeds -> paper-style tables (md, csv, tex, html)
  plots       figures of a run (pretraining curves, linear sweep, robustness, ours vs paper)
  attention   [CLS] attention maps of the last block for a few validation images
  readme      fill README.md's block of a run with its figures (paper-table metrics per model, device, date)
  compare     RUN_A RUN_B (each "run" or "run1,run2" pooled), or RUN_A --paper
  dvc-track   dvc add every output of the pretraining jobs (+ --push)
  dvc-push    dvc push
  dvc-pull    dvc pull, then make Snakemake accept the pulled outputs (no pretraining rerun)

Arguments after ``--`` (dvc-*) are passed to Snakemake, e.g. ``-- --configfile config/paper.yaml``.
``--remote NAME`` (dvc-*) picks a DVC remote other than the default; S3 credentials come from the AWS
environment variables or profile, checked before any transfer (see :mod:`ibot.results.dvc_tools`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ibot.models.specs import ModelSpec
from ibot.stages import BACKBONE_STAGE


def _split_passthrough(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


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


def _plots(args) -> None:
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

    config, _ = load_workflow_config(args.configfile)
    report = format_coverage(coverage(config, planned_outputs(args.configfile)), args.configfile)
    if args.out:
        write_text_atomic(args.out, report)
    headline = report.split("\n\n| table |")[0]
    if args.readme:
        from ibot.results.readme import replace_block

        write_text_atomic(args.readme, replace_block(Path(args.readme).read_text(), "coverage", headline))
    print(headline)


def _readme(args) -> None:
    from ibot.results.readme import write_readme_block

    print(write_readme_block(args.run_dir, args.readme, args.block))


def _plan(args) -> None:
    from ibot.results.plan import main_plan

    main_plan(args.configfile, args.device_kind, args.rates, args.json, overrides=args.config)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ibot.results", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def reference_args(p):
        from ibot.results.aggregate import METRIC_MAP_CSV, REFERENCE_CSV

        p.add_argument("--reference", default=str(REFERENCE_CSV), help="paper numbers (CSV)")
        p.add_argument("--mapping", default=str(METRIC_MAP_CSV), help="(stage, metric) -> reference row (CSV)")

    p = sub.add_parser("summary", help="metrics.json files -> summary.csv")
    p.add_argument("metrics", nargs="*", help="metrics files (default: every metrics.json under --run-dir)")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--flat", default=None, help="also write {model: {stage: {metric: value}}} JSON (DVC metrics)")
    p.add_argument("--config", default=None, help="workflow config (models.<name>.paper_model)")
    p.add_argument("--models-json", default=None, help="model info JSON text or file (instead of --config)")
    p.add_argument("--seed", type=int, default=None, help="seed of records that do not state one")
    reference_args(p)
    from ibot.results.aggregate import PAPER_PROTOCOLS_CSV
    p.add_argument("--paper-protocols", default=str(PAPER_PROTOCOLS_CSV),
                   help="(paper model, stage) -> the dataset and protocol labels of the paper's experiment (CSV)")
    p.set_defaults(func=_summary)

    p = sub.add_parser("tables", help="summaries -> paper-style tables")
    p.add_argument("summary", nargs="+", help="summary.csv of one or more runs/seeds (pooled: mean ± std, n)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--formats", nargs="+", default=["md", "csv", "tex", "html"])
    reference_args(p)
    p.set_defaults(func=_tables)

    p = sub.add_parser("plots", help="figures of one or more runs")
    p.add_argument("--run-dir", action="append", required=True)
    p.add_argument("--summary", action="append", default=[])
    p.add_argument("--out-dir", required=True)
    p.add_argument("--models", nargs="*", default=None)
    p.add_argument("--curves-dir", default=None, help="write down-sampled pretraining curves for dvc plots here")
    p.set_defaults(func=_plots)

    p = sub.add_parser("attention", help="[CLS] attention maps (last block)")
    p.add_argument("--checkpoint", default=None, help="backbone weights (none: random init)")
    p.add_argument("--checkpoint-key", default=None)
    ModelSpec.add_arguments(p)
    p.add_argument("--images", required=True, help="ImageFolder root (val/<class>/...) or a folder of images")
    p.add_argument("--num-images", type=int, default=4)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--title", default="")
    p.add_argument("--out", required=True)
    p.set_defaults(func=_attention)

    p = sub.add_parser("coverage", help="which of the paper's iBOT numbers a config's plan produces, and why not")
    p.add_argument("--configfile", nargs="+", default=[], help="as snakemake's (default: config/config.yaml)")
    p.add_argument("--out", default=None, help="also write the Markdown report here")
    p.add_argument("--readme", default=None, help="also fill this file's <!-- coverage:start/end --> block")
    p.set_defaults(func=_coverage)

    p = sub.add_parser("readme", help="fill README.md's block of a run with its figures, from its results")
    p.add_argument("--run-dir", required=True, help="results/<run> of a finished run (its summary.csv, metrics)")
    p.add_argument("--readme", default="README.md")
    p.add_argument("--block", default=None, help="marker name (default: the run name, <!-- embedded:start -->)")
    p.set_defaults(func=_readme)

    p = sub.add_parser("plan", help="estimated device-hours and wall time of every job, before launching")
    p.add_argument("--configfile", nargs="+", default=[], help="as snakemake's (default: config/config.yaml)")
    p.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE",
                   help="as snakemake's --config, e.g. extra_stages=true")
    p.add_argument("--device-kind", default="nvidia-h200", help="a device of bench/measured_rates.json")
    p.add_argument("--rates", default=str(Path(__file__).resolve().parents[2] / "bench" / "measured_rates.json"))
    p.add_argument("--json", default=None, help="also write the jobs and their costs here")
    p.set_defaults(func=_plan)

    p = sub.add_parser("compare", help="RUN_A RUN_B, or RUN_A --paper")
    p.add_argument("run_a")
    p.add_argument("run_b", nargs="?")
    p.add_argument("--paper", action="store_true", help="compare RUN_A with the paper")
    p.add_argument("--by", default="model", choices=["model", "paper_model"])
    p.add_argument("--only-common", action="store_true")
    p.add_argument("--results-dir", default="results")
    p.add_argument("--config", default=None)
    p.add_argument("--models-json", default=None)
    p.add_argument("--out", default=None, help=".md or .csv (default: Markdown on stdout)")
    p.set_defaults(func=_compare)

    p = sub.add_parser("dvc-track", help="dvc add the pretraining outputs")
    p.add_argument("--rule", action="append", default=None, help="rules whose outputs to track (default: pretrain)")
    p.add_argument("--files", nargs="*", default=None, help="track these files instead")
    p.add_argument("--push", action="store_true", help="then dvc push (remote and credentials checked first)")
    p.add_argument("--remote", default=None, help="DVC remote to push to (default: core.remote)")
    p.set_defaults(func=_dvc_track, passthrough=True)

    p = sub.add_parser("dvc-push", help="dvc push (rerun to resume an interrupted push)")
    p.add_argument("targets", nargs="*", help=".dvc files or paths (default: everything)")
    p.add_argument("--remote", default=None, help="DVC remote (default: core.remote)")
    p.set_defaults(func=_dvc_push, passthrough=True)

    p = sub.add_parser("dvc-pull", help="dvc pull + snakemake --touch of the pulled outputs")
    p.add_argument("targets", nargs="*", help=".dvc files or paths (default: everything)")
    p.add_argument("--remote", default=None, help="DVC remote (default: core.remote)")
    p.add_argument("--cores", type=int, default=1, help="cores for building missing upstream (datasets)")
    p.add_argument("--no-touch", action="store_true", help="only dvc pull")
    p.set_defaults(func=_dvc_pull, passthrough=True)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    own, smk = _split_passthrough(argv)
    args = build_parser().parse_args(own)
    if getattr(args, "passthrough", False):
        from ibot.results.dvc_tools import DVCError

        if getattr(args, "rule", "unset") is None:
            args.rule = [BACKBONE_STAGE.name]
        try:
            args.func(args, smk)
        except DVCError as error:  # the message says what failed and how to fix it: no traceback
            raise SystemExit(f"[{args.command}] error: {error}") from None
    else:
        if smk:
            raise SystemExit(f"'{args.command}' takes no arguments after --")
        args.func(args)


if __name__ == "__main__":
    main()
