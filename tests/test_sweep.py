"""Sweeps (fine-tuning lr): one job per value as the workflow plans them, the best run reported, all kept."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ibot.metrics import read_metrics, write_metrics
from ibot.results.aggregate import find_metrics_files
from ibot.sweep import main as sweep_main
from ibot.sweep import run_metrics_path, select_best, sweep_values, value_label

ROOT = Path(__file__).resolve().parents[1]


def _run(stage_dir: Path, lr: float, top1: float | None, *, checkpoint: Path | None = None,
         protocol: str = "100ep,layer_decay=0.65") -> Path:
    path = run_metrics_path(stage_dir, "lr", lr)
    write_metrics(path, run="r", model="m", stage="finetune", task="finetune", dataset="imagenet-1k",
                  protocol=protocol, metrics={"top1": top1, "top5": 90.0 if top1 is not None else None},
                  config={"lr": lr, "lrs": None}, wall_time_s=10.0, checkpoint=checkpoint,
                  null_reasons={"top1": "diverged", "top5": "diverged"} if top1 is None else None)
    return path


def test_value_labels_round_trip():
    for value in (0.004, 5e-05, 1e-3, 0.0075, 2.5e-4):
        assert float(value_label(value)) == value
        assert re.fullmatch(r"[0-9][0-9.e+-]*", value_label(value))
    assert sweep_values({"lrs": None, "lr": 0.004}, "lrs", "lr") == [0.004]
    assert sweep_values({"lrs": [0.001, 0.004], "lr": 0.004}, "lrs", "lr") == [0.001, 0.004]


def test_best_run_is_reported_and_every_run_kept(tmp_path):
    runs = [_run(tmp_path, 0.001, 80.5), _run(tmp_path, 0.004, 82.25), _run(tmp_path, 0.008, None)]
    out = tmp_path / "metrics.json"
    sweep_main(["--key", "lr", "--metric", "top1", "--runs", *map(str, runs), "--out", str(out)])
    record = read_metrics(out)
    assert record["metrics"]["top1"] == 82.25 and record["config"]["lr"] == 0.004
    sweep = record["extra"]["sweep"]
    assert sweep["best"] == 0.004 and [r["lr"] for r in sweep["results"]] == [0.001, 0.004, 0.008]
    assert [r["top1"] for r in sweep["results"]] == [80.5, 82.25, None]
    assert record["wall_time_s"] == 30.0 and all(Path(r["metrics_file"]).is_file() for r in sweep["results"])
    # the runs are not stage results: the summary finds only the stage's own file
    assert find_metrics_files(tmp_path) == [out]


def test_runs_of_another_checkpoint_or_protocol_are_refused(tmp_path):
    import os

    weights, other = tmp_path / "w.pth", tmp_path / "w2.pth"
    for path, content in ((weights, b"a"), (other, b"b")):
        path.write_bytes(content)
        os.utime(path, (0, 0))  # older than the runs (write_metrics refuses weights changed mid-stage)
    first = _run(tmp_path / "a", 0.001, 80.0, checkpoint=weights)
    with pytest.raises(ValueError, match=r"differs .* in \['checkpoint'\]"):
        select_best([first, _run(tmp_path / "b", 0.004, 81.0, checkpoint=other)], "lr", "top1")
    with pytest.raises(ValueError, match=r"differs .* in \['protocol'\]"):
        select_best([first, _run(tmp_path / "c", 0.004, 81.0, checkpoint=weights, protocol="50ep")], "lr", "top1")


def _planned_finetune_commands(*config: str) -> dict[str, dict]:
    """{lr label: the --config JSON of that run's command} from a dry run of the embedded workflow."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--forceall", "-p", "--cores", "1",
                             "results/embedded/vit_tiny/finetune/metrics.json", *(["--config", *config] if config else [])],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    commands = {}
    for line in result.stdout.splitlines():
        if "-m downstream finetune " in line:
            lr = re.search(r"finetune/sweep/lr_([0-9.e+-]+)/metrics\.json", line).group(1)
            commands[lr] = json.loads(re.search(r"--config '(\{.*?\})'", line).group(1))
    assert "-m ibot.sweep --key lr --metric top1" in result.stdout
    return commands


@pytest.mark.slow
def test_the_workflow_plans_one_job_per_lr_and_adding_one_keeps_the_others():
    single = _planned_finetune_commands()  # the embedded config's lr: 0.001
    assert list(single) == ["0.001"] and single["0.001"]["lr"] == 0.001 and single["0.001"]["lrs"] is None
    swept = _planned_finetune_commands("finetune={lrs: [0.001, 0.004]}")
    assert sorted(swept) == ["0.001", "0.004"] and swept["0.004"]["lr"] == 0.004
    assert swept["0.001"] == single["0.001"]  # same params: the existing run is not rerun
