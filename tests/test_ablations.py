"""The paper's ablations: reference settings, config/ablations.yaml (coverage, plan, one pretraining step of
every ablation model with its resolved recipe), the ablation tables and the skipping of models whose
user-provided file is absent."""

from __future__ import annotations

import copy
import functools

import pandas as pd
import pytest

from helpers import REPO
from ibot.config import ConfigError, load_workflow_config, skipped_models, validate_config
from ibot.results.ablations import (ablation_coverage, ablation_tables, format_ablation_tables, load_ablations,
                                    load_settings, row_job)

ABLATIONS = REPO / "config" / "ablations.yaml"


def test_every_reference_row_has_a_setting_and_a_reference_row_to_compare_with():
    rows, settings = load_ablations(), load_settings()
    assert len(rows) == 154 and len(settings) == 78 and rows["setting"].notna().all()
    # the deltas of a table are taken against a setting printed in the same columns
    for setting in settings[settings["delta_vs"] != ""].itertuples():
        own = set(rows[rows["setting"] == setting.setting]["task"])
        assert own & set(rows[rows["setting"] == setting.delta_vs]["task"]), setting.setting


def _config(models: dict, **extra) -> dict:
    return validate_config({"run": "r", "results_dir": "results", "stages": [],
                            "data": {"embedded": {"generate": False}, "imagenet": "/data"},
                            "models": models, **extra}, base_dir=REPO)


def test_a_row_is_produced_by_the_model_with_its_epochs_and_tab19_hours_by_the_longest_run():
    tiny = {"arch": "vit_tiny", "patch_size": 16}
    config = _config({"dino_300": {**tiny, "ablation": ["tab19_dino_2c"], "overrides": {"pretrain": {"epochs": 300}}},
                      "dino_800": {**tiny, "ablation": ["tab19_dino_2c"], "overrides": {"pretrain": {"epochs": 800}}}})
    rows = load_ablations()
    dino = rows[rows["setting"] == "tab19_dino_2c"]
    jobs = {(r.task, r.metric, r.epochs_n): row_job(r, config) for r in dino.itertuples()}
    assert jobs[("linear", "top1", 300)] == ("dino_300", "linear", "top1")
    assert jobs[("linear", "top1", 800)] == ("dino_800", "linear", "top1")
    assert jobs[("compute", "train_time", 100)] == ("dino_800", "pretrain", "train_hours_100ep")
    assert jobs[("compute", "train_time", 300)] == ("dino_800", "pretrain", "train_hours_300ep")
    assert jobs[("compute", "gpu_mem", None)] == ("dino_800", "pretrain", "peak_memory_gb")
    other = rows[rows["setting"] == "tab9_ibot"].iloc[0]
    assert row_job(other, config) == "no model of this config lists ablation setting 'tab9_ibot'"
    config["ablation_not_planned"] = {"tab9_ibot": "because"}
    assert row_job(other, config) == "because"


def test_unknown_settings_are_refused_naming_the_key():
    with pytest.raises(ConfigError, match=r"models.m.ablation: 'tab99' is not an ablation setting"):
        _config({"m": {"arch": "vit_tiny", "patch_size": 16, "ablation": ["tab99"]}})
    with pytest.raises(ConfigError, match=r"ablation_not_planned: 'nope' is not an ablation setting"):
        _config({"m": {"arch": "vit_tiny", "patch_size": 16}}, ablation_not_planned={"nope": "x"})


def test_a_missing_user_file_skips_its_model_and_those_reading_its_outputs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tiny = {"arch": "vit_tiny", "patch_size": 16}
    models = {"released": {**tiny, "weights": "checkpoint", "checkpoint": "weights/absent.pth", "stages": ["knn"]},
              "source": {**tiny, "stages": ["knn"]},
              "ft": {**tiny, "weights": "checkpoint", "weights_from": "source", "stages": ["finetune"]}}
    config = _config(copy.deepcopy(models), skip_models_missing_files=True)
    assert skipped_models(config) == {"released": "needs models.released.checkpoint: weights/absent.pth (absent)"}
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "absent.pth").write_bytes(b"x")
    assert skipped_models(config) == {}
    assert skipped_models(_config(copy.deepcopy(models))) == {}  # off by default: a missing file fails the plan
    # a pretraining resuming from an absent file is skipped, and so is the model evaluating its weights
    models["source"]["overrides"] = {"pretrain": {"load_from": "weights/gone.pth"}}
    skipped = skipped_models(_config(copy.deepcopy(models), skip_models_missing_files=True))
    assert skipped == {"source": "needs pretrain.load_from: weights/gone.pth (absent)",
                       "ft": "takes its weights from source, skipped (needs pretrain.load_from: weights/gone.pth (absent))"}


