"""Image retrieval on Revisited Oxford 5k and Paris 6k with frozen [CLS] features (paper Tab.16).

Official protocol: bytedance/ibot@da316d8 ``evaluation/eval_image_retrieval.py`` (DINO's script) as
``run.sh paris_oxford_reid`` calls it (run.sh:450-476: ``--imsize 512 --multiscale 1``,
``AVGPOOL=0`` for ViT-S, run.sh:49-58), once per dataset; this stage evaluates both datasets in one job.

- Images (:29-68): the whole image (database and query alike: the official dataset ignores the query
  ``bbx``), ``img.thumbnail((imsize, imsize), ANTIALIAS)`` (the longer side down to ``imsize``, aspect
  kept, never enlarged), ``ToTensor`` + ImageNet ``Normalize`` (:110-113), batch size 1 (:117-131).
  ``batch_size_per_gpu`` > 1 batches images of equal size (same features, faster; single process only).
  ``query_crop: true`` crops queries to their ``bbx`` first, as revisitop's own protocol does (not the
  paper's: off by default).
- Feature (eval_knn.py:141-174, n_last_blocks 1, avgpool 0): the final-norm [CLS] token; with
  ``multiscale`` the image is also resized by 1/sqrt(2) and 1/2 (bilinear, ``align_corners=False``),
  the three features averaged and L2-normalised. The ViT's patch embedding drops pixels beyond the last
  whole patch (its stride-16 convolution); ours asserts divisibility, so the same rows/columns are
  cropped explicitly (:func:`patch_crop`), which gives the identical tokens.
- Ranking (:189-197): features L2-normalised, cosine similarity, database sorted by decreasing similarity.
- Scores (:201-221): revisitop's ``compute_map`` (utils.py:787-891) for the Medium protocol (positives
  easy+hard, junk ignored) and the Hard protocol (positives hard, junk+easy ignored), mAP and mP@k for
  k in 1, 5, 10, in percent.
- Evidence (:func:`ranking_evidence`): each metric's percentile-bootstrap interval over the queries
  (their per-query AP / precision@k) and its baseline, the expected score of a random ranking (the mean
  over :data:`RANDOM_RANKINGS` random permutations of the database per query, same scoring code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from downstream.engine.data import IMAGENET_MEAN, IMAGENET_STD, make_loader
from downstream.engine.features import extract_features
from downstream.engine.setup import build_eval_backbone, log, pick_device
from ibot.data.revisitop import DATASETS, gnd_path, image_path, load_gnd, validate_gnd
from ibot.distributed import is_main, world_size
from ibot.run.context import StageContext
from ibot.uncertainty import baseline, bootstrap

__all__ = ["KS", "SCALES", "PROTOCOLS", "RevisitopImages", "protocol_label", "dataset_name",
           "protocol_gnd", "compute_ap", "compute_map", "size_batches", "image_loader", "patch_crop",
           "retrieval_feature", "rank_database", "evaluate_ranks", "ranking_evidence", "run"]

#: The k of mP@k (eval_image_retrieval.py:203).
KS: tuple[int, ...] = (1, 5, 10)
#: Scales of the multiscale feature (eval_knn.py:160).
SCALES: tuple[float, ...] = (1.0, 1 / 2 ** 0.5, 0.5)
#: The two revisitop protocols scored by the official script (:204-219).
PROTOCOLS: tuple[str, ...] = ("medium", "hard")
#: Database / query sizes of the real sets (revisitop): they name the dataset in metrics.json.
_REAL_SIZES = {"roxford5k": (4993, 70), "rparis6k": (6322, 70)}


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, e.g. the paper's ``cls,thumbnail=512,multiscale,full-query``."""
    scales = "multiscale" if config["multiscale"] else "singlescale"
    query = "bbx-query" if config["query_crop"] else "full-query"
    return f"cls,thumbnail={int(config['imsize'])},{scales},{query}"


def dataset_name(data: str | Path, sizes: Mapping[str, tuple[int, int]]) -> str:
    """``roxford5k+rparis6k`` for the real sets (their image counts), else the data folder's name."""
    if all(sizes.get(name) == real for name, real in _REAL_SIZES.items()):
        return "+".join(DATASETS)
    return Path(data).resolve().name


