"""Callbacks: throughput and the performance block."""

from pikv_train.callbacks.performance import PerformanceMonitor

__all__ = ["PerformanceMonitor"]
