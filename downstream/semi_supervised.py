"""Semi-supervised ImageNet classification with 1% and 10% of the labels (paper Tab.4 and Tab.12).

Official protocol (bytedance/ibot at da316d8, ``evaluation/README.md:59-67``): the label subsets are
SimCLRv2's split files (README.md:61); "for settings evaluated on frozen features, k-NN, LR, and linear
probing, just change the ``--data_path`` to the imagenet splits" (README.md:61), and end-to-end
fine-tuning runs ``evaluation/semi_supervised/eval_cls.py`` (``run.sh imagenet_semi_cls``,
run.sh:199-212) with ``--epochs 1000 --lr 5e-6 --finetune_head_layer 1`` (README.md:62-67). Here, per
subset (``semi_supervised.subsets``; :mod:`ibot.data.subsets` links the listed train images and the full
val set into an ImageNet-layout folder, ``<stage>/work/subsets/<p>pct``), five protocols:

- ``knn``: the k-NN protocol (:func:`downstream.engine.knn.knn_on_folder`, eval_knn.py) on the subset;
- ``linear``: the linear probe (:func:`downstream.engine.linear.train_probe`, eval_linear_multi.py: the lr
  sweep, the best head on val) on the subset;
- ``logreg``: ``evaluation/eval_logistic_regression.py``: frozen [CLS] features of the last
  ``n_last_blocks`` blocks (eval_lr.py:127-150, via :func:`downstream.engine.features.linear_features`),
  L2-normalised (:113-114), multinomial logistic regression without intercept, L2 penalty ``lambda``
  for each ``lambda`` in {0.01, 0.1, 1} (:52-55, :221-235), accuracy on val; reported: the best lambda;
- ``finetune``: eval_cls.py with ``--finetune_head_layer 0``: backbone + ``nn.Linear`` on the final-norm
  [CLS] token (eval_cls.py:713-714, "w/o proj-head layer" in Tab.12);
- ``finetune_head``: eval_cls.py with ``--finetune_head_layer 1``: the classifier reads the first hidden
  layer (linear + GELU) of the pretrained teacher [CLS] projection head (``ClassProjHead``,
  eval_cls.py:207-256, loaded from the checkpoint's ``head.mlp.0``, :706-721); the Tab.4 number.

Fine-tuning (:func:`finetune_on_subset`) is the one fine-tuning loop (:mod:`downstream.engine.finetune`:
model, AdamW groups, timm transforms, mixup/cutmix, the epoch loop, resume, evaluation) with eval_cls.py's
values (``workflow/schemas/semi_supervised.schema.yaml``): lr scaled by global batch / 512
(eval_cls.py:782, :data:`ibot.config.LR_SCALING`), per-epoch cosine schedule with warmup (timm
``create_scheduler``, eval_cls.py:787, stepped after every epoch, :860), no layer decay, classifier init
trunc_normal(0.02) (:717), DeiT's repeated augmentation (``repeated_aug``, default on: :126-127,
``RASampler`` :430-481, :641-644; timm's ``RepeatAugSampler``), val after every epoch and the best epoch
reported (:861-879). Not reproduced: the model EMA (:766-773), kept but never evaluated by the official
script.

Outputs: ``metrics.json`` with ``<protocol>_<p>pct_top1`` for every protocol and subset; each run's
state (the linear head, the fine-tuning checkpoints) under ``<stage>/work/<protocol>_<p>pct/``. The
stage's work directory is fingerprinted as a whole (:mod:`ibot.workdir`: every protocol's config, the
subset files and the heads are in it); linear probing and fine-tuning resume from their folders and
write live TensorBoard curves to ``<stage>/tb/<protocol>_<p>pct/``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from downstream.engine import finetune as ft
from downstream.engine import knn, linear
from downstream.engine.data import (dataset_label, eval_transform, finetune_train_transform, image_folder,
                                    make_loader, train_sampler, train_val_folders)
from downstream.engine.features import extract_features, linear_features
from downstream.engine.metrics import best_and_last
from downstream.engine.setup import build_eval_backbone, log, pick_device, resolve_precision, seed_everything
from ibot.checkpoint import build_pretrained_head, extract_head_state, load_file, locate_heads
from ibot.config import ConfigError, deep_merge, scaled_lr
from ibot.data.subsets import default_subset_file, materialise_subset, read_subset_file
from ibot.distributed import barrier, is_main, world_size
from ibot.run.context import StageContext
from ibot.stages import section_schema, stage_defaults
from ibot.uncertainty import accuracy_evidence

__all__ = ["PROTOCOLS", "protocol_config", "protocol_label", "preflight", "logistic_regression",
           "logistic_regression_sweep", "head_trunk", "HeadLayerClassifier", "finetune_on_subset", "run"]

PROTOCOLS = ("knn", "linear", "logreg", "finetune", "finetune_head")
#: The protocols that run a stage's recipe on the subset (their configs: that stage's defaults + overrides).
_STAGE_PROTOCOLS = ("knn", "linear")


# -- configuration ----------------------------------------------------------------------------------
def protocol_config(config: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """The config one protocol runs with: for ``knn``/``linear`` that stage's defaults with the non-null
    values of ``semi_supervised.<protocol>``; ``finetune``/``finetune_head`` share ``semi_supervised.finetune``."""
    if protocol in _STAGE_PROTOCOLS:
        values = {k: v for k, v in (config.get(protocol) or {}).items() if v is not None}
        return deep_merge(stage_defaults(protocol), values, path=f"semi_supervised.{protocol}")
    if protocol == "logreg":
        return dict(config["logreg"])
    if protocol in ("finetune", "finetune_head"):
        return dict(config["finetune"])
    raise ConfigError(f"semi_supervised.protocols: unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def preflight(config: Mapping[str, Any]) -> None:
    """Before any job: the k-NN / linear protocol configs are valid configs of those stages, the head
    layer is a hidden one, and subset files named explicitly exist."""
    import jsonschema

    for protocol in _STAGE_PROTOCOLS:
        try:
            jsonschema.validate(protocol_config(config, protocol), section_schema(protocol))
        except jsonschema.ValidationError as error:
            where = ".".join(str(part) for part in (protocol, *error.absolute_path))
            raise ValueError(f"semi_supervised.{where}: {error.message} (the {protocol} stage's schema)") from None
    for label, path in (config.get("subsets") or {}).items():
        if path and not Path(path).is_file():
            raise ValueError(f"semi_supervised.subsets.{label}: {path} does not exist")


def _logreg_label(cfg: Mapping[str, Any]) -> str:
    feature = {0: f"cls(last {int(cfg['n_last_blocks'])})", 1: "avgpool",
               2: f"cls(last {int(cfg['n_last_blocks'])})+avgpool"}[int(cfg["avgpool_patchtokens"])]
    lambdas = "/".join(f"{float(v):g}" for v in cfg["lambdas"])
    return f"{feature},l2,lambda={lambdas},{int(cfg['resize'])}/{int(cfg['crop'])}"


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config: the subsets and each protocol's own label (the k-NN and linear
    stages' labels; fine-tuning: the fine-tuning label with lr and global batch), e.g. for the paper
    ``subsets=1/10%;knn[k=20,T=0.07,cls,256/224];...;ft-head1[1000ep,...,224px,lr=5e-06,batch=1024]``."""
    parts = [f"subsets={'/'.join(config['subsets'])}%"]
    for protocol in config["protocols"]:
        cfg = protocol_config(config, protocol)
        if protocol == "knn":
            parts.append(f"knn[{knn.protocol_label(cfg)}]")
        elif protocol == "linear":
            parts.append(f"linear[{linear.protocol_label(cfg)}]")
        elif protocol == "logreg":
            parts.append(f"logreg[{_logreg_label(cfg)}]")
        else:
            name = "ft" if protocol == "finetune" else f"ft-head{int(config['finetune_head_layer'])}"
            parts.append(f"{name}[{ft.protocol_label(cfg)},lr={float(cfg['lr']):g},batch={int(cfg['batch_size'])},"
                         f"{'ra' if cfg['repeated_aug'] else 'no-ra'}]")
    return ";".join(parts)


