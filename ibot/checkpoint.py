"""The one checkpoint module: atomic saves, safe loads, official-format compatibility.

Every stage loads backbone weights through :func:`load_backbone_weights`. It accepts
- our training checkpoints and the official iBOT ``checkpoint.pth`` (``teacher``/``student`` keys,
  ``module.``/``backbone.`` prefixes, ``head.*`` entries ignored),
- exported/released teacher files (``{'state_dict': ...}``, e.g. iBOT ``checkpoint_teacher.pth``),
- plain backbone state dicts (e.g. DINO releases),
- for Swin backbones, the official Swin key layout (:func:`swin_official_to_timm`),
- timm's Hugging Face layout: a folder with ``model.safetensors`` (+ ``config.json``), as ``ibot export``
  and timm's ``save_for_hf`` write it, or a ``.safetensors`` file (:func:`weights_file`),
and refuses anything else with the missing/unexpected keys listed: never a silent partial load.

Projection heads (unsupervised classification, semi-supervised fine-tuning from a head layer) load
through :func:`load_head_weights` / :func:`build_pretrained_head`, strictly, from our pretraining's
``heads.pth`` (:func:`export_heads`) or the official full ``checkpoint.pth`` (``teacher``/``student``
state dicts with ``head.`` keys, ``module.`` on the student; main_ibot.py:348-350).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import pickle
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from ibot.io import atomic_write

if TYPE_CHECKING:  # torch is imported by the functions that use it: a stage's waiting process never loads it
    import torch
    from torch import nn

__all__ = ["CheckpointError", "BackboneCheckpoint", "save_atomic", "load_file", "extract_backbone_state",
           "check_state_dict",
           "load_backbone_weights", "export_backbone", "sha256_file", "OPTIONAL_BACKBONE_KEYS", "HEAD_SETTINGS",
           "extract_head_state", "head_settings", "locate_heads", "load_head_weights", "build_pretrained_head",
           "export_heads", "swin_official_to_timm", "weights_file", "load_safetensors"]


#: Keys that may be absent on either side: the mask token exists only in iBOT student weights
#: (teachers, DINO and supervised weights have none) and is unused outside masked pretraining.
OPTIONAL_BACKBONE_KEYS = frozenset({"masked_embed"})
#: The two networks of an iBOT pretraining (main_ibot.py); either backbone can be the evaluated one.
NETWORKS = ("teacher", "student")
_CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (unreadable, unsafe, wrong model)."""


@lru_cache(maxsize=None)
def _torch():
    """torch, with the globals official checkpoints need allowed: they pickle their argparse args and
    numpy float64 learning rates (optimizer param groups); a Namespace and numpy scalars carry no code."""
    import numpy as np
    import torch

    torch.serialization.add_safe_globals([argparse.Namespace, np._core.multiarray.scalar, np.dtype,
                                          np.dtypes.Float64DType])
    return torch


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: never a half-written file."""
    torch = _torch()
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def load_file(path: str | Path, map_location: str | torch.device = "cpu", *, data: bytes | None = None) -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the cause (``data``: the
    file's bytes, already read)."""
    path, torch = Path(path), _torch()
    if data is None and not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file does not exist")
    try:
        return torch.load(io.BytesIO(data) if data is not None else path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"checkpoint {path}: refused by torch.load(weights_only=True): it contains objects other than "
            f"tensors and plain containers (a pickle that may carry code). Details: {error}") from error
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read (truncated or not a torch file): {error}") from error


def _strip_prefixes(state: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def extract_backbone_state(checkpoint: Any, key: str | None = None, *, source: str = "checkpoint") -> dict:
    """The backbone state dict inside any supported checkpoint layout (see module docstring)."""
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"{source}: expected a dict, got {type(checkpoint).__name__}")
    if key is not None:
        if key not in checkpoint:
            raise CheckpointError(f"{source}: no key {key!r}; top-level keys: {sorted(checkpoint)[:20]}")
        state = checkpoint[key]
    else:
        found = next((k for k in _CONTAINER_KEYS if isinstance(checkpoint.get(k), Mapping)), None)
        state = checkpoint[found] if found else checkpoint
    torch = _torch()
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{source}: does not hold a state dict of tensors "
                              f"(top-level keys: {sorted(checkpoint)[:20]})")
    has_backbone_prefix = any(k.removeprefix("module.").startswith("backbone.") for k in state)
    if has_backbone_prefix:  # full model: keep the backbone, drop heads
        state = {k: v for k, v in state.items() if k.removeprefix("module.").startswith("backbone.")}
    return _strip_prefixes(state)


