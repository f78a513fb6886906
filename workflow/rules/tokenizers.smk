# Offline MIM tokenizers (paper arXiv:2111.07832v3 Tab. 20, App. E): one job per entry of the top-level
# config key `tokenizers`, fitted once on the ImageNet training images (ibot.tokenizers fit-kmeans). A model
# uses one with pretrain.mim_target: kmeans and pretrain.mim_tokenizer: <results_dir>/<run>/tokenizers/<name>.pth;
# the pretrain stage's file_keys make that file its input, so this job runs first. (A frozen-model tokenizer
# needs no rule here: mim_tokenizer names another model's pretrain/teacher_backbone.pth, whose stage then runs first.)
TOKENIZERS = config.get("tokenizers") or {}


def tokenizer_path(name):
    return f"{RESULTS}/{RUN}/tokenizers/{name}.pth"


def _tokenizer_args(wildcards):
    settings = TOKENIZERS[wildcards.name]
    args = ["--k", settings["k"], "--fraction", settings["fraction"], "--patch-size", settings["patch_size"],
            "--crop", settings["crop"], "--seed", settings["seed"], "--batch-size", settings["batch_size"],
            "--epochs", settings["epochs"]]
    if settings.get("max_patches") is not None:
        args += ["--max-patches", settings["max_patches"]]
    return [str(arg) for arg in args]


if TOKENIZERS:

    rule fit_kmeans_tokenizer:
        input:
            data=dataset_ready("imagenet"),
        output:
            tokenizer_path("{name}"),
        wildcard_constraints:
            name="|".join(TOKENIZERS),
        params:
            data=lambda wildcards: dataset("imagenet"),
            args=_tokenizer_args,
            settings=lambda wildcards: json.dumps(TOKENIZERS[wildcards.name], sort_keys=True),  # edits refit
        log:
            f"{RESULTS}/{RUN}/logs/tokenizers/{{name}}.log",
        benchmark:
            f"{RESULTS}/{RUN}/benchmarks/tokenizers/{{name}}.tsv"
        threads: 1
        localrule: True
        shell:
            "{PYTHON:q} -m ibot.tokenizers fit-kmeans --data {params.data:q} --out {output:q} {params.args:q} "
            "> {log:q} 2>&1"