# -- logistic regression (eval_logistic_regression.py) ----------------------------------------------
def logistic_regression(train_x: np.ndarray, train_y: np.ndarray, lambd: float, *, max_iter: int = 1000,
                        tol: float = 1e-4):
    """Multinomial logistic regression minimising ``mean_i CE(W x_i, y_i) + lambd / 2 ||W||^2``, no intercept.

    The official call (eval_lr.py:221-233: cyanure ``MultiClassifier(loss="multiclass-logistic",
    penalty="l2", fit_intercept=False)``, ``lambd``) minimises this objective; scikit-learn writes it as
    ``1/2 ||W||^2 + C sum_i CE`` (a sum), so ``C = 1 / (lambd n)`` gives the same unique minimiser.
    scikit-learn rather than cyanure: cyanure 1.2.2 installs from a wheel, but its API is not the
    official 0.2x ``MultiClassifier`` call, it was not faster on the sizes measured (4000 x 192, 100
    classes: 0.34 s vs 0.20 s for scikit-learn's lbfgs), and scikit-learn is needed for the clustering
    metrics anyway.
    """
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=1.0 / (float(lambd) * len(train_y)), fit_intercept=False, max_iter=int(max_iter),
                               tol=float(tol))
    return model.fit(train_x, train_y)


def logistic_regression_sweep(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray,
                              lambdas: Sequence[float], *, max_iter: int = 1000, tol: float = 1e-4) -> dict[float, float]:
    """Val top-1 (percent) of the logistic regression fitted with each ``lambda`` (eval_lr.py:52-55)."""
    return {float(lambd): 100.0 * float(np.mean(
        logistic_regression(train_x, train_y, lambd, max_iter=max_iter, tol=tol).predict(test_x) == test_y))
        for lambd in lambdas}


