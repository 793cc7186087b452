"""slurm_templates/prolog.sh and epilog.sh repair what a killed job left capped."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from fakes.gpu_rig import Rig, isolate
from test_caps_behaviour import hold_cap
from workers.gpu.ledger import read_records

TEMPLATES = Path(__file__).resolve().parents[1] / "slurm_templates"


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Rig:
    return Rig("simulated", tmp_path, isolate(monkeypatch, tmp_path))


def run_script(name: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TEMPLATES / name)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_JOB_ID": "42"})


@pytest.mark.slow
@pytest.mark.parametrize("script", ["epilog.sh", "prolog.sh"])
def test_script_repairs_a_killed_jobs_cap(rig, script):
    proc = hold_cap(rig)
    proc.kill()
    proc.wait(timeout=30)
    assert rig.sim().get_power_limit_w(0) == 150
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert "GPU 0: repaired" in done.stderr and "job 42" in done.stderr
    assert read_records(rig.site_ledger)[-1]["action"] == "repair"


@pytest.mark.slow
def test_epilog_fails_when_a_gpu_cannot_be_restored(rig):
    proc = hold_cap(rig)
    proc.kill()
    proc.wait(timeout=30)
    rig.sim().set_fault("lost")  # the card stopped answering: the node must drain
    done = run_script("epilog.sh")
    assert done.returncode == 1 and "failed" in done.stderr
    assert len(rig.save_files()) == 1  # kept for the next try
    rig.sim().set_fault(None)
    assert run_script("epilog.sh").returncode == 0 and rig.sim().get_power_limit_w(0) == 300


def test_nothing_to_do_is_quiet_and_succeeds(rig):
    done = run_script("prolog.sh")
    assert done.returncode == 0 and done.stderr == ""
