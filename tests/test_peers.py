"""The peer watch (workers/peers.py): the ranks of a cell notice one that is gone."""
from __future__ import annotations

import threading
import time

import pytest

from workers.peers import DONE, PeerWatch


@pytest.fixture
def cells():
    made = []
    yield lambda *a, **k: made.append(Cell(*a, **k)) or made[-1]
    for cell in made:  # no thread beats on after its test
        for w in cell.watches:
            w._halt.set()


class Cell:
    """The ranks of one cell as peer watches in one folder; a "killed" rank
    stops beating without saying done, as a SIGKILLed process does."""

    def __init__(self, folder, world, timeout=0.8):
        self.failed = threading.Event()
        self.stops: dict[int, object] = {}
        self.watches = [PeerWatch(folder, r, world, stop=self._stopper(r), other_failed=self.failed.is_set,
                                  timeout=timeout) for r in range(world)]

    def _stopper(self, rank):
        def stop(verdict):
            self.stops[rank] = verdict
        return stop

    def start(self):
        for w in self.watches:
            w.start()
        return self

    def kill(self, rank):
        self.watches[rank]._halt.set()

    def wait_stops(self, ranks, timeout_s=10.0):
        deadline = time.monotonic() + timeout_s
        while not set(ranks) <= set(self.stops) and time.monotonic() < deadline:
            time.sleep(0.05)
        return self.stops


def test_rank_0_finds_a_killed_rank_and_names_it(tmp_path, cells):
    cell = cells(tmp_path, 3).start()
    cell.kill(2)
    stops = cell.wait_stops([0])
    peer, reason = stops[0]
    assert peer == 2 and reason.startswith("rank 2 stopped answering: its heartbeat has not moved for 0.8 s")
    assert 1 not in stops or stops[1] is None  # rank 1 watches rank 0 only; it learns from FAILED.json


def test_the_others_find_a_killed_rank_0(tmp_path, cells):
    cell = cells(tmp_path, 3).start()
    cell.kill(0)
    stops = cell.wait_stops([1, 2])
    assert stops[1][0] == 0 and stops[2][0] == 0


def test_another_ranks_failed_marker_stops_every_rank(tmp_path, cells):
    cell = cells(tmp_path, 2, timeout=4).start()  # a beat a second; no rank goes silent
    cell.failed.set()
    assert cell.wait_stops([0, 1]) == {0: None, 1: None}


@pytest.mark.slow
def test_a_rank_that_finished_is_not_gone_and_healthy_ranks_run_on(tmp_path, cells):
    cell = cells(tmp_path, 3).start()
    cell.watches[2].finish()
    time.sleep(2.5)  # three timeouts
    assert cell.stops == {}
    assert (tmp_path / "rank-2").read_text() == DONE


def test_a_rank_that_never_started_is_left_to_the_join_timeout(tmp_path):
    watch = PeerWatch(tmp_path, 0, 2, stop=lambda v: None, other_failed=lambda: False, timeout=0.5)
    watch._beat()
    time.sleep(0.7)
    assert watch.check() is False  # no file of rank 1: the join's own timeout covers it


def test_the_verdict_is_the_readers_clock_not_the_file_time(tmp_path):
    """Other nodes' clocks never matter: only whether the counter moved, by this rank's clock."""
    now = [1000.0]
    writer = PeerWatch(tmp_path, 1, 2, stop=lambda v: None, other_failed=lambda: False, timeout=10)
    reader = PeerWatch(tmp_path, 0, 2, stop=lambda v: None, other_failed=lambda: False, timeout=10,
                       clock=lambda: now[0])

    def after(seconds):
        for _ in range(int(seconds / 2.5)):  # checks once a beat (2.5 s here), as the thread does
            now[0] += 2.5
            verdict = reader.check()
        return verdict

    writer._beat()
    assert reader.check() is False
    assert after(7.5) is False
    writer._beat()  # it moved: the wait starts again when the reader sees it (the next check)
    assert after(10) is False
    now[0] += 3.5  # 11 s since the reader saw it move
    assert reader.check()[0] == 1


def test_a_pause_of_the_reader_is_not_blamed_on_the_peers(tmp_path):
    """The job suspended, or the node paused: on resume the reader must not
    count its own silence as the peer's (the peer had no chance to beat)."""
    now = [1000.0]
    writer = PeerWatch(tmp_path, 1, 2, stop=lambda v: None, other_failed=lambda: False, timeout=10)
    reader = PeerWatch(tmp_path, 0, 2, stop=lambda v: None, other_failed=lambda: False, timeout=10,
                       clock=lambda: now[0])
    writer._beat()
    assert reader.check() is False
    now[0] += 60  # suspended for a minute
    assert reader.check() is False
    for _ in range(4):  # then watching on schedule, the peer silent
        now[0] += 2.5
        verdict = reader.check()
    assert verdict is False  # 10 s of watching: not yet
    now[0] += 1
    assert reader.check()[0] == 1


def test_a_rank_that_ended_with_an_error_is_gone_at_once(tmp_path):
    reader = PeerWatch(tmp_path, 0, 3, stop=lambda v: None, other_failed=lambda: False, timeout=100)
    PeerWatch(tmp_path, 2, 3, stop=lambda v: None, other_failed=lambda: False, timeout=100).finish(ok=False)
    peer, reason = reader.check()
    assert peer == 2 and reason.startswith("rank 2 ended with an error")


@pytest.mark.slow
def test_a_file_system_error_does_not_end_the_watch(tmp_path, cells, capsys):
    """An ESTALE from NFS once ended the thread: the rank stopped beating and
    was then blamed for its own silence."""
    errors = iter([OSError(116, "Stale file handle")])

    def flaky():
        err = next(errors, None)
        if err:
            raise err
        return False

    cell = cells(tmp_path, 2)
    cell.watches[1]._other_failed = flaky
    cell.start()
    time.sleep(2.0)  # more than two timeouts
    assert cell.stops == {} and cell.watches[1]._thread.is_alive()
    assert "Stale file handle" in capsys.readouterr().err


def test_the_last_word_is_done_not_a_late_beat(tmp_path):
    watch = PeerWatch(tmp_path, 1, 2, stop=lambda v: None, other_failed=lambda: False, timeout=1.0).start()
    watch.beat_s = 0.001  # beat as fast as it can
    time.sleep(0.3)
    watch.finish()
    time.sleep(0.1)
    assert (tmp_path / "rank-1").read_text() == DONE