# -- data ------------------------------------------------------------------------------------------
class RevisitopImages(Dataset):
    """The database (``imlist``) or query (``qimlist``) images of one set, as the official dataset
    loads them (eval_image_retrieval.py:57-68); items are ``(image, index, index)`` (the index doubles
    as the label :func:`downstream.engine.features.extract_features` requires)."""

    def __init__(self, root: str | Path, dataset: str, cfg: Mapping[str, Any], split: str, imsize: int,
                 query_crop: bool = False) -> None:
        from torchvision import transforms
        if split not in ("database", "query"):
            raise ValueError(f"split {split!r}: expected 'database' or 'query'")
        self.names = list(cfg["qimlist"] if split == "query" else cfg["imlist"])
        self.boxes = [entry["bbx"] for entry in cfg["gnd"]] if split == "query" and query_crop else None
        self.paths = [image_path(root, dataset, name) for name in self.names]
        self.imsize = int(imsize)
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def __len__(self) -> int:
        return len(self.paths)

    def size_keys(self) -> list[tuple[Any, ...]]:
        """Per image what fixes its tensor size: the stored size (read from the header only) and the
        query box; images with equal keys can share a batch."""
        from PIL import Image
        keys = []
        for index, path in enumerate(self.paths):
            with Image.open(path) as image:
                size = image.size
            keys.append((size, tuple(self.boxes[index]) if self.boxes is not None else None))
        return keys

    def __getitem__(self, index: int) -> tuple[Tensor, int, int]:
        from PIL import Image, ImageFile
        ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the official loader (:59)
        with open(self.paths[index], "rb") as f:
            image = Image.open(f).convert("RGB")
        if self.boxes is not None:  # revisitop's query crop (its example code: im.crop(bbx))
            image = image.crop(tuple(float(v) for v in self.boxes[index]))
        image.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)  # ANTIALIAS = LANCZOS (:64)
        return self.transform(image), index, index


