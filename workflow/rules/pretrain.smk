# iBOT pretraining (registry entry "pretrain"): one submitit job per model (local process, or SLURM
# multi-node DDP). Outputs are the exported teacher backbone + summary + curves, never the resumable
# work directory (Snakemake deletes a rule's outputs before rerunning it; work/ must survive, and
# ibot.workdir moves it aside itself when the setup changed).
PRETRAIN = REGISTRY["pretrain"]


def pretrain_kind(wildcards):
    """Dataset kind of the model's pretraining images (models.<m>.pretrain_data: IN-1K or IN-22K)."""
    return pretrain_images(config, wildcards.model)[0]


rule pretrain:
    input:
        data=lambda wildcards: dataset_ready(pretrain_kind(wildcards)),
    output:
        **{key: f"{stage_dir('pretrain')}/{name}" for key, name in PRETRAIN.outputs.items()},
    params:
        config=stage_json("pretrain"),
        resources=resources_json("pretrain"),
        train=lambda wildcards: pretrain_images(config, wildcards.model)[1],
        out_dir=lambda wildcards: stage_dir("pretrain", wildcards.model),
        model_args=arch_args,
    log:
        f"{RESULTS}/{RUN}/logs/{{model}}/pretrain.log",
    benchmark:
        f"{RESULTS}/{RUN}/benchmarks/{{model}}/pretrain.tsv"
    threads: stage_threads("pretrain")
    priority: PRETRAIN.priority
    localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
    shell:
        "{PYTHON:q} -m {PRETRAIN.module} --data {params.train:q} --out-dir {params.out_dir:q} "
        "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} > {log:q} 2>&1"