def test_ablation_tables_put_ours_beside_the_paper_with_both_deltas():
    from ibot.results.aggregate import SUMMARY_COLUMNS

    summary = pd.DataFrame([
        {**dict.fromkeys(SUMMARY_COLUMNS), "run": "r", "model": m, "stage": s, "dataset": "d", "protocol": "p",
         "metric": k, "value": v, "seed": 0, "is_paper_protocol": False}
        for m, s, k, v in [("base", "knn", "top1_k20", 50.0), ("base", "linear", "top1", 60.0),
                           ("dino", "knn", "top1_k20", 45.0), ("dino", "linear", "top1", 57.5)]])
    models = {"base": {"ablation": ["tab9_ibot"], "pretrain_epochs": 300},
              "dino": {"ablation": ["tab9_dino"], "pretrain_epochs": 300}}
    frame = ablation_tables(summary, models)
    tab9 = frame[frame["table"] == "Tab.9 tokenizer ablation"].set_index(["setting", "column"])
    assert tab9.loc[("tab9_dino", "k-NN"), "ours"] == 45.0 and tab9.loc[("tab9_dino", "k-NN"), "paper"] == 67.9
    assert tab9.loc[("tab9_dino", "k-NN"), "delta_ours"] == pytest.approx(-5.0)
    assert tab9.loc[("tab9_dino", "k-NN"), "delta_paper"] == pytest.approx(67.9 - 69.1)
    assert tab9.loc[("tab9_dino", "Lin."), "delta_ours"] == pytest.approx(-2.5)
    assert pd.isna(tab9.loc[("tab9_no_cls", "k-NN"), "ours"])  # not run: empty, never a number
    text = format_ablation_tables(frame, "r")
    assert "| tab9_dino | DINO ViT-S/16: w/o L_MIM (DINO: [CLS] self-distillation only) | 45.0 / 67.9 |" in text
    assert "-5.0 / -1.2" in text
    tab19 = frame[frame["table"] == "Tab.19 time/memory"]
    assert {"T100", "T300", "T800", "Mem. (GB)", "Lin.300", "Lin.800", "Fin.800"} <= set(tab19["column"])


def test_fig5_gains_are_ours_minus_the_named_baseline_at_the_rows_k():
    from ibot.results.aggregate import SUMMARY_COLUMNS

    summary = pd.DataFrame([
        {**dict.fromkeys(SUMMARY_COLUMNS), "run": "r", "model": m, "stage": "linear_part", "dataset": "d",
         "protocol": "p", "metric": k, "value": v, "seed": 0, "is_paper_protocol": False}
        for m, k, v in [("ibot", "top1_k56", 70.0), ("ibot", "top1_k1", 40.0),
                        ("dino", "top1_k56", 64.5), ("dino", "top1_k1", 25.0)]])
    models = {"ibot": {"ablation": ["partwise_topk", "partwise_top1"], "pretrain_epochs": 800,
                       "ablation_gain_over": "dino"},
              "dino": {"ablation": [], "pretrain_epochs": 800}}
    frame = ablation_tables(summary, models)
    fig5 = frame[frame["table"] == "Fig.5 part-wise linear (text)"].set_index("setting")
    assert set(fig5["column"]) == {"Lin. gain over DINO ViT-S/16"}
    assert fig5.loc["partwise_topk", "ours"] == pytest.approx(5.5) and fig5.loc["partwise_topk", "paper"] == 5.9
    assert fig5.loc["partwise_top1", "ours"] == pytest.approx(15.0) and fig5.loc["partwise_top1", "paper"] == 17.9
    assert fig5.loc["partwise_topk", "our_model"] == "ibot - dino" and pd.isna(fig5.loc["partwise_topk", "ci_low"])
    # the k comes from the row (top-56 / top-1 patch tokens), the subtracted model from the config
    tiny = {"arch": "vit_tiny", "patch_size": 16, "stages": ["linear_part"], "paper_epochs": 800}
    config = _config({"ibot": {**tiny, "ablation": ["partwise_topk", "partwise_top1"], "ablation_gain_over": "dino"},
                      "dino": tiny})
    rows = load_ablations()
    jobs = {r.setting: row_job(r, config) for r in rows[rows["setting"].str.startswith("partwise")].itertuples()}
    assert jobs == {"partwise_topk": ("ibot", "linear_part", "top1_k56"),
                    "partwise_top1": ("ibot", "linear_part", "top1_k1")}
    config["models"]["ibot"]["ablation_gain_over"] = None  # a gain with nothing to subtract is not planned
    frame = ablation_coverage(config, [], reference=rows[rows["setting"] == "partwise_topk"])
    assert frame["status"].tolist() == ["not planned"] and "needs ablation_gain_over" in frame["reason"][0]
    with pytest.raises(ConfigError, match=r"models.ibot.ablation_gain_over: 'nobody' is not a model"):
        _config({"ibot": {**tiny, "ablation_gain_over": "nobody"}})


