"""Error messages shared by every backend: what went wrong and what to do."""
from __future__ import annotations

from workers.gpu.base import CapPermissionError, CapRangeError, GpuLostError

PERMISSION_FIX = (
    "run the job as root, let jobs call `sudo -n wattsweep-capctl` (gpu.backend=capctl), "
    "or set caps from a Slurm prolog; see docs/admin.md, and `wattsweep doctor` for this node"
)


def permission_error(index: int, watts: float, detail: str = "") -> CapPermissionError:
    extra = f" ({detail})" if detail else ""
    return CapPermissionError(f"no permission to set GPU {index}'s power limit to {watts:g} W{extra}: {PERMISSION_FIX}")


def range_error(index: int, watts: float, min_w: float, max_w: float) -> CapRangeError:
    return CapRangeError(
        f"{watts:g} W is outside GPU {index}'s power-limit range {min_w:g}-{max_w:g} W; "
        f"choose a cap in that range (never clamped)"
    )


def lost_error(index: int, op: str) -> GpuLostError:
    return GpuLostError(
        f"GPU {index} is lost (stopped answering during {op}); drain the node and check `nvidia-smi` / dmesg, "
        f"then run `wattsweep caps restore --all` once it is back"
    )
