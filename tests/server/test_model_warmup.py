"""Triton's model_warmup: samples run on every instance at load, before the version is READY."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest

from benchmarks.model_zoo import (
    add_sub_model,
    gather_model,
    identity_model,
    medium_model,
    mlp_model,
    write_model,
)
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from protos.inference import model_config_pb2 as mc
from tests.conftest import wait_until
from tests.server.test_inference_rpc import infer_request, output, serve

WARMED = "warmed up model"


def warmup_toml(*samples: str) -> str:
    """config.toml text of the given [[model_warmup]] bodies."""
    return "".join(f"[[model_warmup]]\n{body}\n" for body in samples)


def write_warmup_file(model_dir: Path, name: str, array: np.ndarray) -> None:
    """An input_data_file in the model's warmup/ folder: the array's raw little-endian bytes."""
    (model_dir / "warmup").mkdir(exist_ok=True)
    (model_dir / "warmup" / name).write_bytes(array.tobytes())


def index(response: pb.RepositoryIndexResponse) -> dict[str, tuple[str, str]]:
    """RepositoryIndex by model name: (state, reason) of its last entry."""
    return {m.name: (m.state, m.reason) for m in response.models}


def test_a_warmed_model_serves_reports_its_samples_and_counts_no_inference(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = mlp_model()
    write_model(
        tmp_path,
        "mlp",
        model,
        config_toml="[instance_group]\ncount = 2\n"
        + warmup_toml(
            'name = "zeros"\nbatch_size = 4\ncount = 3\n'
            '[model_warmup.inputs.x]\ndata_type = "TYPE_FP32"\nzero_data = true',
            'name = "noise"\n[model_warmup.inputs.x]\ndata_type = "FP32"\nrandom_data = true',
            'name = "defaults"',
        ),
    )
    simple_dir = write_model(
        tmp_path,
        "simple",
        add_sub_model(4),
        config_toml=warmup_toml(
            'name = "from file"\nbatch_size = 2\n'
            '[model_warmup.inputs.INPUT0]\ninput_data_file = "in0.bin"'
        ),
    )
    write_warmup_file(simple_dir, "in0.bin", np.arange(8, dtype=np.float32))
    write_model(tmp_path, "bare", mlp_model(seed=3))
    caplog.set_level(logging.INFO, logger="featureserve.models")
    x = np.linspace(-1, 1, 64, dtype=np.float32).reshape(2, 32)

    async def body(stub, repo) -> None:
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest())
        assert [(s.name, s.inference_count, s.execution_count) for s in stats.model_stats] == [
            ("bare", 0, 0),
            ("mlp", 0, 0),
            ("simple", 0, 0),
        ]
        config = (await stub.ModelConfig(pb.ModelConfigRequest(name="mlp"))).config
        samples = [(w.name, w.batch_size, w.count) for w in config.model_warmup]
        assert samples == [("zeros", 4, 3), ("noise", 1, 1), ("defaults", 1, 1)]
        kinds = ["zero_data", "random_data", "zero_data"]
        for warmup, kind in zip(config.model_warmup, kinds, strict=True):
            [(name, entry)] = warmup.inputs.items()
            assert (name, entry.data_type, list(entry.dims)) == ("x", mc.TYPE_FP32, [32])
            assert entry.WhichOneof("input_data_type") == kind
        simple = (await stub.ModelConfig(pb.ModelConfigRequest(name="simple"))).config
        [warmup] = simple.model_warmup
        assert warmup.inputs["INPUT0"].input_data_file == "in0.bin"
        # An input the sample leaves out gets zero data of its own dims.
        assert warmup.inputs["INPUT1"].zero_data and list(warmup.inputs["INPUT1"].dims) == [4]
        bare = (await stub.ModelConfig(pb.ModelConfigRequest(name="bare"))).config
        assert not bare.model_warmup
        response = await stub.ModelInfer(infer_request("mlp", {"x": x}))
        session = ort.InferenceSession(model.SerializeToString())
        np.testing.assert_allclose(output(response, "y"), session.run(["y"], {"x": x})[0])
        stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="mlp"))
        assert stats.model_stats[0].inference_count == 2

    serve(tmp_path, body)
    warmed = sorted(r.getMessage() for r in caplog.records if r.getMessage().startswith(WARMED))
    assert len(warmed) == 2
    # (3 + 1 + 1) runs on each of 2 instances; then 1 run on the one instance of "simple".
    assert "model mlp version 1 in" in warmed[0]
    assert warmed[0].endswith(": 10 runs of its 3 warmup sample(s) on 2 instance(s)")
    assert warmed[1].endswith(": 1 runs of its 1 warmup sample(s) on 1 instance(s)")


def x_sample(body: str, batch_size: int = 1) -> str:
    """One sample named "a" whose [model_warmup.inputs.x] table holds body."""
    return warmup_toml(f'name = "a"\nbatch_size = {batch_size}\n[model_warmup.inputs.x]\n{body}')


BYTES_MODEL = "strings"
WIDE_MODEL = "wide"
"""An FP32 identity model whose rows are of any width."""
UNBATCHED = "unbatched"
BAD_SAMPLES = [
    # (model, config.toml, what the reason must say: the key, then the fix)
    ("mlp", "model_warmup = 1\n", ["key 'model_warmup' must be list"]),
    (
        "mlp",
        warmup_toml("batch_size = 1"),
        ["model_warmup[0].name is missing", "give the sample a name"],
    ),
    (
        "mlp",
        warmup_toml('name = "a"', 'name = "a"'),
        ["model_warmup[1].name 'a'", "give every sample its own name"],
    ),
    ("mlp", warmup_toml('name = "a"\nrows = 2'), ["[model_warmup[0]] 'rows'", "allowed:"]),
    ("mlp", warmup_toml('name = "a"\ncount = 0'), ["model_warmup[0].count", "count = 1"]),
    ("mlp", warmup_toml('name = "a"\nbatch_size = -1'), ["model_warmup[0].batch_size", ">= 0"]),
    (
        "mlp",
        warmup_toml('name = "a"\nbatch_size = 65'),
        ["model_warmup[0].batch_size 65 is outside [1, max_batch_size=64]", "1 to 64 rows"],
    ),
    ("mlp", warmup_toml('name = "a"\nbatch_size = 0'), ["model_warmup[0].batch_size 0"]),
    (
        UNBATCHED,
        "max_batch_size = 0\n" + warmup_toml('name = "a"\nbatch_size = 2'),
        ["model_warmup[0].batch_size 2", "set batch_size = 1"],
    ),
    (
        "mlp",
        warmup_toml('name = "a"\n[model_warmup.inputs.z]\nzero_data = true'),
        ["model_warmup[0].inputs.z", "name one of x"],
    ),
    (
        "mlp",
        x_sample("zero_data = true\nrandom_data = true"),
        ["model_warmup[0].inputs.x needs exactly one of", "it has zero_data, random_data"],
    ),
    (
        "mlp",
        x_sample("dims = [32]"),
        ["model_warmup[0].inputs.x needs exactly one of", "it has none"],
    ),
    (
        "mlp",
        x_sample("zero_data = false"),
        ["model_warmup[0].inputs.x.zero_data = false", "write zero_data = true"],
    ),
    (
        "mlp",
        x_sample('zero_data = true\ndtype = "FP32"'),
        ["[model_warmup[0].inputs.x] 'dtype'", "data_type"],
    ),
    (
        "mlp",
        x_sample('data_type = "TYPE_FP64"\nzero_data = true'),
        ["model_warmup[0].inputs.x.data_type FP64 differs", 'data_type = "FP32"'],
    ),
    (
        "mlp",
        x_sample('data_type = "FLOAT"\nzero_data = true'),
        ["model_warmup[0].inputs.x.data_type 'FLOAT' is not a datatype", "use one of"],
    ),
    (
        "mlp",
        x_sample("dims = [31]\nzero_data = true"),
        ["model_warmup[0].inputs.x.dims [31] does not fit input 'x', whose dims are [32]"],
    ),
    (
        "mlp",
        x_sample("dims = [1, 32]\nzero_data = true"),
        ["model_warmup[0].inputs.x.dims [1, 32]", "the batch dimension is left out"],
    ),
    (
        "mlp",
        x_sample("dims = [-1]\nzero_data = true"),
        ["model_warmup[0].inputs.x.dims [-1]", "leave dims out"],
    ),
    (
        "mlp",
        x_sample('input_data_file = "../x.bin"'),
        ["model_warmup[0].inputs.x.input_data_file '../x.bin'", 'input_data_file = "x.bin"'],
    ),
    (
        "mlp",
        x_sample('input_data_file = "absent.bin"'),
        ["model_warmup[0].inputs.x.input_data_file: cannot read", "warmup/absent.bin"],
    ),
    (
        "mlp",
        x_sample('input_data_file = "x.bin"', batch_size=2),
        ["model_warmup[0].inputs.x.input_data_file", "needs 256 bytes", "or one row of dims [32]"],
    ),
    (
        BYTES_MODEL,
        warmup_toml('name = "a"\n[model_warmup.inputs.INPUT_BYTES]\nrandom_data = true'),
        ["model_warmup[0].inputs.INPUT_BYTES.random_data", "use zero_data = true"],
    ),
    (
        "mlp",
        x_sample('input_data_file = "x\\u0000.bin"'),
        ["model_warmup[0].inputs.x.input_data_file 'x\x00.bin' must name a file inside"],
    ),
    (
        WIDE_MODEL,
        warmup_toml(
            f'name = "a"\nbatch_size = 2\n[model_warmup.inputs.INPUT_FP32]\ndims = [{2**40}]\n'
            "zero_data = true"
        ),
        [
            f"model_warmup[0].inputs.INPUT_FP32.dims [{2**40}] x batch_size 2 takes "
            f"{2**43} bytes, over the 2147483647",
            "give smaller dims",
        ],
    ),
]


@pytest.mark.parametrize(("model", "toml", "needles"), BAD_SAMPLES)
def test_each_bad_warmup_key_fails_the_load_naming_it(
    tmp_path: Path, model: str, toml: str, needles: list[str]
) -> None:
    onnx_model = {
        BYTES_MODEL: lambda: identity_model(["BYTES"]),
        WIDE_MODEL: lambda: identity_model(["FP32"], "W"),
    }.get(model, mlp_model)()
    model_dir = write_model(tmp_path, model, onnx_model, config_toml=toml)
    write_warmup_file(model_dir, "x.bin", np.zeros(7, np.float32))
    write_model(tmp_path, "good", mlp_model())

    async def body(stub, repo) -> None:
        states = index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        state, reason = states[model]
        assert state == "UNAVAILABLE"
        assert str(model_dir / "config.toml") in reason
        for needle in needles:
            assert needle in reason
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name=model))).ready
        assert states["good"] == ("READY", "")

    serve(tmp_path, body)


@pytest.mark.parametrize(
    ("batch_size", "indices", "ready"),
    [
        (3, [[1], [2], [3]], True),  # the whole batch
        (3, [[4]], True),  # one row, repeated (Triton's reading)
        (3, [[1], [2], [10]], False),  # 10 is outside the 10-row table: ORT fails the run
        (1, [[-11]], False),
    ],
)
def test_a_sample_that_fails_in_onnx_runtime_fails_the_load_and_spares_the_others(
    tmp_path: Path, batch_size: int, indices: list[list[int]], ready: bool
) -> None:
    model_dir = write_model(
        tmp_path,
        "lookup",
        gather_model(),
        config_toml="[instance_group]\ncount = 2\n"
        + warmup_toml(
            'name = "zeros"',
            f'name = "indices"\nbatch_size = {batch_size}\n'
            '[model_warmup.inputs.idx]\ninput_data_file = "idx.bin"',
        ),
    )
    write_warmup_file(model_dir, "idx.bin", np.array(indices, np.int64))
    write_model(tmp_path, "mlp", mlp_model())

    async def body(stub, repo) -> None:
        states = index(await stub.RepositoryIndex(pb.RepositoryIndexRequest()))
        assert states["mlp"] == ("READY", "")
        response = await stub.ModelInfer(infer_request("mlp", {"x": np.ones((1, 32), np.float32)}))
        assert output(response, "y").shape == (1, 1)
        state, reason = states["lookup"]
        if ready:
            assert (state, reason) == ("READY", "")
            return
        assert state == "UNAVAILABLE"
        assert "model_warmup[1] 'indices' failed in ONNX Runtime on instance 0" in reason
        assert "indices element out of data bounds" in reason  # ONNX Runtime's own message
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="lookup"))).ready

    serve(tmp_path, body)


def test_a_reload_warms_again_off_the_event_loop(tmp_path: Path, server_factory) -> None:
    """Each load logs its warmup; ServerLive keeps answering while a long warmup runs."""
    repo = tmp_path / "models"
    count = 300  # medium model: ~1-2 ms a run, so the warmup takes about half a second
    write_model(
        repo,
        "medium",
        medium_model(),
        config_toml=warmup_toml(f'name = "zeros"\ncount = {count}'),
    )
    server = server_factory()

    def warmups() -> list[str]:
        return [e["msg"] for e in server.logs() if e["msg"].startswith(WARMED)]

    assert wait_until(lambda: len(warmups()) == 1)
    assert warmups()[0].endswith(f": {count} runs of its 1 warmup sample(s) on 1 instance(s)")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        done = threading.Event()
        call = stub.RepositoryModelLoad.future(
            pb.RepositoryModelLoadRequest(model_name="medium"), timeout=60
        )
        call.add_done_callback(lambda _: done.set())
        slowest = 0.0
        while not done.is_set():
            start = time.perf_counter()
            assert stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
            slowest = max(slowest, time.perf_counter() - start)
        call.result()
        assert wait_until(lambda: len(warmups()) == 2)
        assert slowest < 0.2, f"ServerLive took {slowest * 1e3:.0f} ms during the warmup"
        stats = stub.ModelStatistics(pb.ModelStatisticsRequest(name="medium"), timeout=10)
        assert stats.model_stats[0].inference_count == 0


ENDLESS = warmup_toml(f'name = "zeros"\ncount = {2**32 - 1}')
"""A warmup that would run for hours: only a stop can end it."""


def test_a_stop_cuts_a_long_warmup_short(tmp_path: Path, server_factory) -> None:
    """SIGTERM during a RepositoryModelLoad whose warmup runs on: the server stops within its
    grace (the warmup thread kept the process alive for good), and the load says why it ended."""
    write_model(tmp_path / "models", "slow", mlp_model(), config_toml=ENDLESS)
    server = server_factory("--model-control-mode", "explicit")
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        call = stub.RepositoryModelLoad.future(
            pb.RepositoryModelLoadRequest(model_name="slow"), timeout=60
        )
        assert not wait_until(call.done, timeout=1.0)  # warming up
        started = time.monotonic()
        assert server.terminate(timeout=30) == 0
    assert time.monotonic() - started < 15
    stopped = [e["msg"] for e in server.logs() if "stopped after" in e["msg"]]
    assert stopped and "model_warmup[0] 'zeros' stopped after" in stopped[0], server.log_lines


def test_a_stop_during_start_up_cuts_a_long_warmup_short(tmp_path: Path) -> None:
    """SIGTERM while a start-up load warms up abandons the start-up and exits at once."""
    write_model(tmp_path / "models", "slow", mlp_model(), config_toml=ENDLESS)
    cmd = [
        sys.executable, "-m", "server.cli", "serve", "--port", "0",
        "--data-dir", str(tmp_path / "data"), "--model-repo", str(tmp_path / "models"),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)
    reader.start()
    try:
        assert wait_until(lambda: any('"listening"' in line for line in lines), timeout=60)
        time.sleep(1.0)  # the start-up load reaches its endless warmup
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
    reader.join(5)
    assert any("abandoning start-up" in line for line in lines), lines