def test_tab19_hours_and_memory_name_the_device_they_were_measured_on(tmp_path):
    import json

    from ibot.results.aggregate import SUMMARY_COLUMNS

    record = tmp_path / "metrics.json"
    record.write_text(json.dumps({"extra": {"summary": {"device_name": "NVIDIA H100", "world_size": 16,
                                                        "memory_kind": "cuda_max_allocated"}}}))
    summary = pd.DataFrame([{**dict.fromkeys(SUMMARY_COLUMNS), "run": "r", "model": "ibot_800", "stage": "pretrain",
                             "dataset": "d", "protocol": "p", "metric": k, "value": v, "seed": 0,
                             "is_paper_protocol": False, "metrics_file": str(record)}
                            for k, v in [("train_hours_100ep", 20.0), ("train_hours_800ep", 160.0),
                                         ("peak_memory_gb", 18.0)]])
    frame = ablation_tables(summary, {"ibot_800": {"ablation": ["tab19_ibot_mc"], "pretrain_epochs": 800}})
    cells = frame[frame["setting"] == "tab19_ibot_mc"].set_index("column")
    assert cells.loc["T100", "ours"] == 20.0 and cells.loc["T100", "paper"] == 24.3
    assert cells.loc["Mem. (GB)", "ours"] == 18.0 and pd.isna(cells.loc["T300", "ours"])
    text = format_ablation_tables(frame)
    assert "Ours measured on: ibot_800: NVIDIA H100 x 16 processes, cuda_max_allocated" in text


def test_the_ablation_config_plans_most_rows_and_says_why_not_for_the_others():
    from ibot.results.coverage import planned_outputs

    config, _ = load_workflow_config([ABLATIONS])
    frame = ablation_coverage(config, planned_outputs([ABLATIONS]), skipped=skipped_models(config))
    assert len(frame) == 154
    planned = frame["status"].isin(["planned", "needs file"])
    assert planned.mean() >= 0.85, frame[~planned][["setting", "reason"]]
    assert (frame[~planned]["reason"] != "").all()
    # released weights and the DALL-E encoder are user-provided: absent here, their rows wait for them
    needs = frame[frame["status"] == "needs file"]
    assert needs["reason"].str.contains("absent").all()
    assert set(needs["setting"]) >= {"tab9_beit", "tab11_ibot_s_200_ld075", "seg_ln_ibot_b_on"}
    # everything that needs no user file is in the Snakemake plan
    assert {"tab9_frozen_dino", "tab20_kmeans", "tab17_vanilla", "center_m08", "mc_b_s04"} <= set(
        frame[frame["status"] == "planned"]["setting"])
    fig5 = frame[frame["setting"] == "partwise_topk"].iloc[0]  # both released teachers: iBOT minus DINO
    assert fig5["status"] == "needs file" and "ibot_s_partwise/linear_part/metrics.json (top1_k56) - " \
        "results/ablations/dino_s_partwise/linear_part/metrics.json (top1_k56)" in fig5["job"]


