"""Power caps on the development Slurm cluster, through `wattsweep sweep launcher=slurm`.

The cells run the tiny model on simulated GPUs whose state lives in the
cluster's state folder (`devcluster env` → WATTSWEEP_STATE_DIR), the folder
the cluster's prolog and epilog repair from. Each card starts at a
non-default limit (250 W; the V100 default is 300 W), so a restore to the
default or the maximum instead of the previous value shows.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from conftest import DEVCLUSTER
from fakes.gpu_rig import isolate
from orchestrator import cli
from orchestrator.contracts import SweepPaths, read_json
from orchestrator.plan.planned import read_plan
from orchestrator.status.state import sweep_status
from orchestrator.submit import slurm as slurm_launcher
from orchestrator.submit.base import read_submissions
from workers.gpu.ledger import read_records
from workers.gpu.simulated import SimulatedBackend

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

NODES = ("n1", "n2")
PREVIOUS_W = 250.0  # not the card's default: "previous, not default" is checked
CAP_W = 150.0
TINY = ["model=llama-tiny", "gpu=simulated", "n_prompts=4", "max_new_tokens=4", "max_prompt_tokens=16",
        "dtype=float32", "launcher=slurm", "launcher.gpus_per_node=1", "launcher.cpus_per_gpu=1",
        "launcher.time_min=5"]
# A cell that stays in its measured window until cancelled (seconds per batch).
LONG = "sleep_s=30"


def cluster_state_dir() -> Path:
    """The state folder the cluster's prolog and epilog use, as `devcluster env` exports it."""
    out = subprocess.run([str(DEVCLUSTER), "env"], capture_output=True, text=True, check=True, timeout=30).stdout
    for line in out.splitlines():
        if line.startswith("export WATTSWEEP_STATE_DIR="):
            return Path(line.split("=", 1)[1])
    pytest.fail(f"`devcluster env` exports no WATTSWEEP_STATE_DIR: {out!r}")


class Cards:
    """The cluster's simulated GPU 0 on each node."""

    def __init__(self, state: Path):
        self.state = state
        self.sweeps: list[SweepPaths] = []  # cancelled at teardown: a failed test must not hold a node

    def sim(self, node: str) -> SimulatedBackend:
        return SimulatedBackend(state_dir=self.state, node=node)

    def limits(self) -> dict[str, float]:
        return {n: self.sim(n).get_power_limit_w(0) for n in NODES}

    def save_files(self) -> list[Path]:
        return sorted(self.state.glob("nodes/*/caps/gpu-*.json"))


@pytest.fixture
def cards(slurm_cluster, tmp_path, monkeypatch) -> Iterator[Cards]:
    isolate(monkeypatch, tmp_path)  # site ledger and helpers into tmp_path ...
    state = cluster_state_dir()
    monkeypatch.setenv("WATTSWEEP_STATE_DIR", str(state))  # ... but the cluster's state folder
    c = Cards(state)
    for n in NODES:  # what an interrupted earlier run left (the prolog would do the same)
        assert cli.main(["caps", "restore", "--all", "--node", n, "--state-dir", str(state)]) == 0
    assert c.save_files() == [], f"a save file whose job still runs: {c.save_files()}; cancel that job"
    for n in NODES:
        c.sim(n).set_fault(None)
        c.sim(n).set_power_limit_w(0, PREVIOUS_W)
    yield c
    jobs = [r.extra.get("array_job_id") for p in c.sweeps if p.submissions_jsonl.exists() for r in read_submissions(p)]
    if jobs:
        subprocess.run(["scancel", *map(str, filter(None, jobs))], capture_output=True, timeout=30)


def sweep(cards: Cards, root: Path, *overrides: str, status: int = 0) -> SweepPaths:
    argv = ["sweep", "-m", *TINY, f"sweep_dir={root}", f"gpu.state_dir={cards.state}",
            f"gpu.site_ledger={root.parent / 'site.jsonl'}", *overrides]
    cards.sweeps.append(SweepPaths.of(root))
    assert cli.main(argv) == status
    return SweepPaths.of(root)


def only_cell(paths: SweepPaths) -> str:
    (cell,) = read_plan(paths)
    return cell.cell_id


def actions(paths: SweepPaths, cid: str) -> list[tuple]:
    return [(r["node"], r["action"], r["result"]) for r in read_records(paths.caps_ledger(cid))]


