"""Config validation and workflow planning: bad input fails early with a message naming the key."""

from __future__ import annotations

import copy
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ibot.config import ConfigError, check_datasets, deep_merge, load_yaml, validate_config
from ibot.stages import stage_defaults

PRETRAIN_DEFAULTS = stage_defaults("pretrain")

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = [sys.executable, "-m", "snakemake"]


@pytest.fixture()
def embedded_config() -> dict:
    return load_yaml(ROOT / "config" / "config.yaml")


def _error(config: dict) -> str:
    with pytest.raises(ConfigError) as info:
        validate_config(config, base_dir=ROOT)
    return str(info.value)


def test_default_and_paper_configs_validate(embedded_config):
    from ibot.config import stage_config

    written = copy.deepcopy(embedded_config["pretrain"])
    validated = validate_config(embedded_config, base_dir=ROOT)
    assert validated["pretrain"] == written  # a stage section holds only what the file says ...
    assert stage_config(validated, "pretrain", "vit_tiny")["teacher_patch_temp"] == 0.07  # ... defaults on resolution
    paper = validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)
    assert paper["models"]["vit_small"]["recipe_overrides"]["pretrain"]["epochs"] == 800
    assert paper["models"]["vit_small"]["overrides"] == {}
    assert paper["models"]["vit_base"]["arch"] == "vit_base"


def test_unknown_key_is_named(embedded_config):
    embedded_config["pretrain"]["teacher_tmp"] = 0.07
    assert "pretrain" in _error(embedded_config) and "teacher_tmp" in _error(copy.deepcopy(embedded_config))


def test_wrong_type_is_named(embedded_config):
    embedded_config["pretrain"]["epochs"] = "ten"
    message = _error(embedded_config)
    assert "pretrain.epochs" in message and "integer" in message


def test_unknown_architecture_is_named(embedded_config):
    embedded_config["models"]["vit_tiny"]["arch"] = "vit_huge"
    message = _error(embedded_config)
    assert "models.vit_tiny.arch" in message and "vit_huge" in message


def test_unknown_stage_is_named(embedded_config):
    embedded_config["stages"] = ["knn", "knm"]
    assert "stages.1" in _error(embedded_config)


#: argparse defaults of bytedance/ibot main_ibot.py (commit da316d8), transcribed with their lines.
OFFICIAL_MAIN_IBOT_DEFAULTS = {
    "out_dim": (8192, 48), "patch_out_dim": (8192, 50), "shared_head": (False, 52),
    "shared_head_teacher": (True, 55), "norm_last_layer": (True, 57), "momentum_teacher": (0.996, 61),
    "norm_in_head": (None, 64), "act_in_head": ("gelu", 66), "use_masked_im_modeling": (True, 68),
    "pred_ratio": (0.3, 70), "pred_ratio_var": (0, 72), "pred_shape": ("block", 74), "pred_start_epoch": (0, 75),
    "lambda1": (1.0, 77), "lambda2": (1.0, 79), "warmup_teacher_temp": (0.04, 83), "teacher_temp": (0.04, 86),
    "warmup_teacher_patch_temp": (0.04, 89), "teacher_patch_temp": (0.07, 91), "warmup_teacher_temp_epochs": (30, 93),
    "use_fp16": (True, 97), "weight_decay": (0.04, 101), "weight_decay_end": (0.4, 103), "clip_grad": (3.0, 106),
    "batch_size_per_gpu": (128, 109), "epochs": (100, 111), "freeze_last_layer": (1, 112), "lr": (0.0005, 115),
    "warmup_epochs": (10, 118), "min_lr": (1e-6, 120), "optimizer": ("adamw", 122), "load_from": (None, 124),
    "drop_path": (0.1, 125), "global_crops_number": (2, 128), "global_crops_scale": ([0.14, 1.0], 130),
    "local_crops_number": (0, 134), "local_crops_scale": ([0.05, 0.4], 137), "saveckp_freq": (40, 145),
    "seed": (0, 146), "num_workers": (10, 147),
}
#: Settings of ours that are not official flags (documented in pretrain.schema.yaml).
REPRODUCTION_SETTINGS = {"global_crops_size", "local_crops_size", "precision", "log_every", "head_hidden_dim",
                         "global_batch_size", "batch_rescale", "augmentation", "compile"}
#: Ablation knobs (paper Tab. 17/18, App. E); their defaults are the official behaviour.
ABLATION_SETTINGS = {"head_sharing": ("flags", "models/head.py:161-179, main_ibot.py:233,243"),
                     "patch_center_momentum": (0.9, "main_ibot.py:482 center_momentum2"),
                     "patch_centering": (True, "main_ibot.py:535"), "patch_targets": ("soft", "main_ibot.py:535")}
