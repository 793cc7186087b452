"""GPU leases of the local launcher: one holder per GPU across runners, sweeps
and users of a machine; a lease ends with its holder, without any clean-up."""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import stat
import subprocess
import sys
import time

import pytest

from orchestrator.submit.gpu_leases import GpuLeases, LeaseError, held


@pytest.fixture()
def leases(tmp_path):
    return GpuLeases(tmp_path / "leases")


def test_each_claim_gets_gpus_no_one_holds_until_released(leases):
    assert leases.claim([0, 1, 2], 2, sweep="/s/a", cell_id="a1") == [0, 1]
    assert leases.claim([0, 1, 2], 2, sweep="/s/b", cell_id="b1") is None  # only GPU 2 is free
    assert leases.claim([0, 1, 2], 1, sweep="/s/b", cell_id="b1") == [2]
    leases.release([0, 1])
    assert leases.claim([0, 1, 2], 2, sweep="/s/b", cell_id="b2") == [0, 1]
    holders = leases.holders([0, 1, 2])
    assert {g: r["cell_id"] for g, r in holders.items()} == {0: "b2", 1: "b2", 2: "b1"}
    assert holders[0]["runner_pid"] == os.getpid() and holders[0]["user"]


def test_a_lease_of_a_runner_that_died_is_free(leases):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    leases.folder.mkdir(parents=True)
    (leases.folder / "gpu-0.json").write_text(json.dumps({"runner_pid": int(dead.stdout), "controller_pid": None}))
    assert leases.claim([0], 1, sweep="/s", cell_id="c") == [0]


def test_a_started_cell_holds_its_gpus_while_its_controller_runs_even_if_the_runner_died(leases):
    """kill -9 of a runner leaves its cells running: their GPUs stay leased."""
    controller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "submitit"])
    _until_exec_done(controller.pid)
    try:
        assert leases.claim([0, 1], 1, sweep="/s/a", cell_id="a1") == [0]
        leases.bind([0], controller.pid)
        record = json.loads((leases.folder / "gpu-0.json").read_text())
        record["runner_pid"] = 999_999_999  # the runner is gone
        (leases.folder / "gpu-0.json").write_text(json.dumps(record))
        assert held(record)
        assert leases.claim([0, 1], 2, sweep="/s/b", cell_id="b1") is None
    finally:
        controller.kill()
        controller.wait()
    assert leases.claim([0, 1], 2, sweep="/s/b", cell_id="b1") == [0, 1]  # the cell ended: free


def _until_exec_done(pid: int) -> None:
    """Popen returns when exec closes the child's copy of its error pipe, before
    the new program's command line shows in /proc: wait for it."""
    deadline = time.monotonic() + 10
    while b"time.sleep" not in open(f"/proc/{pid}/cmdline", "rb").read() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_a_lease_of_a_live_runner_is_held_while_its_controller_starts():
    """Read just after the runner bound it, the controller's cmdline may still be the
    runner's (inside exec): the lease must not read free then."""
    assert held({"runner_pid": os.getpid(), "controller_pid": os.getpid()})  # this process is no controller


def test_a_runner_pid_taken_since_by_another_process_does_not_hold():
    """A runner killed with kill -9 before its cell started: its pid, reused by any
    process, kept the lease for as long as that process ran."""
    from orchestrator.submit.gpu_leases import start_ticks

    me = start_ticks(os.getpid())
    assert held({"runner_pid": os.getpid(), "runner_start": me, "controller_pid": None})
    assert not held({"runner_pid": os.getpid(), "runner_start": me - 1, "controller_pid": None})
    assert held({"runner_pid": os.getpid(), "controller_pid": None})  # a lease of an earlier version


def test_a_reused_pid_that_is_not_a_submitit_controller_does_not_hold(leases):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    _until_exec_done(other.pid)
    try:
        assert not held({"runner_pid": None, "controller_pid": other.pid})
        assert held({"runner_pid": other.pid, "controller_pid": None})
    finally:
        other.kill()
        other.wait()


