"""Triton ensembles (server/ensemble.py): config checks, loading against the composing models,
execution through their batchers, and the RPCs, over a real server on the loopback."""

import asyncio
import json
import logging
import shutil
import subprocess
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from prometheus_client import REGISTRY

from benchmarks.model_zoo import gather_model, graph_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.errors import ModelUnavailableError
from server.model_config import ModelConfigError, parse_model_config
from server.model_control import GroupControl
from server.model_repository import ModelRepository
from tests.server.cached_venv import cached_venv
from tests.server.test_inference_rpc import infer_request, output, serve
from tests.server.test_model_repository import with_repository
from tests.server.test_tritonclient import TRITONCLIENT, BackgroundServer

RNG = np.random.default_rng(7)
W = RNG.standard_normal((4, 3)).astype(np.float32)
B = RNG.standard_normal(3).astype(np.float32)


def scale_model() -> bytes:
    """INPUT0 FP32 [N, 4] -> OUTPUT0 = INPUT0 * 2 + 1."""
    nodes = [
        helper.make_node("Mul", ["INPUT0", "two"], ["m"]),
        helper.make_node("Add", ["m", "one"], ["OUTPUT0"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(2, np.float32), "two"),
        numpy_helper.from_array(np.array(1, np.float32), "one"),
    ]
    tensor = helper.make_tensor_value_info
    return graph_model(
        nodes,
        [tensor("INPUT0", TensorProto.FLOAT, ["N", 4])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["N", 4])],
        inits,
    ).SerializeToString()


def shift_model(c: float) -> bytes:
    """INPUT0 FP32 [N, 4] -> OUTPUT0 = INPUT0 + c: scale_model's signature, other values."""
    nodes = [helper.make_node("Add", ["INPUT0", "c"], ["OUTPUT0"])]
    inits = [numpy_helper.from_array(np.array(c, np.float32), "c")]
    tensor = helper.make_tensor_value_info
    return graph_model(
        nodes,
        [tensor("INPUT0", TensorProto.FLOAT, ["N", 4])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["N", 4])],
        inits,
    ).SerializeToString()


def clf_model() -> bytes:
    """x FP32 [N, 4] -> y = softmax(x @ W + B) [N, 3]."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"]),
        helper.make_node("Add", ["h", "B"], ["z"]),
        helper.make_node("Softmax", ["z"], ["y"], axis=1),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")]
    tensor = helper.make_tensor_value_info
    return graph_model(
        nodes,
        [tensor("x", TensorProto.FLOAT, ["N", 4])],
        [tensor("y", TensorProto.FLOAT, ["N", 3])],
        inits,
    ).SerializeToString()


def ensemble_toml(
    steps: list[tuple[str, dict, dict]],
    inputs: list[tuple[str, str, list]],
    outputs: list[tuple[str, str, list]],
    max_batch_size: int = 16,
    extra: str = "",
) -> str:
    """An ensemble's config.toml from (model, input_map, output_map) steps and tensors."""

    def table(mapping: dict) -> str:
        return "{ " + ", ".join(f'{k} = "{v}"' for k, v in mapping.items()) + " }"

    lines = ['platform = "ensemble"', f"max_batch_size = {max_batch_size}", extra]
    for kind, tensors in (("inputs", inputs), ("outputs", outputs)):
        for name, dtype, shape in tensors:
            lines += [f"[[{kind}]]", f'name = "{name}"', f'dtype = "{dtype}"', f"shape = {shape}"]
    for model, input_map, output_map in steps:
        lines += [
            "[[ensemble_scheduling.step]]",
            f'model_name = "{model}"',
            f"input_map = {table(input_map)}",
            f"output_map = {table(output_map)}",
        ]
    return "\n".join(lines) + "\n"


def write_ensemble(repository: Path, name: str, config: str) -> None:
    """An ensemble folder: config.toml and an empty version folder 1/."""
    (repository / name / "1").mkdir(parents=True, exist_ok=True)
    (repository / name / "config.toml").write_text(config)


