"""iBOT projection head: a shared MLP trunk with one output layer for [CLS] and one for patch tokens.

Mirrors the official ``iBOTHead`` (bytedance/ibot ``models/head.py``) module for module, so parameter
names (``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight_g``/``weight_v``, ``last_layer2.*``) and
initialisation match and released checkpoints load strictly. Besides the official ``forward`` on all
tokens, ``forward_cls``/``forward_patch`` run the head on selected tokens only (e.g. the student's
masked patches), and ``forward_patch_mean`` gives the per-image token mean of the patch logits that
the teacher centre needs without projecting every token to the (large) output dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IBOTHead", "build_head", "loss_patch_out_dim"]

_BN_TYPES = (nn.BatchNorm1d, nn.SyncBatchNorm)


class _TokenSequential(nn.Sequential):
    """``nn.Sequential`` whose batch norms normalise over all leading dims of [..., C] token inputs."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        for module in self:
            if isinstance(module, _BN_TYPES) and x.dim() > 2:
                x = module(x.reshape(-1, x.shape[-1])).reshape(x.shape)
            else:
                x = module(x)
        return x


def _build_norm(norm: str | None, dim: int, affine: bool = True) -> nn.Module | None:
    if norm is None:
        return None
    if norm == "bn":
        return nn.BatchNorm1d(dim, affine=affine)
    if norm == "syncbn":
        return nn.SyncBatchNorm(dim, affine=affine)
    if norm == "ln":
        return nn.LayerNorm(dim, elementwise_affine=affine)
    raise ValueError(f"unknown norm type {norm!r}; expected None, 'bn', 'syncbn' or 'ln'")


def _build_act(act: str) -> nn.Module:
    if act == "gelu":
        return nn.GELU()
    if act == "relu":
        return nn.ReLU()
    raise ValueError(f"unknown act type {act!r}; expected 'gelu' or 'relu'")


