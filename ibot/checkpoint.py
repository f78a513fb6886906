"""The one checkpoint module: atomic saves, safe loads, official-format compatibility.

Every stage loads backbone weights through :func:`load_backbone_weights`. It accepts
- our training checkpoints and the official iBOT ``checkpoint.pth`` (``teacher``/``student`` keys,
  ``module.``/``backbone.`` prefixes, ``head.*`` entries ignored),
- exported/released teacher files (``{'state_dict': ...}``, e.g. iBOT ``checkpoint_teacher.pth``),
- plain backbone state dicts (e.g. DINO releases),
and refuses anything else with the missing/unexpected keys listed: never a silent partial load.
"""

from __future__ import annotations

import argparse
import hashlib
import pickle
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ibot.io import atomic_write

__all__ = ["CheckpointError", "save_atomic", "load_file", "extract_backbone_state", "check_state_dict",
           "load_backbone_weights", "export_backbone", "sha256_file", "OPTIONAL_BACKBONE_KEYS"]

# The official training checkpoints pickle their argparse args and numpy float64 learning rates
# (optimizer param groups); a Namespace and numpy scalars carry no code.
torch.serialization.add_safe_globals([argparse.Namespace, np._core.multiarray.scalar, np.dtype,
                                      np.dtypes.Float64DType])

#: Keys that may be absent on either side: the mask token exists only in iBOT student weights
#: (teachers, DINO and supervised weights have none) and is unused outside masked pretraining.
OPTIONAL_BACKBONE_KEYS = frozenset({"masked_embed"})
_CONTAINER_KEYS = ("teacher", "state_dict", "model", "student", "module")
_PREFIXES = ("module.", "backbone.", "encoder.")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked (unreadable, unsafe, wrong model)."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to a temp file in the same folder, fsync, then rename: never a half-written file."""
    with atomic_write(path, "wb") as handle:
        torch.save(obj, handle)


def load_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the cause."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: file does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
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


def load_backbone_weights(model: nn.Module, path: str | Path, key: str | None = None) -> dict[str, list[str]]:
    """Load backbone weights strictly; return what was tolerated. Raises CheckpointError otherwise."""
    state = extract_backbone_state(load_file(path), key, source=f"checkpoint {path}")
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    expected = model.state_dict()
    check_state_dict(model, state, f"checkpoint {path}", optional=OPTIONAL_BACKBONE_KEYS, resizable={"pos_embed"})
    if "pos_embed" in state and state["pos_embed"].shape != expected["pos_embed"].shape:
        state["pos_embed"] = _resize_pos_embed(state["pos_embed"], expected["pos_embed"])
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return {"missing_optional": sorted(set(expected) - set(state))}


def _resize_pos_embed(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Resample a [1, 1+N, D] position table to another square grid (checkpoint at another resolution)."""
    from timm.layers import resample_abs_pos_embed
    side = int((target.shape[1] - 1) ** 0.5)
    return resample_abs_pos_embed(source, (side, side), num_prefix_tokens=1)


def export_backbone(backbone: nn.Module, path: str | Path, meta: Mapping[str, Any]) -> None:
    """Write the released-weights layout ``{'state_dict': backbone, 'meta': {...}}`` atomically."""
    state = {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    save_atomic({"state_dict": state, "meta": dict(meta)}, path)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