def check_state_dict(model: nn.Module, state: Mapping[str, Any], source: str, *, optional=frozenset(),
                     resizable=frozenset()) -> None:
    """Raise CheckpointError listing missing/unexpected/mismatched keys unless ``state`` fits ``model``."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(expected) - set(optional))
    mismatched = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(state) & set(expected)
                        if state[k].shape != expected[k].shape and k not in resizable)
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{source} does not match the model ({type(model).__name__}, "
            f"{sum(p.numel() for p in model.parameters())} params):\n"
            f"  missing keys ({len(missing)}): {missing[:12]}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected[:12]}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched[:12]}")


@dataclass(frozen=True, eq=False)
class BackboneCheckpoint:
    """The backbone weights a stage evaluates: the file is read once (its sha256 and its state dict come
    from the same bytes) however many times the stage builds the backbone or records the file."""

    path: Path
    key: str | None = None  # top-level key holding the weights (auto when None)

    def __getstate__(self) -> dict[str, Any]:  # a job gets the file's name, never its cached content
        return {"path": self.path, "key": self.key}

    @cached_property
    def _content(self) -> tuple[str, dict[str, torch.Tensor], dict[str, Any]]:
        path = weights_file(self.path)
        data = path.read_bytes()
        loaded = load_safetensors(path, data) if path.suffix == ".safetensors" else load_file(path, data=data)
        meta = loaded.get("meta") if isinstance(loaded, Mapping) and isinstance(loaded.get("meta"), Mapping) else {}
        state = extract_backbone_state(loaded, self.key, source=f"checkpoint {self.path}")
        return hashlib.sha256(data).hexdigest(), state, dict(meta)

    @property
    def sha256(self) -> str:
        return self._content[0]

    @property
    def state(self) -> dict[str, torch.Tensor]:
        """The backbone state dict (prefixes stripped, heads dropped: :func:`extract_backbone_state`)."""
        return self._content[1]

    @property
    def meta(self) -> dict[str, Any]:
        return self._content[2]

    @property
    def network(self) -> str:
        """The pretraining network (``teacher``/``student``) these weights are, so that a stage pairs them
        with that network's projection head: the key of a full checkpoint, else our export's
        ``meta['network']``, else ``teacher`` (released ``checkpoint_teacher.pth`` files)."""
        if self.key in NETWORKS:
            return self.key
        return str(self.meta.get("network", "teacher"))

    def native_img_size(self, patch_size: int, default: int) -> int:
        """Image size whose patch grid is the weights' ``pos_embed`` grid (our exports record it as
        ``meta['img_size']``); ``default`` without one (Swin). Built at that size a backbone loads the
        weights unchanged; other sizes are handled at run time by the official bicubic interpolation."""
        if "img_size" in self.meta:
            return int(self.meta["img_size"])
        pos = self.state.get("pos_embed")
        if pos is None or pos.dim() != 3:
            return default
        side = math.isqrt(pos.shape[1] - 1)
        return side * patch_size if side * side == pos.shape[1] - 1 else default


#: The weights file of a folder in timm's Hugging Face layout (timm.models._hub HF_SAFE_WEIGHTS_NAME).
HF_WEIGHTS_FILE = "model.safetensors"


def weights_file(path: str | Path) -> Path:
    """The file holding the weights at ``path``: the path itself, or ``model.safetensors`` of a folder in
    timm's Hugging Face layout. Raises CheckpointError naming what is missing."""
    path = Path(path)
    if path.is_dir():
        if not (path / HF_WEIGHTS_FILE).is_file():
            raise CheckpointError(f"checkpoint {path}: a folder without {HF_WEIGHTS_FILE} (expected timm's Hugging "
                                  f"Face layout: {HF_WEIGHTS_FILE} + config.json, as `ibot export` writes it)")
        return path / HF_WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file does not exist")
    return path


