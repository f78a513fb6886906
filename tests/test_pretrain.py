"""iBOT pretraining: official-step equivalence, exact resume, DDP = single process, export."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ibot.checkpoint import load_file
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.models.specs import ModelSpec
from helpers import run_pretrain, run_stage
from ibot.stages import stage_defaults
from ibot.train.pretrain import Trainer, epoch_marks, max_peak_memory, time_memory_metrics, train
from ibot.train.schedules import clip_gradients_per_param, cosine_schedule
from official_ibot_step import build_harnesses, official_loss

DEFAULTS = stage_defaults("pretrain")
SPEC = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
TINY = {**DEFAULTS, "epochs": 2, "batch_size_per_gpu": 8, "global_crops_size": 32, "local_crops_size": 16,
        "local_crops_number": 2, "num_workers": 0, "out_dim": 128, "patch_out_dim": 128, "warmup_epochs": 1,
        "warmup_teacher_temp_epochs": 1, "pred_ratio": [0.0, 0.3], "pred_ratio_var": [0.0, 0.2],
        "shared_head": False, "saveckp_freq": 1, "log_every": 100, "precision": "fp32"}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("data")
    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32)
    return str(generate(root, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train")


def _teacher_state(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.teacher.state_dict().items()}


def test_efficient_step_equals_official_layout(images, tmp_path):
    """Head on selected tokens only == the official head-on-every-token computation."""
    trainer = Trainer({**TINY, "drop_path": 0.0}, SPEC, images, tmp_path)
    crops, _, masks = next(iter(trainer._loader(0)))
    g = TINY["global_crops_number"]
    globals_, locals_ = torch.cat(crops[:g]), torch.cat(crops[g:])
    flat = torch.cat(masks[:g])
    ours = trainer.student(globals_, locals_, flat)
    teacher = trainer.teacher(globals_, None, flat, teacher=True)
    loss = trainer.loss((ours["cls"], ours["patch"]), (teacher["cls"], teacher["patch"]), ours["local_cls"], flat, 0,
                        teacher_patch_mean=teacher["patch_mean"])
    # official: full token logits for both networks, local crops through the whole head, official loss
    reference_loss = official_loss(trainer.cfg)
    s_cls, s_patch = trainer.student.head(trainer.student.backbone(globals_, mask=flat))
    t_cls, t_patch = trainer.teacher.head(trainer.teacher.backbone(globals_))
    s_local = trainer.student.head(trainer.student.backbone(locals_))[0]
    reference = reference_loss((s_cls, s_patch), (t_cls, t_patch), s_local, masks, 0)
    for key in ("cls", "patch", "loss"):
        assert torch.allclose(loss[key], reference[key], rtol=1e-5), key
    assert torch.allclose(trainer.loss.center, reference_loss.center, atol=1e-6)
    assert torch.allclose(trainer.loss.center2, reference_loss.center2, atol=1e-6)


def test_schedules_and_per_parameter_clipping():
    schedule = cosine_schedule(1.0, 0.0, epochs=2, iters_per_epoch=5, warmup_epochs=1)
    assert schedule[0] == 0 and schedule[4] == 1.0 and schedule[5] == 1.0 and schedule[-1] < 0.1
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    for param, scale in zip(model.parameters(), (10.0, 0.01, 5.0, 0.001)):
        param.grad = torch.full_like(param, scale)
    before = [p.grad.norm().item() for p in model.parameters()]
    clip_gradients_per_param(model, 1.0)
    after = [p.grad.norm().item() for p in model.parameters()]
    for b, a in zip(before, after):
        assert a == pytest.approx(min(b, 1.0), rel=1e-4)  # each parameter on its own


def test_kill_and_resume_is_bitwise_identical(images, tmp_path):
    full = train(TINY, SPEC, images, tmp_path / "full")

    class Killed(Exception):
        pass

    interrupted = Trainer(TINY, SPEC, images, tmp_path / "killed")
    original_save = interrupted.save

    def save_then_die(epoch):
        original_save(epoch)
        raise Killed

    interrupted.save = save_then_die
    with pytest.raises(Killed):
        interrupted.fit()
    resumed = train(TINY, SPEC, images, tmp_path / "killed")
    assert resumed.start_epoch == 1
    for key, value in _teacher_state(full).items():
        assert torch.equal(value, resumed.teacher.state_dict()[key]), key
    assert torch.equal(full.loss.center, resumed.loss.center)
    rows = [json.loads(line) for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(len(rows)))  # no duplicated or lost rows


def test_checkpoint_uses_official_keys(images, tmp_path):
    train({**TINY, "epochs": 1}, SPEC, images, tmp_path)
    state = load_file(tmp_path / "checkpoint.pth")
    # bytedance/ibot main_ibot.py:348-355 save_dict (+ 'fp16_scaler' with a scaler, :356-357)
    assert {"student", "teacher", "optimizer", "epoch", "args", "ibot_loss"} <= set(state)
    assert "backbone.blocks.0.attn.qkv.weight" in state["teacher"] and "head.last_layer.weight_g" in state["teacher"]
    assert set(state["ibot_loss"]) == {"center", "center2"} and state["epoch"] == 1


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(images, tmp_path):
    """Same global batch → same arithmetic (drop path off: its RNG stream is per process)."""
    config = {**TINY, "drop_path": 0.0, "saveckp_freq": 0}
    spec = dict(SPEC)
    results = {}
    for tasks in (1, 2):
        out = tmp_path / f"tasks{tasks}"
        run_stage("pretrain", ["--data", f"imagenet={images}", "--out", str(out / "metrics.json"),
                               "--config", json.dumps({**config, "batch_size_per_gpu": 8 // tasks}),
                               *ModelSpec.of(spec).cli_args(), "--resources",
                               json.dumps({"cluster": "local", "tasks_per_node": tasks, "cpus_per_task": 1,
                                           "timeout_min": 10})])
        results[tasks] = load_file(out / "work" / "checkpoint.pth")
    one, two = results[1], results[2]
    for key, value in one["teacher"].items():
        assert torch.allclose(value, two["teacher"][key], atol=2e-6, rtol=1e-5), key
    for key in ("center", "center2"):
        assert torch.allclose(one["ibot_loss"][key], two["ibot_loss"][key], atol=1e-6)
    losses = [[json.loads(l)["loss"] for l in (tmp_path / f"tasks{t}" / "work" / "train_log.jsonl").read_text().splitlines()]
              for t in (1, 2)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_export_and_metrics(images, tmp_path):
    """The stage exports the teacher and the student (its native image size and network in the meta) and
    writes metrics.json like every stage: the last logged losses, the run's summary and the work fingerprint."""
    from ibot.checkpoint import BackboneCheckpoint, extract_backbone_state
    from ibot.metrics import read_metrics

    summary = run_pretrain(images, tmp_path, {**TINY, "epochs": 1}, SPEC)
    assert summary["epochs"] == 1
    assert (tmp_path / "teacher_backbone.pth").is_file() and (tmp_path / "train_log.csv").is_file()
    exported = load_file(tmp_path / "teacher_backbone.pth")
    assert exported["meta"]["arch"] == "vit_tiny" and "masked_embed" not in exported["state_dict"]
    assert exported["meta"]["img_size"] == 32  # the pos_embed grid: 4 x 4 patches of 8 px
    # each export is that network's backbone of the final checkpoint (README.md:111: backbone (t) / (s))
    final = load_file(tmp_path / "work" / "checkpoint.pth")
    for network in ("teacher", "student"):
        path = tmp_path / f"{network}_backbone.pth"
        expected = extract_backbone_state(final, network)
        state = load_file(path)["state_dict"]
        assert set(state) == set(expected) and all(torch.equal(state[k], expected[k]) for k in state), network
        assert BackboneCheckpoint(path).network == network
    student = load_file(tmp_path / "student_backbone.pth")["state_dict"]
    assert "masked_embed" in student and not torch.equal(student["blocks.0.attn.qkv.weight"],
                                                          exported["state_dict"]["blocks.0.attn.qkv.weight"])
    record = read_metrics(tmp_path / "metrics.json")
    assert (record["stage"], record["task"], record["checkpoint"]) == ("pretrain", "pretrain", None)
    # Tab.19 quantities: 1 epoch reaches none of the T100/T300/T800 marks; CPU memory is the resident peak
    assert set(record["metrics"]) == {"loss", "cls", "patch", "train_hours", "peak_memory_gb"}
    assert record["extra"]["summary"]["epochs"] == 1 and record["extra"]["summary"]["memory_kind"] == "cpu_peak_rss"
    assert record["metrics"]["train_hours"] > 0 and record["metrics"]["peak_memory_gb"] > 0
    assert record["extra"]["fingerprint"] == json.loads((tmp_path / "work" / "fingerprint.json").read_text())["digest"]


