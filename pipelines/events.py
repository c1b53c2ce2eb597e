"""Transaction-like test events, written as CSV/JSON files, with a NumPy reference of the windows.

The reference computes, for every entity, the newest window the pipeline emits (the one the
online store keeps, as it keeps the newest event time) straight from the generated arrays; its
sums and means are exact (fractions) rounded once, as the job's must be.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from featurestore.dtypes import DType
from featurestore.kernels import reference
from featurestore.kernels.spatial import distance_to_point_km
from pipelines.config import Pipeline, Window

MERCHANTS = np.array([f"m{i:03d}" for i in range(200)], dtype=object)
CATEGORIES = np.array(["food", "travel", "fuel", "retail", "online", "cash"], dtype=object)
COLUMNS = ("card_id", "amount", "merchant", "category", "lat", "lon", "event_time")


def generate_events(
    n: int,
    entities: int = 1000,
    start_ms: int = 1_700_000_000_000,
    span_s: float = 3600.0,
    jitter_ms: int = 0,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """n events over span_s seconds, in time order up to jitter_ms of disorder."""
    rng = np.random.default_rng(seed)
    card = rng.integers(0, entities, n, dtype=np.int64)
    home = rng.uniform([-60.0, -150.0], [60.0, 150.0], size=(entities, 2))
    times = start_ms + np.sort(rng.integers(0, int(span_s * 1000), n, dtype=np.int64))
    if jitter_ms:
        times = times + rng.integers(-jitter_ms, 1, n)
    return {
        "card_id": card,
        "amount": np.round(rng.lognormal(3.0, 1.0, n), 2),
        "merchant": MERCHANTS[rng.integers(0, len(MERCHANTS), n)],
        "category": CATEGORIES[rng.integers(0, len(CATEGORIES), n)],
        "lat": np.round(home[card, 0] + rng.normal(0, 0.5, n), 5),
        "lon": np.round(home[card, 1] + rng.normal(0, 0.5, n), 5),
        "event_time": times.astype(np.int64),
    }


def _atomic_write(path: Path, text: str) -> None:
    """Write beside the target under a dot name (Flink's file source skips those), then rename."""
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_events(
    events: dict[str, np.ndarray], folder: Path | str, files: int = 1, fmt: str = "csv",
    prefix: str = "events",
) -> list[Path]:  # fmt: skip
    """Split the events into `files` files (CSV without header, or JSON lines) in folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({c: events[c] for c in COLUMNS})
    paths = []
    for i, part in enumerate(np.array_split(np.arange(len(frame)), files)):
        chunk = frame.iloc[part]
        path = folder / f"{prefix}-{i:05d}.{fmt}"
        if fmt == "csv":
            text = chunk.to_csv(header=False, index=False)
        else:
            text = chunk.to_json(orient="records", lines=True)
        _atomic_write(path, text)
        paths.append(path)
    return paths


MALFORMED_CSV = (
    "abc,12.5,m001,food,48.1,2.3,1700000000000",
    "7,not-a-number,m001,food,48.1,2.3,1700000000000",
    "7,12.5,m001,food,48.1,2.3,yesterday",
    "7,12.5",
    "7,NaN,m001,food,48.1,2.3,1700000000000",
    "7,1e400,m001,food,48.1,2.3,1700000000000",
    "7.5,12.5,m001,food,48.1,2.3,1700000000000",
    "7,12.5,m001,food,48.1,2.3,1700000000000.5",
)


def write_malformed(folder: Path | str, name: str = "malformed.csv") -> int:
    """A CSV file of rows a pipeline must dead-letter (bad key, amount, time, missing columns,
    NaN or infinite amounts, fractional keys and times)."""
    _atomic_write(Path(folder) / name, "\n".join(MALFORMED_CSV) + "\n")
    return len(MALFORMED_CSV)


EVENT_TIME_CSV = (
    "5,12.5,m001,food,48.1,2.3,4102444800000",
    "abc,12.5,m001,food,48.1,2.3,1750000000000",
    "5,12.5,m001,food,48.1,2.3,1700000000000000",
    "5,12.5,m001,food,48.1,2.3,0",
)
"""Rows a pipeline must dead-letter without moving the watermark: dated 2100, malformed and
dated 2025 (past, but after the other events), in microseconds, and at the epoch."""


def splice_csv(path: Path | str, middle: Sequence[str], end: Sequence[str] = ()) -> None:
    """Insert rows halfway through a CSV file and append others after its last row."""
    lines = Path(path).read_text().splitlines()
    half = len(lines) // 2
    _atomic_write(Path(path), "\n".join([*lines[:half], *middle, *lines[half:], *end]) + "\n")


def rows_ahead(keys: Sequence[int], ahead_s: float) -> list[str]:
    """One CSV row per key dated ahead_s after now: accepted (within the server's clock skew
    allowance), but every window holding it ends after now."""
    event_ms = int((time.time() + ahead_s) * 1000)
    return [f"{k},10.0,m001,food,48.1,2.3,{event_ms}" for k in keys]


@dataclass
class WindowReference:
    """The newest window of every entity: keys, window end (µs) and one array per feature."""

    keys: np.ndarray
    window_end_us: np.ndarray
    features: dict[str, np.ndarray]


def with_derived(events: dict[str, np.ndarray], pipeline: Pipeline) -> dict[str, np.ndarray]:
    """The events plus the pipeline's derived columns, by the shared kernel the job runs (its
    NumPy reference may differ in the last bit: libm against NumPy's own sin and cos)."""
    out = dict(events)
    for d in pipeline.derived:
        lat0, lon0 = d.point
        lat, lon = (np.asarray(out[c], np.float64) for c in (d.lat, d.lon))
        out[d.name] = distance_to_point_km(lat, lon, lat0, lon0)
    return out


def reference_latest(
    events: dict[str, np.ndarray], pipeline: Pipeline, window: Window
) -> WindowReference:
    """Aggregates of each entity's newest window, from the raw arrays."""
    cols = with_derived(events, pipeline)
    ts = cols[pipeline.event_time_column]
    size_ms, slide_ms = int(window.size_s * 1000), int(window.slide_s * 1000)
    frame = pd.DataFrame({k: v for k, v in cols.items() if np.ndim(v) == 1})
    last = frame.groupby(pipeline.entity_column)[pipeline.event_time_column].transform("max")
    end = (last.to_numpy() // slide_ms) * slide_ms + size_ms
    mask = ts >= end - size_ms
    groups = frame[mask].assign(_end=end[mask]).groupby(pipeline.entity_column)
    features = {}
    for agg in window.aggregates:
        if agg.fn == "count":
            series = groups.size()
        elif agg.fn == "count_distinct":
            series = groups[agg.column].nunique()
        elif agg.fn in ("sum", "mean"):
            exact = reference.exact_sum if agg.fn == "sum" else reference.exact_mean
            series = groups[agg.column].agg(lambda v, f=exact: f(v.to_numpy(np.float64)))
        else:
            series = groups[agg.column].agg(agg.fn)
        features[agg.name] = series.to_numpy(np.int64 if agg.dtype is DType.INT64 else np.float64)
    keys = groups.size().index.to_numpy(np.int64)
    window_end = groups["_end"].first().to_numpy(np.int64) * 1000
    return WindowReference(keys, window_end, features)


EXAMPLE_PIPELINE = """
[[pipeline]]
name = "card_txn"
format = "csv"
entity_column = "card_id"
event_time_column = "event_time"
out_of_orderness_s = 2.0
allowed_lateness_s = 1.0

[pipeline.columns]
card_id = "bigint"
amount = "double"
merchant = "string"
category = "string"
lat = "double"
lon = "double"
event_time = "bigint"

[[pipeline.derived]]
name = "distance_km"
kind = "haversine_to_point"
lat = "lat"
lon = "lon"
point = [48.8566, 2.3522]

[[pipeline.window]]
view = "card_txn_5m"
kind = "hop"
size_s = 300
slide_s = 60

[pipeline.window.features]
txn_count = "count"
amount_sum = "sum(amount)"
amount_mean = "mean(amount)"
amount_max = "max(amount)"
distance_max = "max(distance_km)"
merchants = "count_distinct(merchant)"

[[pipeline.window]]
view = "card_txn_1h"
kind = "tumble"
size_s = 3600

[pipeline.window.features]
txn_count = "count"
amount_sum = "sum(amount)"
distance_mean = "mean(distance_km)"
"""
