# Dense downstream stages (mmdet / mmseg inside our launcher job):
#   detection    Cascade Mask R-CNN on COCO            (config section `detection`)
#   seg_upernet  UperNet on ADE20K                     (config section `segmentation`, head upernet)
#   seg_linear   linear head on the frozen ViT, ADE20K (config section `segmentation`, head linear)
# Outputs are the metrics files only: the toolbox work dirs (<stage>/work, with the checkpoints
# a requeued job resumes from) are not outputs, so Snakemake never deletes them.


def segmentation_json(head):
    """The `segmentation` section (with per-model overrides) for one head, as JSON."""
    def params(wildcards):
        section = stage_config(config, "segmentation", wildcards.model)
        return json.dumps({**section, "head": head}, sort_keys=True)
    return params


rule detection:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("coco"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/detection/metrics.json",
    params:
        config=stage_json("detection"),
        resources=resources_json("detection"),
        data=dataset("coco"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/detection.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/detection.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.dense.detection --data {params.data:q} --out {output.metrics:q} "
        "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


rule seg_upernet:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("ade20k"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/seg_upernet/metrics.json",
    params:
        config=segmentation_json("upernet"),
        resources=resources_json("seg_upernet"),
        data=dataset("ade20k"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/seg_upernet.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/seg_upernet.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.dense.segmentation --data {params.data:q} --out {output.metrics:q} "
        "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


rule seg_linear:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("ade20k"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/seg_linear/metrics.json",
    params:
        config=segmentation_json("linear"),
        resources=resources_json("seg_linear"),
        data=dataset("ade20k"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/seg_linear.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/seg_linear.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.dense.segmentation --data {params.data:q} --out {output.metrics:q} "
        "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


STAGE_TARGETS["detection"] = rules.detection.output.metrics
STAGE_TARGETS["seg_upernet"] = rules.seg_upernet.output.metrics
STAGE_TARGETS["seg_linear"] = rules.seg_linear.output.metrics
STAGE_DATASETS.update({"detection": ["coco"], "seg_upernet": ["ade20k"], "seg_linear": ["ade20k"]})