def _run_logreg(ctx: StageContext, cfg: Mapping[str, Any], data: Path, device: torch.device) -> dict[str, Any]:
    """Frozen L2-normalised features of the subset and of val, then the lambda sweep (main process)."""
    transform = eval_transform(cfg["resize"], cfg["crop"])
    datasets = {split: image_folder(data, split, transform) for split in ("train", "val")}
    torch.manual_seed(ctx.seed)  # a random-init backbone is the one the other protocols see
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(cfg["crop"])).to(device)
    n_last, avgpool = int(cfg["n_last_blocks"]), int(cfg["avgpool_patchtokens"])
    features = {}
    for split, dataset in datasets.items():
        loader = make_loader(dataset, int(cfg["batch_size_per_gpu"]), shuffle=False, num_workers=int(cfg["num_workers"]))
        feats, labels = extract_features(lambda x: linear_features(backbone, x, n_last, avgpool), loader,
                                         len(dataset), device=device, precision=cfg["precision"],
                                         desc=f"logreg {split} features")
        features[split] = (nn.functional.normalize(feats, dim=1, p=2).numpy(), labels.numpy())
    if not is_main():
        return {}
    per_lambda = logistic_regression_sweep(*features["train"], *features["val"], cfg["lambdas"],
                                           max_iter=int(cfg["max_iter"]), tol=float(cfg["tol"]))
    best = max(per_lambda, key=lambda k: (per_lambda[k], -k))  # ties: the stronger regularisation
    log(f"[semi_supervised] logreg top-1 per lambda {per_lambda}")
    return {"top1": per_lambda[best], "best_lambda": best, "per_lambda": {f"{k:g}": v for k, v in per_lambda.items()}}


# -- fine-tuning from a projection-head layer (eval_cls.py) -----------------------------------------
def head_trunk(head: nn.Module, layer: int) -> tuple[nn.Sequential, int]:
    """The first ``layer`` hidden layers (linear [+ norm] + activation) of a projection head's MLP and
    their width: eval_cls.py's ``ClassProjHead.mlp`` for ``finetune_layer < nlayers`` (eval_cls.py:224-236)."""
    if not isinstance(head.mlp, nn.Sequential):
        raise ValueError("semi_supervised.finetune_head_layer: the projection head has a single linear layer")
    modules: list[nn.Module] = []
    linears = 0
    for module in head.mlp:
        if isinstance(module, nn.Linear):
            linears += 1
            if linears > layer >= 1:
                return nn.Sequential(*modules), next(m.out_features for m in reversed(modules) if isinstance(m, nn.Linear))
        modules.append(module)
    raise ValueError(f"semi_supervised.finetune_head_layer {layer}: the head has {linears} linear layers; a hidden "
                     f"layer 1..{linears - 1} is needed (the paper fine-tunes from layer 1)")


