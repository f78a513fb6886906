"""A throw-away single-node SLURM cluster for the tests (munged + slurmctld + slurmd, all by PID).

``start_cluster()`` writes a slurm.conf into a fresh temp folder (state, spool, logs, pid files and
the munge socket all live there; ports are picked free, so two sessions on one machine do not
collide), starts ``munged`` as the munge user and ``slurmctld``/``slurmd`` as root in the
foreground (their Popen PIDs are the daemons), and waits until ``sinfo`` shows the node idle.
``SlurmCluster.stop()`` ends exactly those three processes. No accounting (no slurmdbd): ``sacct``
fails, which submitit tolerates (it warns and falls back to the result files) and the Snakemake
SLURM executor handles with ``slurm-status-command: squeue``.

The fixture ``slurm_cluster`` (registered in ``conftest.py``) exports ``SLURM_CONF`` for the whole
test session so ``sbatch``/``squeue``/``scontrol`` (and the jobs themselves) use this cluster.

Besides the cluster, this module holds the job-side helper :func:`paced_pretrain`, a launcher entry
used by the requeue tests (it must be importable inside the SLURM job: the tests put this folder on
``PYTHONPATH``, which sbatch exports to the job).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["SlurmCluster", "SlurmUnavailable", "start_cluster", "unavailable_reason", "paced_pretrain"]

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")
INSTALL_HINT = ("install them with `bash setup.sh --test` as root, or "
                "`apt-get update && apt-get install -y slurm-wlm munge`")


class SlurmUnavailable(RuntimeError):
    """The single-node cluster cannot run here (reason in the message)."""


def _which(name: str) -> str | None:
    return shutil.which(name) or next((f"{d}/{name}" for d in ("/usr/sbin", "/sbin", "/usr/local/sbin")
                                       if os.access(f"{d}/{name}", os.X_OK)), None)


def unavailable_reason() -> str | None:
    """Why the cluster cannot be started on this machine, or None if it can."""
    missing = [name for name in DAEMONS + CLIENTS if _which(name) is None]
    if missing:
        return f"SLURM/munge binaries not found: {', '.join(missing)}; {INSTALL_HINT}"
    if os.geteuid() != 0:
        return "the single-node SLURM cluster needs root (slurmd launches jobs; SlurmUser=root)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return f"no 'munge' user (the munge package creates it); {INSTALL_HINT}"
    return None


def _free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _real_memory_mb() -> int:
    meminfo = Path("/proc/meminfo").read_text()
    total_kb = int(re.search(r"^MemTotal:\s+(\d+)", meminfo, re.M).group(1))
    # slurmd measures slightly less than MemTotal; a configured value above its measure drains the node
    return max(1, int(total_kb / 1024 * 0.95))


_FINAL_STATES = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                 "BOOT_FAIL", "DEADLINE"}


@dataclass
class SlurmCluster:
    root: Path
    conf: Path
    node: str
    partition: str = "debug"
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """Environment for SLURM clients (and, through sbatch's --export=ALL, for the jobs)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env

    def command(self, *args: str, check: bool = True, timeout: float = 60) -> str:
        result = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")
        return result.stdout

    def job_state(self, job_id: str) -> str | None:
        """SLURM state of a job still known to slurmctld (MinJobAge keeps finished ones 300 s), or None."""
        out = self.command("scontrol", "-o", "show", "job", str(job_id), check=False)
        match = re.search(r"\bJobState=(\S+)", out)
        return match.group(1) if match else None

    def job_field(self, job_id: str, name: str) -> str | None:
        out = self.command("scontrol", "-o", "show", "job", str(job_id), check=False)
        match = re.search(rf"\b{name}=(\S*)", out)
        return match.group(1) if match else None

    def jobs(self) -> list[dict[str, str]]:
        """Every job slurmctld knows (running, pending and finished within MinJobAge), as key/value dicts."""
        out = self.command("scontrol", "-o", "show", "job", check=False)
        jobs = []
        for line in out.splitlines():
            if "JobId=" in line:
                jobs.append(dict(re.findall(r"(\w+)=(\S*)", line)))
        return jobs

    def wait_state(self, job_id: str, states: set[str], timeout: float = 120) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not in {sorted(states)} after {timeout}s (last: {state})\n{self.logs()}")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log", "munge/munged.log"):
            path = self.root / name
            if path.is_file():
                tail = path.read_text(errors="replace").splitlines()[-lines:]
                parts.append(f"--- {path} (last {len(tail)} lines)\n" + "\n".join(tail))
        return "\n".join(parts)

    def cancel_all_jobs(self, timeout: float = 30) -> None:
        """Cancel every unfinished job and wait for them to end: slurmd must reap their job steps
        (``slurmstepd`` daemons), which would otherwise outlive the cluster."""
        ids = [job["JobId"] for job in self.jobs() if job.get("JobState") not in _FINAL_STATES]
        if not ids:
            return
        self.command("scancel", *ids, check=False)
        deadline = time.time() + timeout
        while time.time() < deadline and any(job.get("JobState") not in _FINAL_STATES for job in self.jobs()):
            time.sleep(0.5)

    def stop(self, keep_files: bool = False) -> None:
        """Cancel leftover jobs, stop the daemons we started (by PID: SIGTERM, then SIGKILL) and
        remove the temp folder."""
        ctld = self.processes.get("slurmctld")
        if ctld is not None and ctld.poll() is None:
            self.cancel_all_jobs()
        for name in reversed(list(self.processes)):
            proc = self.processes[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self.processes.clear()
        if not keep_files:
            shutil.rmtree(self.root, ignore_errors=True)


def _write_conf(root: Path, node: str, munge_socket: Path, ctld_port: int, slurmd_port: int) -> Path:
    conf = root / "slurm.conf"
    conf.write_text(f"""\
# generated by tests/slurm_cluster.py: one node, no accounting, everything under {root}
ClusterName=ibottest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
# cred_expire also delays the restart of a requeued job (default 120 s): short here for the requeue tests
AuthInfo=socket={munge_socket},cred_expire=5
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# short grace between SIGTERM and SIGKILL (preemption/requeue tests), finished jobs stay visible 300 s
KillWait=5
MinJobAge=300
InactiveLimit=0
JobRequeue=1
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory={_real_memory_mb()} State=UNKNOWN
PartitionName=debug Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
    return conf


def _ensure_munge_key(root: Path, munge_user: pwd.struct_passwd) -> Path:
    system_key = Path("/etc/munge/munge.key")
    if system_key.is_file():
        return system_key
    key = root / "munge" / "munge.key"
    mungekey = _which("mungekey")
    if mungekey:
        subprocess.run([mungekey, "--create", f"--keyfile={key}"], check=True, capture_output=True)
    elif _which("create-munge-key"):  # older munge: writes /etc/munge/munge.key
        subprocess.run([_which("create-munge-key"), "-f"], check=True, capture_output=True)
        return system_key
    else:
        key.write_bytes(os.urandom(1024))
    os.chown(key, munge_user.pw_uid, munge_user.pw_gid)
    key.chmod(0o600)
    return key


def _spawn(name: str, args: list[str], root: Path, **kwargs) -> subprocess.Popen:
    out = open(root / f"{name}.stdout", "ab")
    return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, **kwargs)


def start_cluster(timeout: float = 90) -> SlurmCluster:
    """Start the single-node cluster; raises SlurmUnavailable (with the reason) if it cannot run."""
    reason = unavailable_reason()
    if reason:
        raise SlurmUnavailable(reason)
    root = Path(tempfile.mkdtemp(prefix="ibot-slurm-"))
    root.chmod(0o755)  # the munge user must reach root/munge
    node = socket.gethostname().split(".")[0]
    munge_user = pwd.getpwnam("munge")
    munge_dir = root / "munge"
    munge_dir.mkdir()
    munge_dir.chmod(0o755)  # munged: the socket directory must be searchable by all, writable by it only
    os.chown(munge_dir, munge_user.pw_uid, munge_user.pw_gid)
    for sub in ("state", "spool"):
        (root / sub).mkdir()
    ctld_port, slurmd_port = _free_ports(2)
    munge_socket = munge_dir / "munge.socket.2"
    conf = _write_conf(root, node, munge_socket, ctld_port, slurmd_port)
    cluster = SlurmCluster(root=root, conf=conf, node=node)
    env = cluster.env
    try:
        key = _ensure_munge_key(root, munge_user)
        cluster.processes["munged"] = _spawn("munged", [
            _which("munged"), "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
            f"--log-file={munge_dir}/munged.log", f"--pid-file={munge_dir}/munged.pid",
            f"--seed-file={munge_dir}/munged.seed"], root, user=munge_user.pw_uid, group=munge_user.pw_gid,
            env=env)
        _wait(lambda: munge_socket.exists(), 20, "munged socket", cluster)
        cluster.processes["slurmctld"] = _spawn("slurmctld", [_which("slurmctld"), "-D", "-c", "-f", str(conf)],
                                                root, env=env)
        _wait(lambda: cluster.command("scontrol", "ping", check=False, timeout=10).count("UP") > 0, 30,
              "slurmctld to answer", cluster)
        cluster.processes["slurmd"] = _spawn("slurmd", [_which("slurmd"), "-D", "-f", str(conf)], root, env=env)

        def idle() -> bool:
            state = cluster.command("sinfo", "-h", "-N", "-n", node, "-o", "%t", check=False, timeout=10).strip()
            return state == "idle"

        _wait(idle, timeout, f"node {node} idle in sinfo", cluster)
    except BaseException:
        cluster.stop(keep_files=True)
        raise
    return cluster


def _wait(predicate, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for name, proc in cluster.processes.items():
            if proc.poll() is not None:
                raise SlurmUnavailable(f"{name} exited with {proc.returncode} while waiting for {what}; "
                                       f"files kept in {cluster.root}\n{_stdout_tail(cluster, name)}\n{cluster.logs()}")
        try:
            if predicate():
                return
        except (OSError, subprocess.SubprocessError):
            pass
        time.sleep(0.3)
    raise SlurmUnavailable(f"timed out after {timeout}s waiting for {what}; files kept in {cluster.root}\n"
                           f"{cluster.logs()}")


def _stdout_tail(cluster: SlurmCluster, name: str) -> str:
    path = cluster.root / f"{name}.stdout"
    return path.read_text(errors="replace")[-3000:] if path.is_file() else ""


# -- job-side helper ---------------------------------------------------------------------------
def paced_pretrain(pace_s: float, attempts_file: str, argv: list[str]):
    """The pretraining stage of ``python -m downstream pretrain ARGV``, run in this job
    (:func:`ibot.run.context.run_stage`), sleeping ``pace_s`` after every epoch checkpoint but the last.

    The sleep only stretches wall time (so a 1-minute SLURM limit and an external requeue land
    mid-run) without extra CPU on a shared 2-core machine; the arithmetic is untouched, so the
    final weights must equal an unpaced, uninterrupted run. Each start appends a line
    ``<SLURM_RESTART_COUNT> <start epoch>`` to ``attempts_file`` (rank 0 only).
    """
    from ibot import distributed as dist_utils
    from ibot.run.cli import build_parser, context_from_args
    from ibot.run.context import run_stage
    from ibot.train import pretrain

    original_save, original_resume = pretrain.Trainer.save, pretrain.Trainer.resume

    def save(self, epoch: int) -> None:
        original_save(self, epoch)
        if epoch < self.cfg["epochs"]:
            time.sleep(pace_s)

    def resume(self) -> None:
        original_resume(self)
        if dist_utils.is_main():
            with open(attempts_file, "a") as handle:
                handle.write(f"{os.environ.get('SLURM_RESTART_COUNT', '0')} {self.start_epoch}\n")

    pretrain.Trainer.save, pretrain.Trainer.resume = save, resume
    try:
        return run_stage(context_from_args(build_parser().parse_args(["pretrain", *argv])))
    finally:
        pretrain.Trainer.save, pretrain.Trainer.resume = original_save, original_resume
