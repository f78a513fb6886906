"""Offline MIM targets: tokenizers that give each patch of a global crop a class id (paper ablations).

iBOT's masked-image-modelling target is the online tokenizer (the EMA teacher's patch distribution).
The paper compares it with offline targets (arXiv:2111.07832v3 Tab. 9 and Tab. 20, App. E): the student's
logits of each masked patch are trained with cross-entropy against a hard id from a fixed tokenizer
(:meth:`ibot.loss.IBOTLoss.target_patch_loss`). The tokenizers here share one interface,
``tokenize(images) -> LongTensor[B, H/p, W/p]`` (normalised crops in, ids on the mask grid out), and
``vocab_size`` (the size the student's patch output must have):

- ``mpp``: masked patch prediction of the ViT paper (arXiv:2010.11929 Sec. 4.6): the 3-bit mean colour
  of the patch, 512 classes;
- ``kmeans``: the nearest of K centroids fitted on raw-pixel patches (Tab. 20: K=4096 on 10% of
  ImageNet), fitted once by ``python -m ibot.tokenizers fit-kmeans`` (a DAG job: workflow/rules/tokenizers.smk);
- ``frozen``: a frozen pretrained model (Tab. 9/20 "standalone DINO as tokenizer"): the argmax of its
  teacher projection head's patch logits on the unmasked crop;
- ``dalle``: BEiT's tokenizer (arXiv:2106.08254 Sec. 2.2), the DALL-E dVAE encoder (package ``DALL-E==0.1``).

Pixel space shared by ``kmeans`` fitting and assignment and by ``mpp``: de-normalised RGB in [0, 1]
(the loader normalises with the ImageNet mean/std, :mod:`ibot.data.multicrop`), each patch flattened in
(C, p, p) order (``F.unfold``'s order).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ibot.data.multicrop import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["MIM_TARGETS", "TOKENIZER_KINDS", "Tokenizer", "MPPTokenizer", "KMeansTokenizer", "FrozenModelTokenizer",
           "DalleTokenizer", "build_tokenizer", "build_mim_tokenizer", "check_mim_config", "check_mim_heads", "check_vocabulary",
           "denormalise", "patchify", "fit_kmeans", "main"]

#: ``pretrain.mim_target`` values: the official online tokenizer, then the offline ones.
MIM_TARGETS = ("online", "frozen", "mpp", "kmeans", "dalle")
#: Offline tokenizers and whether they need a file (``pretrain.mim_tokenizer``).
TOKENIZER_KINDS = {"mpp": False, "kmeans": True, "frozen": True, "dalle": True}
#: Installation hint for the DALL-E tokenizer (an optional extra: the package's own requirements pull
#: mypy, pytest and blobfile into the environment).
DALLE_INSTALL = "pip install 'DALL-E==0.1' (or this project's extra: pip install -e '.[dalle]')"


def denormalise(images: Tensor) -> Tensor:
    """Loader-normalised crops [B,3,H,W] back to RGB in [0, 1] (float32)."""
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() * std + mean).clamp_(0.0, 1.0)


def patchify(pixels: Tensor, patch_size: int) -> Tensor:
    """[B,3,H,W] -> [B, (H/p)*(W/p), 3*p*p], patches row-major over the grid, each in (C, p, p) order."""
    _check_grid(pixels, patch_size)
    return F.unfold(pixels, kernel_size=patch_size, stride=patch_size).transpose(1, 2)


def _check_grid(images: Tensor, patch_size: int) -> tuple[int, int]:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"tokenizer input: expected images [B, 3, H, W], got {tuple(images.shape)}")
    height, width = images.shape[-2:]
    if height % patch_size or width % patch_size:
        raise ValueError(f"tokenizer input: {height}x{width} crops are not a whole number of {patch_size}-px patches")
    return height // patch_size, width // patch_size


class Tokenizer(nn.Module):
    """A fixed map from normalised crops to one id per patch; subclasses define :meth:`_ids`."""

    vocab_size: int
    patch_size: int

    @torch.no_grad()
    def tokenize(self, images: Tensor) -> Tensor:
        """Normalised crops [B,3,H,W] -> ids LongTensor [B, H/p, W/p] (the masks' grid), in [0, vocab_size)."""
        grid = _check_grid(images, self.patch_size)
        with torch.autocast(images.device.type, enabled=False):  # ids from float32 (argmax/argmin ties)
            ids = self._ids(images.float())
        return ids.reshape(images.shape[0], *grid).long()

    def _ids(self, images: Tensor) -> Tensor:
        raise NotImplementedError


class MPPTokenizer(Tokenizer):
    """ViT's masked patch prediction target (arXiv:2010.11929 Sec. 4.6, App. B.1.2): each channel's mean
    over the patch in [0, 1], quantised to ``2**bits`` levels (floor(mean * 8) clipped to 7 for 3 bits);
    id = r * 64 + g * 8 + b: 512 classes."""

    def __init__(self, patch_size: int, bits: int = 3) -> None:
        super().__init__()
        self.patch_size, self.levels = patch_size, 2 ** bits
        self.vocab_size = self.levels ** 3

    def _ids(self, images: Tensor) -> Tensor:
        means = F.avg_pool2d(denormalise(images), self.patch_size)  # [B, 3, h, w]
        q = (means * self.levels).floor().clamp_(0, self.levels - 1).long()
        return (q[:, 0] * self.levels + q[:, 1]) * self.levels + q[:, 2]


class KMeansTokenizer(Tokenizer):
    """Nearest of K raw-pixel centroids [K, 3*p*p] (pixel space of the module docstring; Tab. 20)."""

    def __init__(self, centroids: Tensor, patch_size: int, chunk: int = 4096) -> None:
        super().__init__()
        if centroids.dim() != 2 or centroids.shape[1] != 3 * patch_size ** 2:
            raise ValueError(f"k-means centroids {tuple(centroids.shape)} do not fit {patch_size}-px RGB patches "
                             f"(expected [K, {3 * patch_size ** 2}])")
        self.register_buffer("centroids", centroids.float())
        self.patch_size, self.vocab_size, self.chunk = patch_size, centroids.shape[0], chunk

    def _ids(self, images: Tensor) -> Tensor:
        patches = patchify(denormalise(images), self.patch_size).flatten(0, 1)  # [B*N, 3pp]
        sq_norms = (self.centroids ** 2).sum(1)
        # argmin ||x - c||^2 = argmin ||c||^2 - 2 x.c, in chunks of rows (B*N x K distances can be GBs)
        return torch.cat([(sq_norms - 2 * rows @ self.centroids.T).argmin(1) for rows in patches.split(self.chunk)])

    @classmethod
    def load(cls, path: str | Path, patch_size: int, crop: int | None = None) -> "KMeansTokenizer":
        """Centroids written by :func:`fit_kmeans`; refuses a file fitted for another patch size (or crop)."""
        from ibot.checkpoint import load_file

        saved = load_file(path)
        if not isinstance(saved, Mapping) or "centroids" not in saved:
            raise ValueError(f"k-means tokenizer {path}: no 'centroids' (write it with python -m ibot.tokenizers "
                             "fit-kmeans)")
        meta = dict(saved.get("meta") or {})
        if int(meta.get("patch_size", patch_size)) != patch_size:
            raise ValueError(f"k-means tokenizer {path}: fitted on {meta['patch_size']}-px patches, the model's "
                             f"patches are {patch_size} px (fit-kmeans --patch-size)")
        if crop is not None and meta.get("crop") is not None and int(meta["crop"]) != crop:
            raise ValueError(f"k-means tokenizer {path}: fitted on {meta['crop']}-px crops, pretrain.global_crops_size "
                             f"is {crop} (fit-kmeans --crop)")
        return cls(saved["centroids"], patch_size)


class FrozenModelTokenizer(Tokenizer):
    """A frozen pretrained model as tokenizer (Tab. 9/20 "standalone DINO as tokenizer"): argmax of its
    teacher head's patch logits on the unmasked crop. Vocabulary = that head's patch output size (a DINO
    head, without a patch layer, is a shared head: ``out_dim``)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, patch_size: int) -> None:
        super().__init__()
        self.backbone, self.head = backbone.eval(), head.eval()
        for param in self.parameters():
            param.requires_grad = False
        self.patch_size, self.vocab_size = patch_size, int(head.patch_out_dim)

    def train(self, mode: bool = True) -> "FrozenModelTokenizer":
        return super().train(False)  # frozen: never drop path / batch-norm updates

    def _ids(self, images: Tensor) -> Tensor:
        tokens = self.backbone(images)
        return self.head.forward_patch(tokens[:, 1:]).argmax(-1)

    @classmethod
    def load(cls, path: str | Path, patch_size: int, crop: int) -> "FrozenModelTokenizer":
        """``path``: our ``teacher_backbone.pth`` export (``heads.pth`` beside it) or an official full
        checkpoint (``teacher`` network, head included). Architecture from the file's metadata (our
        ``meta``, the official pickled ``args``)."""
        from ibot.checkpoint import BackboneCheckpoint, build_pretrained_head, load_file, locate_heads
        from ibot.models.pretrained import build_pretrained_backbone

        raw = load_file(path)
        if not isinstance(raw, Mapping):
            raise ValueError(f"frozen tokenizer {path}: not a checkpoint dict ({type(raw).__name__})")
        recorded = raw.get("meta") or raw.get("args") or {}
        recorded = recorded if isinstance(recorded, Mapping) else vars(recorded)  # official: argparse.Namespace
        if "arch" not in recorded or "patch_size" not in recorded:
            raise ValueError(f"frozen tokenizer {path}: no recorded arch/patch_size (expected our pretraining's "
                             "teacher_backbone.pth or an official full checkpoint with its args)")
        if int(recorded["patch_size"]) != patch_size:
            raise ValueError(f"frozen tokenizer {path}: {recorded['patch_size']}-px patches, the model's are "
                             f"{patch_size} px: its ids would not lie on the mask grid")
        key = "teacher" if isinstance(raw.get("teacher"), Mapping) else None
        checkpoint = BackboneCheckpoint(Path(path), key)
        spec = {"arch": recorded["arch"], "patch_size": patch_size, "depth": recorded.get("depth")}
        backbone = build_pretrained_backbone(spec, checkpoint, img_size=checkpoint.native_img_size(patch_size, crop))
        heads = locate_heads(None, path)
        head = build_pretrained_head(heads, "teacher", backbone.embed_dim)
        return cls(backbone, head, patch_size)


def _dalle_modules() -> tuple[Any, Any, list[type]]:
    """(Encoder class, map_pixels, the classes a pickled encoder may hold) of the ``dall_e`` package."""
    try:
        from dall_e.encoder import Encoder, EncoderBlock
        from dall_e.utils import Conv2d, map_pixels
    except ImportError as error:
        raise ImportError(f"the dalle MIM target needs OpenAI's DALL-E package (module dall_e): {DALLE_INSTALL}. "
                          f"Import failed: {error}") from error
    # exactly what the released encoder.pkl pickles (OrderedDict and torch.device are allowed by default)
    allowed = [Encoder, EncoderBlock, Conv2d, nn.Sequential, nn.ReLU, nn.MaxPool2d, nn.Identity]
    return Encoder, map_pixels, allowed


class DalleTokenizer(Tokenizer):
    """BEiT's visual tokens (arXiv:2106.08254 Sec. 2.2; BEiT's ``second_input_size`` 112 for 224 crops):
    the DALL-E encoder sees the de-normalised crop resized so that its 8x downsampling lands on the patch
    grid (crop / 2 for 16-px patches), mapped with ``map_pixels``; ids = argmax of its logits."""

    def __init__(self, encoder: nn.Module, patch_size: int) -> None:
        super().__init__()
        _, self.map_pixels, _ = _dalle_modules()
        self.encoder = encoder.eval()
        for param in self.encoder.parameters():
            param.requires_grad = False
        self.patch_size, self.vocab_size = patch_size, int(encoder.vocab_size)

    def train(self, mode: bool = True) -> "DalleTokenizer":
        return super().train(False)

    def _ids(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
        # BEiT resizes with PIL lanczos; torch has none: antialiased bicubic, clamped back to [0, 1]
        pixels = F.interpolate(denormalise(images), size=(8 * h, 8 * w), mode="bicubic", antialias=True,
                               align_corners=False).clamp_(0.0, 1.0)
        logits = self.encoder(self.map_pixels(pixels))
        return logits.argmax(1)

    @classmethod
    def load(cls, path: str | Path, patch_size: int) -> "DalleTokenizer":
        """The released ``encoder.pkl`` (a pickled whole module), read with ``weights_only=True`` and the
        dall_e classes allowed; never an unrestricted unpickle."""
        import pickle

        _, _, allowed = _dalle_modules()
        if not Path(path).is_file():
            raise FileNotFoundError(f"dalle tokenizer {path} (pretrain.mim_tokenizer): file does not exist "
                                    "(BEiT's encoder.pkl: https://cdn.openai.com/dall-e/encoder.pkl)")
        try:
            with torch.serialization.safe_globals(allowed):
                encoder = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            raise ValueError(f"dalle tokenizer {path}: refused by torch.load(weights_only=True) with the dall_e "
                             f"classes allowed (not a DALL-E encoder.pkl?): {error}") from error
        if not isinstance(encoder, allowed[0]):
            raise ValueError(f"dalle tokenizer {path}: holds a {type(encoder).__name__}, not a dall_e Encoder")
        return cls(encoder, patch_size)


def build_tokenizer(kind: str, path: str | Path | None, *, patch_size: int, crop: int) -> Tokenizer:
    """The ``kind`` tokenizer (see :data:`TOKENIZER_KINDS`) for ``patch_size``-px patches of ``crop``-px crops;
    ``path``: its file (k-means centroids, frozen model checkpoint, DALL-E encoder.pkl), None for mpp."""
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"unknown tokenizer {kind!r}; expected one of {sorted(TOKENIZER_KINDS)}")
    if TOKENIZER_KINDS[kind] and not path:
        raise ValueError(f"the {kind} tokenizer needs a file (pretrain.mim_tokenizer)")
    if kind == "mpp":
        return MPPTokenizer(patch_size)
    if kind == "kmeans":
        return KMeansTokenizer.load(path, patch_size, crop)
    if kind == "frozen":
        return FrozenModelTokenizer.load(path, patch_size, crop)
    return DalleTokenizer.load(path, patch_size)


def check_mim_config(cfg: Mapping[str, Any]) -> None:
    """``pretrain.mim_target`` / ``pretrain.mim_tokenizer`` agree: a file for frozen/kmeans/dalle, none for
    online/mpp (a stray file would be a silent no-op). Also the registry preflight of the pretrain stage."""
    target, path = cfg.get("mim_target", "online"), cfg.get("mim_tokenizer")
    if target not in MIM_TARGETS:
        raise ValueError(f"pretrain.mim_target: {target!r}; expected one of {list(MIM_TARGETS)}")
    needs_file = TOKENIZER_KINDS.get(target, False)
    if needs_file and not path:
        raise ValueError(f"pretrain.mim_target: {target} needs pretrain.mim_tokenizer (its file) to be set")
    if not needs_file and path:
        raise ValueError(f"pretrain.mim_tokenizer is set ({path}) but pretrain.mim_target: {target} uses no file; "
                         "unset it")


def check_vocabulary(cfg: Mapping[str, Any], student_patch_dim: int, vocab_size: int) -> None:
    """The student's patch logits must have one entry per tokenizer id (cross-entropy over the vocabulary)."""
    if student_patch_dim != vocab_size:
        key = "pretrain.out_dim (shared_head: true)" if cfg.get("shared_head") else "pretrain.patch_out_dim"
        raise ValueError(f"pretrain.mim_target: {cfg.get('mim_target')} has a vocabulary of {vocab_size} ids but the "
                         f"student's patch head outputs {student_patch_dim}: set {key} to {vocab_size}")