def test_release_frees_only_this_runners_leases(leases):
    leases.folder.mkdir(parents=True)
    mine = leases.claim([0], 1, sweep="/s", cell_id="c")
    theirs = {"runner_pid": os.getppid(), "controller_pid": None, "cell_id": "x"}  # alive, not us
    (leases.folder / "gpu-1.json").write_text(json.dumps(theirs))
    leases.release([0, 1])
    assert mine == [0] and leases.holders([0, 1]) == {1: theirs}


def test_a_torn_lease_file_reads_free(leases):
    leases.folder.mkdir(parents=True)
    (leases.folder / "gpu-0.json").write_text('{"runner_pid": 1')
    assert leases.claim([0], 1, sweep="/s", cell_id="c") == [0]


def test_the_folder_and_files_are_shared_by_every_local_user(leases):
    old = os.umask(0o077)
    try:
        leases.claim([0], 1, sweep="/s", cell_id="c")
    finally:
        os.umask(old)
    assert stat.S_IMODE(leases.folder.stat().st_mode) == 0o1777
    for name in (".lock", "gpu-0.json"):
        assert stat.S_IMODE((leases.folder / name).stat().st_mode) == 0o666


def _claim_and_hold(folder, out, done):
    got = GpuLeases(folder).claim([0, 1, 2, 3], 1, sweep=f"/s/{os.getpid()}", cell_id="c")
    out.put(got)
    done.wait(60)  # hold (stay alive) until every process has claimed


def test_runners_claiming_at_once_get_different_gpus(tmp_path):
    ctx = mp.get_context("spawn")
    out, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_claim_and_hold, args=(tmp_path / "leases", out, done)) for _ in range(5)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    done.set()
    for p in procs:
        p.join(timeout=60)
    claimed = [g[0] for g in got if g is not None]
    assert sorted(claimed) == [0, 1, 2, 3] and got.count(None) == 1


def test_a_lease_file_of_bytes_that_are_not_text_reads_free(leases):
    leases.folder.mkdir(parents=True)
    (leases.folder / "gpu-0.json").write_bytes(b"\xff\xfe\x00garbage")
    assert leases.claim([0], 1, sweep="/s", cell_id="c") == [0]