def size_batches(keys: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Batches of indices whose images have the same size key (dataset order within a key). The official
    batch is 1 (:117-131); in eval mode a ViT treats every sample of a batch independently, so batching
    equal-sized images changes the speed, not the features."""
    groups: dict[Any, list[int]] = {}
    for index, key in enumerate(keys):
        groups.setdefault(key, []).append(index)
    return [members[i:i + batch_size] for members in groups.values() for i in range(0, len(members), batch_size)]


def image_loader(images: RevisitopImages, batch_size: int, num_workers: int) -> DataLoader:
    """Batch size 1 as the official script (and under DDP: the padded DistributedSampler shards);
    otherwise batches of equal-sized images (:func:`size_batches`)."""
    if batch_size == 1 or world_size() > 1:
        return make_loader(images, 1, shuffle=False, num_workers=num_workers)
    return DataLoader(images, batch_sampler=size_batches(images.size_keys(), batch_size), num_workers=num_workers)


# -- features --------------------------------------------------------------------------------------
def patch_crop(images: Tensor, patch_size: int) -> Tensor:
    """Drop the rows/columns past the last whole patch: the tokens the official stride-``patch_size``
    patch-embedding convolution produces from the uncropped image."""
    height, width = (images.shape[-2] // patch_size) * patch_size, (images.shape[-1] // patch_size) * patch_size
    if not height or not width:
        raise ValueError(f"image of {tuple(images.shape[-2:])} px is smaller than one {patch_size}-px patch")
    return images[..., :height, :width]


def retrieval_feature(backbone: nn.Module, images: Tensor, multiscale: bool) -> Tensor:
    """Final-norm [CLS] feature of ``images`` [B,3,H,W]; the L2-normalised mean over :data:`SCALES`
    when ``multiscale`` (eval_knn.py:158-172; the official batch is 1, its ``v.norm()`` per image)."""
    patch = int(backbone.patch_size)

    def single(x: Tensor) -> Tensor:
        return backbone(patch_crop(x, patch))[:, 0]

    if not multiscale:
        return single(images)
    total = None
    for scale in SCALES:
        x = images if scale == 1 else nn.functional.interpolate(images, scale_factor=scale, mode="bilinear",
                                                                 align_corners=False)
        feats = single(x)
        total = feats if total is None else total + feats
    total = total / len(SCALES)
    return total / total.norm(dim=-1, keepdim=True)


# -- scoring (revisitop's compute_map) -------------------------------------------------------------
def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per query ``ok`` (positives) and ``junk`` (ignored) of a protocol (eval_image_retrieval.py:205-218):
    medium: ok = easy + hard, junk = junk; hard: ok = hard, junk = junk + easy."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    out = []
    for entry in gnd:
        easy, hard, junk = (np.asarray(entry[k], dtype=np.int64).ravel() for k in ("easy", "hard", "junk"))
        if protocol == "medium":
            out.append({"ok": np.concatenate([easy, hard]), "junk": junk})
        else:
            out.append({"ok": hard, "junk": np.concatenate([junk, easy])})
    return out


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Average precision from the 0-based ranks of the positives (junk removed), trapezoids in the
    precision-recall plot (utils.py:787-819)."""
    ranks = np.asarray(ranks, dtype=np.float64)
    j = np.arange(len(ranks), dtype=np.float64)
    precision_0 = np.where(ranks == 0, 1.0, j / np.maximum(ranks, 1))
    precision_1 = (j + 1) / (ranks + 1)
    return float(np.sum((precision_0 + precision_1) / 2.0) / nres)


def compute_map(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], kappas: Sequence[int] = ()
                ) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """revisitop's ``compute_map`` (utils.py:822-891): ``ranks`` [database, queries] (database indices
    in ranked order per query), ``gnd`` per query ``ok``/``junk``. Returns mAP, per-query AP, mean
    precision at ``kappas`` and per-query precisions (fractions). A query without positives is left
    out (NaN rows); junk images are removed from the ranking, not counted as negatives."""
    ranks = np.asarray(ranks)
    nq = len(gnd)
    if ranks.ndim != 2 or ranks.shape[1] != nq:
        raise ValueError(f"ranks {ranks.shape}: expected [database, {nq} queries]")
    aps = np.full(nq, np.nan)
    prs = np.full((nq, len(kappas)), np.nan)
    for i in range(nq):
        ok = np.asarray(gnd[i]["ok"]).ravel()
        if not len(ok):
            continue  # no positive: excluded from the average (:847-852)
        junk = np.asarray(gnd[i].get("junk", ())).ravel()
        pos = np.flatnonzero(np.isin(ranks[:, i], ok))
        junk_pos = np.flatnonzero(np.isin(ranks[:, i], junk))
        pos = pos - np.searchsorted(junk_pos, pos)  # each positive moves up by the junk ranked above it (:865-874)
        aps[i] = compute_ap(pos, len(ok))
        pos1 = pos + 1  # 1-based
        for j, k in enumerate(kappas):
            kq = min(int(pos1.max()), int(k))  # the official min(max(pos), k) (:884)
            prs[i, j] = float((pos1 <= kq).sum()) / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        raise ValueError("compute_map: no query has a positive image; the mean is undefined")
    return float(aps[valid].mean()), aps, prs[valid].mean(axis=0), prs


def rank_database(database: Tensor, queries: Tensor) -> np.ndarray:
    """[database, queries] database indices by decreasing cosine similarity (eval_image_retrieval.py:190-197);
    stable sort, so ties keep database order."""
    database = nn.functional.normalize(database.float(), dim=1, p=2)
    queries = nn.functional.normalize(queries.float(), dim=1, p=2)
    sim = (database @ queries.T).numpy()
    return np.argsort(-sim, axis=0, kind="stable")


def evaluate_ranks(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], prefix: str) -> dict[str, float]:
    """``<prefix>_{medium,hard}_map`` and ``_mp<k>`` (mP@k) metrics in percent (eval_image_retrieval.py:211-221)."""
    metrics: dict[str, float] = {}
    for protocol in PROTOCOLS:
        mean_ap, _, mean_pr, _ = compute_map(ranks, protocol_gnd(gnd, protocol), KS)
        metrics[f"{prefix}_{protocol}_map"] = 100.0 * mean_ap
        for k, value in zip(KS, mean_pr):
            metrics[f"{prefix}_{protocol}_mp{k}"] = 100.0 * float(value)
    return metrics


#: Random rankings whose mean score is the baseline (its Monte-Carlo error is below 1/10 of the spread
#: of one random ranking's mAP).
RANDOM_RANKINGS = 100


