"""DVC versions and shares the expensive outputs; Snakemake stays the one that runs the DAG.

- :func:`run_dvc_yaml` — the ``results/<run>/dvc.yaml`` the workflow writes for each run (rule
  ``dvc_yaml``): its metrics (``metrics_flat.json``) and, when it pretrains, its curves for ``dvc plots``.
  DVC reads every ``dvc.yaml`` of the repository, so each run declares exactly what it wrote and
  ``dvc metrics show`` / ``dvc plots show`` run clean whatever runs a clone holds (a root file naming
  every run's files would warn about the runs that are not there);
- :func:`track` — ``dvc add`` every output of the pretraining jobs (the exported teacher backbone, its
  summary and the training curves: *all* outputs of the rule, found with ``snakemake --summary``, so
  that a pulled job is complete), optionally ``dvc push``;
- :func:`pull` — ``dvc pull``, then :func:`mark_up_to_date`: build whatever the pulled jobs depend on
  that is missing (e.g. the embedded datasets, which are regenerated, not versioned), then
  ``snakemake --touch`` the pulled outputs so that they are newer than their inputs. DVC restores
  files with fresh mtimes but a regenerated input would be newer still, and Snakemake's mtime trigger
  (and its "input files updated by another job" rule, which no ``--rerun-triggers`` choice turns
  off) would plan a multi-day pretraining rerun. On a fresh clone there is no ``.snakemake``
  metadata, so the params/code/input/software-env triggers stay silent.

Every ``dvc`` invocation made here holds an exclusive file lock (:func:`dvc_lock`): several helpers
(or cluster jobs on a shared file system) queue instead of failing on DVC's own repo lock.

Remotes (:func:`check_remote`, run before every push/pull): any DVC remote works; for S3 (``dvc-s3``)
the credentials come from AWS's usual chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, a profile
via ``AWS_PROFILE`` or ``dvc remote modify --local NAME profile P``, instance roles), and the endpoint of
an S3-compatible store (MinIO, Ceph, moto) from ``dvc remote modify --local NAME endpointurl URL`` or
``AWS_ENDPOINT_URL_S3``. ``.dvc/config`` is committed, so keys found there are refused. A push or pull
that fails (network, server) names the remote; rerunning it resumes: DVC uploads/downloads only the
objects the other side lacks, and an S3 object only exists once its upload completed.
"""

from __future__ import annotations

import contextlib
import csv
import fcntl
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import yaml

from ibot.stages import BACKBONE_STAGE

__all__ = ["DVCError", "Remote", "repo_root", "dvc_lock", "run_dvc", "run_snakemake", "snakemake_summary",
           "rule_outputs", "tracked_outputs", "remote_config", "check_remote", "s3_credentials_source", "track",
           "push", "pull", "mark_up_to_date", "PRETRAIN_RULES", "SECRET_OPTIONS", "CURVE_TITLES", "run_dvc_yaml"]

#: Titles of the ``dvc plots`` of a run's pretraining curves (one plot per folder of ibot.results.plots.CURVE_SETS).
CURVE_TITLES = {"loss": "pretraining losses (total, [CLS], patch)", "lr": "learning rate and weight decay",
                "teacher": "teacher momentum and temperatures"}


def run_dvc_yaml(run: str, *, curves: bool) -> str:
    """The text of ``results/<run>/dvc.yaml``: the run's metrics file and, if it pretrains (``curves``), one
    plot per curve folder; paths relative to the run folder, as DVC reads them. No ``stages:``: Snakemake
    runs the DAG, a DVC pipeline would be a second one with its own idea of "changed"."""
    from ibot.results.plots import CURVE_SETS

    content: dict = {"metrics": ["metrics_flat.json"]}
    if curves:
        content["plots"] = [{f"curves/{name}": {"x": "iteration", "y": list(columns),
                                                "title": f"{run}: {CURVE_TITLES[name]}"}}
                            for name, columns in CURVE_SETS.items()]
    header = (f"# Written by the workflow (rule dvc_yaml) for run {run!r}: what DVC versions of it (metrics, curves).\n"
              "# Checkpoints: `ibot dvc-track` adds <file>.dvc pointers beside the pretraining outputs.\n")
    return header + yaml.safe_dump(content, sort_keys=False)

#: The rules whose outputs are tracked: the stage that makes the backbone (pretraining).
PRETRAIN_RULES = (BACKBONE_STAGE.name,)
#: Remote options that are secrets: allowed in ``.dvc/config.local`` (git-ignored), never in ``.dvc/config``.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "sse_customer_key", "password",
                  "key_secret", "account_key", "sas_token", "connection_string", "gdrive_client_secret")


