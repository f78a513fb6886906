"""The one submitit launcher: every stage (pretraining, k-NN, linear, ..., dense) runs through it.

``launch("pkg.module:function", kwargs, job_dir=..., resources=...)`` submits
``function(**kwargs)`` with submitit's AutoExecutor (``cluster``: ``local`` subprocess or
``slurm``), waits, streams the job log, and returns task 0's result. ``debug`` runs the function
in this process (tests, debuggers).

- Multi-task jobs (one task per GPU, or several CPU tasks) join one process group through
  submitit's TorchDistributedEnvironment (nccl on GPU, gloo on CPU).
- Timeout/preemption: the job is a ``Checkpointable``; submitit requeues it and the stage resumes
  from the last checkpoint in its work directory (stages write checkpoints atomically).
- Restart safety: the submitted job id is kept in ``job_dir/job.json``; if the caller (Snakemake)
  is killed and rerun while the job still runs, ``launch`` re-attaches instead of submitting twice,
  but only for the same call (entry + arguments): a job still running for another config is refused.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Mapping

import submitit

from ibot.io import write_json_atomic

__all__ = ["CLUSTERS", "Resources", "launch", "StageJob", "resolve_entry", "call_digest"]

CLUSTERS = ("local", "slurm", "debug")
_SLURM_ALIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED",
                "REQUEUE_HOLD", "REQUEUE_FED"}


@dataclass(frozen=True)
class Resources:
    """Where and how big a job is. Keys equal the ``resources`` entries of the config."""

    cluster: str = "local"
    nodes: int = 1
    tasks_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int = 2
    mem_gb: float | None = None
    timeout_min: int = 60
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    slurm_signal_delay_s: int = 120
    max_num_timeout: int = 20
    slurm_additional_parameters: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "Resources":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"resources: unknown keys {unknown}; expected some of {sorted(known)}")
        resources = cls(**dict(config))
        if resources.cluster not in CLUSTERS:
            raise ValueError(f"resources.cluster: {resources.cluster!r}; expected one of {CLUSTERS}")
        if resources.cluster != "slurm" and resources.nodes != 1:
            raise ValueError(f"resources.nodes: {resources.nodes} nodes need cluster 'slurm'")
        return resources

    @property
    def num_tasks(self) -> int:
        return self.nodes * self.tasks_per_node


def resolve_entry(entry: str):
    """``"package.module:function"`` → the function (entries are strings so jobs pickle cheaply)."""
    module_name, _, attr = entry.partition(":")
    return getattr(importlib.import_module(module_name), attr)


class StageJob(submitit.helpers.Checkpointable):
    """Runs one stage function inside a submitit task; requeued as-is on timeout/preemption."""

    def __call__(self, entry: str, kwargs: Mapping[str, Any], threads: int | None = None) -> Any:
        if threads:  # local jobs share the machine: use the cores the job asked for, not all of them
            import torch

            os.environ["OMP_NUM_THREADS"] = str(threads)
            torch.set_num_threads(threads)
        if _in_submitit_job() and submitit.JobEnvironment().num_tasks > 1:
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        else:  # a single task must never inherit a stale rank from the caller's environment
            for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
                os.environ.pop(name, None)
        return resolve_entry(entry)(**kwargs)


def _in_submitit_job() -> bool:
    return "SUBMITIT_EXECUTOR" in os.environ  # set by submitit in every local/slurm task


def _executor(resources: Resources, folder: Path, name: str) -> submitit.AutoExecutor:
    # max_num_timeout is an executor-constructor argument in submitit, not an update_parameters one
    requeues = ({f"{resources.cluster}_max_num_timeout": resources.max_num_timeout}
                if resources.cluster != "debug" else {})
    executor = submitit.AutoExecutor(folder=folder, cluster=resources.cluster, **requeues)
    params: dict[str, Any] = dict(name=name, timeout_min=resources.timeout_min, nodes=resources.nodes,
                                  tasks_per_node=resources.tasks_per_node, cpus_per_task=resources.cpus_per_task)
    if resources.gpus_per_node:
        params["gpus_per_node"] = resources.gpus_per_node
    if resources.mem_gb:
        params["mem_gb"] = resources.mem_gb
    if resources.cluster == "slurm":
        slurm = dict(partition=resources.partition, account=resources.account, qos=resources.qos,
                     constraint=resources.constraint, signal_delay_s=resources.slurm_signal_delay_s,
                     additional_parameters=resources.slurm_additional_parameters or None)
        params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    executor.update_parameters(**params)
    return executor


def _pid_alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"submitit" in cmdline


def _slurm_state(job_id: str) -> str | None:
    """The job's state per squeue ('' once slurmctld forgot it), None when squeue cannot answer."""
    try:
        result = subprocess.run(["squeue", "-h", "-t", "all", "-j", job_id, "-o", "%T"], capture_output=True,
                                text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    states = result.stdout.split()
    return states[0] if states else ""


def _slurm_alive(job_id: str) -> bool:
    state = _slurm_state(job_id)
    if state is None:  # never guess "gone": that would submit the same stage twice
        raise RuntimeError(f"squeue cannot tell whether SLURM job {job_id} still runs; rerun when it answers")
    return state in _SLURM_ALIVE


def _plain(value: Any) -> Any:
    """JSON form of a call argument: dataclasses (a stage context) by their fields, the rest as text."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in fields(value)}
    return str(value)


def call_digest(entry: str, kwargs: Mapping[str, Any]) -> str:
    """Identity of a call (entry + arguments): a running job is re-attached only for the same call."""
    return hashlib.sha256(json.dumps([entry, kwargs], sort_keys=True, default=_plain).encode()).hexdigest()


def _reattach(state_file: Path, resources: Resources, digest: str) -> submitit.Job | None:
    """The still-running job recorded in ``state_file`` (same cluster, same call), or None.

    A job still running for *another* call (the stage config, checkpoint or data changed while a
    killed caller's job went on) is refused: re-attaching would report its result for the new call,
    and a second job would share its work directory.
    """
    if not state_file.is_file():
        return None
    try:
        state = json.loads(state_file.read_text())
    except json.JSONDecodeError:
        return None
    if state.get("cluster") != resources.cluster:
        return None
    job_id, folder, tasks = state["job_id"], Path(state["folder"]), range(state["num_tasks"])
    if resources.cluster == "slurm" and _slurm_alive(job_id):
        job: submitit.Job = submitit.SlurmJob(folder=folder, job_id=job_id, tasks=tasks)
    elif resources.cluster == "local" and _pid_alive(int(job_id)):
        job = _OrphanLocalJob(folder=folder, job_id=job_id, tasks=tasks)
    else:
        return None
    if state.get("call_digest") != digest:
        stop = f"scancel {job_id}" if resources.cluster == "slurm" else f"kill {job_id}"
        raise RuntimeError(
            f"{resources.cluster} job {job_id} ({state_file}) still runs for another setup of this stage (its "
            f"config, checkpoint or data differ from this call's). Wait for it or stop it ({stop}), then rerun.")
    return job


class _OrphanLocalJob(submitit.local.local.LocalJob):
    """A local job started by a previous (killed) caller: alive while its controller pid is."""

    def done(self, force_check: bool = False) -> bool:
        return not _pid_alive(int(self.job_id))


class _LogTail:
    """Copies new lines of the job's task-0 stdout/stderr to ours (progress in the Snakemake log)."""

    def __init__(self, job: submitit.Job) -> None:
        self._paths = [job.paths.stdout, job.paths.stderr] if not job._sub_jobs else \
            [job._sub_jobs[0].paths.stdout, job._sub_jobs[0].paths.stderr]
        self._offsets = {p: 0 for p in self._paths}

    def pump(self) -> None:
        for path, stream in zip(self._paths, (sys.stdout, sys.stderr)):
            try:
                with open(path, "rb") as handle:
                    handle.seek(self._offsets[path])
                    chunk = handle.read()
            except OSError:
                continue
            if chunk:
                self._offsets[path] += len(chunk)
                stream.write(chunk.decode(errors="replace"))
                stream.flush()


def launch(entry: str, kwargs: Mapping[str, Any], *, job_dir: str | Path, resources: Mapping[str, Any] | Resources,
           name: str, poll_s: float | None = None, status_s: float = 30.0) -> Any:
    """Submit ``entry(**kwargs)`` (or re-attach to its running job), wait, and return task 0's result.

    ``poll_s``: seconds between checks; default 0.2 for local jobs (a process poll; the embedded run has
    ~30 short jobs), 1 for SLURM (submitit asks the scheduler)."""
    resources = resources if isinstance(resources, Resources) else Resources.from_config(resources)
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    if resources.cluster == "debug":
        # In-process, without submitit's DebugExecutor (which opens pdb on any exception).
        print(f"[launcher] running {name} in-process (cluster: debug)", flush=True)
        return StageJob()(entry, dict(kwargs))
    state_file = job_dir / "job.json"
    digest = call_digest(entry, kwargs)
    job = _reattach(state_file, resources, digest)
    if job is not None:
        print(f"[launcher] re-attaching to running {resources.cluster} job {job.job_id} ({state_file})", flush=True)
    else:
        executor = _executor(resources, job_dir / "submitit", name)
        # a local job runs cpus_per_task threads (Snakemake schedules it with as many cores: stage_threads)
        threads = resources.cpus_per_task if resources.cluster == "local" else None
        job = executor.submit(StageJob(), entry, dict(kwargs), threads)
        record = {"job_id": str(job.job_id), "cluster": resources.cluster, "folder": str(job_dir / "submitit"),
                  "num_tasks": resources.num_tasks, "entry": entry, "resources": asdict(resources),
                  "call_digest": digest, "submitted": time.time()}
        write_json_atomic(record, state_file)
        print(f"[launcher] submitted {name} as {resources.cluster} job {job.job_id} "
              f"({resources.num_tasks} task(s)); logs in {job_dir / 'submitit'}", flush=True)
    poll_s = poll_s if poll_s is not None else (0.2 if resources.cluster == "local" else 1.0)
    tail = _LogTail(job)
    last_status, gone = time.time(), 0
    while not job.done():
        tail.pump()
        if resources.cluster == "slurm" and time.time() - last_status >= status_s:
            # without accounting (sacct) submitit only sees result files: a job cancelled, killed or
            # failed before writing one would be waited for forever; squeue says it left the queue
            last_status = time.time()
            state = _slurm_state(str(job.job_id))
            gone = gone + 1 if state is not None and state not in _SLURM_ALIVE else 0
            if gone >= 2 and not job.done():
                tail.pump()
                state_file.unlink(missing_ok=True)
                raise submitit.core.utils.UncompletedJobError(
                    f"SLURM job {job.job_id} ended ({state or 'no longer listed'}) without a result; its logs: "
                    f"{job_dir / 'submitit'}. Rerun the same command to resume from the last checkpoint.")
        time.sleep(poll_s)
    tail.pump()
    try:
        results = job.results()
    finally:
        state_file.unlink(missing_ok=True)
    return results[0]