def wait_until(pred, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while not (got := pred()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.5)
    return got


def wait_ended(paths: SweepPaths, timeout_s: float = 120):
    """Every cell ended and its job left the queue (so its epilog has run)."""
    st = wait_until(lambda: (s := sweep_status(paths)).all_ended and s, timeout_s, f"the cells of {paths.root}")
    for c in st.cells:
        wait_until(lambda: not squeue(c.job_id), 60, f"job {c.job_id} to leave the queue (epilog)")
    return st


def squeue(job_id: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True, timeout=30).stdout.strip()


def wait_capped(paths: SweepPaths, cid: str) -> str:
    """Wait until the cell's GPU is capped (its `apply` is in the ledger); returns its job id."""
    ledger = paths.caps_ledger(cid)
    wait_until(lambda: ledger.exists() and any(r["action"] == "apply" for r in read_records(ledger)), 90,
               f"cell {cid} to cap its GPU")
    return next(c.job_id for c in sweep_status(paths).cells if c.cell_id == cid)


def audit(paths: SweepPaths) -> int:
    return cli.main(["audit", "--ledger", str(paths.root)])


def test_normal_end_restores_the_previous_limit_on_every_node(cards, tmp_path):
    paths = sweep(cards, tmp_path / "normal", "shards=2", f"power_cap_w={CAP_W:g}")  # one rank per node
    cid = only_cell(paths)
    st = wait_ended(paths)
    assert [c.state for c in st.cells] == ["done"], st.cells
    recs = read_records(paths.caps_ledger(cid))
    got = sorted((r["node"], r["action"], r["result"], r["previous_w"], r["requested_w"], r["enforced_w"]) for r in recs)
    assert got == sorted([(n, "apply", "ok", PREVIOUS_W, CAP_W, CAP_W) for n in NODES]
                         + [(n, "restore", "ok", PREVIOUS_W, CAP_W, PREVIOUS_W) for n in NODES])
    assert len({r["gpu_uuid"] for r in recs}) == 2 and all(r["slurm_job_id"] for r in recs)
    assert cards.limits() == {n: PREVIOUS_W for n in NODES} and cards.save_files() == []
    assert [c["enforced_w"] for c in read_json(paths.done_marker(cid))["caps"]] == [CAP_W]
    assert audit(paths) == 0


def test_scancel_sigterm_is_restored_by_the_worker(cards, tmp_path):
    paths = sweep(cards, tmp_path / "term", f"power_cap_w={CAP_W:g}", LONG)
    cid = only_cell(paths)
    job = wait_capped(paths, cid)
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_ended(paths)
    node = actions(paths, cid)[0][0]
    # `restore` (the worker's SIGTERM handler), not `repair` (the epilog would have found a save file)
    assert actions(paths, cid) == [(node, "apply", "ok"), (node, "restore", "ok")]
    assert cards.limits()[node] == PREVIOUS_W and cards.save_files() == []
    assert audit(paths) == 0


def test_scancel_reaches_a_rank_blocked_in_a_collective(cards, tmp_path, monkeypatch):
    """Rank 1 hangs (ignores SIGTERM); rank 0 blocks in a gloo collective, where
    its SIGTERM handler cannot run. Rank 0's stop watcher restores its card and
    writes FAILED.json inside Slurm's KillWait; rank 1's card is repaired by the epilog."""
    monkeypatch.setenv("WATTSWEEP_STUCK_GRACE_S", "1")  # under the test cluster's KillWait=5
    paths = sweep(cards, tmp_path / "blocked", "shards=2", f"power_cap_w={CAP_W:g}", "fail_on_purpose=hang-rank-1")
    cid = only_cell(paths)
    wait_until(lambda: len([r for r in read_records(paths.caps_ledger(cid)) if r["action"] == "apply"]) == 2
               if paths.caps_ledger(cid).exists() else False, 90, "both ranks to cap their GPUs")
    wait_until(lambda: "hangs on purpose" in "".join(p.read_text(errors="replace")
                                                      for p in paths.root.rglob("*.err")), 60, "rank 1 to hang")
    time.sleep(2.0)  # rank 0 into its collective
    job = next(c.job_id for c in sweep_status(paths).cells)
    subprocess.run(["scancel", job], check=True, timeout=30)
    wait_ended(paths)
    failed = read_json(paths.failed_marker(cid))
    assert failed["rank"] == 0 and failed["stopped_blocked"] is True, failed["error"]
    assert "power caps were restored" in failed["error"]
    by_node = {}
    for node, action, result in actions(paths, cid):
        by_node.setdefault(node, []).append((action, result))
    assert sorted(by_node.values()) == [[("apply", "ok"), ("repair", "ok")], [("apply", "ok"), ("restore", "ok")]]
    assert cards.limits() == {n: PREVIOUS_W for n in NODES} and cards.save_files() == []
    assert audit(paths) == 0


def test_sigkill_is_repaired_by_the_epilog(cards, tmp_path):
    paths = sweep(cards, tmp_path / "kill", f"power_cap_w={CAP_W:g}", LONG)
    cid = only_cell(paths)
    wait_capped(paths, cid)
    node = actions(paths, cid)[0][0]
    assert cards.sim(node).get_power_limit_w(0) == CAP_W
    # The ledger a SIGKILL leaves is this one (an apply, no restore): audit must flag it.
    # The epilog follows the kill at once, so "after the kill, before the epilog" is
    # checked without Slurm in test_caps_epilog.py.
    assert audit(paths) == 1
    # A real SIGKILL of the worker, as the OOM killer sends it (`scancel --signal=KILL`
    # cancels the job, SIGTERM first, and the worker would restore). The cluster's
    # nodes run on this host, so the pid in the save file is the worker's.
    (save,) = cards.save_files()
    os.kill(read_json(save)["pid"], signal.SIGKILL)
    wait_ended(paths)
    recs = read_records(paths.caps_ledger(cid))
    assert [(r["node"], r["action"], r["result"]) for r in recs] == [(node, "apply", "ok"), (node, "repair", "ok")]
    assert recs[1]["enforced_w"] == PREVIOUS_W and recs[1]["slurm_job_id"] == recs[0]["slurm_job_id"]
    assert cards.limits()[node] == PREVIOUS_W and cards.save_files() == []  # nobody ran `caps restore`
    assert audit(paths) == 0


def test_cap_outside_range_or_policy_is_rejected_before_sbatch(cards, tmp_path, monkeypatch, capsys):
    commands = []
    real = slurm_launcher.run_cmd

    def recording(args, **kw):
        commands.append(args[0])
        return real(args, **kw)

    monkeypatch.setattr(slurm_launcher, "run_cmd", recording)
    # Outside the V100's 100-300 W: the cell is planned infeasible, with its reason, and not launched.
    paths = sweep(cards, tmp_path / "range", "power_cap_w=350", status=2)  # nothing to launch
    out, err = capsys.readouterr()
    assert "infeasible: " in out and "outside" in out and "100" in out and "every cell is infeasible" in err
    assert not paths.root.exists()  # nothing launched, nothing left behind
    # Inside the card's range but outside the site policy: the whole sweep stops, nothing written.
    policy = tmp_path / "policy.yaml"
    policy.write_text('rules:\n  - gpu: "*V100*"\n    caps_w: [250, 175]\n')
    root = tmp_path / "policy"
    assert cli.main(["sweep", "-m", *TINY, f"sweep_dir={root}", f"gpu.state_dir={cards.state}",
                     f"gpu.policy={policy}", f"power_cap_w={CAP_W:g}"]) == 2
    assert "breaks the site policy" in capsys.readouterr().err
    assert "sbatch" not in commands and not (root / "plan.jsonl").exists()
    assert not paths.submissions_jsonl.exists() or paths.submissions_jsonl.read_text().strip() == ""
    assert cards.limits() == {n: PREVIOUS_W for n in NODES}


def test_permission_denied_and_mismatch_fail_the_cell_and_leave_the_card_as_it_was(cards, tmp_path):
    # Two one-cell sweeps, one per node at the same time.
    denied = sweep(cards, tmp_path / "denied", f"power_cap_w={CAP_W:g}", "gpu.fail=permission")
    mismatch = sweep(cards, tmp_path / "mismatch", f"power_cap_w={CAP_W:g}", "gpu.fail=mismatch")
    for paths in (denied, mismatch):
        st = wait_ended(paths)
        assert [c.state for c in st.cells] == ["failed"], st.cells

    cid = only_cell(denied)
    error = read_json(denied.failed_marker(cid))["error"]
    assert "no permission" in error and "wattsweep-capctl" in error and "docs/admin.md" in error
    node = actions(denied, cid)[0][0]
    assert actions(denied, cid) == [(node, "apply", "failed"), (node, "restore", "ok")]

    cid = only_cell(mismatch)
    error = read_json(mismatch.failed_marker(cid))["error"]
    assert f"after a request of {CAP_W:g} W" in error and f"previous {PREVIOUS_W:g} W is restored" in error
    recs = read_records(mismatch.caps_ledger(cid))
    assert [(r["action"], r["result"]) for r in recs] == [("apply", "failed"), ("restore", "ok")]
    assert recs[0]["enforced_w"] != CAP_W and recs[1]["enforced_w"] == PREVIOUS_W

    assert cards.limits() == {n: PREVIOUS_W for n in NODES} and cards.save_files() == []
    assert audit(denied) == 0 and audit(mismatch) == 0  # failures are listed; nothing is left capped
