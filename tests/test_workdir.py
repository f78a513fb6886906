"""The one resume rule (ibot.workdir) and the launcher's re-attach guard: fast unit tests."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ibot.io import write_json_atomic
from ibot.workdir import (FINGERPRINT_FILE, dataset_identity, prepare_work_dir, stage_fingerprint)

SPEC = {"arch": "vit_tiny", "patch_size": 16, "depth": 2}


def _fingerprint(data: Path, **config) -> dict:
    return stage_fingerprint(stage="linear", config={"epochs": 2, "lr": 0.1, "log_every": 5, **config},
                             model_spec=SPEC, checkpoint_sha256=None, data={"imagenet": data}, seed=0, world_size=1,
                             operational_keys=("log_every",))


@pytest.fixture()
def data(tmp_path: Path) -> Path:
    root = tmp_path / "imagenet"
    (root / "train" / "a").mkdir(parents=True)
    (root / "train" / "a" / "x.JPEG").write_bytes(b"123")
    return root


def test_same_fingerprint_resumes_and_keeps_the_work(tmp_path: Path, data: Path) -> None:
    work = tmp_path / "work"
    first = prepare_work_dir(work, _fingerprint(data))
    assert not first.resumed and first.stale is None and (work / FINGERPRINT_FILE).is_file()
    (work / "checkpoint.pth").write_bytes(b"state")
    lines: list[str] = []
    again = prepare_work_dir(work, _fingerprint(data), log=lines.append)
    assert again.resumed and again.digest == first.digest and (work / "checkpoint.pth").read_bytes() == b"state"
    assert len(lines) == 1 and "resuming" in lines[0]


def test_operational_keys_do_not_change_the_fingerprint(data: Path) -> None:
    assert _fingerprint(data, log_every=1) == _fingerprint(data, log_every=100)


@pytest.mark.parametrize("change", [{"lr": 0.2}, {"epochs": 3}, {"epochs": 1}])
def test_changed_config_moves_the_work_aside_and_starts_fresh(tmp_path: Path, data: Path, change: dict) -> None:
    """Any config change, ``epochs`` up or down included, starts fresh: every schedule depends on it."""
    work = tmp_path / "work"
    prepare_work_dir(work, _fingerprint(data))
    (work / "checkpoint.pth").write_bytes(b"old state")
    lines: list[str] = []
    fresh = prepare_work_dir(work, _fingerprint(data, **change), log=lines.append)
    assert not fresh.resumed and fresh.stale is not None and fresh.stale.name.startswith("work.stale-")
    assert (fresh.stale / "checkpoint.pth").read_bytes() == b"old state"  # moved, never deleted
    assert not (work / "checkpoint.pth").exists()
    assert json.loads((work / FINGERPRINT_FILE).read_text())["digest"] == fresh.digest
    assert len(lines) == 1 and "moved aside" in lines[0]
    key, value = next(iter(change.items()))
    assert f"config.{key}:" in lines[0] and repr(value) in lines[0]  # names what changed


def test_each_ingredient_changes_the_fingerprint(tmp_path: Path, data: Path) -> None:
    """What a stage context fingerprints (ibot.run.context.StageContext.fingerprint): stage, config, model,
    the checkpoint's and every config-named input file's content, dataset, seed; and the process count."""
    from dataclasses import replace

    from ibot.checkpoint import BackboneCheckpoint
    from ibot.models.specs import ModelSpec
    from ibot.run.context import StageContext
    from ibot.stages import stage_defaults

    import torch

    ckpt, heads = tmp_path / "w.pth", tmp_path / "heads.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 4)}, ckpt)
    heads.write_bytes(b"heads")
    base = StageContext(stage="semi_supervised", config=stage_defaults("semi_supervised"), model=ModelSpec.of(SPEC),
                        out=tmp_path / "semi_supervised" / "metrics.json", data={"imagenet": data})
    fingerprint = base.fingerprint()
    variants = [
        replace(base, stage="finetune"),
        replace(base, config={**base.config, "finetune_head_layer": 2}),
        replace(base, model=ModelSpec.of({**SPEC, "depth": 3})),
        replace(base, checkpoint=BackboneCheckpoint(ckpt)),
        replace(base, config={**base.config, "heads": str(heads)}),  # a file_keys file: by content
        replace(base, seed=1),
    ]
    for variant in variants:
        assert variant.fingerprint() != fingerprint, variant
    assert stage_fingerprint(**{**{k: fingerprint[k] for k in ("stage", "config", "seed")}, "model_spec": SPEC,
                                "checkpoint_sha256": None, "data": {"imagenet": data}, "world_size": 2}) != fingerprint
    with_ckpt, with_heads = variants[3].fingerprint()["checkpoint_sha256"], variants[4].fingerprint()["files"]
    torch.save({"cls_token": torch.ones(1, 1, 4)}, ckpt)  # same path, other content: another fingerprint
    heads.write_bytes(b"other heads")
    assert replace(base, checkpoint=BackboneCheckpoint(ckpt)).fingerprint()["checkpoint_sha256"] != with_ckpt
    assert replace(base, config={**base.config, "heads": str(heads)}).fingerprint()["files"] != with_heads
    # a frozen MIM tokenizer (pretrain.mim_tokenizer) is a backbone export and the heads.pth beside it
    export = tmp_path / "tok" / "teacher_backbone.pth"
    export.parent.mkdir()
    export.write_bytes(b"backbone")
    pretrain = replace(base, stage="pretrain", config={**stage_defaults("pretrain"), "mim_tokenizer": str(export)})
    assert set(pretrain.fingerprint()["files"]) == {"mim_tokenizer"}  # no heads beside it: the file alone
    (export.parent / "heads.pth").write_bytes(b"heads")
    files = pretrain.fingerprint()["files"]
    assert set(files) == {"mim_tokenizer", "mim_tokenizer:heads"}
    (export.parent / "heads.pth").write_bytes(b"retrained heads")
    assert pretrain.fingerprint()["files"]["mim_tokenizer:heads"] != files["mim_tokenizer:heads"]


def test_dataset_identity_follows_the_files(data: Path) -> None:
    before = dataset_identity(data)
    assert before["files"] == 1
    (data / "train" / "a" / "y.JPEG").write_bytes(b"4")
    added = dataset_identity(data)
    assert added["file_list_sha256"] != before["file_list_sha256"]
    (data / "train" / "a" / "y.JPEG").write_bytes(b"45")  # same names, another size
    assert dataset_identity(data)["file_list_sha256"] != added["file_list_sha256"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dataset_identity(data / "missing")


def test_embedded_sets_are_identified_by_their_manifest(tmp_path: Path) -> None:
    from ibot.data.embedded import EmbeddedSizes, generate

    sizes = EmbeddedSizes(classes=2, train_per_class=2, val_per_class=1, c_per_class=1, a_classes=1, image_size=32)
    root = generate(tmp_path, seed=0, sets=["imagenet"], sizes=sizes)["imagenet"]
    done = (root / "DONE").read_text().strip()
    assert dataset_identity(root)["manifest_sha256"] == done
    train = dataset_identity(root / "train")  # pretraining reads <set>/train
    assert train["manifest_sha256"] == done and train["relative_to_manifest"] == "train"


def test_work_dir_without_fingerprint_is_moved_aside(tmp_path: Path, data: Path) -> None:
    """Work from before fingerprints (or from unknown code) is never trusted."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "checkpoint.pth").write_bytes(b"legacy")
    lines: list[str] = []
    fresh = prepare_work_dir(work, _fingerprint(data), log=lines.append)
    assert fresh.stale is not None and (fresh.stale / "checkpoint.pth").read_bytes() == b"legacy"
    assert f"no {FINGERPRINT_FILE}" in lines[0]


