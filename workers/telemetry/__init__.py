"""Per-GPU telemetry: sampler thread, phase marks, atomic Parquet writer (no torch)."""
from workers.telemetry.sampler import Sampler, WindowMark
from workers.telemetry.writer import TelemetryRows, read_telemetry_meta, write_telemetry

__all__ = ["Sampler", "WindowMark", "TelemetryRows", "read_telemetry_meta", "write_telemetry"]
