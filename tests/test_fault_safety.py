"""Kill-anywhere safety of local pretraining, and the bad-input suite for checkpoints and training.

Kill anywhere: ``ibot.train``'s CLI (debug cluster: training runs in the killed process) is SIGKILLed
at seeded random points (startup, mid-iteration, right after a temp checkpoint file appears, during
the export) and rerun until it completes; each time the final teacher must be bit-identical to an
uninterrupted ``python -m ibot.train`` run and the latest checkpoint must always load.

To keep ~15 process starts within the time budget on 2 shared cores, the killed runs are forked
from a multiprocessing *forkserver* that has imported torch and ibot once (a fresh interpreter,
never a fork of pytest); each child runs ``ibot.train.__main__.main(argv)`` exactly as the CLI
does and is killed with SIGKILL. The reference run is a real ``python -m ibot.train`` subprocess,
so the comparison also proves the forked runs compute what the CLI computes.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ibot.checkpoint import CheckpointError, export_backbone, load_backbone_weights, load_file, save_atomic
from ibot.config import deep_merge
from ibot.data.embedded import EmbeddedSizes, generate
from ibot.models.vision_transformer import build_backbone
from ibot.train import pretrain
from ibot.stages import stage_defaults
from ibot.train.pretrain import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--arch", "vit_tiny", "--depth", "2", "--patch-size", "8"]
SPEC = {"arch": "vit_tiny", "patch_size": 8, "depth": 2}
#: 24 images / global batch 8 = 3 iterations per epoch, 2 epochs; drop path on (tests RNG restore)
CONFIG = {"out_dim": 256, "patch_out_dim": 256, "global_crops_size": 32, "local_crops_size": 16,
          "local_crops_number": 2, "batch_size_per_gpu": 8, "epochs": 2, "num_workers": 0,
          "warmup_epochs": 1, "warmup_teacher_temp_epochs": 1, "saveckp_freq": 0, "log_every": 1}
KILLS_PER_TRIAL = 4   # kills per trial at most; each trial then completes and is compared
MIN_TRIALS, MIN_KILLS, MAX_TRIALS = 3, 12, 8


@pytest.fixture(scope="module")
def train_dir(tmp_path_factory) -> Path:
    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=1, a_classes=3, image_size=32)
    return generate(tmp_path_factory.mktemp("faultdata"), sets=["imagenet"], sizes=sizes)["imagenet"] / "train"


def _summary(out: Path) -> dict:
    """The pretraining run's summary, from its metrics.json (``extra.summary``)."""
    return json.loads((out / "metrics.json").read_text())["extra"]["summary"]


def _argv(data: Path, out: Path, config: dict = CONFIG) -> list[str]:
    return ["--data", f"imagenet={data}", "--out", str(out / "metrics.json"), *TINY, "--resources",
            json.dumps({"cluster": "debug"}), "--config", json.dumps(config)]


