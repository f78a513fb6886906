"""The one resume rule: a work directory is reused only for the exact setup that produced it.

Every stage whose registry entry is ``resumable`` keeps its checkpoints in ``<stage>/work/``, which
:func:`ibot.run.context.run_stage` prepares with :func:`prepare_work_dir` before the stage runs, from
the fingerprint of everything that determines its result (:func:`stage_fingerprint`): the resolved
stage config (minus keys that only change logging), the model spec, the sha256 of the backbone
checkpoint it starts from and of every input file its config names, the identity of every dataset it
reads, the seed, the process count, the identity of the code that computes it
(:func:`ibot.code_identity.code_identity`: the project modules it runs, comments, docstrings and log lines
aside) and the version of the fingerprint rule itself. The fingerprint is stored in ``work/fingerprint.json``.

- Same fingerprint: resume (a requeue, a kill, an identical rerun).
- Different fingerprint, or a work directory without one: the directory is moved aside to
  ``work.stale-<UTC timestamp>`` (never deleted: it may hold days of compute), the stage starts
  fresh and says so in one log line naming the keys that changed.

- A fresh recompute was asked for (the workflow's ``fresh`` switch, :func:`fresh_request`, or
  ``python -m downstream <stage> --fresh``): the directory is moved aside even for the same
  fingerprint. The request carries a token recorded in ``fingerprint.json``, so a requeued or resumed
  job of the same request continues its own fresh work instead of starting over again.

Changing ``epochs`` also starts fresh, upward or downward: every schedule of these recipes (cosine
lr, weight decay, teacher momentum and temperature, step milestones, poly decay) is a function of
the total length, so a continued run is not the run its config describes.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from ibot.io import write_json_atomic

__all__ = ["FINGERPRINT_FILE", "FINGERPRINT_VERSION", "FRESH_ENV", "WorkDir", "stage_fingerprint", "dataset_identity",
           "fingerprint_digest", "prepare_work_dir", "fresh_request"]

FINGERPRINT_FILE = "fingerprint.json"
#: Bump when the fingerprint rule itself changes (what it holds, how it is computed); changes to the code a
#: stage runs are in the fingerprint already (``code``). 2: the code identity was added.
FINGERPRINT_VERSION = 2
#: The workflow's ``fresh`` switch reaches the stage command lines through this variable (set by
#: workflow/rules/common.smk): JSON ``{"stages": [...], "token": ...}``, one token per Snakemake invocation.
FRESH_ENV = "IBOT_FRESH"
#: Manifest written by the embedded generator at a set's root (``ibot.data.embedded``): its sha256
#: names every file of the set, so it is the set's identity without listing the files.
_MANIFEST_DONE = "DONE"


@dataclass(frozen=True)
class WorkDir:
    """A prepared work directory: where it is, the fingerprint it holds, and what happened."""

    path: Path
    fingerprint: dict[str, Any]
    digest: str
    resumed: bool                 # it held work of this same fingerprint (known on rank 0)
    stale: Path | None = None     # where a mismatching directory was moved (rank 0)


def fingerprint_digest(fingerprint: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()


def dataset_identity(root: str | Path) -> dict[str, Any]:
    """What identifies a dataset's content, cheaply and stably.

    An embedded set (or a parent folder of its root, e.g. ``imagenet/train``) carries a ``DONE``
    file, the sha256 of its manifest. Any other dataset is identified by the sha256 of its sorted
    file list with sizes (one ``stat`` per file; no file is read).
    """
    root = Path(root).resolve()
    for folder in (root, root.parent):
        done = folder / _MANIFEST_DONE
        if done.is_file() and (folder / "MANIFEST.json").is_file():
            return {"path": str(root), "manifest_sha256": done.read_text().strip(),
                    "relative_to_manifest": str(root.relative_to(folder))}
    if not root.exists():
        raise FileNotFoundError(f"dataset {root}: does not exist")
    digest, count = hashlib.sha256(), 0
    for path, size in sorted(_walk_files(root)):
        digest.update(f"{path}\0{size}\n".encode())
        count += 1
    return {"path": str(root), "files": count, "file_list_sha256": digest.hexdigest()}


def _walk_files(root: Path) -> Iterable[tuple[str, int]]:
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=True):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=True):
                    yield os.path.relpath(entry.path, root), entry.stat().st_size


def stage_fingerprint(*, stage: str, config: Mapping[str, Any], model_spec: Mapping[str, Any],
                      checkpoint_sha256: str | None, data: Mapping[str, str | Path], seed: int, world_size: int,
                      operational_keys: Iterable[str] = (), files: Mapping[str, str] | None = None,
                      code: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Everything that determines a resumable stage's result (see the module docstring).

    ``data`` maps a dataset kind (e.g. ``imagenet``) to the root the stage reads; ``operational_keys``
    are config keys that cannot change the result (log intervals) and are left out; ``files`` the
    sha256 of the input files the config names (dotted key -> digest); ``code`` the identity of the code
    that computes the stage (:func:`ibot.code_identity.code_identity`).
    """
    skip = set(operational_keys)
    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "stage": stage,
        "config": {key: value for key, value in sorted(config.items()) if key not in skip},
        "model": {key: value for key, value in sorted(model_spec.items())},
        "checkpoint_sha256": checkpoint_sha256,
        "data": {name: dataset_identity(path) for name, path in sorted(data.items())},
        "seed": int(seed),
        "world_size": int(world_size),
    }
    if code is not None:
        fingerprint["code"] = {"digest": code["digest"], "modules": dict(sorted(code["modules"].items()))}
    return {**fingerprint, "files": dict(sorted(files.items()))} if files else fingerprint


