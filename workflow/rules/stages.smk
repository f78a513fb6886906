# One rule per stage of the registry (ibot/stages.py): pretraining, k-NN, linear probing, fine-tuning
# (lr sweep), semi-supervised, unsupervised classification, transfer learning, COCO detection, ADE20K
# segmentation, robustness, image retrieval, DAVIS video segmentation. Every rule runs the one stage
# command line, `python -m downstream <stage>` (ibot.run.cli; torch-free in the waiting process), which
# launches the stage's job through submitit. Its config is a param (the resolved stage config as JSON),
# so editing it reruns only that stage. Outputs: metrics.json + the registry's extra files. Resumable
# work (<stage>/work, fingerprinted by ibot.workdir) is never an output, so Snakemake never deletes it.
# A swept stage (registry `sweep`, e.g. the fine-tuning lr) runs one job per value into
# <stage>/sweep/<key>_<value>/ and a last rule writes the best run's record (ibot.sweep).
from ibot.sweep import SWEEP_DIR, run_config, run_metrics_path, sweep_values


def _config_file(resolved, dotted):
    value = resolved
    for key in dotted.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def _stage_inputs(stage):
    """Backbone weights (unless it makes them), the embedded datasets it waits for, outputs of other
    stages it needs, and files its config names (registry file_keys, e.g. the occlusion saliency
    model's checkpoint: a file another rule makes is then built first)."""
    def inputs(wildcards):
        files = {"data": dataset_ready(*data_kinds(stage, wildcards.model))}
        if not stage.exports_backbone:
            files["checkpoint"] = backbone_checkpoint(wildcards)
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
    """Command-line arguments of the model (backbone, weights, run identity) and of the files it needs
    from other stages (e.g. --head linear/head.pth)."""
    def args(wildcards):
        out = model_args(wildcards) if not stage.exports_backbone else arch_args(wildcards)
        for flag, (other, name) in stage.needs.items():
            out += [f"--{flag}", f"{stage_dir(other, wildcards.model)}/{name}"]
        return out
    return args


def _stage_data(stage):
    """`--data KIND=ROOT` of every dataset it reads, resolved when the job runs: unset keys fail then."""
    return lambda wildcards: [arg for kind, root in stage_data(config, stage.name, wildcards.model).items()
                              for arg in ("--data", f"{kind}={root}")]


def _sweep_runs(stage):
    """Metrics of every run of a swept stage (ibot.sweep): one per value of its list key."""
    list_key, value_key, _ = stage.sweep
    def runs(wildcards):
        values = sweep_values(stage_config(config, stage.name, wildcards.model), list_key, value_key)
        return [str(run_metrics_path(stage_dir(stage.name, wildcards.model), value_key, v)) for v in values]
    return runs


def _sweep_run_json(stage):
    """Config of one run of a sweep (ibot.sweep.run_config: the value set, the list dropped)."""
    def run_json(wildcards):
        resolved = stage_config(config, stage.name, wildcards.model)
        return json.dumps(run_config(stage, resolved, wildcards.value), sort_keys=True)
    return run_json


for _stage in REGISTRY.values():
    # a swept stage's job writes one run of the sweep; the stage's metrics.json is the best run's
    _job_out = (f"{stage_dir(_stage.name)}/{SWEEP_DIR}/{_stage.sweep[1]}_{{value}}/metrics.json" if _stage.sweep
                else f"{stage_dir(_stage.name)}/metrics.json")
    _job_name = f"{_stage.name}_run" if _stage.sweep else _stage.name

    rule:
        name: _job_name
        input:
            unpack(_stage_inputs(_stage)),
        output:
            metrics=_job_out,
            **{key: f"{stage_dir(_stage.name)}/{name}" for key, name in _stage.outputs.items()},
        params:
            stage=_stage.name,
            config=_sweep_run_json(_stage) if _stage.sweep else stage_json(_stage.name),
            resources=resources_json(_stage.name),
            data=_stage_data(_stage),
            args=_stage_args(_stage),
        log:
            f"{RESULTS}/{RUN}/logs/{{model}}/{_job_name}" + ("_{value}" if _stage.sweep else "") + ".log",
        benchmark:
            f"{RESULTS}/{RUN}/benchmarks/{{model}}/{_job_name}" + ("_{value}" if _stage.sweep else "") + ".tsv"
        threads: stage_threads(_stage.name)
        priority: _stage.priority  # longest first, so short jobs fill the gaps (registry: ibot/stages.py)
        localrule: True  # submits itself through ibot.run.launcher (submitit); Snakemake only waits
        shell:
            "{PYTHON:q} -m downstream {params.stage} {params.data:q} --out {output.metrics:q} "
            "--config {params.config:q} --resources {params.resources:q} {params.args:q} > {log:q} 2>&1"

    if _stage.sweep:

        rule:
            name: _stage.name
            input:
                runs=_sweep_runs(_stage),
            output:
                metrics=f"{stage_dir(_stage.name)}/metrics.json",
            params:
                key=_stage.sweep[1],
                metric=_stage.sweep[2],
            log:
                f"{RESULTS}/{RUN}/logs/{{model}}/{_stage.name}.log",
            localrule: True
            shell:
                "{PYTHON:q} -m ibot.sweep --key {params.key:q} --metric {params.metric:q} --runs {input.runs:q} "
                "--out {output.metrics:q} > {log:q} 2>&1"