RAW = [("raw", "FP32", [-1, 4])]
PIPE = ensemble_toml(
    [
        ("scale", {"INPUT0": "raw"}, {"OUTPUT0": "scaled"}),
        ("clf", {"x": "scaled"}, {"y": "scores"}),
    ],
    RAW,
    [("scores", "FP32", [-1, 3])],
)
FAN = ensemble_toml(
    [("scale", {"INPUT0": "raw"}, {"OUTPUT0": "doubled"}), ("clf", {"x": "raw"}, {"y": "direct"})],
    RAW,
    [("doubled", "FP32", [-1, 4]), ("direct", "FP32", [-1, 3])],
)


def write_composing(repository: Path) -> None:
    """scale (batching with a 2 ms queue delay) and clf."""
    delay = "[dynamic_batching]\nmax_queue_delay_us = 2000\n"
    write_model(repository, "scale", scale_model(), config_toml=delay)
    write_model(repository, "clf", clf_model())


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> BackgroundServer:
    """One server: scale, clf, gather, slow (a 300 ms queue delay) and the ensembles pipe,
    fan, lookup (gather -> clf) and slowpipe (slow -> clf)."""
    models = tmp_path_factory.mktemp("models")
    write_composing(models)
    write_model(models, "gather", gather_model(10, 4))
    slow = "[dynamic_batching]\nmax_queue_delay_us = 300000\n"
    write_model(models, "slow", scale_model(), config_toml=slow)
    write_ensemble(models, "pipe", PIPE)
    write_ensemble(models, "fan", FAN)
    lookup = [("gather", {"idx": "idx"}, {"y": "row"}), ("clf", {"x": "row"}, {"y": "scores"})]
    scores = [("scores", "FP32", [-1, 3])]
    write_ensemble(models, "lookup", ensemble_toml(lookup, [("idx", "INT64", [-1, 1])], scores))
    slowpipe = [("slow", {"INPUT0": "raw"}, {"OUTPUT0": "s"}), ("clf", {"x": "s"}, {"y": "scores"})]
    write_ensemble(models, "slowpipe", ensemble_toml(slowpipe, RAW, scores))
    with BackgroundServer(models) as running:
        yield running


def stub_of(server: BackgroundServer) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def statistics(stub, name: str) -> pb.ModelStatistics:
    (stats,) = stub.ModelStatistics(pb.ModelStatisticsRequest(name=name)).model_stats
    return stats