#: Ablation settings of ours (paper Tab. 9/20 offline MIM targets, ibot/tokenizers.py); defaults = official.
MIM_TARGET_SETTINGS = {"mim_target", "mim_tokenizer"}


def test_pretrain_defaults_equal_the_official_main_ibot_flags():
    """The defaults every pretraining run starts from (schema -> DEFAULTS) are main_ibot.py's."""
    assert set(PRETRAIN_DEFAULTS) == (set(OFFICIAL_MAIN_IBOT_DEFAULTS) | REPRODUCTION_SETTINGS | set(ABLATION_SETTINGS)
                                      | MIM_TARGET_SETTINGS)
    for key, (official, where) in ABLATION_SETTINGS.items():
        assert PRETRAIN_DEFAULTS[key] == official, f"pretrain.{key}: ours {PRETRAIN_DEFAULTS[key]!r} ({where})"
    assert PRETRAIN_DEFAULTS["mim_target"] == "online" and PRETRAIN_DEFAULTS["mim_tokenizer"] is None  # official
    for key, (official, line) in OFFICIAL_MAIN_IBOT_DEFAULTS.items():
        assert PRETRAIN_DEFAULTS[key] == official, f"pretrain.{key}: ours {PRETRAIN_DEFAULTS[key]!r}, official " \
            f"{official!r} (bytedance/ibot main_ibot.py:{line})"


