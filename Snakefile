# iBOT reproduction workflow. Default target: `rule all` (every enabled stage for every model).
#   snakemake                                   # embedded default (config/config.yaml)
#   snakemake --configfile config/paper.yaml    # the paper: ViT-S/16, ViT-B/16, ViT-L/16
# Profiles: profiles/default is the one Snakemake reads by itself (profiles/ next to this Snakefile);
# `--workflow-profile slurm` picks profiles/slurm.
from ibot.config import validate_config

# A --configfile replaces the embedded default instead of being merged into it (Snakemake would
# otherwise deep-merge, leaking the embedded models into the paper run).
if not workflow.config_settings.configfiles:
    configfile: "config/config.yaml"

validate_config(config, base_dir=workflow.basedir)

include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/tokenizers.smk"  # offline MIM tokenizers (k-means), top-level `tokenizers`
include: "workflow/rules/stages.smk"  # one rule per stage of the registry (ibot/stages.py)
include: "workflow/rules/results.smk"


rule all:
    default_target: True
    input:
        all_targets(),
