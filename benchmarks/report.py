"""Run records (one dict per load point), their Markdown table and their JSON document."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.load import CLOSED, LoadResult, LoadSpec
from benchmarks.scenarios import ScenarioRun

PERCENTILES = {"p50_ms": 50.0, "p90_ms": 90.0, "p99_ms": 99.0, "p999_ms": 99.9}
BASELINE_KEYS = ("baseline_throughput_rps", "baseline_server_cpu_us_per_req", "baseline_p99_ms")
_STANDARD_KEYS = {
    "scenario",
    "mode",
    "concurrency",
    "rate",
    "generator",
    "processes",
    "processes_killed",
    "warmup_s",
    "duration_s",
    "requests",
    "throughput_rps",
    "rows_per_request",
    "rows_per_s",
    *PERCENTILES,
    "mean_ms",
    "max_ms",
    "errors",
    "server_cpu_us_per_req",
    "client_cpu_us_per_req",
    "server_rss_mb",
    "send_lag_p99_ms",
    "latency_from",
    "response_bytes",
    "throughput_vs_baseline",
    "server_cpu_vs_baseline",
    *BASELINE_KEYS,
}


def _ms(value_ns: float) -> float | None:
    """Nanoseconds to milliseconds, rounded; None for an empty histogram."""
    return None if math.isnan(value_ns) else round(value_ns / 1e6, 4)


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def make_run(
    scenario: str,
    spec: LoadSpec,
    run: ScenarioRun,
    result: LoadResult,
    generator: str = "python",
    latency_from: str | None = None,
) -> dict[str, Any]:
    """One JSON-ready record: load shape, figures, errors by status name, scenario params."""
    record: dict[str, Any] = {"scenario": scenario, "mode": spec.mode}
    if spec.mode == CLOSED:
        record["concurrency"] = spec.concurrency
    else:
        record["rate"] = spec.rate
    record.update(
        generator=generator,
        latency_from=latency_from or ("send" if spec.mode == CLOSED else "intended_send"),
        processes=result.processes,
        processes_killed=result.processes_killed,
        warmup_s=spec.warmup_s,
        duration_s=spec.duration_s,
        requests=result.completed,
        throughput_rps=round(result.throughput_rps, 1),
    )
    if run.rows_per_request != 1:
        record["rows_per_request"] = run.rows_per_request
        record["rows_per_s"] = round(result.throughput_rps * run.rows_per_request, 1)
    values = result.histogram.percentiles(PERCENTILES.values())
    record.update({key: _ms(v) for key, v in zip(PERCENTILES, values, strict=True)})
    record["mean_ms"] = _ms(result.histogram.mean())
    record["max_ms"] = _ms(float(result.histogram.max)) if result.completed else None
    record["errors"] = dict(sorted(result.errors.items()))
    record["server_cpu_us_per_req"] = _round(result.cpu_us_per_request(result.server_cpu_s))
    record["client_cpu_us_per_req"] = _round(result.cpu_us_per_request(result.client_cpu_s))
    record["server_rss_mb"] = (
        None if result.server_rss_bytes is None else round(result.server_rss_bytes / 2**20, 1)
    )
    if spec.mode != CLOSED:
        record["send_lag_p99_ms"] = _ms(result.send_lag.percentile(99.0))
    if run.response_bytes is not None:
        record["response_bytes"] = run.response_bytes
    record.update(run.params)
    return record


def add_baseline(record: dict[str, Any], baseline: dict[str, Any]) -> None:
    """Put the baseline's figures for the same load point beside record, with ratios."""
    record["baseline_throughput_rps"] = baseline["throughput_rps"]
    record["baseline_server_cpu_us_per_req"] = baseline["server_cpu_us_per_req"]
    record["baseline_p99_ms"] = baseline["p99_ms"]
    record["throughput_vs_baseline"] = _ratio(record["throughput_rps"], baseline["throughput_rps"])
    record["server_cpu_vs_baseline"] = _ratio(
        record["server_cpu_us_per_req"], baseline["server_cpu_us_per_req"]
    )


def _ratio(value: float | None, reference: float | None) -> float | None:
    if value is None or not reference:
        return None
    return round(value / reference, 2)


def params_of(record: dict[str, Any]) -> dict[str, Any]:
    """The scenario's own parameters in a record (everything not a standard key)."""
    return {k: v for k, v in record.items() if k not in _STANDARD_KEYS}


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e6 else f"{value:.0f}"
    return str(value)


def _errors_cell(errors: dict[str, int]) -> str:
    return ", ".join(f"{code}:{n}" for code, n in errors.items()) or "0"


def format_table(runs: list[dict[str, Any]]) -> str:
    """A Markdown table of runs; rows/s and baseline columns appear only when some run has them."""
    columns: list[tuple[str, Any]] = [
        ("scenario", lambda r: r["scenario"]),
        ("gen", lambda r: r.get("generator", "python")),
        ("load", lambda r: f"c={r['concurrency']}" if "concurrency" in r else f"{r['rate']:g}/s"),
        ("params", lambda r: " ".join(f"{k}={v}" for k, v in params_of(r).items())),
        ("req/s", lambda r: r["throughput_rps"]),
    ]
    if any("rows_per_s" in r for r in runs):
        columns.append(("rows/s", lambda r: r.get("rows_per_s")))
    columns += [
        ("p50 ms", lambda r: r["p50_ms"]),
        ("p90 ms", lambda r: r["p90_ms"]),
        ("p99 ms", lambda r: r["p99_ms"]),
        ("p99.9 ms", lambda r: r["p999_ms"]),
        ("errors", lambda r: _errors_cell(r["errors"])),
        ("server CPU µs/req", lambda r: r["server_cpu_us_per_req"]),
        ("client CPU µs/req", lambda r: r["client_cpu_us_per_req"]),
    ]
    if any("throughput_vs_baseline" in r for r in runs):
        columns += [
            ("req/s vs baseline", lambda r: r.get("throughput_vs_baseline")),
            ("server CPU vs baseline", lambda r: r.get("server_cpu_vs_baseline")),
        ]
    lines = [
        "| " + " | ".join(name for name, _ in columns) + " |",
        "|" + "|".join(" --- " for _ in columns) + "|",
    ]
    for record in runs:
        lines.append("| " + " | ".join(_cell(get(record)) for _, get in columns) + " |")
    return "\n".join(lines)


def write_json(runs: list[dict[str, Any]], path: Path) -> None:
    """Write {"runs": [...]} to path."""
    Path(path).write_text(json.dumps({"runs": runs}, indent=2) + "\n")
