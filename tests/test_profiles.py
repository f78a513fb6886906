"""Snakemake finds the project's profiles by itself: README command 1 is a bare ``snakemake``.

Snakemake 9 (snakemake/cli.py ``parse_args``) searches ``profiles/default`` relative to the working
directory and to the Snakefile when ``--workflow-profile`` is not given, and ``profiles/<NAME>`` for
``--workflow-profile NAME``. These tests go through that lookup, not around it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _parsed(*argv: str, cwd: Path = ROOT) -> dict:
    """The options Snakemake's own command-line parser ends up with in ``cwd`` (profiles applied)."""
    code = ("import json, sys; from snakemake.cli import parse_args; _, a = parse_args(sys.argv[1:]); "
            "print(json.dumps({'workflow_profile': str(a.workflow_profile), 'executor': a.executor, "
            "'rerun_incomplete': a.rerun_incomplete, 'printshellcmds': a.printshellcmds, 'jobs': a.jobs}))")
    result = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, capture_output=True, text=True, check=True)
    return {"stderr": result.stderr, **json.loads(result.stdout.strip().splitlines()[-1])}


def test_bare_snakemake_uses_profiles_default():
    parsed = _parsed("-n")
    assert "workflow specific profile profiles/default" in parsed["stderr"], parsed["stderr"]
    assert parsed["rerun_incomplete"] is True and parsed["printshellcmds"] is True
    assert parsed["executor"] in (None, "local")


def test_profile_is_found_from_another_directory_through_the_snakefile(tmp_path):
    parsed = _parsed("-n", "-s", str(ROOT / "Snakefile"), cwd=tmp_path)
    assert re.search(r"workflow specific profile \S*profiles/default", parsed["stderr"]), parsed["stderr"]
    assert parsed["rerun_incomplete"] is True


def test_workflow_profile_slurm_by_name():
    parsed = _parsed("-n", "--workflow-profile", "slurm")
    assert "profiles/slurm" in parsed["stderr"] and parsed["executor"] == "slurm"
    assert parsed["jobs"] == yaml.safe_load((ROOT / "profiles" / "slurm" / "config.yaml").read_text())["jobs"]


def test_dry_run_in_the_repo_root_plans_the_embedded_job():
    """What README command 1 runs, as a dry run: no flags, the profile announced, the embedded DAG planned."""
    result = subprocess.run([sys.executable, "-m", "snakemake", "-n", "--quiet", "rules"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "workflow specific profile profiles/default" in result.stderr
    assert re.search(r"^pretrain\s+1$", result.stdout, flags=re.M), result.stdout[-2000:]


def test_readme_command_1_has_no_flags():
    readme = (ROOT / "README.md").read_text()
    assert "bash setup.sh && .venv/bin/snakemake\n" in readme
    assert "workflow/profiles" not in readme and not (ROOT / "workflow" / "profiles").exists()
