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
from ibot.train.pretrain import DEFAULTS as PRETRAIN_DEFAULTS

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
    validated = validate_config(embedded_config, base_dir=ROOT)
    assert validated["pretrain"]["teacher_patch_temp"] == 0.07  # schema default filled
    paper = validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)
    assert paper["models"]["vit_small"]["overrides"]["pretrain"]["epochs"] == 800
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


def test_pretrain_schema_matches_official_flag_defaults():
    schema = load_yaml(ROOT / "workflow" / "schemas" / "pretrain.schema.yaml")
    assert set(schema["properties"]) == set(PRETRAIN_DEFAULTS)
    for key, value in PRETRAIN_DEFAULTS.items():
        assert schema["properties"][key]["default"] == value, key


def test_missing_dataset_directory(tmp_path, embedded_config):
    embedded_config["data"]["imagenet"] = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError) as info:
        check_datasets(embedded_config, ["imagenet"])
    assert "data.imagenet" in str(info.value) and "nowhere" in str(info.value)


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
    # 3 models pretrained, every stage for each
    assert "pretrain" in result.stdout and "embedded_data" not in result.stdout
    counts = {line.split()[0]: int(line.split()[1]) for line in result.stdout.splitlines()
              if len(line.split()) == 2 and line.split()[1].isdigit()}
    assert counts["pretrain"] == 3 and counts.get("knn") == 3, result.stdout
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