def check_mim_heads(cfg: Mapping[str, Any]) -> None:
    """Before the models are built: with an offline target the student's patch layer is sized to the
    vocabulary, usually not ``out_dim``; the official teacher, whose patch layer is its [CLS] layer
    (``shared_head_teacher``), then cannot take the student's weights (a size mismatch deep in
    ``load_state_dict``). Say which keys to set instead."""
    if cfg.get("mim_target", "online") == "online" or cfg.get("shared_head"):
        return
    if cfg.get("shared_head_teacher", True) and cfg["out_dim"] != cfg["patch_out_dim"]:
        raise ValueError(f"pretrain.mim_target: {cfg['mim_target']} with pretrain.patch_out_dim {cfg['patch_out_dim']} "
                         f"!= pretrain.out_dim {cfg['out_dim']}: set pretrain.shared_head_teacher: false (the "
                         "teacher's patch layer is unused with an offline target) or make the two sizes equal")


def build_mim_tokenizer(cfg: Mapping[str, Any], *, patch_size: int, student_patch_dim: int) -> Tokenizer | None:
    """The offline tokenizer a pretraining config asks for (None for the online target), checked against
    the student's patch output size. Called before training starts."""
    check_mim_config(cfg)
    if cfg.get("mim_target", "online") == "online":
        return None
    tokenizer = build_tokenizer(cfg["mim_target"], cfg.get("mim_tokenizer"), patch_size=patch_size,
                                crop=cfg["global_crops_size"])
    check_vocabulary(cfg, student_patch_dim, tokenizer.vocab_size)
    return tokenizer


