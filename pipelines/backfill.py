"""Backfill: the streaming job's statements over historical files, in Flink's batch mode.

Every window row is written, oldest first within a batch; the store keeps the newest per entity
(last-write-wins by event time) and its history log records every accepted write, so a
backfill followed by the streaming job leaves the same latest values as streaming alone.
"""

from __future__ import annotations

from pipelines.streaming import JobOptions, JobReport, run_job


def run_backfill(options: JobOptions) -> JobReport:
    """Read every file under options.source once, compute all windows, write them, return."""
    return run_job(options, streaming=False)
