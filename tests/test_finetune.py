"""Fine-tuning: BEiT layer-decay groups via timm, schedule, CLI end to end, resume after a kill."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from downstream.engine import finetune
from downstream.engine.data import finetune_train_transform
from helpers import kill_at_second_evaluation, run_stage
from ibot.metrics import read_metrics
from ibot.stages import stage_defaults
from ibot.models.layer_decay import vit_layer_id
from ibot.models.vision_transformer import build_backbone
from test_knn import TINY, make_image_folder, official_checkpoint
from test_layer_decay import official_finetune_layer_id

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("finetune")
CONFIG = {"resize": 36, "crop": 32, "batch_size": 4, "num_workers": 0, "epochs": 2, "warmup_epochs": 1,
          "precision": "fp32"}


@pytest.mark.parametrize("decay", [0.65, 0.75])
def test_layer_decay_groups_match_official(decay: float) -> None:
    depth = 3
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=depth, masked_im_modeling=False)
    model = finetune.ViTClassifier(backbone, num_classes=5)
    config = {**DEFAULTS, "layer_decay": decay}
    optimizer = finetune.build_optimizer(model, config)
    assert isinstance(optimizer, torch.optim.AdamW)
    num_layers = depth + 1  # official: model.get_num_layers() + 1 ... values for layer ids 0..num_layers
    assert model.num_layers == num_layers
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    seen = set()
    for name, param in model.named_parameters():
        short = name.removeprefix("backbone.")
        layer_id = official_finetune_layer_id(short, num_layers + 1)
        assert vit_layer_id(name, depth, prefix="backbone.") == layer_id
        group = group_of[id(param)]
        assert group["lr_scale"] == pytest.approx(decay ** (num_layers - layer_id)), name
        no_decay = param.ndim == 1 or short.endswith(".bias") or short in ("pos_embed", "cls_token")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name
        seen.add(layer_id)
    assert seen == set(range(num_layers + 1))
    # the head and the final norm train at the full lr, the patch embedding at decay^(depth+1)
    assert group_of[id(model.head.weight)]["lr_scale"] == group_of[id(backbone.norm.weight)]["lr_scale"] == 1.0
    assert group_of[id(backbone.patch_embed.proj.weight)]["lr_scale"] == pytest.approx(decay ** (depth + 1))


def test_scheduler_warmup_cosine_per_iteration() -> None:
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    model = finetune.ViTClassifier(backbone, num_classes=3)
    config = {**DEFAULTS, "epochs": 10, "warmup_epochs": 2, "lr": 1e-3, "min_lr": 1e-6}
    optimizer = finetune.build_optimizer(model, config)
    scheduler = finetune.iteration_scheduler(optimizer, config, steps_per_epoch=5)
    top = next(g for g in optimizer.param_groups if g["lr_scale"] == 1.0)
    low = min(optimizer.param_groups, key=lambda g: g["lr_scale"])
    lrs = []
    for step in range(50):
        scheduler.step_update(num_updates=step)
        lrs.append(top["lr"])
        assert low["lr"] == pytest.approx(top["lr"] * low["lr_scale"])
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(5e-4) and lrs[10] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] == pytest.approx(1e-6, abs=2e-6)


def test_model_head_and_mixup() -> None:
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    model = finetune.ViTClassifier(backbone, num_classes=4, head_init_scale=0.001)
    assert float(model.head.weight.detach().std()) == pytest.approx(0.02 * 0.001, rel=0.2)
    assert float(model.head.bias.detach().abs().sum()) == 0
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    mixup = finetune.build_mixup(DEFAULTS, num_classes=4)
    images, soft = mixup(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3]))
    assert soft.shape == (4, 4) and torch.allclose(soft.sum(1), torch.ones(4))
    assert finetune.build_mixup({**DEFAULTS, "mixup": 0.0, "cutmix": 0.0}, 4) is None


_RCF = "evaluation/classification_layer_decay/run_class_finetuning.py"
#: bytedance/ibot (commit da316d8) fine-tuning of ViT-S/16 as evaluation/README.md:25-31 runs it
#: (``run.sh imagenet_cls ... vit_small teacher 8 --epochs 200 --drop_path 0.1 --layer_decay 0.75``; run.sh
#: adds its own flags, run.sh:176-191), transcribed with the line of each value.
OFFICIAL_FINETUNE_VIT_S = {
    "epochs": (200, "evaluation/README.md:28 --epochs 200"),
    "warmup_epochs": (20, "run.sh:180 --warmup_epochs 20"),
    "batch_size": (128 * 8, f"{_RCF}:40 --batch_size 128 per GPU x 8 GPUs (evaluation/README.md:27)"),
    "accum_steps": (1, f"{_RCF}:42 --update_freq"),
    "lr": (4e-3, f"{_RCF}:92 --lr (the README commands pass none)"),
    "min_lr": (1e-6, f"{_RCF}:98 --min_lr"),
    "warmup_lr": (0.0, f"{_RCF}:588-591 cosine_scheduler without a start value: utils.py:380 start_warmup_value=0 "
                       "(--warmup_lr, :96, is never used)"),
    "weight_decay": (0.05, f"{_RCF}:86 --weight_decay"),
    "layer_decay": (0.75, "evaluation/README.md:30 --layer_decay 0.75"),
    "drop_path": (0.1, "evaluation/README.md:29 --drop_path 0.1"),
    "opt": ("adamw", f"{_RCF}:76 --opt"),
    "opt_eps": (1e-8, f"{_RCF}:78 --opt_eps"),
    "opt_betas": ([0.9, 0.999], f"{_RCF}:80 --opt_betas None: optim_factory.py:139-140 passes none, torch AdamW's"),
    "clip_grad": (None, f"{_RCF}:82 --clip_grad"),
    "crop": (224, f"{_RCF}:59 --input_size"),
    "resize": (int(224 / (224 / 256)), f"{_RCF}:281-288 crop_pct 224/256, Resize(int(input_size / crop_pct))"),
    "eval_interpolation": ("bilinear", f"{_RCF}:288 Resize(size, interpolation=2)"),
    "train_interpolation": ("bicubic", f"{_RCF}:113 --train_interpolation"),
    "color_jitter": (0.4, f"{_RCF}:107 --color_jitter"),
    "auto_augment": ("rand-m9-mstd0.5-inc1", f"{_RCF}:109 --aa"),
    "re_prob": (0.25, f"{_RCF}:120 --reprob"),
    "re_mode": ("pixel", f"{_RCF}:122 --remode"),
    "re_count": (1, f"{_RCF}:124 --recount"),
    "mixup": (0.8, "run.sh:182 --mixup 0.8"),
    "cutmix": (1.0, "run.sh:183 --cutmix 1.0"),
    "mixup_prob": (1.0, f"{_RCF}:136 --mixup_prob"),
    "mixup_switch_prob": (0.5, f"{_RCF}:138 --mixup_switch_prob"),
    "mixup_mode": ("batch", f"{_RCF}:140 --mixup_mode"),
    "smoothing": (0.1, f"{_RCF}:111 --smoothing"),
    "head_init_scale": (0.001, f"{_RCF}:148 --init_scale"),
    "precision": ("fp16", f"{_RCF}:585 NativeScaler; engine_for_finetuning.py:75 torch.cuda.amp.autocast()"),
    "val_freq": (1, f"{_RCF}:639-640 evaluates after every epoch"),
    "num_workers": (10, f"{_RCF}:188 --num_workers"),
}
#: Ours without an official counterpart: the lr sweep list (null: the official lr alone; ibot.sweep).
FINETUNE_OWN_SETTINGS = {"lrs": None}


def test_defaults_equal_the_official_finetuning_values() -> None:
    assert set(DEFAULTS) == set(OFFICIAL_FINETUNE_VIT_S) | set(FINETUNE_OWN_SETTINGS)
    assert all(DEFAULTS[key] == value for key, value in FINETUNE_OWN_SETTINGS.items())
    for key, (official, source) in OFFICIAL_FINETUNE_VIT_S.items():
        ours = DEFAULTS[key]
        assert ours == official, f"finetune.{key}: ours {ours!r}, official {official!r} ({source})"


def test_schema_is_closed_and_accepts_the_recipes() -> None:
    import jsonschema
    schema = yaml.safe_load((ROOT / "workflow/schemas/finetune.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(DEFAULTS, schema)


def test_cli_end_to_end_and_resume_after_kill(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imagenet", train=4, val=2)
    ckpt = official_checkpoint(tmp_path / "checkpoint.pth")

    def argv(name: str) -> list[str]:
        return ["--data", str(data), "--out", str(tmp_path / name / "finetune" / "metrics.json"), "--checkpoint",
                str(ckpt), "--config", json.dumps(CONFIG), "--resources", '{"cluster": "debug"}', *TINY]

    run_stage("finetune", argv("full"))
    record = read_metrics(tmp_path / "full" / "finetune" / "metrics.json")
    assert record["stage"] == "finetune" and record["task"] == "finetune" and set(record["metrics"]) == {"top1"}
    extra = record["extra"]
    assert [h["epoch"] for h in extra["history"]] == [1, 2] and extra["last_epoch"] == 2
    assert extra["num_layers"] == 3 and extra["global_batch"] == 4 and extra["steps_per_epoch"] == 3
    assert (tmp_path / "full" / "finetune" / "work" / "checkpoint.pth").is_file()

    # kill the job during epoch 2 (after epoch 1 was checkpointed), then rerun: it resumes at epoch 2
    real_evaluate = finetune.evaluate  # the loop's own reference (downstream.engine.finetune)
    calls = []

    def dying_evaluate(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_evaluate(*args, **kwargs)

    import pdb
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)  # submitit's debug executor opens pdb
    monkeypatch.setattr(finetune, "evaluate", dying_evaluate)
    with pytest.raises(KeyboardInterrupt):
        run_stage("finetune", argv("killed"))
    state = torch.load(tmp_path / "killed" / "finetune" / "work" / "checkpoint.pth", weights_only=True)
    assert state["epoch"] == 1
    monkeypatch.setattr(finetune, "evaluate", real_evaluate)
    run_stage("finetune", argv("killed"))
    resumed = read_metrics(tmp_path / "killed" / "finetune" / "metrics.json")
    assert [h["epoch"] for h in resumed["extra"]["history"]] == [1, 2]
    # same seeds per epoch and restored optimizer state: identical to the uninterrupted run
    for got, want in zip(resumed["extra"]["history"], extra["history"]):
        assert got == pytest.approx(want)


def test_randaugment_posterize_zero_bits() -> None:
    """RandAugment inc1 asks posterize for 0 bits at high magnitude: Pillow >= 12 refuses it (hence
    the pyproject pin pillow<12); with the pinned Pillow the op returns a black image as TF's does."""
    import numpy as np
    from PIL import Image
    from timm.data import auto_augment
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    assert np.asarray(auto_augment.posterize(image, 0)).max() == 0
    transform = finetune_train_transform({**DEFAULTS, "crop": 56})
    assert transform(image).shape == (3, 56, 56)