def _child_main(argv: list[str], log_path: str) -> None:
    """Forked child: the CLI's main, output to a log file, one intra-op thread (as OMP_NUM_THREADS=1)."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    from ibot.train.__main__ import main
    main(argv)


def _forkserver() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "ibot.train.__main__", "ibot.train.pretrain", "test_fault_safety"])
    return ctx


def _temps(folder: Path, name: str) -> set[str]:
    return {p.name for p in folder.glob(f".{name}.*.tmp")} if folder.is_dir() else set()


def _log_lines(work: Path) -> int:
    try:
        return (work / "train_log.jsonl").read_bytes().count(b"\n")
    except OSError:
        return 0


def _make_trigger(kind: str, rng: random.Random, duration: float, done_iters: int, total_iters: int):
    """A predicate (work dir, out dir, seconds since start, temps present at start) -> kill now?"""
    if kind == "time":
        at = rng.uniform(0.0, duration)
        return f"time {at:.2f}s", lambda work, out, elapsed, old: elapsed >= at
    if kind == "iteration":
        k, delay = rng.randint(min(done_iters + 1, total_iters), total_iters), rng.uniform(0.0, 0.3)
        seen: dict[str, float] = {}

        def after_iteration(work, out, elapsed, old):
            if "t" not in seen and _log_lines(work) >= k:
                seen["t"] = elapsed
            return "t" in seen and elapsed >= seen["t"] + delay
        return f"{delay:.2f}s after iteration {k}", after_iteration
    if kind == "checkpoint_write":
        return "temp checkpoint appears", lambda work, out, elapsed, old: bool(_temps(work, "checkpoint.pth") - old)
    if kind == "export_write":
        return "temp teacher_backbone appears", lambda work, out, elapsed, old: bool(
            _temps(out, "teacher_backbone.pth") - old)
    raise ValueError(kind)


def _run(ctx, argv, out: Path, trigger=None, timeout: float = 300) -> dict:
    """Run the CLI in a forked child; SIGKILL it when ``trigger`` fires. Returns what happened."""
    work = out / "work"
    old = _temps(work, "checkpoint.pth") | _temps(out, "teacher_backbone.pth")
    proc = ctx.Process(target=_child_main, args=(argv, str(out.parent / f"{out.name}.log")))
    start = time.time()
    proc.start()
    killed = False
    while proc.is_alive():
        elapsed = time.time() - start
        if elapsed > timeout:
            proc.kill()
            pytest.fail(f"run did not finish in {timeout}s: {argv}")
        if trigger is not None and trigger(work, out, elapsed, old):
            proc.kill()
            killed = True
            break
        time.sleep(0.003)
    proc.join()
    new_temps = (_temps(work, "checkpoint.pth") | _temps(out, "teacher_backbone.pth")) - old
    if not killed:
        log = (out.parent / f"{out.name}.log").read_text(errors="replace")[-3000:]
        assert proc.exitcode == 0, f"run failed with exit code {proc.exitcode}:\n{log}"
    return {"killed": killed, "mid_write": bool(new_temps), "elapsed": time.time() - start,
            "iterations_logged": _log_lines(work)}


def _teacher(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "work" / "checkpoint.pth")["teacher"]


def _log_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "work" / "train_log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in ("images_per_s", "elapsed_h")} for row in rows]  # timings


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), what
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{what}: {len(different)} tensors differ, e.g. {different[:5]}"


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_kill_anywhere_resumes_bit_identical(train_dir, tmp_path):
    # reference: one uninterrupted run of the real CLI in a fresh interpreter
    reference = tmp_path / "reference"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    started = time.time()
    result = subprocess.run([sys.executable, "-m", "ibot.train", *_argv(train_dir, reference)], env=env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    reference_s = time.time() - started
    summary = _summary(reference)
    total_iters = summary["epochs"] * summary["iterations_per_epoch"]
    ref_teacher, ref_rows = _teacher(reference), _log_rows(reference)
    ref_backbone = load_file(reference / "teacher_backbone.pth")["state_dict"]
    reference_train_s = summary["train_time_s"]

    ctx = _forkserver()
    rng = random.Random(20211115)
    report, kills, trial = [], 0, 0
    while trial < MIN_TRIALS or kills < MIN_KILLS:
        assert trial < MAX_TRIALS, "\n".join(report)
        out = tmp_path / f"trial{trial}"
        argv = _argv(train_dir, out)
        for _ in range(KILLS_PER_TRIAL):
            kind = _pick_kind(rng, out, CONFIG["epochs"])
            if kind is None:
                break  # nothing left to interrupt
            done = _log_lines(out / "work")
            label, trigger = _make_trigger(kind, rng, 1.0 + reference_train_s * (1.0 - done / total_iters), done,
                                           total_iters)
            outcome = _run(ctx, argv, out, trigger)
            kills += outcome["killed"]
            report.append(f"trial {trial}: {label}: " + (
                ("killed mid-write" if outcome["mid_write"] else "killed") if outcome["killed"] else "completed first")
                + f" after {outcome['elapsed']:.2f}s, {outcome['iterations_logged']} iterations logged")
            # the latest checkpoint is never corrupt (stale temp files of a kill may stay; see the report)
            if (out / "work" / "checkpoint.pth").is_file():
                assert 1 <= load_file(out / "work" / "checkpoint.pth")["epoch"] <= CONFIG["epochs"]
            if (out / "teacher_backbone.pth").is_file():
                load_file(out / "teacher_backbone.pth")
            if not outcome["killed"]:
                break
        _run(ctx, argv, out)  # rerun until complete (no kill)
        _assert_bit_identical(_teacher(out), ref_teacher, f"trial {trial} teacher (work/checkpoint.pth)")
        _assert_bit_identical(load_file(out / "teacher_backbone.pth")["state_dict"], ref_backbone,
                              f"trial {trial} exported teacher_backbone.pth")
        assert _log_rows(out) == ref_rows, f"trial {trial}: train_log.jsonl differs from the reference"
        assert _summary(out)["epochs"] == CONFIG["epochs"]
        stale = sorted(p.name for p in (out / "work").glob(".checkpoint.pth.*.tmp"))
        report.append(f"trial {trial}: complete, bit-identical; stale temp files left by kills: {len(stale)}")
        shutil.rmtree(out)  # killed writes leave ~100 MB temp files behind
        trial += 1

    print(f"\nreference CLI run {reference_s:.1f}s (training {reference_train_s:.1f}s); {kills} kills in "
          f"{trial} trials, all bit-identical:\n" + "\n".join(report))
    assert sum("mid-write" in line for line in report) >= 2, "\n".join(report)


def _pick_kind(rng: random.Random, out: Path, epochs: int) -> str | None:
    """A seeded kill kind that can still happen in this run (None when the run is complete)."""
    if (out / "metrics.json").is_file():  # the stage's last write
        return None
    checkpoint = out / "work" / "checkpoint.pth"
    kinds = {"time": 3, "iteration": 3, "checkpoint_write": 3, "export_write": 2}
    if checkpoint.is_file() and load_file(checkpoint)["epoch"] >= epochs:
        kinds = {"time": 1, "export_write": 2}
    return rng.choices(list(kinds), weights=list(kinds.values()))[0]


# -- bad inputs: checkpoints and training -----------------------------------------------------------
def _cfg(**overrides) -> dict:
    return deep_merge(stage_defaults("pretrain"), {**CONFIG, **overrides}, path="pretrain")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def backbone_file(tmp_path) -> Path:
    torch.manual_seed(0)
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    path = tmp_path / "teacher_backbone.pth"
    export_backbone(backbone, path, {"arch": "vit_tiny", "patch_size": 8, "depth": 2})
    return path


def test_truncated_checkpoint_names_the_file(backbone_file, train_dir, tmp_path, one_thread):
    data = backbone_file.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated") as error:
        load_file(truncated)
    assert str(truncated) in str(error.value)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    with pytest.raises(CheckpointError) as error:
        load_backbone_weights(model, truncated)
    assert str(truncated) in str(error.value)
    # a truncated training checkpoint stops the resume with the file named (no silent restart from 0)
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    (work / "checkpoint.pth").write_bytes(data[: len(data) // 3])
    trainer = Trainer(_cfg(), SPEC, train_dir, work)
    with pytest.raises(CheckpointError) as error:
        trainer.resume()
    assert str(work / "checkpoint.pth") in str(error.value)


@pytest.mark.parametrize("other", [
    {"arch": "vit_tiny", "patch_size": 8, "depth": 3},   # an extra block: unexpected keys
    {"arch": "vit_tiny", "patch_size": 16, "depth": 2},  # another patch size: shape mismatch
    {"arch": "vit_small", "patch_size": 8, "depth": 1},  # another width, fewer blocks: all three
])
def test_checkpoint_of_another_architecture_lists_keys(other, tmp_path):
    path = tmp_path / "other.pth"
    export_backbone(build_backbone(other["arch"], patch_size=other["patch_size"], img_size=32, depth=other["depth"]),
                    path, other)
    model = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2)
    with pytest.raises(CheckpointError) as error:
        load_backbone_weights(model, path)
    message = str(error.value)
    assert str(path) in message
    for section in ("missing keys", "unexpected keys", "shape mismatches"):
        assert section in message
    if other["depth"] == 3:
        assert "blocks.2." in message.split("unexpected keys")[1]
    if other["patch_size"] == 16:
        assert "patch_embed.proj.weight: checkpoint (192, 3, 16, 16) vs model (192, 3, 8, 8)" in message
    if other["arch"] == "vit_small":
        assert "blocks.1." in message.split("missing keys")[1]
        assert "blocks.0.attn.qkv.weight: checkpoint (1152, 384) vs model (576, 192)" in message


def test_resume_from_another_architecture_is_a_checkpoint_error(train_dir, tmp_path, one_thread):
    other = Trainer(_cfg(), {"arch": "vit_tiny", "patch_size": 8, "depth": 3}, train_dir, tmp_path / "w")
    save_atomic(other.state_dict(epoch=1), tmp_path / "w" / "checkpoint.pth")
    trainer = Trainer(_cfg(), SPEC, train_dir, tmp_path / "w")
    with pytest.raises(CheckpointError, match="unexpected keys") as error:
        trainer.resume()
    assert str(tmp_path / "w" / "checkpoint.pth") in str(error.value)


def test_official_training_checkpoint_with_numpy_learning_rates_loads(tmp_path):
    import argparse

    import numpy as np
    backbone = build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2, masked_im_modeling=False)
    teacher = {f"backbone.{k}": v for k, v in backbone.state_dict().items()}
    path = tmp_path / "checkpoint.pth"
    torch.save({"teacher": teacher, "student": {f"module.{k}": v for k, v in teacher.items()}, "epoch": 3,
                "optimizer": {"state": {}, "param_groups": [{"lr": np.float64(5e-4), "weight_decay": np.float64(0.04),
                                                             "params": [0]}]},
                "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}, path)
    load_backbone_weights(build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2), path)


class _CarriesCode:
    """Unpickling this calls ``os.system`` (what a malicious checkpoint would do)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_checkpoint_that_carries_code_is_refused_and_not_run(train_dir, tmp_path, one_thread):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"teacher": {"cls_token": torch.zeros(1)}, "payload": _CarriesCode(f"echo pwned > {marker}")}, evil)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"weights_only=True.*may carry code") as error:
        load_file(evil)
    assert str(evil) in str(error.value)
    with pytest.raises(CheckpointError, match="weights_only"):
        load_backbone_weights(build_backbone("vit_tiny", patch_size=8, img_size=32, depth=2), evil)
    work = tmp_path / "run" / "work"
    work.mkdir(parents=True)
    (work / "checkpoint.pth").write_bytes(evil.read_bytes())
    with pytest.raises(CheckpointError, match="weights_only"):
        Trainer(_cfg(), SPEC, train_dir, work).resume()
    assert not marker.exists(), "the pickled os.system call ran"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_dir, tmp_path, one_thread):
    work = tmp_path / "work"
    Trainer(_cfg(epochs=1), SPEC, train_dir, work).fit()  # a good epoch-1 checkpoint
    checkpoint = work / "checkpoint.pth"
    before = _sha(checkpoint)
    # resume with a diverging learning rate: the first step blows the weights up, the next loss is NaN
    trainer = Trainer(_cfg(epochs=2, lr=1e30, warmup_epochs=0), SPEC, train_dir, work)
    with pytest.raises(FloatingPointError) as error:
        trainer.fit()
    message = str(error.value)
    assert "epoch 1" in message and str(checkpoint) in message and "last good checkpoint" in message
    assert _sha(checkpoint) == before, "the last good checkpoint was modified"
    assert load_file(checkpoint)["epoch"] == 1
    assert not _temps(work, "checkpoint.pth")


