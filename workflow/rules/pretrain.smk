# iBOT pretraining: one submitit job per model (local process, or SLURM multi-node DDP).
# Outputs are the exported teacher backbone + summary + curves, never the resumable work
# directory (Snakemake deletes a rule's outputs before rerunning it; work/ must survive).


rule pretrain:
    input:
        data=dataset_ready("imagenet"),
    output:
        backbone=f"{RESULTS}/{RUN}/{{model}}/pretrain/teacher_backbone.pth",
        summary=f"{RESULTS}/{RUN}/{{model}}/pretrain/summary.json",
        curves=f"{RESULTS}/{RUN}/{{model}}/pretrain/train_log.csv",
    params:
        config=stage_json("pretrain"),
        resources=resources_json("pretrain"),
        train=lambda wildcards: f"{dataset('imagenet')}/train",
        out_dir=lambda wildcards: f"{run_dir(wildcards.model)}/pretrain",
        model_args=arch_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/pretrain.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/pretrain.tsv"
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m ibot.train --data {params.train:q} --out-dir {params.out_dir:q} "
        "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"
