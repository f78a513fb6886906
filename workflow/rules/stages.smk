# One rule per evaluation stage, generated from the stage registry (ibot/stages.py): k-NN, linear
# probing, fine-tuning, COCO detection, ADE20K segmentation (UperNet, linear), robustness. Every
# rule runs the stage's CLI (`python -m <module>`, the same command as without Snakemake) through
# the common launcher; its config is a param (the resolved stage config as JSON), so editing it
# reruns only that stage. Outputs: metrics.json + the registry's extra files. Resumable work
# (<stage>/work, fingerprinted by ibot.workdir) is never an output, so Snakemake never deletes it.


def _config_file(resolved, dotted):
    value = resolved
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _stage_inputs(stage):
    """Backbone weights, the embedded datasets it waits for, outputs of other stages it needs, and
    files its config names (registry file_keys, e.g. the occlusion saliency model's checkpoint:
    a file another rule makes is then built first)."""
    def inputs(wildcards):
        files = {"checkpoint": backbone_checkpoint(wildcards), "data": dataset_ready(*stage.datasets)}
        for flag, (other, name) in stage.needs.items():
            files[flag] = f"{stage_dir(other, wildcards.model)}/{name}"
        resolved = stage_config(config, stage.name, wildcards.model)
        for key in stage.file_keys:
            path = _config_file(resolved, key)
            if path:
                files[key.replace(".", "_")] = path
        return files
    return inputs


def _stage_args(stage):
    """CLI arguments for the files it needs from other stages (e.g. --head linear/head.pth)."""
    def args(wildcards):
        out = []
        for flag, (other, name) in stage.needs.items():
            out += [f"--{flag}", f"{stage_dir(other, wildcards.model)}/{name}"]
        return out
    return args


def _stage_data(stage):
    """Root of the dataset it reads (--data), resolved when the job runs: unset keys fail then."""
    return lambda wildcards: dataset(stage.datasets[0])


for _stage in (REGISTRY[name] for name in REGISTRY if name != "pretrain"):

    rule:
        name: _stage.name
        input:
            unpack(_stage_inputs(_stage)),
        output:
            metrics=f"{stage_dir(_stage.name)}/metrics.json",
            **{key: f"{stage_dir(_stage.name)}/{name}" for key, name in _stage.outputs.items()},
        params:
            module=_stage.module,
            config=stage_json(_stage.name),
            resources=resources_json(_stage.name),
            data=_stage_data(_stage),
            model_args=model_args,
            needs=_stage_args(_stage),
        log:
            f"{RESULTS}/{RUN}/logs/{{model}}/{_stage.name}.log",
        benchmark:
            f"{RESULTS}/{RUN}/benchmarks/{{model}}/{_stage.name}.tsv"
        localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
        shell:
            "{PYTHON:q} -m {params.module} --data {params.data:q} --out {output.metrics:q} "
            "--config {params.config:q} --resources {params.resources:q} {params.model_args:q} "
            "{params.needs:q} > {log:q} 2>&1"
