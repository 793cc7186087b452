"""Cell states from the sweep folder and the queue; resubmitting what did not finish."""
from orchestrator.status.state import (
    ENDED,
    RESUBMITTABLE,
    STATES,
    CellStatus,
    StatusError,
    SweepStatus,
    sweep_status,
)

__all__ = ["ENDED", "RESUBMITTABLE", "STATES", "CellStatus", "StatusError", "SweepStatus", "sweep_status"]
