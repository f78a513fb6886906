"""Linear probing on frozen features with a one-pass learning-rate sweep (iBOT ``eval_linear_multi.py``):
the sweep, its training over a dataset, the saved head and the classifier the robustness stages load.

Protocol (official defaults):
- frozen backbone in eval mode, forward without grad (``precision`` fp32 | bf16 | fp16 autocast);
- features: concatenated final-norm [CLS] tokens of the last ``n_last_blocks`` blocks (4 for ViT-S),
  optionally ⊕ the average of the last block's (normed) patch tokens (``avgpool_patchtokens``; the
  official ``--avgpool_patchtokens 2`` with ``n_last_blocks 1`` for ViT-B/L);
- training images: ``RandomResizedCrop(crop)`` + horizontal flip; val: ``Resize(resize, bicubic)`` +
  ``CenterCrop(crop)``; ImageNet normalisation;
- heads: ``nn.Linear`` with weight ~ N(0, 0.01), bias 0; SGD momentum 0.9, weight decay 0, cosine
  annealing per epoch over ``epochs`` (100), global batch 1024, lr scaled by batch/256;
- sweep: the official grid {1..9} × 10^{-4..0} (45 learning rates) trained simultaneously on the
  same features (one backbone forward per batch); every head starts from the same initial weights
  (drawn once from the seed), so heads differ only by their learning rate;
- every ``val_freq`` epochs (and after the last) each head is evaluated on val; the reported
  result is the best (head, epoch) on val by top-1 (ties: later wins, as in the official code).

``head.pth`` = ``{'state_dict': {'weight': [C, F], 'bias': [C]}, 'meta': {'n_last_blocks',
'avgpool_patchtokens', 'num_classes', 'lr', 'scaled_lr', 'epoch', 'top1', 'top5', 'classes',
'resize', 'crop', 'interpolation', 'mean', 'std', 'feature_dim', 'model_spec', 'seed', 'protocol'}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.engine.data import (IMAGENET_MEAN, IMAGENET_STD, eval_transform, linear_train_transform, make_loader,
                                    train_val_folders)
from downstream.engine.features import avgpool_mode, backbone_feature_dim, linear_features
from downstream.engine.metrics import gather_correct, topk_correct
from downstream.engine.setup import autocast, build_eval_backbone, log, progress, seed_everything
from ibot.checkpoint import BackboneCheckpoint, CheckpointError, load_file, save_atomic
from ibot.config import OFFICIAL_LR_GRID, scaled_lr  # the grid: eval_linear_multi.py (before batch scaling)
from ibot.distributed import all_reduce_sum, barrier, is_main, rank, world_size
from ibot.io import write_csv_atomic
from ibot.models.specs import ModelSpec
from ibot.tensorboard import ScalarWriter

__all__ = ["OFFICIAL_LR_GRID", "protocol_label", "LinearHeads", "LinearSweep", "HEAD_META_KEYS", "LinearHead",
           "read_head", "LinearClassifier", "load_linear_classifier", "ProbeFeatures", "ProbeResult", "train_probe",
           "save_probe", "save_history"]



def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config (the results join the paper's numbers only to the paper's
    protocol, e.g. ``cls(last 4),sgd,100ep,lr-sweep(45),256/224`` for ViT-S/16)."""
    n_last, mode = int(config["n_last_blocks"]), avgpool_mode(config["avgpool_patchtokens"])
    feature = {0: f"cls(last {n_last})", 1: "avgpool", 2: f"cls(last {n_last})+avgpool"}[mode]
    lrs = len(config["lrs"] or OFFICIAL_LR_GRID)
    return f"{feature},sgd,{int(config['epochs'])}ep,lr-sweep({lrs}),{int(config['resize'])}/{int(config['crop'])}"



