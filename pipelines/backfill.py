"""Backfill: the streaming job's statements over historical files, in Flink's batch mode.

Every complete window row is written, oldest first within a batch (a window ending after now is
counted, not written); the store keeps the newest per entity (last-write-wins by event time) and
its history log records every accepted write. A backfill followed by the streaming job leaves
the same latest values as streaming alone only when no event is late: batch mode has no
watermark, so it counts the events that streaming dead-letters as late.
"""

from __future__ import annotations

from pipelines.streaming import JobOptions, JobReport, run_job


def run_backfill(options: JobOptions) -> JobReport:
    """Read every file under options.source once, compute all windows, write them, return."""
    return run_job(options, streaming=False)
