"""The sweep config: Hydra schemas, composition of overrides into cells, validation.

Importing this package imports Hydra; readers of an existing sweep folder need
only ``orchestrator.plan`` and ``orchestrator.contracts``.
"""
from orchestrator.config.compose import ComposedCell, ComposedSweep, compose_cells, group_choices
from orchestrator.config.validate import ConfigError

__all__ = ["ComposedCell", "ComposedSweep", "ConfigError", "compose_cells", "group_choices"]
