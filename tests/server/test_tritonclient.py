"""NVIDIA's tritonclient (in its own cached venv: it needs newer grpcio, protobuf) against us."""

import asyncio
import json
import subprocess
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from benchmarks.model_zoo import add_sub_model, graph_model, mlp_model, write_model
from server.inference_servicer import start_server
from server.model_repository import ModelRepository
from server.tensors import bf16_to_float32
from tests.conftest import float32_to_bf16, wait_until
from tests.server.cached_venv import cached_venv

TRITONCLIENT = ["tritonclient[grpc]==2.73.0", "numpy"]

CLIENT_SCRIPT = r"""
import asyncio, json, queue, sys
import ml_dtypes
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

url, x_path = sys.argv[1], sys.argv[2]
x = np.load(x_path)
out = {}
client = grpcclient.InferenceServerClient(url)
out["live"] = client.is_server_live()
out["ready"] = client.is_server_ready() and client.is_model_ready("mlp")
out["server"] = client.get_server_metadata(as_json=True)
out["metadata"] = client.get_model_metadata("mlp", as_json=True)
out["config"] = client.get_model_config("simple", as_json=True)["config"]

def mlp_inputs(rows):
    i = grpcclient.InferInput("x", list(rows.shape), "FP32")
    i.set_data_from_numpy(rows)
    return [i]

result = client.infer("mlp", mlp_inputs(x), outputs=[grpcclient.InferRequestedOutput("y")])
out["sync"] = result.as_numpy("y").tolist()

a = np.arange(32, dtype=np.float32).reshape(2, 16)
ins = [grpcclient.InferInput(n, [2, 16], "FP32") for n in ("INPUT0", "INPUT1")]
ins[0].set_data_from_numpy(a)
ins[1].set_data_from_numpy(np.ones_like(a))
simple = client.infer("simple", ins)
out["simple"] = [simple.as_numpy("OUTPUT0").tolist(), simple.as_numpy("OUTPUT1").tolist()]
top2 = [grpcclient.InferRequestedOutput("OUTPUT0", class_count=2)]
top = client.infer("simple", ins, outputs=top2)
out["classes"] = [[v.decode() for v in row] for row in top.as_numpy("OUTPUT0")]
out["log_set"] = client.update_log_settings({"log_verbose_level": 1}, as_json=True)
out["log_get"] = client.get_log_settings(as_json=True)

half = grpcclient.InferInput("x", [2, 2], "BF16")
half.set_data_from_numpy(np.array([[1.5, -2.0], [0.15625, 1e30]], ml_dtypes.bfloat16))
bf16 = client.infer("bf16", [half])
out["bf16"] = [bf16.as_numpy("doubled").tolist(), bf16.as_numpy("same").astype(np.float32).tolist(),
               client.get_model_metadata("bf16", as_json=True)["inputs"][0]["datatype"]]

async def async_infer():
    async with aioclient.InferenceServerClient(url) as aclient:
        inp = aioclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        results = await asyncio.gather(*(aclient.infer("mlp", [inp]) for _ in range(4)))
        return [r.as_numpy("y").tolist() for r in results]
out["async"] = asyncio.run(async_infer())

responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
for i in range(len(x)):
    client.async_stream_infer("mlp", mlp_inputs(x[i : i + 1]), request_id=str(i))
client.async_stream_infer("nope", mlp_inputs(x[:1]), request_id="bad")
stream = []
for _ in range(len(x) + 1):
    result, error = responses.get(timeout=30)
    if error is not None:
        stream.append(["error", str(error)])
    else:
        stream.append([result.get_response().id, result.as_numpy("y").tolist()])
client.stop_stream()
out["stream"] = stream

async def async_stream():
    async with aioclient.InferenceServerClient(url) as aclient:
        async def requests():
            for i in range(len(x)):
                inp = aioclient.InferInput("x", [1, 32], "FP32")
                inp.set_data_from_numpy(x[i : i + 1])
                wanted = [aioclient.InferRequestedOutput("y")]
                yield {"model_name": "mlp", "inputs": [inp], "outputs": wanted,
                       "request_id": f"a{i}"}
            yield {"model_name": "nope", "inputs": [inp], "request_id": "bad"}
        answers = []
        async for result, error in aclient.stream_infer(requests(), stream_timeout=60):
            if error is not None:
                answers.append(["error", str(error)])
            else:
                answers.append([result.get_response().id, result.as_numpy("y").tolist()])
        return answers
out["async_stream"] = asyncio.run(async_stream())
out["stats"] = client.get_inference_statistics("mlp", as_json=True)
print(json.dumps(out))
"""


