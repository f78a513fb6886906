"""[CLS] self-attention maps of the last block (one panel per head), as in the paper's figures.

The backbone comes from :func:`ibot.models.pretrained.build_pretrained_backbone` (our exported
teacher, an external checkpoint, or random init); images are the first few validation images,
one per class folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ibot.data.folders import IMG_EXTENSIONS, is_image_file  # noqa: E402
from ibot.io import atomic_write  # noqa: E402

__all__ = ["find_images", "attention_maps", "attention_figure"]

_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def find_images(root: str | Path, count: int = 4) -> list[Path]:
    """First image of the first ``count`` class folders of ``root/val`` (or of ``root`` itself)."""
    root = Path(root)
    base = root / "val" if (root / "val").is_dir() else root
    if not base.is_dir():
        raise FileNotFoundError(f"attention maps: image folder {base} does not exist")
    picked = []
    class_dirs = sorted(p for p in base.iterdir() if p.is_dir()) or [base]
    for folder in class_dirs:
        image = next((p for p in sorted(folder.rglob("*")) if p.is_file() and is_image_file(p.name)), None)
        if image is not None:
            picked.append(image)
        if len(picked) == count:
            break
    if not picked:
        raise FileNotFoundError(f"attention maps: no image ({', '.join(IMG_EXTENSIONS)}) under {base}")
    return picked


def _load(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        return np.asarray(image, dtype=np.float32) / 255.0


def attention_maps(model_spec: Mapping[str, Any], checkpoint: str | Path | None, images: Sequence[str | Path], *,
                   checkpoint_key: str | None = None, img_size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(images [B,H,W,3] in [0,1], attention [B, heads, H/p, W/p]) of the last block's [CLS] query."""
    import torch

    from ibot.models.pretrained import build_pretrained_backbone

    backbone = build_pretrained_backbone(model_spec, checkpoint, checkpoint_key=checkpoint_key, img_size=img_size)
    backbone.eval()
    pixels = np.stack([_load(Path(p), img_size) for p in images])
    x = torch.from_numpy(((pixels - _MEAN) / _STD).transpose(0, 3, 1, 2)).contiguous()
    with torch.no_grad():
        attention = backbone.get_last_selfattention(x)  # [B, heads, 1+N, 1+N]
    grid = img_size // backbone.patch_size
    cls = attention[:, :, 0, 1:]
    if cls.shape[-1] != grid * grid:  # extra tokens (none for our ViT): keep the last N
        cls = cls[..., -grid * grid:]
    return pixels, cls.reshape(cls.shape[0], cls.shape[1], grid, grid).float().numpy()


def attention_figure(model_spec: Mapping[str, Any], checkpoint: str | Path | None, images: Sequence[str | Path],
                     out: str | Path, *, checkpoint_key: str | None = None, img_size: int = 224,
                     title: str = "", max_heads: int = 12) -> Path:
    """Grid figure: each row an image, then its per-head [CLS] attention (last block), then the head mean."""
    pixels, maps = attention_maps(model_spec, checkpoint, images, checkpoint_key=checkpoint_key, img_size=img_size)
    heads = min(maps.shape[1], max_heads)
    cols = heads + 2
    fig, axes = plt.subplots(len(images), cols, figsize=(1.6 * cols, 1.6 * len(images) + 0.4), squeeze=False)
    for row, (image, attention) in enumerate(zip(pixels, maps)):
        axes[row, 0].imshow(image)
        panels = [(attention[h], f"head {h}") for h in range(heads)] + [(attention.mean(0), "mean")]
        for col, (panel, name) in enumerate(panels, start=1):
            axes[row, col].imshow(panel, cmap="inferno", interpolation="nearest")
            if row == 0:
                axes[row, col].set_title(name, fontsize=7)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_title("image", fontsize=7)
    fig.suptitle(title or "[CLS] attention of the last block", fontsize=9)
    out = Path(out)
    fig.tight_layout()
    with atomic_write(out, "wb") as handle:
        fig.savefig(handle, dpi=110, format=out.suffix.lstrip(".") or "png")
    plt.close(fig)
    return out
