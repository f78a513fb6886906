"""Images/s of the pretraining input pipeline: the official PIL path vs the batched one.

What a DataLoader worker does per image for iBOT pretraining with the paper's ViT-S/16 crops (2x224
global + 10x96 local, block masks): decode the JPEG, draw the crops, augment, mask. Measured through
the real ``MultiCropMaskedDataset`` + ``DataLoader`` the trainer uses, on JPEGs the script writes
(ImageNet-like: 500x375 at quality 90 by default, ``photo_like`` content, ~75 kB each), for:

* ``official``: the official PIL transforms (``DataAugmentationIBOT``), one crop at a time;
* ``fast``: same draws, decoded by libjpeg-turbo into a tensor (or with DCT scaling where every crop
  allows it), crops resized as uint8 tensors, photometric operations with OpenCV's uint8 kernels in
  the worker; the batch leaves as uint8 (4x fewer bytes) and is normalised on the training device;
* ``gpu`` (CPU side only): what the workers still do when the photometric operations run on the GPU.

The official path's workers also do ToTensor + Normalize; ``fast`` leaves that one multiply-add per
value to the training device (where it is negligible), which is part of why it feeds a GPU faster.

For each, images/s with 1 and 2 worker processes and per core (= per worker), the speedup over
``official`` per worker count, and how many cores it takes to feed a GPU step rate (``--gpu-rate``
img/s, or the rate of ``bench/measured_rates.json`` for ``--device-kind``). Every configuration is
timed ``--repeats`` times interleaved (best of), after a warm-up batch that starts the workers.

Usage: ``python bench/data_pipeline.py [--images 256] [--batch 32] [--workers 1,2] [--json out.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ibot.data.embedded.render import photo_like  # noqa: E402
from ibot.data.multicrop import MultiCropMaskedDataset, collate_multicrop  # noqa: E402

MODES = ("official", "fast", "gpu")


def write_jpegs(root: Path, count: int, width: int, height: int, quality: int) -> Path:
    """``count`` photo-like JPEGs in an ImageFolder layout (one class), reused when already there."""
    folder = root / "train" / "n00000000"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for index in range(count):
        path = folder / f"{index:05d}.jpg"
        if not path.exists():
            Image.fromarray(photo_like(rng, height, width)).save(path, format="JPEG", quality=quality)
    return root / "train"


def make_loader(data: Path, mode: str, workers: int, batch: int, local_crops: int) -> DataLoader:
    dataset = MultiCropMaskedDataset(
        data, global_crops_scale=(0.25, 1.0), local_crops_scale=(0.05, 0.25), global_crops_number=2,
        local_crops_number=local_crops, global_crops_size=224, local_crops_size=96, patch_size=16,
        pred_ratio=[0.0, 0.3], pred_ratio_var=[0.0, 0.2], augmentation=mode)
    return DataLoader(dataset, batch_size=batch, shuffle=False, num_workers=workers, collate_fn=collate_multicrop,
                      drop_last=True, persistent_workers=True, prefetch_factor=2)


def images_per_s(loader: DataLoader, batches: int) -> float:
    """Images/s over ``batches`` batches after one warm-up batch (worker start-up excluded)."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    seen = 0
    for _ in range(batches):
        _, labels, _ = next(iterator)
        seen += len(labels)
    return seen / (time.perf_counter() - start)


def reference_gpu_rate(kind: str) -> float | None:
    """ViT-S/16 pretraining img/s on one device of ``kind`` from bench/measured_rates.json (if measured)."""
    path = ROOT / "bench" / "measured_rates.json"
    rates = json.loads(path.read_text()) if path.exists() else {}
    entry = rates.get("devices", {}).get(kind, {}).get("pretrain", {}).get("images_per_s")
    return float(entry) if entry else None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=256, help="JPEGs written (and read once per repeat)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--local-crops", type=int, default=10)
    parser.add_argument("--size", default="500x375", help="JPEG width x height")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--data-dir", type=Path, help="where the JPEGs go (default: a temporary folder)")
    parser.add_argument("--gpu-rate", type=float, help="GPU step img/s to feed (default: measured_rates.json)")
    parser.add_argument("--device-kind", default="nvidia-h200")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    width, height = (int(v) for v in args.size.lower().split("x"))
    modes = args.modes.split(",")
    worker_counts = [int(w) for w in args.workers.split(",")]
    torch.set_num_threads(1)

    with tempfile.TemporaryDirectory() as scratch:
        data = write_jpegs(args.data_dir or Path(scratch), args.images, width, height, args.quality)
        batches = args.images // args.batch - 1
        if batches < 2:
            raise SystemExit(f"--images {args.images} gives fewer than 3 batches of {args.batch}")
        best: dict[tuple[str, int], float] = {}
        for repeat in range(args.repeats):
            for workers in worker_counts:
                for mode in modes:
                    loader = make_loader(data, mode, workers, args.batch, args.local_crops)
                    rate = images_per_s(loader, batches)
                    del loader
                    best[mode, workers] = max(best.get((mode, workers), 0.0), rate)
                    print(f"  repeat {repeat + 1}: {mode:8s} {workers} worker(s): {rate:7.1f} img/s", flush=True)

    gpu_rate = args.gpu_rate or reference_gpu_rate(args.device_kind)
    rows = []
    print(f"\n{width}x{height} JPEG q{args.quality}, 2x224 + {args.local_crops}x96 crops, batch {args.batch}, "
          f"{os.cpu_count()} CPU cores, best of {args.repeats}")
    print(f"{'mode':9s} {'workers':>7s} {'img/s':>8s} {'img/s/core':>11s} {'vs official':>12s} {'cores to feed':>14s}")
    for workers in worker_counts:
        for mode in modes:
            rate = best[mode, workers]
            per_core = rate / workers
            speedup = rate / best["official", workers] if ("official", workers) in best else float("nan")
            cores = gpu_rate / per_core if gpu_rate else float("nan")
            rows.append({"mode": mode, "workers": workers, "images_per_s": rate, "images_per_s_per_core": per_core,
                         "speedup_vs_official": speedup, "cores_to_feed_gpu": cores})
            print(f"{mode:9s} {workers:7d} {rate:8.1f} {per_core:11.1f} {speedup:11.2f}x {cores:14.1f}")
    if gpu_rate:
        print(f"(cores to feed {gpu_rate:.0f} img/s: the ViT-S/16 step rate of one {args.device_kind} "
              f"{'given' if args.gpu_rate else 'from bench/measured_rates.json'})")
    result = {"jpeg": {"width": width, "height": height, "quality": args.quality}, "batch": args.batch,
              "local_crops": args.local_crops, "cpu_cores": os.cpu_count(), "gpu_rate": gpu_rate, "rows": rows}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