# -- heads ----------------------------------------------------------------------------------------
class LinearHeads(nn.Module):
    """``num_heads`` independent ``nn.Linear(dim, num_classes)``; forward → logits [H, B, C].

    Features [B, F] feed every head; grouped features [G, B, F] feed head ``h`` with group ``h // (H / G)``
    (consecutive heads share a group: one feature per group, e.g. per part-wise k, one head per lr)."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, seed: int = 0, groups: int = 1) -> None:
        super().__init__()
        if num_heads % groups:
            raise ValueError(f"{num_heads} heads cannot be split into {groups} feature groups")
        self.group_of = [head // (num_heads // groups) for head in range(num_heads)]
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(num_classes, dim).normal_(mean=0.0, std=0.01, generator=generator)
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 3:
            return torch.stack([head(x[group]) for head, group in zip(self.heads, self.group_of)])
        x = x.reshape(x.shape[0], -1)
        return torch.stack([head(x) for head in self.heads])


class LinearSweep:
    """Several linear heads (one per learning rate) trained on the same features in one pass.

    One SGD optimizer with one parameter group per head (lr = base lr × batch/256: ibot.config.LR_SCALING, momentum,
    weight decay) and one per-epoch cosine schedule; the summed per-head losses are backpropagated
    once — each head's gradient is exactly that of its own loss, so the result equals training each
    head alone on the same batches. With ``groups`` feature groups, every group has its own head per lr
    (heads = groups × lrs, group-major).
    """

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], *, batch_size: int, epochs: int,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu", groups: int = 1) -> None:
        self.lrs = [float(lr) for lr in lrs] * groups
        self.scaled_lrs = [scaled_lr("linear", lr, batch_size) for lr in self.lrs]
        self.num_classes = num_classes
        self.heads = LinearHeads(dim, num_classes, len(self.lrs), seed=seed, groups=groups).to(device)
        self.module: nn.Module = self.heads
        if world_size() > 1:
            device_ids = [device.index] if isinstance(device, torch.device) and device.type == "cuda" else None
            self.module = nn.parallel.DistributedDataParallel(self.heads, device_ids=device_ids)
        groups = [{"params": list(head.parameters()), "lr": lr} for head, lr in zip(self.heads.heads, self.scaled_lrs)]
        self.optimizer = torch.optim.SGD(groups, lr=self.scaled_lrs[0], momentum=momentum, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, epochs, eta_min=0)

    def train_step(self, features: Tensor, targets: Tensor) -> Tensor:
        """One SGD step of every head; returns the per-head losses [H] (detached)."""
        self.heads.train()
        logits = self.module(features.float())
        losses = torch.stack([F.cross_entropy(head_logits, targets) for head_logits in logits])
        self.optimizer.zero_grad(set_to_none=True)
        losses.sum().backward()
        self.optimizer.step()
        return losses.detach()

    def end_epoch(self) -> None:
        self.scheduler.step()

    @torch.no_grad()
    def correct(self, features: Tensor, targets: Tensor) -> Tensor:
        """[B, H, 2] float: top-1 / top-5 hit of every head for every sample."""
        self.heads.eval()
        logits = self.heads(features.float())
        return torch.stack([topk_correct(head_logits, targets, (1, 5)) for head_logits in logits], dim=1).float()

    def head_state(self, index: int) -> dict[str, Tensor]:
        head = self.heads.heads[index]
        return {"weight": head.weight.detach().cpu().clone(), "bias": head.bias.detach().cpu().clone()}

    def state_dict(self) -> dict[str, Any]:
        return {"heads": self.heads.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.heads.load_state_dict(state["heads"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])


# -- the saved head and the loadable classifier (robustness stages) --------------------------------
#: Meta keys a ``head.pth`` must carry to rebuild its classifier.
HEAD_META_KEYS = ("n_last_blocks", "avgpool_patchtokens", "classes", "resize", "crop")


@dataclass(frozen=True)
class LinearHead:
    """A checked ``head.pth``: the best head's layer and its meta (module docstring)."""

    weight: Tensor
    bias: Tensor
    meta: dict[str, Any]
    path: str

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[0])


def read_head(path: str | Path) -> LinearHead:
    """Load and check a ``head.pth`` written by :func:`save_probe`; ``CheckpointError`` names what is wrong."""
    saved = load_file(path)
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state_dict"), Mapping) \
            or not isinstance(saved.get("meta"), Mapping):
        raise CheckpointError(f"linear head {path}: expected {{'state_dict': {{weight, bias}}, 'meta': {{...}}}} as "
                              f"written by the linear stage; got keys "
                              f"{sorted(saved) if isinstance(saved, Mapping) else type(saved).__name__}")
    state, meta = saved["state_dict"], dict(saved["meta"])
    missing = [k for k in ("weight", "bias") if k not in state] + [k for k in HEAD_META_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"linear head {path}: missing {missing} (state_dict keys {sorted(state)}, "
                              f"meta keys {sorted(meta)})")
    weight, bias = state["weight"], state["bias"]
    if weight.dim() != 2 or bias.shape != (weight.shape[0],):
        raise CheckpointError(f"linear head {path}: weight {tuple(weight.shape)} / bias {tuple(bias.shape)} "
                              f"are not a linear layer")
    classes = list(meta["classes"])
    if len(classes) != weight.shape[0] or int(meta.get("num_classes", len(classes))) != weight.shape[0]:
        raise CheckpointError(f"linear head {path}: {weight.shape[0]} outputs but meta lists {len(classes)} classes "
                              f"(num_classes {meta.get('num_classes')})")
    if len(set(classes)) != len(classes):
        raise CheckpointError(f"linear head {path}: duplicate class names in meta['classes']")
    return LinearHead(weight=weight.float(), bias=bias.float(), meta=meta, path=str(path))