def test_training_matches_the_official_iteration_over_several_steps():
    """Our step (masked-token heads, fused ops, foreach EMA) = the official step transcribed in
    tests/official_ibot_step.py (heads on every token, explicit loops), weights and centres after 4 steps."""
    torch.manual_seed(0)
    ours, official, batch, _ = build_harnesses("fp32", arch="vit_tiny", batch=4, out_dim=256, local_crops=2, seed=0,
                                               device=torch.device("cpu"))
    for it in range(4):
        torch.manual_seed(it)
        ours_loss = ours.step(batch, it)
        torch.manual_seed(it)
        official_loss = official.step(batch, it)["loss"]
        assert ours_loss == pytest.approx(official_loss, rel=1e-6)
    for ours_net, official_net in ((ours.teacher, official.teacher), (ours.student, official.student)):
        reference = official_net.state_dict()
        for key, value in ours_net.state_dict().items():
            assert torch.allclose(value, reference[key], atol=1e-6), key
    assert torch.allclose(ours.loss.center, official.loss.center, atol=1e-7)
    assert torch.allclose(ours.loss.center2, official.loss.center2, atol=1e-7)


@pytest.mark.slow
def test_compiled_backbones_give_the_same_steps(images, tmp_path):
    """``compile: true`` (torch.compile of both backbones) changes speed, not the arithmetic beyond
    floating-point reassociation: same losses over a few steps."""
    cfg = {**TINY, "epochs": 1, "drop_path": 0.0}
    losses = {}
    for compiled in (False, True):
        trainer = Trainer({**cfg, "compile": compiled}, SPEC, images, tmp_path / str(compiled))
        torch.manual_seed(0)
        losses[compiled] = [trainer.train_step(crops, masks, 0, it)["loss"]
                            for it, (crops, _, masks) in zip(range(2), trainer._loader(0))]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


