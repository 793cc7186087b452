"""slurm_templates/prolog.sh and epilog.sh repair what a killed job left capped."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fakes.gpu_rig import Rig, isolate
from orchestrator import cli
from test_caps_behaviour import hold_cap
from workers.gpu.ledger import read_records

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "slurm_templates"


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Rig:
    return Rig("simulated", tmp_path, isolate(monkeypatch, tmp_path))


def run_script(name: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(TEMPLATES / name)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SLURM_JOB_ID": "42"} if env is None else env)


def killed_holder(rig: Rig) -> None:
    """A cap session killed with SIGKILL: its GPU stays capped, its save file stays."""
    proc = hold_cap(rig)
    proc.kill()
    proc.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["epilog.sh", "prolog.sh"])
def test_script_repairs_a_killed_jobs_cap(rig, script):
    killed_holder(rig)
    assert rig.sim().get_power_limit_w(0) == 150
    assert cli.main(["audit", "--ledger", str(rig.cell_ledger)]) == 1  # left capped until the repair
    done = run_script(script)
    assert done.returncode == 0, done.stderr
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert "GPU 0: repaired" in done.stderr and "job 42" in done.stderr
    assert read_records(rig.site_ledger)[-1]["action"] == "repair"
    assert read_records(rig.cell_ledger)[-1]["action"] == "repair"
    assert cli.main(["audit", "--ledger", str(rig.cell_ledger)]) == 0


@pytest.mark.slow
def test_bare_environment_reads_the_settings_next_to_slurm_conf(rig):
    # slurmd runs the scripts with SLURM_CONF and the job's variables only: no PATH,
    # none of slurmd's own environment. The settings come from wattsweep.env.
    killed_holder(rig)
    etc = rig.tmp / "etc"
    etc.mkdir()
    (etc / "wattsweep.env").write_text(
        f"# site settings\nWATTSWEEP={sys.executable} -m orchestrator.cli\nPYTHONPATH={REPO}\n"
        f"WATTSWEEP_STATE_DIR={rig.state}\nWATTSWEEP_SITE_LEDGER={rig.site_ledger}\nLD_PRELOAD=/nonexistent.so\n")
    bare = {"SLURM_CONF": str(etc / "slurm.conf"), "SLURM_JOB_ID": "42"}
    # The environment wins over the file: another state folder holds nothing to repair.
    done = run_script("epilog.sh", {**bare, "WATTSWEEP_STATE_DIR": str(rig.tmp / "elsewhere")})
    assert done.returncode == 0 and "nothing to restore" in done.stderr, done.stderr
    assert len(rig.save_files()) == 1
    done = run_script("epilog.sh", bare)  # keys the scripts do not know (LD_PRELOAD) are ignored
    assert done.returncode == 0 and "GPU 0: repaired" in done.stderr, done.stderr
    assert "preloaded" not in done.stderr
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []


@pytest.mark.slow
def test_epilog_fails_when_a_gpu_cannot_be_restored(rig):
    killed_holder(rig)
    rig.sim().set_fault("lost")  # the card stopped answering: the node must drain
    done = run_script("epilog.sh")
    assert done.returncode == 1 and "failed" in done.stderr
    assert len(rig.save_files()) == 1  # kept for the next try
    rig.sim().set_fault(None)
    assert run_script("epilog.sh").returncode == 0 and rig.sim().get_power_limit_w(0) == 300


def test_nothing_to_do_is_quiet_and_succeeds(rig):
    done = run_script("prolog.sh")
    assert done.returncode == 0 and done.stderr == ""