def test_two_stale_moves_in_one_second_keep_both(tmp_path: Path, data: Path) -> None:
    work = tmp_path / "work"
    stale = []
    for lr in (0.1, 0.2, 0.3):
        result = prepare_work_dir(work, _fingerprint(data, lr=lr))
        (work / "marker").write_text(str(lr))
        stale.append(result.stale)
    kept = sorted(tmp_path.glob("work.stale-*"))
    assert len(kept) == 2 and {(p / "marker").read_text() for p in kept} == {"0.1", "0.2"}


def test_launcher_refuses_to_reattach_a_job_running_another_call(tmp_path: Path) -> None:
    """A killed caller's job that still runs is re-attached only for the same call."""
    from ibot.run.launcher import call_digest, launch

    # a live process whose command line names submitit (what the launcher checks for local jobs)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    try:
        job_dir = tmp_path / "job"
        record = {"job_id": str(sleeper.pid), "cluster": "local", "folder": str(job_dir / "submitit"),
                  "num_tasks": 1, "entry": "json:dumps", "call_digest": call_digest("json:dumps", {"obj": 1}),
                  "submitted": time.time()}
        write_json_atomic(record, job_dir / "job.json")
        with pytest.raises(RuntimeError, match=f"job {sleeper.pid} .* still runs for another setup"):
            launch("json:dumps", {"obj": 2}, job_dir=job_dir, resources={"cluster": "local"}, name="t")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_metrics_refuse_a_checkpoint_modified_while_the_stage_ran(tmp_path: Path) -> None:
    """metrics.json never pairs a result with weights it was not computed from."""
    from ibot.metrics import read_metrics, write_metrics

    ckpt = tmp_path / "teacher_backbone.pth"
    ckpt.write_bytes(b"weights v1")
    started = time.time()
    time.sleep(0.05)
    common = dict(run="r", model="m", stage="knn", task="knn", dataset="d", protocol="p", metrics={"top1": 1.0},
                  config={}, checkpoint=ckpt)
    write_metrics(tmp_path / "ok.json", wall_time_s=time.time() - started, **common)
    assert read_metrics(tmp_path / "ok.json")["checkpoint"]["sha256"]
    ckpt.write_bytes(b"weights v2")  # e.g. pretraining rerun while this stage computed
    with pytest.raises(RuntimeError, match="modified while the stage ran"):
        write_metrics(tmp_path / "stale.json", wall_time_s=time.time() - started, **common)
    assert not (tmp_path / "stale.json").exists()