# -- head-sharing variants (paper Tab. 17) and patch-target ablations (App. E, Tab. 18) -------------
VARIANTS = ("flags", "vanilla", "shared", "shared_partial", "semi_shared", "semi_shared_partial")
_MLP = {f"mlp.{i}.{w}" for i in (0, 2, 4) for w in ("weight", "bias")}
_LAST, _LAST2 = {"last_layer.weight_g", "last_layer.weight_v"}, {"last_layer2.weight_g", "last_layer2.weight_v"}
#: student head parameters the teacher EMA pairs by name (main_ibot.py:381-390 rule); a teacher whose
#: head is shared names its single output layer ``last_layer``: it follows the student's [CLS] branch.
EMA_HEAD_PAIRS = {
    "flags": _MLP | _LAST,  # official: the student's last_layer2 has no teacher counterpart
    "vanilla": _MLP | {"patch_" + n for n in _MLP} | _LAST | _LAST2,
    "shared": _MLP | _LAST,
    "shared_partial": _MLP | {"patch_mlp.0.weight", "patch_mlp.0.bias"} | _LAST | _LAST2,
    "semi_shared": _MLP | _LAST,
    "semi_shared_partial": _MLP | _LAST,
}
# small head; no lr warm-up and no frozen last layer, so the first step moves every parameter
ABLATION = {"head_hidden_dim": 32, "drop_path": 0.0, "epochs": 1, "warmup_epochs": 0, "freeze_last_layer": 0}


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_sharing_ema_pairs(variant):
    from ibot.train.pretrain import _shared_parameters, build_models

    torch.manual_seed(0)
    student, teacher = build_models({**TINY, **ABLATION, "head_sharing": variant}, SPEC)
    names = {id(p): n for n, p in student.named_parameters()}
    paired = {names[id(p)] for p in _shared_parameters(student, teacher)[0]}
    assert {n.removeprefix("head.") for n in paired if n.startswith("head.")} == EMA_HEAD_PAIRS[variant]
    assert {n for n in names.values() if n.startswith("backbone.")} - {"backbone.masked_embed"} <= paired
    if teacher.head.last_layer2 is teacher.head.last_layer:  # a shared teacher head: one branch for both
        tokens = torch.randn(5, 192)
        if variant == "flags":  # official copy order: the alias ends up with the student's last_layer2
            assert torch.equal(teacher.head.last_layer.weight_v, student.head.last_layer2.weight_v)
        else:  # starts as the student's [CLS] branch, which its EMA follows
            assert torch.allclose(teacher.head.forward_patch(tokens), student.head.forward_cls(tokens), atol=1e-6)


