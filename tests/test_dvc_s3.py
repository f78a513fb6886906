"""Checkpoints on S3 through DVC, against a real S3-protocol server (moto in server mode on 127.0.0.1).

Fast: :func:`ibot.results.dvc_tools.check_remote` (secrets refused in the committed ``.dvc/config``,
missing credentials named before any transfer, env/profile credentials accepted).
Slow, end to end: pretraining outputs tracked and pushed to ``s3://`` through a TCP relay that the
test cuts (push fails, naming the remote) and then freezes after the first object (push killed
midway); the retry uploads only the missing objects and the bucket then holds every object at its
DVC path with its md5; a fresh ``git clone`` pulls the checkpoints byte-identical and Snakemake
plans no pretraining. The AWS keys live only in the environment of the DVC calls and never reach git.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from helpers import BIN, REPO, planned_rules, tiny_pretrain_snakefile
from ibot.results.dvc_tools import DVCError, check_remote, s3_credentials_source

KEY_ID = "AKIAIBOTMOTOTEST0042"  # dummies, distinctive enough to grep for
SECRET = "ibotMotoSecretMustNeverBeCommitted0042xyz"
BUCKET, PREFIX = "ibot-ckpt", "ibot"


# -- environment ------------------------------------------------------------------------------------
def _isolated_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The test's environment without any AWS setting of the machine: no keys, profile or ~/.aws files,
    no instance-metadata lookups, no user/system DVC config."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DVC_"))}
    env.update({"AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"),
                "AWS_CONFIG_FILE": str(tmp / "no-aws-config"), "AWS_EC2_METADATA_DISABLED": "true",
                "DVC_GLOBAL_CONFIG_DIR": str(tmp / "dvc-global"), "DVC_SYSTEM_CONFIG_DIR": str(tmp / "dvc-system"),
                "DVC_NO_ANALYTICS": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
                "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                "GIT_COMMITTER_EMAIL": "t@t"})
    env.update(extra)
    return env


@pytest.fixture
def no_aws(tmp_path, monkeypatch):
    """This process's environment as :func:`_isolated_env` (restored afterwards)."""
    for name in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in _isolated_env(tmp_path).items():
        if name.startswith("AWS_") or name.startswith("DVC_"):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.aws
    return tmp_path


def _dvc_repo(root: Path, config: str, local: str = "") -> Path:
    (root / ".dvc").mkdir(parents=True)
    (root / ".dvc" / "config").write_text(config)
    if local:
        (root / ".dvc" / "config.local").write_text(local)
    return root


_S3_CONFIG = "[core]\n    remote = store\n['remote \"store\"']\n    url = s3://b/p\n"


# -- check_remote (fast) ----------------------------------------------------------------------------
def test_keys_in_committed_config_are_refused(no_aws):
    repo = _dvc_repo(no_aws / "r", _S3_CONFIG + f"    access_key_id = {KEY_ID}\n    secret_access_key = {SECRET}\n")
    with pytest.raises(DVCError) as error:
        check_remote(repo)
    message = str(error.value)
    assert "remote 'store' (s3://b/p)" in message and "access_key_id, secret_access_key" in message
    assert ".dvc/config, which git commits" in message and "dvc remote modify --local store" in message
    assert SECRET not in message
    # the same keys in .dvc/config.local (git-ignored) are fine
    ok = _dvc_repo(no_aws / "ok", _S3_CONFIG,
                   f"['remote \"store\"']\n    access_key_id = {KEY_ID}\n    secret_access_key = {SECRET}\n")
    assert "config.local" in s3_credentials_source(check_remote(ok))


def test_missing_credentials_name_the_remote_before_any_transfer(no_aws, monkeypatch):
    repo = _dvc_repo(no_aws / "r", _S3_CONFIG, "['remote \"store\"']\n    endpointurl = http://127.0.0.1:9\n")
    with pytest.raises(DVCError, match=re.escape("remote 'store' (s3://b/p, endpoint http://127.0.0.1:9): "
                                                 "no AWS credentials found. Export AWS_ACCESS_KEY_ID")):
        check_remote(repo)
    monkeypatch.setenv("AWS_PROFILE", "nobody")  # a profile that does not exist is named too
    with pytest.raises(DVCError, match=r"remote 'store'.*cannot be loaded.*nobody"):
        check_remote(repo)
    with pytest.raises(DVCError, match=r"DVC remote 'other' is not configured \(known: \['store'\]\)"):
        check_remote(repo, "other")
    with pytest.raises(DVCError, match="no DVC remote"):
        check_remote(_dvc_repo(no_aws / "none", "[core]\n"))