# -- precision deepspeed_fp16: the official --enable_deepspeed fp16 engine (Tab. 11 "DS") -------------------
def _toy(weight: list[float], *, inner: str = "adamw", lr: float = 0.01, weight_decay: float = 0.1, **kwargs):
    """Linear(n, 1) without bias, halved, its optimizer wrapped: (model, Fp16MasterOptimizer)."""
    from downstream.engine.fp16_master import Fp16MasterOptimizer
    model = torch.nn.Linear(len(weight), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([weight]))
    model.half()
    if inner == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, eps=1e-8)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    return model, Fp16MasterOptimizer(opt, **kwargs)


def _backward(model, opt, x: list[float]) -> None:
    opt.backward(model(torch.tensor([x], dtype=torch.float16)).sum())  # d loss / d w = x


def test_deepspeed_fp16_defaults_are_the_official_ds_config() -> None:
    """utils.py:496-501: loss_scale 0 (dynamic), initial_scale_power 7, loss_scale_window 128."""
    _, opt = _toy([1.0, -2.0])
    assert opt.loss_scale == 2.0 ** 7 == 128 and opt.scale_window == 128 and opt.min_scale == 1
    assert opt.clip_grad == 0.0  # the official ds config has no gradient_clipping


def test_deepspeed_fp16_overflow_skips_step_and_halves_scale() -> None:
    model, opt = _toy([1.0, -2.0])
    _backward(model, opt, [1.0, 0.5])
    model.weight.grad[0, 0] = float("inf")
    assert opt.step() is True
    assert opt.loss_scale == 64  # 128 / 2
    assert model.weight.tolist() == [[1.0, -2.0]]  # step skipped: parameters unchanged
    assert opt.fp32_groups[0][0].tolist() == [[1.0, -2.0]]
    assert not opt.optimizer.state and model.weight.grad is None  # no AdamW state, gradients dropped
    _backward(model, opt, [1.0, 0.5])
    model.weight.grad[0, 1] = float("nan")
    assert opt.step() is True and opt.loss_scale == 32
    _, floor = _toy([1.0], initial_scale_power=0)  # floor: DeepSpeed's min_loss_scale 1
    floor.fp16_groups[0][0].grad = torch.tensor([[float("inf")]], dtype=torch.float16)
    assert floor.step() is True and floor.loss_scale == 1


