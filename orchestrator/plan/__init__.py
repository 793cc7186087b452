"""Planning: cells with ids and feasibility, and the plan file."""
from orchestrator.plan.planned import PlanFileError, PlannedCell, read_plan, write_plan
from orchestrator.plan.sweepfile import read_sweep_yaml, write_sweep_yaml

__all__ = ["PlanFileError", "PlannedCell", "read_plan", "write_plan", "plan_cells", "read_sweep_yaml", "write_sweep_yaml"]


def __getattr__(name: str):
    # plan_cells pulls in the feasibility rules; loaded on first use so that
    # readers of plan.jsonl (status, resubmit) stay light.
    if name == "plan_cells":
        from orchestrator.plan.feasibility import plan_cells

        return plan_cells
    raise AttributeError(name)
