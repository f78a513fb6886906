"""The recipe contract: what ``snakemake --configfile config/paper.yaml`` runs for every paper model and
stage, compared key by key with values transcribed from the official code (bytedance/ibot, commit da316d8)
or the paper, each with its source.

The official values common to every model are the tables of each stage's own tests (``OFFICIAL_*``:
they also pin the schema defaults, which are the ViT-S/16 recipe); the values that differ per model are
below. A mismatch fails with the model, stage, key, both values and the source: changing a recipe
(config/paper/*.yaml) means changing a cited value here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from ibot.config import (ConfigError, global_batch, load_workflow_config, load_yaml, planned_stages, stage_config,
                         validate_config)
from ibot.stages import EVALUATION_STAGES, STAGES
from test_config import OFFICIAL_MAIN_IBOT_DEFAULTS
from test_dense import OFFICIAL_DETECTION, OFFICIAL_SEGMENTATION
from test_finetune import OFFICIAL_FINETUNE_VIT_S
from test_knn import OFFICIAL_EVAL_KNN
from test_linear import OFFICIAL_EVAL_LINEAR_VIT_S
from test_semi_supervised import OFFICIAL_LOGREG, OFFICIAL_SEMI_FINETUNE
from test_retrieval import OFFICIAL_RETRIEVAL
from test_unsupervised import OFFICIAL_UNSUP_CLS
from test_video_segmentation import OFFICIAL_VIDEO_SEGMENTATION
from test_transfer import OFFICIAL_TRANSFER_VIT_B_CHANGES, OFFICIAL_TRANSFER_VIT_S

ROOT = Path(__file__).resolve().parents[1]
#: Every model of config/paper.yaml (a test checks the list is complete).
PAPER_MODELS = ("vit_small", "vit_base", "vit_large", "vit_small_out1000", "vit_small_in22k", "vit_base_in22k",
                "vit_large_in22k", "vit_large_in22k_ft512", "vit_large_in22k_ft384", "vit_small_no_multicrop",
                "vit_base_no_multicrop", "vit_base_rand_mask", "vit_large_rand_mask", "swin_tiny_7", "swin_tiny_14")
#: The paper's three ViTs (a variant such as vit_small_out1000 evaluates one stage for its paper model).
MAIN_MODELS = ("vit_small", "vit_base", "vit_large")

_README = "README.md"      # bytedance/ibot README.md
_NO_NORM = ("evaluation/semantic_segmentation/mmcv_custom/register_backbone.py:24, :37-38 out_with_norm=False "
            "(no README command sets it for this model and head)")
_EVAL = "evaluation/README.md"
_SEG = "evaluation/semantic_segmentation/configs"
_ARGS_B = "vitb_16/args.txt (README.md:168; released arguments, outside the repository tree)"
_ARGS_L = "vitl_16/args.txt (README.md:192; released arguments, outside the repository tree)"

#: Robustness protocols (model-independent: paper Tab.8 note R2, the analysis/ scripts).
OFFICIAL_ROBUSTNESS = {
    "imagenet_c": {
        "severities": ([1, 2, 3, 4, 5], "analysis/corruptions_surf_variations/eval.py:120 range(1, 6)"),
        "resize": ("none", "analysis/corruptions_surf_variations/eval.py:123 CenterCrop(224) only"),
        "crop": ("head", "analysis/corruptions_surf_variations/eval.py:123 CenterCrop(224) (= the head's crop)"),
    },
    "imagenet_a": {
        "resize": ("head", "analysis/natural_adv_examples/eval.py:41 Resize(256) (= the head's resize)"),
        "interpolation": ("bilinear", "analysis/natural_adv_examples/eval.py:41 Resize(256): torchvision default"),
        "crop": ("head", "analysis/natural_adv_examples/eval.py:41 CenterCrop(224)"),
    },
    "bg_challenge": {
        "resize": ("none", "analysis/backgrounds_challenge/tools/datasets.py:84 transform_test ToTensor (224 px files)"),
    },
    "occlusion": {
        "protocol": ("official", "analysis/occlusion/eval.py:167-194 (--dino): saliency of a separate DINO ViT-S/16"),
        "shuffle_grid_sizes": ("official", "analysis/eval_shuffle.sh:5-6 (h, w) = (2,2) (2,4) (4,4) (4,8) (8,8) "
                                           "(14,14) (16,16)"),
        "saliency_model": {
            "arch": ("vit_small", "analysis/occlusion/eval.py:62 dino.dino_small(pretrained=True)"),
            "patch_size": (16, "analysis/occlusion/eval.py:62, :292 --patch_size default 16"),
            "head": (1, "analysis/occlusion/eval.py:168 head_number = 1"),
        },
    },
}

#: Per-model pretraining values (the rest: main_ibot.py defaults, OFFICIAL_MAIN_IBOT_DEFAULTS).
_PRETRAIN_VIT_S = {
    "epochs": (800, f"{_README}:69"), "batch_size_per_gpu": (64, f"{_README}:70"),
    "global_batch_size": (1024, f"{_README}:62 two nodes x 8 GPUs x 64"),
    "teacher_temp": (0.07, f"{_README}:66"), "warmup_teacher_temp_epochs": (30, f"{_README}:67"),
    "norm_last_layer": (False, f"{_README}:68"), "shared_head": (True, f"{_README}:71"),
    "out_dim": (8192, f"{_README}:72"), "local_crops_number": (10, f"{_README}:73"),
    "global_crops_scale": ([0.25, 1.0], f"{_README}:74"), "local_crops_scale": ([0.05, 0.25], f"{_README}:75"),
    "pred_ratio": ([0.0, 0.3], f"{_README}:76"), "pred_ratio_var": ([0.0, 0.2], f"{_README}:77"),
    "global_crops_size": (224, "main_ibot.py:592,599 RandomResizedCrop(224)"),
    "local_crops_size": (96, "main_ibot.py:608 RandomResizedCrop(96)"),
}
_PRETRAIN_VIT_B_L_COMMON = {
    "global_batch_size": (1024, "paper Sec.4/App.A batch 1024 (README.md:58's 24 GPUs x 64 for ViT-B is not)"),
    "lr": (5e-4, "paper App.A lr = 5e-4 x batch/256; main_ibot.py:115 default"),
    "min_lr": (2e-6, "args"), "teacher_temp": (0.07, "args"), "teacher_patch_temp": (0.07, "args"),
    "warmup_teacher_temp_epochs": (50, "args"), "norm_last_layer": (True, "args"), "shared_head": (True, "args"),
    "out_dim": (8192, "args"), "local_crops_number": (10, "args"), "global_crops_scale": ([0.32, 1.0], "args"),
    "local_crops_scale": ([0.05, 0.32], "args"), "pred_ratio": ([0.0, 0.3], "args"),
    "pred_ratio_var": ([0.0, 0.2], "args"),
}


def _merge(base: dict[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in override.items():
        out[key] = _merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def _args(table: Mapping[str, tuple[Any, str]], source: str) -> dict[str, tuple[Any, str]]:
    return {key: (value, source if where == "args" else where) for key, (value, where) in table.items()}


_LINEAR_B_L = {"n_last_blocks": (1, "run.sh:55-58 LINEAR_N_LAST_BLOCKS=1 for vit_base/vit_large"),
               "avgpool_patchtokens": (True, "run.sh:55-58 LINEAR_AVGPOOL=2: [CLS] + mean patch token")}

#: model -> stage -> key -> (official value, source). Nested mappings for the segmentation heads.
PER_MODEL: dict[str, dict[str, dict[str, Any]]] = {
    "vit_small": {"pretrain": _PRETRAIN_VIT_S},
    "vit_small_out1000": {"pretrain": {**_PRETRAIN_VIT_S,
                                       "out_dim": (1000, "evaluation/README.md:56; unsup_cls.py:162 --out_dim 1000"),
                                       "patch_out_dim": (1000, "evaluation/README.md:56 (also patch tokens)"),
                                       "epochs": (800, "unverified: Tab.5 prints none; ViT-S/16's assumed")}},
    "vit_base": {
        "pretrain": {**_args(_PRETRAIN_VIT_B_L_COMMON, _ARGS_B), "epochs": (400, "paper Tab.1 1600 effective / 4"),
                     "batch_size_per_gpu": (64, _ARGS_B), "drop_path": (0.1, _ARGS_B),
                     "lr": (5e-4, f"paper App.A 5e-4 x batch/256 (main_ibot.py:115); unverified against {_ARGS_B}"),
                     "use_fp16": (True, "main_ibot.py:97 default")},
        "linear": _LINEAR_B_L,
        "transfer": OFFICIAL_TRANSFER_VIT_B_CHANGES,
        "finetune": {"epochs": (100, f"{_EVAL}:35"), "drop_path": (0.2, f"{_EVAL}:36"),
                     "layer_decay": (0.65, f"{_EVAL}:37"), "warmup_epochs": (20, "run.sh:180")},
        "detection": {"layer_decay": (0.75, f"{_EVAL}:86"), "batch_size": (16, f"{_EVAL}:82-83 samples_per_gpu=2 x 8"),
                      "drop_path": (0.2, "evaluation/object_detection/configs/cascade_rcnn/"
                                         "vit_base_giou_4conv1f_coco_3x.py:26")},
        "segmentation": {"batch_size": (16, f"{_EVAL}:109-110 8 GPUs x 2; :101-102 4 x 4"),
                         "upernet": {"lr": (8e-5, f"{_EVAL}:112"),
                                     "layer_decay": (0.65, f"{_SEG}/upernet/vit_base_512_ade20k_160k.py:56"),
                                     "drop_path": (0.1, f"{_SEG}/upernet/vit_base_512_ade20k_160k.py:33")},
                         "linear": {"lr": (8e-4, f"{_EVAL}:104"),
                                    "final_norm": (True, f"{_EVAL}:103 model.backbone.out_with_norm=true")}},
    },
    "vit_large": {
        "pretrain": {**_args(_PRETRAIN_VIT_B_L_COMMON, _ARGS_L),
                     "epochs": (300, "paper Tab.15 300 actual, Tab.1 1200 effective; README.md:184-190 one release "
                                     "for k-NN, linear and fine-tuning (note E1: Sec.3.2 says 250)"),
                     "batch_size_per_gpu": (16, f"{_README}:58 64 GPUs x 16 = 1024"),
                     "drop_path": (0.3, _ARGS_L), "use_fp16": (False, _ARGS_L)},
        "linear": _LINEAR_B_L,
        "finetune": {"epochs": (50, f"{_EVAL}:42"), "drop_path": (0.4, f"{_EVAL}:43"),
                     "layer_decay": (0.75, f"{_EVAL}:44"), "warmup_epochs": (5, f"{_EVAL}:47"),
                     "accum_steps": (2, f"{_EVAL}:48 --update_freq 2"),
                     "batch_size": (1024, f"{_EVAL}:45 --batch_size 64 x 8 GPUs x update_freq 2")},
        "segmentation": {"upernet": {"lr": (2e-5, f"{_SEG}/upernet/vit_large_512_ade20k_160k.py:54"),
                                     "layer_decay": (0.95, f"{_SEG}/upernet/vit_large_512_ade20k_160k.py:56"),
                                     "drop_path": (0.2, f"{_SEG}/upernet/vit_large_512_ade20k_160k.py:33"),
                                     "out_indices": ([7, 11, 15, 23], f"{_SEG}/upernet/vit_large_512_ade20k_160k.py:34"),
                                     "final_norm": (False, _NO_NORM)},
                         "linear": {"lr": (2e-5, f"{_SEG}/linear/vit_large_512_ade20k_160k.py:64"),
                                    "out_indices": ([7, 11, 15, 23], f"{_SEG}/linear/vit_large_512_ade20k_160k.py:39"),
                                    "final_norm": (False, _NO_NORM)}},
    },
}


#: The variants of config/paper.yaml: their base model's table with the values that make them a variant.
_NO_MULTICROP = {"local_crops_number": (0, "paper Tab.10 w/o multi-crop: two global crops"),
                 "global_crops_scale": ([0.14, 1.0], "main_ibot.py:130-136 recommended without multi-crop")}
_RAND_MASK = {"pred_shape": ("rand", f"{_README}:174,198 PS 'Rand'")}
_SWIN_PRETRAIN = {
    "epochs": (300, f"{_README}:95"), "teacher_temp": (0.07, f"{_README}:92"),
    "warmup_teacher_temp_epochs": (30, f"{_README}:93"), "norm_last_layer": (False, f"{_README}:94"),
    "batch_size_per_gpu": (64, "unverified: swint_7/args.txt (README.md:144); 64 x 16 GPUs (README.md:83)"),
    "global_batch_size": (1024, "README.md:83 16 GPUs x 64 (unverified per GPU)"), "shared_head": (True, f"{_README}:97"),
    "out_dim": (8192, f"{_README}:98"), "local_crops_number": (10, f"{_README}:99"),
    "global_crops_scale": ([0.25, 1.0], f"{_README}:100"), "local_crops_scale": ([0.05, 0.25], f"{_README}:101"),
    "pred_ratio": ([0.0, 0.3], f"{_README}:102"), "pred_ratio_var": ([0.0, 0.2], f"{_README}:103"),
    "pred_start_epoch": (50, f"{_README}:104"),
}
PER_MODEL.update({
    "vit_small_in22k": _merge(PER_MODEL["vit_small"], {"pretrain": {"epochs": (160, "paper Tab.15 160 actual")}}),
    "vit_base_in22k": _merge(PER_MODEL["vit_base"], {"pretrain": {"epochs": (80, "paper Tab.15 80 actual")}}),
    "vit_large_in22k": _merge(PER_MODEL["vit_large"], {"pretrain": {"epochs": (50, "paper Tab.15 50 actual")}}),
    "vit_large_in22k_ft512": _merge(PER_MODEL["vit_large"], {"finetune": {
        "crop": (512, "paper Tab.3 FT 512"), "resize": (512, "run_class_finetuning.py:282-286 crop_pct 1.0 >= 384")}}),
    "vit_large_in22k_ft384": _merge(PER_MODEL["vit_large"], {"finetune": {
        "crop": (384, "README.md:222-223 FT 384"), "resize": (384, "run_class_finetuning.py:282-286 crop_pct 1.0")}}),
    "vit_small_no_multicrop": _merge(PER_MODEL["vit_small"], {"pretrain": _NO_MULTICROP}),
    "vit_base_no_multicrop": _merge(PER_MODEL["vit_base"], {"pretrain": _NO_MULTICROP}),
    "vit_base_rand_mask": _merge(PER_MODEL["vit_base"], {"pretrain": _RAND_MASK}),
    "vit_large_rand_mask": _merge(PER_MODEL["vit_large"], {"pretrain": _RAND_MASK}),
    "swin_tiny_7": {"pretrain": _SWIN_PRETRAIN},
    "swin_tiny_14": {"pretrain": {**_SWIN_PRETRAIN, "batch_size_per_gpu": (26, f"{_README}:96"),
                                  "global_batch_size": (1040, "README.md:88,91 five nodes x 8 GPUs x 26")}},
})

#: Model keys: model -> key -> (value, source).
MODEL_KEYS: dict[str, dict[str, tuple[Any, str]]] = {
    **{m: {"arch": (m.split("_")[0] + "_" + m.split("_")[1], "paper Tab.1-3"), "patch_size": (16, "paper /16"),
           "network": ("teacher", f"{_README}:111 backbone (t) of the IN-1K releases, :130-202")}
       for m in PAPER_MODELS if m.startswith("vit_")},
    "vit_small_in22k": {"arch": ("vit_small", "paper Tab.15"), "pretrain_data": ("IN-22K", "paper Tab.15"),
                        "network": ("teacher", "unverified: no ViT-S/16 IN-22K release")},
    **{m: {"pretrain_data": ("IN-22K", "paper Tab.3/Tab.15"),
           "network": ("student", f"{_README}:111 's denotes the student', :235 and :249 backbone (s)")}
       for m in ("vit_base_in22k", "vit_large_in22k", "vit_large_in22k_ft512", "vit_large_in22k_ft384")},
    **{m: {"weights": ("checkpoint", "fine-tunes vit_large_in22k's pretraining"),
           "weights_from": ("vit_large_in22k", "paper Tab.3 FT 512 / README.md:222-223 of the IN-22K ViT-L/16")}
       for m in ("vit_large_in22k_ft512", "vit_large_in22k_ft384")},
    "swin_tiny_7": {"arch": ("swin_tiny", f"{_README}:83"), "patch_size": (4, f"{_README}:84"),
                    "window_size": (7, f"{_README}:85")},
    "swin_tiny_14": {"arch": ("swin_tiny", f"{_README}:91"), "patch_size": (4, f"{_README}:105"),
                     "window_size": (14, f"{_README}:106")},
}


_ALL = "every value gives the official number"
#: Values of the stage sections that are not the recipe's but how this implementation runs it, each with
#: the official counterpart or why it cannot change the number; checked like the recipe values.
IMPLEMENTATION: dict[str, dict[str, tuple[Any, str]]] = {
    "pretrain": {
        "augmentation": ("official", "main_ibot.py:575-620 DataAugmentationiBOT in the data workers"),
        "batch_rescale": (False, "the recipe's global batch, no rescale"),
        "compile": (False, "eager, as main_ibot.py"),
        "head_hidden_dim": (2048, "models/head.py:67 iBOTHead hidden_dim=2048"),
        "precision": ("auto", "main_ibot.py:97 use_fp16: fp16 + GradScaler when true, else fp32"),
        "global_crops_size": (224, "main_ibot.py:592,599 RandomResizedCrop(224)"),
        "local_crops_size": (96, "main_ibot.py:608 RandomResizedCrop(96)"),
        # ablation knobs (paper Tab. 9/17/18/20, App. E): their defaults are the official behaviour
        "head_sharing": ("flags", "main_ibot.py:233,243 shared_head / shared_head_teacher as given"),
        "patch_center_momentum": (0.9, "main_ibot.py:482 center_momentum2=0.9 (hard-coded)"),
        "patch_centering": (True, "main_ibot.py:535 teacher_patch - self.center2"),
        "patch_targets": ("soft", "main_ibot.py:535 softmax teacher patch targets"),
        "mim_target": ("online", "main_ibot.py:535 the teacher's patch distribution"),
        "mim_tokenizer": (None, "no offline tokenizer (the online teacher)"),
    },
    "linear": {"lrs": (None, "eval_linear.py lr grid (ibot.config.OFFICIAL_LR_GRID)"),
               "cache_val_features": (True, f"deterministic val transform, frozen backbone: {_ALL}")},
    "finetune": {"lrs": (None, "one run at the lr of the evaluation/README.md command")},
    "detection": {"num_classes": (None, "instances_val2017.json's 80 (cascade_rcnn/vit_*_coco_3x.py:50 num_classes=80)"),
                  "out_indices": (None, "[3, 5, 7, 11] (cascade_rcnn/vit_small_giou_4conv1f_coco_3x.py:33)"),
                  "val_interval": (0, "only the final test is reported")},
    "segmentation": {"num_classes": (None, "ADE20K's 150 (upernet/vit_small_512_ade20k_160k.py:38)"),
                     "checkpoint_interval": (16000, _ALL), "val_interval": (0, "only the final test is reported"),
                     "upernet": {"channels": (None, "= embed dim (upernet/vit_small_512_ade20k_160k.py:39)"),
                                 "out_indices": (None, "[3, 5, 7, 11] (upernet/vit_small_512_ade20k_160k.py:34)")},
                     "linear": {"out_indices": (None, "[3, 5, 7, 11] (linear/vit_small_512_ade20k_160k.py)")}},
    "robustness": {"batch_size": (None, _ALL), "num_workers": (None, _ALL), "max_images_per_class": (None, "all images"),
                   "allow_missing": (False, "all 19 x 5 folders"),
                   "corruptions": (None, "the 19 of analysis/corruptions_surf_variations/eval.py (note R3)"),
                   "variants": (None, "the 8 IN-9 variants of paper Tab.8"), "mapping_file": (None, "in_to_in9.json"),
                   "crop": (None, "the linear head's eval crop"), "resize": (None, "the protocol's"),
                   "interpolation": (None, "bilinear (analysis/occlusion/eval.py:109)"),
                   "drop": (None, "zeroed pixels (analysis/occlusion/eval.py)"),
                   "attention_heads": (None, "saliency_model.head (analysis/occlusion/eval.py:168)"),
                   "modes": (["salient", "nonsalient", "random"], "eval_occlusion.sh --dino (both) and --random_drop"),
                   "ratios": ([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
                              "eval.py:354-355 lambda 0.1..1.0, :331-335 random 0..0.9 (0.5 reported)"),
                   "split": ("val", "eval_occlusion.sh --test_data data/imagenet/val"),
                   "saliency_model.checkpoint": (None, "DINO's ViT-S/16 file, a path set per machine"),
                   "saliency_model.checkpoint_key": (None, "auto"), "saliency_model.depth": (None, "the arch's")},
    "semi_supervised": {"heads": (None, "heads.pth of the pretraining"), "subsets": (None, "SimCLR's subset files"),
                        "protocols": (["knn", "linear", "logreg", "finetune", "finetune_head"], "Tab.12 rows"),
                        "knn": (None, "the k-NN stage's recipe (evaluation/README.md:61)"),
                        "linear": (None, "the linear stage's recipe (evaluation/README.md:61)")},
    "video_segmentation": {"precision": ("fp32", "eval_video_segmentation.py runs without autocast")},
    "retrieval": {"num_workers": (10, "eval_image_retrieval.py:98")},
}


def uncovered(resolved: Mapping[str, Any], expected: Mapping[str, Any], implementation: Mapping[str, Any],
              operational: frozenset[str], prefix: str = "") -> list[str]:
    """Resolved keys that neither the transcribed recipe nor :data:`IMPLEMENTATION` accounts for."""
    out = []
    for key, value in resolved.items():
        dotted = f"{prefix}{key}"
        if key in operational or dotted in implementation or key in implementation:
            continue
        spec = expected.get(key)
        if isinstance(value, dict) and value and (isinstance(spec, dict) or spec is None):
            sub_impl = implementation.get(key) if isinstance(implementation.get(key), dict) else implementation
            out += uncovered(value, spec or {}, sub_impl, operational, f"{dotted}.")
        elif spec is None:
            out.append(dotted)
    return out


def _common(stage: str) -> dict[str, Any]:
    """Official values of a stage shared by every model (the stage tests' tables)."""
    section = STAGES[stage].section
    if section == "pretrain":
        return {key: (value, f"main_ibot.py:{line}") for key, (value, line) in OFFICIAL_MAIN_IBOT_DEFAULTS.items()
                if key not in ("num_workers", "saveckp_freq")}  # operational (ibot.stages: no effect on results)
    if section == "segmentation":
        return {**copy.deepcopy(OFFICIAL_SEGMENTATION), "head": (STAGES[stage].fixed["head"], "set by the stage")}
    if section == "robustness":
        return dict(OFFICIAL_ROBUSTNESS[stage])
    if section == "semi_supervised":
        return {"finetune": dict(OFFICIAL_SEMI_FINETUNE), "logreg": dict(OFFICIAL_LOGREG),
                "finetune_head_layer": (1, "evaluation/README.md:66 --finetune_head_layer 1")}
    if section == "unsupervised":
        return dict(OFFICIAL_UNSUP_CLS)
    if section == "transfer":
        return dict(OFFICIAL_TRANSFER_VIT_S[STAGES[stage].subsection])
    if section == "retrieval":
        return dict(OFFICIAL_RETRIEVAL)
    if section == "video_segmentation":
        return dict(OFFICIAL_VIDEO_SEGMENTATION)
    return {"knn": OFFICIAL_EVAL_KNN, "linear": OFFICIAL_EVAL_LINEAR_VIT_S, "finetune": OFFICIAL_FINETUNE_VIT_S,
            "detection": OFFICIAL_DETECTION}[section]


def official(model: str, stage: str) -> dict[str, Any]:
    """The transcribed official config of ``model`` x ``stage``: ``key -> (value, source)``, nested for heads."""
    spec = STAGES[stage]
    per_model = PER_MODEL[model].get(spec.section, {})
    if spec.subsection:  # per-model values of a sub-section (transfer.<dataset>)
        per_model = per_model.get(spec.subsection, {})
    return _merge(_common(stage), per_model)


def mismatches(resolved: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> list[str]:
    """Every key whose resolved value differs from the official one, with both values and the source."""
    problems = []
    for key, spec in expected.items():
        if isinstance(spec, dict):
            problems += mismatches(resolved.get(key) or {}, spec, f"{where}.{key}")
            continue
        value, source = spec
        if key not in resolved:
            problems.append(f"{where}.{key}: missing from the resolved config; official {value!r} ({source})")
        elif resolved[key] != value or (isinstance(value, bool) and not isinstance(resolved[key], bool)):
            problems.append(f"{where}.{key}: resolved {resolved[key]!r}, official {value!r} ({source})")
    return problems


@pytest.fixture(scope="module")
def paper() -> dict[str, Any]:
    """config/paper.yaml with its extra stages (no paper number): the contract covers them too."""
    config = validate_config(load_yaml(ROOT / "config" / "paper.yaml"), base_dir=ROOT)
    assert config["extra_stages"] is False
    return {**config, "extra_stages": True}


def test_every_paper_model_and_stage_runs_the_official_recipe(paper) -> None:
    assert set(PAPER_MODELS) == set(paper["models"]), "tabulate every model of config/paper.yaml here"
    problems = []
    for model in PAPER_MODELS:
        problems += mismatches(paper["models"][model], MODEL_KEYS.get(model, {}), f"models.{model}")
        for stage in planned_stages(paper, model):
            problems += mismatches(stage_config(paper, stage, model), official(model, stage), f"{model} x {stage}")
    assert not problems, "resolved config differs from the official recipe:\n  " + "\n  ".join(problems)


#: Stages config/paper.yaml leaves out because the paper has no number for them (they need a dataset
#: the paper does not use); a user adds them to `stages` and sets the data key.
NOT_IN_PAPER = {"imagenet_r": "no ImageNet-R column in Tab.8; needs data.imagenet_r"}
#: Analyses the paper reports outside its main tables: planned by config/ablations.yaml, not by the paper config.
ABLATION_ONLY = {"linear_part": "Fig. 5's part-wise probing gains (iBOT ViT-S/16 over DINO, released weights)"}


def test_every_stage_is_planned_or_declared_unsupported_with_a_reason(paper) -> None:
    """For each paper ViT: every stage runs (for it, or for a variant of the same paper model, e.g. the
    out_dim-1000 ViT-S/16 of Tab.5), or its recipe says why there is no recipe for it."""
    for model in MAIN_MODELS:
        paper_model = paper["models"][model]["paper_model"]
        variants = [m for m, e in paper["models"].items() if e["paper_model"] == paper_model]
        planned = {stage for m in variants for stage in planned_stages({**paper, "extra_stages": False}, m)}
        unsupported = paper["models"][model].get("unsupported_stages") or {}
        unreported = paper["models"][model].get("unreported_stages") or {}
        for stage in EVALUATION_STAGES:
            if stage in NOT_IN_PAPER or stage in ABLATION_ONLY:
                assert stage not in planned and stage not in unsupported, (model, stage)
                continue
            assert [stage in planned, stage in unsupported, stage in unreported].count(True) == 1, \
                f"{model} x {stage}: planned, unsupported (no recipe) or unreported (no paper number)?"
            if stage in {**unsupported, **unreported}:
                assert len({**unsupported, **unreported}[stage]) > 20, f"{model} x {stage}: say why"
    # the paper plans what the paper reports; a stage with a recipe but no paper number is opt-in
    assert set(paper["models"]["vit_large"]["unreported_stages"]) == {
        "seg_upernet", "seg_linear", "imagenet_c", "imagenet_a", "bg_challenge", "occlusion"}
    assert set(paper["models"]["vit_base"]["unreported_stages"]) == {"imagenet_c", "imagenet_a", "bg_challenge",
                                                                     "occlusion"}
    assert set(paper["models"]["vit_small"]["unreported_stages"]) == {"seg_linear"}
    assert "seg_upernet" in planned_stages(paper, "vit_large")
    assert "detection" in paper["models"]["vit_large"]["unsupported_stages"]
    assert planned_stages(paper, "vit_small_out1000") == ["pretrain", "unsupervised"]
    ablations, _ = load_workflow_config([ROOT / "config" / "ablations.yaml"])
    for stage in ABLATION_ONLY:
        assert any(stage in planned_stages(ablations, m) for m in ablations["models"]), stage


def test_every_resolved_value_is_cited_or_marked_unverified(paper) -> None:
    """The contract is complete: each value a paper job runs with is a transcribed official value, an
    implementation setting with its source (IMPLEMENTATION) or an operational key; a new config key
    fails here until it is given a source."""
    from ibot.config import unverified_values

    problems = []
    for model in PAPER_MODELS:
        for stage in planned_stages(paper, model):
            section = STAGES[stage].section
            resolved = stage_config(paper, stage, model)
            implementation = IMPLEMENTATION.get(section, {})
            problems += [f"{model} x {stage}: {key}" for key in uncovered(
                resolved, official(model, stage), implementation, frozenset(STAGES[stage].operational_keys))]
            for key, spec in implementation.items():  # present keys only: robustness stages differ in keys
                if isinstance(spec, tuple) and key in resolved and spec[0] is not None and resolved[key] != spec[0]:
                    problems.append(f"{model} x {stage}: {key} = {resolved[key]!r}, expected {spec[0]!r} ({spec[1]})")
        for key in unverified_values(paper, model):
            assert key in {"network"} or key.split(".")[0] in {s.section for s in STAGES.values()}, key
    assert not problems, "values without a source:\n  " + "\n  ".join(problems)


def test_unverified_values_are_listed_with_what_verifies_them(paper) -> None:
    from ibot.config import unverified_values

    marks = {model: unverified_values(paper, model) for model in PAPER_MODELS}
    assert set(marks["vit_base"]) >= {"pretrain.lr", "pretrain.min_lr", "pretrain.drop_path"}
    assert "pretrain.epochs" not in marks["vit_large"] and "pretrain.lr" not in marks["vit_large"]
    assert {"pretrain.pred_ratio", "pretrain.pred_ratio_var"} <= set(marks["vit_base_rand_mask"])
    assert "vitb_16_rand_mask/args.txt" in marks["vit_base_rand_mask"]["pretrain.pred_ratio"]
    # a value the model's own overrides set (and cite) is no longer the recipe's unverified one
    assert "pretrain.global_crops_scale" in marks["vit_base"]
    assert "pretrain.global_crops_scale" not in marks["vit_base_no_multicrop"]
    assert not marks["vit_small"] and marks["vit_small_in22k"].keys() == {"network"}
    # the config's marks are exactly the transcribed values whose source cannot be read offline
    for model in PAPER_MODELS:
        table = {f"pretrain.{key}" for key, (_, source) in official(model, "pretrain").items()
                 if "args.txt" in source or source.startswith("unverified")} if model in marks else set()
        table |= {key for key, (_, source) in MODEL_KEYS.get(model, {}).items() if source.startswith("unverified")}
        assert table == set(marks[model]), model
    # per stage: the FT 512 number depends on vit_large_in22k's pretraining values
    ft512 = unverified_values(paper, "vit_large_in22k_ft512", "finetune")
    assert "pretrain.drop_path" in ft512 and "vit_large_in22k's pretraining" in ft512["pretrain.drop_path"]
    bad = copy.deepcopy(load_yaml(ROOT / "config" / "paper.yaml"))
    bad["models"]["vit_small"]["unverified"] = {"pretrain.no_such_key": "a reason long enough"}
    with pytest.raises(ConfigError, match=r"models.vit_small.unverified: 'pretrain.no_such_key' names no config value"):
        validate_config(bad, base_dir=ROOT)


def test_the_contract_fails_on_a_changed_recipe_value(paper) -> None:
    changed = copy.deepcopy(paper)
    changed["models"]["vit_base"]["recipe_overrides"]["finetune"]["layer_decay"] = 0.75
    problems = mismatches(stage_config(changed, "finetune", "vit_base"), official("vit_base", "finetune"), "vit_base")
    assert problems == [f"vit_base.layer_decay: resolved 0.75, official 0.65 ({_EVAL}:37)"]


def test_planning_an_unsupported_stage_gives_the_reason() -> None:
    config = load_yaml(ROOT / "config" / "paper.yaml")
    config["models"]["vit_large"]["stages"] = ["knn", "detection"]
    with pytest.raises(ConfigError, match=r"models.vit_large.stages: 'detection' has no recipe .*vit_small and vit_base"):
        validate_config(config, base_dir=ROOT)


def test_pretraining_global_batches_are_the_recipes(paper) -> None:
    for model in [m for m in PAPER_MODELS if paper["models"][m]["weights"] == "pretrain"]:
        batch = global_batch(paper, model)
        expected = official(model, "pretrain")["global_batch_size"][0]  # 1024; Swin-T/14 1040
        assert batch["global"] == batch["recipe"] == expected and not batch["rescaled"], (model, batch)
    assert global_batch(paper, "vit_large")["processes"] == 64  # README.md:58: 64 GPUs


def test_global_batch_mismatch_fails_before_any_job_unless_rescale_is_explicit() -> None:
    config = load_yaml(ROOT / "config" / "paper.yaml")
    del config["models"]["vit_large"]["resources"]
    with pytest.raises(ConfigError, match=r"models.vit_large: pretrain.global_batch_size is 1024 but .* = 256"):
        validate_config(copy.deepcopy(config), base_dir=ROOT)
    config["models"]["vit_large"]["overrides"] = {"pretrain": {"batch_rescale": True}}
    batch = global_batch(validate_config(config, base_dir=ROOT), "vit_large")
    assert batch == {"per_gpu": 16, "processes": 16, "global": 256, "recipe": 1024, "rescaled": True}


def test_vit_large_pretrains_in_fp32_as_use_fp16_false(paper) -> None:
    from ibot.train.pretrain import _precision

    cuda = torch.device("cuda")  # the choice only; nothing runs on it
    assert _precision(stage_config(paper, "pretrain", "vit_large"), cuda) == (None, False)
    assert _precision(stage_config(paper, "pretrain", "vit_base"), cuda) == (torch.float16, True)
    assert _precision({"precision": "bf16", "use_fp16": False}, cuda) == (torch.bfloat16, False)