def test_deepspeed_fp16_scale_doubles_after_the_window() -> None:
    """DeepSpeed FP16_Optimizer._update_scale: doubled at the step where ``window`` overflow-free steps
    have passed since the last overflow (with window 128: the 129th clean step from the start)."""
    model, opt = _toy([1.0, -2.0], lr=0.0)
    for _ in range(128):
        _backward(model, opt, [1.0, 0.5])
        assert opt.step() is False
    assert opt.loss_scale == 128
    _backward(model, opt, [1.0, 0.5])
    opt.step()
    assert opt.loss_scale == 256
    # small window, hand-traced: overflow at iter 0 (scale 64); clean iters 1, 2, 3; iter 4 (3 clean since) doubles
    model, opt = _toy([1.0, -2.0], lr=0.0, scale_window=3)
    scales = []
    for step in range(8):
        _backward(model, opt, [1.0, 0.5])
        if step in (0, 5):
            model.weight.grad.fill_(float("inf"))
        opt.step()
        scales.append(opt.loss_scale)
    assert scales == [64, 64, 64, 64, 128, 64, 64, 64]


def test_deepspeed_fp16_step_dtypes_and_matches_fp32_adamw() -> None:
    """One AdamW step, hand-computed: w = [1, -2], grad = x = [1, 0.5], lr 0.01, wd 0.1, first step
    (bias-corrected m/sqrt(v) = sign(g)): w' = w (1 - lr wd) - lr sign(g) = [0.989, -2.008]."""
    model, opt = _toy([1.0, -2.0])
    _backward(model, opt, [1.0, 0.5])
    assert model.weight.grad.tolist() == [[128.0, 64.0]]  # the loss is scaled by 2^7
    assert opt.step() is False
    master = opt.fp32_groups[0][0]
    assert master.dtype == torch.float32 and model.weight.dtype == torch.float16
    assert all(s.dtype == torch.float32 for s in opt.optimizer.state[master].values() if s.ndim)
    assert master.tolist()[0] == pytest.approx([0.989, -2.008], abs=1e-6)
    assert torch.equal(model.weight, master.half())  # the fp16 weights are the rounded masters
    assert model.weight.float().tolist()[0] == pytest.approx([0.989, -2.008], abs=2 ** -10)  # fp16 ulp at 1-2
    ref = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([[1.0, -2.0]]))
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.1, eps=1e-8)
    ref(torch.tensor([[1.0, 0.5]])).sum().backward()
    ref_opt.step()
    assert torch.allclose(master, ref.weight, atol=1e-6)


