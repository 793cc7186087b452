"""Validate cell outputs, merge telemetry, write results/summary.parquet (no torch)."""
from orchestrator.reduce.summary import SUMMARY_SCHEMA, ReduceError, open_telemetry, read_invalid, reduce_sweep
from orchestrator.reduce.table import format_table
from orchestrator.reduce.validate import CellValidation, validate_cell, validate_cells

__all__ = [
    "SUMMARY_SCHEMA", "ReduceError", "CellValidation", "format_table", "open_telemetry",
    "read_invalid", "reduce_sweep", "validate_cell", "validate_cells",
]
