"""Figures, HTML and Markdown report, and `compare` of two sweeps (no torch)."""
from orchestrator.report.compare import CompareError, compare_sweeps
from orchestrator.report.data import ReportError, load_summary
from orchestrator.report.render import build_report, write_html, write_markdown

__all__ = ["CompareError", "ReportError", "build_report", "compare_sweeps", "load_summary", "write_html", "write_markdown"]
