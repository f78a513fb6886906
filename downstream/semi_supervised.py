"""Semi-supervised ImageNet classification with 1% and 10% of the labels (paper Tab.4 and Tab.12).

Official protocol (bytedance/ibot at da316d8, ``evaluation/README.md:59-67``): the label subsets are
SimCLRv2's split files (README.md:61); "for settings evaluated on frozen features, k-NN, LR, and linear
probing, just change the ``--data_path`` to the imagenet splits" (README.md:61), and end-to-end
fine-tuning runs ``evaluation/semi_supervised/eval_cls.py`` (``run.sh imagenet_semi_cls``,
run.sh:199-212) with ``--epochs 1000 --lr 5e-6 --finetune_head_layer 1`` (README.md:62-67). Here, per
subset (``semi_supervised.subsets``; :mod:`ibot.data.subsets` links the listed train images and the full
val set into an ImageNet-layout folder, ``<stage>/work/subsets/<p>pct``), five protocols:

- ``knn``: the k-NN stage (:func:`downstream.knn.run`, eval_knn.py) on the subset;
- ``linear``: the linear stage (:func:`downstream.linear.run`, eval_linear_multi.py: the lr sweep, the best
  head on val) on the subset;
- ``logreg``: ``evaluation/eval_logistic_regression.py``: frozen [CLS] features of the last
  ``n_last_blocks`` blocks (eval_lr.py:127-150, via :func:`downstream.linear.linear_features`),
  L2-normalised (:113-114), multinomial logistic regression without intercept, L2 penalty ``lambda``
  for each ``lambda`` in {0.01, 0.1, 1} (:52-55, :221-235), accuracy on val; reported: the best lambda;
- ``finetune``: eval_cls.py with ``--finetune_head_layer 0``: backbone + ``nn.Linear`` on the final-norm
  [CLS] token (eval_cls.py:713-714, "w/o proj-head layer" in Tab.12);
- ``finetune_head``: eval_cls.py with ``--finetune_head_layer 1``: the classifier reads the first hidden
  layer (linear + GELU) of the pretrained teacher [CLS] projection head (``ClassProjHead``,
  eval_cls.py:207-256, loaded from the checkpoint's ``head.mlp.0``, :706-721); the Tab.4 number.

Fine-tuning (:func:`finetune_on_subset`) is the fine-tuning stage's training code
(:mod:`downstream.finetune`: model, AdamW groups, timm transforms, mixup/cutmix, the epoch loop, resume,
evaluation) with eval_cls.py's values (``workflow/schemas/semi_supervised.schema.yaml``): lr scaled by
global batch / 512 (eval_cls.py:782), per-epoch cosine schedule with warmup (timm ``create_scheduler``,
eval_cls.py:787, stepped after every epoch, :860), no layer decay, classifier init trunc_normal(0.02)
(:717), val after every epoch and the best epoch reported (:861-879). Not reproduced: DeiT's repeated
augmentation sampler (``RASampler``, 3 repeats, eval_cls.py:430-481, :641-644): every epoch sees each
subset image once; the model EMA (:766-773) is kept but never evaluated by the official script, so it is
left out.

Outputs: ``metrics.json`` with ``<protocol>_<p>pct_top1`` for every protocol and subset; each run's own
record (and the linear head, the fine-tuning checkpoints) under ``<stage>/work/<protocol>_<p>pct/``.
Linear probing and fine-tuning resume from their fingerprinted work folders (:mod:`ibot.workdir`) and
write live TensorBoard curves to ``<stage>/tb/<protocol>_<p>pct/``.

    python -m downstream.semi_supervised --checkpoint W.pth --data /path/to/imagenet --out .../metrics.json
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from downstream import finetune as ft
from downstream import knn, linear
from downstream.cli import stage_main
from downstream.features import (build_eval_backbone, dataset_label, eval_transform, extract_features, image_folder,
                                 log, make_loader, pick_device, seed_everything)
from ibot.checkpoint import build_pretrained_head, extract_head_state, load_file, locate_heads, sha256_file
from ibot.config import ConfigError, deep_merge
from ibot.data.subsets import default_subset_file, materialise_subset, read_subset_file
from ibot.distributed import barrier, init_distributed, is_main, world_size
from ibot.metrics import read_metrics, write_metrics
from ibot.tensorboard import ScalarWriter
from ibot.stages import section_schema, stage_defaults
from ibot.workdir import prepare_stage_work

__all__ = ["DEFAULTS", "PROTOCOLS", "protocol_config", "protocol_label", "preflight", "logistic_regression",
           "logistic_regression_sweep", "head_trunk", "HeadLayerClassifier", "epoch_scheduler", "finetune_on_subset",
           "run", "main"]

#: Paper defaults: workflow/schemas/semi_supervised.schema.yaml, the one source of default values.
DEFAULTS: dict[str, Any] = stage_defaults("semi_supervised")
PROTOCOLS = ("knn", "linear", "logreg", "finetune", "finetune_head")
#: eval_cls.py:782: ``lr * batch_size * world_size / 512``.
LR_BATCH_BASE = 512
_STAGE_DEFAULTS = {"knn": knn.DEFAULTS, "linear": linear.DEFAULTS}


# -- configuration ----------------------------------------------------------------------------------
def protocol_config(config: Mapping[str, Any], protocol: str) -> dict[str, Any]:
    """The config one protocol runs with: for ``knn``/``linear`` that stage's defaults with the non-null
    values of ``semi_supervised.<protocol>``; ``finetune``/``finetune_head`` share ``semi_supervised.finetune``."""
    if protocol in _STAGE_DEFAULTS:
        values = {k: v for k, v in (config.get(protocol) or {}).items() if v is not None}
        return deep_merge(_STAGE_DEFAULTS[protocol], values, path=f"semi_supervised.{protocol}")
    if protocol == "logreg":
        return dict(config["logreg"])
    if protocol in ("finetune", "finetune_head"):
        return dict(config["finetune"])
    raise ConfigError(f"semi_supervised.protocols: unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def preflight(config: Mapping[str, Any]) -> None:
    """Before any job: the k-NN / linear protocol configs are valid configs of those stages, the head
    layer is a hidden one, and subset files named explicitly exist."""
    import jsonschema

    for protocol in _STAGE_DEFAULTS:
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
            parts.append(f"{name}[{ft.protocol_label(cfg)},lr={float(cfg['lr']):g},batch={int(cfg['batch_size'])}]")
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


def _run_logreg(cfg: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
                checkpoint_key: str | None, data: Path, seed: int) -> dict[str, Any]:
    """Frozen L2-normalised features of the subset and of val, then the lambda sweep (main process)."""
    device = pick_device()
    transform = eval_transform(cfg["resize"], cfg["crop"])
    datasets = {split: image_folder(data, split, transform) for split in ("train", "val")}
    torch.manual_seed(seed)  # a random-init backbone is the one the other protocols see
    backbone = build_eval_backbone(model_spec, checkpoint, checkpoint_key, int(cfg["crop"])).to(device)
    n_last, avgpool = int(cfg["n_last_blocks"]), int(cfg["avgpool_patchtokens"])
    features = {}
    for split, dataset in datasets.items():
        loader = make_loader(dataset, int(cfg["batch_size_per_gpu"]), shuffle=False, num_workers=int(cfg["num_workers"]))
        feats, labels = extract_features(lambda x: linear.linear_features(backbone, x, n_last, avgpool), loader,
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


def epoch_scheduler(optimizer: torch.optim.Optimizer, config: Mapping[str, Any]):
    """timm ``create_scheduler`` as eval_cls.py:787 builds it (cosine over ``epochs``, warmup from
    ``warmup_lr``, floor ``min_lr``, per epoch); ``step(e)`` after epoch ``e`` sets the next epoch's lr."""
    from timm.scheduler import CosineLRScheduler
    return CosineLRScheduler(optimizer, t_initial=int(config["epochs"]), lr_min=float(config["min_lr"]),
                             warmup_lr_init=float(config["warmup_lr"]), warmup_t=int(config["warmup_epochs"]),
                             cycle_limit=1, t_in_epochs=True)


