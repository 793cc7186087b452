"""The privileged helper's own checks, `wattsweep caps show`, `wattsweep doctor`."""
from __future__ import annotations

import subprocess

import pytest

from fakes.gpu_rig import Rig, isolate
from orchestrator import cli
from orchestrator.audit import doctor_cmd
from workers.gpu import capctl
from workers.gpu.base import CapPermissionError
from workers.gpu.capctl import CapctlBackend
from workers.gpu.ledger import read_records


@pytest.fixture
def rig(tmp_path, monkeypatch) -> Rig:
    return Rig("capctl", tmp_path, isolate(monkeypatch, tmp_path))


def test_helper_refuses_a_policy_breach_and_records_nothing(rig, capsys):
    policy = rig.tmp / "policy.yaml"
    policy.write_text("rules:\n  - caps_w: [250, 175, 150]\n")
    (rig.tmp / "capctl.yaml").write_text(f"backend: simulated\nstate_dir: {rig.state}\nsite_ledger: {rig.site_ledger}\n"
                                         f"policy: {policy}\n")
    assert capctl.main(["set", "--index", "0", "--watts", "200"]) == 3
    assert "site policy refuses 200 W" in capsys.readouterr().err
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []
    assert capctl.main(["set", "--index", "0", "--watts", "175"]) == 0
    assert capctl.main(["set", "--index", "0", "--watts", "300"]) == 0  # the saved previous: a restore, always allowed
    assert [r["action"] for r in read_records(rig.site_ledger)] == ["apply", "restore"]
    assert rig.sim().get_power_limit_w(0) == 300 and rig.save_files() == []


def test_helper_range_and_show(rig, capsys):
    assert capctl.main(["set", "--index", "1", "--watts", "99"]) == 4
    assert capctl.main(["show", "--index", "1"]) == 0
    assert '"limit_w": 300.0' in capsys.readouterr().out


def test_under_sudo_the_environment_cannot_redirect_the_helper(rig, monkeypatch):
    monkeypatch.setenv("SUDO_UID", "1000")
    assert capctl.load_config().state_dir != str(rig.state)  # /etc/wattsweep/capctl.yaml or defaults only


def test_sudo_refusal_names_the_sudoers_rule(rig, tmp_path):
    fake_sudo = tmp_path / "sudo"
    fake_sudo.write_text("#!/bin/sh\necho 'sudo: a password is required' >&2\nexit 1\n")
    fake_sudo.chmod(0o755)
    b = CapctlBackend(rig.sim(), command=[str(fake_sudo), "-n", "wattsweep-capctl"])
    with pytest.raises(CapPermissionError, match="sudoers rule from docs/admin.md"):
        b.set_power_limit_w(0, 150)