def _weight_norm_linear(in_dim: int, out_dim: int, freeze_norm: bool) -> nn.Module:
    """Bias-free weight-normalised linear layer with unit gain, frozen when ``freeze_norm``.

    Uses the legacy ``nn.utils.weight_norm`` on purpose: its ``weight_g``/``weight_v`` parameter
    names are the ones in official checkpoints (the parametrization API renames them).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        layer = nn.utils.weight_norm(nn.Linear(in_dim, out_dim, bias=False))
    layer.weight_g.data.fill_(1)
    if freeze_norm:
        layer.weight_g.requires_grad = False
    # weight_norm caches ``weight`` (recomputed each forward) with autograd history, computed before the
    # gain was reset; refresh it as a graph-free tensor so a fresh head is consistent and deep-copyable.
    with torch.no_grad():
        layer.weight = layer.weight_v * (layer.weight_g / layer.weight_v.norm(dim=1, keepdim=True))
    return layer


class IBOTHead(nn.Module):
    """MLP ``in_dim -> hidden_dim (x nlayers-1) -> bottleneck_dim``, L2 normalisation, then
    weight-normalised output layers: ``last_layer`` for [CLS] (``out_dim``) and ``last_layer2`` for
    patch tokens (``patch_out_dim``; the same module as ``last_layer`` when ``shared_head``).

    With ``bottleneck_dim <= 0`` there is no normalised bottleneck: the trunk's last linear layer
    projects [CLS] to ``out_dim`` and a separate ``mlp2`` projects patches (official behaviour).
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int = 8192, norm: str | None = None,
                 act: str = "gelu", last_norm: str | None = None, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, shared_head: bool = False) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if bottleneck_dim <= 0 and nlayers == 1:
            raise ValueError("bottleneck_dim <= 0 needs nlayers >= 2 (the patch branch reuses the trunk)")
        self.out_dim = out_dim
        self.patch_out_dim = out_dim if shared_head else patch_out_dim
        trunk_out = bottleneck_dim if bottleneck_dim > 0 else out_dim

        if nlayers == 1:
            self.mlp: nn.Module = nn.Linear(in_dim, trunk_out)
        else:
            layers: list[nn.Module] = []
            dims = [in_dim] + [hidden_dim] * (nlayers - 1)
            for layer_in, layer_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(layer_in, layer_out))
                # Official builds one norm instance and reuses it in every hidden layer; we build one
                # per layer (same parameter names, so checkpoints still load).
                hidden_norm = _build_norm(norm, hidden_dim)
                if hidden_norm is not None:
                    layers.append(hidden_norm)
                layers.append(_build_act(act))
            layers.append(nn.Linear(hidden_dim, trunk_out))
            self.mlp = _TokenSequential(*layers)
        self.apply(self._init_weights)  # before the output layers: those keep PyTorch's default init

        self.last_layer: nn.Module | None = (
            _weight_norm_linear(bottleneck_dim, out_dim, norm_last_layer) if bottleneck_dim > 0 else None)
        self.last_norm = _build_norm(last_norm, out_dim, affine=False)

        if shared_head:
            if self.last_layer is not None:
                self.last_layer2 = self.last_layer
            else:
                self.mlp2 = self.mlp[-1]
                self.last_layer2 = None
            self.last_norm2 = self.last_norm
        else:
            if bottleneck_dim > 0:
                self.last_layer2 = _weight_norm_linear(bottleneck_dim, patch_out_dim, norm_last_layer)
            else:
                self.mlp2 = nn.Linear(hidden_dim, patch_out_dim)
                self.last_layer2 = None
            self.last_norm2 = _build_norm(last_norm, patch_out_dim, affine=False)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    # -- building blocks -----------------------------------------------------------------------
    def features(self, x: Tensor) -> Tensor:
        """Trunk output fed to the output layers: the L2-normalised bottleneck (or, without a
        bottleneck, the last hidden activations)."""
        if self.last_layer is None:
            return self.mlp[:-1](x)
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def project_cls(self, feats: Tensor) -> Tensor:
        """[CLS] output layer (+ optional last norm) on ``features`` output."""
        x = self.last_layer(feats) if self.last_layer is not None else self.mlp[-1](feats)
        return self.last_norm(x) if self.last_norm is not None else x

    def project_patch(self, feats: Tensor) -> Tensor:
        """Patch output layer (+ optional last norm) on ``features`` output."""
        x = self.last_layer2(feats) if self.last_layer2 is not None else self.mlp2(feats)
        return self.last_norm2(x) if self.last_norm2 is not None else x

    # -- forwards ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Official forward. [B, D] -> [CLS]-style logits [B, out_dim]; [B, 1+N, D] tokens ([CLS]
        first) -> (cls logits [B, out_dim], patch logits [B, N, patch_out_dim])."""
        feats = self.features(x)
        if x.dim() == 2:
            return self.project_cls(feats)
        return self.project_cls(feats[:, 0]), self.project_patch(feats[:, 1:])

    def forward_cls(self, x_cls: Tensor) -> Tensor:
        """[CLS] logits for [CLS] tokens [..., D] -> [..., out_dim]."""
        return self.project_cls(self.features(x_cls))

    def forward_patch(self, x_patch: Tensor) -> Tensor:
        """Patch logits for any selection of patch tokens [..., D] -> [..., patch_out_dim].

        Equal to the matching rows of ``forward``'s patch logits unless the head has batch norms
        (their batch statistics depend on which tokens are passed)."""
        return self.project_patch(self.features(x_patch))

    def forward_patch_mean(self, x_patch: Tensor) -> Tensor:
        """Token mean of the patch logits, [B, N, D] -> [B, patch_out_dim], i.e.
        ``forward_patch(x_patch).mean(1)`` computed as the output layer applied to the mean feature
        (exact up to rounding because the output layer is linear). Feeds the teacher patch centre."""
        if self.last_norm2 is not None:
            raise ValueError("forward_patch_mean needs a linear patch output (last_norm=None)")
        return self.project_patch(self.features(x_patch).mean(dim=1))


def build_head(embed_dim: int, cfg: Mapping[str, Any], *, teacher: bool) -> IBOTHead:
    """Build the student or teacher head from config keys named as the official flags.

    Keys (defaults as official): ``out_dim`` (8192), ``patch_out_dim`` (8192), ``norm_last_layer``
    (True; student only, the official teacher head keeps the default True), ``shared_head`` (False,
    student), ``shared_head_teacher`` (True, teacher), ``act_in_head`` (or ``act``; 'gelu'),
    ``norm_in_head`` (None; ``use_bn_in_head: true`` is accepted as ``norm_in_head: 'bn'``), and
    ``head_hidden_dim`` (2048, the official head's fixed width; a reproduction setting, not a flag).
    """
    norm = cfg.get("norm_in_head") or ("bn" if cfg.get("use_bn_in_head", False) else None)
    if teacher:
        shared_head, norm_last_layer = cfg.get("shared_head_teacher", True), True
    else:
        shared_head, norm_last_layer = cfg.get("shared_head", False), cfg.get("norm_last_layer", True)
    return IBOTHead(embed_dim, cfg.get("out_dim", 8192), patch_out_dim=cfg.get("patch_out_dim", 8192),
                    norm=norm, act=cfg.get("act_in_head", cfg.get("act", "gelu")),
                    hidden_dim=cfg.get("head_hidden_dim", 2048), norm_last_layer=norm_last_layer,
                    shared_head=shared_head)


def loss_patch_out_dim(cfg: Mapping[str, Any]) -> int:
    """Patch logit size the loss (``center2``) is built with: ``out_dim`` when either head shares its
    output layer, else ``patch_out_dim`` (official ``same_dim`` rule)."""
    same_dim = cfg.get("shared_head", False) or cfg.get("shared_head_teacher", True)
    return cfg.get("out_dim", 8192) if same_dim else cfg.get("patch_out_dim", 8192)
