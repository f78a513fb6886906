"""The paper's reference numbers: the tracked copy of the shared reference CSV, the metric map that
joins our metrics to its rows, paper labels, and the paper protocols our stages' labels must match."""

from __future__ import annotations

import pytest

from helpers import REPO
from ibot.results.aggregate import (PAPER_PROTOCOLS_CSV, REFERENCE_CSV, load_metric_map, load_paper_protocols,
                                    load_reference, paper_values, paper_label, parse_paper_label)
from ibot.stages import STAGES

#: sha256 of the shared reference file (../shared/reference/ibot_paper_results.csv) the tracked copy was made from.
REFERENCE_SHA256 = "076e6b3e82f313d449fc63d300d3e1ea23994de82d5b19ca6103daa511e4a264"


def test_reference_copy_is_the_shared_file():
    """The tracked copy is byte for byte the shared reference (its digest; and the file itself when a
    checkout has ../shared/reference beside it, which a /tmp clone does not)."""
    import hashlib
    assert hashlib.sha256(REFERENCE_CSV.read_bytes()).hexdigest() == REFERENCE_SHA256
    shared = REPO.parent / "shared" / "reference"
    if shared.is_dir():
        assert REFERENCE_CSV.read_bytes() == (shared / "ibot_paper_results.csv").read_bytes()
        tracked_readme = (REFERENCE_CSV.parent / "README.md").read_text()
        assert tracked_readme.startswith((shared / "README.md").read_text())  # + our "In this project" part


def test_metric_map_lines_resolve_to_one_reference_row():
    reference, mapping = load_reference(), load_metric_map()
    # every label a line can serve: each reference model x pretraining data x variant of the map
    models = sorted({paper_label(m, data, variant) for m in set(reference["model"]) for data in ("IN-1K", "IN-22K")
                     for variant in set(mapping["variant"])})
    paper = paper_values(reference, mapping, models)  # raises if a line matches several rows
    with_table = mapping[mapping["paper_table"] != ""]
    resolved = set(zip(paper["group"], paper["column"]))
    unresolved = [(g, c) for g, c in zip(with_table["group"], with_table["column"]) if (g, c) not in resolved]
    assert not unresolved, f"mapping lines matching no reference row: {unresolved}"
    vit_s = paper[paper["paper_model"] == "ViT-S/16"].set_index("column")["paper_value"]
    assert vit_s["k-NN"] == 75.2 and vit_s["Linear"] == 77.9 and vit_s["Fine-tune"] == 82.3
    assert vit_s["IN-C err (19)"] == 48.1 and vit_s["S.5"] == 65.9 and vit_s["Only-BG-T"] == 17.4
    assert "mIoU (linear)" not in vit_s.index  # the paper has no ViT-S/16 linear-seg number
    assert paper[paper["paper_model"] == "ViT-L/16"].set_index("column").at["Linear", "paper_value"] == 81.0
    # a label sees only the lines of its pretraining data and variant
    in22k = paper[paper["paper_model"] == "ViT-B/16, IN-22K"].set_index("column")["paper_value"]
    assert in22k["k-NN"] == 71.1 and in22k["Linear"] == 79.0 and in22k["Fine-tune"] == 84.4  # Tab.15, Tab.3
    no_mc = paper[paper["paper_model"] == "ViT-S/16, no multi-crop"].set_index("column")["paper_value"]
    assert no_mc.to_dict() == {"k-NN": 72.4, "Linear": 76.2}  # Tab.10, nothing else
    assert paper[paper["paper_model"] == "ViT-L/16, IN-22K, FT 512"]["paper_value"].tolist() == [87.8]


def test_paper_labels_round_trip():
    assert paper_label("ViT-B/16") == "ViT-B/16" and paper_label(None, "IN-22K") is None
    assert paper_label("ViT-L/16", "IN-22K", "FT 512") == "ViT-L/16, IN-22K, FT 512"
    for label in ("ViT-S/16", "DINO ViT-S/16, no multi-crop", "ViT-L/16, IN-22K, FT 512", "ViT-B/16 (random mask)"):
        assert paper_label(*parse_paper_label(label)) == label
    assert parse_paper_label("ViT-S/16, no multi-crop") == ("ViT-S/16", "IN-1K", "no multi-crop")


