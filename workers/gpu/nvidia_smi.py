"""NVIDIA cards through the ``nvidia-smi`` command, as the paper set its caps.

Every call goes through ``run_nvidia_smi(args)`` with an argument list (never
a shell string). Exit codes are translated (nvidia-smi documents them):
2 invalid argument → CapRangeError, 4 insufficient permissions →
CapPermissionError, 15 GPU lost → GpuLostError. Slower than NVML (a process
per call); the energy counter is not offered by ``--query-gpu``.
"""
from __future__ import annotations

import subprocess
import time

from workers.gpu.base import CapPermissionError, CapRangeError, GpuError, GpuInfo, GpuLostError, GpuSample
from workers.gpu.errors import PERMISSION_FIX
from workers.gpu.simulated import visible_indices

MiB = 1 << 20
TIMEOUT_S = 30.0
INFO_FIELDS = ("index", "uuid", "name", "memory.total", "power.min_limit", "power.max_limit", "power.default_limit")
SAMPLE_FIELDS = ("power.draw", "utilization.gpu", "utilization.memory", "memory.used", "clocks.sm",
                 "temperature.gpu", "enforced.power.limit")


def run_nvidia_smi(args: list[str], *, timeout_s: float = TIMEOUT_S) -> str:
    """Run ``nvidia-smi *args``; stdout, or a translated GpuError."""
    cmd = ["nvidia-smi", *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError:
        raise GpuError("nvidia-smi is not on PATH; install the NVIDIA driver utilities or use gpu.backend=nvml") from None
    except subprocess.TimeoutExpired:
        raise GpuError(f"`{' '.join(cmd)}` did not answer in {timeout_s:g} s; the driver may be hung (check dmesg)") from None
    if proc.returncode == 0:
        return proc.stdout
    msg = (proc.stderr.strip() or proc.stdout.strip() or "no message").splitlines()[-1]
    if proc.returncode == 4:
        raise CapPermissionError(f"`{' '.join(cmd)}`: {msg}: {PERMISSION_FIX}")
    if proc.returncode == 2:
        raise CapRangeError(f"`{' '.join(cmd)}`: {msg}; choose a value inside the card's range (never clamped)")
    if proc.returncode == 15:
        raise GpuLostError(f"`{' '.join(cmd)}`: {msg}; drain the node and check the GPU")
    raise GpuError(f"`{' '.join(cmd)}` failed with exit code {proc.returncode}: {msg}")


def _rows(text: str) -> list[list[str]]:
    return [[c.strip() for c in line.split(",")] for line in text.splitlines() if line.strip()]


def _num(cell: str) -> float | None:
    """A number from a csv,nounits cell; None for [N/A], [Not Supported] and the like."""
    try:
        return float(cell)
    except ValueError:
        return None


class NvidiaSmiBackend:
    name = "nvidia-smi"
    source = "nvidia-smi"

    def __init__(self, *, observe_only: bool = False):
        self.observe_only = observe_only
        self.would_set: dict[int, float] = {}

    def _query(self, fields: tuple[str, ...], index: int | None = None) -> list[list[str]]:
        args = [f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"]
        if index is not None:
            args = ["-i", str(index), *args]
        return _rows(run_nvidia_smi(args))

    def devices(self) -> list[GpuInfo]:
        rows = {int(r[0]): r for r in self._query(INFO_FIELDS)}
        out = []
        for i in visible_indices(sorted(rows), {i: r[1] for i, r in rows.items()}):
            r = rows[i]
            out.append(GpuInfo(i, r[1], r[2], int((_num(r[3]) or 0) * MiB), _num(r[4]) or 0.0, _num(r[5]) or 0.0,
                               _num(r[6]) or 0.0))
        return out

    def get_power_limit_w(self, index: int) -> float:
        value = _num(self._query(("enforced.power.limit",), index)[0][0])
        if value is None:
            raise GpuError(f"nvidia-smi reports no enforced power limit for GPU {index}; this card cannot be capped")
        return value

    def set_power_limit_w(self, index: int, watts: float) -> None:
        if self.observe_only:
            self.would_set[index] = float(watts)  # observe mode: record, never write
            return
        run_nvidia_smi(["-i", str(index), "-pl", f"{watts:g}"])

    def sample(self, index: int) -> GpuSample:
        t = time.time_ns()
        r = [_num(c) for c in self._query(SAMPLE_FIELDS, index)[0]]
        return GpuSample(t, r[0], r[1], r[2], int(r[3] * MiB) if r[3] is not None else None, r[4], r[5], r[6])

    def energy_j(self, index: int) -> float | None:
        return None  # not offered by --query-gpu; the sampler integrates power instead

    def note_activity(self, index: int, phase: str, load: float) -> None:
        pass

    def close(self) -> None:
        pass