def run_onnx(model: bytes, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_chain_and_fan_out_equal_onnxruntime_step_by_step(server) -> None:
    x = RNG.standard_normal((5, 4)).astype(np.float32)
    scaled = run_onnx(scale_model(), {"INPUT0": x})
    channel, stub = stub_of(server)
    with channel:
        pipe = stub.ModelInfer(infer_request("pipe", {"raw": x}))
        assert [o.name for o in pipe.outputs] == ["scores"] and pipe.model_name == "pipe"
        np.testing.assert_array_equal(output(pipe, "scores"), run_onnx(clf_model(), {"x": scaled}))
        fan = stub.ModelInfer(infer_request("fan", {"raw": x}))
        np.testing.assert_array_equal(output(fan, "doubled"), scaled)
        np.testing.assert_array_equal(output(fan, "direct"), run_onnx(clf_model(), {"x": x}))
        # A requested subset runs only the steps it needs: clf does not run for "doubled".
        before = statistics(stub, "clf").execution_count
        request = infer_request("fan", {"raw": x}, outputs=[{"name": "doubled"}])
        only = stub.ModelInfer(request)
        assert [o.name for o in only.outputs] == ["doubled"]
        assert statistics(stub, "clf").execution_count == before
        # Both outputs named in either order: answered in the order named, the same values.
        for names in (["direct", "doubled"], ["doubled", "direct"]):
            request = infer_request("fan", {"raw": x}, outputs=[{"name": n} for n in names])
            both = stub.ModelInfer(request)
            assert [o.name for o in both.outputs] == names
            np.testing.assert_array_equal(output(both, "doubled"), scaled)
            np.testing.assert_array_equal(output(both, "direct"), output(fan, "direct"))
        # Classification works on an ensemble output as on any model's.
        request = infer_request("pipe", {"raw": x[:1]})
        request.outputs.add(name="scores").parameters["classification"].int64_param = 1
        top = stub.ModelInfer(request)
        best = int(np.argmax(run_onnx(clf_model(), {"x": scaled[:1]})))
        assert top.raw_output_contents[0].endswith(f":{best}".encode())


def test_concurrent_requests_get_their_own_rows_and_batch_in_the_composing_model(server) -> None:
    rows = [np.full((1 + i % 3, 4), i, np.float32) for i in range(200)]

    async def main() -> list[pb.ModelInferResponse]:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [stub.ModelInfer(infer_request("pipe", {"raw": r})) for r in rows]
            return await asyncio.gather(*calls)

    channel, stub = stub_of(server)
    with channel:
        before = statistics(stub, "pipe").inference_count
        responses = asyncio.run(main())
        for x, response in zip(rows, responses, strict=True):
            expected = run_onnx(clf_model(), {"x": x * 2 + 1})
            np.testing.assert_array_equal(output(response, "scores"), expected)
        scale = statistics(stub, "scale")
        assert max(b.batch_size for b in scale.batch_stats) > 3, scale.batch_stats
        pipe = statistics(stub, "pipe")
        assert pipe.inference_count - before == sum(len(r) for r in rows)
        assert pipe.inference_stats.success.count >= 200 and pipe.last_inference > 0


def test_a_failing_step_fails_only_its_request_naming_the_step(server) -> None:
    good = np.array([[1], [2]], np.int64)

    async def main() -> list:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                stub.ModelInfer(infer_request("lookup", {"idx": idx}))
                for idx in (good, np.array([[99]], np.int64), good)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    ok, failed, ok_again = asyncio.run(main())
    table = np.arange(40, dtype=np.float32).reshape(10, 4)
    for response in (ok, ok_again):
        expected = run_onnx(clf_model(), {"x": table[[1, 2]]})
        np.testing.assert_array_equal(output(response, "scores"), expected)
    assert failed.code() == grpc.StatusCode.INTERNAL
    assert failed.details().startswith("ensemble 'lookup' step 0 (model 'gather'): ")
    channel, stub = stub_of(server)
    with channel:
        assert statistics(stub, "lookup").inference_stats.fail.count >= 1


def test_a_deadline_shorter_than_the_chain_is_deadline_exceeded(server) -> None:
    x = np.ones((1, 4), np.float32)
    channel, stub = stub_of(server)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(infer_request("slowpipe", {"raw": x}), timeout=0.1)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The dropped step held no queue slot: the next request runs the whole chain.
        response = stub.ModelInfer(infer_request("slowpipe", {"raw": x}), timeout=10)
        expected = run_onnx(clf_model(), {"x": x * 2 + 1})
        np.testing.assert_array_equal(output(response, "scores"), expected)


def test_model_config_metadata_and_index_of_an_ensemble(server) -> None:
    channel, stub = stub_of(server)
    with channel:
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="pipe"))
        assert meta.platform == "ensemble" and list(meta.versions) == ["1"]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
            ("raw", "FP32", [-1, 4])
        ]
        config = stub.ModelConfig(pb.ModelConfigRequest(name="pipe")).config
        assert config.platform == "ensemble" and config.max_batch_size == 16
        assert not config.backend and not config.instance_group
        steps = [
            (s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
            for s in config.ensemble_scheduling.step
        ]
        assert steps == [
            ("scale", -1, {"INPUT0": "raw"}, {"OUTPUT0": "scaled"}),
            ("clf", -1, {"x": "scaled"}, {"y": "scores"}),
        ]
        assert not stub.ModelConfig(
            pb.ModelConfigRequest(name="clf")
        ).config.ensemble_scheduling.step
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest())
        states = {(m.name, m.version): m.state for m in index.models}
        assert states[("pipe", "1")] == states[("fan", "1")] == "READY"
        assert stub.ModelReady(pb.ModelReadyRequest(name="fan")).ready


