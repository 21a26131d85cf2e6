"""Orchestration around the bundles: tracking, reports, losses and metrics, command-line entry points.

Importing the package installs the command-line error hook (:mod:`pipelines.cli`) and makes the submodules
reachable as ``pipelines.<module>`` from bundle config expressions.
"""

from . import cli, handlers, inferers, losses, metrics, reports, tracking

__all__ = ["cli", "handlers", "inferers", "losses", "metrics", "reports", "tracking"]