def test_nan_loss_from_the_loss_itself(train_dir, tmp_path, one_thread, monkeypatch):
    """Same with a NaN injected into the loss at epoch 1 (independent of how lr diverges)."""
    original = pretrain.IBOTLoss.forward

    def nan_from_epoch_1(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        epoch = args[4] if len(args) > 4 else kwargs["epoch"]
        if epoch >= 1:
            out = {**out, "loss": out["loss"] * float("nan")}
        return out

    monkeypatch.setattr(pretrain.IBOTLoss, "forward", nan_from_epoch_1)
    work = tmp_path / "work"
    saved: list[str] = []
    original_save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, epoch: (original_save(self, epoch),
                                                              saved.append(_sha(self.checkpoint_path))))
    trainer = Trainer(_cfg(epochs=2), SPEC, train_dir, work)
    with pytest.raises(FloatingPointError, match="last good checkpoint") as error:
        trainer.fit()
    assert str(work / "checkpoint.pth") in str(error.value)
    assert len(saved) == 1 and _sha(work / "checkpoint.pth") == saved[0]
    state = load_file(work / "checkpoint.pth")
    assert state["epoch"] == 1
    # the loop syncs only at log steps: the error names the first non-finite iteration (epoch 1's
    # first), and no checkpoint was written after it
    assert f"epoch 1, iteration {trainer.iters_per_epoch}" in str(error.value)