def test_tritonclient_against_an_ensemble(server, tmp_path: Path) -> None:
    python = cached_venv("tritonclient-venv", TRITONCLIENT) / "bin" / "python"
    script = tmp_path / "ensemble.py"
    script.write_text(
        "import json, sys\n"
        "import numpy as np\n"
        "import tritonclient.grpc as grpcclient\n"
        "client = grpcclient.InferenceServerClient(sys.argv[1])\n"
        "raw = grpcclient.InferInput('raw', [2, 4], 'FP32')\n"
        "raw.set_data_from_numpy(np.arange(8, dtype=np.float32).reshape(2, 4))\n"
        "result = client.infer('fan', [raw])\n"
        "config = client.get_model_config('fan', as_json=True)['config']\n"
        "print(json.dumps({'doubled': result.as_numpy('doubled').tolist(),\n"
        "    'direct': result.as_numpy('direct').tolist(), 'config': config}))\n"
    )
    done = subprocess.run(
        [str(python), str(script), f"127.0.0.1:{server.port}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(np.array(out["doubled"], np.float32), x * 2 + 1)
    np.testing.assert_array_equal(
        np.array(out["direct"], np.float32), run_onnx(clf_model(), {"x": x})
    )
    assert out["config"]["platform"] == "ensemble"
    steps = out["config"]["ensemble_scheduling"]["step"]
    assert [s["model_name"] for s in steps] == ["scale", "clf"]


GOOD_STEPS = [("scale", {"INPUT0": "raw"}, {"OUTPUT0": "scaled"})]
SCALED = [("scaled", "FP32", [-1, 4])]


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (
            'platform = "ensemble"\n[[inputs]]\nname = "raw"\ndtype = "FP32"\nshape = [4]\n'
            '[[outputs]]\nname = "o"\ndtype = "FP32"\nshape = [4]\n'
            "[ensemble_scheduling]\nstep = []\n",
            ["has no step", "add [[ensemble_scheduling.step]]"],
        ),
        (
            ensemble_toml([("scale", {"INPUT0": "nope"}, {"OUTPUT0": "scaled"})], RAW, SCALED),
            ["step[0] (model 'scale') input_map INPUT0 = \"nope\"", "map the input to one of"],
        ),
        (
            ensemble_toml(GOOD_STEPS * 2, RAW, SCALED),
            ["step[1] (model 'scale') output_map OUTPUT0 = \"scaled\"", "already writes 'scaled'"],
        ),
        (
            ensemble_toml([("scale", {"INPUT0": "raw"}, {"OUTPUT0": "raw"})], RAW, SCALED),
            ["step[0] (model 'scale') output_map OUTPUT0 = \"raw\"", "is an ensemble input"],
        ),
        (
            ensemble_toml(GOOD_STEPS, RAW, [*SCALED, ("gone", "FP32", [-1, 4])]),
            ["ensemble output 'gone' is written by no step", "map a step's output to it"],
        ),
        (
            ensemble_toml(GOOD_STEPS, [*RAW, ("spare", "FP32", [-1, 4])], SCALED),
            ["ensemble input 'spare' is not used by any step", "remove it from [[inputs]]"],
        ),
        (
            ensemble_toml(
                [
                    ("scale", {"INPUT0": "raw", "INPUT1": "b"}, {"OUTPUT0": "a"}),
                    ("clf", {"x": "a"}, {"y": "b"}),
                ],
                RAW,
                [("a", "FP32", [-1, 4])],
            ),
            ["the steps form a cycle", "step[0] (model 'scale') -> ", "break it"],
        ),
        (
            ensemble_toml(GOOD_STEPS, RAW, SCALED, extra="[dynamic_batching]"),
            ["key 'dynamic_batching' does not apply to an ensemble", "remove 'dynamic_batching'"],
        ),
        (
            ensemble_toml(GOOD_STEPS, RAW, SCALED, extra="[onnxruntime]"),
            ["key 'onnxruntime' does not apply to an ensemble", "remove 'onnxruntime'"],
        ),
        (
            ensemble_toml(GOOD_STEPS, RAW, SCALED).replace("ensemble", "tensorrt_plan", 1),
            ["platform 'tensorrt_plan' is not served here", '"ensemble"'],
        ),
        (
            "[[ensemble_scheduling.step]]\nmodel_name = 'a'\n",
            ["key 'ensemble_scheduling' belongs to ensembles", 'platform = "ensemble"'],
        ),
        (
            ensemble_toml([("scale", {}, {"OUTPUT0": "scaled"})], RAW, SCALED),
            ["step[0].input_map is missing or empty", "map at least one"],
        ),
        (
            ensemble_toml([("../outside/scale", *GOOD_STEPS[0][1:])], RAW, SCALED),
            ["step[0].model_name '../outside/scale' is not a model name", "has no '/'"],
        ),
        (
            ensemble_toml([(".", *GOOD_STEPS[0][1:])], RAW, SCALED),
            ["step[0].model_name '.' is not a model name", "not empty, '.' or '..'"],
        ),
    ],
)
def test_structural_config_errors_name_the_step_the_tensor_and_the_fix(config, expected) -> None:
    with pytest.raises(ModelConfigError) as caught:
        parse_model_config(config, source="e/config.toml", default_name="e")
    for part in expected:
        assert part in str(caught.value), str(caught.value)


