"""Linear probing on frozen features with a one-pass learning-rate sweep (iBOT ``eval_linear_multi.py``).

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

Outputs beside ``metrics.json``: ``per_head.csv`` (every head at every evaluation) and
``head.pth`` (the best head, loadable with :func:`load_linear_classifier`). Training state is
checkpointed after every epoch in ``work/`` and a rerun resumes from it. Live TensorBoard curves in
``tb/`` (step = epochs done): ``linear/train_loss/lr_<lr>`` per head, ``linear/train_loss_mean``,
``linear/lr_factor`` (the cosine factor: each head's lr is its scaled lr times it) and, at each
evaluation, ``linear/acc_top1/lr_<lr>`` per head, ``linear/acc_top1_best_head`` (this epoch),
``linear/acc_top1_best`` (so far; ``linear/acc_top5_best`` with 5 classes or more).

``head.pth`` = ``{'state_dict': {'weight': [C, F], 'bias': [C]}, 'meta': {'n_last_blocks',
'avgpool_patchtokens', 'num_classes', 'lr', 'scaled_lr', 'epoch', 'top1', 'top5', 'classes',
'resize', 'crop', 'interpolation', 'mean', 'std', 'feature_dim', 'model_spec', 'seed'}}``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from downstream.cli import stage_main
from downstream.features import (IMAGENET_MEAN, IMAGENET_STD, autocast, build_eval_backbone, dataset_label,
                                 eval_transform, gather_correct, image_folder,
                                 linear_train_transform, log, make_loader, pick_device, progress, seed_everything,
                                 topk_correct)
from ibot.checkpoint import CheckpointError, load_file, save_atomic
from ibot.distributed import all_reduce_sum, barrier, init_distributed, is_main, rank, world_size
from ibot.io import write_csv_atomic
from ibot.metrics import write_metrics
from ibot.tensorboard import ScalarWriter
from ibot.workdir import prepare_stage_work
from ibot.stages import stage_defaults

__all__ = ["DEFAULTS", "OFFICIAL_LR_GRID", "protocol_label", "linear_features", "feature_dim", "backbone_feature_dim", "LinearHeads", "LinearSweep",
           "LinearClassifier", "load_linear_classifier", "run", "main"]

#: eval_linear_multi.py: ``[base * n for base in 10**k, k in -4..0, n in 1..9]`` (before batch scaling).
OFFICIAL_LR_GRID: list[float] = [round(n * 10.0 ** e, 10) for e in range(-4, 1) for n in range(1, 10)]

#: Paper defaults (eval_linear.py): workflow/schemas/linear.schema.yaml, the one source of default values.
DEFAULTS: dict[str, Any] = stage_defaults("linear")


# -- features -----------------------------------------------------------------------------------
def _avgpool_mode(avgpool_patchtokens: bool | int) -> int:
    """Official ``--avgpool_patchtokens`` code: 0 [CLS] only, 1 patch mean only, 2 [CLS] ⊕ patch mean.

    ``True`` means 2 (concatenate the patch-token average to the [CLS] tokens), ``False`` means 0.
    """
    if isinstance(avgpool_patchtokens, bool):
        return 2 if avgpool_patchtokens else 0
    if avgpool_patchtokens not in (0, 1, 2):
        raise ValueError(f"avgpool_patchtokens: {avgpool_patchtokens!r}; expected a bool or 0/1/2")
    return int(avgpool_patchtokens)


def feature_dim(embed_dim: int, n_last_blocks: int, avgpool_patchtokens: bool | int) -> int:
    mode = _avgpool_mode(avgpool_patchtokens)
    return embed_dim * (n_last_blocks * int(mode != 1) + int(mode > 0))


def backbone_feature_dim(backbone: nn.Module, n_last_blocks: int, avgpool_patchtokens: bool | int) -> int:
    """Feature size for ``backbone``: ViT ``embed_dim`` × blocks (+ patch mean); Swin the sum of its last
    blocks' widths (eval_linear.py:99-103; ``IBOTSwinTransformer.linear_feature_dim`` rejects the
    ViT-only ``avgpool_patchtokens``)."""
    if hasattr(backbone, "linear_feature_dim"):
        return int(backbone.linear_feature_dim(int(n_last_blocks), _avgpool_mode(avgpool_patchtokens)))
    if not 1 <= n_last_blocks <= len(backbone.blocks):
        raise ValueError(f"linear.n_last_blocks: {n_last_blocks} but the backbone has {len(backbone.blocks)} blocks")
    return feature_dim(backbone.embed_dim, n_last_blocks, avgpool_patchtokens)


def linear_features(backbone: nn.Module, images: Tensor, n_last_blocks: int,
                    avgpool_patchtokens: bool | int) -> Tensor:
    """Linear-probe features [B, F]: [CLS] of the last ``n_last_blocks`` blocks (each after the final
    norm), optionally ⊕ the mean of the last block's normed patch tokens (official eval_linear.py)."""
    mode = _avgpool_mode(avgpool_patchtokens)
    outputs = backbone.get_intermediate_layers(images, int(n_last_blocks))
    parts = [] if mode == 1 else [x[:, 0] for x in outputs]
    if mode > 0:
        parts.append(outputs[-1][:, 1:].mean(dim=1))
    return torch.cat(parts, dim=-1)


