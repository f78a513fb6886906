# Results of a run (ibot/results/): every enabled stage's metrics.json -> summary.csv (joined with
# the paper's numbers via results/reference/metric_map.csv) -> paper-style tables; figures;
# [CLS] attention maps. Outputs flagged report() make `snakemake --report report.html` one
# self-contained HTML page (captions in workflow/report/). The summary's inputs are the metrics
# files themselves, so any changed metrics file rebuilds the summary, the tables and the plots.
# DVC (results/<run>/dvc.yaml, written here; ibot dvc-*) versions and shares these outputs; it runs nothing.
import os as _os
from pathlib import Path as _Path

from ibot.results.ablations import ABLATIONS_CSV, SETTINGS_CSV
from ibot.results.aggregate import METRIC_MAP_CSV, PAPER_PROTOCOLS_CSV, REFERENCE_CSV
from ibot.io import write_text_atomic
from ibot.results.dvc_tools import run_dvc_yaml
from ibot.results.plots import PLOT_FILES, curve_outputs
from ibot.results.tables import GROUPS as TABLE_GROUPS, table_outputs

report: "../report/workflow.rst"

RESULT_DIR = f"{RESULTS}/{RUN}"
# results/reference/ of the repository (relative to the working directory when inside it)
REFERENCE_FILES = {name: _os.path.relpath(path) if path.is_relative_to(_Path.cwd()) else str(path)
                   for name, path in (("ibot_paper_results", REFERENCE_CSV), ("metric_map", METRIC_MAP_CSV),
                                      ("paper_protocols", PAPER_PROTOCOLS_CSV), ("ibot_paper_ablations", ABLATIONS_CSV),
                                   ("ablation_settings", SETTINGS_CSV))}
TABLE_FILES = table_outputs(f"{RESULT_DIR}/tables")
TABLE_HTML = {group: f"{RESULT_DIR}/tables/{group}.html" for group in (*TABLE_GROUPS, "all_metrics")}
TABLE_LABELS = {"classification": "classification (Tab.1/2)", "dense": "dense (Tab.6)", "robustness": "robustness (Tab.8)",
                "transfer": "transfer (Tab.7)", "semi_supervised": "semi-supervised (Tab.4/12)",
                "unsupervised": "unsupervised classification (Tab.5)",
                "retrieval": "retrieval / video segmentation (Tab.16)", "all_metrics": "all metrics"}


def has_cls_attention(model):
    """[CLS] attention maps are a ViT figure: a Swin has no [CLS] token (its "CLS" is a token average)."""
    from ibot.models.specs import SWIN_ARCHITECTURES

    return model_spec(config, model).arch not in SWIN_ARCHITECTURES


# Every target of `rule all` that is not a stage's metrics: the results of the run.
RESULT_TARGETS = [
    f"{RESULT_DIR}/summary.csv",
    f"{RESULT_DIR}/metrics_flat.json",
    f"{RESULT_DIR}/dvc.yaml",
    *TABLE_FILES,
    *(f"{RESULT_DIR}/plots/{name}" for name in PLOT_FILES),
    *curve_outputs(f"{RESULT_DIR}/curves", pretrained_models()),
    *(f"{RESULT_DIR}/figures/attention_{m}.png" for m in MODELS if has_cls_attention(m)),
    # the paper's ablation tables, when a model reproduces an ablation setting (config/ablations.yaml)
    *([f"{RESULT_DIR}/tables/ablations.md"] if any(config["models"][m].get("ablation") for m in MODELS) else []),
]


def stage_metrics(wildcards=None):
    """Every enabled stage's metrics file: all_targets() (common.smk) minus the results themselves."""
    return [t for t in all_targets() if t not in RESULT_TARGETS and _Path(t).name == "metrics.json"]


def models_json():
    """Per-model info the summary joins on (paper_model, arch, pretrain_note, unverified): a params entry."""
    from ibot.results.aggregate import models_info_from_config

    return json.dumps(models_info_from_config(config), sort_keys=True)


def attention_args(wildcards):
    return checkpoint_args(wildcards) + model_spec(config, wildcards.model).cli_args()


rule dvc_yaml:
    # What DVC versions of this run (its metrics, its pretraining curves), declared by the run itself, so that
    # `dvc metrics show` / `dvc plots show` never name files of runs a clone does not hold.
    output:
        f"{RESULT_DIR}/dvc.yaml",
    params:
        text=lambda wildcards: run_dvc_yaml(RUN, curves=bool(pretrained_models())),
    localrule: True
    run:
        write_text_atomic(output[0], params.text)


