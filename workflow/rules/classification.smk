# ImageNet classification evaluations of every model's backbone: weighted k-NN, linear probing
# (one-pass lr sweep; the best head is a second output used by the robustness rules) and
# end-to-end fine-tuning. Each rule runs the stage CLI (downstream/<stage>.py) through the common
# launcher; resumable work (linear/work, finetune/work) lives beside the outputs, never as one.


rule knn:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("imagenet"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/knn/metrics.json",
    params:
        config=stage_json("knn"),
        resources=resources_json("knn"),
        data=dataset("imagenet"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/knn.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/knn.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.knn --data {params.data:q} --out {output.metrics:q} --config {params.config:q} "
        "--resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


rule linear:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("imagenet"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/linear/metrics.json",
        head=f"{RESULTS}/{RUN}/{{model}}/linear/head.pth",
    params:
        config=stage_json("linear"),
        resources=resources_json("linear"),
        data=dataset("imagenet"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/linear.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/linear.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.linear --data {params.data:q} --out {output.metrics:q} --config {params.config:q} "
        "--resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


rule finetune:
    input:
        checkpoint=backbone_checkpoint,
        data=dataset_ready("imagenet"),
    output:
        metrics=f"{RESULTS}/{RUN}/{{model}}/finetune/metrics.json",
    params:
        config=stage_json("finetune"),
        resources=resources_json("finetune"),
        data=dataset("imagenet"),
        model_args=model_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/finetune.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/finetune.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m downstream.finetune --data {params.data:q} --out {output.metrics:q} --config {params.config:q} "
        "--resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"


STAGE_TARGETS["knn"] = rules.knn.output.metrics
STAGE_TARGETS["linear"] = rules.linear.output.metrics
STAGE_TARGETS["finetune"] = rules.finetune.output.metrics