def test_deepspeed_fp16_unscales_and_clips_master_gradients() -> None:
    """SGD lr 1: the update is the unscaled fp32 gradient [3, 4] (norm 5); clip_grad 1 divides it by
    DeepSpeed's ``(norm + 1e-6) / clip_grad``."""
    model, opt = _toy([0.0, 0.0], inner="sgd", lr=1.0)
    _backward(model, opt, [3.0, 4.0])
    opt.step()
    assert opt.fp32_groups[0][0].tolist()[0] == pytest.approx([-3.0, -4.0])
    model, opt = _toy([0.0, 0.0], inner="sgd", lr=1.0, clip_grad=1.0)
    _backward(model, opt, [3.0, 4.0])
    opt.step()
    assert opt.fp32_groups[0][0].tolist()[0] == pytest.approx([-0.6, -0.8], rel=1e-5)


def test_deepspeed_fp16_state_dict_resumes_scale_and_masters(tmp_path: Path) -> None:
    from ibot.checkpoint import load_file
    model, opt = _toy([1.0, -2.0], scale_window=2)
    for step in range(4):
        _backward(model, opt, [1.0, 0.5 * step - 1.0])
        if step == 1:
            model.weight.grad.fill_(float("inf"))
        opt.step()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "state.pth")
    state = load_file(tmp_path / "state.pth")  # weights_only, as the loop's resume loads it
    model2, opt2 = _toy([0.0, 0.0], scale_window=2)
    model2.load_state_dict(state["model"])
    opt2.load_state_dict(state["optimizer"])
    # window 2: clean iter 0, overflow at iter 1 (128 -> 64), clean iters 2, 3: the scale doubles at iter 4
    assert (opt2.loss_scale, opt2.cur_iter, opt2.last_overflow_iter) == (opt.loss_scale, 4, 1) == (64, 4, 1)
    assert torch.equal(opt2.fp32_groups[0][0], opt.fp32_groups[0][0])
    for m, o in ((model, opt), (model2, opt2)):  # the next step (the scale doubles on both) is identical
        _backward(m, o, [0.25, -1.0])
        o.step()
    assert opt2.loss_scale == opt.loss_scale == 128 and torch.equal(opt2.fp32_groups[0][0], opt.fp32_groups[0][0])
    assert torch.equal(model2.weight, model.weight)


