"""A simulated node of GPUs, file-backed so that it outlives processes.

The cards' state lives in ``STATE_DIR/nodes/<node>/simulated-gpus.json``:
every process of a node (each rank, the fake ``nvidia-smi``, the capctl
helper, the epilog) sees the same limits, so a restore or a repair can be
checked after the process that capped the card is gone.

Power model (per GPU, deterministic)::

    demand_w = idle_w + load × (max_limit_w − idle_w)   # what the work would draw uncapped
    power_w  = min(demand_w, enforced limit)            # the cap clips it
    energy_j = ∫ power_w dt                             # a counter kept in the state file

``load`` (0..1) and the phase come from ``note_activity``. Power is constant
between state changes, so the counter is exact: each change first books
the energy since the last one. Utilisation is load × 100; the SM clock
falls in proportion when the cap clips the demand.

Failures on demand (``gpu.fail`` or the state file's ``fault``, the latter
seen by every process of the node): ``permission`` (setting raises
CapPermissionError), ``range`` (the driver rejects the value: CapRangeError),
``mismatch`` (the next set enforces requested + 20 W, once), ``lost`` (the set
and every later call raise GpuLostError).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from orchestrator.contracts import GPU_PROFILES, GpuProfile, atomic_write_bytes
from workers.gpu.base import GpuError, GpuInfo, GpuSample, handlers_wait
from workers.gpu.errors import lost_error, permission_error, range_error
from workers.gpu.state import node_dir, node_name, resolve_state_dir

FAULTS = ("permission", "range", "mismatch", "lost")
MISMATCH_OFFSET_W = 20.0
MAX_SM_CLOCK_MHZ = 1530.0
AMBIENT_C = 30.0
STATE_NAME = "simulated-{profile}-gpus.json"  # one simulated node per card profile


def visible_indices(all_indices: list[int], uuids: dict[int, str]) -> list[int]:
    """Indices allowed by CUDA_VISIBLE_DEVICES (integers or GPU uuids), in its order."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None or not env.strip():
        return list(all_indices)
    by_uuid = {u: i for i, u in uuids.items()}
    out = []
    for item in (s.strip() for s in env.split(",")):
        if item.isdigit() and int(item) in all_indices:
            out.append(int(item))
        elif item in by_uuid:
            out.append(by_uuid[item])
        else:
            break  # CUDA stops at the first invalid entry
    return out


def _uuid(node: str, index: int) -> str:
    h = hashlib.sha256(f"{node}/{index}".encode()).hexdigest()
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