def load_safetensors(path: Path, data: bytes) -> dict[str, Any]:
    """A ``.safetensors`` state dict from its bytes (a format without code: nothing to refuse)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        return load(data)
    except (SafetensorError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"checkpoint {path}: cannot be read as safetensors (truncated?): {error}") from error


def load_backbone_weights(model: nn.Module, path: str | Path | BackboneCheckpoint,
                          key: str | None = None) -> dict[str, list[str]]:
    """Load backbone weights strictly; return what was tolerated. Raises CheckpointError otherwise."""
    checkpoint = path if isinstance(path, BackboneCheckpoint) else BackboneCheckpoint(Path(path), key)
    path, state = checkpoint.path, dict(checkpoint.state)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    state = swin_official_to_timm(model, state, source=f"checkpoint {path}")
    expected = model.state_dict()
    check_state_dict(model, state, f"checkpoint {path}", optional=OPTIONAL_BACKBONE_KEYS, resizable={"pos_embed"})
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        state["pos_embed"] = _resize_pos_embed(state["pos_embed"], expected["pos_embed"])
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing_optional": sorted(set(expected) - set(state))}


def swin_official_to_timm(model: nn.Module, state: Mapping[str, Any], *, source: str = "checkpoint"
                          ) -> dict[str, Any]:
    """For a timm Swin ``model``: map an official (Microsoft / iBOT models/swin_transformer.py) state dict
    to timm's names; any other model or a timm-layout state passes through unchanged.

    timm's own ``checkpoint_filter_fn`` does the mapping: the official stage ``i`` ends with its
    ``layers.i.downsample`` (BasicLayer, official :431-434), timm's stage ``i+1`` starts with it; the
    non-persistent ``relative_position_index`` / ``attn_mask`` buffers the official code saves are dropped;
    a ``relative_position_bias_table`` of another window size (a Swin-T/14 checkpoint in a window-7
    model) is refused: timm would resample it silently, hiding a wrong ``models.<name>.window_size``.
    """
    from timm.models.swin_transformer import SwinTransformer, checkpoint_filter_fn
    if not isinstance(model, SwinTransformer):
        return dict(state)
    expected = model.state_dict()
    for key, value in state.items():
        if key.endswith("relative_position_bias_table") and key in expected and value.shape != expected[key].shape:
            raise CheckpointError(
                f"{source}: {key} table {tuple(value.shape)} vs model {tuple(expected[key].shape)}: the weights "
                f"use another Swin window than this model (models.<name>.window_size = "
                f"{getattr(model, 'window_size', '?')}; Swin-T/7 vs Swin-T/14), or the model was built for a "
                f"smaller image whose stage grid clamps the window (official: built at 224 px)")
    return checkpoint_filter_fn(dict(state), model)


def _resize_pos_embed(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Resample a [1, 1+N, D] position table to another square grid (checkpoint at another resolution)."""
    from timm.layers import resample_abs_pos_embed
    side = int((target.shape[1] - 1) ** 0.5)
    return resample_abs_pos_embed(source, (side, side), num_prefix_tokens=1)


