"""The stage registry: the one table from which the workflow, the job side, the config schema and the
defaults derive.

A stage is a job of the DAG that writes ``results/<run>/<model>/<stage>/metrics.json``. Each entry says
which function computes it (``entry``: ``run(ctx)``, given a :class:`ibot.run.context.StageContext`
built from this entry), which config section configures it (defaults come from that section's JSON
schema, ``workflow/schemas/<section>.schema.yaml``: the single source of default values), which
datasets it reads, what it writes besides ``metrics.json``, what it needs from other stages, whether
it keeps a fingerprinted ``work/`` directory, and which models it applies to. Derived from it:

- the Snakemake rules (``workflow/rules/stages.smk``: one rule per stage),
- the one command line, ``python -m downstream <stage>`` (:mod:`ibot.run.cli`),
- the stage context of the job: resolved config, model spec, data roots, work directory
  (:mod:`ibot.run.context`),
- the config schema's ``stages`` enum and ``resources.<stage>`` keys (:mod:`ibot.config`),
- the datasets checked and the preflights run before a real run starts.

Adding a stage: one entry here, one ``run(ctx)`` function, its schema section
(``docs/adding-a-stage.md``).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from ibot.data.kinds import DATASET_KINDS

__all__ = ["Stage", "STAGES", "BACKBONE_STAGE", "EVALUATION_STAGES", "TRANSFER_DATASETS", "WEIGHT_SOURCES",
           "SCHEMA_DIR", "get_stage", "section_schema", "schema_defaults", "section_defaults", "stage_defaults"]

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "workflow" / "schemas"

#: Where a model's backbone weights come from (config ``models.<name>.weights``).
WEIGHT_SOURCES = ("pretrain", "checkpoint", "random")


@dataclass(frozen=True)
class Stage:
    """One stage of the DAG (see the module docstring)."""

    name: str
    entry: str                                    # "module:function": run(ctx) inside the job
    section: str                                  # config section = schema file name
    datasets: tuple[str, ...]                     # `data.<kind>` keys it reads
    description: str
    subsection: str | None = None                 # e.g. robustness.<stage>
    fixed: Mapping[str, Any] = field(default_factory=dict)   # values the stage sets (seg head)
    outputs: Mapping[str, str] = field(default_factory=dict)  # name -> file in the stage folder, besides metrics.json
    needs: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # CLI flag name -> (stage, file)
    weights: tuple[str, ...] = WEIGHT_SOURCES     # model weight sources it applies to
    resumable: bool = False                       # keeps a fingerprinted work/ directory (ibot.workdir)
    operational_keys: tuple[str, ...] = ()        # config keys that cannot change the result (logging)
    file_keys: tuple[str, ...] = ()               # dotted config keys naming input files (DAG inputs, fingerprinted)
    preflight: str | None = None                  # "module:function" checking its resolved config before any job
    sweep: tuple[str, str, str] | None = None     # (list key, value key, metric): one job per value (ibot.sweep)
    priority: int = 0                             # Snakemake priority: long jobs and those others wait for start first
    data_resolver: str | None = None              # "module:function"(config, model) -> {kind: root} (else data.<kind>)

    @property
    def config_path(self) -> str:
        """Dotted config path of its settings, e.g. ``robustness.imagenet_c``."""
        return f"{self.section}.{self.subsection}" if self.subsection else self.section

    @property
    def exports_backbone(self) -> bool:
        """It makes the backbone the other stages evaluate (and so reads none itself)."""
        return "backbone" in self.outputs


def _robustness(name: str, dataset: str, description: str, entry: str | None = None, **kwargs: Any) -> Stage:
    return Stage(name, entry or f"downstream.robustness.{name}:run", "robustness", (dataset,), description,
                 subsection=name, needs={"head": ("linear", "head.pth")}, **kwargs)


#: Transfer learning (Tab. 7): one stage per dataset, ``transfer_<kind>``, settings in ``transfer.<kind>``.
TRANSFER_DATASETS: tuple[str, ...] = ("cifar10", "cifar100", "inat18", "inat19", "flowers", "cars")

_REGISTRY: tuple[Stage, ...] = (
    Stage("pretrain", "ibot.train.pretrain:run", "pretrain", ("imagenet", "imagenet22k"),
          "iBOT pretraining (main_ibot.py); exports the teacher and student backbones and both heads",
          outputs={"backbone": "teacher_backbone.pth", "student_backbone": "student_backbone.pth",
                   "heads": "heads.pth", "curves": "train_log.csv"},
          weights=("pretrain",), resumable=True, operational_keys=("num_workers", "log_every", "saveckp_freq"),
          file_keys=("load_from", "mim_tokenizer"), data_resolver="ibot.config:pretrain_data",
          preflight="ibot.tokenizers:check_mim_config",
          priority=10),  # the critical path: before the random-init baselines, which need no pretraining
    Stage("knn", "downstream.knn:run", "knn", ("imagenet",), "weighted k-NN on frozen [CLS] features (Tab. 1)"),
    Stage("linear", "downstream.linear:run", "linear", ("imagenet",),
          "linear probing with a one-pass lr sweep (Tab. 1); its best head feeds the robustness stages",
          outputs={"head": "head.pth"}, resumable=True, priority=3),
    Stage("linear_part", "downstream.linear_part:run", "linear_part", ("imagenet",),
          "part-wise linear probing on the top-k [CLS]-attended patch tokens, every k in one pass (Fig. 5)",
          resumable=True),
    Stage("finetune", "downstream.finetune:run", "finetune", ("imagenet",),
          "end-to-end fine-tuning with layer-wise lr decay (Tab. 2); lr sweep: one job per finetune.lrs value",
          resumable=True, sweep=("lrs", "lr", "top1"), priority=2),
    Stage("semi_supervised", "downstream.semi_supervised:run", "semi_supervised", ("imagenet",),
          "1% / 10% labels: k-NN, linear, logistic regression, fine-tuning w/o and from proj-head layer 1 (Tab. 4, 12)",
          resumable=True, file_keys=("subsets.1", "subsets.10", "heads"),
          preflight="downstream.semi_supervised:preflight", priority=1),
    Stage("unsupervised", "downstream.unsupervised:run", "unsupervised", ("imagenet",),
          "unsupervised classification: argmax of the teacher [CLS] head on val; NMI/ARI/FMI/ACC (Tab. 5)",
          file_keys=("heads",)),
    Stage("video_segmentation", "downstream.video_segmentation:run", "video_segmentation", ("davis",),
          "DAVIS-2017 video object segmentation: label propagation on frozen patch features; J&F (Tab. 16)",
          operational_keys=("save_masks",)),
    Stage("retrieval", "downstream.retrieval:run", "retrieval", ("revisitop",),
          "image retrieval on Revisited Oxford 5k + Paris 6k, frozen [CLS] cosine ranking; Medium/Hard mAP (Tab. 16)"),
    Stage("detection", "downstream.dense.detection:run", "detection", ("coco",),
          "COCO Cascade Mask R-CNN, mmdet (Tab. 6)", resumable=True, operational_keys=("log_interval",), priority=2),
    Stage("seg_upernet", "downstream.dense.segmentation:run", "segmentation", ("ade20k",),
          "ADE20K UperNet, mmseg (Tab. 6)", fixed={"head": "upernet"}, resumable=True,
          operational_keys=("log_interval",), priority=3),
    Stage("seg_linear", "downstream.dense.segmentation:run", "segmentation", ("ade20k",),
          "ADE20K linear head on the frozen backbone, mmseg (Tab. 6)", fixed={"head": "linear"}, resumable=True,
          operational_keys=("log_interval",), priority=1),
    *(Stage(f"transfer_{kind}", "downstream.transfer:run", "transfer", (kind,),
            f"fine-tuning transfer to {DATASET_KINDS[kind].title} (Tab. 7)", subsection=kind, resumable=True)
      for kind in TRANSFER_DATASETS),
    _robustness("imagenet_c", "imagenet_c", "ImageNet-C mean corruption error (Tab. 8)",
                outputs={"table": "per_corruption.csv"}, priority=1),
    _robustness("imagenet_a", "imagenet_a", "ImageNet-A top-1 (Tab. 8)", "downstream.robustness.class_subset:run"),
    _robustness("imagenet_r", "imagenet_r", "ImageNet-R top-1 (Tab. 8)", "downstream.robustness.class_subset:run"),
    _robustness("bg_challenge", "imagenet_9", "background challenge, ImageNet-9 variants (Tab. 8)"),
    _robustness("occlusion", "imagenet", "salient / non-salient / random occlusion, patch shuffle (Tab. 8)",
                outputs={"curves": "curves.csv", "shuffle": "shuffle.csv", "plot": "occlusion.png"},
                file_keys=("saliency_model.checkpoint",), preflight="downstream.robustness.occlusion:preflight",
                priority=2),
)

#: Every stage by name, in DAG order.
STAGES: dict[str, Stage] = {stage.name: stage for stage in _REGISTRY}
#: The stage that makes the backbone (pretraining): planned for every ``weights: pretrain`` model.
BACKBONE_STAGE: Stage = next(stage for stage in _REGISTRY if stage.exports_backbone)
#: The stages a config's ``stages:`` list may name (every stage that evaluates a backbone).
EVALUATION_STAGES: tuple[str, ...] = tuple(name for name, stage in STAGES.items() if not stage.exports_backbone)


def get_stage(name: str) -> Stage:
    try:
        return STAGES[name]
    except KeyError:
        raise KeyError(f"unknown stage {name!r}; known: {list(STAGES)}") from None


#: Schema keywords naming a Python list that fills ``default`` / ``enum`` (``"module:NAME"``), so a
#: list kept in code (corruptions, ImageNet-9 variants) is never copied into a schema file.
_FROM_CODE = {"x-default-from": "default", "x-enum-from": "enum"}


def _fill_from_code(node: Any, where: str) -> Any:
    if isinstance(node, dict):
        for marker, keyword in _FROM_CODE.items():
            if marker in node:
                module_name, _, name = node[marker].partition(":")
                try:
                    node[keyword] = list(getattr(importlib.import_module(module_name), name))
                except (ImportError, AttributeError) as error:
                    raise ValueError(f"{where}: {marker} {node[marker]!r} does not name a list: {error}") from error
        for key, value in node.items():
            _fill_from_code(value, where)
    elif isinstance(node, list):
        for value in node:
            _fill_from_code(value, where)
    return node


@lru_cache(maxsize=None)
def _load_section_schema(section: str) -> dict[str, Any]:
    path = SCHEMA_DIR / f"{section}.schema.yaml"
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict) or data.get("type") != "object":
        raise ValueError(f"{path}: expected an object schema")
    return _fill_from_code(data, str(path))


def section_schema(section: str) -> dict[str, Any]:
    """The JSON schema of a config section (a copy: callers may edit it)."""
    return copy.deepcopy(_load_section_schema(section))


def schema_defaults(schema: Mapping[str, Any]) -> Any:
    """The defaults an object schema declares, recursively (objects with properties are built)."""
    properties = schema.get("properties")
    if schema.get("type") == "object" and properties:
        return {key: schema_defaults(sub) for key, sub in properties.items()}
    if "default" not in schema:
        raise ValueError(f"schema property without a default: {schema}")
    return copy.deepcopy(schema["default"])


def section_defaults(section: str) -> dict[str, Any]:
    """Defaults of a whole config section (e.g. ``segmentation`` with its ``upernet``/``linear`` parts)."""
    return schema_defaults(_load_section_schema(section))


def stage_defaults(name: str) -> dict[str, Any]:
    """The full default config of one stage: its (sub)section's schema defaults with its fixed values."""
    stage = get_stage(name)
    defaults = section_defaults(stage.section)
    if stage.subsection:
        defaults = defaults[stage.subsection]
    return {**defaults, **copy.deepcopy(dict(stage.fixed))}