def test_load_mismatches_fail_only_that_ensemble(tmp_path: Path) -> None:
    write_composing(tmp_path)
    write_model(tmp_path, "fixed", clf_model(), config_toml="max_batch_size = 0\n")
    cases = {
        "bad_input": (
            [("scale", {"IN": "raw"}, {"OUTPUT0": "scaled"})],
            RAW,
            SCALED,
            16,
            ["step[0] (model 'scale')", "names input 'IN'", "use one of INPUT0"],
        ),
        "bad_dtype": (
            GOOD_STEPS,
            [("raw", "FP64", [-1, 4])],
            SCALED,
            16,
            ["'INPUT0' mapped to ensemble tensor 'raw'", "FP32 there, FP64 here", "make ensemble"],
        ),
        "bad_shape": (
            GOOD_STEPS,
            [("raw", "FP32", [-1, 5])],
            SCALED,
            16,
            ["tensor 'raw': shapes differ", "give ensemble tensor 'raw' shape [-1, 4]"],
        ),
        "too_big": (
            GOOD_STEPS,
            RAW,
            SCALED,
            128,
            ["max_batch_size = 128 exceeds model 'scale''s 64", "lower the ensemble's"],
        ),
        "unbatched": (
            [("fixed", {"x": "raw"}, {"y": "out"})],
            RAW,
            [("out", "FP32", [-1, 3])],
            16,
            ["model 'fixed' does not batch", "set the ensemble's max_batch_size = 0"],
        ),
        "missing": (
            [("absent", {"x": "raw"}, {"y": "out"})],
            RAW,
            [("out", "FP32", [-1, 3])],
            16,
            ["step[0] (model 'absent')", "no model folder 'absent'", "fix model_name"],
        ),
    }
    for name, (steps, inputs, outputs, batch, _) in cases.items():
        write_ensemble(tmp_path, name, ensemble_toml(steps, inputs, outputs, batch))
    write_ensemble(tmp_path, "pipe", PIPE)

    async def check(repo: ModelRepository) -> None:
        index = {(s.name, s.version): s for s in repo.index()}
        for name, (*_, expected) in cases.items():
            entry = index[(name, "1")]
            assert entry.state == "UNAVAILABLE", entry
            for part in expected:
                assert part in entry.reason, entry.reason
            assert not repo.is_ready(name)
        with pytest.raises(ModelUnavailableError) as caught:
            repo.get("bad_dtype")
        message = str(caught.value)
        assert message.startswith("model 'bad_dtype' is not ready: version 1 is unavailable: ")
        assert "UNAVAILABLE" not in message
        assert repo.is_ready("pipe") and repo.is_ready("scale") and repo.is_ready("fixed")

    with_repository(tmp_path, check)


def test_an_ensemble_loads_once_its_composing_model_serves(tmp_path: Path) -> None:
    write_model(tmp_path, "clf", clf_model())
    write_ensemble(tmp_path, "pipe", PIPE)

    async def check(repo: ModelRepository) -> None:
        (entry,) = [s for s in repo.index() if s.name == "pipe"]
        assert entry.state == "UNAVAILABLE" and "no model folder 'scale'" in entry.reason
        write_model(tmp_path, "scale", scale_model())
        await repo.poll()
        assert repo.is_ready("pipe")

    with_repository(tmp_path, check)


