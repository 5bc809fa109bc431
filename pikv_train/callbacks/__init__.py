"""Callbacks: throughput and the performance block, router statistics, cache-policy switching."""

from pikv_train.callbacks.performance import PerformanceMonitor
from pikv_train.callbacks.predictions import PredictionWriter
from pikv_train.callbacks.policy_switch import CachePolicySwitch
from pikv_train.callbacks.router_stats import RouterStatsMonitor

__all__ = ["CachePolicySwitch", "PerformanceMonitor", "PredictionWriter", "RouterStatsMonitor"]