class SimulatedBackend:
    name = "simulated"
    source = "simulated"

    def __init__(self, *, profile: str = "v100", state_dir: str | os.PathLike[str] | None = None,
                 node: str | None = None, fail: str | None = None, observe_only: bool = False,
                 gpus_per_node: int | None = None):
        if profile not in GPU_PROFILES:
            raise GpuError(f"unknown simulated GPU profile {profile!r}; valid: {', '.join(GPU_PROFILES)}")
        if fail is not None and fail not in FAULTS:
            raise GpuError(f"unknown gpu.fail {fail!r}; valid: {', '.join(FAULTS)}")
        self.profile_key = profile
        self.profile: GpuProfile = GPU_PROFILES[profile]
        self.node = node or node_name()
        self.dir = node_dir(resolve_state_dir(state_dir), self.node)
        # A real node cannot change its cards: a sweep over gpu.profile gets one simulated
        # node per profile, so that cells of two profiles running at once never share
        # (and reset) each other's cards and energy counters.
        self.path = self.dir / STATE_NAME.format(profile=profile)
        self.fail = fail
        self.observe_only = observe_only
        self.would_set: dict[int, float] = {}  # observe mode: what a set would have written
        self._mismatch_spent = False
        self._lost = False
        self._n = gpus_per_node or self.profile.gpus_per_node
        self._update(lambda st: None)  # create the node's cards on first use

    # -- state file -------------------------------------------------------
    def _fresh(self) -> dict[str, Any]:
        p, now = self.profile, time.time_ns()
        gpus = [
            {"index": i, "uuid": _uuid(self.node, i), "name": p.name, "memory_total_bytes": p.memory_bytes,
             "min_limit_w": p.min_limit_w, "max_limit_w": p.max_limit_w, "default_limit_w": p.default_limit_w,
             "idle_power_w": p.idle_power_w, "limit_w": p.default_limit_w, "energy_j": 0.0, "updated_ns": now,
             "phase": "idle", "load": 0.0}
            for i in range(self._n)
        ]
        return {"profile": self.profile_key, "node": self.node, "fault": None, "gpus": gpus}

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.dir.mkdir(parents=True, exist_ok=True)
        # A cap session's signal handler restores through this same lock: it
        # waits for the section to end (base.handlers_wait), else it would hang.
        with handlers_wait(), open(self.dir / ".simulated.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any] | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except FileNotFoundError:
            return None

    def _update(self, change: Callable[[dict[str, Any]], Any]) -> Any:
        """Read-modify-write under the node lock, booking energy up to now first."""
        with self._locked():
            st = self._read() or self._fresh()
            now = time.time_ns()
            for g in st["gpus"]:
                g["energy_j"] += _power_w(g) * (now - g["updated_ns"]) / 1e9
                g["updated_ns"] = now
            out = change(st)
            atomic_write_bytes(self.path, json.dumps(st, indent=1).encode())
            return out

    def _state(self) -> dict[str, Any]:
        st = self._read()
        return st if st is not None else self._update(lambda s: s)

    def _gpu(self, st: dict[str, Any], index: int, op: str) -> dict[str, Any]:
        if self._lost:  # a lost card stays lost for this process
            raise lost_error(index, op)
        for g in st["gpus"]:
            if g["index"] == index:
                return g
        raise GpuError(f"no simulated GPU {index} on node {self.node} (it has {len(st['gpus'])})")

    def _fault(self, st: dict[str, Any]) -> str | None:
        return self.fail or st.get("fault")

    # -- GpuBackend -------------------------------------------------------
    def devices(self) -> list[GpuInfo]:
        st = self._state()
        gpus = {g["index"]: g for g in st["gpus"]}
        idx = visible_indices(sorted(gpus), {i: g["uuid"] for i, g in gpus.items()})
        return [GpuInfo(i, gpus[i]["uuid"], gpus[i]["name"], gpus[i]["memory_total_bytes"], gpus[i]["min_limit_w"],
                        gpus[i]["max_limit_w"], gpus[i]["default_limit_w"]) for i in idx]

    def get_power_limit_w(self, index: int) -> float:
        return float(self._gpu(self._state(), index, "reading the power limit")["limit_w"])

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if self.observe_only:
            self.would_set[index] = float(watts)  # observe mode: record, never write
            return
        self._update(lambda st: self._set(st, index, float(watts)))

    def _set(self, st: dict[str, Any], index: int, watts: float) -> None:
        g = self._gpu(st, index, "setting the power limit")
        fault = self._fault(st)
        if fault == "permission":
            raise permission_error(index, watts, "simulated: gpu.fail=permission")
        if fault == "range" or not g["min_limit_w"] <= watts <= g["max_limit_w"]:
            raise range_error(index, watts, g["min_limit_w"], g["max_limit_w"])
        if fault == "lost":
            self._lost = True
            raise lost_error(index, "setting the power limit")
        if fault == "mismatch" and not self._mismatch_spent:
            self._mismatch_spent = True
            if st.get("fault") == "mismatch":
                st["fault"] = None  # one shot for every process of the node too
            off = MISMATCH_OFFSET_W if watts + MISMATCH_OFFSET_W <= g["max_limit_w"] else -MISMATCH_OFFSET_W
            watts += off
        g["limit_w"] = watts

    def sample(self, index: int) -> GpuSample:
        g = self._gpu(self._state(), index, "sampling")
        power = _power_w(g)
        demand = _demand_w(g)
        clock = MAX_SM_CLOCK_MHZ * (power / demand if demand > power else 1.0) if g["load"] > 0 else 300.0
        return GpuSample(
            timestamp_ns=time.time_ns(),
            power_w=power,
            sm_util_pct=100.0 * g["load"],
            mem_util_pct=60.0 * g["load"],
            mem_used_bytes=int(g["memory_total_bytes"] * (0.02 if g["phase"] == "idle" else 0.5)),
            sm_clock_mhz=clock,
            temperature_c=AMBIENT_C + 0.12 * power,
            power_limit_w=float(g["limit_w"]),
        )

    def energy_j(self, index: int) -> float | None:
        g = self._gpu(self._state(), index, "reading the energy counter")
        return g["energy_j"] + _power_w(g) * (time.time_ns() - g["updated_ns"]) / 1e9

    def note_activity(self, index: int, phase: str, load: float) -> None:
        def change(st: dict[str, Any]) -> None:
            g = self._gpu(st, index, "noting activity")
            g["phase"], g["load"] = phase, min(1.0, max(0.0, float(load)))

        self._update(change)

    def close(self) -> None:
        pass

    # -- test and repair helpers -----------------------------------------
    def set_fault(self, fault: str | None) -> None:
        """Arm a fault for every process of this node (None clears it)."""
        if fault is not None and fault not in FAULTS:
            raise GpuError(f"unknown fault {fault!r}; valid: {', '.join(FAULTS)}")

        def change(st: dict[str, Any]) -> None:
            st["fault"] = fault

        self._update(change)
        self._lost = False


def _demand_w(g: dict[str, Any]) -> float:
    return g["idle_power_w"] + g["load"] * (g["max_limit_w"] - g["idle_power_w"])


def _power_w(g: dict[str, Any]) -> float:
    return min(_demand_w(g), float(g["limit_w"]))