class LinearClassifier(nn.Module):
    """Frozen backbone + trained linear head: images (normalised, ``crop`` px) → logits [B, C]; the
    pieces (backbone, ``linear``, the feature recipe) stay reachable for the occlusion stage."""

    def __init__(self, backbone: nn.Module, head: LinearHead) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.linear = nn.Linear(head.weight.shape[1], head.num_classes)
        self.linear.load_state_dict({"weight": head.weight, "bias": head.bias})
        self.n_last_blocks = int(head.meta["n_last_blocks"])
        self.avgpool_patchtokens = head.meta["avgpool_patchtokens"]
        self.meta, self.classes, self.num_classes = head.meta, head.classes, head.num_classes

    def features(self, images: Tensor) -> Tensor:
        return linear_features(self.backbone, images, self.n_last_blocks, self.avgpool_patchtokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(self.features(images).float())


def load_linear_classifier(model_spec: ModelSpec | Mapping[str, Any], checkpoint: BackboneCheckpoint | None,
                           head_path: str | Path) -> LinearClassifier:
    """Backbone weights + a ``head.pth`` written by the linear stage → classifier in eval mode, frozen.

    ``checkpoint`` holds the backbone weights the head was trained on (``None``: the random-init
    backbone of the stage, rebuilt from ``meta['seed']``). The classifier maps normalised images to
    logits with the feature function of training (:func:`linear_features`). Raises ``CheckpointError``
    if the head does not fit the backbone.
    """
    head = read_head(head_path)
    meta = head.meta
    with torch.random.fork_rng(devices=[]):
        # without a checkpoint the backbone is the random init the head was trained on (seeded like the stage)
        torch.manual_seed(int(meta.get("seed", 0)))
        backbone = build_eval_backbone(model_spec, checkpoint, int(meta["crop"]))
    dim = backbone_feature_dim(backbone, int(meta["n_last_blocks"]), meta["avgpool_patchtokens"])
    if tuple(head.weight.shape) != (head.num_classes, dim):
        raise CheckpointError(
            f"linear head {head_path}: weight {tuple(head.weight.shape)} does not fit backbone "
            f"{ModelSpec.of(model_spec).as_dict()} (features {dim} = embed_dim {backbone.embed_dim} × "
            f"n_last_blocks {meta['n_last_blocks']}, avgpool {meta['avgpool_patchtokens']}; "
            f"{head.num_classes} classes)")
    return LinearClassifier(backbone, head).eval().requires_grad_(False)


# -- the sweep over a dataset (the linear stage; semi-supervised linear probing; part-wise probing) -----
@dataclass(frozen=True)
class ProbeFeatures:
    """What the heads read from the frozen backbone: ``fn(images)`` → [B, F], or [G, B, F] with one feature per
    ``groups`` label (each group gets its own head per learning rate)."""

    fn: Callable[[Tensor], Tensor]
    dim: int
    groups: tuple[str, ...] = ()


@dataclass
class ProbeResult:
    """The best (head, epoch) on val and every head's evaluations."""

    best: dict[str, Any]            # top1, top5, head, lr, scaled_lr, epoch, state_dict
    history: list[dict[str, Any]]   # one row per head and evaluation (per_head.csv)
    classes: list[str]
    feature_dim: int
    global_batch: int
    num_train: int
    num_val: int
    val_labels: list[int]           # true classes of val, in order (interval and baseline of the accuracies)
    groups: tuple[str, ...] = ()    # feature groups (history rows carry theirs in ``group``)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def metrics(self) -> dict[str, float]:
        """``top1`` (and ``top5`` with at least 5 classes) of the best head."""
        return {"top1": self.best["top1"], **({"top5": self.best["top5"]} if self.num_classes >= 5 else {})}

    def best_by_group(self) -> dict[str, dict[str, Any]]:
        """Per feature group: its best (head, epoch) row of the history (ties: later wins, like ``best``)."""
        best: dict[str, dict[str, Any]] = {}
        for row in self.history:
            if row["top1"] >= best.get(row.get("group", ""), {"top1": -1.0})["top1"]:
                best[row.get("group", "")] = row
        return best

    def per_head(self) -> list[dict[str, Any]]:
        """Per head (learning rate, and feature group when grouped): its best top-1, the epoch of it, and its
        last top-1."""
        per_head: dict[tuple[str, str], dict[str, Any]] = {}
        for row in self.history:
            group = row.get("group", "")
            entry = per_head.setdefault((group, str(row["lr"])), {
                **({"group": group} if self.groups else {}), "lr": row["lr"], "best_top1": -1.0, "best_epoch": None})
            if row["top1"] >= entry["best_top1"]:
                entry.update(best_top1=row["top1"], best_epoch=row["epoch"])
            entry["last_top1"] = row["top1"]
        return list(per_head.values())


def _head_names(lrs: Sequence[float], groups: Sequence[str] = ()) -> list[str]:
    """TensorBoard name of each head: ``[<group>_]lr_<base lr>`` (``_<index>`` added if two heads share one)."""
    names = [f"{group}_lr_{lr:g}" for group in groups for lr in lrs] if groups else [f"lr_{lr:g}" for lr in lrs]
    return names if len(set(names)) == len(names) else [f"{n}_{i}" for i, n in enumerate(names)]


def train_probe(backbone: nn.Module, data: str | Path, config: Mapping[str, Any], *, device: torch.device,
                seed: int, state_file: Path, fingerprint: str, tb_dir: str | Path,
                features: ProbeFeatures | None = None) -> ProbeResult:
    """Train the sweep's heads on frozen features of ``<data>/train`` and pick the best on ``<data>/val``.

    ``features``: what the heads read (default: the linear-probe feature of ``config``'s ``n_last_blocks`` and
    ``avgpool_patchtokens``, :func:`linear_features`).

    The training state is saved atomically after every epoch in ``state_file`` (tagged with the work
    ``fingerprint``) and a rerun resumes from it; TensorBoard scalars go to ``tb_dir`` (module docstring
    of :mod:`downstream.linear`).
    """
    train_set, val_set = train_val_folders(data, linear_train_transform(config["crop"], config["train_interpolation"]),
                                           eval_transform(config["resize"], config["crop"]))
    num_classes = len(train_set.classes)
    epochs, val_freq = int(config["epochs"]), max(1, int(config["val_freq"]))
    per_process = max(1, int(config["batch_size"]) // world_size())
    global_batch = per_process * world_size()
    lrs = list(config["lrs"] or OFFICIAL_LR_GRID)
    if features is None:
        n_last, avgpool = int(config["n_last_blocks"]), config["avgpool_patchtokens"]
        features = ProbeFeatures(lambda images: linear_features(backbone, images, n_last, avgpool),
                                 backbone_feature_dim(backbone, n_last, avgpool))
    dim, groups = features.dim, features.groups
    log(f"[linear] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; features {dim}"
        f"{f' x {len(groups)} groups' if groups else ''}; {len(lrs) * max(1, len(groups))} heads; "
        f"batch {global_batch}; {epochs} epochs; device {device}")

    def features_of(images: Tensor) -> Tensor:
        with torch.no_grad(), autocast(config["precision"], device):
            return features.fn(images).float()

    sweep = LinearSweep(dim, num_classes, lrs, batch_size=global_batch, epochs=epochs,
                        momentum=float(config["momentum"]), weight_decay=float(config["weight_decay"]), seed=seed,
                        device=device, groups=max(1, len(groups)))
    train_loader = make_loader(train_set, per_process, shuffle=True, seed=seed, num_workers=int(config["num_workers"]))
    val_loader = make_loader(val_set, per_process, shuffle=False, num_workers=int(config["num_workers"]))
    start_epoch, history, best = 0, [], {"top1": -1.0}
    if state_file.is_file():
        state = load_file(state_file, map_location=device)
        sweep.load_state_dict(state["sweep"])
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        log(f"[linear] resuming from {state_file} after epoch {start_epoch}")
    tb = ScalarWriter(tb_dir, resume_step=start_epoch + 1)
    names = _head_names(lrs, groups)
    group_of = [groups[g] if groups else "" for g in sweep.heads.group_of]

    val_cache: list[tuple[Tensor, Tensor, Tensor]] | None = None
    for epoch in range(start_epoch, epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_everything(seed + 1000 * epoch + rank())
        losses = torch.zeros(len(sweep.lrs), device=device)
        steps = 0
        for images, targets, _ in progress(train_loader, desc=f"linear epoch {epoch + 1}/{epochs}"):
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            losses += sweep.train_step(features_of(images), targets)
            steps += 1
        lr_factor = sweep.optimizer.param_groups[0]["lr"] / sweep.scaled_lrs[0] if sweep.scaled_lrs[0] else 0.0
        sweep.end_epoch()
        mean_losses = (all_reduce_sum(losses) / (max(steps, 1) * world_size())).tolist()  # every process's batches
        scalars = {"linear/train_loss_mean": sum(mean_losses) / len(mean_losses), "linear/lr_factor": lr_factor,
                   **{f"linear/train_loss/{name}": value for name, value in zip(names, mean_losses)}}
        if epoch % val_freq == 0 or epoch == epochs - 1:
            if val_cache is None or not config["cache_val_features"]:
                val_cache = [(features_of(images.to(device)), targets.to(device), index.to(device))
                             for images, targets, index in progress(val_loader, desc="linear val features")]
            hits = _val_hits(sweep, val_cache, len(val_set))  # [N, H, 2]
            accuracy = 100.0 * hits.double().mean(dim=0)  # [H, 2]
            for head, lr in enumerate(sweep.lrs):
                top1, top5 = float(accuracy[head, 0]), float(accuracy[head, 1])
                history.append({"head": head, "group": group_of[head], "lr": lr, "scaled_lr": sweep.scaled_lrs[head],
                                "epoch": epoch + 1, "top1": top1, "top5": top5 if num_classes >= 5 else ""})
                if top1 >= best["top1"]:
                    best = {"top1": top1, "top5": top5, "head": head, "group": group_of[head], "lr": lr,
                            "scaled_lr": sweep.scaled_lrs[head], "epoch": epoch + 1,
                            "state_dict": sweep.head_state(head)}
            log(f"[linear] epoch {epoch + 1}: mean train loss {scalars['linear/train_loss_mean']:.4f}; "
                f"best head this epoch top-1 {float(accuracy[:, 0].max()):.2f}; best so far {best['top1']:.2f} "
                f"(lr {best['lr']:g}, epoch {best['epoch']})")
            scalars.update({f"linear/acc_top1/{name}": float(accuracy[head, 0]) for head, name in enumerate(names)})
            scalars.update({"linear/acc_top1_best_head": float(accuracy[:, 0].max()),
                            "linear/acc_top1_best": best["top1"]})
            if num_classes >= 5:
                scalars["linear/acc_top5_best"] = best["top5"]
        tb.add(scalars, epoch + 1)
        if is_main():
            save_atomic({"fingerprint": fingerprint, "epoch": epoch + 1, "sweep": sweep.state_dict(),
                         "history": history, "best": best}, state_file)
        barrier()
    tb.close()
    return ProbeResult(best=best, history=history, classes=list(train_set.classes), feature_dim=dim,
                       global_batch=global_batch, num_train=len(train_set), num_val=len(val_set),
                       val_labels=list(val_set.targets), groups=tuple(groups))


def save_probe(result: ProbeResult, folder: Path, config: Mapping[str, Any], model: ModelSpec, seed: int) -> None:
    """``per_head.csv`` (every head at every evaluation) and ``head.pth`` (the best head, loadable with
    :func:`load_linear_classifier`) in ``folder`` (main process)."""
    if not is_main():
        return
    best = result.best
    save_history(result, folder)
    meta = {"n_last_blocks": int(config["n_last_blocks"]), "avgpool_patchtokens": config["avgpool_patchtokens"],
            "num_classes": result.num_classes, "lr": best["lr"], "scaled_lr": best["scaled_lr"], "epoch": best["epoch"],
            "top1": best["top1"], "top5": best["top5"] if result.num_classes >= 5 else None,
            "classes": result.classes, "resize": int(config["resize"]), "crop": int(config["crop"]),
            "interpolation": "bicubic", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "feature_dim": result.feature_dim, "model_spec": model.as_dict(), "seed": seed,
            "protocol": protocol_label(config)}
    save_atomic({"state_dict": best["state_dict"], "meta": meta}, folder / "head.pth")


def save_history(result: ProbeResult, folder: Path) -> None:
    """``per_head.csv``: every head at every evaluation (with its feature ``group`` when grouped; main process)."""
    if is_main():
        columns = ["head", *(["group"] if result.groups else []), "lr", "scaled_lr", "epoch", "top1", "top5"]
        write_csv_atomic(folder / "per_head.csv", result.history, columns)


def _val_hits(sweep: LinearSweep, cache: list[tuple[Tensor, Tensor, Tensor]], num_samples: int) -> Tensor:
    """Per-sample top-1/top-5 hits of every head over the whole val set, [N, H, 2] (exact under DDP)."""
    rows = [sweep.correct(features, targets) for features, targets, _ in cache]
    index = torch.cat([i for _, _, i in cache])
    return gather_correct(torch.cat(rows), index, num_samples)