def test_a_link_planted_in_the_shared_folder_is_never_followed(leases, tmp_path):
    """Another user who made the folder could plant gpu-0.json -> ~victim/.bashrc:
    the victim's runner truncated that file and opened it to everyone."""
    leases.folder.mkdir(parents=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    victim.chmod(0o600)
    (leases.folder / "gpu-0.json").symlink_to(victim)
    with pytest.raises(LeaseError, match="gpu-0.json .a symbolic link.; remove it"):
        leases.claim([0], 1, sweep="/s", cell_id="c")
    os.link(victim, leases.folder / "gpu-1.json")  # a second name of the same file
    with pytest.raises(LeaseError, match="gpu-1.json is not a plain file of its own"):
        leases.claim([1], 1, sweep="/s", cell_id="c")
    assert victim.read_text() == "keep me" and stat.S_IMODE(victim.stat().st_mode) == 0o600


def test_a_pipe_or_a_folder_in_place_of_a_lease_file_is_refused_without_blocking(leases):
    leases.folder.mkdir(parents=True)
    os.mkfifo(leases.folder / "gpu-0.json")
    (leases.folder / "gpu-1.json").mkdir()
    for g in (0, 1):
        with pytest.raises(LeaseError, match=f"gpu-{g}.json"):
            leases.claim([g], 1, sweep="/s", cell_id="c")


def test_a_lease_folder_that_is_a_link_or_a_file_is_refused(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(LeaseError, match="is not a folder"):
        GpuLeases(tmp_path / "link").claim([0], 1, sweep="/s", cell_id="c")
    (tmp_path / "file").write_text("")
    with pytest.raises(LeaseError, match="cannot make the GPU lease folder"):
        GpuLeases(tmp_path / "file" / "leases").claim([0], 1, sweep="/s", cell_id="c")


def test_the_local_launcher_keeps_to_the_gpus_an_allocation_shows(monkeypatch):
    """Inside `salloc` with CUDA_VISIBLE_DEVICES=2,3 the launcher handed out GPU 0."""
    from orchestrator.submit import local

    monkeypatch.delenv("WATTSWEEP_LOCAL_GPUS", raising=False)
    uuids = [f"GPU-{i}{i}{i}{i}aaaa-0000-0000-0000-00000000000{i}" for i in range(8)]
    monkeypatch.setattr(local, "_gpu_uuids", lambda: uuids)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2")
    assert local.local_gpus() == [2, 3]
    monkeypatch.setenv("WATTSWEEP_LOCAL_GPUS", "5")  # said explicitly: that wins
    assert local.local_gpus() == [5]
    monkeypatch.delenv("WATTSWEEP_LOCAL_GPUS")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", f"{uuids[6]},GPU-1111")  # by UUID, and by a unique prefix
    assert local.local_gpus() == [1, 6]
    for bad, why in (("MIG-5e3a-1", "a MIG instance"), ("GPU-9", "no GPU here"), ("GPU-", "several GPUs")):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", bad)  # every GPU would be wrong: refused by name
        with pytest.raises(ValueError, match=f"names '{bad}', {why}: .*WATTSWEEP_LOCAL_GPUS"):
            local.local_gpus()
    monkeypatch.setattr(local, "_gpu_uuids", lambda: [])  # a CPU machine (the variable set or not):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the simulated node's cards, leased like real ones
    assert local.local_gpus() == list(range(local.SIMULATED_GPUS)) == list(range(8))
    assert local._gpu_count_text(local.local_gpus()) == "8 simulated (no NVIDIA GPU here)"


def test_lease_files_are_named_by_the_cards_uuid_where_known(tmp_path):
    """Two allocations on one node (device cgroups) each see their card as GPU 0:
    by index they took turns; by UUID each leases its own card, and one card seen
    under two indices is still one lease."""
    folder = tmp_path / "leases"
    a = GpuLeases(folder, uuids={0: "GPU-aaaa-1111"})
    b = GpuLeases(folder, uuids={0: "GPU-bbbb-2222"})
    assert a.claim([0], 1, sweep="/s/a", cell_id="ca") == [0]
    assert b.claim([0], 1, sweep="/s/b", cell_id="cb") == [0]  # another card: not held
    same_card = GpuLeases(folder, uuids={3: "GPU-aaaa-1111"})
    assert same_card.claim([3], 1, sweep="/s/c", cell_id="cc") is None  # a's card, by another index
    assert sorted(p.name for p in folder.glob("gpu-*.json")) == ["gpu-GPU-aaaa-1111.json", "gpu-GPU-bbbb-2222.json"]
    # no UUID (no NVML, a simulated node), or one that cannot name a file: the index
    odd = GpuLeases(folder, uuids={1: "GPU-../../etc"})
    assert odd.claim([1], 1, sweep="/s/d", cell_id="cd") == [1]
    assert (folder / "gpu-1.json").exists()


def test_a_worker_makes_cuda_number_the_gpus_as_nvml_does(tmp_path, monkeypatch):
    """NVML (caps, telemetry, leases) numbers cards along the PCI bus, CUDA the fastest
    first by default: run_cell sets the order before anything starts CUDA."""
    import os

    from types import SimpleNamespace

    from workers import dist
    from workers.entry import run_cell

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    seen = {}

    def init_distributed(*a, **k):
        seen["order"] = os.environ.get("CUDA_DEVICE_ORDER")
        raise RuntimeError("stop before the model")

    monkeypatch.setattr(dist, "init_distributed", init_distributed)
    task = SimpleNamespace(sweep_dir=str(tmp_path), cell_id="c1", attempt=0, params=SimpleNamespace(shards=1))
    with pytest.raises(RuntimeError, match="stop before the model"):
        run_cell(task)
    assert seen["order"] == "PCI_BUS_ID"


@pytest.fixture()
def runners():
    """Live processes standing in for runners (leases name a runner by pid and start time)."""
    procs = [subprocess.Popen(["sleep", "120"]) for _ in range(3)]
    yield procs
    for p in procs:
        p.kill()
        p.wait()


def test_a_wide_cell_keeps_its_place_in_line_against_narrow_cells(tmp_path, runners):
    """A runner of one-GPU cells used to take each GPU as it freed: the two-GPU cell of
    another sweep waited for ever. The oldest waiting cell now gets the GPUs it needs first."""
    folder = tmp_path / "leases"
    wide, narrow = (GpuLeases(folder, pid=p.pid) for p in runners[:2])
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n1") == [0]
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w1") is None  # one free: waits, first in line
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") is None  # GPU 1 is free, but w1 needs it
    assert narrow.queued_ahead["cell_id"] == "w1" and narrow.queued_ahead["n"] == 2
    narrow.release([0])
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") is None  # both free: still w1's turn
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w1") == [0, 1]
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") is None  # held
    wide.release([0, 1])
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") == [0]  # w1 left the line when it started


def test_a_waiting_cell_does_not_hold_back_gpus_it_cannot_use(tmp_path, runners):
    folder = tmp_path / "leases"
    wide, narrow = (GpuLeases(folder, pid=p.pid) for p in runners[:2])
    assert narrow.claim([0], 1, sweep="/s/n", cell_id="n1") == [0]
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w1") is None
    assert narrow.claim([1, 2], 1, sweep="/s/n", cell_id="n2") == [2]  # GPU 1 is w1's, 2 is not
    assert narrow.claim([1, 3, 4], 2, sweep="/s/n", cell_id="n3") == [3, 4]
    assert narrow.claim([1], 1, sweep="/s/n", cell_id="n4") is None


def test_a_place_in_line_ends_with_its_runner_its_cell_or_a_withdrawal(tmp_path, runners):
    folder = tmp_path / "leases"
    wide, narrow = (GpuLeases(folder, pid=p.pid) for p in runners[:2])
    hold = GpuLeases(folder)  # this process holds GPU 0 throughout
    assert hold.claim([0], 1, sweep="/s/h", cell_id="h") == [0]
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w1") is None
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n1") is None
    wide.withdraw()  # its waiting cell was cancelled
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n1") == [1]
    narrow.release([1])
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w2") is None  # back in line, last
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") is None  # n1's place went with n1: w2 is first
    assert wide.claim([0, 1], 1, sweep="/s/w", cell_id="w3") is None  # moving on loses w2's place: n2 is first
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") == [1]
    narrow.release([1])
    assert wide.claim([0, 1], 2, sweep="/s/w", cell_id="w4") is None
    runners[0].kill()
    runners[0].wait()  # the waiting cell's runner ended: its place with it
    assert narrow.claim([0, 1], 1, sweep="/s/n", cell_id="n2") == [1]
    narrow.release([1])
    # a place kept under a pid that another process now has (same pid, another start) is void
    queue = json.loads((folder / "waiting.json").read_text() or "[]")
    queue.append({"runner_pid": runners[1].pid, "runner_start": 1, "cell_id": "old", "n": 2, "gpus": ["0", "1"],
                  "since_unix_s": 0.0})
    (folder / "waiting.json").write_text(json.dumps(queue))
    assert GpuLeases(folder).claim([0, 1], 1, sweep="/s/x", cell_id="x") == [1]


def test_every_cell_in_line_keeps_its_place_not_only_the_first(tmp_path, runners):
    """A cell second in line, waiting for GPUs the first does not use, was starved by a
    stream of one-GPU cells as the first used to be."""
    folder = tmp_path / "leases"
    a, b, c = (GpuLeases(folder, pid=p.pid) for p in runners)
    hold = GpuLeases(folder)
    assert hold.claim([1], 1, sweep="/s/h", cell_id="long") == [1]
    assert a.claim([0, 1], 2, sweep="/s/a", cell_id="a1") is None  # first in line, for 0 and 1
    assert c.claim([2], 1, sweep="/s/c", cell_id="c0") == [2]
    assert b.claim([2, 3], 2, sweep="/s/b", cell_id="b1") is None  # second in line, for 2 and 3
    c.release([2])
    assert c.claim([0, 1, 2, 3], 1, sweep="/s/c", cell_id="c1") is None  # 0 is a1's, 2 and 3 are b1's
    assert c.queued_ahead["cell_id"] == "b1"
    assert b.claim([2, 3], 2, sweep="/s/b", cell_id="b1") == [2, 3]


def test_a_waiting_cell_keeps_nothing_back_while_its_own_runner_runs_a_cell_on_its_gpus(tmp_path, runners):
    """A runner's next cell waiting for GPU 0, which its own long cell holds, kept GPU 1
    idle for the whole of that cell."""
    folder = tmp_path / "leases"
    a, b = (GpuLeases(folder, pid=p.pid) for p in runners[:2])
    assert a.claim([0, 1], 1, sweep="/s/a", cell_id="a-long") == [0]
    assert a.claim([0, 1], 2, sweep="/s/a", cell_id="a2") is None
    assert b.claim([0, 1], 1, sweep="/s/b", cell_id="b1") == [1]
    a.release([0])  # its own cell ended: from now on its place keeps GPUs back
    b.release([1])
    assert b.claim([0, 1], 1, sweep="/s/b", cell_id="b2") is None
    assert a.claim([0, 1], 2, sweep="/s/a", cell_id="a2") == [0, 1]


def test_a_lease_under_the_gpus_index_still_holds_the_card(tmp_path):
    """A runner with no UUID for a card (or of an earlier version) leases it by index:
    a runner that knows the UUID must not take the card beside it."""
    folder = tmp_path / "leases"
    assert GpuLeases(folder).claim([0], 1, sweep="/s/old", cell_id="o") == [0]  # gpu-0.json
    assert GpuLeases(folder, uuids={0: "GPU-aaaa-1111"}).claim([0], 1, sweep="/s/new", cell_id="n") is None


def test_an_odd_entry_in_the_line_is_passed_over_not_fatal(tmp_path, runners):
    folder = tmp_path / "leases"
    folder.mkdir()
    pid = runners[0].pid
    from orchestrator.submit.gpu_leases import start_ticks

    good = {"runner_pid": pid, "runner_start": start_ticks(pid), "cell_id": "w", "n": 1, "since_unix_s": 1.0}
    for odd in ({**good, "gpus": 2}, {**good, "gpus": ["../../etc/x"]}, {**good, "gpus": ["0"], "n": "1"}, [1], "x"):
        (folder / "waiting.json").write_text(json.dumps([odd]))
        assert GpuLeases(folder).claim([0], 1, sweep="/s", cell_id=f"c{len(str(odd))}") == [0]
        GpuLeases(folder).release([0])
    (folder / "waiting.json").write_bytes(b"[" * 100000)  # not JSON a parser can take
    assert GpuLeases(folder).claim([0], 1, sweep="/s", cell_id="deep") == [0]
    assert not (tmp_path / "etc").exists()


def test_a_link_in_place_of_the_line_is_refused_at_submission(tmp_path):
    folder = tmp_path / "leases"
    folder.mkdir()
    (folder / "waiting.json").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(LeaseError, match="waiting.json"):
        GpuLeases(folder).check([0])


def test_odd_lease_files_read_free_never_an_error(tmp_path):
    """Lease files are writable by every local user: whatever they hold, a claim
    answers (an exception here failed every pending cell of the runner)."""
    folder = tmp_path / "leases"
    folder.mkdir()
    for odd in (b"[" * 100000, b'{"runner_pid": Infinity}', b'{"controller_pid": -Infinity}',
                b'{"runner_pid": true}', b'{"runner_pid": 1.5}', b"\xff\xfe"):
        (folder / "gpu-0.json").write_bytes(odd)
        assert GpuLeases(folder).claim([0], 1, sweep="/s", cell_id="c") == [0], odd
        GpuLeases(folder).release([0])
    assert not held({"runner_pid": True}) and not held({"runner_pid": 1.0}) and not held({"controller_pid": "1e3"})