def _ablation_config():
    """The resolved config of the embedded workflow with ``--config``-style ablation overrides."""
    from ibot.config import load_workflow_config, stage_config

    config, _ = load_workflow_config([], ["pretrain={head_sharing: semi_shared, patch_targets: hard, "
                                          "patch_centering: false, patch_center_momentum: 0.99}"])
    return stage_config(config, "pretrain", "vit_tiny")


def test_ablation_keys_resolve_and_bad_values_are_named():
    from ibot.config import ConfigError, load_workflow_config

    resolved = _ablation_config()
    assert (resolved["head_sharing"], resolved["patch_targets"]) == ("semi_shared", "hard")
    assert resolved["patch_centering"] is False and resolved["patch_center_momentum"] == 0.99
    for bad in ("head_sharing: half", "patch_targets: argmax", "patch_center_momentum: 1.5"):
        with pytest.raises(ConfigError) as info:
            load_workflow_config([], [f"pretrain={{{bad}}}"])
        assert f"pretrain.{bad.split(':')[0]}" in str(info.value), bad


@pytest.mark.parametrize("variant,targets", [(v, "soft") for v in VARIANTS] + [("flags", "hard"), ("resolved", None)])
def test_one_step_per_head_sharing_variant(images, tmp_path, variant, targets):
    """One pretraining step: finite loss, the loss built as configured, the teacher = EMA of its pairs."""
    if variant == "resolved":  # the ablation keys of a resolved workflow config (semi_shared, hard, ...)
        resolved = _ablation_config()
        cfg = {**TINY, **ABLATION, **{k: resolved[k] for k in
                                      ("head_sharing", "patch_targets", "patch_centering", "patch_center_momentum")}}
    else:
        cfg = {**TINY, **ABLATION, "head_sharing": variant, "patch_targets": targets}
    trainer = Trainer(cfg, SPEC, images, tmp_path)
    assert trainer.loss.patch_targets == cfg["patch_targets"]
    assert trainer.loss.patch_centering == cfg.get("patch_centering", True)
    assert trainer.loss.center_momentum2 == cfg.get("patch_center_momentum", 0.9)
    student_before = {n: p.detach().clone() for n, p in trainer.student.named_parameters()}
    teacher_before = {n: p.detach().clone() for n, p in trainer.teacher.named_parameters()}
    crops, _, masks = next(iter(trainer._loader(0)))
    row = trainer.train_step(crops, masks, 0, 0)
    assert all(math.isfinite(row[k]) for k in ("loss", "cls", "patch")) and row["patch"] > 0
    m = row["momentum"]
    student_after = dict(trainer.student.named_parameters())
    for name, param in trainer.teacher.named_parameters():
        expected = m * teacher_before[name] + (1 - m) * student_after[name].detach()
        assert torch.allclose(param, expected, atol=1e-6), name
        if cfg["head_sharing"] != "flags":  # the teacher started as the student's paired parameters
            assert torch.equal(teacher_before[name], student_before[name]), name
    if cfg["head_sharing"] == "semi_shared":  # the single teacher head followed the student's [CLS] branch
        assert not torch.equal(student_after["head.last_layer.weight_v"], student_before["head.last_layer.weight_v"])
        assert torch.allclose(trainer.teacher.head.last_layer2.weight_v,
                              m * student_before["head.last_layer.weight_v"]
                              + (1 - m) * student_after["head.last_layer.weight_v"].detach(), atol=1e-6)


@pytest.mark.parametrize("variant", ["vanilla", "semi_shared_partial"])
def test_exported_heads_of_a_variant_rebuild(tmp_path, variant):
    """heads.pth of any variant (head_sharing recorded with the head settings, as run() writes it)
    rebuilds through build_pretrained_head with the same outputs."""
    from ibot.checkpoint import HEAD_SETTINGS, build_pretrained_head, export_heads
    from ibot.train.pretrain import build_models

    cfg = {**TINY, **ABLATION, "head_sharing": variant}
    torch.manual_seed(0)
    student, teacher = build_models(cfg, SPEC)
    with torch.no_grad():  # make the two student branches differ from the teacher's
        for param in student.head.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    heads = {"teacher": teacher.head, "student": student.head}
    export_heads(heads, tmp_path / "heads.pth", {**{k: cfg[k] for k in HEAD_SETTINGS if k in cfg}, "embed_dim": 192})
    tokens = torch.randn(2, 1 + 4, 192)
    for key, head in heads.items():
        rebuilt = build_pretrained_head(tmp_path / "heads.pth", key, 192)
        assert set(rebuilt.state_dict()) == set(head.state_dict()), key
        for ours, theirs in zip(head(tokens), rebuilt(tokens)):
            assert torch.equal(ours, theirs), key


