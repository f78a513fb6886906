"""Shared pytest fixtures."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def slurm_cluster():
    """A single-node SLURM cluster for the session (see tests/slurm_cluster.py); SLURM_CONF exported.

    Skips when SLURM/munge cannot run here (binaries missing, not root), except under CI (``CI`` set),
    where that is a failure.
    """
    from slurm_cluster import SlurmUnavailable, start_cluster

    try:
        cluster = start_cluster()
    except SlurmUnavailable as error:
        message = f"single-node SLURM cluster unavailable: {error}"
        if os.environ.get("CI"):
            pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)")
        pytest.skip(message)
    saved = {k: v for k, v in os.environ.items() if k.startswith("SLURM_")}
    for name in saved:
        del os.environ[name]
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        os.environ.pop("SLURM_CONF", None)
        os.environ.update(saved)
        cluster.stop(keep_files=bool(os.environ.get("IBOT_SLURM_KEEP")))  # keep logs for debugging


@pytest.fixture
def one_thread():
    """In-process training tests: one intra-op thread (fast and deterministic on a loaded 2-core box)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
