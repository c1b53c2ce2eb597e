"""Triton's perf_analyzer, unchanged, against `featureserve serve`: unary and streaming sweeps,
with the server-side breakdown it reads from ModelStatistics."""

import csv
import ctypes.util
import os
import re
import subprocess
from pathlib import Path

import pytest

from benchmarks.model_zoo import mlp_model, write_model
from tests.conftest import free_port
from tests.server.cached_venv import cached_venv
from tests.server.test_metrics import scrape

PERF_ANALYZER = ["tritonclient[grpc]==2.51.0", "nvidia-cuda-runtime-cu12==12.9.79"]
"""perf_analyzer ships in this tritonclient wheel; its binary links the CUDA runtime library."""

CONCURRENCY = [1, 4]
SERVER_BLOCK = re.compile(
    r"Server: \n\s+Inference count: (\d+)\n\s+Execution count: (\d+)\n"
    r"\s+Successful request count: (\d+)\n\s+Avg request latency: \d+ usec \(overhead \d+ usec "
    r"\+ queue (\d+) usec \+ compute input \d+ usec \+ compute infer (\d+) usec"
)


def perf_analyzer() -> tuple[Path, dict[str, str]]:
    """The perf_analyzer binary and the environment it runs in."""
    assert ctypes.util.find_library("b64"), (
        "perf_analyzer needs libb64: apt-get install -y libb64-0d (.ci/run installs it)"
    )
    venv = cached_venv("perf-analyzer-venv", PERF_ANALYZER)
    (cuda,) = venv.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib")
    return venv / "bin" / "perf_analyzer", {**os.environ, "LD_LIBRARY_PATH": str(cuda)}


@pytest.mark.parametrize("mode", ["unary", "streaming"])
def test_perf_analyzer_sweep_with_server_breakdown(server_factory, tmp_path: Path, mode) -> None:
    binary, env = perf_analyzer()
    models = tmp_path / "models"
    config = "[dynamic_batching]\nmax_queue_delay_us = 200\n"
    write_model(models, "mlp", mlp_model(), config_toml=config)
    server = server_factory(model_repo=models)
    report = tmp_path / "perf.csv"
    command = [
        str(binary), "-m", "mlp", "-u", server.target, "-i", "grpc",
        "--concurrency-range", f"{CONCURRENCY[0]}:{CONCURRENCY[-1]}:{CONCURRENCY[1] - 1}",
        "--measurement-interval", "500", "-s", "50", "-f", str(report),
        *(["--streaming"] if mode == "streaming" else []),
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in done.stdout.lower(), done.stdout

    with report.open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["Concurrency"]) for r in rows] == CONCURRENCY
    for row in rows:
        assert float(row["Inferences/Second"]) > 0
        assert int(row["Server Compute Infer"]) > 0, row
        assert int(row["Server Queue"]) > 0, row

    blocks = SERVER_BLOCK.findall(done.stdout)
    assert len(blocks) == len(CONCURRENCY), done.stdout
    for inferences, executions, succeeded, queue_us, infer_us in blocks:
        assert int(inferences) == int(succeeded) > 0
        assert 0 < int(executions) <= int(inferences)
        assert int(queue_us) > 0 and int(infer_us) > 0


def test_perf_analyzer_with_system_shared_memory(server_factory, tmp_path: Path) -> None:
    """`--shared-memory system`: perf_analyzer registers its own regions, sends every input and
    output through them, and unregisters them at its end."""
    binary, env = perf_analyzer()
    models = tmp_path / "models"
    write_model(models, "mlp", mlp_model())
    metrics_port = free_port()
    server = server_factory("--metrics-port", str(metrics_port), model_repo=models)
    command = [
        str(binary), "-m", "mlp", "-u", server.target, "-i", "grpc", "--shared-memory", "system",
        "--concurrency-range", "2", "--measurement-interval", "500", "-s", "50",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in done.stdout.lower(), done.stdout
    (succeeded,) = re.findall(r"Successful request count: (\d+)", done.stdout)
    assert int(succeeded) > 0
    calls = {
        (dict(labels)["method"].rsplit("/", 1)[1], dict(labels)["code"]): count
        for (name, labels), count in scrape(metrics_port).items()
        if name == "featureserve_rpc_requests_total"
    }
    assert calls[("SystemSharedMemoryRegister", "OK")] > 0, calls
    assert calls[("SystemSharedMemoryUnregister", "OK")] > 0, calls
    assert calls[("ModelInfer", "OK")] >= int(succeeded), calls
    assert {code for _, code in calls} == {"OK"}, calls


def test_perf_analyzer_on_an_ensemble(server_factory, tmp_path: Path) -> None:
    """perf_analyzer reads the ensemble's ensemble_scheduling to find its composing model and
    breaks the server time down from that model's ModelStatistics."""
    binary, env = perf_analyzer()
    models = tmp_path / "models"
    write_model(models, "mlp", mlp_model())
    (models / "ens" / "1").mkdir(parents=True)
    (models / "ens" / "config.toml").write_text(
        'platform = "ensemble"\nmax_batch_size = 8\n'
        '[[inputs]]\nname = "features"\ndtype = "FP32"\nshape = [-1, 32]\n'
        '[[outputs]]\nname = "score"\ndtype = "FP32"\nshape = [-1, 1]\n'
        '[[ensemble_scheduling.step]]\nmodel_name = "mlp"\n'
        'input_map = { x = "features" }\noutput_map = { y = "score" }\n'
    )
    server = server_factory(model_repo=models)
    command = [
        str(binary), "-m", "ens", "-u", server.target, "-i", "grpc",
        "--concurrency-range", "2", "--measurement-interval", "500", "-s", "50",
    ]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "error" not in done.stdout.lower(), done.stdout
    ensemble, composing = re.findall(r"Successful request count: (\d+)", done.stdout)
    assert int(ensemble) == int(composing) > 0, done.stdout
    assert "Composing models: \n  mlp, version: 1" in done.stdout, done.stdout