def test_credentials_from_environment_or_profile(no_aws, monkeypatch):
    repo = _dvc_repo(no_aws / "r", _S3_CONFIG)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    remote = check_remote(repo)
    assert (remote.name, remote.url, remote.endpoint) == ("store", "s3://b/p", "http://127.0.0.1:9")
    assert s3_credentials_source(remote) == "env"
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.delenv("AWS_SHARED_CREDENTIALS_FILE")  # so that the remote's credentialpath applies
    credentials = no_aws / "aws-credentials"
    credentials.write_text(f"[ibot]\naws_access_key_id = {KEY_ID}\naws_secret_access_key = {SECRET}\n")
    profiled = _dvc_repo(no_aws / "p", _S3_CONFIG,
                         f"['remote \"store\"']\n    profile = ibot\n    credentialpath = {credentials}\n")
    assert s3_credentials_source(check_remote(profiled)) == "shared-credentials-file (profile ibot)"


# -- moto server and a relay that can cut or freeze the link ----------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def moto_server(tmp_path):
    """``moto_server`` on 127.0.0.1:<free port> as a subprocess; yields its URL; always terminated."""
    exe = BIN / "moto_server"
    assert exe.is_file(), f"moto[server] not installed in {BIN} (pip install -e '.[test]')"
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([str(exe), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env=_isolated_env(tmp_path))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"moto_server exited: {(tmp_path / 'moto.log').read_text()[-2000:]}"
            try:
                with urllib.request.urlopen(url + "/", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "moto_server does not answer after 60 s"
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Relay:
    """TCP relay 127.0.0.1:port -> moto. ``down()`` makes the endpoint refuse connections; with
    ``admit = n`` the object uploads (``PUT /<bucket>/<prefix>/files/``) after the n-th are frozen
    (not forwarded, never answered) until :meth:`release` drops them: a push interrupted at a known point."""

    def __init__(self, target_port: int, marker: bytes):
        self.target_port, self.marker, self.port = target_port, marker, _free_port()
        self.lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.connections: list[socket.socket] = []
        self.admit: int | None = None
        self.puts = 0  # object uploads seen (forwarded or frozen)
        self.answered = 0  # forwarded uploads the server answered
        self.frozen = threading.Event()
        self.answered_event = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        self.release()

    def release(self) -> None:
        """Close every relayed connection (frozen uploads are dropped unanswered)."""
        with self.lock:
            connections, self.connections = self.connections, []
        for sock in connections:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            state = {"frozen": False, "pending": 0}
            with self.lock:
                self.connections += [client, server]
            threading.Thread(target=self._upstream, args=(client, server, state), daemon=True).start()
            threading.Thread(target=self._downstream, args=(server, client, state), daemon=True).start()

    def _upstream(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        tail = b""
        try:
            while data := src.recv(65536):
                if state["frozen"]:
                    continue
                window = tail + data  # the tail is shorter than the marker: no match is counted twice
                uploads, tail = window.count(self.marker), window[-(len(self.marker) - 1):]
                with self.lock:
                    for _ in range(uploads):
                        self.puts += 1
                        if self.admit is not None and self.puts > self.admit:
                            state["frozen"] = True
                if state["frozen"]:
                    self.frozen.set()
                    continue
                state["pending"] += uploads
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _downstream(self, src: socket.socket, dst: socket.socket, state: dict) -> None:
        try:
            while data := src.recv(65536):
                if state["pending"] and not data.startswith(b"HTTP/1.1 100"):
                    state["pending"] -= 1
                    with self.lock:
                        self.answered += 1
                    self.answered_event.set()
                dst.sendall(data)
        except OSError:
            pass


@pytest.fixture
def relay(moto_server):
    link = Relay(int(moto_server.rsplit(":", 1)[1]), f"PUT /{BUCKET}/{PREFIX}/files/".encode())
    try:
        yield link
    finally:
        link.down()


# -- end to end -------------------------------------------------------------------------------------
_GITIGNORE = "/.snakemake/\n/results/**\n!/results/**/\n!/results/**/*.dvc\n"
PRETRAIN_DIR = "results/embedded/vit_tiny/pretrain"
OUTPUTS = [f"{PRETRAIN_DIR}/{name}"
           for name in ("heads.pth", "metrics.json", "teacher_backbone.pth", "train_log.csv")]
BACKBONE = f"{PRETRAIN_DIR}/teacher_backbone.pth"


def _run(cmd, cwd, env, ok=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, text=True, capture_output=True, timeout=240)
    if ok:
        assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _planned(cwd, env) -> set[str]:
    return planned_rules(_run([BIN / "snakemake", "-n", "--quiet", "rules"], cwd, env).stdout)


def _bucket(moto_url: str) -> dict[str, dict]:
    import boto3

    client = boto3.client("s3", endpoint_url=moto_url, region_name="us-east-1", aws_access_key_id=KEY_ID,
                          aws_secret_access_key=SECRET)
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=PREFIX + "/")
    return {obj["Key"]: obj for page in pages for obj in page.get("Contents", [])}


def _expected_objects(repo: Path) -> dict[str, tuple[str, int]]:
    """``{bucket key: (md5, size)}`` from the committed ``.dvc`` files (DVC 3 layout files/md5/xx/yyyy)."""
    expected = {}
    for out in OUTPUTS:
        (entry,) = yaml.safe_load((repo / f"{out}.dvc").read_text())["outs"]
        md5 = entry["md5"]
        assert md5 == hashlib.md5((repo / out).read_bytes()).hexdigest()
        expected[f"{PREFIX}/files/md5/{md5[:2]}/{md5[2:]}"] = (md5, entry["size"])
    return expected


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_s3_push_interrupted_and_retried_then_fresh_clone_pulls_without_pretraining(tmp_path, moto_server, relay):
    import boto3

    assert (BIN / "dvc").is_file() and (BIN / "snakemake").is_file(), f"dvc/snakemake not installed in {BIN}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1", aws_access_key_id=KEY_ID,
                 aws_secret_access_key=SECRET).create_bucket(Bucket=BUCKET)
    plain = _isolated_env(tmp_path)  # no credentials anywhere
    creds = _isolated_env(tmp_path, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET)
    py = [sys.executable, "-m", "ibot.results"]

    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "Snakefile").write_text(tiny_pretrain_snakefile(2000000))
    (repo / ".gitignore").write_text(_GITIGNORE)
    _run(["git", "init", "-q"], repo, plain)
    _run([BIN / "dvc", "init", "-q"], repo, plain)
    _run([BIN / "snakemake", "-c1", "-q"], repo, plain)
    original = {out: (repo / out).read_bytes() for out in OUTPUTS}
    # the bucket URL is shared (committed); the endpoint of this S3-compatible store is local config
    _run([BIN / "dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/{PREFIX}"], repo, plain)
    _run([BIN / "dvc", "remote", "modify", "--local", "s3", "endpointurl", relay.url], repo, plain)
    remote = f"remote 's3' (s3://{BUCKET}/{PREFIX}, endpoint {relay.url})"

    # 1. no credentials: refused before hashing anything, naming the remote and what to set
    failed = _run(py + ["dvc-track", "--push"], repo, plain, ok=False)
    assert failed.returncode == 1 and f"{remote}: no AWS credentials found" in failed.stderr, failed.stderr
    assert "AWS_ACCESS_KEY_ID" in failed.stderr and not list((repo / PRETRAIN_DIR).glob("*.dvc"))

    # 2. endpoint unreachable (relay down): tracked, but the push fails with a clear error
    failed = _run(py + ["dvc-track", "--push"], repo, creds, ok=False)
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert f"dvc push with {remote} failed; rerunning the same command resumes" in failed.stderr, failed.stderr
    assert "Could not connect to the endpoint URL" in failed.stderr
    assert sorted(p.name for p in (repo / PRETRAIN_DIR).glob("*.dvc")) == [
        "heads.pth.dvc", "metrics.json.dvc", "teacher_backbone.pth.dvc", "train_log.csv.dvc"]
    expected = _expected_objects(repo)
    assert _bucket(moto_server) == {}

    # 3. endpoint back, the push is killed while its second object is in flight
    relay.up()
    relay.admit = 1
    push = subprocess.Popen(py + ["dvc-push"], cwd=repo, env=creds, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        assert relay.frozen.wait(180) and relay.answered_event.wait(60), "the push never reached its 2nd upload"
    finally:
        os.killpg(push.pid, signal.SIGKILL)
        log = push.communicate()[0]
    assert push.returncode == -signal.SIGKILL, log
    relay.release()
    partial = _bucket(moto_server)
    assert len(partial) == 1 and set(partial) < set(expected), (partial, log)

    # 4. the retry uploads only what is missing; then every object is in the bucket, md5 for md5
    relay.admit, relay.puts = None, 0
    retried = _run(py + ["dvc-push"], repo, creds)
    assert relay.puts == len(expected) - 1, (relay.puts, retried.stdout, retried.stderr)
    assert f"[dvc-push] up to date in {remote}" in retried.stdout
    stored = _bucket(moto_server)
    assert set(stored) == set(expected)
    for key, (md5, size) in expected.items():
        assert (stored[key]["ETag"].strip('"'), stored[key]["Size"]) == (md5, size), key
    assert _run(py + ["dvc-push"], repo, creds).returncode == 0 and relay.puts == len(expected) - 1  # idempotent

    # 5. commit the pointers; nothing secret (nor the local endpoint) is tracked by git
    _run(["git", "add", "-A"], repo, plain)
    _run(["git", "commit", "-qm", "pretrained checkpoints on S3"], repo, plain)
    tracked = _run(["git", "ls-files"], repo, plain).stdout.split()
    assert {f"{out}.dvc" for out in OUTPUTS} <= set(tracked) and not set(OUTPUTS) & set(tracked)
    assert ".dvc/config" in tracked and ".dvc/config.local" not in tracked
    history = _run(["git", "log", "-p", "--all"], repo, plain).stdout
    for secret in (KEY_ID, SECRET, relay.url, moto_server):
        assert secret not in history, f"{secret!r} reached git"
    committed = (repo / ".dvc" / "config").read_text()
    assert f"s3://{BUCKET}/{PREFIX}" in committed and not re.search(r"key|secret|token|endpoint", committed)
    assert KEY_ID not in (repo / ".dvc" / "config.local").read_text()

    # 6. fresh clone (no cache, no outputs, no .snakemake): pull straight from moto, no pretraining rerun
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", repo, clone], tmp_path, plain)
    assert not (clone / BACKBONE).exists() and not (clone / ".dvc" / "cache").exists()
    _run([BIN / "dvc", "remote", "modify", "--local", "s3", "endpointurl", moto_server], clone, plain)
    failed = _run(py + ["dvc-pull"], clone, plain, ok=False)
    assert failed.returncode == 1 and "remote 's3'" in failed.stderr and "no AWS credentials" in failed.stderr
    pulled = _run(py + ["dvc-pull"], clone, creds).stdout
    result = json.loads(pulled[pulled.index("{"):])
    assert sorted(result["pulled"]) == sorted(OUTPUTS) and BACKBONE in result["touched"]
    for out, content in original.items():
        assert (clone / out).read_bytes() == content, out
    assert _planned(clone, plain) == {"knn", "all"}  # only the stage after pretraining is planned
    assert _run(["git", "status", "--porcelain"], clone, plain).stdout == ""  # nothing new to commit
    print(f"\nS3 round trip: {len(expected)} objects, {sum(s for _, s in expected.values())} bytes in "
          f"s3://{BUCKET}/{PREFIX}; the killed push left {len(partial)}, the retry uploaded "
          f"{len(expected) - len(partial)}; fresh clone pulled byte-identical, planned: knn, all")
