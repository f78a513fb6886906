"""DVC with a local remote: the lock that serialises DVC callers, and the round trip of the pretraining
outputs (track -> push -> fresh clone -> pull -> no pretraining planned) with the project's dvc.yaml
(run metrics and pretraining curves). The same on S3: test_dvc_s3.py."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time

import pytest

from helpers import BIN, REPO, planned, sh, tiny_pretrain_snakefile
from ibot.results.dvc_tools import run_dvc_yaml
from ibot.results.plots import CURVE_SETS


def test_dvc_lock_serialises_callers(tmp_path):
    from ibot.results.dvc_tools import dvc_lock

    (tmp_path / ".dvc").mkdir()
    held = threading.Event()

    def holder():
        with dvc_lock(tmp_path):
            held.set()
            time.sleep(0.6)

    thread = threading.Thread(target=holder)
    thread.start()
    held.wait(5)
    start = time.monotonic()
    with dvc_lock(tmp_path):
        waited = time.monotonic() - start
    thread.join()
    assert waited > 0.3




@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dvc_round_trip_restores_checkpoint_without_pretraining_rerun(tmp_path):
    # dvc and snakemake are pinned dependencies (pyproject.toml), git holds the project: missing is a failure
    assert (BIN / "dvc").is_file() and (BIN / "snakemake").is_file(), f"dvc/snakemake not installed in {BIN}"
    assert shutil.which("git") is not None, "git not found"
    repo, remote = tmp_path / "repo", tmp_path / "remote"
    repo.mkdir()
    (repo / "Snakefile").write_text(tiny_pretrain_snakefile(200000))
    shutil.copy(REPO / ".gitignore", repo / ".gitignore")  # the project's: results ignored but the DVC-facing files
    sh(["git", "init", "-q"], repo)
    sh([str(BIN / "dvc"), "init", "-q"], repo)
    sh([str(BIN / "snakemake"), "-c1", "-q"], repo)
    checkpoint = "results/embedded/vit_tiny/pretrain/teacher_backbone.pth"
    original = (repo / checkpoint).read_bytes()

    py = [sys.executable, "-m", "ibot.results"]
    out = sh(py + ["dvc-track"], repo)  # every output of the pretrain jobs, found via snakemake --summary
    assert sorted(p.name for p in (repo / checkpoint).parent.glob("*.dvc")) == [
        "heads.pth.dvc", "metrics.json.dvc", "teacher_backbone.pth.dvc", "train_log.csv.dvc"], out
    sh([str(BIN / "dvc"), "remote", "add", "-d", "local", str(remote)], repo)
    sh(py + ["dvc-push"], repo)
    # the run's dvc.yaml as the workflow writes it: its metrics and pretraining curves as DVC sees them
    (repo / "results/embedded/dvc.yaml").write_text(run_dvc_yaml("embedded", curves=True))
    (repo / "results/embedded/metrics_flat.json").write_text('{"vit_tiny": {"knn": {"top1_k20": 31.5}}}')
    for name, columns in CURVE_SETS.items():  # what the plots rule writes for a pretrained model
        (repo / "results/embedded/curves" / name).mkdir(parents=True)
        (repo / "results/embedded/curves" / name / "pretrain_vit_tiny.csv").write_text(
            "epoch,iteration," + ",".join(columns) + "\n" + "".join(
                f"0,{i}," + ",".join(str(9.0 - i - j) for j in range(len(columns))) + "\n" for i in range(2)))
    assert "failed to load" not in sh([str(BIN / "dvc"), "metrics", "show"], repo)  # stdout and stderr
    assert "failed to load" not in sh([str(BIN / "dvc"), "plots", "show", "--json"], repo)
    metrics = json.loads(sh([str(BIN / "dvc"), "metrics", "show", "--json"], repo, stdout_only=True))
    assert metrics[""]["data"]["results/embedded/metrics_flat.json"]["data"] == {"vit_tiny": {"knn": {"top1_k20": 31.5}}}
    plots = json.loads(sh([str(BIN / "dvc"), "plots", "show", "--json"], repo, stdout_only=True))
    loss = plots["data"]["results/embedded/curves/loss/pretrain_vit_tiny.csv"][0]["content"]
    assert len(loss["data"]["values"]) == 6  # 2 iterations x (loss, cls, patch)

    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "results"], repo)
    tracked = sh(["git", "ls-files"], repo, stdout_only=True).split()
    assert checkpoint + ".dvc" in tracked and checkpoint not in tracked
    assert {"results/embedded/dvc.yaml", "results/embedded/metrics_flat.json", "results/embedded/curves/loss/pretrain_vit_tiny.csv"} <= set(tracked)
    assert "results/embedded/vit_tiny/knn/metrics.json" not in tracked

    clone = tmp_path / "clone"  # fresh clone: no cache, no data, no checkpoint, no .snakemake
    sh(["git", "clone", "-q", str(repo), str(clone)], tmp_path)
    assert not (clone / checkpoint).exists() and not (clone / ".dvc" / "cache").exists()
    sh([str(BIN / "dvc"), "pull", "-q"], clone)  # plain pull: regenerated data would retrain
    assert (clone / checkpoint).read_bytes() == original
    assert "pretrain" in planned(clone)

    out = sh(py + ["dvc-pull"], clone, stdout_only=True)  # the helper: pull, build missing upstream, --touch
    result = json.loads(out[out.index("{"):])
    assert checkpoint in result["touched"] and result["upstream"] == ["results/data/embedded/imagenet.complete"]
    assert (clone / checkpoint).read_bytes() == original
    assert planned(clone) == {"knn", "all"}  # nothing upstream of the stage is planned