# -- heads ----------------------------------------------------------------------------------------
class LinearHeads(nn.Module):
    """``num_heads`` independent ``nn.Linear(dim, num_classes)``; forward → logits [H, B, C]."""

    def __init__(self, dim: int, num_classes: int, num_heads: int, seed: int = 0) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(dim, num_classes) for _ in range(num_heads))
        generator = torch.Generator().manual_seed(seed)
        weight = torch.empty(num_classes, dim).normal_(mean=0.0, std=0.01, generator=generator)
        with torch.no_grad():
            for head in self.heads:
                head.weight.copy_(weight)
                head.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = x.reshape(x.shape[0], -1)
        return torch.stack([head(x) for head in self.heads])


class LinearSweep:
    """Several linear heads (one per learning rate) trained on the same features in one pass.

    One SGD optimizer with one parameter group per head (lr = base lr × batch/256, momentum,
    weight decay) and one per-epoch cosine schedule; the summed per-head losses are backpropagated
    once — each head's gradient is exactly that of its own loss, so the result equals training each
    head alone on the same batches.
    """

    def __init__(self, dim: int, num_classes: int, lrs: Sequence[float], *, batch_size: int, epochs: int,
                 momentum: float = 0.9, weight_decay: float = 0.0, seed: int = 0,
                 device: torch.device | str = "cpu") -> None:
        self.lrs = [float(lr) for lr in lrs]
        self.scaled_lrs = [lr * batch_size / 256.0 for lr in self.lrs]
        self.num_classes = num_classes
        self.heads = LinearHeads(dim, num_classes, len(self.lrs), seed=seed).to(device)
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