def test_deepspeed_fp16_is_a_finetune_precision(tmp_path: Path) -> None:
    import jsonschema
    from ibot.config import load_workflow_config, stage_config
    extra = tmp_path / "ds.yaml"
    extra.write_text("finetune:\n  precision: deepspeed_fp16\n")
    config, _ = load_workflow_config([ROOT / "config" / "config.yaml", extra], base_dir=ROOT)
    assert stage_config(config, "finetune", "vit_tiny")["precision"] == "deepspeed_fp16"
    schema = yaml.safe_load((ROOT / "workflow/schemas/finetune.schema.yaml").read_text())
    jsonschema.validate({**DEFAULTS, "precision": "deepspeed_fp16"}, schema)


def test_deepspeed_fp16_fit_on_cpu_halves_the_model_and_resumes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """finetune.fit with deepspeed_fp16 on CPU (torch runs the fp16 ViT there): the model trains in fp16,
    the checkpoint carries the fp32 masters and the loss scale, and a run killed in epoch 2 resumes from
    the epoch-1 state to the uninterrupted run's weights."""
    from downstream.engine.data import make_loader
    torch.manual_seed(0)
    dataset = torch.utils.data.TensorDataset(torch.randn(8, 3, 32, 32), torch.arange(8) % 4, torch.arange(8))
    init = finetune.ViTClassifier(build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2,
                                                 masked_im_modeling=False), num_classes=4).state_dict()
    config = {**DEFAULTS, "epochs": 2, "warmup_epochs": 1, "precision": "deepspeed_fp16", "mixup": 0.0,
              "cutmix": 0.0, "lr": 1e-3}
    plan = finetune.plan_batches(4, 1, 8, mixup=False, tag="t")

    def run(state_file: Path):
        net = finetune.ViTClassifier(build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2,
                                                    masked_im_modeling=False), num_classes=4)
        net.load_state_dict(init)
        loader = make_loader(dataset, plan.per_process, shuffle=True, seed=0, drop_last=True)
        val = make_loader(dataset, plan.per_process, shuffle=False)
        history = finetune.fit(net, loader, val, config=config, plan=plan, mixup_fn=None, num_classes=4, num_val=8,
                               lr=1e-3, layer_decay=0.75, per_epoch_schedule=False, precision="deepspeed_fp16",
                               device=torch.device("cpu"), seed=0, state_file=state_file, fingerprint="x",
                               tb_dir=tmp_path / "tb", tb_prefix="t", tag="t")
        return net, history

    net, history = run(tmp_path / "full.pth")
    assert all(p.dtype == torch.float16 for p in net.parameters())
    state = torch.load(tmp_path / "full.pth", weights_only=True)
    assert state["optimizer"]["cur_scale"] == 128 and state["optimizer"]["cur_iter"] == 4  # 2 epochs x 2 steps
    assert all(m.dtype == torch.float32 for g in state["optimizer"]["fp32_groups"] for m in g)
    assert [h["epoch"] for h in history] == [1, 2] and all(math.isfinite(h["train_loss"]) for h in history)

    real_evaluate = finetune.evaluate
    kill_at_second_evaluation(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed.pth")
    assert torch.load(tmp_path / "killed.pth", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(finetune, "evaluate", real_evaluate)
    resumed, resumed_history = run(tmp_path / "killed.pth")
    assert [h["epoch"] for h in resumed_history] == [1, 2]
    assert resumed_history[1] == pytest.approx(history[1])
    for a, b in zip(resumed.parameters(), net.parameters()):
        assert torch.equal(a, b)
