"""Semi-supervised stage (Tab.4, Tab.12): subset selection, the embedded subset files, logistic regression
against a reference solve, the projection-head trunk, the per-epoch schedule, defaults vs the official
scripts, and the CLI end to end with resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torchvision.datasets import ImageFolder

from downstream import semi_supervised as semi
from downstream.engine import finetune, linear
from downstream.engine.finetune import epoch_scheduler
from helpers import run_stage
from ibot.stages import stage_defaults
from ibot.data.subsets import default_subset_file, materialise_subset, read_subset_file, subset_files
from ibot.metrics import read_metrics
from ibot.models.head import build_head
from test_knn import TINY, make_image_folder
from test_unsupervised import full_official_checkpoint

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = stage_defaults("semi_supervised")


def _write(path: Path, names: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names))
    return path


# -- subsets --------------------------------------------------------------------------------------------
def test_subset_folder_holds_exactly_the_listed_images(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imagenet", classes=3, train=5, val=2)
    listed = ["n00000000_3.JPEG", "n00000001_0.JPEG", "n00000001_4.JPEG", "n00000002_2.JPEG"]
    subset = materialise_subset(data, _write(tmp_path / "s.txt", ["", *listed, ""]), tmp_path / "subset")
    train, full = ImageFolder(str(subset / "train")), ImageFolder(str(data / "train"))
    assert sorted(Path(p).name for p, _ in train.samples) == sorted(listed)
    assert train.classes == full.classes and train.class_to_idx == full.class_to_idx
    for path, label in train.samples:  # same image, same label as in the full set
        assert Path(path).resolve() == (data / "train" / full.classes[label] / Path(path).name).resolve()
    assert ImageFolder(str(subset / "val")).samples == [
        (p.replace(str(data), str(subset)), y) for p, y in ImageFolder(str(data / "val")).samples]

    inode = (subset / "SUBSET.json").stat().st_ino
    assert materialise_subset(data, tmp_path / "s.txt", subset) == subset  # same list: reused
    assert (subset / "SUBSET.json").stat().st_ino == inode
    materialise_subset(data, _write(tmp_path / "s.txt", listed[1:] + ["n00000000_1.JPEG"]), subset)  # another: rebuilt
    assert sorted(p.name for p in (subset / "train").rglob("*.JPEG")) == sorted(listed[1:] + ["n00000000_1.JPEG"])


def test_subset_errors_name_the_problem(tmp_path: Path) -> None:
    data = make_image_folder(tmp_path / "imagenet", classes=2, train=2, val=1)
    missing = _write(tmp_path / "missing.txt", ["n00000000_0.JPEG", "n00000001_7.JPEG", "n00000001_9.JPEG"])
    with pytest.raises(FileNotFoundError, match=r"2 listed images are not in .*: n00000001_7.JPEG, n00000001_9.JPEG"):
        materialise_subset(data, missing, tmp_path / "subset")
    with pytest.raises(ValueError, match=r"no image of 1 classes, e.g. \['n00000001'\]"):
        materialise_subset(data, _write(tmp_path / "one_class.txt", ["n00000000_1.JPEG"]), tmp_path / "subset")
    with pytest.raises(ValueError, match="twice"):
        read_subset_file(_write(tmp_path / "dup.txt", ["n00000000_0.JPEG"] * 2))
    with pytest.raises(ValueError, match="expected train file names"):
        read_subset_file(_write(tmp_path / "path.txt", ["train/n00000000/n00000000_0.JPEG"]))
    assert not (tmp_path / "subset").exists()


def test_embedded_imagenet_writes_the_subset_files(tmp_path: Path) -> None:
    from ibot.data.embedded import EmbeddedSizes, generate
    from ibot.data.embedded.imagenet import subset_names

    sizes = EmbeddedSizes(classes=3, train_per_class=20, val_per_class=1, c_per_class=1, a_classes=1, image_size=32)
    root = generate(tmp_path, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"]
    one, ten = (read_subset_file(default_subset_file(root, label)) for label in ("1", "10"))
    assert one == subset_names(0, sizes, 1) and ten == subset_names(0, sizes, 10)
    subset_files(root, ten)  # every listed image exists
    for names, per_class in ((one, 1), (ten, 2)):  # >= 1 image per class in the 1% file
        assert sorted(n.split("_")[0] for n in names) == sorted(p.name for p in (root / "train").iterdir()
                                                                   for _ in range(per_class))
    assert set(one) < set(ten) and subset_names(1, sizes, 10) != ten


# -- logistic regression --------------------------------------------------------------------------------
def _reference_solve(x: np.ndarray, y: np.ndarray, lambd: float, classes: int) -> np.ndarray:
    """The official objective (cyanure multiclass-logistic, l2, no intercept): mean CE + lambd/2 ||W||^2,
    minimised to high precision with scipy's L-BFGS on the analytic gradient."""
    from scipy.optimize import minimize

    onehot = np.eye(classes)[y]

    def objective(flat: np.ndarray):
        w = flat.reshape(classes, -1)
        logits = x @ w.T
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(len(y)), y])) + lambd / 2 * np.sum(w * w)
        return loss, ((p - onehot).T @ x / len(y) + lambd * w).ravel()

    result = minimize(objective, np.zeros(classes * x.shape[1]), jac=True, method="L-BFGS-B",
                      options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
    return result.x.reshape(classes, -1)


def test_logistic_regression_equals_the_reference_solve_on_separable_data() -> None:
    rng = np.random.default_rng(0)
    classes, dim = 3, 5
    centres = 4.0 * np.eye(classes, dim)
    y = np.repeat(np.arange(classes), 20)
    x = centres[y] + 0.3 * rng.normal(size=(len(y), dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)  # eval_logistic_regression.py:113-114
    for lambd in (0.01, 0.1, 1.0):
        model = semi.logistic_regression(x, y, lambd, max_iter=10000, tol=1e-10)
        reference = _reference_solve(x, y, lambd, classes)
        assert np.abs(model.coef_ - reference).max() < 1e-4 * max(1.0, np.abs(reference).max()), lambd
        assert (model.predict(x) == y).all()  # separable: every point right
    # stronger regularisation, smaller weights; the sweep reports every lambda in percent
    norms = [np.linalg.norm(semi.logistic_regression(x, y, l).coef_) for l in (0.01, 0.1, 1.0)]
    assert norms[0] > norms[1] > norms[2]
    assert semi.logistic_regression_sweep(x, y, x, y, [0.01, 1.0]) == {0.01: 100.0, 1.0: 100.0}


# -- fine-tuning pieces ----------------------------------------------------------------------------------
def test_head_trunk_takes_the_pretrained_hidden_layers() -> None:
    torch.manual_seed(0)
    head = build_head(24, {"out_dim": 10, "head_hidden_dim": 16}, teacher=True)
    trunk, width = semi.head_trunk(head, 1)
    assert [type(m).__name__ for m in trunk] == ["Linear", "GELU"] and width == 16
    assert trunk[0] is head.mlp[0]  # the pretrained first layer (eval_cls.py ClassProjHead.mlp, finetune_layer 1)
    x = torch.randn(3, 24)
    assert torch.equal(trunk(x), torch.nn.functional.gelu(head.mlp[0](x)))
    trunk2, _ = semi.head_trunk(head, 2)
    assert len(trunk2) == 4 and trunk2[2] is head.mlp[2]
    with pytest.raises(ValueError, match="hidden layer 1..2"):
        semi.head_trunk(head, 3)

    from ibot.models.vision_transformer import build_backbone
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    trunk, width = semi.head_trunk(build_head(192, {"out_dim": 10, "head_hidden_dim": 16}, teacher=True), 1)
    model = semi.HeadLayerClassifier(backbone, trunk, width, num_classes=5)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5) and model.head.in_features == 16
    assert float(model.head.bias.abs().sum()) == 0.0
    assert model.group_matcher()("trunk.0.weight") == 3  # top layer, as the official head (depth 2 + 1)


def test_epoch_schedule_is_the_official_create_scheduler() -> None:
    """eval_cls.py:787 + :860: epoch 0 at warmup_lr, epoch e at the timm value of e - 1 (step(epoch) after it)."""
    config = {"epochs": 10, "warmup_epochs": 3, "warmup_lr": 1e-6, "min_lr": 1e-5}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = epoch_scheduler(optimizer, config)
    seen = []
    for epoch in range(10):
        if epoch > 0:
            scheduler.step(epoch - 1)
        seen.append(optimizer.param_groups[0]["lr"])

    def timm_value(t: int) -> float:
        if t < 3:
            return 1e-6 + t * (1e-4 - 1e-6) / 3
        return 1e-5 + 0.5 * (1e-4 - 1e-5) * (1 + math.cos(math.pi * t / 10))

    assert seen == pytest.approx([1e-6] + [timm_value(t) for t in range(9)])


# -- defaults, schema, preflight ------------------------------------------------------------------------
#: bytedance/ibot (da316d8) evaluation/semi_supervised/eval_cls.py with README.md:62-67 (--epochs 1000
#: --lr 5e-6 --finetune_head_layer 1) via run.sh imagenet_semi_cls (run.sh:199-212, 8 GPUs).
OFFICIAL_SEMI_FINETUNE = {
    "epochs": (1000, "README.md:64"), "batch_size": (128 * 8, "eval_cls.py:44 x 8 GPUs"),
    "lr": (5e-6, "README.md:65 (x global batch / 512, eval_cls.py:782)"), "warmup_epochs": (5, "eval_cls.py:106"),
    "warmup_lr": (1e-6, "eval_cls.py:98"), "min_lr": (1e-5, "eval_cls.py:100"), "weight_decay": (0.05, "eval_cls.py:85"),
    "layer_decay": (1.0, "eval_cls.py:102"), "drop_path": (0.1, "eval_cls.py:65"), "opt": ("adamw", "eval_cls.py:75"),
    "opt_eps": (1e-8, "eval_cls.py:77"), "opt_betas": ([0.9, 0.999], "eval_cls.py:79 None: timm AdamW default"),
    "clip_grad": (None, "eval_cls.py:81"), "crop": (224, "eval_cls.py:56"), "resize": (256, "eval_cls.py:420"),
    "eval_interpolation": ("bicubic", "eval_cls.py:422"), "train_interpolation": ("bicubic", "eval_cls.py:122"),
    "color_jitter": (0.4, "eval_cls.py:116"), "auto_augment": ("rand-m9-mstd0.5-inc1", "eval_cls.py:118"),
    "re_prob": (0.25, "eval_cls.py:130"), "re_mode": ("pixel", "eval_cls.py:132"), "re_count": (1, "eval_cls.py:134"),
    "mixup": (0.8, "eval_cls.py:140"), "cutmix": (1.0, "eval_cls.py:142"), "mixup_prob": (1.0, "eval_cls.py:146"),
    "mixup_switch_prob": (0.5, "eval_cls.py:148"), "mixup_mode": ("batch", "eval_cls.py:150"),
    "smoothing": (0.1, "eval_cls.py:121"), "head_init_scale": (1.0, "eval_cls.py:166"),
    "repeated_aug": (True, "eval_cls.py:126-127 (RASampler :641-644)"),
    "precision": ("fp16", "eval_cls.py:557"), "val_freq": (1, "eval_cls.py:861"), "num_workers": (10, "eval_cls.py:189"),
}
#: evaluation/eval_logistic_regression.py via run.sh imagenet_reg (run.sh:91-117).
OFFICIAL_LOGREG = {
    "lambdas": ([0.01, 0.1, 1.0], "eval_lr.py:246"), "n_last_blocks": (1, "eval_lr.py:239"),
    "avgpool_patchtokens": (0, "run.sh:50-58"), "resize": (256, "eval_lr.py:62"), "crop": (224, "eval_lr.py:63"),
    "batch_size_per_gpu": (128, "eval_lr.py:245"), "num_workers": (10, "eval_lr.py:263"),
    "precision": ("fp32", "eval_lr.py:127-150"), "max_iter": (1000, "ours (lbfgs)"), "tol": (1e-4, "ours (lbfgs)"),
}


def test_defaults_equal_the_official_values() -> None:
    defaults = DEFAULTS
    assert set(defaults["finetune"]) == set(OFFICIAL_SEMI_FINETUNE)
    # the fine-tuning stage's keys, and eval_cls.py's training sampler (run_class_finetuning.py has none)
    assert set(defaults["finetune"]) <= set(stage_defaults("finetune")) | {"repeated_aug"}
    for key, (official, source) in OFFICIAL_SEMI_FINETUNE.items():
        assert defaults["finetune"][key] == official, f"semi_supervised.finetune.{key} ({source})"
    assert set(defaults["logreg"]) == set(OFFICIAL_LOGREG)
    for key, (official, source) in OFFICIAL_LOGREG.items():
        assert defaults["logreg"][key] == official, f"semi_supervised.logreg.{key} ({source})"
    # frozen k-NN / linear: those stages' own configs (README.md:61, "just change the --data_path")
    assert set(defaults["knn"]) == set(stage_defaults("knn")) and set(defaults["linear"]) == set(stage_defaults("linear"))
    assert all(v is None for v in (*defaults["knn"].values(), *defaults["linear"].values()))
    assert semi.protocol_config(defaults, "knn") == stage_defaults("knn")
    assert semi.protocol_config(defaults, "linear") == stage_defaults("linear")
    assert defaults["finetune_head_layer"] == 1 and defaults["subsets"] == {"1": None, "10": None}
    assert defaults["protocols"] == list(semi.PROTOCOLS)


def test_paper_protocol_label() -> None:
    assert semi.protocol_label(DEFAULTS) == (
        "subsets=1/10%;knn[k=20,T=0.07,cls,256/224];linear[cls(last 4),sgd,100ep,lr-sweep(45),256/224];"
        "logreg[cls(last 1),l2,lambda=0.01/0.1/1,256/224];"
        "ft[1000ep,layer_decay=1,drop_path=0.1,mixup=0.8,cutmix=1,cls,224px,lr=5e-06,batch=1024,ra];"
        "ft-head1[1000ep,layer_decay=1,drop_path=0.1,mixup=0.8,cutmix=1,cls,224px,lr=5e-06,batch=1024,ra]")
    no_ra = {**DEFAULTS, "finetune": {**DEFAULTS["finetune"], "repeated_aug": False}}
    assert semi.protocol_label(no_ra).endswith(",batch=1024,no-ra]")  # never joined to the paper's number


def test_schema_is_closed_and_preflight_checks_the_stage_configs(tmp_path: Path) -> None:
    import jsonschema

    from ibot.config import deep_merge
    schema = yaml.safe_load((ROOT / "workflow/schemas/semi_supervised.schema.yaml").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    jsonschema.validate(DEFAULTS, schema)
    for bad in ({"finetune": {"layer_decay": 0.75, "lrs": [1e-3]}}, {"knn": {"k": 20}}, {"protocols": ["ft"]},
                {"subsets": {"5": None}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(deep_merge(DEFAULTS, bad, allow_new=True), schema)
    semi.preflight(DEFAULTS)
    with pytest.raises(ValueError, match=r"semi_supervised.knn.nb_knn: \[10\] does not contain"):  # the knn stage's rule: k=20 is reported
        semi.preflight(deep_merge(DEFAULTS, {"knn": {"nb_knn": [10]}}))
    with pytest.raises(ValueError, match="semi_supervised.subsets.1: .* does not exist"):
        semi.preflight(deep_merge(DEFAULTS, {"subsets": {"1": str(tmp_path / "nope.txt")}}))


# -- the stage end to end -------------------------------------------------------------------------------
CONFIG = {
    "knn": {"resize": 36, "crop": 32, "batch_size_per_gpu": 8, "num_workers": 0},
    "linear": {"resize": 36, "crop": 32, "epochs": 2, "batch_size": 6, "lrs": [0.01, 0.1], "n_last_blocks": 1,
               "num_workers": 0},
    "logreg": {"resize": 36, "crop": 32, "batch_size_per_gpu": 8, "num_workers": 0, "lambdas": [0.1, 1.0]},
    "finetune": {"resize": 36, "crop": 32, "epochs": 2, "warmup_epochs": 1, "batch_size": 4, "num_workers": 0,
                 "precision": "fp32"},
}


def test_cli_end_to_end_every_protocol_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "imagenet", classes=3, train=4, val=2)
    _write(default_subset_file(data, "1"), ["n00000000_1.JPEG", "n00000001_0.JPEG", "n00000002_3.JPEG"])
    ten = _write(tmp_path / "ten.txt", [f"n0000000{c}_{i}.JPEG" for c in range(3) for i in (0, 2)])
    ckpt = full_official_checkpoint(tmp_path / "checkpoint.pth")
    out = tmp_path / "results" / "semi_supervised" / "metrics.json"
    argv = ["--data", str(data), "--out", str(out), "--config", json.dumps({**CONFIG, "subsets": {"10": str(ten)}}),
            "--checkpoint", str(ckpt), "--checkpoint-key", "teacher", "--resources", '{"cluster": "debug"}',
            "--model", "tiny", *TINY]
    run_stage("semi_supervised", argv)
    record = read_metrics(out)
    assert record["stage"] == "semi_supervised" and record["task"] == "semi_supervised"
    assert set(record["metrics"]) == {f"{p}_{s}pct_top1" for p in semi.PROTOCOLS for s in ("1", "10")}
    assert all(0.0 <= v <= 100.0 for v in record["metrics"].values())
    extra = record["extra"]
    assert extra["subsets"]["1"]["images"] == 3 and extra["subsets"]["10"]["images"] == 6
    assert extra["heads"] == str(ckpt) and extra["runs"]["logreg_10pct"]["best_lambda"] in (0.1, 1.0)
    assert record["protocol"].startswith("subsets=1/10%;knn[k=20,T=0.07,cls,36/32];linear[cls(last 1),sgd,2ep")
    work = out.parent / "work"
    assert extra["runs"]["knn_1pct"]["metrics"]["top1_k20"] == record["metrics"]["knn_1pct_top1"]
    assert (work / "linear_10pct" / "head.pth").is_file() and extra["runs"]["linear_10pct"]["global_batch"] == 6
    for name in ("finetune_1pct", "finetune_head_1pct"):
        history = extra["runs"][name]["history"]
        assert [h["epoch"] for h in history] == [1, 2] and extra["runs"][name]["num_train"] == 3
        # repeated augmentation (eval_cls.py:641-644): timm's RepeatAugSampler, < 256 images: ceil(3 / 1) a epoch
        assert extra["runs"][name]["samples_per_epoch"] == 3
    # the head-layer model starts from the checkpoint's teacher head.mlp.0 (eval_cls.py:721)
    state = torch.load(work / "finetune_head1_10pct" / "checkpoint.pth", weights_only=True)["model"]
    assert set(k for k in state if k.startswith("trunk.")) == {"trunk.0.weight", "trunk.0.bias"}
    assert state["head.weight"].shape == (3, HEAD_HIDDEN)
    # the stage's only metrics.json: the per-protocol records are not collected as stage results
    assert [p.relative_to(out.parent) for p in out.parent.rglob("metrics.json")] == [Path("metrics.json")]

    # rerun after the record is removed: linear probing and fine-tuning resume from work/ (no training)
    out.unlink()
    monkeypatch.setattr(linear.LinearSweep, "train_step", lambda *a, **k: pytest.fail("linear retrained"))
    monkeypatch.setattr(finetune, "train_one_epoch", lambda *a, **k: pytest.fail("fine-tuning retrained"))
    run_stage("semi_supervised", argv)
    assert read_metrics(out)["metrics"] == record["metrics"]


HEAD_HIDDEN = 32  # test_unsupervised.HEAD_CFG head_hidden_dim