# -- k-means fitting --------------------------------------------------------------------------------------
def _image_files(data: Path) -> list[Path]:
    """Training images of an ImageNet root (``<data>/train/<class>/*``) or of a class-folder tree."""
    from ibot.data.folders import is_image_file

    root = data / "train" if (data / "train").is_dir() else data
    if not root.is_dir():
        raise FileNotFoundError(f"fit-kmeans --data {data}: not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_file(str(p)))
    if not files:
        raise FileNotFoundError(f"fit-kmeans --data {data}: no images under {root}")
    return files


def _image_patches(path: Path, crop: int, patch_size: int) -> Tensor:
    """uint8 patches [N, 3*p*p] of the resized (shorter side ``crop``, bicubic as the pretraining crops)
    centre crop; /255 gives the [0, 1] pixel space of the tokenizer."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    with Image.open(path) as image:
        image = TF.center_crop(TF.resize(image.convert("RGB"), crop, interpolation=TF.InterpolationMode.BICUBIC),
                               [crop, crop])
        pixels = TF.pil_to_tensor(image)  # uint8 [3, crop, crop]
    return patchify(pixels[None].float(), patch_size)[0].round().to(torch.uint8)


def fit_kmeans(data: str | Path, out: str | Path, *, k: int = 4096, fraction: float = 0.1, patch_size: int = 16,
               crop: int = 224, seed: int = 0, max_patches: int | None = None, batch_size: int = 4096,
               epochs: int = 1) -> dict[str, Any]:
    """Fit K centroids on raw-pixel patches of a seeded ``fraction`` of the training images (Tab. 20: 4096
    on 10% of ImageNet) with scikit-learn's ``MiniBatchKMeans`` (seeded; streamed by ``partial_fit`` over
    ``epochs`` passes of shuffled mini-batches, so memory is the uint8 patches, not a float copy), capped at
    ``max_patches`` (a seeded subset). Writes ``{'centroids': [K, 3*p*p] float32, 'meta': {...}}`` atomically."""
    import numpy as np
    from sklearn.cluster import MiniBatchKMeans

    from ibot.checkpoint import save_atomic

    if not 0 < fraction <= 1:
        raise ValueError(f"fit-kmeans --fraction {fraction}: expected 0 < fraction <= 1")
    if crop % patch_size:
        raise ValueError(f"fit-kmeans --crop {crop} is not a multiple of --patch-size {patch_size}")
    files = _image_files(Path(data))
    rng = np.random.default_rng(seed)
    chosen = sorted(rng.choice(len(files), size=max(1, math.ceil(fraction * len(files))), replace=False).tolist())
    per_image = (crop // patch_size) ** 2
    quota = per_image if max_patches is None else min(per_image, math.ceil(max_patches / len(chosen)))
    patches = []
    for index in chosen:
        image_patches = _image_patches(files[index], crop, patch_size)
        if quota < per_image:  # an even share of every image's patches (a seeded choice of which)
            image_patches = image_patches[np.sort(rng.choice(per_image, size=quota, replace=False))]
        patches.append(image_patches)
    X = torch.cat(patches).numpy()
    if max_patches is not None and len(X) > max_patches:
        X = X[np.sort(rng.choice(len(X), size=max_patches, replace=False))]
    if len(X) < k:
        raise ValueError(f"fit-kmeans: {len(X)} patches for --k {k} centroids; raise --fraction / --max-patches")
    kmeans = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=batch_size, n_init=1)
    init = min(len(X), max(3 * k, batch_size))  # the first call seeds k-means++ on at least 3K patches
    for epoch in range(epochs):
        order = rng.permutation(len(X))
        starts = [0, init, *range(init + batch_size, len(X), batch_size)] if epoch == 0 else range(0, len(X), batch_size)
        bounds = [*starts, len(X)]
        for start, stop in zip(bounds[:-1], bounds[1:]):
            if stop > start:
                kmeans.partial_fit(X[order[start:stop]].astype(np.float32) / 255.0)
    centroids = torch.from_numpy(np.ascontiguousarray(kmeans.cluster_centers_, dtype=np.float32))
    meta = {"kind": "kmeans", "k": k, "patch_size": patch_size, "crop": crop, "fraction": fraction, "seed": seed,
            "max_patches": max_patches, "batch_size": batch_size, "epochs": epochs, "images": len(chosen),
            "images_available": len(files), "patches": int(len(X)), "data": str(data),
            "pixel_space": "RGB in [0,1] of the bicubic-resized centre crop, patches flattened in (C, p, p) order",
            "inertia_last_batch": float(kmeans.inertia_) if getattr(kmeans, "inertia_", None) is not None else None,
            "sklearn": __import__("sklearn").__version__}
    save_atomic({"centroids": centroids, "meta": meta}, out)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ibot.tokenizers", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit-kmeans", help="fit the k-means MIM tokenizer on raw-pixel patches (Tab. 20)")
    fit.add_argument("--data", required=True, help="ImageNet root (its train/ is read) or a class-folder tree")
    fit.add_argument("--out", required=True, help="tensor file to write (centroids + metadata)")
    fit.add_argument("--k", type=int, default=4096, help="number of centroids (paper: 4096)")
    fit.add_argument("--fraction", type=float, default=0.1, help="fraction of the images used (paper: 0.1)")
    fit.add_argument("--patch-size", type=int, default=16)
    fit.add_argument("--crop", type=int, default=224, help="the pretraining global crop size (pretrain.global_crops_size)")
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--max-patches", type=int, default=None, help="cap on the patches used (default: all)")
    fit.add_argument("--batch-size", type=int, default=4096, help="MiniBatchKMeans mini-batch (patches)")
    fit.add_argument("--epochs", type=int, default=1, help="passes over the patches")
    args = parser.parse_args(argv)
    for flag in ("k", "patch_size", "crop", "batch_size", "epochs"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be >= 1")
    if args.max_patches is not None and args.max_patches < 1:
        parser.error("--max-patches must be >= 1")
    try:
        meta = fit_kmeans(args.data, args.out, k=args.k, fraction=args.fraction, patch_size=args.patch_size,
                          crop=args.crop, seed=args.seed, max_patches=args.max_patches, batch_size=args.batch_size,
                          epochs=args.epochs)
    except (ValueError, FileNotFoundError) as error:
        print(f"fit-kmeans: {error}", file=sys.stderr)
        return 2
    print(f"[fit-kmeans] {meta['k']} centroids from {meta['patches']} patches of {meta['images']} images -> {args.out}",
          flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