# -- code identity and the fresh switch ------------------------------------------------------------------
def _project_copy(tmp_path: Path) -> Path:
    import shutil

    root = Path(__file__).resolve().parents[1]
    copy = tmp_path / "project"
    for package in ("ibot", "downstream"):
        shutil.copytree(root / package, copy / package, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def test_code_identity_follows_computing_code_not_comments_docstrings_or_logs(tmp_path: Path) -> None:
    from ibot.code_identity import code_identity

    copy = _project_copy(tmp_path)
    entry = "downstream.linear:run"
    before = code_identity(entry, copy)
    assert {"downstream.linear", "downstream.engine.linear", "ibot.models.vision_transformer"} <= set(before["modules"])
    assert not {"ibot.progress", "ibot.tensorboard", "ibot.metrics", "ibot.run.launcher"} & set(before["modules"])
    assert code_identity(entry, copy) == before

    engine = copy / "downstream" / "engine" / "linear.py"
    source = engine.read_text()
    # a comment, a docstring, blank lines and a log line: the same code
    assert source.startswith('"""')
    engine.write_text('"""Reworded: ' + source[3:].replace("\ndef ", "\n\n# a new comment\ndef ", 1)
                      + "\n\nprint('loaded')  # log only\n")
    assert code_identity(entry, copy) == before
    # a change to what the stage computes (a module it imports): another identity, naming that module
    stage = copy / "downstream" / "linear.py"
    stage.write_text(stage.read_text().replace("seed_everything(ctx.seed)", "seed_everything(ctx.seed + 1)"))
    after = code_identity(entry, copy)
    changed = {m for m in before["modules"] if before["modules"][m] != after["modules"][m]}
    assert after["digest"] != before["digest"] and changed == {"downstream.linear"}


def test_changed_code_moves_the_work_aside_naming_the_module(tmp_path: Path, data: Path) -> None:
    def fingerprint(digest: str) -> dict:
        return stage_fingerprint(stage="linear", config={"epochs": 2}, model_spec=SPEC, checkpoint_sha256=None,
                                 data={"imagenet": data}, seed=0, world_size=1,
                                 code={"digest": digest, "modules": {"downstream.linear": digest}})

    work = tmp_path / "work"
    prepare_work_dir(work, fingerprint("a"))
    (work / "state.pth").write_bytes(b"old")
    lines: list[str] = []
    result = prepare_work_dir(work, fingerprint("b"), log=lines.append)
    assert not result.resumed and (result.stale / "state.pth").read_bytes() == b"old"
    assert "code.modules.downstream.linear: 'a' -> 'b'" in lines[0]


def test_fresh_request_moves_matching_work_aside_once_per_request(tmp_path: Path, data: Path) -> None:
    from ibot.workdir import FRESH_ENV, fresh_request

    work = tmp_path / "work"
    prepare_work_dir(work, _fingerprint(data))
    (work / "state.pth").write_bytes(b"old")
    lines: list[str] = []
    fresh = prepare_work_dir(work, _fingerprint(data), fresh="token-1", log=lines.append)
    assert not fresh.resumed and (fresh.stale / "state.pth").read_bytes() == b"old"
    assert "fresh recompute was requested" in lines[0]
    (work / "state.pth").write_bytes(b"new")  # the fresh run's own progress: a requeue of it resumes
    assert prepare_work_dir(work, _fingerprint(data), fresh="token-1").resumed
    assert prepare_work_dir(work, _fingerprint(data)).resumed  # a later plain run resumes the fresh work
    assert not prepare_work_dir(work, _fingerprint(data), fresh="token-2").resumed
    assert len(list(tmp_path.glob("work.stale-*"))) == 2

    environ = {FRESH_ENV: json.dumps({"stages": ["linear"], "token": "t"})}
    assert fresh_request("linear", environ) == "t" and fresh_request("finetune", environ) is None
    assert fresh_request("linear", {}) is None
    with pytest.raises(ValueError, match=FRESH_ENV):
        fresh_request("linear", {FRESH_ENV: "linear"})