class DVCError(RuntimeError):
    """A DVC or Snakemake step of the sharing helpers failed (message says which and why)."""


def repo_root(start: str | Path = ".") -> Path:
    """The nearest folder upwards holding ``.dvc`` or ``.git`` (else ``start``)."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / ".dvc").is_dir() or (folder / ".git").exists():
            return folder
    return start


def _executable(name: str) -> str:
    beside = Path(sys.executable).parent / name  # the venv's own dvc/snakemake first
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DVCError(f"{name} not found (install the project environment: bash setup.sh)")
    return found


def _lock_path(root: Path) -> Path:
    if (root / ".dvc").is_dir():
        (root / ".dvc" / "tmp").mkdir(exist_ok=True)
        return root / ".dvc" / "tmp" / "ibot-dvc.lock"
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ibot-dvc-{digest}.lock"


@contextlib.contextmanager
def dvc_lock(root: str | Path = ".", timeout_s: float = 3600.0) -> Iterator[Path]:
    """Exclusive lock around DVC calls on one repository (blocking, with a timeout)."""
    path = _lock_path(Path(root).resolve())
    deadline = time.monotonic() + timeout_s
    with open(path, "a+") as handle:
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise DVCError(f"DVC lock {path}: still held by another process after {timeout_s:.0f} s")
                time.sleep(0.2)
        try:
            yield path
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _run(cmd: Sequence[str], cwd: Path, what: str, capture: bool) -> subprocess.CompletedProcess:
    result = subprocess.run(list(cmd), cwd=cwd, text=True, capture_output=capture)
    if result.returncode != 0:
        detail = ((result.stderr or "") + (result.stdout or "")).strip()[-4000:] if capture else "(see above)"
        raise DVCError(f"{what} failed (exit {result.returncode}): {' '.join(cmd)}\n{detail}")
    return result


def run_dvc(args: Sequence[str], root: str | Path = ".", *, capture: bool = False) -> subprocess.CompletedProcess:
    """``dvc <args>`` in ``root`` under :func:`dvc_lock`."""
    root = Path(root).resolve()
    with dvc_lock(root):
        return _run([_executable("dvc"), *args], root, f"dvc {args[0] if args else ''}", capture)


def run_snakemake(args: Sequence[str], root: str | Path = ".", *, capture: bool = False) -> subprocess.CompletedProcess:
    return _run([_executable("snakemake"), *args], Path(root).resolve(), "snakemake", capture)


def snakemake_summary(targets: Sequence[str] = (), snakemake_args: Sequence[str] = (),
                      root: str | Path = ".") -> list[dict[str, str]]:
    """Rows of ``snakemake --summary`` (output_file, date, rule, log-file(s), status, plan)."""
    out = run_snakemake(["--summary", *snakemake_args, "--", *targets], root, capture=True).stdout
    lines = out.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("output_file\t")), None)
    if start is None:
        raise DVCError(f"snakemake --summary printed no table:\n{out[-2000:]}")
    return list(csv.DictReader(io.StringIO("\n".join(lines[start:])), delimiter="\t"))


def rule_outputs(rules: Sequence[str] = PRETRAIN_RULES, snakemake_args: Sequence[str] = (),
                 root: str | Path = ".") -> list[str]:
    """Every output file (existing or not) of the jobs of ``rules`` in the workflow's default DAG."""
    return [row["output_file"] for row in snakemake_summary((), snakemake_args, root) if row["rule"] in rules]


def tracked_outputs(root: str | Path = ".", under: str = "results") -> list[str]:
    """Paths (relative to ``root``) of the outputs declared by the ``*.dvc`` files under ``under``."""
    root = Path(root).resolve()
    outs = []
    for dvc_file in sorted((root / under).rglob("*.dvc")):
        data = yaml.safe_load(dvc_file.read_text()) or {}
        for out in data.get("outs") or []:
            outs.append(str((dvc_file.parent / out["path"]).relative_to(root)))
    return outs