def ranking_evidence(ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], prefix: str,
                     rankings: int = RANDOM_RANKINGS, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(intervals, baselines)`` of :func:`evaluate_ranks`' metrics (percent).

    Interval: percentile bootstrap over the scored queries (those with a positive) of the mean of their
    AP / precision@k. Baseline: what a model that learned nothing scores, a random ranking: the mean over
    ``rankings`` independent uniform permutations of the database per query, scored by :func:`compute_map`.
    """
    ranks = np.asarray(ranks)
    rng = np.random.default_rng(seed)
    shuffled = [rng.permuted(np.broadcast_to(np.arange(ranks.shape[0])[:, None], ranks.shape), axis=0)
                for _ in range(rankings)]
    intervals: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    for protocol in PROTOCOLS:
        positives = protocol_gnd(gnd, protocol)
        _, aps, _, prs = compute_map(ranks, positives, KS)
        names = [f"{prefix}_{protocol}_map", *(f"{prefix}_{protocol}_mp{k}" for k in KS)]
        scored = np.column_stack([aps, prs])[~np.isnan(aps)]  # [query, (AP, P@k...)]
        if len(scored) > 1:
            intervals.update(bootstrap(lambda rows: dict(zip(names, 100.0 * rows.mean(axis=0))), scored))
        random = np.mean([[mean_ap, *mean_pr] for mean_ap, _, mean_pr, _ in
                          (compute_map(r, positives, KS) for r in shuffled)], axis=0)
        baselines.update({name: baseline(100.0 * value, f"random ranking (mean of {rankings})")
                          for name, value in zip(names, random)})
    return intervals, baselines


# -- stage -----------------------------------------------------------------------------------------
def _load_sets(data: str, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Every set's ground truth, checked before any image is read (clear error naming the file)."""
    cfgs = {}
    for name in names:
        path = gnd_path(data, name)
        if not path.is_file():
            raise FileNotFoundError(f"retrieval: {path} not found (expected the revisitop layout "
                                    f"<root>/<dataset>/gnd_<dataset>.pkl + <root>/<dataset>/jpg/)")
        cfg = load_gnd(path)
        validate_gnd(cfg, str(path))
        cfgs[name] = cfg
    return cfgs


def run(ctx: StageContext) -> dict[str, float]:
    """Rank each set's database for its queries, score, write metrics.json."""
    config, data = ctx.config, str(ctx.data_root)
    names = list(config["datasets"])
    cfgs = _load_sets(data, names)
    device = pick_device()
    torch.manual_seed(ctx.seed)
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, int(config["imsize"])).to(device)
    multiscale = bool(config["multiscale"])

    def feature(images: Tensor) -> Tensor:
        return retrieval_feature(backbone, images, multiscale)

    metrics: dict[str, float] = {}
    intervals: dict[str, Any] = {}
    baselines: dict[str, Any] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for name in names:
        cfg = cfgs[name]
        feats = {}
        for split in ("database", "query"):
            images = RevisitopImages(data, name, cfg, split, int(config["imsize"]), bool(config["query_crop"]))
            loader = image_loader(images, int(config["batch_size_per_gpu"]), int(config["num_workers"]))
            feats[split], _ = extract_features(feature, loader, len(images), device=device,
                                               precision=config["precision"], desc=f"retrieval {name} {split}")
        sizes[name] = (len(cfg["imlist"]), len(cfg["qimlist"]))
        if is_main():
            ranks = rank_database(feats["database"], feats["query"])
            ours = evaluate_ranks(ranks, cfg["gnd"], name)
            metrics.update(ours)
            found = ranking_evidence(ranks, cfg["gnd"], name)
            intervals.update(found[0])
            baselines.update(found[1])
            log(f"[retrieval] {name}: {sizes[name][0]} database / {sizes[name][1]} query images; mAP medium "
                f"{ours[f'{name}_medium_map']:.2f}, hard {ours[f'{name}_hard_map']:.2f}")
    ctx.write_metrics(
        task="retrieval", dataset=dataset_name(data, sizes), protocol=protocol_label(config), metrics=metrics,
        intervals=intervals, baselines=baselines,
        extra={"sets": {name: {"database": db, "queries": nq} for name, (db, nq) in sizes.items()},
               "ks": list(KS), "scales": list(SCALES) if multiscale else [1.0],
               "scoring": "revisitop compute_map (utils.py:822-891); medium: ok=easy+hard, junk=junk; "
                          "hard: ok=hard, junk=junk+easy; queries without positives excluded"})
    return metrics