def test_rerun_removes_temp_files_of_killed_saves(train_dir, tmp_path, one_thread):
    work = tmp_path / "work"
    work.mkdir()
    stale = work / ".checkpoint.pth.k1ll3d.tmp"
    stale.write_bytes(b"half a checkpoint")
    Trainer(_cfg(epochs=1), SPEC, train_dir, work).fit()
    assert not stale.exists()


def _disk_full(monkeypatch) -> None:
    real_save = torch.save

    def half_then_enospc(obj, handle, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", half_then_enospc)


def test_disk_full_keeps_the_previous_checkpoint(train_dir, tmp_path, one_thread, monkeypatch):
    work = tmp_path / "work"
    Trainer(_cfg(epochs=1), SPEC, train_dir, work).fit()
    checkpoint = work / "checkpoint.pth"
    before = _sha(checkpoint)
    trainer = Trainer(_cfg(epochs=2), SPEC, train_dir, work)
    _disk_full(monkeypatch)
    with pytest.raises(OSError) as error:
        trainer.fit()  # trains epoch 2, then its checkpoint cannot be written
    assert error.value.errno == errno.ENOSPC
    assert _sha(checkpoint) == before and load_file(checkpoint)["epoch"] == 1
    assert not _temps(work, "checkpoint.pth"), "a temp file was left behind"
    assert sorted(p.name for p in work.iterdir()) == ["checkpoint.pth", "train_log.jsonl"]
    # and the direct save path: the exported backbone is never half-written either
    target = tmp_path / "teacher_backbone.pth"
    target.write_bytes(b"previous")
    with pytest.raises(OSError):
        save_atomic({"state_dict": {}}, target)
    assert target.read_bytes() == b"previous" and not _temps(tmp_path, "teacher_backbone.pth")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_unreadable_image_fails_naming_the_file(tmp_path, damage):
    """A corrupt image inside the dataset stops pretraining with the file's path in the message."""
    from ibot.data.embedded import EmbeddedSizes, generate
    from ibot.train.pretrain import Trainer

    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32)
    train = generate(tmp_path / "data", seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train"
    victim = sorted(train.rglob("*.JPEG"))[5]
    data = victim.read_bytes()
    victim.write_bytes(b"not an image" if damage == "garbage" else data[: len(data) // 3])
    config = {**stage_defaults("pretrain"), "epochs": 1, "batch_size_per_gpu": 24, "global_crops_size": 32, "local_crops_size": 16,
              "local_crops_number": 0, "num_workers": 0, "out_dim": 64, "patch_out_dim": 64, "warmup_epochs": 0,
              "warmup_teacher_temp_epochs": 1, "precision": "fp32"}
    trainer = Trainer(config, {"arch": "vit_tiny", "patch_size": 8, "depth": 1}, train, tmp_path / "work")
    with pytest.raises(OSError, match=str(victim.name)):
        trainer.fit()
    assert not (tmp_path / "work" / "checkpoint.pth").exists()
