"""Configuration: strict merging, JSON-schema validation, dataset checks, per-model stage configs.

Configs are data (YAML). ``config/config.yaml`` is the embedded default; ``config/paper.yaml``
plus ``config/paper/<model>.yaml`` recipes reproduce the paper. Snakemake and the stage command line
both go through this module, so a bad key fails the same way everywhere, before any job.

The config one stage runs with for one model is resolved once, in layers, later ones winning
(:func:`section_layers`; the table is in ``docs/adding-a-stage.md``):

1. ``default``: the section's JSON schema (``workflow/schemas/<section>.schema.yaml``);
2. ``model recipe``: ``overrides.<section>`` of the model's recipe file (``config/paper/*.yaml``:
   the one place where per-model paper values live, each with its source);
3. ``run config``: the workflow config's top-level ``<section>`` with ``models.<model>.overrides.
   <section>`` over it, as one overlay (a value Snakemake's ``--config`` set shows as ``command line``);

and the values a stage fixes (the segmentation head) on top. A standalone ``python -m downstream
<stage> --config`` is the run config over the defaults. Top-level sections are validated but never
filled with defaults, so a value in the config file is always one the user wrote. The job receives
the resolved config and merges nothing. Values a recipe derives from others (the peak lr of the
linear scaling rules, :data:`LR_SCALING`) are shown by ``python -m ibot.config explain`` with their
rule and source, next to every resolved value and its origin.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ibot.models.specs import ModelSpec

__all__ = ["ConfigError", "deep_merge", "load_yaml", "validate_config", "section_layers", "section_config",
           "stage_config", "resolve_stage_config", "explain_stage", "stage_resources", "global_batch", "model_spec",
           "pretrain_data", "stage_data", "LR_SCALING", "scaled_lr",
           "check_datasets",
           "check_stage_configs", "planned_stages", "skipped_models",
           "json_or_file", "mapping_arg", "parse_config_overrides", "update_config", "load_workflow_config",
           "SCHEMA_DIR", "REPO_ROOT"]

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


def _without_defaults(node: Any) -> Any:
    """A schema with every ``default`` removed: it validates a mapping without filling it."""
    if isinstance(node, dict):
        return {key: _without_defaults(value) for key, value in node.items() if key != "default"}
    if isinstance(node, list):
        return [_without_defaults(value) for value in node]
    return node


def _schema() -> dict[str, Any]:
    """The whole config schema: ``config.schema.yaml`` completed from the registries.

    Lists kept elsewhere are filled in, never copied: the stage enum and ``resources.<stage>`` keys
    come from the stage registry (:mod:`ibot.stages`), the architectures from the backbone registry,
    the clusters from the launcher, the dataset keys from :mod:`ibot.data.kinds`, and every stage
    section from its ``<section>.schema.yaml``. Stage sections (top level, a model's ``overrides``
    and its recipe's) are validated without their defaults: :func:`section_config` fills those.
    """
    from ibot.data.kinds import DATASET_KINDS
    from ibot.models.specs import ARCHITECTURES
    from ibot.run.launcher import CLUSTERS
    from ibot.stages import EVALUATION_STAGES, STAGES, section_schema

    schema = load_yaml(SCHEMA_DIR / "config.schema.yaml")
    properties = schema["properties"]
    stage_enum = {"enum": list(EVALUATION_STAGES)}
    properties["stages"]["items"] = stage_enum
    properties["fresh"]["items"] = {"enum": list(STAGES)}
    model = properties["models"]["additionalProperties"]["properties"]
    model["stages"]["items"] = stage_enum
    model["unsupported_stages"]["propertyNames"] = stage_enum
    model["unreported_stages"]["propertyNames"] = stage_enum
    model["arch"] = {"enum": list(ARCHITECTURES), "description": "backbone (ibot.models.specs.ARCHITECTURES)"}
    data = properties["data"]["properties"]
    for kind, spec in DATASET_KINDS.items():
        data[kind] = {"type": "string", "description": spec.description}
    schema["$defs"]["resources"]["properties"]["cluster"] = {"enum": list(CLUSTERS)}
    per_stage = {name: {"$ref": "#/$defs/resources"} for name in STAGES}
    properties["resources"]["properties"].update(per_stage)
    model["resources"]["properties"] = per_stage
    sections = {}
    for section in dict.fromkeys(stage.section for stage in STAGES.values()):
        sections[section] = _without_defaults(section_schema(section))
        properties[section] = sections[section]
    for key in ("overrides", "recipe_overrides"):
        model[key].update(additionalProperties=False, properties=sections)
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


def _apply_recipe(name: str, entry: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """A model entry with its recipe file merged under it (entry keys win); the recipe's
    ``overrides`` are kept apart as ``recipe_overrides``, the lowest layer above the defaults, and its
    ``unverified`` marks as ``recipe_unverified`` (:func:`unverified_values`)."""
    for key, own in (("recipe_overrides", "overrides"), ("recipe_unverified", "unverified")):
        if entry.get(key) and not entry.get("recipe"):
            raise ConfigError(f"config key models.{name}.{key}: set from the recipe file, not by hand; "
                              f"use models.{name}.{own}")
    if not entry.get("recipe"):
        return entry
    recipe = load_yaml(base_dir / entry["recipe"])
    recipe_overrides = recipe.pop("overrides", None) or {}
    recipe_unverified = recipe.pop("unverified", None) or {}
    if "recipe" in recipe:
        raise ConfigError(f"recipe {entry['recipe']}: a recipe cannot name another recipe")
    merged = deep_merge(recipe, entry, allow_new=True)
    merged["recipe_overrides"] = recipe_overrides
    merged["recipe_unverified"] = recipe_unverified
    return merged


def _apply_timm_model(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """A model entry naming ``timm_model``: ``arch`` from the name (it must agree when set), ``patch_size`` and
    ``window_size`` from the name unless the entry sets them (timm's ``model_args`` can change them too),
    ``weights: checkpoint`` unless set; a ``checkpoint`` folder's ``config.json`` must name that architecture."""
    timm_model = entry.get("timm_model")
    if not timm_model:
        return entry
    from ibot.models.specs import spec_from_timm_name

    try:
        spec = spec_from_timm_name(str(timm_model))
    except ValueError as error:
        raise ConfigError(f"config key models.{name}.timm_model: {error}") from None
    if entry.get("arch", spec.arch) != spec.arch:
        raise ConfigError(f"config key models.{name}.arch: {entry['arch']!r} but timm_model {timm_model!r} is "
                          f"{spec.arch!r} (leave arch out: it follows from timm_model)")
    entry = {"arch": spec.arch, "patch_size": spec.patch_size, "weights": "checkpoint", **entry}
    if spec.window_size is not None:
        entry.setdefault("window_size", spec.window_size)
    folder_config = Path(str(entry.get("checkpoint") or "")) / "config.json"
    if entry.get("checkpoint") and folder_config.is_file():
        import json

        try:
            architecture = str(json.loads(folder_config.read_text()).get("architecture", ""))
        except ValueError as error:
            raise ConfigError(f"config key models.{name}.checkpoint: {folder_config} is not JSON: {error}") from None
        if architecture.split(".")[0] != str(timm_model).split(".")[0]:
            raise ConfigError(f"config key models.{name}.timm_model: {timm_model!r} but {folder_config} says "
                              f"architecture {architecture!r}")
    return entry


_YAML_TYPES = {"integer": int, "number": (int, float), "boolean": bool, "null": type(None), "array": list}


def _coerce_strings(instance: Any, schema: Mapping[str, Any], defs: Mapping[str, Any]) -> Any:
    """Strings where the schema wants no string are read as YAML (``"3"`` -> 3, ``"[1, 2]"`` -> [1, 2]).

    Snakemake's ``--config`` parses nested values with YAML's BaseLoader, so
    ``--config finetune='{epochs: 3}'`` arrives as ``{"epochs": "3"}``; this gives such values their
    type (a value that still does not fit is left for the validator to report).
    """
    if "$ref" in schema:
        schema = defs.get(schema["$ref"].rsplit("/", 1)[-1], {})
    if isinstance(instance, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key, value in instance.items():
            sub = properties.get(key, extra if isinstance(extra, Mapping) else None)
            if sub is not None:
                instance[key] = _coerce_strings(value, sub, defs)
        return instance
    if isinstance(instance, list) and isinstance(schema.get("items"), Mapping):
        return [_coerce_strings(value, schema["items"], defs) for value in instance]
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    if isinstance(instance, str) and types and "string" not in types:
        try:
            value = yaml.safe_load(instance)
        except yaml.YAMLError:
            return instance
        wanted = tuple(t for name in types for t in ((_YAML_TYPES.get(name),) if not isinstance(
            _YAML_TYPES.get(name), tuple) else _YAML_TYPES[name]) if t is not None)
        if wanted and isinstance(value, wanted) and not (isinstance(value, bool) and bool not in wanted):
            return _coerce_strings(value, schema, defs)
    return instance


def validate_config(config: dict[str, Any], *, base_dir: str | Path = ".") -> dict[str, Any]:
    """Validate ``config`` in place (JSON-schema defaults filled outside the stage sections), resolve
    model recipes, and check what must hold before any job (the pretraining global batches)."""
    import jsonschema

    models = config.get("models") or {}
    for name, entry in list(models.items()):
        if isinstance(entry, dict):
            models[name] = _apply_timm_model(name, _apply_recipe(name, entry, Path(base_dir)))
    schema = _schema()
    _coerce_strings(config, schema, schema.get("$defs") or {})
    validator_cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {
        "properties": _properties_with_defaults(jsonschema.Draft202012Validator.VALIDATORS["properties"])})
    errors = sorted(validator_cls(schema).iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        raise ConfigError("invalid config:\n  " + "\n  ".join(_format_error(e) for e in errors[:10]))
    problems = []
    for name in models:
        problems += _unsupported_stage_problems(config, name)
        problems += _weights_problems(config, name)
        problems += _unverified_problems(config, name)
        if models[name]["weights"] == "pretrain":
            try:
                global_batch(config, name)
            except ConfigError as error:
                problems.append(str(error))
    problems += _ablation_problems(config)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
    return config


def _ablation_problems(config: Mapping[str, Any]) -> list[str]:
    """Ablation setting ids (``models.<m>.ablation``, ``ablation_not_planned``) must name a row of
    results/reference/ablation_settings.csv; ``models.<m>.ablation_gain_over`` another model of the config."""
    import csv

    problems = [f"config key models.{m}.ablation_gain_over: {e['ablation_gain_over']!r} is not a model of this "
                f"config (models: {sorted(config['models'])})" for m, e in config["models"].items()
                if e.get("ablation_gain_over") and (e["ablation_gain_over"] not in config["models"]
                                                    or e["ablation_gain_over"] == m)]
    named = [(f"models.{m}.ablation", s) for m, e in config["models"].items() for s in e.get("ablation") or []]
    named += [("ablation_not_planned", s) for s in config.get("ablation_not_planned") or {}]
    if not named:
        return problems
    with open(REPO_ROOT / "results" / "reference" / "ablation_settings.csv", newline="") as handle:
        known = {row["setting"] for row in csv.DictReader(handle)}
    return problems + [f"config key {key}: {setting!r} is not an ablation setting "
                       f"(results/reference/ablation_settings.csv)" for key, setting in named if setting not in known]


def _weights_problems(config: Mapping[str, Any], model: str) -> list[str]:
    """``weights: checkpoint`` needs exactly one source: a file (``checkpoint``) or another model's
    pretraining in this run (``weights_from``, a model with ``weights: pretrain``)."""
    entry = config["models"][model]
    source, other = entry.get("checkpoint"), entry.get("weights_from")
    if entry.get("network", "teacher") != "teacher" and (entry["weights"] == "random" or source):
        return [f"config key models.{model}.network: {entry['network']!r} picks a backbone this workflow's "
                f"pretraining exports (weights: pretrain or weights_from); for an external file use checkpoint_key"]
    if entry["weights"] != "checkpoint":
        return [f"config key models.{model}.{key}: set, but weights is {entry['weights']!r} (use weights: "
                f"checkpoint)" for key, value in (("weights_from", other),) if value]
    if bool(source) == bool(other):
        return [f"config key models.{model}: weights: checkpoint needs exactly one of checkpoint (a weights file) "
                f"or weights_from (a model of this config whose pretraining it evaluates)"]
    if other and (config["models"].get(other) or {}).get("weights") != "pretrain":
        return [f"config key models.{model}.weights_from: {other!r} is not a model with weights: pretrain in "
                f"this config (models: {sorted(config['models'])})"]
    return []


def _properties_with_defaults(validate_properties):
    """jsonschema validator that also fills ``default`` values (the documented jsonschema recipe)."""
    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)
    return set_defaults


def _unsupported_stage_problems(config: Mapping[str, Any], model: str) -> list[str]:
    """A model's recipe may declare stages the paper has no recipe for (``unsupported_stages``:
    stage -> why); naming one in the model's own ``stages`` is an error that gives the reason."""
    entry = config["models"][model]
    unsupported = entry.get("unsupported_stages") or {}
    return [f"config key models.{model}.stages: {stage!r} has no recipe for this model ({unsupported[stage]}); "
            f"remove it from models.{model}.stages" for stage in entry.get("stages") or [] if stage in unsupported]


def unverified_values(config: Mapping[str, Any], model: str, stage: str | None = None) -> dict[str, str]:
    """Recipe values of ``model`` no source readable offline confirms: ``{"<section>.<key>" or model key:
    what would verify it}``. The recipe file's marks hold except on keys the model's own ``overrides``
    set; the model entry's ``unverified`` adds to them.

    With ``stage``: only the marks that shape that stage's number: the model keys, the pretraining it
    evaluates (its own, or that of its ``weights_from`` model) and the stage's own section (its
    sub-section, its segmentation head).
    """
    from ibot.stages import BACKBONE_STAGE, STAGES

    entry = config["models"][model]
    own = entry.get("overrides") or {}
    marks = {key: why for key, why in (entry.get("recipe_unverified") or {}).items()
             if not _has_path(own, tuple(key.split(".")))}
    marks.update(entry.get("unverified") or {})
    if stage is None:
        return marks
    spec = STAGES[stage]
    sections = {STAGES[name].section for name in STAGES}
    scope = (spec.section, spec.subsection) if spec.subsection else (spec.section,)
    head = spec.fixed.get("head")
    relevant = {}
    for key, why in marks.items():
        path = tuple(key.split("."))
        if path[0] not in sections:  # a model key (network, ...)
            relevant[key] = why
        elif path[:len(scope)] == scope and not (head and len(path) > 2 and path[1] in _SEG_HEADS and path[1] != head):
            relevant[key] = why
        elif path[0] == BACKBONE_STAGE.section and entry["weights"] in BACKBONE_STAGE.weights:
            relevant[key] = why
    source = entry.get("weights_from")
    if source and stage != BACKBONE_STAGE.name:  # the pretraining it evaluates is another model's
        relevant.update({key: f"{why} ({source}'s pretraining)"
                         for key, why in unverified_values(config, source, BACKBONE_STAGE.name).items()
                         if key.split(".")[0] == BACKBONE_STAGE.section})
    return relevant


#: The segmentation section's per-head sub-sections (a seg stage's marks are those of its own head).
_SEG_HEADS = ("upernet", "linear")


def _unverified_problems(config: Mapping[str, Any], model: str) -> list[str]:
    """Every mark must name a value: a model key, or ``<section>.<key>`` of a stage section's schema."""
    from ibot.stages import STAGES, section_schema

    model_keys = set(_schema()["properties"]["models"]["additionalProperties"]["properties"])
    sections = {STAGES[name].section for name in STAGES}
    entry = config["models"][model]
    problems = []
    for key in {**(entry.get("recipe_unverified") or {}), **(entry.get("unverified") or {})}:
        path = key.split(".")
        node: Any = section_schema(path[0]) if path[0] in sections else None
        for part in path[1:] if node is not None else []:
            node = (node.get("properties") or {}).get(part) if isinstance(node, Mapping) else None
        if not (node is not None or (len(path) == 1 and key in model_keys)):
            where = f"{entry['recipe']}: unverified" if key in (entry.get("recipe_unverified") or {}) else \
                f"config key models.{model}.unverified"
            problems.append(f"{where}: {key!r} names no config value (a model key, or <section>.<key> of "
                            f"workflow/schemas/<section>.schema.yaml)")
    return problems


def planned_stages(config: Mapping[str, Any], model: str) -> list[str]:
    """The stages a model runs: the backbone stage (pretraining) for the models it applies to, then its own
    ``stages`` list, else the top-level ``stages`` without those its recipe declares unsupported (the
    top-level list is for every model that has a recipe for the stage; a model's own list is taken as
    written and checked) and without its ``unreported_stages`` (no paper number) unless ``extra_stages``."""
    from ibot.stages import BACKBONE_STAGE

    entry = config["models"][model]
    first = [BACKBONE_STAGE.name] if entry["weights"] in BACKBONE_STAGE.weights else []
    if entry.get("stages"):
        return first + list(entry["stages"])
    skipped = {**(entry.get("unsupported_stages") or {}),
               **({} if config.get("extra_stages") else entry.get("unreported_stages") or {})}
    return first + [stage for stage in config.get("stages") or [] if stage not in skipped]


def _input_files(config: Mapping[str, Any], model: str) -> list[tuple[str, str]]:
    """(config key, path) of every file the model's planned jobs read: its external ``checkpoint`` and the
    files its stages' configs name (registry ``file_keys``: e.g. ``pretrain.mim_tokenizer``)."""
    from ibot.stages import STAGES

    entry = config["models"][model]
    files = []
    if entry["weights"] == "checkpoint" and entry.get("checkpoint") and not entry.get("weights_from"):
        files.append((f"models.{model}.checkpoint", str(entry["checkpoint"])))
    for name in planned_stages(config, model):
        resolved = stage_config(config, name, model)
        for key in STAGES[name].file_keys:
            value: Any = resolved
            for part in key.split("."):
                value = value.get(part) if isinstance(value, Mapping) else None
            if value:
                files.append((f"{STAGES[name].config_path}.{key}", str(value)))
    return files


def skipped_models(config: Mapping[str, Any], base_dir: str | Path = ".") -> dict[str, str]:
    """``{model: why}`` of the models ``skip_models_missing_files`` leaves out of the plan: a user-provided
    input file is absent, or it takes its weights (``weights_from``) or a file from the results of a model
    that is itself skipped. Files under this run's results folder are made by the DAG, never missing."""
    if not config.get("skip_models_missing_files"):
        return {}
    root = f"{config['results_dir']}/{config['run']}/"
    skipped: dict[str, str] = {}
    changed = True
    while changed:  # a skip propagates to the models that read the skipped model's outputs
        changed = False
        for model in config["models"]:
            if model in skipped:
                continue
            why = None
            source = config["models"][model].get("weights_from")
            if source in skipped:
                why = f"takes its weights from {source}, skipped ({skipped[source]})"
            for key, path in _input_files(config, model):
                if why:
                    break
                if path.startswith(root):
                    other = path[len(root):].split("/", 1)[0]
                    if other in skipped:
                        why = f"{key} is an output of {other}, skipped ({skipped[other]})"
                elif not (Path(base_dir) / path).exists():
                    why = f"needs {key}: {path} (absent)"
            if why:
                skipped[model] = why
                changed = True
    return skipped


def model_spec(config: Mapping[str, Any], model: str) -> ModelSpec:
    """The backbone of ``models.<model>`` (arch, patch size, depth, Swin window)."""
    return ModelSpec.of(config["models"][model])


def pretrain_data(config: Mapping[str, Any], model: str) -> dict[str, str]:
    """``{kind: training-image folder}`` a model is pretrained on: ``models.<m>.pretrain_data`` IN-1K ->
    ``data.imagenet``/train, IN-22K -> ``data.imagenet22k`` (ibot.data.kinds.PRETRAIN_DATA)."""
    from ibot.data.kinds import PRETRAIN_DATA

    kind, sub = PRETRAIN_DATA[config["models"][model].get("pretrain_data") or "IN-1K"]
    root = (config.get("data") or {}).get(kind)
    if not root:
        raise ValueError(f"models.{model}.pretrain_data needs config key data.{kind}: not set; point it at the "
                         f"dataset in its real layout")
    return {kind: f"{root}/{sub}" if sub else str(root)}


def stage_data(config: Mapping[str, Any], stage: str, model: str) -> dict[str, str]:
    """The dataset roots one stage reads for one model, by kind: its registry ``data_resolver``, else
    ``data.<kind>`` of each of its ``datasets`` (an unset key fails naming it)."""
    from ibot.run.launcher import resolve_entry
    from ibot.stages import get_stage

    entry = get_stage(stage)
    if entry.data_resolver:
        return resolve_entry(entry.data_resolver)(config, model)
    missing = [kind for kind in entry.datasets if not (config.get("data") or {}).get(kind)]
    if missing:
        raise ValueError(f"config key data.{missing[0]}: not set; stage {stage} reads it (point it at the dataset "
                         f"in its real layout)")
    return {kind: str(config["data"][kind]) for kind in entry.datasets}


# -- resolution ------------------------------------------------------------------------------------
ORIGIN_DEFAULT = "default"
ORIGIN_RECIPE = "model recipe"
ORIGIN_RUN = "config file"
ORIGIN_CLI = "command line"
ORIGIN_STAGE = "stage"
ORIGIN_DERIVED = "derived"

#: The linear lr scaling rules of the official scripts, by config path: the configured ``lr`` (each of
#: ``lrs``) is per ``base`` images and the run's peak lr is ``lr x global batch / base``. Fine-tuning
#: (run_class_finetuning.py:589) uses its lr as given. ``explain`` shows the peak value (``derived``).
LR_SCALING: dict[str, tuple[int, str]] = {
    "pretrain": (256, "main_ibot.py:306"),
    "linear": (256, "evaluation/eval_linear_multi.py:132"),
    "transfer": (512, "evaluation/eval_cls.py:690"),
    "semi_supervised.finetune": (512, "evaluation/semi_supervised/eval_cls.py:782"),
}


#: eval_linear_multi.py's lr grid, ``[n * 10**k for k in -4..0, n in 1..9]`` (``linear.lrs: null``).
OFFICIAL_LR_GRID: list[float] = [round(n * 10.0 ** e, 10) for e in range(-4, 1) for n in range(1, 10)]


def scaled_lr(rule: str, lr: float, global_batch: int) -> float:
    """The peak lr of an :data:`LR_SCALING` rule: ``lr x global batch / base``."""
    return float(lr) * int(global_batch) / LR_SCALING[rule][0]


def _run_parts(config: Mapping[str, Any], section: str, model: str) -> list[tuple[str, tuple[str, ...], Mapping]]:
    """The run config's parts of one section, lowest precedence first: ``(where, config path, values)``."""
    overrides = (config["models"][model].get("overrides") or {}).get(section) or {}
    return [(section, (section,), config.get(section) or {}),
            (f"models.{model}.overrides.{section}", ("models", model, "overrides", section), overrides)]


def section_layers(config: Mapping[str, Any], section: str, model: str) -> list[tuple[str, str, Mapping[str, Any]]]:
    """The three layers of one section for one model, lowest precedence first: ``(origin, where, values)``.

    ``where`` is the config path (or file) a value of that layer comes from, for messages.
    """
    from ibot.stages import section_defaults

    entry = config["models"][model]
    recipe = entry.get("recipe") or f"models.{model}"
    (top_where, _, top), (model_where, _, overrides) = _run_parts(config, section, model)
    return [
        (ORIGIN_DEFAULT, f"workflow/schemas/{section}.schema.yaml", section_defaults(section)),
        (ORIGIN_RECIPE, f"{recipe}: overrides.{section}", (entry.get("recipe_overrides") or {}).get(section) or {}),
        (ORIGIN_RUN, f"{top_where} + {model_where}", deep_merge(top, overrides, path=model_where, allow_new=True)),
    ]


def section_config(config: Mapping[str, Any], section: str, model: str) -> dict[str, Any]:
    """One section resolved for one model: its layers merged (:func:`section_layers`)."""
    layers = section_layers(config, section, model)
    resolved = layers[0][2]
    for _, where, values in layers[1:]:
        resolved = deep_merge(resolved, values, path=where)
    return resolved


def stage_config(config: Mapping[str, Any], stage: str, model: str) -> dict[str, Any]:
    """The config one stage runs with for one model (what the workflow passes to its command line).

    Its section resolved for the model (:func:`section_config`), narrowed to the stage's
    sub-section (``robustness.<stage>``) and with the values the stage fixes (the segmentation
    head). ``stage`` may also name a section.
    """
    from ibot.stages import STAGES

    spec = STAGES.get(stage)
    if spec is None:
        return section_config(config, stage, model)
    resolved = section_config(config, spec.section, model)
    if spec.subsection:
        resolved = dict(resolved.get(spec.subsection) or {})
    return {**resolved, **spec.fixed}


def resolve_stage_config(stage: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """The config of ``python -m downstream <stage> --config VALUES``: the values over the stage's schema
    defaults, validated against its schema (the workflow passes a resolved config, which this returns
    as it is). Values the stage fixes cannot be set to others; a swept list is the workflow's to expand."""
    import jsonschema

    from ibot.stages import get_stage, section_schema, stage_defaults

    entry = get_stage(stage)
    resolved = deep_merge(stage_defaults(stage), values, path=entry.config_path)
    for key, value in entry.fixed.items():
        if resolved[key] != value:
            raise ConfigError(f"config key {entry.config_path}.{key}: {resolved[key]!r}, but stage {stage} fixes it "
                              f"to {value!r}")
    schema = section_schema(entry.section)
    schema = schema["properties"][entry.subsection] if entry.subsection else schema
    try:
        jsonschema.validate(resolved, schema)
    except jsonschema.ValidationError as error:
        where = ".".join(str(part) for part in (entry.config_path, *error.absolute_path))
        raise ConfigError(f"config key {where!r}: {error.message}") from None
    if entry.sweep and resolved.get(entry.sweep[0]):
        raise ConfigError(f"config key {entry.config_path}.{entry.sweep[0]}: {resolved[entry.sweep[0]]} is a sweep, "
                          f"which the workflow runs as one job per value (ibot.sweep); one job takes one "
                          f"{entry.config_path}.{entry.sweep[1]}")
    return resolved


def _leaves(values: Mapping[str, Any], prefix: tuple[str, ...] = ()):
    """(key path, value) of every non-mapping value (lists are values)."""
    for key, value in values.items():
        if isinstance(value, Mapping) and value:
            yield from _leaves(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def _has_path(values: Mapping[str, Any] | None, path: tuple[str, ...]) -> bool:
    node: Any = values or {}
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return False
        node = node[key]
    return True


def _derived_rows(config: Mapping[str, Any], stage: str, model: str, resolved: Mapping[str, Any]) -> list[dict]:
    """The peak lr of each :data:`LR_SCALING` rule that applies to the stage, at its configured batch."""
    from ibot.stages import STAGES

    path = STAGES[stage].config_path if stage in STAGES else stage
    rows = []
    for rule, (base, source) in LR_SCALING.items():
        if not (rule == path or path.startswith(f"{rule}.") or rule.startswith(f"{path}.")):
            continue
        prefix = rule.removeprefix(f"{path}.") + "." if rule.startswith(f"{path}.") else ""
        values = resolved[prefix[:-1]] if prefix else resolved
        key = "lrs" if rule == "linear" else "lr"
        batch = global_batch(config, model)["global"] if rule == "pretrain" else int(values["batch_size"])
        lr = values[key] if values[key] is not None else OFFICIAL_LR_GRID
        value = [scaled_lr(rule, v, batch) for v in lr] if isinstance(lr, list) else scaled_lr(rule, lr, batch)
        rows.append({"key": f"{prefix}{key} (peak)", "value": value, "origin": ORIGIN_DERIVED,
                     "where": f"{key} x global batch {batch} / {base} ({source}: linear scaling rule)"})
    return rows


def explain_stage(config: Mapping[str, Any], stage: str, model: str,
                  sources: Sequence[tuple[str, Mapping[str, Any]]] | None = None) -> list[dict[str, Any]]:
    """Every value :func:`stage_config` resolves, with the layer it comes from, then the values derived
    from them (``derived``: the peak lr of a linear scaling rule).

    Rows ``{key, value, origin, where}``: ``origin`` is one of default / model recipe / config
    file / command line / stage / derived; ``where`` the file and config path. ``sources`` are the
    raw mappings merged (in that order) into ``config`` before validation, as ``(label, mapping)``:
    ``("config/paper.yaml", ...)`` for each ``--configfile`` and ``("--config", ...)`` for
    Snakemake's command-line values; a run-config value is attributed to the last source that sets it.
    """
    from ibot.stages import STAGES

    spec = STAGES.get(stage)
    section = spec.section if spec else stage
    origins: dict[tuple[str, ...], tuple[str, str]] = {}
    for origin, where, values in section_layers(config, section, model)[:2]:
        origins.update({path: (origin, where) for path, _ in _leaves(values)})
    for where, root, values in _run_parts(config, section, model):
        for path, _ in _leaves(values):
            label, place = ORIGIN_RUN, where
            for source, raw in reversed(list(sources or [])):
                if _has_path(raw, root + path):
                    label, place = (ORIGIN_CLI if source == "--config" else ORIGIN_RUN), f"{source}: {where}"
                    break
            origins[path] = (label, place)
    prefix = (spec.subsection,) if spec and spec.subsection else ()
    resolved = stage_config(config, stage, model)
    marks = unverified_values(config, model, stage) if spec else {}
    rows = []
    for path, value in _leaves(resolved):
        if spec and len(path) == 1 and path[0] in spec.fixed:
            origin, where = ORIGIN_STAGE, f"ibot/stages.py: {stage}.fixed"
        else:
            origin, where = origins[prefix + path]
        mark = ".".join((section, *prefix, *path))
        rows.append({"key": ".".join(path), "value": value, "origin": origin, "where": where,
                     "unverified": {"key": mark, "why": marks[mark]} if mark in marks else None})
    return rows + _derived_rows(config, stage, model, resolved)


def stage_resources(config: Mapping[str, Any], stage: str, model: str | None = None) -> dict[str, Any]:
    """Launcher resources of a stage: ``resources.default`` ⊕ ``resources.<stage>`` ⊕
    ``models.<model>.resources.<stage>`` (a model that needs more GPUs, e.g. ViT-L pretraining)."""
    resources = config.get("resources") or {}
    model_resources = ((config["models"][model].get("resources") or {}) if model else {}).get(stage) or {}
    return {**(resources.get("default") or {}), **(resources.get(stage) or {}), **model_resources}


def global_batch(config: Mapping[str, Any], model: str) -> dict[str, Any]:
    """The pretraining global batch of a model: ``{per_gpu, processes, global, recipe, rescaled}``.

    ``pretrain.global_batch_size`` states the recipe's batch; the resources
    (``nodes × tasks_per_node`` processes) must produce it with ``batch_size_per_gpu``, unless
    ``pretrain.batch_rescale`` is true: then the run goes on with its own batch, the peak lr
    follows the official linear scaling (lr × global / 256, main_ibot.py) and ``rescaled`` marks
    it (the pretraining summary and the result tables carry the mark). Raises
    :class:`ConfigError` naming the keys otherwise.
    """
    from ibot.run.launcher import Resources

    cfg = section_config(config, "pretrain", model)
    resources = Resources.from_config(stage_resources(config, "pretrain", model))
    processes = resources.nodes * resources.tasks_per_node
    actual = int(cfg["batch_size_per_gpu"]) * processes
    recipe = cfg.get("global_batch_size")
    rescaled = recipe is not None and actual != recipe
    if rescaled and not cfg["batch_rescale"]:
        raise ConfigError(
            f"models.{model}: pretrain.global_batch_size is {recipe} but pretrain.batch_size_per_gpu "
            f"{cfg['batch_size_per_gpu']} x {processes} processes (resources.pretrain / models.{model}.resources"
            f".pretrain: nodes {resources.nodes} x tasks_per_node {resources.tasks_per_node}) = {actual}; give the "
            f"job {recipe // max(int(cfg['batch_size_per_gpu']), 1)} processes, change batch_size_per_gpu, or set "
            f"pretrain.batch_rescale: true to run with {actual} (lr rescaled linearly, the run is marked)")
    return {"per_gpu": int(cfg["batch_size_per_gpu"]), "processes": processes, "global": actual,
            "recipe": recipe, "rescaled": rescaled}


# -- Snakemake's merging of config files and --config ------------------------------------------------
def parse_config_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` items exactly as Snakemake's ``--config`` parses them (its own parser: nested
    YAML values stay strings, so prefer an extra ``--configfile`` for nested values)."""
    from snakemake.cli import parse_config

    try:
        return parse_config(list(items))
    except ValueError as error:
        raise ConfigError(f"--config: {error}") from error


def update_config(config: dict[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Merge as Snakemake merges ``--configfile``s and ``--config`` (its own recursive update)."""
    from snakemake.utils import update_config as snakemake_update

    snakemake_update(config, dict(overrides))
    return config


def load_workflow_config(configfiles: Sequence[str | Path] = (), overrides: Sequence[str] = (), *,
                         base_dir: str | Path = REPO_ROOT) -> tuple[dict[str, Any], list[tuple[str, dict]]]:
    """The validated config Snakemake would run with ``--configfile <configfiles> --config <overrides>``
    (the embedded default when no file is given, as the root Snakefile does), and the raw sources
    in merge order (for :func:`explain_stage`)."""
    files = [str(f) for f in configfiles] or [str(Path(base_dir) / "config" / "config.yaml")]
    sources = [(f, load_yaml(f)) for f in files]
    if overrides:
        sources.append(("--config", parse_config_overrides(overrides)))
    config: dict[str, Any] = {}
    for _, raw in sources:
        update_config(config, copy.deepcopy(raw))
    return validate_config(config, base_dir=base_dir), sources


def _format_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1000).strip().removesuffix("...").strip()


EXPLAIN_HELP = "print the config a stage runs with for a model, value by value, with each value's origin"
EXPLAIN_EXAMPLE = "ibot explain --configfile config/paper.yaml --model vit_large --stage seg_upernet"


def add_explain_arguments(parser) -> None:
    """The ``explain`` command's arguments (``python -m ibot.config explain`` and ``ibot explain``)."""
    parser.add_argument("--configfile", nargs="+", default=[], help="as snakemake's (default: config/config.yaml)")
    parser.add_argument("--config", nargs="+", default=[], metavar="KEY=VALUE", help="as snakemake's --config")
    parser.add_argument("--model", required=True)
    parser.add_argument("--stage", required=True, help="a stage (ibot/stages.py) or a config section")
    parser.add_argument("--json", action="store_true", help="rows as JSON")


def explain_command(args, parser) -> int:
    """Print the resolved config of ``args.model`` x ``args.stage`` (errors exit through ``parser``)."""
    import json

    try:
        config, sources = load_workflow_config(args.configfile, args.config)
        if args.model not in config["models"]:
            raise ConfigError(f"--model {args.model!r}: not in models ({sorted(config['models'])})")
        rows = explain_stage(config, args.stage, args.model, sources)
    except (ConfigError, KeyError) as error:
        parser.exit(2, f"error: {error}\n")
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["key"]) for r in rows)
    values = [_format_value(r["value"]) for r in rows]
    vwidth = min(max(len(v) for v in values), 40)
    print(f"# {args.stage} for {args.model}: {len(rows)} values (origin: default < model recipe < config file "
          f"< command line; stage = fixed by the stage; derived = computed from the others)")
    for row, value in zip(rows, values):
        mark = f"  UNVERIFIED: {row['unverified']['why']}" if row.get("unverified") else ""
        print(f"{row['key']:<{width}}  {value:<{vwidth}}  {row['origin']:<12}  {row['where']}{mark}")
    marks = unverified_values(config, args.model, args.stage) if args.stage in _stage_names() else {}
    shown = {r["unverified"]["key"] for r in rows if r.get("unverified")}
    others = {key: why for key, why in marks.items() if key not in shown}
    if others:
        print(f"# other unverified values this stage's number depends on ({len(others)}):")
        for key, why in sorted(others.items()):
            print(f"#   {key}: {why}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ibot.config explain``: the resolved config of a model x stage, value by value."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m ibot.config", description=main.__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    explain = sub.add_parser("explain", help=EXPLAIN_HELP, description=f"{EXPLAIN_HELP}.",
                             epilog=f"example:\n  {EXPLAIN_EXAMPLE}", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_explain_arguments(explain)
    return explain_command(parser.parse_args(argv), explain)


def _stage_names() -> set[str]:
    from ibot.stages import STAGES

    return set(STAGES)


def check_stage_configs(config: Mapping[str, Any]) -> None:
    """Run every planned stage's registry ``preflight`` on its resolved config (before any job: what a
    stage would only find out when it starts, e.g. the occlusion saliency checkpoint left unset)."""
    import importlib

    from ibot.stages import STAGES

    problems = []
    for model in config["models"]:
        for name in planned_stages(config, model):
            stage = STAGES[name]
            if not stage.preflight:
                continue
            module, _, function = stage.preflight.partition(":")
            try:
                getattr(importlib.import_module(module), function)(stage_config(config, name, model))
            except ValueError as error:
                problems.append(f"models.{model} x {name}: {error}")
    if problems:
        raise ConfigError("stage config problems:\n  " + "\n  ".join(problems))


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


if __name__ == "__main__":
    raise SystemExit(main())