def test_a_steps_version_is_checked_again_whenever_the_version_it_resolves_to_changes(
    tmp_path: Path,
) -> None:
    """Poll mode, scale serving every version: 1 does not fit pipe (OUTPUT0 is [N, 3]), 2
    does. Removing 2 stops pipe, naming the misfit; a version 3 that fits brings it back. A step
    pinned to a version that does not exist says so from start-up on, with no retry advice."""
    narrow = [helper.make_node("MatMul", ["INPUT0", "W"], ["OUTPUT0"])]
    tensor = helper.make_tensor_value_info
    narrow_model = graph_model(
        narrow,
        [tensor("INPUT0", TensorProto.FLOAT, ["N", 4])],
        [tensor("OUTPUT0", TensorProto.FLOAT, ["N", 3])],
        [numpy_helper.from_array(W, "W")],
    ).SerializeToString()
    every = "[version_policy]\nall = true\n"
    write_model(tmp_path, "scale", narrow_model, config_toml=every)
    write_model(tmp_path, "scale", scale_model(), version=2)
    write_model(tmp_path, "clf", clf_model())
    write_ensemble(tmp_path, "pipe", PIPE)
    pinned = PIPE.replace('model_name = "scale"', 'model_name = "scale"\nmodel_version = 7')
    write_ensemble(tmp_path, "pinned", pinned)

    async def check(repo: ModelRepository) -> None:
        index = {s.name: s for s in repo.index()}
        assert "model 'scale' has no version '7'; served: 1, 2" in index["pinned"].reason
        assert "fix model_name / model_version" in index["pinned"].reason
        assert "retry" not in index["pinned"].reason
        assert repo.is_ready("pipe")
        shutil.rmtree(tmp_path / "scale" / "2")
        await repo.poll()
        (entry,) = [s for s in repo.index() if s.name == "pipe"]
        assert entry.state == "UNAVAILABLE" and "shapes differ" in entry.reason, entry
        assert not repo.is_ready("pipe")
        write_model(tmp_path, "scale", scale_model(), version=3)
        await repo.poll()
        assert repo.is_ready("pipe")

    with_repository(tmp_path, check)


def test_unloading_a_composing_model_makes_the_ensemble_unavailable(tmp_path: Path) -> None:
    """Explicit mode: loading an ensemble loads its composing models; unloading one of them
    makes the ensemble UNAVAILABLE naming it until it loads again; unload_dependents unloads
    the composing models with the ensemble, through nested ensembles too."""
    write_composing(tmp_path)
    write_ensemble(tmp_path, "pipe", PIPE)
    scores = [("scores", "FP32", [-1, 3])]
    runs_pipe = [("pipe", {"raw": "raw"}, {"scores": "scores"})]
    write_ensemble(tmp_path, "outer", ensemble_toml(runs_pipe, RAW, scores))
    x = np.ones((2, 4), np.float32)

    async def body(stub, repo) -> None:
        ready = {m: repo.is_ready(m) for m in ("pipe", "scale", "clf")}
        assert ready == {"pipe": True, "scale": True, "clf": True}
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scale"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ModelInfer(infer_request("pipe", {"raw": x}))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "composing model 'scale' is not served" in caught.value.details()
        assert not (await stub.ModelReady(pb.ModelReadyRequest(name="pipe"))).ready
        index = await stub.RepositoryIndex(pb.RepositoryIndexRequest())
        (entry,) = [m for m in index.models if m.name == "pipe"]
        assert entry.state == "UNAVAILABLE" and "load 'scale'" in entry.reason
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"))
        response = await stub.ModelInfer(infer_request("pipe", {"raw": x}))
        expected = run_onnx(clf_model(), {"x": x * 2 + 1})
        np.testing.assert_array_equal(output(response, "scores"), expected)
        request = pb.RepositoryModelUnloadRequest(model_name="pipe")
        request.parameters["unload_dependents"].bool_param = True
        await stub.RepositoryModelUnload(request)
        assert not any(repo.is_ready(m) for m in ("pipe", "scale", "clf"))
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="pipe"))
        assert all(repo.is_ready(m) for m in ("pipe", "scale", "clf"))
        await stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="pipe"))
        assert not repo.is_ready("pipe") and repo.is_ready("scale") and repo.is_ready("clf")
        await stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="outer"))
        assert all(repo.is_ready(m) for m in ("outer", "pipe", "scale", "clf"))
        request = pb.RepositoryModelUnloadRequest(model_name="outer")
        request.parameters["unload_dependents"].bool_param = True
        await stub.RepositoryModelUnload(request)
        assert not any(repo.is_ready(m) for m in ("outer", "pipe", "scale", "clf"))

    serve(tmp_path, body, mode="explicit", startup_models=["pipe"])


