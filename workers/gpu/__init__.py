"""GPU control and telemetry: pick a backend, map ranks to GPUs.

``select_backend(options)`` builds the backend named by ``options.gpu_backend``:

- ``auto``: NVML when an NVIDIA GPU answers, else the simulated node;
- ``nvml``, ``nvidia-smi``, ``simulated``: that one;
- ``capctl``: reads through NVML (simulated when no GPU answers) and sets
  through ``sudo -n wattsweep-capctl`` (``options.extra["capctl_command"]`` or
  $WATTSWEEP_CAPCTL_COMMAND give another command).

``options.gpu_observe=True`` makes any backend read-only: it records what it
would set and never calls a setter.
"""
from __future__ import annotations

from orchestrator.contracts import RunOptions
from workers.gpu.base import (CapMismatchError, CapPermissionError, CapRangeError, GpuBackend, GpuError, GpuInfo,
                              GpuLostError, GpuSample, NotSupportedError)

BACKENDS = ("auto", "nvml", "nvidia-smi", "capctl", "simulated")

__all__ = [
    "BACKENDS", "CapMismatchError", "CapPermissionError", "CapRangeError", "GpuBackend", "GpuError", "GpuInfo",
    "GpuLostError", "GpuSample", "NotSupportedError", "gpu_index_for_rank", "select_backend",
]


def _simulated(options: RunOptions) -> GpuBackend:
    from workers.gpu.simulated import SimulatedBackend

    return SimulatedBackend(profile=options.gpu_profile, state_dir=options.state_dir, fail=options.gpu_fail,
                            observe_only=options.gpu_observe)


def _nvml_or_none(observe: bool) -> GpuBackend | None:
    from workers.gpu.nvml import NvmlBackend

    try:
        b = NvmlBackend(observe_only=observe)
    except GpuError:
        return None
    try:
        if b.devices():
            return b
    except GpuError:
        pass
    b.close()
    return None


def select_backend(options: RunOptions, *, local_rank: int = 0) -> GpuBackend:
    """The GPU backend for this process (``local_rank`` is accepted for
    backends that open one device per rank; the current ones open lazily)."""
    kind, observe = options.gpu_backend, options.gpu_observe
    if kind not in BACKENDS:
        raise GpuError(f"unknown gpu.backend {kind!r}; valid: {', '.join(BACKENDS)}")
    if options.gpu_fail and kind not in ("simulated", "auto"):
        raise GpuError(f"gpu.fail={options.gpu_fail} needs gpu.backend=simulated (it is {kind})")
    if kind == "simulated":
        return _simulated(options)
    if kind == "auto":
        real = None if options.gpu_fail else _nvml_or_none(observe)
        return real if real is not None else _simulated(options)
    if kind == "nvml":
        from workers.gpu.nvml import NvmlBackend

        return NvmlBackend(observe_only=observe)
    if kind == "nvidia-smi":
        from workers.gpu.nvidia_smi import NvidiaSmiBackend

        return NvidiaSmiBackend(observe_only=observe)
    from workers.gpu.capctl import CapctlBackend, helper_command

    reader = _nvml_or_none(True) or _simulated(RunOptions.from_dict({**options.to_dict(), "gpu_observe": True}))
    return CapctlBackend(reader, command=helper_command(options.extra.get("capctl_command")), observe_only=observe)


def gpu_index_for_rank(backend: GpuBackend, local_rank: int) -> int:
    """The GPU of local rank ``local_rank``: the rank-th GPU this process may
    use (``devices()`` already follows CUDA_VISIBLE_DEVICES, uuids included).
    A process that sees exactly one GPU (Slurm binding one per task) uses it."""
    devices = backend.devices()
    if not devices:
        raise GpuError("no GPU visible to this process; check CUDA_VISIBLE_DEVICES and the job's GPU request")
    if len(devices) == 1:
        return devices[0].index
    if not 0 <= local_rank < len(devices):
        raise GpuError(f"local rank {local_rank} has no GPU: this process sees {len(devices)} "
                       f"({', '.join(str(d.index) for d in devices)}); request as many GPUs per node as tasks")
    return devices[local_rank].index