def fresh_request(stage: str, environ: Mapping[str, str] = os.environ) -> str | None:
    """The token of a fresh recompute the workflow asks of ``stage`` (its ``fresh`` switch names the stage), or
    None. A malformed value is an error naming the variable, not a silent resume."""
    value = environ.get(FRESH_ENV)
    if not value:
        return None
    try:
        request = json.loads(value)
        stages, token = list(request["stages"]), str(request["token"])
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{FRESH_ENV}={value!r}: expected JSON {{'stages': [...], 'token': ...}} ({error})") from None
    return token if stage in stages else None


def _changes(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, with both values (for the one-line log message)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += _changes(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _read_record(path: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and "digest" in record else None


def _stale_name(work: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    candidate, n = work.with_name(f"{work.name}.stale-{stamp}"), 1
    while candidate.exists():
        candidate, n = work.with_name(f"{work.name}.stale-{stamp}-{n}"), n + 1
    return candidate


def prepare_work_dir(work: str | Path, fingerprint: Mapping[str, Any], *, fresh: str | None = None,
                     log: Callable[[str], None] = lambda message: print(message, flush=True)) -> WorkDir:
    """Resume ``work`` if it was made for ``fingerprint`` (and, with a ``fresh`` token, by that fresh request),
    else move it aside and start fresh.

    In a distributed job only rank 0 looks and moves; every rank returns the same answer after a
    barrier. Call it before anything reads or writes ``work``.
    """
    from ibot import distributed as dist_utils

    work = Path(work)
    fingerprint = json.loads(json.dumps(dict(fingerprint), sort_keys=True, default=str))  # plain JSON values
    digest = fingerprint_digest(fingerprint)
    label = f"[{fingerprint.get('stage', 'stage')}]"
    resumed, stale = False, None
    if dist_utils.is_main():
        record = _read_record(work / FINGERPRINT_FILE)
        occupied = work.is_dir() and any(work.iterdir())
        same = record is not None and record["digest"] == digest
        if occupied and same and (fresh is None or record.get("fresh") == fresh):
            resumed = True
            log(f"{label} work dir {work} matches this run (fingerprint {digest[:12]}): resuming from it")
        elif occupied:
            stale = _stale_name(work)
            why = ("a fresh recompute was requested (fresh switch)" if same else
                   "; ".join(_changes(record.get("fingerprint", {}), fingerprint)) if record
                   else f"it has no {FINGERPRINT_FILE}")
            work.rename(stale)
            log(f"{label} work dir {work} was made for another setup ({why}): moved aside to {stale}, "
                f"starting fresh")
        work.mkdir(parents=True, exist_ok=True)
        if not resumed:
            write_json_atomic({"digest": digest, "fingerprint": fingerprint, **({"fresh": fresh} if fresh else {})},
                              work / FINGERPRINT_FILE)
    dist_utils.barrier()  # other ranks touch work/ only once rank 0 has settled it
    return WorkDir(path=work, fingerprint=fingerprint, digest=digest, resumed=resumed, stale=stale)