def test_a_cycle_across_ensembles_is_refused_and_nothing_recurses(tmp_path: Path) -> None:
    """An ensemble that runs itself, directly or through others, would run without end: its
    load is refused naming the cycle, and the index and the other models keep working."""
    write_composing(tmp_path)
    scaled = [("scaled", "FP32", [-1, 4])]
    write_ensemble(tmp_path, "inner", ensemble_toml(GOOD_STEPS, RAW, scaled))
    runs_inner = [("inner", {"raw": "raw"}, {"scaled": "scaled"})]
    write_ensemble(tmp_path, "outer", ensemble_toml(runs_inner, RAW, scaled))
    runs_self = [("myself", {"raw": "raw"}, {"scaled": "scaled"})]
    write_ensemble(tmp_path, "myself", ensemble_toml(runs_self, RAW, scaled))

    async def check(repo: ModelRepository) -> None:
        assert repo.is_ready("outer")
        (entry,) = [s for s in repo.index() if s.name == "myself"]
        assert "steps form a cycle across ensembles: myself -> myself" in entry.reason
        runs_outer = [("outer", {"raw": "raw"}, {"scaled": "scaled"})]
        write_ensemble(tmp_path, "inner", ensemble_toml(runs_outer, RAW, scaled))
        await repo.poll()
        index = {s.name: s for s in repo.index()}
        assert "cycle across ensembles: inner -> outer -> inner" in index["inner"].reason
        assert "fix the step of 'outer' that runs 'inner'" in index["inner"].reason
        assert not repo.is_ready("inner") and not repo.is_ready("outer")
        assert repo.is_ready("scale")

    with_repository(tmp_path, check)


def test_the_response_cache_of_an_ensemble_drops_a_reloaded_composing_models_answers(
    tmp_path: Path,
) -> None:
    """A composing model reloaded with another model.onnx: its ensembles, and the ensembles
    that run those, answer from the new file, not from their cached answers."""
    write_model(tmp_path, "scale", scale_model())
    scaled = [("scaled", "FP32", [-1, 4])]
    cached = "response_cache = true"
    write_ensemble(tmp_path, "pipe", ensemble_toml(GOOD_STEPS, RAW, scaled, extra=cached))
    runs_pipe = [("pipe", {"raw": "raw"}, {"scaled": "scaled"})]
    write_ensemble(tmp_path, "outer", ensemble_toml(runs_pipe, RAW, scaled, extra=cached))
    x = np.ones((2, 4), np.float32)

    async def body(stub, repo) -> None:
        for name in ("pipe", "outer", "pipe", "outer"):  # the second round from the cache
            response = await stub.ModelInfer(infer_request(name, {"raw": x}))
            np.testing.assert_array_equal(output(response, "scaled"), x * 2 + 1)
        assert repo.get("pipe").batcher.stats.cache_hit.count == 1
        write_model(tmp_path, "scale", shift_model(5.0))
        await repo.poll()
        for name in ("pipe", "outer"):
            response = await stub.ModelInfer(infer_request(name, {"raw": x}))
            np.testing.assert_array_equal(output(response, "scaled"), x + 5)

    serve(tmp_path, body, response_cache_bytes=1_000_000)