def export_backbone(backbone: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write the released-weights layout ``{'state_dict': backbone, 'meta': {...}}`` atomically; a ViT's
    meta records its native ``img_size`` (the ``pos_embed`` grid), so readers need not derive it."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    meta = dict(meta)
    pos = state.get("pos_embed")
    side = math.isqrt(pos.shape[1] - 1) if pos is not None and pos.dim() == 3 else 0
    if side and side * side == pos.shape[1] - 1 and hasattr(backbone, "patch_size"):
        meta.setdefault("img_size", side * int(backbone.patch_size))
    save_atomic({"state_dict": state, "meta": meta}, path)


# -- projection heads --------------------------------------------------------------------------------
#: The settings a head is built from (official main_ibot.py flag names; ``head_hidden_dim`` is ours).
HEAD_SETTINGS = ("out_dim", "patch_out_dim", "norm_last_layer", "shared_head", "shared_head_teacher", "norm_in_head",
                 "act_in_head", "use_bn_in_head", "head_hidden_dim", "head_sharing")


def extract_head_state(checkpoint: Any, key: str | None = None, *, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The ``key`` network's (default ``teacher``) projection head in our ``heads.pth`` or an official full
    ``checkpoint.pth``, with the head's own parameter names (``mlp.0.weight``, ``last_layer.weight_g``, ...)."""
    key = key or "teacher"
    network = checkpoint.get(key) if isinstance(checkpoint, Mapping) else None
    if not isinstance(network, Mapping):
        keys = sorted(checkpoint)[:20] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise CheckpointError(f"{source}: no {key!r} network holding a projection head (top-level keys: {keys}); "
                              "backbone-only files (teacher_backbone.pth, checkpoint_teacher.pth) have none: use the "
                              "pretraining's heads.pth or the official full checkpoint.pth")
    head = {k.removeprefix("module.")[len("head."):]: v for k, v in network.items()
            if k.removeprefix("module.").startswith("head.")}
    if not head or not all(isinstance(v, _torch().Tensor) for v in head.values()):
        raise CheckpointError(f"{source}: the {key!r} network has no 'head.*' tensors (a backbone-only state dict)")
    return head


def head_settings(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """The head flags recorded with the weights: our ``meta`` or the official pickled ``args``."""
    recorded = checkpoint.get("meta") or checkpoint.get("args") or {}
    if isinstance(recorded, argparse.Namespace):
        recorded = vars(recorded)
    return {k: recorded[k] for k in HEAD_SETTINGS if k in recorded}


def locate_heads(heads: str | Path | None, checkpoint: str | Path | None) -> Path | None:
    """The file holding the heads of ``checkpoint``'s network: ``heads`` if set, else ``heads.pth`` beside
    the checkpoint (our pretraining exports it next to ``teacher_backbone.pth``), else the checkpoint itself
    (an official full ``checkpoint.pth``); None without a checkpoint (random init)."""
    if heads:
        return Path(heads)
    if checkpoint is None:
        return None
    sibling = Path(checkpoint).with_name("heads.pth")
    return sibling if sibling.is_file() else Path(checkpoint)


def load_head_weights(head: nn.Module, path: str | Path, key: str | None = None) -> None:
    """Load the ``key`` (default ``teacher``) projection head of ``path`` into ``head`` strictly."""
    state = extract_head_state(load_file(path), key, source=f"checkpoint {path}")
    check_state_dict(head, state, f"{key or 'teacher'} head of checkpoint {path}")
    head.load_state_dict(state)


def build_pretrained_head(path: str | Path, key: str | None, embed_dim: int) -> nn.Module:
    """The ``key`` network's pretrained ``IBOTHead`` of ``path``, built and loaded strictly.

    Sizes come from the weights (``mlp.0`` = hidden width, ``last_layer`` = out_dim, ``last_layer2`` =
    patch_out_dim; a teacher whose two output layers hold equal weights is the shared head; a DINO head,
    without ``last_layer2``, loads as a shared head), activation, norm and ``head_sharing`` (a Tab. 17
    variant overrides the inferred flags; default ``flags``) from the recorded settings (default: the
    official gelu, no norm).
    """
    from ibot.models.head import build_head

    checkpoint = load_file(path)
    state = extract_head_state(checkpoint, key, source=f"checkpoint {path}")
    settings = head_settings(checkpoint)
    if "mlp.0.weight" in state:
        settings["head_hidden_dim"] = int(state["mlp.0.weight"].shape[0])
    if "last_layer.weight_v" in state:
        settings["out_dim"] = int(state["last_layer.weight_v"].shape[0])
    if "last_layer2.weight_v" in state:
        settings["patch_out_dim"] = int(state["last_layer2.weight_v"].shape[0])
        shared = bool(state["last_layer2.weight_v"].shape == state["last_layer.weight_v"].shape
                      and _torch().equal(state["last_layer2.weight_v"], state["last_layer.weight_v"]))
        settings.update(shared_head=shared, shared_head_teacher=shared)
    elif "last_layer.weight_v" in state:  # a DINO head (no patch branch): our shared head, same tensors
        settings.update(shared_head=True, shared_head_teacher=True)
        state = {**state, **{k.replace("last_layer.", "last_layer2.", 1): v for k, v in state.items()
                             if k.startswith("last_layer.")}}
    head = build_head(embed_dim, settings, teacher=(key or "teacher") != "student")
    check_state_dict(head, state, f"{key or 'teacher'} head of checkpoint {path}")
    head.load_state_dict(state)
    return head


def export_heads(heads: Mapping[str, nn.Module], path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write ``{'teacher': {'head.<k>': ...}, 'student': {...}, 'meta': {...}}`` atomically: the official
    checkpoint's head entries and key names, so one loader reads both."""
    out: dict[str, Any] = {name: {f"head.{k}": v.detach().cpu().clone() for k, v in head.state_dict().items()}
                           for name, head in heads.items()}
    save_atomic({**out, "meta": dict(meta)}, path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