def test_caps_show_lists_save_files(rig, capsys):
    """A cap whose setter has exited is offered a restore; one whose setter still
    runs (here: this process) is not, since that process restores it."""
    import sys

    done = subprocess.run([sys.executable, "-m", "workers.gpu.capctl", "set", "--index", "2", "--watts", "150"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert capctl.main(["set", "--index", "3", "--watts", "150"]) == 0
    assert cli.main(["caps", "show"]) == 0
    out = capsys.readouterr().out
    assert "GPU 2" in out and "now 150 W, previous 300 W" in out and "caps restore --index 2" in out
    assert "GPU 3" in out and "held by that running process" in out and "--index 3" not in out
    assert cli.main(["caps", "restore"]) == 2  # says which: --all or --index
    assert cli.main(["caps", "restore", "--index", "2", "--force"]) == 0
    assert rig.sim().get_power_limit_w(2) == 300


def test_doctor_sudo_check_reads_sudo_l(monkeypatch):
    monkeypatch.setattr(doctor_cmd.shutil, "which", lambda name: f"/usr/bin/{name}")
    ok = doctor_cmd.check_sudo_rule(run=lambda *a, **k: subprocess.CompletedProcess(a, 0, "/usr/local/bin/wattsweep-capctl\n", ""),
                                    as_root=False)
    no = doctor_cmd.check_sudo_rule(run=lambda *a, **k: subprocess.CompletedProcess(a, 1, "", "sudo: a password is required"),
                                    as_root=False)
    assert ok.ok and not no.ok and "sudoers" in no.fix
    root = doctor_cmd.check_sudo_rule(run=lambda *a, **k: pytest.fail("root needs no sudo rule"), as_root=True)
    assert root.ok and "not needed" in root.detail


def test_doctor_verdicts():
    C = doctor_cmd.Check
    yes, no = C("x", True, ""), C("x", False, "", "fix it")
    assert doctor_cmd.verdict(yes, yes, no, False) == (True, "caps can be set here with gpu.backend=nvml (auto picks it)")
    assert "capctl" in doctor_cmd.verdict(no, yes, yes, False)[1]
    ok, text = doctor_cmd.verdict(no, yes, no, False)
    assert not ok and "fix it" in text
    assert "simulated" in doctor_cmd.verdict(yes, no, no, False)[1]


def test_doctor_runs_and_reports_leftover_save_files(rig, capsys):
    assert capctl.main(["set", "--index", "0", "--watts", "150"]) == 0
    rc = cli.main(["doctor"])
    out = capsys.readouterr().out
    assert rc in (0, 1) and "1 save file(s) on this node" in out and "caps restore --all" in out


# A mistyped --state-dir must not read as "nothing capped here"; a missing default folder still does.

def test_caps_refuses_a_state_dir_that_does_not_exist_or_is_a_file(rig, capsys):
    missing, afile = rig.tmp / "nonexistent", rig.tmp / "afile"
    afile.write_text("")
    for argv in (["caps", "show", "--state-dir", str(missing)], ["caps", "show", "--all", "--state-dir", str(missing)],
                 ["caps", "restore", "--all", "--state-dir", str(missing)]):
        assert cli.main(argv) == 2, argv
        out, err = capsys.readouterr()
        assert out == "" and f"state folder {missing} does not exist" in err and len(err.splitlines()) == 1
    assert cli.main(["caps", "restore", "--all", "--state-dir", str(afile)]) == 2
    assert f"state folder {afile} is not a folder" in capsys.readouterr().err


def test_caps_with_a_missing_configured_state_dir_has_nothing_to_restore(rig, capsys, monkeypatch):
    # The epilog's WATTSWEEP_STATE_DIR (or the default) appears with the first cap: missing means none.
    monkeypatch.setenv("WATTSWEEP_STATE_DIR", str(rig.tmp / "never-capped"))
    assert cli.main(["caps", "restore", "--all"]) == 0
    out = capsys.readouterr().out
    assert "nothing to restore" in out and f"{rig.tmp / 'never-capped'} does not exist" in out
    assert cli.main(["caps", "show"]) == 0
    assert "does not exist" in capsys.readouterr().out


def test_doctor_refuses_a_state_dir_that_is_a_file_or_missing(rig, capsys):
    afile = rig.tmp / "afile"
    afile.write_text("")
    assert cli.main(["doctor", "--state-dir", str(afile)]) == 1
    out = capsys.readouterr().out
    assert f"[--] state folder: {afile} is not a folder" in out and f"{afile} (writable)" not in out
    assert f"NO: state folder {afile} is not a folder" in out
    missing = rig.tmp / "nonexistent"
    assert cli.main(["doctor", "--state-dir", str(missing)]) == 1
    assert f"[--] state folder: {missing} does not exist" in capsys.readouterr().out
    assert doctor_cmd.check_folder(missing).ok  # a missing default folder: the first cap creates it


def test_caps_restore_for_another_host_asks_slurm_whether_the_capping_job_still_runs(monkeypatch):
    """From a login node, `caps restore --node n1` saw every process of n1 as
    ended (it can only check its own) and pulled a running cell's cap."""
    import dataclasses

    from orchestrator.audit import caps_cmd
    from workers.gpu.state import make_save

    here = make_save(0, "GPU-1", "card", 300.0, 150.0, backend="simulated", gpu_profile="v100", cell_id="c",
                     slurm={"job_id": "169"})
    there = dataclasses.replace(here, host="another-host")
    answers = {}

    def squeue(args, check=True, **kw):
        rc, out, err = answers["now"]
        return subprocess.CompletedProcess(args, rc, out, err)

    monkeypatch.setattr("orchestrator.submit.shell.run_cmd", squeue)
    assert caps_cmd.owner_running(here)  # this process: checked directly
    answers["now"] = (0, "RUNNING\n", "")
    assert caps_cmd.owner_running(there)
    answers["now"] = (0, "", "")
    assert not caps_cmd.owner_running(there)  # the job left the queue
    answers["now"] = (1, "", "slurm_load_jobs error: Invalid job id specified")
    assert not caps_cmd.owner_running(there)
    answers["now"] = (1, "", "Unable to contact slurm controller")
    assert caps_cmd.owner_running(there)  # no answer: assume it runs
    assert caps_cmd.owner_running(dataclasses.replace(there, job_id=None))  # nothing to ask about


def test_a_restore_on_a_node_without_save_files_names_the_nodes_that_have_some(rig, capsys, monkeypatch):
    import os

    monkeypatch.setenv("SLURMD_NODENAME", "n2")
    assert capctl.main(["set", "--index", "1", "--watts", "150"]) == 0  # a save file on "n2"
    monkeypatch.setenv("SLURMD_NODENAME", "login")
    os.makedirs(rig.state / "nodes" / "login", exist_ok=True)
    assert cli.main(["caps", "restore", "--all"]) == 0
    out = capsys.readouterr().out
    assert "login: no save files" in out and "save files on other nodes: n2" in out