# -- one embedded-size pretraining step of every ablation model, with its resolved recipe ---------------------
#: Size keys shrunk for a CPU step; every other value (the setting's knobs) is the resolved recipe's.
SHRUNK = {"epochs": 1, "batch_size_per_gpu": 4, "global_batch_size": None, "global_crops_size": 64,
          "local_crops_size": 32, "num_workers": 0, "head_hidden_dim": 64, "warmup_epochs": 0,
          "warmup_teacher_temp_epochs": 0, "pred_start_epoch": 0, "saveckp_freq": 0, "precision": "fp32"}


@pytest.fixture(scope="module")
def step_images(tmp_path_factory):
    from ibot.data.embedded import EmbeddedSizes, generate

    sizes = EmbeddedSizes(classes=2, train_per_class=4, val_per_class=1, c_per_class=1, a_classes=2, image_size=64)
    return generate(tmp_path_factory.mktemp("data"), seed=0, sets=["imagenet"], sizes=sizes)["imagenet"]


def _tokenizer_file(kind: str, cfg: dict, spec: dict, tmp_path) -> str:
    """A stand-in of the file the setting reads, of the kind and vocabulary its recipe expects."""
    import torch

    from ibot.checkpoint import export_backbone, export_heads
    from ibot.train.pretrain import build_models

    path = tmp_path / f"{kind}.pth"
    if kind == "kmeans":  # K centroids in the tokenizer's pixel space (what `ibot.tokenizers fit-kmeans` writes)
        p, k = spec["patch_size"], cfg["patch_out_dim"]
        torch.save({"centroids": torch.rand(k, 3 * p * p), "meta": {"k": k, "patch_size": p,
                                                                     "crop": cfg["global_crops_size"]}}, path)
    elif kind == "frozen":  # the frozen model's export: its vocabulary is its head's patch output
        student, teacher = build_models(cfg, spec)
        path = tmp_path / "pretrain" / "teacher_backbone.pth"
        export_backbone(teacher.backbone, path, {**spec, "epochs": 0, "network": "teacher"})
        export_heads({"teacher": teacher.head, "student": student.head}, path.with_name("heads.pth"),
                     {**spec, "epochs": 0, "out_dim": cfg["out_dim"], "patch_out_dim": cfg["patch_out_dim"],
                      "shared_head": cfg["shared_head"], "shared_head_teacher": cfg["shared_head_teacher"]})
    else:  # dalle: a random-weights encoder pickled as the release is
        from dall_e.encoder import Encoder

        torch.save(Encoder(n_hid=64, n_blk_per_group=1, vocab_size=8192), path)
    return str(path)


@functools.lru_cache(maxsize=1)
def _pretrained_models():
    config, _ = load_workflow_config([ABLATIONS])
    return config, [m for m, e in config["models"].items() if e["weights"] == "pretrain"]


@pytest.mark.parametrize("model", _pretrained_models()[1])
def test_every_ablation_model_takes_a_pretraining_step_with_its_resolved_recipe(model, step_images, tmp_path,
                                                                                one_thread):
    import math

    from ibot.config import stage_config
    from ibot.train.pretrain import Trainer

    config, _ = _pretrained_models()
    cfg = {**copy.deepcopy(stage_config(config, "pretrain", model)), **SHRUNK}
    cfg["local_crops_number"] = min(cfg["local_crops_number"], 2)
    spec = {"arch": "vit_tiny", "patch_size": 16, "depth": 2}
    if cfg["mim_target"] in ("kmeans", "frozen", "dalle"):
        if cfg["mim_target"] == "dalle":
            pytest.importorskip("dall_e", reason="the [dalle] extra (setup.sh --test installs it)")
        cfg["mim_tokenizer"] = _tokenizer_file(cfg["mim_target"], cfg, spec, tmp_path)
    trainer = Trainer(cfg, spec, step_images / "train", tmp_path / "work")
    crops, _, masks = next(iter(trainer._loader(0)))
    row = trainer.train_step(crops, masks, 0, 0)
    assert math.isfinite(row["loss"]), row
    # the setting's terms: no [CLS] term without lambda1 (or without a second global crop), no MIM term without lambda2
    assert (row["cls"] == 0) == (cfg["lambda1"] == 0 or cfg["global_crops_number"] == 1), row
    assert (row["patch"] == 0) == (cfg["lambda2"] == 0), row
