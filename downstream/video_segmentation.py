"""DAVIS-2017 video object segmentation by label propagation on frozen patch features (paper Tab.16).

Official protocol: ``evaluation/eval_video_segmentation.py`` of bytedance/ibot at da316d8 (copied from
DINO), followed step by step; line numbers below are that file's.

- Frames (:188-212): read with OpenCV, resized (bilinear, ``cv2.resize``) so that the shorter side is
  ``scale_size`` (480) and the longer one is floored to a multiple of 64 (854x480 → 832x480), RGB in
  [0, 1], normalised with mean (0.485, 0.456, 0.406) and std (0.228, 0.224, 0.225) (:235, note 0.228).
- Features (:144-154): the last block's tokens after the final norm (``get_intermediate_layers(n=1)``),
  [CLS] dropped: one ``dim``-vector per patch; L2-normalised over ``dim`` when compared (:116-117).
- First frame (:215-232): its annotation resized (nearest) to the patch grid and one-hot over ids
  0..max (:167-179); it stays in the context of every frame.
- Propagation (:104-141) to frame t from the first frame and the ``n_last_frames`` (7) previous
  frames' propagated soft labels (a queue, :36-62): affinity ``exp(<f_t, f_s> / temperature)`` (0.1,
  :120), restricted to sources within ``size_mask_neighborhood`` (12) patches in both directions
  (:76-90, :122-126), only each target patch's ``topk`` (5) largest over all context frames kept
  (:128-131), normalised per target patch (:133); the labels are the affinity-weighted sum (:135-140).
- Output (:64-73): the soft labels upsampled ×patch_size (bilinear), each channel min-max normalised
  (:93-101), argmax, resized (nearest) to the original frame size and written as a palette PNG. As
  there, a channel that is constant and positive over the frame normalises to 0/0 = NaN and wins every
  pixel (followed, not repaired: it is what produced the paper's numbers; :func:`labels_to_mask`).

Metrics: the DAVIS 2017 semi-supervised evaluation (:mod:`downstream.davis_metrics`, a port of the
official ``davis2017-evaluation``): J and F per object, mean over frames but the first and last,
then J mean, F mean and J&F mean over the objects, in percent, each with its bootstrap interval over the
objects and its baseline: the first annotation repeated in every frame (its void pixels, 255, as
background: the evaluation reads ground-truth void so), also in ``extra.first_frame_copy``.

Deviation, only for square frames: the official code sizes the frame (:194-202) and the first
annotation (:218-226) by two different rules when height == width; here both use the frame's. A
predicted void label (propagated from void pixels of a first annotation) is scored as background where
the official evaluation stops (:mod:`downstream.davis_metrics`).
"""

from __future__ import annotations

from collections import deque
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from downstream.davis_metrics import VOID, evaluate_sequence, summarize, summary_evidence
from downstream.engine.setup import autocast, build_eval_backbone, log, pick_device
from ibot.data.layouts import check_layout
from ibot.distributed import is_main
from ibot.run.context import StageContext

__all__ = ["DAVIS_MEAN", "DAVIS_STD", "protocol_label", "target_size", "read_frame", "read_first_seg",
           "neighborhood_mask", "label_propagation", "labels_to_mask", "segment_video", "video_list", "run"]

#: color_normalize (:235); the std's 0.228 differs from ImageNet's 0.229 in the official code too.
DAVIS_MEAN = (0.485, 0.456, 0.406)
DAVIS_STD = (0.228, 0.224, 0.225)
#: DAVIS-2017 val has 30 sequences; a folder listing that many is labelled as the paper's dataset.
DAVIS_2017_VAL_SEQUENCES = 30


def protocol_label(config: Mapping[str, Any]) -> str:
    """What this run is, e.g. the paper's
    ``label-propagation,last-layer,480px,n_last_frames=7,nbhd=12,topk=5,T=0.1``."""
    return (f"label-propagation,last-layer,{int(config['scale_size'])}px,"
            f"n_last_frames={int(config['n_last_frames'])},nbhd={int(config['size_mask_neighborhood'])},"
            f"topk={int(config['topk'])},T={float(config['temperature']):g}")