@dataclass(frozen=True)
class Remote:
    """A DVC remote as the merged config (system, global, ``.dvc/config``, ``.dvc/config.local``) sees it."""

    name: str
    url: str
    options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def endpoint(self) -> str | None:
        """The S3 endpoint in use: ``endpointurl`` of the remote, else ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``."""
        if not self.url.startswith("s3://"):
            return None
        return (self.options.get("endpointurl") or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL"))

    def describe(self) -> str:
        """``remote 'NAME' (URL, endpoint E)`` for messages; never includes a secret."""
        endpoint = f", endpoint {self.endpoint}" if self.endpoint else ""
        return f"remote '{self.name}' ({self.url}{endpoint})"


def remote_config(root: str | Path = ".", remote: str | None = None) -> Remote:
    """The remote ``remote`` (default: ``core.remote``) of the DVC repository at ``root``."""
    from dvc.config import Config, ConfigError

    dvc_dir = Path(root).resolve() / ".dvc"
    if not dvc_dir.is_dir():
        raise DVCError(f"{dvc_dir.parent} is not a DVC repository (no .dvc/): run dvc init")
    try:
        config = Config(dvc_dir=str(dvc_dir))
    except ConfigError as error:
        raise DVCError(f"invalid DVC config in {dvc_dir}: {error}") from error
    name = remote or config["core"].get("remote")
    remotes = config.get("remote", {})
    if not name:
        raise DVCError("no DVC remote: set a default one (dvc remote add -d NAME URL) or pass --remote NAME"
                       + (f"; configured: {sorted(remotes)}" if remotes else ""))
    if name not in remotes:
        raise DVCError(f"DVC remote '{name}' is not configured (known: {sorted(remotes) or 'none'}); "
                       f"add it with: dvc remote add {name} URL")
    options = dict(remotes[name])
    return Remote(name, str(options.pop("url")), options)


def s3_credentials_source(remote: Remote) -> str | None:
    """Where botocore (what s3fs/dvc-s3 use) finds credentials for ``remote``, or None when nowhere.

    Same resolution as the push: the remote's own keys (``.dvc/config.local``), its ``profile`` and
    ``credentialpath``/``configpath``, then the environment, shared files, container and instance roles.
    """
    import botocore.session
    from botocore.exceptions import BotoCoreError

    options = remote.options
    if options.get("allow_anonymous_login"):
        return "anonymous login (allow_anonymous_login)"
    if options.get("access_key_id") and options.get("secret_access_key"):
        return "access_key_id/secret_access_key of the remote (.dvc/config.local)"
    session = botocore.session.Session(profile=options.get("profile"))
    # dvc-s3 exports these with os.environ.setdefault: the environment wins, as here
    if options.get("credentialpath") and "AWS_SHARED_CREDENTIALS_FILE" not in os.environ:
        session.set_config_variable("credentials_file", options["credentialpath"])
    if options.get("configpath") and "AWS_CONFIG_FILE" not in os.environ:
        session.set_config_variable("config_file", options["configpath"])
    try:
        credentials = session.get_credentials()
    except BotoCoreError as error:  # e.g. ProfileNotFound, a broken credentials file
        raise DVCError(f"{remote.describe()}: AWS credentials cannot be loaded: {error}") from error
    if credentials is None:
        return None
    return f"{getattr(credentials, 'method', 'aws')} (profile {options['profile']})" if options.get("profile") \
        else getattr(credentials, "method", "aws")


def check_remote(root: str | Path = ".", remote: str | None = None) -> Remote:
    """Fail fast, naming the remote, before a push or pull that could run for hours.

    Refuses secrets in the committed ``.dvc/config`` and, for ``s3://`` remotes, missing credentials.
    Returns the remote (reachability is left to DVC, whose error is wrapped by :func:`push`/:func:`pull`).
    """
    from dvc.config import Config

    root = Path(root).resolve()
    info = remote_config(root, remote)
    committed = (Config(dvc_dir=str(root / ".dvc"), validate=False).load_one("repo").get("remote") or {})
    leaked = sorted(k for k in (committed.get(info.name) or {}) if k in SECRET_OPTIONS)
    if leaked:
        fix = "; ".join(f"dvc remote modify --local {info.name} {k} VALUE && dvc remote modify --unset {info.name} {k}"
                        for k in leaked)
        raise DVCError(f"{info.describe()}: {', '.join(leaked)} set in .dvc/config, which git commits; "
                       f"keep secrets out of it (use environment variables, an AWS profile, or "
                       f".dvc/config.local): {fix}")
    if info.url.startswith("s3://") and s3_credentials_source(info) is None:
        profile = info.options.get("profile") or os.environ.get("AWS_PROFILE")
        raise DVCError(
            f"{info.describe()}: no AWS credentials found"
            + (f" for profile '{profile}'" if profile else "")
            + ". Export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN if temporary), "
            f"or name a profile of ~/.aws/credentials with AWS_PROFILE or "
            f"'dvc remote modify --local {info.name} profile NAME'; never in .dvc/config (git commits it)")
    return info


def track(files: Sequence[str], root: str | Path = ".", *, push_to: str | None = None,
          push_now: bool = False) -> list[str]:
    """``dvc add`` ``files`` (relative to ``root``); returns the ``.dvc`` files to commit with git.

    With ``push_now`` the remote is checked (:func:`check_remote`) before hashing, then pushed to.
    """
    root = Path(root).resolve()
    missing = [f for f in files if not (root / f).is_file()]
    if missing:
        raise DVCError(f"cannot track missing files: {missing}")
    if not files:
        return []
    if push_now:
        check_remote(root, push_to)
    run_dvc(["add", *files], root)
    dvc_files = [f"{f}.dvc" for f in files]
    if push_now:
        push(dvc_files, root, remote=push_to)
    return dvc_files


def _transfer(verb: str, targets: Sequence[str], root: str | Path, remote: str | None) -> Remote:
    """``dvc push|pull -r NAME`` after :func:`check_remote`; a failure names the remote and how to resume."""
    info = check_remote(root, remote)
    try:
        run_dvc([verb, "-r", info.name, *targets], root)
    except DVCError as error:
        raise DVCError(f"dvc {verb} with {info.describe()} failed; rerunning the same command resumes "
                       f"(objects already transferred are skipped).\n{error}") from error
    return info


def push(targets: Sequence[str] = (), root: str | Path = ".", *, remote: str | None = None) -> Remote:
    """``dvc push`` (``targets``: ``.dvc`` files or paths, default all) to ``remote`` (default: ``core.remote``)."""
    return _transfer("push", targets, root, remote)


def mark_up_to_date(outputs: Sequence[str], snakemake_args: Sequence[str] = (), root: str | Path = ".", *,
                    cores: int = 1) -> dict[str, list[str]]:
    """Make Snakemake accept pulled ``outputs`` as done: build their missing upstream, then ``--touch``.

    Returns ``{"upstream": [...], "touched": [...]}``; raises if Snakemake would still rerun them.
    """
    if not outputs:
        return {"upstream": [], "touched": []}
    rows = snakemake_summary(outputs, snakemake_args, root)
    target_rules = {row["rule"] for row in rows if row["output_file"] in set(outputs)}
    upstream = [row["output_file"] for row in rows if row["rule"] not in target_rules]
    incomplete = sorted({row["output_file"] for row in rows if row["rule"] in target_rules
                         and row["status"] == "missing"})
    if incomplete:
        raise DVCError("pulled jobs are incomplete, their outputs are missing: "
                       f"{incomplete}; track every output of the rule (python -m ibot.results dvc-track)")
    pending = [row for row in rows if row["rule"] not in target_rules
               and (row["status"] == "missing" or row["plan"] != "no update")]
    if pending:  # e.g. the embedded datasets: regenerate them *before* touching
        run_snakemake(["--cores", str(cores), *snakemake_args, "--", *upstream], root)
    run_snakemake(["--touch", "--cores", "1", *snakemake_args, "--", *outputs], root, capture=True)
    stale = [row["output_file"] for row in snakemake_summary(outputs, snakemake_args, root)
             if row["rule"] in target_rules and row["plan"] != "no update"]
    if stale:
        raise DVCError(f"snakemake still plans to update {stale} after --touch")
    return {"upstream": upstream, "touched": list(outputs)}


def pull(root: str | Path = ".", *, remote: str | None = None, targets: Sequence[str] = (),
         snakemake_args: Sequence[str] = (), cores: int = 1, touch: bool = True) -> dict[str, list[str]]:
    """``dvc pull`` (remote checked first) then :func:`mark_up_to_date` on the pulled results the workflow produces."""
    root = Path(root).resolve()
    _transfer("pull", targets, root, remote)
    outputs = [o for o in tracked_outputs(root) if (root / o).exists()]
    if targets:
        wanted = {str(Path(t).with_suffix("")) if t.endswith(".dvc") else t for t in targets}
        outputs = [o for o in outputs if o in wanted]
    if not touch:
        return {"pulled": outputs, "upstream": [], "touched": []}
    known = {row["output_file"] for row in snakemake_summary((), snakemake_args, root)}
    result = mark_up_to_date([o for o in outputs if o in known], snakemake_args, root, cores=cores)
    return {"pulled": outputs, **result}
