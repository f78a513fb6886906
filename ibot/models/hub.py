"""Backbones in timm's Hugging Face layout: ``ibot export`` writes them, the checkpoint loader reads them.

The export is timm's own: the backbone's weights are loaded strictly into ``timm.create_model(<timm name>,
num_classes=0)`` (:data:`ibot.models.specs.TIMM_ARCHITECTURES`: the same module tree and parameter names)
and written by ``timm.models._hub.save_for_hf`` (what ``push_to_hf_hub`` uploads): ``model.safetensors``
and ``config.json`` with the ``architecture``, the ``model_args`` the name does not carry (an embedded
depth, the image size of the position table, Swin-T/14's window) and the ``pretrained_cfg`` with the
evaluation preprocessing of the official code (ImageNet mean/std, bicubic resize 256 -> centre crop 224:
eval_linear.py:40-45). The mask token (``masked_embed``) is left out: timm has none and it is unused
outside masked pretraining. So::

    timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                      pretrained_cfg_overlay=dict(file="hub/model.safetensors"))
    timm.create_model("local-dir:hub", pretrained=True)        # architecture and model_args from config.json

give our backbone's outputs (ViT: identical). timm's Swin-T uses LayerNorm eps 1e-5 where the official
iBOT Swin uses 1e-6 (models/swin_transformer.py:548); pass ``norm_layer=partial(nn.LayerNorm, eps=1e-6)``
for identical outputs (the eps cannot be written in ``config.json``: timm's Swin takes no norm-layer name).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ibot.models.specs import SWIN_ARCHITECTURES, TIMM_ARCHITECTURES, VIT_ARCHITECTURES, ModelSpec

__all__ = ["EXPORT_HELP", "EXPORT_EXAMPLE", "HF_CONFIG", "HF_WEIGHTS", "timm_architecture", "export_timm",
           "add_export_arguments", "export_command"]

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
EXPORT_HELP = ("write a pretrained backbone (ours, or a released iBOT/DINO file) in timm's Hugging Face layout "
               "(model.safetensors + config.json), loadable with timm.create_model(..., pretrained=True)")
EXPORT_EXAMPLE = ("ibot export results/paper/vit_small/pretrain/teacher_backbone.pth --arch vit_small --out hub/vits16\n"
                  "  python -c \"import timm; timm.create_model('local-dir:hub/vits16', pretrained=True)\"")
#: The official evaluation preprocessing (eval_linear.py:40-45: Resize(256, bicubic), CenterCrop(224),
#: ImageNet normalisation), recorded in ``pretrained_cfg`` for timm's ``resolve_data_config``.
EVAL_DATA_CONFIG = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225), "interpolation": "bicubic",
                    "crop_pct": 224 / 256, "crop_mode": "center"}


def timm_architecture(spec: ModelSpec, img_size: int) -> tuple[str, dict[str, Any]]:
    """The timm name of ``spec`` and the ``model_args`` that give it our sizes (``img_size``: the position
    table's image size)."""
    import timm

    name = TIMM_ARCHITECTURES[spec.arch].format(patch=spec.patch_size)
    args: dict[str, Any] = {"img_size": img_size}
    if spec.arch in VIT_ARCHITECTURES:
        if name not in timm.list_models(name):
            name, args["patch_size"] = TIMM_ARCHITECTURES[spec.arch].format(patch=16), spec.patch_size
        if spec.depth is not None and spec.depth != VIT_ARCHITECTURES[spec.arch].depth:
            args["depth"] = spec.depth
    else:
        size = SWIN_ARCHITECTURES[spec.arch]
        window = spec.window_size or size.window_size
        if spec.arch != "swin_tiny":
            args.update(embed_dim=size.patch_embed_dim, depths=list(size.depths), num_heads=list(size.num_heads))
        if window != 7:
            args["window_size"] = window
    return name, args


def export_timm(spec: ModelSpec, checkpoint: str | Path, out: str | Path, *, checkpoint_key: str | None = None
                ) -> Path:
    """Write ``checkpoint``'s backbone to the folder ``out`` in timm's HF layout (see the module docstring).

    The weights are read by the one loader (strict: our exports, released iBOT/DINO files, full
    checkpoints with ``checkpoint_key``). The folder appears complete or not at all (written beside it,
    then renamed); an existing ``out`` is refused before any work.
    """
    import timm
    from timm.models._hub import save_for_hf

    from ibot.checkpoint import BackboneCheckpoint, CheckpointError, OPTIONAL_BACKBONE_KEYS
    from ibot.models.pretrained import build_pretrained_backbone

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"export: {out} exists; choose a new folder (an export is never written over another)")
    source = BackboneCheckpoint(Path(checkpoint), checkpoint_key)
    img_size = source.native_img_size(spec.patch_size, 224)
    ours = build_pretrained_backbone(spec, source, img_size=img_size)
    name, model_args = timm_architecture(spec, img_size)
    model = timm.create_model(name, pretrained=False, num_classes=0, **model_args)
    state = {k: v for k, v in ours.state_dict().items() if k not in OPTIONAL_BACKBONE_KEYS}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"export: {name} does not have our {spec.arch} layout: missing {missing[:8]}, "
                              f"unexpected {unexpected[:8]}")
    provenance = {"source": str(checkpoint), "sha256": source.sha256, "network": source.network,
                  "spec": spec.as_dict(), "paper": "arXiv:2111.07832"}
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_for_hf(model, staging, safe_serialization=True, model_args=model_args,
                    data_config=dict(EVAL_DATA_CONFIG),
                    model_config={"pretrained_cfg": {"tag": "ibot"}, "ibot": provenance})
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def add_export_arguments(parser) -> None:
    parser.add_argument("checkpoint", type=Path, help="backbone weights: our *_backbone.pth, a released "
                        "checkpoint_teacher.pth / checkpoint_student.pth, a full checkpoint.pth (with --checkpoint-key)")
    parser.add_argument("--checkpoint-key", default=None, help="top-level key of the weights, e.g. teacher (auto if omitted)")
    ModelSpec.add_arguments(parser)
    parser.add_argument("--out", required=True, type=Path, help="folder to create (model.safetensors + config.json)")


def export_command(args, parser) -> int:
    """``ibot export``: errors name the file and exit with status 2."""
    from ibot.checkpoint import CheckpointError

    try:
        out = export_timm(ModelSpec.from_args(args), args.checkpoint, args.out, checkpoint_key=args.checkpoint_key)
    except (CheckpointError, FileExistsError, ValueError) as error:
        parser.exit(2, f"ibot export: error: {error}\n")
    name = json.loads((out / HF_CONFIG).read_text())["architecture"]
    print(f"[export] {out}/{HF_WEIGHTS} + {HF_CONFIG} ({name}); load with timm.create_model('local-dir:{out}', "
          f"pretrained=True)")
    return 0
