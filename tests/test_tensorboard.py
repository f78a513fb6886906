"""Live TensorBoard curves: after kills and resumes the event files hold every step exactly once
(the writer alone, a real pretraining run, a linear sweep's per-head tags, a dense mmengine run)."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from ibot import tensorboard
from ibot.tensorboard import SUPERSEDED_DIR, ScalarWriter, event_files, read_scalars

PRETRAIN_TAGS = {f"pretrain/{k}" for k in ("loss", "cls", "patch", "lr", "wd", "momentum", "teacher_temp",
                                           "teacher_patch_temp", "images_per_s")}


class Killed(Exception):
    """Stands for SIGKILL: raised in the middle of a run, after what it had written was flushed."""


def _steps(log_dir: Path) -> dict[str, list[int]]:
    """tag -> every step found in the folder's event files, duplicates kept (read back raw)."""
    return {tag: [step for step, _ in values] for tag, values in read_scalars(log_dir).items()}


def _accumulated(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """What TensorBoard's own EventAccumulator reads (no purging: it would hide duplicates)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    accumulator = EventAccumulator(str(log_dir), purge_orphaned_data=False)
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


def _assert_each_step_once(log_dir: Path, steps: list[int], tags: set[str]) -> None:
    """No tag of the folder has a step twice; each of ``tags`` has exactly ``steps``."""
    found = _steps(log_dir)
    assert tags <= set(found), f"missing tags: {sorted(tags - set(found))}"
    for tag, seen in found.items():
        duplicated = sorted(s for s, n in Counter(seen).items() if n > 1)
        assert not duplicated, f"{tag}: steps written more than once: {duplicated}"
        if tag in tags:
            assert sorted(seen) == steps, f"{tag}: steps {sorted(seen)}, expected {steps}"


# -- the writer -----------------------------------------------------------------------------------
def test_kill_and_resume_keep_each_step_once(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    first = ScalarWriter(tb, resume_step=0)
    for step in range(10):
        first.add({"loss": float(step), "lr": 0.1}, step)
    # killed here: never closed (every add was flushed)
    second = ScalarWriter(tb, resume_step=6)
    for step in range(6, 12):
        second.add({"loss": 100.0 + step, "lr": 0.2}, step)
    second.close()

    _assert_each_step_once(tb, list(range(12)), {"loss", "lr"})
    assert _accumulated(tb)["loss"] == [(s, float(s)) for s in range(6)] + [(s, 100.0 + s) for s in range(6, 12)]
    # one current file; the killed attempt's moved aside (kept, not a TensorBoard run any more)
    assert len(event_files(tb)) == 1
    aside = list((tb / SUPERSEDED_DIR).rglob("*"))
    moved = [p for p in aside if p.is_file()]
    assert len(moved) == 1 and "tfevents" not in moved[0].name
    from tensorboard.backend.event_processing import io_wrapper
    assert [Path(d) for d in io_wrapper.GetLogdirSubdirectories(str(tmp_path))] == [tb]
    # the moved file still holds everything the killed attempt wrote
    original = moved[0].with_name(moved[0].name.replace("superseded", "tfevents"))
    moved[0].rename(original)
    assert [s for s, _ in read_scalars(original.parent)["loss"]] == list(range(10))


def test_resume_with_nothing_to_drop_adds_a_file(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    with ScalarWriter(tb, resume_step=0) as writer:
        for step in range(5):
            writer.add({"x": step}, step)
    with ScalarWriter(tb, resume_step=5) as writer:
        for step in range(5, 8):
            writer.add({"x": step}, step)
    assert len(event_files(tb)) == 2 and not (tb / SUPERSEDED_DIR).exists()
    _assert_each_step_once(tb, list(range(8)), {"x"})
    with ScalarWriter(tb, resume_step=8):  # a finished run started again: writes nothing, creates nothing
        pass
    assert len(event_files(tb)) == 2


def test_kill_during_the_rewrite_leaves_exact_copies_that_the_next_start_removes(tmp_path, monkeypatch) -> None:
    tb = tmp_path / "tb"
    first = ScalarWriter(tb, resume_step=0)
    for step in range(10):
        first.add({"a": step, "b": -step}, step)

    def killed(*args):
        raise Killed
    monkeypatch.setattr(tensorboard.os, "replace", killed)  # killed after the new file, before the move
    with pytest.raises(Killed):
        ScalarWriter(tb, resume_step=4)
    monkeypatch.undo()
    assert len(event_files(tb)) == 2 and Counter(_steps(tb)["a"])[0] == 2  # the copies

    third = ScalarWriter(tb, resume_step=4)
    for step in range(4, 7):
        third.add({"a": 10 * step, "b": -step}, step)
    third.close()
    _assert_each_step_once(tb, list(range(7)), {"a", "b"})
    assert dict(read_scalars(tb)["a"]) == {**{s: float(s) for s in range(4)}, **{s: 10.0 * s for s in range(4, 7)}}


def test_a_record_torn_by_a_kill_ends_the_old_file(tmp_path: Path) -> None:
    tb = tmp_path / "tb"
    writer = ScalarWriter(tb, resume_step=0)
    for step in range(6):
        writer.add({"x": step}, step)
    path = event_files(tb)[0]
    path.write_bytes(path.read_bytes()[:-7])  # the last record half-written
    with ScalarWriter(tb, resume_step=3) as resumed:
        resumed.add({"x": 3.5}, 3)
    _assert_each_step_once(tb, [0, 1, 2, 3], {"x"})


def test_write_errors_stop_the_curves_not_the_run(tmp_path: Path, capsys) -> None:
    blocked = tmp_path / "tb"
    blocked.write_text("a file where the folder should be")
    writer = ScalarWriter(blocked / "sub", resume_step=0)
    writer.add({"x": 1.0}, 0)  # no exception
    assert not writer.enabled and "TensorBoard curves of this run stop here" in capsys.readouterr().err
    with pytest.raises((TypeError, ValueError)):  # a programming error is not swallowed
        ScalarWriter(tmp_path / "ok", resume_step=0).add({"x": "not a number"}, 0)


def test_other_ranks_write_nothing(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(tensorboard.dist_utils, "is_main", lambda: False)
    with ScalarWriter(tmp_path / "tb", resume_step=0) as writer:
        writer.add({"x": 1.0}, 0)
    assert not (tmp_path / "tb").exists()
    assert not ScalarWriter(None, resume_step=0, enabled=True).enabled


# -- pretraining: a real run killed mid-epoch and resumed ------------------------------------------
@pytest.fixture(scope="module")
def images(tmp_path_factory) -> str:
    from ibot.data.embedded import EmbeddedSizes, generate
    sizes = EmbeddedSizes(classes=3, train_per_class=8, val_per_class=2, c_per_class=2, a_classes=2, image_size=32)
    return str(generate(tmp_path_factory.mktemp("data"), seed=0, sets=["imagenet"], sizes=sizes)["imagenet"] / "train")


def test_pretraining_killed_mid_epoch_writes_each_iteration_once(images, tmp_path, monkeypatch, one_thread) -> None:
    from helpers import run_pretrain
    from test_pretrain import SPEC, TINY

    config = {**TINY, "log_every": 1}  # 24 images / batch 8: 3 iterations per epoch, 2 epochs
    original_add = ScalarWriter.add

    def add_then_die_at_4(self, scalars, step, **kwargs):
        original_add(self, scalars, step, **kwargs)
        if step == 4:  # epoch 2's second iteration: steps 3 and 4 are past the epoch-1 checkpoint
            raise Killed

    monkeypatch.setattr(ScalarWriter, "add", add_then_die_at_4)
    with pytest.raises(Killed):
        run_pretrain(images, tmp_path, config, SPEC)
    tb = tmp_path / "tb"
    assert sorted(_steps(tb)["pretrain/loss"]) == [0, 1, 2, 3, 4]
    monkeypatch.setattr(ScalarWriter, "add", original_add)

    summary = run_pretrain(images, tmp_path, config, SPEC)
    assert summary["resumed_from_epoch"] == 1
    _assert_each_step_once(tb, list(range(6)), PRETRAIN_TAGS)
    assert len(event_files(tb)) == 1 and len([p for p in (tb / SUPERSEDED_DIR).rglob("*") if p.is_file()]) == 1
    # the curves are the training log's rows (the resumed run's values for the redone iterations)
    with open(tmp_path / "train_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    logged = _accumulated(tb)
    assert [s for s, _ in logged["pretrain/loss"]] == [int(r["iteration"]) for r in rows]
    for key in ("loss", "lr", "wd", "momentum", "teacher_temp"):
        assert [v for _, v in logged[f"pretrain/{key}"]] == pytest.approx([float(r[key]) for r in rows], rel=1e-6)


# -- linear probing: per-head accuracy curves ------------------------------------------------------
def test_linear_sweep_writes_per_head_curves(tmp_path: Path, one_thread) -> None:
    from helpers import run_stage
    from test_knn import TINY, make_image_folder, official_checkpoint
    from test_linear import CONFIG

    data = make_image_folder(tmp_path / "imagenet")
    out = tmp_path / "results" / "linear" / "metrics.json"
    argv = ["--data", str(data), "--out", str(out), "--config", json.dumps(CONFIG), "--resources",
            '{"cluster": "debug"}', "--checkpoint", str(official_checkpoint(tmp_path / "checkpoint.pth")), *TINY]
    run_stage("linear", argv)
    tb = out.parent / "tb"
    names = [f"lr_{lr:g}" for lr in CONFIG["lrs"]]  # lr_0.01, lr_0.3, lr_3
    tags = ({f"linear/acc_top1/{n}" for n in names} | {f"linear/train_loss/{n}" for n in names}
            | {"linear/train_loss_mean", "linear/lr_factor", "linear/acc_top1_best_head", "linear/acc_top1_best"})
    _assert_each_step_once(tb, [1, 2], tags)  # step = epochs done
    logged = _accumulated(tb)
    with open(out.parent / "per_head.csv") as handle:
        for row in csv.DictReader(handle):
            curve = dict(logged[f"linear/acc_top1/lr_{float(row['lr']):g}"])
            assert curve[int(row["epoch"])] == pytest.approx(float(row["top1"]), abs=1e-4)
    best = json.loads(out.read_text())["metrics"]["top1"]
    assert logged["linear/acc_top1_best"][-1][1] == pytest.approx(best, abs=1e-4)
    assert logged["linear/lr_factor"][0][1] == pytest.approx(1.0)  # cosine starts at the full lr

    out.unlink()  # a rerun resumes after the last epoch: nothing redone, nothing written twice
    run_stage("linear", argv)
    _assert_each_step_once(tb, [1, 2], tags)


# -- fine-tuning: killed after an epoch's curves were written, before its checkpoint --------------
def test_finetune_killed_before_the_checkpoint_writes_each_epoch_once(tmp_path: Path, monkeypatch,
                                                                      one_thread) -> None:
    from downstream.engine import finetune
    from helpers import run_stage
    from test_finetune import CONFIG
    from test_knn import TINY, make_image_folder, official_checkpoint

    data = make_image_folder(tmp_path / "imagenet", train=4, val=2)
    out = tmp_path / "results" / "finetune" / "metrics.json"
    argv = ["--data", str(data), "--out", str(out), "--checkpoint", str(official_checkpoint(tmp_path / "ckpt.pth")),
            "--config", json.dumps(CONFIG), "--resources", '{"cluster": "debug"}', *TINY]
    real_save = finetune.save_training_state

    def die_before_saving_epoch_2(state_file, digest, epoch, *args, **kwargs):
        if epoch == 2:
            raise Killed
        return real_save(state_file, digest, epoch, *args, **kwargs)

    import pdb
    monkeypatch.setattr(pdb, "post_mortem", lambda *a, **k: None)  # submitit's debug executor opens pdb
    monkeypatch.setattr(finetune, "save_training_state", die_before_saving_epoch_2)
    with pytest.raises(Killed):
        run_stage("finetune", argv)
    tb = out.parent / "tb"
    assert sorted(_steps(tb)["finetune/train_loss"]) == [1, 2]  # epoch 2 written, not checkpointed
    monkeypatch.setattr(finetune, "save_training_state", real_save)
    run_stage("finetune", argv)

    tags = {"finetune/train_loss", "finetune/lr", "finetune/val_top1", "finetune/val_top5", "finetune/val_loss"}
    _assert_each_step_once(tb, [1, 2], tags)
    history = json.loads(out.read_text())["extra"]["history"]
    logged = _accumulated(tb)
    for record in history:
        for key, tag in finetune.EPOCH_TAGS.items():
            tag = f"finetune/{tag}"
            assert dict(logged[tag])[record["epoch"]] == pytest.approx(record[key], rel=1e-6, abs=1e-6), tag


# -- dense: mmengine's scalars through the backend, a kill mid-run ---------------------------------
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_segmentation_killed_mid_run_writes_each_logged_iteration_once(tmp_path: Path, monkeypatch,
                                                                          one_thread) -> None:
    from mmengine.registry import VISBACKENDS

    from downstream.dense.common import TB_BACKEND, _register_tensorboard
    from helpers import run_stage
    from ibot.data.embedded import EmbeddedSizes, generate
    from test_dense import TINY, _argv, _weights

    sizes = EmbeddedSizes(ade_train=8, ade_val=4, ade_size=64)
    ade = generate(tmp_path / "data", seed=0, sets=["ade20k"], sizes=sizes)["ade20k"]
    config = {"iters": 8, "warmup_iters": 2, "batch_size": 2, "crop_size": 64, "slide_stride": 43, "scale": [256, 64],
              "num_workers": 0, "log_interval": 2, "checkpoint_interval": 4}
    out = tmp_path / "results/run/tiny/seg_linear/metrics.json"
    argv = _argv({**TINY, "patch_size": 8}, _weights(tmp_path, patch=8), ade, out, config)

    _register_tensorboard()
    backend = VISBACKENDS.get(TB_BACKEND)
    original = backend.add_scalars

    def add_then_die_at_6(self, scalar_dict, step=0, *args, **kwargs):
        original(self, scalar_dict, step, *args, **kwargs)
        if step == 6 and "loss" in scalar_dict:  # iteration 6: past the iteration-4 checkpoint
            raise Killed

    monkeypatch.setattr(backend, "add_scalars", add_then_die_at_6)
    with pytest.raises(Killed):
        run_stage("seg_linear", argv)
    tb = out.parent / "tb"
    assert sorted(_steps(tb)["loss"]) == [2, 4, 6]
    monkeypatch.setattr(backend, "add_scalars", original)

    metrics = run_stage("seg_linear", argv)
    _assert_each_step_once(tb, [2, 4, 6, 8], {"loss", "lr"})
    test = read_scalars(tb / "test")
    assert test["test/mIoU"] == [(8, pytest.approx(metrics["mIoU"], abs=0.01))]
    run_stage("seg_linear", argv)  # finished: tested again, the test curve rewritten, nothing duplicated
    assert [s for s, _ in read_scalars(tb / "test")["test/mIoU"]] == [8]
    _assert_each_step_once(tb, [2, 4, 6, 8], {"loss", "lr"})