def test_epoch_marks_are_the_tab19_epochs_a_run_reaches():
    assert epoch_marks(800) == [100, 300, 800] and epoch_marks(300) == [100, 300]
    assert epoch_marks(299) == [100] and epoch_marks(99) == []
    assert epoch_marks(3, marks=(1, 2, 5)) == [1, 2]


def test_resume_adds_elapsed_time_and_records_memory(images, tmp_path):
    """Wall-clock is cumulative over resumes (checkpoint ``elapsed_s``), the time at each mark reached is kept
    across the resume, train_log rows carry ``elapsed_h``, and CPU memory is labelled as the resident peak."""
    first = Trainer({**TINY, "epochs": 1}, SPEC, images, tmp_path)
    first.time_marks = (1, 2, 3)  # tiny marks standing in for 100/300/800
    one = first.fit()
    assert one["train_hours"] > 0 and set(one["train_hours_at"]) == {1} and not one["train_hours_partial"]
    assert load_file(tmp_path / "checkpoint.pth")["elapsed_s"] == pytest.approx(one["train_hours"] * 3600)
    second = Trainer({**TINY, "epochs": 2}, SPEC, images, tmp_path)
    second.time_marks = (1, 2, 3)
    two = second.fit()
    assert second.start_epoch == 1 and two["train_hours"] > one["train_hours"]
    assert set(two["train_hours_at"]) == {1, 2} and two["train_hours_at"][1] == one["train_hours_at"][1]
    assert two["train_hours_at"][2] == pytest.approx(two["train_hours"])
    assert two["train_time_s"] < two["train_hours"] * 3600  # train_time_s: this session only
    metrics = time_memory_metrics(two)
    assert set(metrics) == {"train_hours", "train_hours_1ep", "train_hours_2ep", "peak_memory_gb"}
    assert two["memory_kind"] == "cpu_peak_rss" and two["peak_memory_gb"] > 0.05  # torch alone is > 50 MB
    assert two["crops"] == {"global": "2x32", "local": "2x16"} and two["world_size"] == 1 and two["device_name"]
    hours = [json.loads(line)["elapsed_h"] for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert hours == sorted(hours) and hours[-1] <= two["train_hours"]
    # a checkpoint from before this record (no elapsed_s): counted from 0 and flagged partial
    state = load_file(tmp_path / "checkpoint.pth")
    for key in ("elapsed_s", "mark_elapsed_s", "elapsed_partial"):
        state.pop(key)
    torch.save(state, tmp_path / "checkpoint.pth")
    third = Trainer({**TINY, "epochs": 3}, SPEC, images, tmp_path)
    third.time_marks = (1, 2, 3)
    three = third.fit()
    assert three["train_hours_partial"] and set(three["train_hours_at"]) == {3}
    assert three["train_hours"] < two["train_hours"] + three["train_time_s"] / 3600 * 1.01
    # the peak memory is the training's, kept in the checkpoint: a rerun that trains nothing reports it
    stored = load_file(tmp_path / "checkpoint.pth")["peak_memory"]
    assert stored["memory_kind"] == "cpu_peak_rss" and stored["peak_memory_gb"] == three["peak_memory_gb"]
    state = load_file(tmp_path / "checkpoint.pth")
    state["peak_memory"] = {**stored, "peak_memory_gb": 123.0}
    torch.save(state, tmp_path / "checkpoint.pth")
    done = Trainer({**TINY, "epochs": 3}, SPEC, images, tmp_path).fit()
    assert done["peak_memory_gb"] == 123.0 and done["train_hours"] == pytest.approx(three["train_hours"])


def test_peak_memory_is_the_maximum_over_sessions_of_one_kind():
    cpu = {"memory_kind": "cpu_peak_rss", "peak_memory_gb": 2.0}
    assert max_peak_memory(None, cpu) == cpu
    assert max_peak_memory({**cpu, "peak_memory_gb": 3.0}, cpu)["peak_memory_gb"] == 3.0
    cuda = {"memory_kind": "cuda_max_allocated", "peak_memory_gb": 1.0, "max_memory_reserved_gb": 1.5}
    assert max_peak_memory({**cuda, "peak_memory_gb": 0.5, "max_memory_reserved_gb": 2.0}, cuda) == {
        **cuda, "max_memory_reserved_gb": 2.0}
    assert max_peak_memory({**cpu, "peak_memory_gb": 9.0}, cuda) == cuda  # resumed on a GPU: its own peak
