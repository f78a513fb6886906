"""Configuration: strict merging, JSON-schema validation, dataset checks, per-model stage configs.

Configs are data (YAML). ``config/config.yaml`` is the embedded default; ``config/paper.yaml``
plus ``config/paper/<model>.yaml`` recipes reproduce the paper. Snakemake and the standalone
CLIs both go through this module, so a bad key fails the same way everywhere, before any job.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import yaml

__all__ = ["ConfigError", "deep_merge", "load_yaml", "validate_config", "section_config", "stage_config", "model_spec",
           "check_datasets", "json_or_file", "mapping_arg", "SCHEMA_DIR", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIR = REPO_ROOT / "workflow" / "schemas"


class ConfigError(ValueError):
    """A config problem, with the offending key path in the message."""


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any] | None, *, path: str = "",
               allow_new: bool = False) -> dict[str, Any]:
    """``override`` over ``base`` recursively; keys unknown to ``base`` are errors unless ``allow_new``.

    A key whose base value is a dict merges; any other value is replaced. ``None`` in base means
    "free-form, anything goes".
    """
    merged = copy.deepcopy(dict(base))
    for key, value in (override or {}).items():
        where = f"{path}.{key}" if path else str(key)
        if key not in merged and not allow_new:
            raise ConfigError(f"unknown config key {where!r}; expected one of {sorted(merged)}")
        if isinstance(merged.get(key), dict) and isinstance(value, Mapping) and merged[key]:
            merged[key] = deep_merge(merged[key], value, path=where, allow_new=allow_new)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def json_or_file(text: str) -> dict[str, Any]:
    """A mapping given inline as JSON or as a path to a .json/.yaml file (CLI argument type)."""
    import json

    if text.endswith((".json", ".yaml", ".yml")) and Path(text).is_file():
        return load_yaml(text)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"not a JSON object or an existing .json/.yaml file: {text!r} ({error})") from error
    if not isinstance(value, dict):
        raise ConfigError(f"expected a JSON object, got {type(value).__name__}: {text!r}")
    return value


def mapping_arg(text: str) -> dict[str, Any]:
    """argparse ``type=`` for JSON-or-file mappings: errors become argparse usage errors."""
    import argparse

    try:
        return json_or_file(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ConfigError(f"config file {path}: cannot be read: {error}") from error
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path}: invalid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at top level")
    return data


def _schema() -> dict[str, Any]:
    """The whole config schema: ``config.schema.yaml`` completed from the registries.

    Lists kept elsewhere are filled in, never copied: the stage enum and ``resources.<stage>`` keys
    come from the stage registry (:mod:`ibot.stages`), the architectures from the backbone registry,
    the clusters from the launcher, the dataset keys from :mod:`ibot.data.kinds`, and every stage
    section from its ``<section>.schema.yaml``.
    """
    from ibot.data.kinds import DATASET_KINDS
    from ibot.models.vision_transformer import ARCHITECTURES
    from ibot.run.launcher import CLUSTERS
    from ibot.stages import EVALUATION_STAGES, STAGES, section_schema

    schema = load_yaml(SCHEMA_DIR / "config.schema.yaml")
    properties = schema["properties"]
    stage_enum = {"enum": list(EVALUATION_STAGES)}
    properties["stages"]["items"] = stage_enum
    model = properties["models"]["additionalProperties"]["properties"]
    model["stages"]["items"] = stage_enum
    model["arch"] = {"enum": list(ARCHITECTURES), "description": "backbone (ibot.models.vision_transformer.ARCHITECTURES)"}
    data = properties["data"]["properties"]
    for kind, spec in DATASET_KINDS.items():
        data[kind] = {"type": "string", "description": spec.description}
    schema["$defs"]["resources"]["properties"]["cluster"] = {"enum": list(CLUSTERS)}
    properties["resources"]["properties"].update({name: {"$ref": "#/$defs/resources"} for name in STAGES})
    for section in dict.fromkeys(stage.section for stage in STAGES.values()):
        properties[section] = section_schema(section)
    return schema


def _format_error(error) -> str:
    where = ".".join(str(p) for p in error.absolute_path) or "<top level>"
    if error.validator == "additionalProperties":
        return f"config key {where!r}: {error.message} (not allowed here; check spelling)"
    if error.validator == "enum":
        return f"config key {where!r}: {error.instance!r} is not one of {error.validator_value}"
    if error.validator == "type":
        return f"config key {where!r}: {error.instance!r} is not of type {error.validator_value!r}"
    return f"config key {where!r}: {error.message}"


def validate_config(config: dict[str, Any], *, base_dir: str | Path = ".") -> dict[str, Any]:
    """Validate ``config`` in place (JSON-schema defaults filled) and resolve model recipes."""
    import jsonschema

    models = config.get("models") or {}
    for name, entry in list(models.items()):
        if isinstance(entry, dict) and entry.get("recipe"):
            recipe = load_yaml(Path(base_dir) / entry["recipe"])
            models[name] = deep_merge(recipe, {k: v for k, v in entry.items() if k != "recipe"}, allow_new=True)
    schema = _schema()
    validator_cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {
        "properties": _properties_with_defaults(jsonschema.Draft202012Validator.VALIDATORS["properties"])})
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_format_error(e) for e in errors[:10]))
    return config


def _properties_with_defaults(validate_properties):
    """jsonschema validator that also fills ``default`` values (the documented jsonschema recipe)."""
    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)
    return set_defaults


def model_spec(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    entry = config["models"][model]
    return {"arch": entry["arch"], "patch_size": entry["patch_size"], "depth": entry.get("depth")}


def section_config(config: Mapping[str, Any], section: str, model: str) -> dict[str, Any]:
    """The top-level ``<section>`` with ``models.<model>.overrides.<section>`` applied."""
    overrides = (config["models"][model].get("overrides") or {}).get(section)
    return deep_merge(config.get(section) or {}, overrides, path=f"models.{model}.overrides.{section}")


def stage_config(config: Mapping[str, Any], stage: str, model: str) -> dict[str, Any]:
    """The config one stage runs with for one model (what the workflow passes to its CLI).

    Its section (``config.<section>``, schema defaults filled by :func:`validate_config`) with the
    model's overrides, narrowed to the stage's sub-section (``robustness.<stage>``) and with the
    values the stage fixes (the segmentation head). ``stage`` may also name a section.
    """
    from ibot.stages import STAGES

    spec = STAGES.get(stage)
    if spec is None:
        return section_config(config, stage, model)
    resolved = section_config(config, spec.section, model)
    if spec.subsection:
        resolved = dict(resolved.get(spec.subsection) or {})
    return {**resolved, **spec.fixed}


def check_datasets(config: Mapping[str, Any], kinds: list[str]) -> None:
    """Check the on-disk layout of every external dataset among ``kinds`` (before any job starts)."""
    from ibot.data.layouts import check_layout

    problems = []
    for kind in kinds:
        if not config["data"].get(kind):
            problems.append(f"config key data.{kind}: not set; a planned stage reads this dataset")
            continue
        try:
            check_layout(kind, config["data"][kind], config_key=f"data.{kind}")
        except ValueError as error:
            problems.append(str(error))
    if problems:
        raise ConfigError("dataset problems:\n  " + "\n  ".join(problems))
