"""Test rig for the GPU backends: one simulated node in a temporary state
folder, seen through each backend the machine can run.

- simulated: in process;
- nvidia-smi: the fake ``tests/fakes/nvidia-smi`` on PATH, backed by the same state;
- capctl: the real helper run directly (``tests/fakes/wattsweep-capctl``, no sudo),
  configured to drive the same simulated node;
- nvml: only when a real GPU answers, and then only read or observe.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from orchestrator.contracts import RunOptions
from workers.gpu.simulated import SimulatedBackend

FAKES = Path(__file__).resolve().parent
WRITE_BACKENDS = ("simulated", "nvidia-smi", "capctl")


def isolate(monkeypatch, tmp: Path) -> Path:
    """Point every default (state folder, site ledger, helper) into ``tmp``:
    a test never touches /var/lib/wattsweep, /var/log/wattsweep or a real card."""
    state = tmp / "state"
    monkeypatch.setenv("WATTSWEEP_STATE_DIR", str(state))
    monkeypatch.setenv("WATTSWEEP_SITE_LEDGER", str(tmp / "site.jsonl"))
    # The fakes first; then this interpreter's folder, so their `python3` is not a slow version-manager shim.
    path = os.pathsep.join([str(FAKES), os.path.dirname(sys.executable), os.environ["PATH"]])
    monkeypatch.setenv("PATH", path)
    monkeypatch.setenv("WATTSWEEP_CAPCTL_COMMAND", f"{sys.executable} {FAKES / 'wattsweep-capctl'}")
    cfg = tmp / "capctl.yaml"
    cfg.write_text(f"backend: simulated\nstate_dir: {state}\nsite_ledger: {tmp / 'site.jsonl'}\n")
    monkeypatch.setenv("WATTSWEEP_CAPCTL_CONFIG", str(cfg))
    for var in ("CUDA_VISIBLE_DEVICES", "SLURMD_NODENAME", "WATTSWEEP_FAKE_GPU_FAIL", "SUDO_UID"):
        monkeypatch.delenv(var, raising=False)
    return state


@dataclass
class Rig:
    kind: str
    tmp: Path
    state: Path

    @property
    def site_ledger(self) -> Path:
        return self.tmp / "site.jsonl"

    @property
    def cell_ledger(self) -> Path:
        return self.tmp / "sweep" / "cells" / "c0ffee000000" / "caps.jsonl"

    def options(self, **kw) -> RunOptions:
        base = dict(gpu_backend=self.kind, state_dir=str(self.state), site_ledger=str(self.site_ledger))
        return RunOptions(**{**base, **kw})

    def backend(self, **kw):
        from workers.gpu import select_backend

        return select_backend(self.options(**kw))

    def sim(self) -> SimulatedBackend:
        """Direct access to the simulated node's cards (to arm faults, to check limits)."""
        return SimulatedBackend(state_dir=self.state)

    def save_files(self) -> list[Path]:
        return sorted(self.state.glob("nodes/*/caps/gpu-*.json"))