def target_size(height: int, width: int, scale_size: int) -> tuple[int, int]:
    """(th, tw) of read_frame (:194-202): shorter side ``scale_size``, longer floored to a multiple of 64."""
    if height > width:
        return int(((scale_size * height / width) // 64) * 64), scale_size
    return scale_size, int(((scale_size * width / height) // 64) * 64)


def read_frame(path: str | Path, scale_size: int) -> tuple[Tensor, int, int]:
    """[3, th, tw] normalised frame and the original (height, width) (read_frame, :188-212)."""
    import cv2

    image = cv2.imread(str(path))
    if image is None:
        raise FileNotFoundError(f"cannot read frame {path}")
    ori_h, ori_w = image.shape[:2]
    th, tw = target_size(ori_h, ori_w, scale_size)
    image = cv2.resize(image, (tw, th)).astype(np.float32) / 255.0
    tensor = torch.from_numpy(np.ascontiguousarray(image[:, :, ::-1].transpose(2, 0, 1)))  # BGR -> RGB, CHW
    mean, std = torch.tensor(DAVIS_MEAN).view(3, 1, 1), torch.tensor(DAVIS_STD).view(3, 1, 1)
    return (tensor - mean) / std, ori_h, ori_w


def read_first_seg(path: str | Path, grid: tuple[int, int]) -> tuple[Tensor, np.ndarray]:
    """One-hot [1, C, h, w] of the annotation resized (nearest) to the patch ``grid`` (h, w), C = max id + 1,
    and the annotation at full size (read_seg + to_one_hot, :215-232, :167-179)."""
    seg = Image.open(path)
    full = np.asarray(seg)
    small = torch.from_numpy(np.asarray(seg.resize((grid[1], grid[0]), Image.Resampling.NEAREST)).astype(np.int64))
    one_hot = F.one_hot(small, int(small.max()) + 1).permute(2, 0, 1).float()
    return one_hot.unsqueeze(0), full


def neighborhood_mask(h: int, w: int, size: int) -> Tensor:
    """[h*w (target), h*w (source)] 0/1: source within ``size`` patches in both directions (:76-90)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    rows, cols = rows.reshape(-1), cols.reshape(-1)
    near = ((rows[:, None] - rows[None, :]).abs() <= size) & ((cols[:, None] - cols[None, :]).abs() <= size)
    return near.float()


def label_propagation(feat_tar: Tensor, feat_sources: Sequence[Tensor], segs: Sequence[Tensor], h: int, w: int, *,
                      topk: int, temperature: float, mask: Tensor | None) -> Tensor:
    """Soft labels [1, C, h, w] of the target frame from its context frames (label_propagation, :104-141).

    ``feat_tar`` [h*w, dim] and ``feat_sources`` [h*w, dim] each (raw; L2-normalised here), ``segs`` the
    context frames' [1, C, h, w] (soft) labels, ``mask`` :func:`neighborhood_mask` or None (no restriction).
    """
    ncontext = len(feat_sources)
    tar = F.normalize(feat_tar, dim=1, p=2)
    sources = F.normalize(torch.stack(list(feat_sources)), dim=2, p=2)  # ncontext x h*w x dim
    aff = torch.exp(torch.bmm(tar.unsqueeze(0).expand(ncontext, -1, -1), sources.transpose(1, 2)) / temperature)
    if mask is not None:  # ncontext x h*w (target) x h*w (source)
        aff = aff * mask.unsqueeze(0)
    aff = aff.transpose(2, 1).reshape(-1, h * w)  # ncontext*h*w (sources) x h*w (targets)
    tk_val_min = torch.topk(aff, dim=0, k=topk).values.min(dim=0).values
    aff[aff < tk_val_min] = 0  # ties at the k-th value are kept, as in the official code
    aff = aff / aff.sum(dim=0, keepdim=True)
    seg = torch.cat(list(segs))  # ncontext x C x h x w
    channels = seg.shape[1]
    seg = seg.reshape(ncontext, channels, -1).transpose(2, 1).reshape(-1, channels).T  # C x ncontext*h*w
    return (seg @ aff).reshape(1, channels, h, w)


def labels_to_mask(soft: Tensor, patch_size: int, size: tuple[int, int]) -> np.ndarray:
    """Label map (uint8, original ``size`` (height, width)) of soft labels [1, C, h, w] (:64-71):
    bilinear ×patch_size, per-channel min-max normalisation (norm_mask, :93-101), argmax, nearest resize.

    As norm_mask, channels with max <= 0 are left as they are and a constant positive channel becomes
    0/0 = NaN, which ``torch.max`` returns over any number: every pixel then takes the first such channel.
    Soft labels sum to 1 per pixel, so a constant channel of 1 is the only label anyway; a constant one
    below 1 wins too, as in the official code (followed so that the paper's numbers are reproducible).
    """
    up = F.interpolate(soft, scale_factor=patch_size, mode="bilinear", align_corners=False,
                       recompute_scale_factor=False)[0]
    positive = up.amax(dim=(1, 2), keepdim=True) > 0
    shifted = up - up.amin(dim=(1, 2), keepdim=True)
    up = torch.where(positive, shifted / shifted.amax(dim=(1, 2), keepdim=True), up)
    labels = torch.max(up, dim=0).indices.to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((size[1], size[0]), Image.Resampling.NEAREST))


def _patch_features(backbone: torch.nn.Module, frame: Tensor, patch_size: int) -> tuple[Tensor, int, int]:
    """[h*w, dim] last-layer patch tokens of one frame (extract_feature, :144-154)."""
    tokens = backbone.get_intermediate_layers(frame.unsqueeze(0), n=1)[0][0, 1:]  # [CLS] dropped
    return tokens.float(), frame.shape[1] // patch_size, frame.shape[2] // patch_size


@torch.no_grad()
def segment_video(backbone: torch.nn.Module, frames: Sequence[Path], first_annotation: Path,
                  config: Mapping[str, Any], patch_size: int, device: torch.device) -> list[np.ndarray]:
    """Label maps of every frame (the first = its annotation) (eval_video_tracking_davis, :29-73)."""
    scale = int(config["scale_size"])

    def features(path: Path) -> tuple[Tensor, int, int, int, int]:
        frame, ori_h, ori_w = read_frame(path, scale)
        with autocast(config["precision"], device):
            feat, h, w = _patch_features(backbone, frame.to(device), patch_size)
        return feat, h, w, ori_h, ori_w

    first_feat, h, w, _, _ = features(frames[0])
    first_seg, first_full = read_first_seg(first_annotation, (h, w))
    first_seg = first_seg.to(device)
    size = int(config["size_mask_neighborhood"])
    mask = neighborhood_mask(h, w, size).to(device) if size > 0 else None
    queue: deque[tuple[Tensor, Tensor]] = deque(maxlen=int(config["n_last_frames"]))  # oldest dropped (:58-62)
    outputs = [np.asarray(first_full)]
    for path in frames[1:]:
        feat, fh, fw, ori_h, ori_w = features(path)
        if (fh, fw) != (h, w):
            raise ValueError(f"{path}: frame size differs from the video's first frame")
        soft = label_propagation(feat, [first_feat] + [f for f, _ in queue], [first_seg] + [s for _, s in queue], h, w,
                                 topk=int(config["topk"]), temperature=float(config["temperature"]), mask=mask)
        queue.append((feat, soft))
        outputs.append(labels_to_mask(soft, patch_size, (ori_h, ori_w)))
    return outputs


def video_list(data: str | Path) -> list[str]:
    """The sequences of ``ImageSets/2017/val.txt`` (:279)."""
    return [line.strip() for line in (Path(data) / "ImageSets" / "2017" / "val.txt").read_text().splitlines()
            if line.strip()]


def _save_indexed(path: Path, labels: np.ndarray, palette: list[int] | None) -> None:
    """imwrite_indexed (:157-164): a palette PNG, written atomically."""
    from ibot.io import atomic_write

    image = Image.fromarray(labels)
    if palette is not None:
        image.putpalette(palette)
    with atomic_write(path, "wb") as handle:
        image.save(handle, format="PNG")


def run(ctx: StageContext) -> dict[str, float]:
    """Propagate every val video's first annotation, score, write metrics.json (main process)."""
    config, root, device = ctx.config, ctx.data_root, pick_device()
    check_layout("davis", root, config_key="data.davis")  # seconds, before the backbone is built
    videos = video_list(root)
    torch.manual_seed(ctx.seed)
    patch_size = ctx.model.patch_size
    backbone = build_eval_backbone(ctx.model, ctx.checkpoint, 224).to(device)
    metrics: dict[str, float] = {}
    if is_main():
        log(f"[video_segmentation] {len(videos)} videos of {root}; {protocol_label(config)}; device {device}")
        per_object, baseline = {}, {}
        masks_dir = ctx.dir / "segmentations"
        for video in videos:
            frames = sorted((root / "JPEGImages" / "480p" / video).glob("*.jpg"))
            annotations = sorted((root / "Annotations" / "480p" / video).glob("*.png"))
            predicted = segment_video(backbone, frames, root / "Annotations" / "480p" / video / f"{frames[0].stem}.png",
                                      config, patch_size, device)
            by_name = {frame.stem: labels for frame, labels in zip(frames, predicted)}
            missing = [a.name for a in annotations if a.stem not in by_name]
            if missing:
                raise ValueError(f"{root / 'Annotations' / '480p' / video}: annotations {missing[:3]} have no frame")
            gt = [np.asarray(Image.open(a)) for a in annotations]
            if config["save_masks"]:
                palette = Image.open(annotations[0]).getpalette()
                for frame, labels in zip(frames, predicted):
                    _save_indexed(masks_dir / video / f"{frame.stem}.png", labels, palette)
            j, f = evaluate_sequence(gt, [by_name[a.stem] for a in annotations], float(config["bound_th"]))
            first_copy = np.where(gt[0] == VOID, 0, gt[0])  # void is background to the evaluation (davis.py)
            j0, f0 = evaluate_sequence(gt, [first_copy] * len(gt), float(config["bound_th"]))
            for k in range(len(j)):
                per_object[f"{video}_{k + 1}"] = (float(j[k]), float(f[k]))
                baseline[f"{video}_{k + 1}"] = (float(j0[k]), float(f0[k]))
            log(f"[video_segmentation] {video}: {len(frames)} frames, {len(j)} objects, J {100 * j.mean():.1f} "
                f"F {100 * f.mean():.1f} (first-frame copy J {100 * j0.mean():.1f} F {100 * f0.mean():.1f})")
        metrics = summarize(per_object)
        trivial = summarize(baseline)
        intervals, baselines = summary_evidence(per_object, baseline)
        log(f"[video_segmentation] J&F {metrics['jf_mean']:.2f}, J {metrics['j_mean']:.2f}, F {metrics['f_mean']:.2f} "
            f"(first-frame copy J&F {trivial['jf_mean']:.2f})")
        dataset = "davis-2017-val" if len(videos) == DAVIS_2017_VAL_SEQUENCES else root.resolve().name
        ctx.write_metrics(
            task="video_seg", dataset=dataset, protocol=protocol_label(config), metrics=metrics,
            intervals=intervals, baselines=baselines,
            extra={"num_videos": len(videos), "num_objects": len(per_object), "patch_size": patch_size,
                   "per_object": {name: {"J": 100 * jf[0], "F": 100 * jf[1]} for name, jf in per_object.items()},
                   "first_frame_copy": trivial,
                   "evaluation": "DAVIS 2017 semi-supervised (davis2017-evaluation port): first and last frame "
                                 "excluded, per-object means, percent",
                   "segmentations": str(masks_dir) if config["save_masks"] else None})
    return metrics