# -- the loadable classifier (robustness stage) -----------------------------------------------------
class LinearClassifier(nn.Module):
    """Frozen backbone + trained linear head: images (normalised, ``crop`` px) → logits [B, C]."""

    def __init__(self, backbone: nn.Module, linear: nn.Linear, n_last_blocks: int,
                 avgpool_patchtokens: bool | int, meta: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.linear = linear
        self.n_last_blocks = int(n_last_blocks)
        self.avgpool_patchtokens = avgpool_patchtokens
        self.meta = dict(meta or {})
        self.classes = list(self.meta.get("classes") or [])

    def features(self, images: Tensor) -> Tensor:
        return linear_features(self.backbone, images, self.n_last_blocks, self.avgpool_patchtokens)

    def forward(self, images: Tensor) -> Tensor:
        return self.linear(self.features(images).float())


def load_linear_classifier(model_spec: Mapping[str, Any], checkpoint: str | Path | None,
                           checkpoint_key: str | None, head_path: str | Path) -> LinearClassifier:
    """Backbone weights + a ``head.pth`` written by the linear stage → classifier in eval mode.

    ``model_spec`` is ``{"arch", "patch_size", "depth"}`` (as for ``build_pretrained_backbone``);
    ``checkpoint``/``checkpoint_key`` are the backbone weights the head was trained on (``None``: the
    random-init backbone of the stage, rebuilt from ``meta['seed']``). The returned
    module maps normalised images to logits with the same feature function as training
    (``linear_features``); ``.meta`` holds the head's meta (``classes``, ``resize``, ``crop``, ...).
    Raises ``CheckpointError`` if the head does not fit the backbone.
    """
    saved = load_file(head_path)
    if not isinstance(saved, Mapping) or "state_dict" not in saved or "meta" not in saved:
        raise CheckpointError(f"linear head {head_path}: expected {{'state_dict', 'meta'}} "
                              f"(written by downstream.linear), got {type(saved).__name__}")
    meta, state = dict(saved["meta"]), saved["state_dict"]
    with torch.random.fork_rng(devices=[]):
        # without a checkpoint the backbone is the random init the head was trained on (seeded like the stage)
        torch.manual_seed(int(meta.get("seed", 0)))
        backbone = build_eval_backbone(model_spec, checkpoint, checkpoint_key, int(meta.get("crop", 224)))
    dim = backbone_feature_dim(backbone, int(meta["n_last_blocks"]), meta["avgpool_patchtokens"])
    weight, bias = state.get("weight"), state.get("bias")
    if weight is None or bias is None or tuple(weight.shape) != (int(meta["num_classes"]), dim):
        raise CheckpointError(
            f"linear head {head_path}: weight {None if weight is None else tuple(weight.shape)} does not fit "
            f"backbone {dict(model_spec)} (features {dim} = embed_dim {backbone.embed_dim} × "
            f"n_last_blocks {meta['n_last_blocks']}, avgpool {meta['avgpool_patchtokens']}; "
            f"{meta['num_classes']} classes)")
    linear = nn.Linear(dim, int(meta["num_classes"]))
    linear.load_state_dict({"weight": weight, "bias": bias})
    classifier = LinearClassifier(backbone, linear, int(meta["n_last_blocks"]), meta["avgpool_patchtokens"], meta)
    for param in classifier.parameters():
        param.requires_grad_(False)
    return classifier.eval()


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, from its config (the results join the paper's numbers only to the paper's
    protocol, e.g. ``cls(last 4),sgd,100ep,lr-sweep(45),256/224`` for ViT-S/16)."""
    n_last, mode = int(config["n_last_blocks"]), _avgpool_mode(config["avgpool_patchtokens"])
    feature = {0: f"cls(last {n_last})", 1: "avgpool", 2: f"cls(last {n_last})+avgpool"}[mode]
    lrs = len(config["lrs"] or OFFICIAL_LR_GRID)
    return f"{feature},sgd,{int(config['epochs'])}ep,lr-sweep({lrs}),{int(config['resize'])}/{int(config['crop'])}"


# -- the stage --------------------------------------------------------------------------------------
def _write_per_head(path: Path, rows: list[dict[str, Any]]) -> None:
    write_csv_atomic(path, rows, ["head", "lr", "scaled_lr", "epoch", "top1", "top5"])


def _head_names(lrs: Sequence[float]) -> list[str]:
    """TensorBoard name of each head: ``lr_<base lr>`` (``_<index>`` added if two heads share an lr)."""
    names = [f"lr_{lr:g}" for lr in lrs]
    return names if len(set(names)) == len(names) else [f"{n}_{i}" for i, n in enumerate(names)]


def run(config: Mapping[str, Any], model_spec: Mapping[str, Any], checkpoint: str | None,
        checkpoint_key: str | None, data: str, out: str, run: str, model: str, seed: int,
        tb_dir: str | None = None) -> dict[str, float]:
    """Stage entry (inside the launched job): train the sweep, pick the best head, write outputs.
    TensorBoard scalars go to ``tb_dir`` (default: ``tb/`` beside ``out``)."""
    init_distributed()
    started = time.time()
    out_path = Path(out)
    work = out_path.parent / "work"
    device = pick_device()
    seed_everything(seed)

    train_set = image_folder(data, "train", linear_train_transform(config["crop"], config["train_interpolation"]))
    val_set = image_folder(data, "val", eval_transform(config["resize"], config["crop"]))
    if train_set.classes != val_set.classes:
        raise ValueError(f"dataset {data}: train/ and val/ have different class folders")
    num_classes = len(train_set.classes)
    epochs, val_freq = int(config["epochs"]), max(1, int(config["val_freq"]))
    per_process = max(1, int(config["batch_size"]) // world_size())
    global_batch = per_process * world_size()
    lrs = list(config["lrs"] or OFFICIAL_LR_GRID)
    n_last, avgpool = int(config["n_last_blocks"]), config["avgpool_patchtokens"]

    torch.manual_seed(seed)  # a random-init backbone (no checkpoint) is rebuilt from meta['seed'] when loading
    backbone = build_eval_backbone(model_spec, checkpoint, checkpoint_key, int(config["crop"])).to(device)
    dim = backbone_feature_dim(backbone, n_last, avgpool)
    log(f"[linear] {len(train_set)} train / {len(val_set)} val images, {num_classes} classes; features {dim}; "
        f"{len(lrs)} heads; batch {global_batch}; {epochs} epochs; device {device}")

    def features_of(images: Tensor) -> Tensor:
        with torch.no_grad(), autocast(config["precision"], device):
            return linear_features(backbone, images, n_last, avgpool).float()

    sweep = LinearSweep(dim, num_classes, lrs, batch_size=global_batch, epochs=epochs,
                        momentum=float(config["momentum"]), weight_decay=float(config["weight_decay"]), seed=seed,
                        device=device)
    train_loader = make_loader(train_set, per_process, shuffle=True, seed=seed, num_workers=int(config["num_workers"]))
    val_loader = make_loader(val_set, per_process, shuffle=False, num_workers=int(config["num_workers"]))

    # -- resume (only work made for this exact setup: ibot.workdir) ------------------------------------
    work = prepare_stage_work("linear", work, config=config, model_spec=model_spec, checkpoint=checkpoint,
                              data={"imagenet": data}, seed=seed)
    state_file = work.path / "linear_state.pth"
    start_epoch, history, best = 0, [], {"top1": -1.0}
    if state_file.is_file():
        state = load_file(state_file, map_location=device)
        sweep.load_state_dict(state["sweep"])
        start_epoch, history, best = int(state["epoch"]), list(state["history"]), dict(state["best"])
        log(f"[linear] resuming from {state_file} after epoch {start_epoch}")
    tb = ScalarWriter(tb_dir or out_path.parent / "tb", resume_step=start_epoch + 1)
    names = _head_names(lrs)

    val_cache: list[tuple[Tensor, Tensor, Tensor]] | None = None
    for epoch in range(start_epoch, epochs):
        train_loader.sampler.set_epoch(epoch)
        seed_everything(seed + 1000 * epoch + rank())
        losses = torch.zeros(len(lrs), device=device)
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
            for head, lr in enumerate(lrs):
                top1, top5 = float(accuracy[head, 0]), float(accuracy[head, 1])
                history.append({"head": head, "lr": lr, "scaled_lr": sweep.scaled_lrs[head], "epoch": epoch + 1,
                                "top1": top1, "top5": top5 if num_classes >= 5 else ""})
                if top1 >= best["top1"]:
                    best = {"top1": top1, "top5": top5, "head": head, "lr": lr, "scaled_lr": sweep.scaled_lrs[head],
                            "epoch": epoch + 1, "state_dict": sweep.head_state(head)}
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
            save_atomic({"fingerprint": work.digest, "epoch": epoch + 1, "sweep": sweep.state_dict(),
                         "history": history, "best": best}, state_file)
        barrier()
    tb.close()

    metrics: dict[str, float] = {}
    if is_main():
        metrics = {"top1": best["top1"]}
        if num_classes >= 5:
            metrics["top5"] = best["top5"]
        _write_per_head(out_path.parent / "per_head.csv", history)
        meta = {"n_last_blocks": n_last, "avgpool_patchtokens": avgpool, "num_classes": num_classes,
                "lr": best["lr"], "scaled_lr": best["scaled_lr"], "epoch": best["epoch"], "top1": best["top1"],
                "top5": best["top5"] if num_classes >= 5 else None, "classes": list(train_set.classes),
                "resize": int(config["resize"]), "crop": int(config["crop"]), "interpolation": "bicubic",
                "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "feature_dim": dim,
                "model_spec": dict(model_spec), "seed": seed, "protocol": protocol_label(config)}
        save_atomic({"state_dict": best["state_dict"], "meta": meta}, out_path.parent / "head.pth")
        per_head = {}
        for row in history:
            entry = per_head.setdefault(str(row["lr"]), {"lr": row["lr"], "best_top1": -1.0, "best_epoch": None})
            if row["top1"] >= entry["best_top1"]:
                entry.update(best_top1=row["top1"], best_epoch=row["epoch"])
            entry["last_top1"] = row["top1"]
        write_metrics(
            out, run=run, model=model, stage="linear", task="linear", dataset=dataset_label(data, num_classes),
            protocol=protocol_label(config), metrics=metrics, config=config,
            wall_time_s=time.time() - started, checkpoint=checkpoint,
            extra={"fingerprint": work.digest, "best_lr": best["lr"], "best_scaled_lr": best["scaled_lr"], "best_epoch": best["epoch"],
                   "best_head": best["head"], "global_batch": global_batch, "feature_dim": dim,
                   "num_classes": num_classes, "num_train": len(train_set), "num_val": len(val_set),
                   "per_head": list(per_head.values()), "per_head_csv": "per_head.csv", "head": "head.pth"})
        log(f"[linear] best top-1 {best['top1']:.2f} (lr {best['lr']:g}, epoch {best['epoch']}); wrote {out_path}")
    barrier()
    return metrics


def _val_hits(sweep: LinearSweep, cache: list[tuple[Tensor, Tensor, Tensor]], num_samples: int) -> Tensor:
    """Per-sample top-1/top-5 hits of every head over the whole val set, [N, H, 2] (exact under DDP)."""
    rows = [sweep.correct(features, targets) for features, targets, _ in cache]
    index = torch.cat([i for _, _, i in cache])
    return gather_correct(torch.cat(rows), index, num_samples)


def main(argv: Sequence[str] | None = None) -> Any:
    return stage_main("linear", "downstream.linear:run", DEFAULTS, argv,
                      description="Linear probing on frozen features with a one-pass learning-rate sweep.")


if __name__ == "__main__":
    main()