class HeadLayerClassifier(ft.ViTClassifier):
    """Backbone → [CLS] → pretrained head layers (``trunk``) → ``nn.Linear`` classifier (eval_cls.py
    ``ClassProjHead`` with ``finetune_layer < nlayers``). Layer-decay groups and weight-decay exclusions
    are the fine-tuning model's (the trunk is on the top layer, as the official head)."""

    def __init__(self, backbone: nn.Module, trunk: nn.Module, trunk_dim: int, num_classes: int) -> None:
        super().__init__(backbone, num_classes)
        self.trunk = trunk
        self.head = nn.Linear(trunk_dim, num_classes)  # cls_head, initialised as eval_cls.py:717 (init_scale 1)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.trunk(self.backbone(images)[:, 0]))


def finetune_on_subset(ctx: StageContext, cfg: Mapping[str, Any], data: Path, folder: Path, *, head_layer: int = 0,
                       heads: Path | None = None, tag: str = "semi finetune") -> dict[str, Any]:
    """Fine-tune on ``data`` (train = the subset), evaluate on val every ``val_freq`` epochs, resume from
    ``folder``; returns the best and last evaluated epochs with the run's settings. TensorBoard curves
    (``finetune/*``) go to ``<stage>/tb/<folder name>/``."""
    device = pick_device()
    precision = resolve_precision(cfg["precision"], device, tag)
    seed_everything(ctx.seed)
    train_set, val_set = train_val_folders(data, finetune_train_transform(cfg),
                                           eval_transform(cfg["resize"], cfg["crop"], cfg["eval_interpolation"]))
    num_classes = len(train_set.classes)
    mixup_fn = ft.build_mixup(cfg, num_classes)
    sampler = train_sampler(train_set, bool(cfg["repeated_aug"]), ctx.seed)
    plan = ft.plan_batches(int(cfg["batch_size"]), 1, len(sampler), mixup=mixup_fn is not None, tag=tag)
    lr = scaled_lr("semi_supervised.finetune", cfg["lr"], plan.global_batch)
    net: ft.ViTClassifier = ft.build_model(ctx.model, ctx.checkpoint, num_classes, cfg)
    if head_layer:
        if heads is None:  # no weights: a random head, as eval_cls.py without --pretrained_weights
            from ibot.models.head import build_head
            head = build_head(net.backbone.embed_dim, {}, teacher=True)
        else:
            network = ctx.checkpoint.network if ctx.checkpoint else None
            head = build_pretrained_head(heads, network, net.backbone.embed_dim)
        trunk, width = head_trunk(head, head_layer)
        net = HeadLayerClassifier(net.backbone, trunk, width, num_classes)
    net = net.to(device)
    train_loader = DataLoader(train_set, batch_size=plan.per_process, sampler=sampler, drop_last=True,
                              num_workers=int(cfg["num_workers"]), pin_memory=torch.cuda.is_available())
    val_batch = max(1, -(-3 * int(cfg["batch_size"]) // (2 * world_size())))  # eval_cls.py:672: 1.5 x the batch
    val_loader = make_loader(val_set, val_batch, shuffle=False, num_workers=int(cfg["num_workers"]))
    log(f"[{tag}] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; head layer "
        f"{head_layer}; {len(sampler)} samples per process and epoch"
        f"{' (repeated augmentation)' if cfg['repeated_aug'] else ''}; global batch {plan.global_batch}, lr {lr:g}; "
        f"{cfg['epochs']} epochs; {device}, {precision}")
    history = ft.fit(net, train_loader, val_loader, config=cfg, plan=plan, mixup_fn=mixup_fn, num_classes=num_classes,
                     num_val=len(val_set), lr=lr, layer_decay=float(cfg["layer_decay"]), per_epoch_schedule=True,
                     precision=precision, device=device, seed=ctx.seed, state_file=folder / "checkpoint.pth",
                     fingerprint=ctx.work.digest, tb_dir=ctx.tb_dir / folder.name, tb_prefix="finetune", tag=tag)
    best, last = best_and_last(history)
    return {"top1": best["top1"], "best_epoch": best["epoch"], "last_top1": last["top1"], "history": history,
            "global_batch": plan.global_batch, "scaled_lr": lr, "precision": precision, "num_train": len(train_set),
            "samples_per_epoch": len(sampler) * world_size()}


# -- the stage --------------------------------------------------------------------------------------
def _subset_file(config: Mapping[str, Any], label: str, data: str) -> Path:
    path = config["subsets"].get(label)
    if path:
        return Path(path)
    path = default_subset_file(data, label)
    if not path.is_file():
        raise FileNotFoundError(f"semi_supervised.subsets.{label} is null, so the subset file is expected at {path} "
                                f"(SimCLR's imagenet_subsets/{path.name}); put it there or set the key")
    return path


def _run_protocol(ctx: StageContext, protocol: str, cfg: Mapping[str, Any], subset: Path, folder: Path,
                  heads: Path | None) -> tuple[float | None, dict[str, Any]]:
    """One protocol on one subset: its top-1 (main process) and what the record keeps of it."""
    device = pick_device()
    if protocol == "knn":
        torch.manual_seed(ctx.seed)
        backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(cfg["crop"])).to(device)
        result = knn.knn_on_folder(backbone, subset, cfg, device=device, tag=f"semi {folder.name}")
        return (result.accuracy.get(knn.REPORTED_K, (None,))[0], {"metrics": result.metrics()})
    if protocol == "linear":
        seed_everything(ctx.seed)
        backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(cfg["crop"])).to(device)
        folder.mkdir(parents=True, exist_ok=True)
        probe = linear.train_probe(backbone, subset, cfg, device=device, seed=ctx.seed,
                                   state_file=folder / "linear_state.pth", fingerprint=ctx.work.digest,
                                   tb_dir=ctx.tb_dir / folder.name)
        linear.save_probe(probe, folder, cfg, ctx.model, ctx.seed)
        return probe.best["top1"], {"best_lr": probe.best["lr"], "best_epoch": probe.best["epoch"],
                                    "global_batch": probe.global_batch, "head": str(folder / "head.pth")}
    if protocol == "logreg":
        detail = _run_logreg(ctx, cfg, subset, device)
        return detail.pop("top1", None), detail
    layer = int(ctx.config["finetune_head_layer"]) if protocol == "finetune_head" else 0
    detail = finetune_on_subset(ctx, cfg, subset, folder, head_layer=layer, heads=heads, tag=f"semi {folder.name}")
    return detail.pop("top1"), detail


