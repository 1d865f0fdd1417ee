"""Metric ingestion: push, Prometheus pull, backend inventory -> pandas frames -> snapshot.

This package is the only place pandas meets the model. Every metric source yields the same
frame: one row per sample with columns ``ts`` (epoch seconds), ``kind`` ("host" or "vm"),
``name``, ``cpu`` (cores used) and ``mem`` (MiB used). ``balancer.ingest.demand`` turns a frame
into per-VM demand estimates and per-host freshness, and applies them to an inventory snapshot.
"""

from __future__ import annotations

from balancer.ingest.demand import Estimates, Freshness, apply_estimates, estimate
from balancer.ingest.samples import COLUMNS, SampleBuffer, Source

__all__ = ["COLUMNS", "Estimates", "Freshness", "SampleBuffer", "Source", "apply_estimates",
           "estimate"]
