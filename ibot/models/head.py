"""iBOT projection head: a shared MLP trunk with one output layer for [CLS] and one for patch tokens.

Mirrors the official ``iBOTHead`` (bytedance/ibot ``models/head.py``) module for module, so parameter
names (``mlp.0``, ``mlp.2``, ``mlp.4``, ``last_layer.weight_g``/``weight_v``, ``last_layer2.*``) and
initialisation match and released checkpoints load strictly. Besides the official ``forward`` on all
tokens, ``forward_cls``/``forward_patch`` run the head on selected tokens only (e.g. the student's
masked patches), and ``forward_patch_mean`` gives the per-image token mean of the patch logits that
the teacher centre needs without projecting every token to the (large) output dimension.

The head-sharing ablations of paper Tab. 17 (``head_sharing``, ``HEAD_SHARING``) add an optional
patch-branch MLP tail, ``patch_mlp.*``; the official configurations build none.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["IBOTHead", "HEAD_SHARING", "build_head", "head_kwargs", "head_sharing_of", "loss_patch_out_dim"]

_BN_TYPES = (nn.BatchNorm1d, nn.SyncBatchNorm)


class _TokenSequential(nn.Sequential):
    """``nn.Sequential`` whose batch norms normalise over all leading dims of [..., C] token inputs."""

    def forward(self, x: Tensor) -> Tensor:  # type: ignore[override]
        return _run_tokens(self, x)


def _run_tokens(modules, x: Tensor) -> Tensor:
    for module in modules:
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

    Head-sharing ablations (paper Tab. 17) generalise the official head with two knobs:
    ``shared_mlp_layers`` (None = all ``nlayers``, official) is how many leading MLP linear layers (with
    their norm/act) the patch branch shares with [CLS]; the rest are the patch branch's own copy,
    ``patch_mlp.*`` (fresh init, as the trunk). ``shared_head`` says whether it shares the output layer.
    The official flags (all layers shared) build exactly the official modules, names and init order.
    """

    def __init__(self, in_dim: int, out_dim: int, patch_out_dim: int = 8192, norm: str | None = None,
                 act: str = "gelu", last_norm: str | None = None, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, norm_last_layer: bool = True, shared_head: bool = False,
                 shared_mlp_layers: int | None = None) -> None:
        super().__init__()
        nlayers = max(nlayers, 1)
        if bottleneck_dim <= 0 and nlayers == 1:
            raise ValueError("bottleneck_dim <= 0 needs nlayers >= 2 (the patch branch reuses the trunk)")
        shared_mlp_layers = nlayers if shared_mlp_layers is None else shared_mlp_layers
        if not 0 <= shared_mlp_layers <= nlayers:
            raise ValueError(f"shared_mlp_layers = {shared_mlp_layers}; expected 0..nlayers ({nlayers})")
        if bottleneck_dim <= 0 and shared_mlp_layers < nlayers:
            raise ValueError("a separate patch MLP (shared_mlp_layers < nlayers) needs bottleneck_dim > 0")
        self.out_dim = out_dim
        self.patch_out_dim = out_dim if shared_head else patch_out_dim
        self.shared_mlp_layers = shared_mlp_layers
        trunk_out = bottleneck_dim if bottleneck_dim > 0 else out_dim
        mlp_args = (in_dim, hidden_dim, trunk_out, nlayers, norm, act)

        self.mlp: nn.Module = _build_mlp(*mlp_args)
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

        # Index in ``mlp`` where the branches part (len(mlp) = fully shared: no patch_mlp). The patch MLP
        # is built last, so the official configurations draw their random init in the official order.
        modules = _mlp_modules(self.mlp)
        linear_at = [i for i, m in enumerate(modules) if isinstance(m, nn.Linear)] + [len(modules)]
        self._split = linear_at[shared_mlp_layers]
        if shared_mlp_layers < nlayers:
            self.patch_mlp = _TokenSequential(*_mlp_modules(_build_mlp(*mlp_args))[self._split:])
            self.patch_mlp.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    @property
    def separate_patch_mlp(self) -> bool:
        return hasattr(self, "patch_mlp")

    # -- building blocks -----------------------------------------------------------------------
    def _mlp_part(self, x: Tensor, start: int, stop: int | None) -> Tensor:
        """``mlp`` modules ``[start:stop]`` on ``x`` (identity when empty)."""
        return _run_tokens(_mlp_modules(self.mlp)[start:stop], x)

    def features(self, x: Tensor) -> Tensor:
        """[CLS]-branch trunk output fed to the output layers: the L2-normalised bottleneck (or, without
        a bottleneck, the last hidden activations)."""
        if self.last_layer is None:
            return self.mlp[:-1](x)
        return F.normalize(self.mlp(x), dim=-1, p=2)

    def patch_features(self, x: Tensor) -> Tensor:
        """Patch-branch trunk output: ``features`` unless the patch branch has its own MLP tail."""
        if not self.separate_patch_mlp:
            return self.features(x)
        return F.normalize(self.patch_mlp(self._mlp_part(x, 0, self._split)), dim=-1, p=2)

    def project_cls(self, feats: Tensor) -> Tensor:
        """[CLS] output layer (+ optional last norm) on ``features`` output."""
        x = self.last_layer(feats) if self.last_layer is not None else self.mlp[-1](feats)
        return self.last_norm(x) if self.last_norm is not None else x

    def project_patch(self, feats: Tensor) -> Tensor:
        """Patch output layer (+ optional last norm) on ``patch_features`` output."""
        x = self.last_layer2(feats) if self.last_layer2 is not None else self.mlp2(feats)
        return self.last_norm2(x) if self.last_norm2 is not None else x

    # -- forwards ------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        """Official forward. [B, D] -> [CLS]-style logits [B, out_dim]; [B, 1+N, D] tokens ([CLS]
        first) -> (cls logits [B, out_dim], patch logits [B, N, patch_out_dim])."""
        if x.dim() == 2:
            return self.project_cls(self.features(x))
        if not self.separate_patch_mlp:
            feats = self.features(x)
            return self.project_cls(feats[:, 0]), self.project_patch(feats[:, 1:])
        shared = self._mlp_part(x, 0, self._split)  # the shared layers see all tokens, as official
        cls = F.normalize(self._mlp_part(shared[:, 0], self._split, None), dim=-1, p=2)
        patch = F.normalize(self.patch_mlp(shared[:, 1:]), dim=-1, p=2)
        return self.project_cls(cls), self.project_patch(patch)

    def forward_cls(self, x_cls: Tensor) -> Tensor:
        """[CLS] logits for [CLS] tokens [..., D] -> [..., out_dim]."""
        return self.project_cls(self.features(x_cls))

    def forward_patch(self, x_patch: Tensor) -> Tensor:
        """Patch logits for any selection of patch tokens [..., D] -> [..., patch_out_dim].

        Equal to the matching rows of ``forward``'s patch logits unless the head has batch norms
        (their batch statistics depend on which tokens are passed)."""
        return self.project_patch(self.patch_features(x_patch))

    def forward_patch_mean(self, x_patch: Tensor) -> Tensor:
        """Token mean of the patch logits, [B, N, D] -> [B, patch_out_dim], i.e.
        ``forward_patch(x_patch).mean(1)``: the per-token patch features (through every non-linear layer,
        a separate patch MLP included) are averaged, then the output layer is applied once; exact up
        to rounding because that layer is linear (or affine: ``mlp2``). Feeds the teacher patch centre."""
        if self.last_norm2 is not None:
            raise ValueError("forward_patch_mean needs a linear patch output (last_norm=None)")
        return self.project_patch(self.patch_features(x_patch).mean(dim=1))


def _build_mlp(in_dim: int, hidden_dim: int, trunk_out: int, nlayers: int, norm: str | None, act: str) -> nn.Module:
    """The official trunk (models/head.py:71-89): Linear [+ norm] + act per hidden layer, then Linear."""
    if nlayers == 1:
        return nn.Linear(in_dim, trunk_out)
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
    return _TokenSequential(*layers)


def _mlp_modules(mlp: nn.Module) -> list[nn.Module]:
    return [mlp] if isinstance(mlp, nn.Linear) else list(mlp)


#: ``head_sharing`` variants (paper Tab. 17) -> per network (student, teacher): (patch branch shares the
#: output layer, leading MLP linear layers the patch branch shares; None = all, -1 = all but the last).
#: ``flags`` is not listed: it reads the official ``shared_head``/``shared_head_teacher``.
HEAD_SHARING: dict[str, tuple[tuple[bool, int | None], tuple[bool, int | None]]] = {
    "vanilla": ((False, 0), (False, 0)),
    "shared": ((True, None), (True, None)),
    "shared_partial": ((False, -1), (False, -1)),
    "semi_shared": ((False, 0), (True, None)),
    "semi_shared_partial": ((False, -1), (True, None)),
}


def head_sharing_of(cfg: Mapping[str, Any], *, teacher: bool) -> tuple[bool, int | None]:
    """(shares the output layer, shared MLP layers: None = all, -1 = all but the last) of one network.

    ``head_sharing: flags`` (default) is the official head (models/head.py:161-179): the patch branch
    always shares the whole MLP, the output layer per ``shared_head`` (student) / ``shared_head_teacher``
    (teacher; main_ibot.py:233,243)."""
    variant = cfg.get("head_sharing") or "flags"
    if variant == "flags":
        return bool(cfg.get("shared_head_teacher", True) if teacher else cfg.get("shared_head", False)), None
    if variant not in HEAD_SHARING:
        raise ValueError(f"pretrain.head_sharing: unknown variant {variant!r}; expected flags or one of "
                         f"{sorted(HEAD_SHARING)}")
    return HEAD_SHARING[variant][int(teacher)]


def build_head(embed_dim: int, cfg: Mapping[str, Any], *, teacher: bool) -> IBOTHead:
    """Build the student or teacher head from config keys named as the official flags.

    Keys (defaults as official): ``out_dim`` (8192), ``patch_out_dim`` (8192), ``norm_last_layer``
    (True; student only, the official teacher head keeps the default True), ``shared_head`` (False,
    student), ``shared_head_teacher`` (True, teacher), ``act_in_head`` (or ``act``; 'gelu'),
    ``norm_in_head`` (None; ``use_bn_in_head: true`` is accepted as ``norm_in_head: 'bn'``),
    ``head_hidden_dim`` (2048, the official head's fixed width; a reproduction setting, not a flag) and
    ``head_sharing`` ('flags': the two official flags; else a Tab. 17 variant of ``HEAD_SHARING``, which
    then overrides them).
    """
    return IBOTHead(embed_dim, **head_kwargs(cfg, teacher=teacher))


def head_kwargs(cfg: Mapping[str, Any], *, teacher: bool) -> dict[str, Any]:
    """``IBOTHead`` keyword arguments (all but ``in_dim``) of ``build_head``."""
    norm = cfg.get("norm_in_head") or ("bn" if cfg.get("use_bn_in_head", False) else None)
    shared_head, shared_layers = head_sharing_of(cfg, teacher=teacher)
    nlayers = 3  # official fixed depth (models/head.py:147)
    if shared_layers is not None and shared_layers < 0:
        shared_layers += nlayers
    return dict(out_dim=cfg.get("out_dim", 8192), patch_out_dim=cfg.get("patch_out_dim", 8192), norm=norm,
                act=cfg.get("act_in_head", cfg.get("act", "gelu")), nlayers=nlayers,
                hidden_dim=cfg.get("head_hidden_dim", 2048),
                norm_last_layer=True if teacher else cfg.get("norm_last_layer", True),
                shared_head=shared_head, shared_mlp_layers=shared_layers)


def loss_patch_out_dim(cfg: Mapping[str, Any]) -> int:
    """Patch logit size the loss (``center2``) is built with: ``out_dim`` when either head's patch branch
    shares its output layer, else ``patch_out_dim`` (official ``same_dim`` rule, main_ibot.py:270-273,
    applied to the ``head_sharing`` variant)."""
    same_dim = head_sharing_of(cfg, teacher=False)[0] or head_sharing_of(cfg, teacher=True)[0]
    return cfg.get("out_dim", 8192) if same_dim else cfg.get("patch_out_dim", 8192)