class BackgroundServer:
    """Our repository and inference server on a private event loop in a thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.port = 0
        self._started = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._run(),))

    async def _run(self) -> None:
        self._stop = asyncio.Event()
        repo = ModelRepository(self.path, watch=False)
        await repo.start()
        server, self.port = await start_server(repo)
        self._started.set()
        await self._stop.wait()
        await server.stop(None)
        await repo.stop()

    def __enter__(self) -> "BackgroundServer":
        self._thread.start()
        assert self._started.wait(60), "server did not start"
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(60)
        self._loop.close()


def test_tritonclient_sync_async_and_stream(tmp_path: Path) -> None:
    python = cached_venv("tritonclient-venv", TRITONCLIENT) / "bin" / "python"
    models = tmp_path / "models"
    mlp = mlp_model()
    write_model(models, "mlp", mlp, config_toml="[dynamic_batching]\nmax_queue_delay_us = 500\n")
    write_model(models, "simple", add_sub_model(16))
    x_bf16 = helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 2])
    doubled = helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["N", 2])
    same = helper.make_tensor_value_info("same", TensorProto.BFLOAT16, ["N", 2])
    nodes = [
        helper.make_node("Cast", ["x"], ["wide"], to=TensorProto.FLOAT),
        helper.make_node("Add", ["wide", "wide"], ["doubled"]),
        helper.make_node("Identity", ["x"], ["same"]),
    ]
    write_model(models, "bf16", graph_model(nodes, [x_bf16], [doubled, same]))
    x = np.random.default_rng(5).standard_normal((3, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    expected = ort.InferenceSession(mlp.SerializeToString()).run(None, {"x": x})[0]

    with BackgroundServer(models) as server:
        done = subprocess.run(
            [str(python), str(script), f"127.0.0.1:{server.port}", str(tmp_path / "x.npy")],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["live"] and out["ready"]
    assert out["server"]["name"] == "featureserve"
    assert out["metadata"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1", "32"]}]
    assert out["config"]["max_batch_size"] == 64
    assert out["config"]["input"][0]["data_type"] == "TYPE_FP32"
    np.testing.assert_allclose(out["sync"], expected, rtol=1e-5)
    for result in out["async"]:
        np.testing.assert_allclose(result, expected, rtol=1e-5)
    a = np.arange(32, dtype=np.float32).reshape(2, 16)
    np.testing.assert_array_equal(out["simple"][0], a + 1)
    np.testing.assert_array_equal(out["simple"][1], a - 1)
    assert out["classes"] == [["16.000000:15", "15.000000:14"], ["32.000000:15", "31.000000:14"]]
    for settings in (out["log_set"]["settings"], out["log_get"]["settings"]):
        assert settings["log_verbose_level"] == {"uint32_param": 1}
        assert settings["log_format"] == {"string_param": "json"}
    for stream, ids in (
        (out["stream"], ["0", "1", "2"]),
        (out["async_stream"], ["a0", "a1", "a2"]),
    ):
        assert [s[0] for s in stream] == [*ids, "error"]
        for i in range(3):
            np.testing.assert_allclose(stream[i][1], expected[i : i + 1], rtol=1e-5)
        assert "nope" in stream[3][1]
    bf16 = np.array([[1.5, -2.0], [0.15625, float(bf16_to_float32(float32_to_bf16(1e30)))]])
    assert out["bf16"] == [(2 * bf16).tolist(), bf16.tolist(), "BF16"]
    stats = out["stats"]["model_stats"][0]
    assert int(stats["inference_count"]) == 3 + 4 * 3 + 3 + 3


TRACE_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient

client = grpcclient.InferenceServerClient(sys.argv[1])
out = {"extensions": client.get_server_metadata(as_json=True)["extensions"]}
wanted = {"trace_level": ["TIMESTAMPS"], "trace_rate": "1"}
out["set"] = client.update_trace_settings("mlp", wanted, as_json=True)["settings"]
out["get"] = client.get_trace_settings("mlp", as_json=True)["settings"]
out["global"] = client.get_trace_settings(as_json=True)["settings"]
inp = grpcclient.InferInput("x", [1, 32], "FP32")
inp.set_data_from_numpy(np.ones((1, 32), np.float32))
client.infer("mlp", [inp], request_id="traced")
out["cleared"] = client.update_trace_settings("mlp", {"trace_level": None}, as_json=True)
print(json.dumps(out))
"""


def test_tritonclient_trace_settings(tmp_path: Path, server_factory) -> None:
    """update_trace_settings / get_trace_settings per model and globally; the request traced
    as it set is in the trace file."""
    python = cached_venv("tritonclient-venv", TRITONCLIENT) / "bin" / "python"
    write_model(tmp_path / "models", "mlp", mlp_model())
    server = server_factory()
    script = tmp_path / "trace.py"
    script.write_text(TRACE_SCRIPT)
    done = subprocess.run(
        [str(python), str(script), server.target], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert "trace" in out["extensions"]
    for settings in (out["set"], out["get"]):
        assert settings["trace_level"] == {"value": ["TIMESTAMPS"]}
        assert settings["trace_rate"] == {"value": ["1"]}
        assert settings["trace_count"] == {"value": ["-1"]}
    assert out["global"]["trace_level"] == {"value": ["OFF"]}
    assert out["cleared"]["settings"]["trace_level"] == {"value": ["OFF"]}
    trace_file = tmp_path / "data" / "trace.jsonl"
    assert wait_until(lambda: trace_file.exists() and trace_file.read_text())
    (record,) = [json.loads(line) for line in trace_file.read_text().splitlines()]
    assert record["request_id"] == "traced" and record["model_name"] == "mlp"