def test_paper_protocols_name_every_paper_experiment_we_can_run():
    """Every (paper model, stage) with a paper number for a ViT we can evaluate has the dataset and
    protocol labels of the paper's experiment, and every such row has a paper number."""
    reference, mapping, experiments = load_reference(), load_metric_map(), load_paper_protocols()
    standard = {m for m in set(reference["model"]) if m.removeprefix("DINO ").startswith("ViT-") and "(" not in m}
    models = sorted(standard | set(_paper_labels().values()))  # + the variants config/paper.yaml runs
    joinable = set(map(tuple, paper_values(reference, mapping, models)[["paper_model", "stage"]].values))
    listed = set(zip(experiments["paper_model"], experiments["stage"]))
    # DINO fine-tuning, transfer and semi-supervised: no source says which recipe the DINO numbers
    # came from (DINO's own paper or iBOT's): no join
    transfer = {s for s in STAGES if s.startswith("transfer_")}
    unknown = {("DINO ViT-S/16", "finetune"), ("DINO ViT-B/16", "finetune"), ("DINO ViT-S/16", "semi_supervised"),
               ("DINO ViT-S/16", "unsupervised")}
    unknown |= {(f"DINO {arch}", stage) for arch in ("ViT-S/16", "ViT-B/16") for stage in transfer}
    assert joinable - listed == unknown
    assert listed <= joinable
    assert PAPER_PROTOCOLS_CSV.parent == REFERENCE_CSV.parent


def _paper_labels() -> dict[str, str]:
    """model -> paper label of every model of config/paper.yaml."""
    from ibot.config import load_yaml, validate_config
    from ibot.results.aggregate import models_info_from_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    return {model: info["paper_model"] for model, info in models_info_from_config(config).items() if info["paper_model"]}


def _paper_stage_config(stage: str, model: str) -> tuple[dict, dict]:
    from ibot.config import load_yaml, model_spec, stage_config, validate_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    return stage_config(config, stage, model), model_spec(config, model)


#: Stages whose protocol label is ``protocol_label(config)`` of these modules (checked against
#: paper_protocols.csv for the paper config of every model).
LABELLED_STAGES = {"knn": "downstream.engine.knn", "linear": "downstream.engine.linear",
                   "finetune": "downstream.engine.finetune",
                   "detection": "downstream.dense.detection", "seg_upernet": "downstream.dense.segmentation",
                   "seg_linear": "downstream.dense.segmentation"}


@pytest.mark.parametrize("stage", sorted(LABELLED_STAGES))
def test_the_paper_config_writes_the_paper_protocol_labels(stage):
    import importlib
    module = importlib.import_module(LABELLED_STAGES[stage])
    experiments = load_paper_protocols()
    rows = experiments[(experiments["stage"] == stage) & ~experiments["paper_model"].str.startswith("DINO ")]
    assert len(rows), stage
    paper_models = {label: model for model, label in reversed(list(_paper_labels().items()))}  # first model wins
    for row in rows.itertuples(index=False):
        config, _ = _paper_stage_config(stage, paper_models[row.paper_model])
        assert module.protocol_label(config) == row.protocol, (stage, row.paper_model)


@pytest.mark.parametrize("stage", ["imagenet_c", "imagenet_a", "bg_challenge"])
def test_robustness_labels_name_the_paper_linear_head(stage):
    """A robustness number joins the paper's only when its head came from the paper's linear protocol."""
    from downstream.engine import linear
    from downstream.robustness.common import robustness_protocol
    experiments = load_paper_protocols()
    rows = experiments[(experiments["stage"] == stage) & ~experiments["paper_model"].str.startswith("DINO ")]
    assert len(rows), stage
    for row in rows.itertuples(index=False):
        config, _ = _paper_stage_config("linear", {"ViT-S/16": "vit_small"}[row.paper_model])
        assert robustness_protocol({"protocol": linear.protocol_label(config)}) == row.protocol, stage


def test_occlusion_joins_the_paper_only_with_the_official_protocol_and_dino_saliency():
    """The paper config pointed at DINO's released ViT-S/16 (the official protocol) writes exactly the
    paper row's label; the self-attention variant and another saliency model never join it."""
    from downstream.engine import linear
    from downstream.robustness import occlusion
    experiments = load_paper_protocols()
    paper = experiments[(experiments["stage"] == "occlusion") & (experiments["paper_model"] == "ViT-S/16")]
    head = {"protocol": linear.protocol_label(_paper_stage_config("linear", "vit_small")[0])}
    config, _ = _paper_stage_config("occlusion", "vit_small")
    dino = {**config, "saliency_model": {**config["saliency_model"],
                                          "checkpoint": f"/weights/{occlusion.DINO_VITS16_FILE}"}}
    assert occlusion.protocol_label(dino, head) == paper["protocol"].item()
    assert occlusion.protocol_label({**dino, "protocol": "self_attention"}, head) != paper["protocol"].item()
    assert occlusion.protocol_label(config, head) != paper["protocol"].item()  # saliency checkpoint unset


def test_a_real_paper_run_refuses_an_unset_saliency_checkpoint_before_any_job():
    from ibot.config import ConfigError, check_stage_configs, load_yaml, validate_config
    config = validate_config(load_yaml(REPO / "config" / "paper.yaml"), base_dir=REPO)
    with pytest.raises(ConfigError, match=r"models.vit_small x occlusion: .*saliency_model.checkpoint"):
        check_stage_configs(config)
    config["robustness"]["occlusion"]["saliency_model"]["checkpoint"] = "/weights/dino_deitsmall16_pretrain.pth"
    check_stage_configs(config)