def finetune_on_subset(cfg: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
                       checkpoint_key: str | None, data: Path, work_dir: Path, seed: int, *, head_layer: int = 0,
                       heads: Path | None = None, tag: str = "semi finetune",
                       tb_dir: Path | None = None) -> dict[str, Any]:
    """Fine-tune on ``data`` (train = the subset), evaluate on val every ``val_freq`` epochs, resume from
    ``work_dir``; returns the best and last evaluated epochs (main process) with the run's settings.
    TensorBoard curves (``finetune/*``, :func:`downstream.finetune.epoch_scalars`) go to ``tb_dir``."""
    device = pick_device()
    precision = cfg["precision"] if device.type == "cuda" or cfg["precision"] != "fp16" else "fp32"
    seed_everything(seed)
    train_set = image_folder(data, "train", ft.train_transform(cfg))
    val_set = image_folder(data, "val", eval_transform(cfg["resize"], cfg["crop"], cfg["eval_interpolation"]))
    if train_set.classes != val_set.classes:
        raise ValueError(f"dataset {data}: train/ and val/ have different class folders")
    num_classes = len(train_set.classes)
    mixup_fn = ft.build_mixup(cfg, num_classes)
    plan = ft.plan_batches(int(cfg["batch_size"]), 1, len(train_set) // world_size(), mixup=mixup_fn is not None,
                           tag=tag)
    scaled_lr = float(cfg["lr"]) * plan.global_batch / LR_BATCH_BASE

    net: ft.ViTClassifier = ft.build_model(model_spec, checkpoint, checkpoint_key, num_classes, cfg)
    if head_layer:
        if heads is None:  # no weights: a random head, as eval_cls.py without --pretrained_weights
            from ibot.models.head import build_head
            head = build_head(net.backbone.embed_dim, {}, teacher=True)
        else:
            head = build_pretrained_head(heads, checkpoint_key, net.backbone.embed_dim)
        trunk, width = head_trunk(head, head_layer)
        net = HeadLayerClassifier(net.backbone, trunk, width, num_classes)
    net = net.to(device)
    optimizer = ft.build_optimizer(net, {**cfg, "lr": scaled_lr})
    scheduler = epoch_scheduler(optimizer, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=(precision == "fp16"))
    module: nn.Module = net
    if world_size() > 1:
        module = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = ft.build_criterion(cfg, mixup_fn)
    train_loader = make_loader(train_set, plan.per_process, shuffle=True, seed=seed, drop_last=True,
                               num_workers=int(cfg["num_workers"]))
    val_batch = max(1, -(-3 * int(cfg["batch_size"]) // (2 * world_size())))  # eval_cls.py:672: 1.5 x the batch
    val_loader = make_loader(val_set, val_batch, shuffle=False, num_workers=int(cfg["num_workers"]))
    epochs = int(cfg["epochs"])
    log(f"[{tag}] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; head layer "
        f"{head_layer}; global batch {plan.global_batch}, lr {scaled_lr:g}; {epochs} epochs; {device}, {precision}")

    identity = {"head_layer": head_layer, "heads_sha256": sha256_file(heads) if head_layer and heads else None}
    work = prepare_stage_work("semi_supervised", work_dir, config={**cfg, **identity},
                              model_spec=model_spec, checkpoint=checkpoint, data={"imagenet": data}, seed=seed)
    state_file = work.path / "checkpoint.pth"
    start_epoch, history = ft.load_training_state(state_file, net, optimizer, scaler, device, tag=tag)
    tb = ScalarWriter(tb_dir, resume_step=start_epoch + 1)
    for epoch in range(start_epoch, epochs):
        if epoch > 0:
            scheduler.step(epoch - 1)  # eval_cls.py:860: lr_scheduler.step(epoch) after each epoch
        train_loss = ft.train_one_epoch(module, net, train_loader, optimizer, scaler, criterion, mixup_fn, plan=plan,
                                        epoch=epoch, epochs=epochs, num_classes=num_classes, config=cfg,
                                        precision=precision, device=device, seed=seed, tag=tag)
        record = {"epoch": epoch + 1, "train_loss": train_loss, "lr": max(g["lr"] for g in optimizer.param_groups)}
        if (epoch + 1) % max(1, int(cfg["val_freq"])) == 0 or epoch == epochs - 1:
            record.update(ft.evaluate(net, val_loader, len(val_set), device, precision))
            log(f"[{tag}] epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}, val top-1 {record['top1']:.2f}")
        history.append(record)
        tb.add(ft.epoch_scalars(record), epoch + 1)
        ft.save_training_state(state_file, work.digest, epoch + 1, net, optimizer, scaler, history)
    tb.close()
    best, last = ft.best_and_last(history)
    return {"top1": best["top1"], "best_epoch": best["epoch"], "last_top1": last["top1"], "history": history,
            "global_batch": plan.global_batch, "scaled_lr": scaled_lr, "precision": precision,
            "fingerprint": work.digest, "num_train": len(train_set)}


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


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int) -> dict[str, float]:
    """Stage entry (inside the launched job): every protocol on every subset, then metrics.json."""
    init_distributed()
    started = time.time()
    stage_dir = Path(out).parent
    heads = locate_heads(config["heads"], checkpoint) if "finetune_head" in config["protocols"] else None
    if heads is not None:  # fail before hours of other protocols, not when fine-tuning from the head starts
        extract_head_state(load_file(heads), checkpoint_key, source=f"semi_supervised heads {heads}")
    metrics: dict[str, float] = {}
    runs: dict[str, dict[str, Any]] = {}
    subsets: dict[str, dict[str, Any]] = {}
    for label in config["subsets"]:
        subset_file = _subset_file(config, label, data)
        subset = stage_dir / "work" / "subsets" / f"{label}pct"
        if is_main():
            materialise_subset(data, subset_file, subset)
        barrier()
        subsets[label] = {"file": str(subset_file), "images": len(read_subset_file(subset_file)), "folder": str(subset)}
        log(f"[semi_supervised] {label}% subset: {subsets[label]['images']} images from {subset_file}")
        for protocol in config["protocols"]:
            cfg = protocol_config(config, protocol)
            layer = int(config["finetune_head_layer"]) if protocol == "finetune_head" else 0
            name = f"{protocol}{layer or ''}_{label}pct"
            folder = stage_dir / "work" / name
            common = dict(model_spec=model_spec, checkpoint=checkpoint, checkpoint_key=checkpoint_key, seed=seed)
            begun = time.time()
            if protocol in ("knn", "linear"):
                entry = knn.run if protocol == "knn" else linear.run
                result = entry(config=cfg, data=str(subset), out=str(folder / "result.json"), run=run, model=model,
                               **common, **({"tb_dir": str(stage_dir / "tb" / name)} if protocol == "linear" else {}))
                top1 = result.get(f"top1_k{knn.REPORTED_K}" if protocol == "knn" else "top1")
                extra = read_metrics(folder / "result.json")["extra"] if is_main() else {}
                detail = {"record": str(folder / "result.json")}
                if protocol == "linear":
                    detail.update({k: extra.get(k) for k in ("best_lr", "best_epoch", "global_batch")})
            elif protocol == "logreg":
                detail = _run_logreg(cfg, model_spec, checkpoint, checkpoint_key, subset, seed)
                top1 = detail.pop("top1", None)
            else:
                detail = finetune_on_subset(cfg, model_spec, checkpoint, checkpoint_key, subset, folder / "work", seed,
                                            head_layer=layer, heads=heads, tag=f"semi {name}",
                                            tb_dir=stage_dir / "tb" / name)
                top1 = detail.pop("top1")
            if is_main():
                metrics[f"{protocol}_{label}pct_top1"] = float(top1)
                runs[f"{protocol}_{label}pct"] = {**detail, "wall_time_s": round(time.time() - begun, 3)}
                log(f"[semi_supervised] {name}: top-1 {float(top1):.2f}")
            barrier()
    if is_main():
        write_metrics(
            out, run=run, model=model, stage="semi_supervised", task="semi_supervised",
            dataset=dataset_label(data, sum(p.is_dir() for p in (Path(data) / "train").iterdir())),
            protocol=protocol_label(config),
            metrics=metrics, config=config, wall_time_s=time.time() - started, checkpoint=checkpoint,
            extra={"subsets": subsets, "runs": runs, "heads": str(heads) if heads else None,
                   "finetune_head_layer": int(config["finetune_head_layer"]),
                   "reported": {"Tab.4": [f"finetune_head_{label}pct_top1" for label in config["subsets"]]}})
        log(f"[semi_supervised] wrote {out}")
    barrier()
    return metrics


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("semi_supervised", "downstream.semi_supervised:run", DEFAULTS, argv,
                      description="Semi-supervised classification on the 1%/10% ImageNet label subsets (iBOT Tab.4, 12).")


if __name__ == "__main__":
    main()
