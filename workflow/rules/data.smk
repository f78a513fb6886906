# Embedded datasets in the real on-disk layouts (ibot.data.kinds: ImageNet, COCO 2017, ADE20K,
# ImageNet-C/-A/-9), generated deterministically when data.embedded.generate is true. External
# datasets are checked for their layout before any job starts (onstart), so a real run refuses early.
from ibot.config import check_datasets, check_stage_configs
from ibot.data.kinds import EMBEDDED_KINDS

EMBEDDED_SIZE_ARGS = [f"{key}={value}" for key, value in sorted(EMBEDDED["sizes"].items())]


def _size_args():
    return [arg for item in EMBEDDED_SIZE_ARGS for arg in ("--size", item)]


if EMBEDDED["generate"]:

    rule embedded_data:
        output:
            expand("{root}/{name}.complete", root=EMBEDDED["root"], name=EMBEDDED_KINDS),
        params:
            root=EMBEDDED["root"],
            seed=EMBEDDED["seed"],
            workers=EMBEDDED["workers"],
            sizes=_size_args(),
        log:
            f"{RESULTS}/{RUN}/logs/embedded_data.log",
        benchmark:
            f"{RESULTS}/{RUN}/benchmarks/embedded_data.tsv"
        threads: EMBEDDED["workers"]
        localrule: True
        shell:
            "{PYTHON:q} -m ibot.data.embedded --out {params.root:q} --seed {params.seed} "
            "--workers {params.workers} {params.sizes:q} > {log:q} 2>&1 && touch {output:q}"


def _external_datasets():
    """Datasets the planned stages read that the workflow does not generate."""
    needed = {"imagenet"}  # the results' attention maps read ImageNet val images for every model
    for model in MODELS:
        for name in model_stages(model):
            needed |= set(data_kinds(REGISTRY[name], model))
    if EMBEDDED["generate"]:
        needed = {kind for kind in needed if not DATASET_KINDS[kind].embedded}
    return sorted(needed)


onstart:  # real runs only (a dry run plans without datasets or external files)
    check_datasets(config, _external_datasets())
    check_stage_configs(config)
