"""Shared fixtures. ``slurm_cluster``: the development Slurm cluster
(slurm_templates/devcluster), used when running, else brought up for the session
and taken down at its end; tests that need it are marked ``slurm``."""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEVCLUSTER = ROOT / "slurm_templates" / "devcluster" / "devcluster"
# The real data files beside the checkout (../shared/data), read in place; tests that need them skip without.
SHARED_DATA = ROOT.parent / "shared" / "data"
STATE_DIR = Path(os.environ.get("WATTSWEEP_DEVCLUSTER_DIR", "/tmp/wattsweep-devcluster"))


@dataclass(frozen=True)
class SlurmCluster:
    state_dir: Path
    slurm_conf: Path
    started_here: bool


def _devcluster(cmd: str, timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(DEVCLUSTER), cmd], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    if os.geteuid() != 0:
        pytest.skip("the development Slurm cluster needs root (munge, slurmd, /etc/hosts)")
    started = False
    if _devcluster("status", 30).returncode != 0:
        try:
            proc = _devcluster("up", 600)  # installs Debian's packages when missing
        except subprocess.TimeoutExpired:
            pytest.skip("the development Slurm cluster did not come up within 600 s")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            pytest.skip(f"the development Slurm cluster did not start: {' | '.join(tail)}")
        started = True
    conf = STATE_DIR / "etc" / "slurm.conf"
    os.environ["SLURM_CONF"] = str(conf)
    yield SlurmCluster(STATE_DIR, conf, started)
    if started:
        _devcluster("down", 120)
