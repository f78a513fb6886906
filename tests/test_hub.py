"""Checkpoints for the timm ecosystem: ``ibot export`` writes timm's Hugging Face layout, timm loads it offline
with our backbone's outputs, and a model entry evaluates such a folder (or a timm file) by its timm name.

Sources are stand-ins in the released key layouts: ViT-S/16 as the official ``checkpoint_teacher.pth``
(``{'state_dict': ...}``), Swin-T/7 as the official Swin model's state dict (official models/swin_transformer.py,
executed from the mirror as in tests/test_swin.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from functools import partial
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import save_file
from test_swin import _official_swin_tiny, official  # noqa: F401  (the official Swin fixture)

from ibot.checkpoint import BackboneCheckpoint, CheckpointError
from ibot.cli import main as ibot_main
from ibot.config import ConfigError, load_workflow_config, model_spec
from ibot.models.pretrained import build_pretrained_backbone
from ibot.models.vision_transformer import build_backbone

ROOT = Path(__file__).resolve().parents[1]


def _released_vit_small(path: Path) -> torch.nn.Module:
    """A ViT-S/16 with non-trivial weights, saved as the official checkpoint_teacher.pth ({'state_dict'})."""
    torch.manual_seed(0)
    model = build_backbone("vit_small", patch_size=16, masked_im_modeling=False).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.02 * torch.randn_like(param))
    torch.save({"state_dict": model.state_dict()}, path)
    return model


def test_vit_small_export_loads_in_timm_with_identical_outputs(tmp_path, capsys):
    source = tmp_path / "checkpoint_teacher.pth"
    _released_vit_small(source)
    out = tmp_path / "hub" / "vits16"
    assert ibot_main(["export", str(source), "--arch", "vit_small", "--out", str(out)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architecture"] == "vit_small_patch16_224" and config["num_classes"] == 0
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406] and config["pretrained_cfg"]["crop_pct"] == 0.875
    assert config["ibot"]["network"] == "teacher" and len(config["ibot"]["sha256"]) == 64

    ours = build_pretrained_backbone({"arch": "vit_small", "patch_size": 16}, source).eval()
    by_file = timm.create_model("vit_small_patch16_224", pretrained=True, num_classes=0,
                                pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        expected = ours(images)
        assert torch.equal(by_file.forward_features(images), expected)
        assert torch.equal(by_folder.forward_features(images), expected)
        assert torch.equal(by_folder(images), expected[:, 0])  # timm's pooled output = our [CLS]
    assert timm.data.resolve_data_config({}, model=by_folder)["crop_pct"] == 0.875

    # an existing folder is never written over; a wrong architecture fails naming the keys
    with pytest.raises(SystemExit) as exit_info:
        ibot_main(["export", str(source), "--arch", "vit_small", "--out", str(out)])
    assert exit_info.value.code == 2 and "exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        ibot_main(["export", str(source), "--arch", "vit_base", "--out", str(tmp_path / "wrong")])
    assert "does not match the model" in capsys.readouterr().err and not (tmp_path / "wrong").exists()


def test_swin_tiny_export_loads_in_timm(official, tmp_path):  # noqa: F811
    reference = _official_swin_tiny(official, 7, masked=False)
    source = tmp_path / "checkpoint_teacher.pth"
    torch.save({"state_dict": reference.state_dict()}, source)  # the official Swin key layout
    out = tmp_path / "swint7"
    assert ibot_main(["export", str(source), "--arch", "swin_tiny", "--patch-size", "4", "--window-size", "7",
                      "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["architecture"] == "swin_tiny_patch4_window7_224"

    ours = build_pretrained_backbone({"arch": "swin_tiny", "patch_size": 4, "window_size": 7}, source).eval()
    weights = dict(file=str(out / "model.safetensors"))
    exact = timm.create_model("swin_tiny_patch4_window7_224", pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=weights, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).eval()
    plain = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # timm's own LayerNorm eps (1e-5)
    images = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        tokens = ours(images)
        assert torch.allclose(exact.forward_features(images).flatten(1, 2), tokens[:, 1:], atol=1e-5, rtol=0)
        assert torch.allclose(exact(images), tokens[:, 0], atol=1e-5, rtol=0)  # avg pool = iBOT's Swin "CLS"
        assert torch.allclose(plain(images), tokens[:, 0], atol=1e-3, rtol=0)
        assert torch.allclose(ours(images), reference(images), atol=1e-4)


def test_model_entry_evaluates_a_timm_folder_or_file(tmp_path):
    """The reverse: models.<name>.timm_model + a folder in timm's HF layout or a timm state-dict file."""
    source = tmp_path / "checkpoint_teacher.pth"
    model = _released_vit_small(source)
    folder = tmp_path / "dino_vits16"
    ibot_main(["export", str(source), "--arch", "vit_small", "--out", str(folder)])
    timm_file = tmp_path / "vits16.safetensors"
    save_file(timm.create_model("vit_small_patch16_224", num_classes=0, pretrained=False).state_dict()
              | {k: v for k, v in model.state_dict().items()}, timm_file)

    config_file = tmp_path / "config.yaml"
    base = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    base.update(models={"from_folder": {"timm_model": "vit_small_patch16_224.dino", "checkpoint": str(folder)},
                        "from_file": {"timm_model": "vit_small_patch16_224", "checkpoint": str(timm_file)}},
                stages=["knn"])
    config_file.write_text(yaml.safe_dump(base))
    config, _ = load_workflow_config([config_file])
    for name in ("from_folder", "from_file"):
        entry = config["models"][name]
        assert entry["weights"] == "checkpoint" and model_spec(config, name).as_dict() == {
            "arch": "vit_small", "patch_size": 16, "depth": None}
        checkpoint = BackboneCheckpoint(Path(entry["checkpoint"]))
        loaded = build_pretrained_backbone(model_spec(config, name), checkpoint).eval()
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
        assert len(checkpoint.sha256) == 64

    # what snakemake runs: the resolved DAG evaluates both entries with their folder/file as the input
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "-p", "-s", str(ROOT / "Snakefile"),
                             "--configfile", str(config_file), "--directory", str(tmp_path)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"--checkpoint {folder}" in result.stdout and f"--checkpoint {timm_file}" in result.stdout

    with pytest.raises(ConfigError, match="says architecture"):
        base["models"] = {"bad": {"timm_model": "vit_base_patch16_224", "checkpoint": str(folder)}}
        config_file.write_text(yaml.safe_dump(base))
        load_workflow_config([config_file])
    with pytest.raises(CheckpointError, match="without model.safetensors"):
        BackboneCheckpoint(tmp_path).state


def test_ibot_command_help_and_entry_point(capsys):
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ibot"] == "ibot.cli:main"
    with pytest.raises(SystemExit) as exit_info:
        ibot_main(["--help"])
    assert exit_info.value.code == 0
    top = capsys.readouterr().out
    commands = ["explain", "coverage", "plan", "compare", "tables", "dvc-track", "dvc-pull", "export"]
    assert all(command in top for command in commands)
    for command in commands:
        with pytest.raises(SystemExit) as exit_info:
            ibot_main([command, "--help"])
        text = capsys.readouterr().out
        assert exit_info.value.code == 0 and "example:" in text and f"ibot {command}" in text, text


def test_ibot_explain_and_plan_run_as_their_python_m_forms(capsys):
    assert ibot_main(["explain", "--model", "vit_tiny", "--stage", "linear"]) == 0
    explained = capsys.readouterr().out
    from ibot.config import main as config_main
    assert config_main(["explain", "--model", "vit_tiny", "--stage", "linear"]) == 0
    assert capsys.readouterr().out == explained and "# linear for vit_tiny" in explained
    assert ibot_main(["plan", "--configfile", str(ROOT / "config" / "paper.yaml")]) == 0
    assert "GPU-h" in capsys.readouterr().out