rule summary:
    input:
        metrics=stage_metrics,
        reference=REFERENCE_FILES["ibot_paper_results"],
        mapping=REFERENCE_FILES["metric_map"],
        protocols=REFERENCE_FILES["paper_protocols"],
    output:
        summary=report(f"{RESULT_DIR}/summary.csv", caption="../report/summary.rst", category="Tables",
                       labels={"table": "summary.csv (long, every metric)"}),
        flat=f"{RESULT_DIR}/metrics_flat.json",
    params:
        models=models_json(),
        seed=config["seed"],
    log:
        f"{RESULT_DIR}/logs/results/summary.log",
    benchmark:
        f"{RESULT_DIR}/benchmarks/results/summary.tsv"
    localrule: True
    shell:
        "{PYTHON:q} -m ibot.results summary --models-json {params.models:q} --seed {params.seed} "
        "--reference {input.reference:q} --mapping {input.mapping:q} --paper-protocols {input.protocols:q} "
        "--out {output.summary:q} --flat {output.flat:q} {input.metrics:q} > {log:q} 2>&1"


rule tables:
    input:
        summary=rules.summary.output.summary,
        reference=REFERENCE_FILES["ibot_paper_results"],
        mapping=REFERENCE_FILES["metric_map"],
    output:
        **{group: report(html, caption=f"../report/table_{group}.rst", category="Tables",
                         labels={"table": TABLE_LABELS[group]}) for group, html in TABLE_HTML.items()},
        files=[f for f in TABLE_FILES if f not in TABLE_HTML.values()],
    params:
        out_dir=f"{RESULT_DIR}/tables",
    log:
        f"{RESULT_DIR}/logs/results/tables.log",
    benchmark:
        f"{RESULT_DIR}/benchmarks/results/tables.tsv"
    localrule: True
    shell:
        "{PYTHON:q} -m ibot.results tables {input.summary:q} --out-dir {params.out_dir:q} "
        "--reference {input.reference:q} --mapping {input.mapping:q} > {log:q} 2>&1"


rule plots:
    input:
        summary=rules.summary.output.summary,
        logs=lambda wildcards: [f"{stage_dir(BACKBONE_STAGE.name, m)}/{BACKBONE_STAGE.outputs['curves']}"
                                for m in pretrained_models()],
    output:
        loss=report(f"{RESULT_DIR}/plots/pretrain_loss.png", caption="../report/pretrain_loss.rst",
                    category="Pretraining", labels={"figure": "losses"}),
        schedules=report(f"{RESULT_DIR}/plots/pretrain_schedules.png", caption="../report/pretrain_schedules.rst",
                         category="Pretraining", labels={"figure": "schedules"}),
        linear_lr=report(f"{RESULT_DIR}/plots/linear_lr.png", caption="../report/linear_lr.rst",
                         category="Evaluation", labels={"figure": "linear probe per lr"}),
        robustness=report(f"{RESULT_DIR}/plots/robustness.png", caption="../report/robustness.rst",
                          category="Evaluation", labels={"figure": "robustness curves"}),
        ours_vs_paper=report(f"{RESULT_DIR}/plots/ours_vs_paper.png", caption="../report/ours_vs_paper.rst",
                             category="Evaluation", labels={"figure": "ours vs paper"}),
        curves=curve_outputs(f"{RESULT_DIR}/curves", pretrained_models()),
    params:
        run_dir=RESULT_DIR,
        models=MODELS,
        out_dir=f"{RESULT_DIR}/plots",
        curves_dir=f"{RESULT_DIR}/curves",
    log:
        f"{RESULT_DIR}/logs/results/plots.log",
    benchmark:
        f"{RESULT_DIR}/benchmarks/results/plots.tsv"
    localrule: True
    shell:
        "{PYTHON:q} -m ibot.results plots --run-dir {params.run_dir:q} --summary {input.summary:q} "
        "--out-dir {params.out_dir:q} --curves-dir {params.curves_dir:q} --models {params.models:q} > {log:q} 2>&1"


rule attention_maps:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("imagenet"),
    output:
        report(f"{RESULT_DIR}/figures/attention_{{model}}.png", caption="../report/attention.rst",
               category="Attention maps", labels={"model": "{model}"}),
    params:
        args=attention_args,
        images=lambda wildcards: dataset("imagenet"),
        title=lambda wildcards: f"{RUN}/{wildcards.model}: [CLS] attention, last block",
    log:
        f"{RESULT_DIR}/logs/{{model}}/attention_maps.log",
    benchmark:
        f"{RESULT_DIR}/benchmarks/{{model}}/attention_maps.tsv"
    localrule: True
    shell:
        "{PYTHON:q} -m ibot.results attention {params.args:q} --images {params.images:q} "
        "--title {params.title:q} --out {output:q} > {log:q} 2>&1"


rule ablation_tables:
    input:
        summary=rules.summary.output.summary,
        reference=REFERENCE_FILES["ibot_paper_ablations"],
        settings=REFERENCE_FILES["ablation_settings"],
    output:
        md=f"{RESULT_DIR}/tables/ablations.md",
        csv=f"{RESULT_DIR}/tables/ablations.csv",
    params:
        models=models_json(),
        out_dir=f"{RESULT_DIR}/tables",
        run=RUN,
    log:
        f"{RESULT_DIR}/logs/results/ablation_tables.log",
    localrule: True
    shell:
        "{PYTHON:q} -m ibot.results ablations --models-json {params.models:q} --summary {input.summary:q} "
        "--out-dir {params.out_dir:q} --run {params.run:q} > {log:q} 2>&1"