def run(ctx: StageContext) -> dict[str, float]:
    """Every protocol on every subset, then metrics.json."""
    config, data = ctx.config, ctx.data_root
    checkpoint = ctx.checkpoint.path if ctx.checkpoint else None
    heads = locate_heads(config["heads"], checkpoint) if "finetune_head" in config["protocols"] else None
    if heads is not None:  # fail before hours of other protocols, not when fine-tuning from the head starts
        extract_head_state(load_file(heads), ctx.checkpoint.network if ctx.checkpoint else None,
                           source=f"semi_supervised heads {heads}")
    metrics: dict[str, float] = {}
    runs: dict[str, dict[str, Any]] = {}
    subsets: dict[str, dict[str, Any]] = {}
    for label in config["subsets"]:
        subset_file = _subset_file(config, label, str(data))
        subset = ctx.work.path / "subsets" / f"{label}pct"
        if is_main():
            materialise_subset(data, subset_file, subset)
        barrier()
        subsets[label] = {"file": str(subset_file), "images": len(read_subset_file(subset_file)), "folder": str(subset)}
        log(f"[semi_supervised] {label}% subset: {subsets[label]['images']} images from {subset_file}")
        for protocol in config["protocols"]:
            layer = int(config["finetune_head_layer"]) if protocol == "finetune_head" else 0
            name = f"{protocol}{layer or ''}_{label}pct"
            begun = time.time()
            top1, detail = _run_protocol(ctx, protocol, protocol_config(config, protocol), subset,
                                         ctx.work.path / name, heads)
            if is_main():
                metrics[f"{protocol}_{label}pct_top1"] = float(top1)
                runs[f"{protocol}_{label}pct"] = {**detail, "wall_time_s": round(time.time() - begun, 3)}
                log(f"[semi_supervised] {name}: top-1 {float(top1):.2f}")
            barrier()
    val = image_folder(data, "val", None)  # every protocol is evaluated on the full val set
    intervals, baselines = accuracy_evidence(metrics, val.targets, len(val.classes))
    ctx.write_metrics(
        task="semi_supervised", dataset=dataset_label(data, len(val.classes)),
        protocol=protocol_label(config), metrics=metrics, intervals=intervals, baselines=baselines,
        extra={"subsets": subsets, "runs": runs, "heads": str(heads) if heads else None,
               "finetune_head_layer": int(config["finetune_head_layer"]),
               "reported": {"Tab.4": [f"finetune_head_{label}pct_top1" for label in config["subsets"]]}})
    return metrics