def test_missing_dataset_directory(tmp_path, embedded_config):
    embedded_config["data"]["imagenet"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        check_datasets(embedded_config, ["imagenet"])
    assert "data.imagenet" in str(info.value) and "nowhere" in str(info.value)


def test_unset_dataset_key_is_named(embedded_config):
    embedded_config["data"].pop("imagenet_r", None)
    with pytest.raises(ConfigError, match="data.imagenet_r: not set"):
        check_datasets(embedded_config, ["imagenet_r"])


def test_wrong_dataset_layout(tmp_path, embedded_config):
    (tmp_path / "imagenet" / "images").mkdir(parents=True)
    embedded_config["data"]["imagenet"] = str(tmp_path / "imagenet")
    with pytest.raises(ConfigError) as info:
        check_datasets(embedded_config, ["imagenet"])
    assert "train" in str(info.value) and "data.imagenet" in str(info.value)


def test_deep_merge_rejects_unknown_and_keeps_base():
    base = {"a": 1, "b": {"c": 2}}
    assert deep_merge(base, {"b": {"c": 3}}) == {"a": 1, "b": {"c": 3}}
    assert base["b"]["c"] == 2
    with pytest.raises(ConfigError, match="x.b.d"):
        deep_merge(base, {"b": {"d": 1}}, path="x")


def _dry_run(*extra: str) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run([*SNAKEMAKE, "-n", "--forceall", "--quiet", "rules", *extra], cwd=ROOT, capture_output=True, text=True)
    return result, time.perf_counter() - start


def test_snakemake_plans_embedded_default():
    result, _ = _dry_run()
    assert result.returncode == 0, result.stderr
    assert "pretrain" in result.stdout and "embedded_data" in result.stdout


def test_snakemake_plans_the_whole_paper_without_datasets():
    result, seconds = _dry_run("--configfile", "config/paper.yaml")
    assert result.returncode == 0, result.stderr
    # 3 ViTs + the out_dim-1000 ViT-S/16 of Tab.5 + 3 IN-22K + 2 no-multi-crop + 2 random-mask ViTs + 2 Swin-T
    # pretrained, every stage each has a recipe for; the FT 512/384 models fine-tune vit_large_in22k's teacher
    assert "pretrain" in result.stdout and "embedded_data" not in result.stdout
    counts = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["pretrain"] == 13 and counts.get("knn") == 12 and counts.get("unsupervised") == 1, result.stdout
    assert counts.get("retrieval") == 1 and counts.get("video_segmentation") == 1, result.stdout
    assert counts.get("semi_supervised") == 1 and counts.get("transfer_cars") == 2 and counts.get("detection") == 3
    print(f"paper DAG planned in {seconds:.2f}s")


def test_real_run_refuses_missing_datasets(tmp_path):
    """Without -n, the onstart check refuses before any job: names the key and the path."""
    config = load_yaml(ROOT / "config" / "paper.yaml")
    config["results_dir"] = str(tmp_path / "results")
    path = tmp_path / "paper.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([*SNAKEMAKE, "--configfile", str(path), "-c1", "--quiet"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0
    assert "data.imagenet" in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


# -- the registries: one source for every list ---------------------------------------------------------


def test_schema_lists_come_from_the_registries():
    from dataclasses import fields

    from ibot.config import _schema
    from ibot.data.kinds import DATASET_KINDS
    from ibot.models.vision_transformer import ARCHITECTURES
    from ibot.run.launcher import CLUSTERS, Resources
    from ibot.stages import EVALUATION_STAGES, STAGES

    schema = _schema()
    properties = schema["properties"]
    assert properties["stages"]["items"]["enum"] == list(EVALUATION_STAGES)
    model = properties["models"]["additionalProperties"]["properties"]
    assert model["stages"]["items"]["enum"] == list(EVALUATION_STAGES)
    assert model["arch"]["enum"] == list(ARCHITECTURES)
    assert set(properties["resources"]["properties"]) == {"default", *STAGES}
    assert schema["$defs"]["resources"]["properties"]["cluster"]["enum"] == list(CLUSTERS)
    # the launcher's Resources fields are the schema's resources keys (one checked against the other)
    assert set(schema["$defs"]["resources"]["properties"]) == {f.name for f in fields(Resources)}
    assert set(properties["data"]["properties"]) == {"embedded", *DATASET_KINDS}
    assert {stage.section for stage in STAGES.values()} <= set(properties)


def test_every_registered_stage_has_a_run_function_and_a_command_line():
    """Registry -> job side: every entry's ``run(ctx)`` imports, its datasets and needs exist, and the one
    command line has a sub-command with exactly the entry's needs; no stage module keeps defaults or a CLI."""
    import inspect

    from ibot.data.kinds import DATASET_KINDS
    from ibot.run.cli import build_parser
    from ibot.run.launcher import resolve_entry
    from ibot.stages import STAGES

    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == list(STAGES)
    for name, stage in STAGES.items():
        run = resolve_entry(stage.entry)
        assert list(inspect.signature(run).parameters) == ["ctx"], name
        module = inspect.getmodule(run)
        assert not hasattr(module, "DEFAULTS") and not hasattr(module, "main"), name
        assert set(stage.datasets) <= set(DATASET_KINDS), name
        assert all(other in STAGES for other, _ in stage.needs.values()), name
        flags = {a.dest for a in commands[name]._actions}
        assert set(stage.needs) <= flags and ("checkpoint" in flags) != stage.exports_backbone, name


def test_resolved_stage_configs_are_what_the_rules_pass(embedded_config):
    """stage_config (the rules' --config JSON): section + model overrides, sub-section, fixed values."""
    from ibot.config import stage_config

    embedded_config["models"]["vit_tiny"]["overrides"] = {"segmentation": {"iters": 7},
                                                          "robustness": {"occlusion": {"ratios": [0.5]}}}
    config = validate_config(embedded_config, base_dir=ROOT)
    upernet = stage_config(config, "seg_upernet", "vit_tiny")
    linear_head = stage_config(config, "seg_linear", "vit_tiny")
    assert (upernet["head"], linear_head["head"]) == ("upernet", "linear")
    assert upernet["iters"] == linear_head["iters"] == 7
    assert stage_config(config, "seg_upernet", "vit_tiny_random")["iters"] == config["segmentation"]["iters"]
    occlusion = stage_config(config, "occlusion", "vit_tiny")
    assert occlusion["ratios"] == [0.5] and occlusion["batch_size"] == config["robustness"]["occlusion"]["batch_size"]
    assert "imagenet_c" not in occlusion  # the sub-section only
    assert stage_config(config, "pretrain", "vit_tiny")["lr"] == config["pretrain"]["lr"]


def test_generated_rules_are_listed_with_logs_and_commands():
    """Every registry stage is a named Snakemake rule running its command with its own log."""
    from ibot.stages import STAGES

    listed = subprocess.run([*SNAKEMAKE, "--list-rules"], cwd=ROOT, capture_output=True, text=True)
    assert listed.returncode == 0, listed.stderr
    rules = set(listed.stdout.split())
    assert set(STAGES) <= rules
    plan = subprocess.run([*SNAKEMAKE, "-n", "-p", "--forceall"], cwd=ROOT,
                          capture_output=True, text=True)
    assert plan.returncode == 0, plan.stderr
    text = plan.stdout
    ablations = subprocess.run([*SNAKEMAKE, "-n", "-p", "--forceall", "--configfile",
                                "config/ablations_embedded.yaml"], cwd=ROOT, capture_output=True, text=True)
    assert ablations.returncode == 0, ablations.stderr
    # planned by the embedded ablations, not by the embedded default (Fig. 5's analysis)
    elsewhere = {"linear_part": (ablations.stdout, "emb_ibot")}
    for name, stage in STAGES.items():
        if name == "imagenet_r":  # not planned by the embedded default (no embedded ImageNet-R)
            continue
        plan_text, model = elsewhere.get(name, (text, "vit_tiny"))
        assert f"-m downstream {name} --data " in plan_text, name  # the one command line, torch-free launcher
        assert f"logs/{model}/{name}.log" in plan_text, name
    assert "-m downstream occlusion --data" in text and "--head results/embedded/vit_tiny/linear/head.pth" in text


def test_layers_precedence_and_origins_as_explain_prints_them(tmp_path):
    """default < model recipe < run config (section, models.<m>.overrides over it) < command line."""
    from ibot.config import explain_stage, load_workflow_config, stage_config

    extra = tmp_path / "mine.yaml"
    extra.write_text("finetune: {warmup_epochs: 7}\n")
    config, sources = load_workflow_config(
        [ROOT / "config" / "paper.yaml", extra],
        ["finetune={epochs: 3, opt_betas: [0.9, 0.99]}", "models={vit_base: {overrides: {finetune: {layer_decay: 0.7}}}}"])
    resolved = stage_config(config, "finetune", "vit_base")
    assert resolved["epochs"] == 3 and resolved["opt_betas"] == [0.9, 0.99]  # nested --config values typed
    assert resolved["layer_decay"] == 0.7 and resolved["drop_path"] == 0.2 and resolved["warmup_epochs"] == 7
    rows = {row["key"]: row for row in explain_stage(config, "finetune", "vit_base", sources)}
    assert set(rows) == set(resolved)
    assert (rows["epochs"]["origin"], rows["epochs"]["where"]) == ("command line", "--config: finetune")
    assert rows["layer_decay"]["where"] == "--config: models.vit_base.overrides.finetune"
    assert (rows["warmup_epochs"]["origin"], rows["warmup_epochs"]["where"]) == ("config file", f"{extra}: finetune")
    assert (rows["drop_path"]["origin"], rows["drop_path"]["where"]) == \
        ("model recipe", "config/paper/vit_base.yaml: overrides.finetune")
    assert rows["lr"]["origin"] == "default" and rows["lr"]["where"] == "workflow/schemas/finetune.schema.yaml"
    seg = {row["key"]: row for row in explain_stage(config, "seg_linear", "vit_large", sources)}
    assert seg["head"]["origin"] == "stage" and seg["linear.lr"]["value"] == 2e-5
    assert seg["linear.lr"]["origin"] == "model recipe"


def test_explain_shows_the_peak_lr_of_each_linear_scaling_rule():
    """The lr a scaling rule derives is shown with its rule and source (derived), never applied unseen:
    transfer lr x batch / 512 (eval_cls.py:690), pretraining lr x global batch / 256 (main_ibot.py:306)."""
    from ibot.config import LR_SCALING, explain_stage, load_workflow_config, scaled_lr, stage_config

    config, sources = load_workflow_config([ROOT / "config" / "paper.yaml"])
    transfer = stage_config(config, "transfer_cifar10", "vit_base")
    rows = {r["key"]: r for r in explain_stage(config, "transfer_cifar10", "vit_base", sources)}
    assert rows["lr (peak)"]["origin"] == "derived" and "eval_cls.py:690" in rows["lr (peak)"]["where"]
    assert rows["lr (peak)"]["value"] == transfer["lr"] * transfer["batch_size"] / 512
    semi = {r["key"]: r for r in explain_stage(config, "semi_supervised", "vit_small", sources)}
    assert semi["finetune.lr (peak)"]["value"] == scaled_lr("semi_supervised.finetune",
                                                          semi["finetune.lr"]["value"], semi["finetune.batch_size"]["value"])
    pretrain = {r["key"]: r for r in explain_stage(config, "pretrain", "vit_base", sources)}
    assert pretrain["lr (peak)"]["value"] == pytest.approx(pretrain["lr"]["value"] * 1024 / 256)
    assert "finetune" not in LR_SCALING  # run_class_finetuning.py uses its lr as given: no derived row
    assert not any(r["origin"] == "derived" for r in explain_stage(config, "finetune", "vit_base", sources))


def test_explain_command_prints_every_value_with_its_origin():
    result = subprocess.run([sys.executable, "-m", "ibot.config", "explain", "--configfile", "config/paper.yaml",
                             "--model", "vit_large", "--stage", "seg_upernet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[1:]}
    assert lines["upernet.layer_decay"][:2] == ["0.95", "model"] and lines["iters"][:2] == ["160000", "default"]
    bad = subprocess.run([sys.executable, "-m", "ibot.config", "explain", "--model", "vit_huge", "--stage", "knn"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--model 'vit_huge'" in bad.stderr


def test_recipe_values_are_validated_with_their_path(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("arch: vit_small\noverrides:\n  finetune: {epochs: many}\n")
    config = load_yaml(ROOT / "config" / "config.yaml")
    config["models"] = {"m": {"recipe": str(recipe)}}
    assert "models.m.recipe_overrides.finetune.epochs" in _error(config)
    recipe.write_text("arch: vit_small\noverrides:\n  finetune: {epoch: 3}\n")
    assert "models.m.recipe_overrides.finetune" in _error(load_yaml(ROOT / "config" / "config.yaml") | {
        "models": {"m": {"recipe": str(recipe)}}})