def test_a_workers_group_loads_rechecks_and_unloads_ensembles_on_every_worker(
    tmp_path: Path,
) -> None:
    """Explicit mode, two workers of a group (in this process): loading an ensemble on one
    loads its composing models on both; a composing model reloaded so that the ensemble no
    longer fits stops it on both, and fixed, brings it back on both; unload_dependents
    unloads all three on both."""
    models = tmp_path / "models"
    write_composing(models)
    write_ensemble(models, "pipe", PIPE)
    folder = tmp_path / "group"
    folder.mkdir()
    groups = []
    for worker in (0, 1):
        repository = ModelRepository(models, mode="explicit")
        repository.group = GroupControl(repository, folder, worker, 2)
        groups.append(repository.group)
    a, b = groups

    def ready(group: GroupControl) -> dict[str, bool]:
        return {m: group.repository.is_ready(m) for m in ("pipe", "scale", "clf")}

    async def main() -> None:
        await a.start()
        await b.start()
        try:
            await a.load("pipe", lambda: 30.0)
            assert ready(a) == ready(b) == {"pipe": True, "scale": True, "clf": True}
            write_model(models, "scale", clf_model())  # no INPUT0: pipe no longer fits
            await a.load("scale", lambda: 30.0)
            for group in (a, b):
                (entry,) = [s for s in group.repository.index() if s.name == "pipe"]
                assert entry.state == "UNAVAILABLE" and "names input 'INPUT0'" in entry.reason
            write_model(models, "scale", shift_model(1.0))
            await a.load("scale", lambda: 30.0)
            assert ready(a) == ready(b) == {"pipe": True, "scale": True, "clf": True}
            await a.unload("pipe", lambda: 30.0, dependents=True)
            assert ready(a) == ready(b) == {"pipe": False, "scale": False, "clf": False}
        finally:
            for group in (a, b):
                await group.stop()
                await group.repository.stop()

    asyncio.run(main())


def test_prometheus_counts_an_ensembles_requests_and_its_steps_batches_on_their_models(
    server,
) -> None:
    """An ensemble runs no batch of its own: its requests and rows count on it, its steps'
    batches and ONNX Runtime time on the composing models only."""

    def sample(family: str, model: str) -> float:
        labels = {"model": model, "version": "1"}
        return REGISTRY.get_sample_value(family, labels) or 0.0

    families = ["featureserve_model_requests_total", "featureserve_model_batches_total"]
    before = {(f, m): sample(f, m) for f in families for m in ("pipe", "clf")}
    channel, stub = stub_of(server)
    with channel:
        for _ in range(5):
            stub.ModelInfer(infer_request("pipe", {"raw": np.ones((2, 4), np.float32)}))
    grew = {key: sample(*key) - value for key, value in before.items()}
    assert grew[("featureserve_model_requests_total", "pipe")] == 5
    assert grew[("featureserve_model_batches_total", "pipe")] == 0
    assert grew[("featureserve_model_batches_total", "clf")] >= 1


def test_a_step_pinned_to_a_version_the_policy_drops_logs_the_stop_and_the_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """scale serves 1 and 2; pin1 runs scale version 1. A version_policy that drops 1 stops
    pin1 (logged once, naming the versions served and the fix); restoring it restarts it."""
    write_model(tmp_path, "scale", scale_model(), config_toml="[version_policy]\nall = true\n")
    write_model(tmp_path, "scale", scale_model(), version=2)
    write_model(tmp_path, "clf", clf_model())
    write_ensemble(tmp_path, "pin1", PIPE.replace('"scale"', '"scale"\nmodel_version = 1', 1))

    async def check(repo: ModelRepository) -> None:
        assert repo.is_ready("pin1")
        (tmp_path / "scale" / "config.toml").write_text("[version_policy]\nlatest = 1\n")
        with caplog.at_level(logging.INFO, logger="featureserve.models"):
            await repo.poll()
            (entry,) = [s for s in repo.index() if s.name == "pin1"]
            assert entry.state == "UNAVAILABLE"
            assert "version 1 is not served (it serves 2)" in entry.reason
            assert "fix the step's model_version, or the version_policy of 'scale'" in entry.reason
            (tmp_path / "scale" / "config.toml").write_text("[version_policy]\nall = true\n")
            await repo.poll()
            assert repo.is_ready("pin1")
        lines = [r.getMessage() for r in caplog.records if "pin1" in r.getMessage()]
        assert len([line for line in lines if "is not ready" in line]) == 1, lines
        assert len([line for line in lines if "serves again" in line]) == 1, lines

    with_repository(tmp_path, check)
