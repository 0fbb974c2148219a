"""Metrics: loggers now; FLOP counting and MFU build on them."""

from megagen.metrics.logger import MetricsLogger

__all__ = ["MetricsLogger"]
