"""Triton's system shared-memory extension (server/shared_memory.py): regions of real /dev/shm
objects registered over gRPC, tensors read from and written to them by ModelInfer and
ModelStreamInfer, and the registrations of a `--workers` group shared by every worker."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
from collections.abc import Iterator
from multiprocessing import shared_memory
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from benchmarks.model_zoo import add_sub_model, identity_model, mlp_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server import shared_memory as shm_module
from server.errors import ServerError, status_for
from server.message_size import MessageLimit
from server.shared_memory import BYTE_SIZE, OFFSET, REGION, SHM_DIR, SharedMemoryRegistry
from server.tensors import encode_bytes_elements
from tests.conftest import wait_until
from tests.server.cached_venv import cached_venv
from tests.server.test_inference_rpc import output, serve
from tests.server.test_model_control_workers import (
    live_workers,
    on_fresh_channels,
    served,
    serving,
)
from tests.server.test_tritonclient import TRITONCLIENT, BackgroundServer

FP32 = np.arange(6, dtype=np.float32).reshape(2, 3) * 1.5
INT64 = np.array([[2**40, -1, 7], [0, 1, -(2**62)]], np.int64)
TEXT = [["a", "bé", ""], ["xyz", "", "q"]]
BOOL = np.array([[True, False, True], [False, False, True]])
TEXT_BYTES = encode_bytes_elements([s.encode() for row in TEXT for s in row])


class ShmObject:
    """A real POSIX shared-memory object, as a client creates it."""

    def __init__(self, size: int) -> None:
        self.shm = shared_memory.SharedMemory(create=True, size=size)
        self.key = "/" + self.shm.name

    def write(self, offset: int, data: bytes) -> None:
        self.shm.buf[offset : offset + len(data)] = data

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.shm.buf[offset : offset + size])

    def close(self) -> None:
        self.shm.close()
        self.shm.unlink()


@pytest.fixture
def objects() -> Iterator:
    """make(size) -> a new ShmObject; all are unlinked at teardown."""
    made: list[ShmObject] = []

    def make(size: int) -> ShmObject:
        made.append(ShmObject(size))
        return made[-1]

    yield make
    for obj in made:
        obj.close()


def register(name: str, key: str, byte_size: int, offset: int = 0):
    return pb.SystemSharedMemoryRegisterRequest(
        name=name, key=key, offset=offset, byte_size=byte_size
    )


def shm_params(parameters, region: str, byte_size: int | None, offset: int = 0) -> None:
    parameters[REGION].string_param = region
    if byte_size is not None:
        parameters[BYTE_SIZE].int64_param = byte_size
    if offset:
        parameters[OFFSET].int64_param = offset


def shm_input(request, name, datatype, shape, region, byte_size, offset=0):
    tensor = request.inputs.add(name=name, datatype=datatype, shape=shape)
    shm_params(tensor.parameters, region, byte_size, offset)
    return tensor


def shm_output(request, name, region, byte_size, offset=0):
    tensor = request.outputs.add(name=name)
    shm_params(tensor.parameters, region, byte_size, offset)
    return tensor


async def refused(call, request) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(request)
    return info.value


def identity_request(region: str, layout: dict[str, tuple[int, int]]) -> pb.ModelInferRequest:
    """A request to identity model "id" with each input INPUT_<dt> in `region` at layout[dt]."""
    request = pb.ModelInferRequest(model_name="id", id="r1")
    for dt, (offset, size) in layout.items():
        shm_input(request, f"INPUT_{dt}", dt, [2, 3], region, size, offset)
    return request


def test_inputs_and_outputs_round_trip_through_shared_memory(tmp_path: Path, objects) -> None:
    """FP32, INT64, BYTES and BOOL inputs at offsets of a region that itself starts 16 bytes into
    its object; three outputs written into another region, BYTES answered in raw contents, whose
    entries stay aligned with outputs as tritonclient's as_numpy reads them."""
    write_model(tmp_path, "id", identity_model(["FP32", "INT64", "BYTES", "BOOL"]))
    source, target = objects(4096), objects(1024)
    layout = {"FP32": (0, 24), "INT64": (64, 48), "BYTES": (128, len(TEXT_BYTES)), "BOOL": (512, 6)}
    data = {"FP32": FP32.tobytes(), "INT64": INT64.tobytes(), "BYTES": TEXT_BYTES}
    data["BOOL"] = BOOL.tobytes()
    for dt, (offset, _) in layout.items():
        source.write(16 + offset, data[dt])
    target.write(0, b"\xee" * 1024)

    async def body(stub, repo) -> None:
        meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
        assert "system_shared_memory" in meta.extensions
        await stub.SystemSharedMemoryRegister(register("in", source.key, 2048, offset=16))
        await stub.SystemSharedMemoryRegister(register("out", target.key, 1024))
        request = identity_request("in", layout)
        shm_output(request, "OUTPUT_FP32", "out", 100)
        request.outputs.add(name="OUTPUT_BYTES")
        shm_output(request, "OUTPUT_INT64", "out", 48, offset=128)
        shm_output(request, "OUTPUT_BOOL", "out", 6, offset=256)
        response = await stub.ModelInfer(request)

        assert response.id == "r1"
        names = [o.name for o in response.outputs]
        assert names == ["OUTPUT_FP32", "OUTPUT_BYTES", "OUTPUT_INT64", "OUTPUT_BOOL"]
        assert list(response.raw_output_contents) == [b"", TEXT_BYTES, b"", b""]
        params = {o.name: dict(o.parameters) for o in response.outputs}
        assert params["OUTPUT_BYTES"] == {}
        assert params["OUTPUT_FP32"][REGION].string_param == "out"
        assert params["OUTPUT_FP32"][BYTE_SIZE].int64_param == 24  # written, of 100 allowed
        assert OFFSET not in params["OUTPUT_FP32"]
        assert params["OUTPUT_INT64"][OFFSET].int64_param == 128
        assert params["OUTPUT_BOOL"][BYTE_SIZE].int64_param == 6
        assert all(list(o.shape) == [2, 3] for o in response.outputs)
        out = np.frombuffer(target.read(0, 24), np.float32).reshape(2, 3)
        np.testing.assert_array_equal(out, FP32)
        assert target.read(24, 4) == b"\xee" * 4  # nothing past the output
        assert np.frombuffer(target.read(128, 48), np.int64).reshape(2, 3).tolist() == (
            INT64.tolist()
        )
        assert target.read(256, 6) == bytes([1, 0, 1, 0, 0, 1])

    serve(tmp_path, body)


def test_shared_memory_and_raw_tensors_mix_in_one_request(tmp_path: Path, objects) -> None:
    """raw_input_contents holds entries only for the inputs not in shared memory, in order,
    whichever input is in shared memory; outputs mix the same way."""
    write_model(tmp_path, "simple", add_sub_model(4))
    obj = objects(256)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 10, np.float32)
    obj.write(32, a.tobytes())

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("r", obj.key, 256))
        for first_in_memory in (True, False):
            request = pb.ModelInferRequest(model_name="simple")
            names = ("INPUT0", "INPUT1") if first_in_memory else ("INPUT1", "INPUT0")
            shm_input(request, names[0], "FP32", [2, 4], "r", 32, offset=32)
            request.inputs.add(name=names[1], datatype="FP32", shape=[2, 4])
            request.raw_input_contents.append(b.tobytes())
            request.outputs.add(name="OUTPUT1")
            shm_output(request, "OUTPUT0", "r", 32, offset=128)
            response = await stub.ModelInfer(request)
            expected = (a - b) if first_in_memory else (b - a)
            np.testing.assert_array_equal(output(response, "OUTPUT1"), expected)
            assert response.raw_output_contents[1] == b""
            in_region = np.frombuffer(obj.read(128, 32), np.float32).reshape(2, 4)
            np.testing.assert_array_equal(in_region, a + b)

    serve(tmp_path, body)


def test_register_refusals_name_the_key_or_field(tmp_path: Path, objects) -> None:
    obj = objects(100)
    outside = tmp_path / "outside"
    outside.write_bytes(b"x" * 100)
    link = SHM_DIR / f"fs-test-link-{os.getpid()}"
    link.symlink_to(outside)
    missing = f"/fs-test-missing-{os.getpid()}"
    cases = [
        (register("a", "/x/../../etc/passwd", 10), "INVALID_ARGUMENT", "key '/x/../../etc/passwd'"),
        (register("a", "/a/b", 10), "INVALID_ARGUMENT", "is not a shared-memory object name"),
        (register("a", "..", 10), "INVALID_ARGUMENT", "key '..'"),
        (register("a", "/x\0y", 10), "INVALID_ARGUMENT", "without '/' or NUL, other than"),
        (register("a", "//.", 10), "INVALID_ARGUMENT", "key '//.'"),
        (register("a", "", 10), "INVALID_ARGUMENT", "key ''"),
        (
            register("a", missing, 10),
            "INVALID_ARGUMENT",
            f"no shared-memory object /dev/shm{missing}",
        ),
        (register("a", missing, 10), "INVALID_ARGUMENT", "create it first"),
        (register("a", "/" + link.name, 10), "INVALID_ARGUMENT", "it is a symbolic link"),
        (register("a", obj.key, 0), "INVALID_ARGUMENT", "byte_size is 0; give the region's size"),
        (register("a", obj.key, 0), "INVALID_ARGUMENT", "holds 100 bytes"),
        (
            register("a", obj.key, 60, offset=50),
            "INVALID_ARGUMENT",
            f"offset 50 + byte_size 60 = 110 passes the end of object '{obj.key}', which holds "
            "100 bytes; register at most 50 bytes from offset 50",
        ),
        (register("", obj.key, 10), "INVALID_ARGUMENT", "name is empty"),
        (register("taken", obj.key, 10), "ALREADY_EXISTS", "named 'taken' is already registered"),
    ]

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("taken", obj.key, 100))
        for request, code, needle in cases:
            error = await refused(stub.SystemSharedMemoryRegister, request)
            assert error.code().name == code, (request, error.details())
            assert needle in error.details(), error.details()
        status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
        assert list(status.regions) == ["taken"]

    try:
        serve(tmp_path, body)
    finally:
        link.unlink()


def test_infer_refusals_name_the_tensor_and_parameter(tmp_path: Path, objects) -> None:
    """Every refusal is INVALID_ARGUMENT naming the input or output and the parameter; inputs
    from shared memory pass the same checks as raw contents; an output too big for its span
    fails before anything is written, and the model never runs (an output whose size the
    config fixes is refused before the request joins a batch)."""
    write_model(tmp_path, "id", identity_model(["FP32", "BYTES", "BOOL"]))
    write_model(tmp_path, "pair", identity_model(["FP32", "BOOL"]))
    obj = objects(256)
    obj.write(0, FP32.tobytes())
    obj.write(64, bytes([1, 0, 2, 0, 1, 1]))
    obj.write(96, TEXT_BYTES[:-1])
    fp32 = {"FP32": (0, 24)}

    def request(layout=fp32, **kwargs) -> pb.ModelInferRequest:
        made = identity_request("r", layout)
        made.MergeFrom(pb.ModelInferRequest(**kwargs))
        return made

    typed = request()
    typed.inputs[0].contents.fp32_contents.extend(FP32.ravel().tolist())
    raw_too = request(raw_input_contents=[FP32.tobytes()])
    raw_short = request(raw_input_contents=[BOOL.tobytes()])
    raw_short.inputs.add(name="INPUT_BOOL", datatype="BOOL", shape=[2, 3])
    raw_short.inputs.add(name="INPUT_BYTES", datatype="BYTES", shape=[2, 3])
    unknown = identity_request("nope", fp32)
    beyond = identity_request("r", {"FP32": (240, 24)})
    no_size = pb.ModelInferRequest(model_name="id")
    shm_input(no_size, "INPUT_FP32", "FP32", [2, 3], "r", None)
    offset_alone = pb.ModelInferRequest(model_name="id")
    offset_alone.inputs.add(name="INPUT_FP32", datatype="FP32", shape=[2, 3])
    offset_alone.inputs[0].parameters[OFFSET].int64_param = 8
    offset_alone.raw_input_contents.append(FP32.tobytes())
    wrong_kind = request()
    wrong_kind.inputs[0].parameters[BYTE_SIZE].string_param = "24"
    short = identity_request("r", {"FP32": (0, 20)})
    bad_bool = identity_request("r", {"BOOL": (64, 6)})
    bad_bytes = identity_request("r", {"BYTES": (96, len(TEXT_BYTES) - 1)})
    too_small = request(model_name="pair")
    shm_output(too_small, "OUTPUT_FP32", "r", 100, offset=128)
    shm_output(too_small, "OUTPUT_BOOL", "r", 5, offset=200)
    too_small.inputs.add(name="INPUT_BOOL", datatype="BOOL", shape=[2, 3])
    too_small.raw_input_contents.append(BOOL.tobytes())
    cases = [
        (typed, "input 'INPUT_FP32': both parameter 'shared_memory_region' and typed contents"),
        (raw_too, "input 'INPUT_FP32': both parameter 'shared_memory_region' and a raw entry"),
        (raw_short, "raw_input_contents has 1 entries for the 2 inputs not in shared memory "
         "(of 3); send one per input not in shared memory, in order"),
        (unknown, "input 'INPUT_FP32': parameter 'shared_memory_region' names region 'nope', "
         "which is not registered"),
        (beyond, "input 'INPUT_FP32': parameters 'shared_memory_offset' 240 + "
         "'shared_memory_byte_size' 24 = 264 pass the end of region 'r' (256 bytes)"),
        (no_size, "input 'INPUT_FP32': parameter 'shared_memory_region' needs parameter "
         "'shared_memory_byte_size'"),
        (offset_alone, "input 'INPUT_FP32': parameter 'shared_memory_offset' needs parameter "
         "'shared_memory_region'"),
        (wrong_kind, "input 'INPUT_FP32': parameter 'shared_memory_byte_size' must be int64_param"),
        (short, "input 'INPUT_FP32': parameter 'shared_memory_byte_size' is 20, but shape "
         "[2, 3] of FP32 takes 24 bytes (6 x 4); set 'shared_memory_byte_size' to 24"),
        (bad_bool, "input 'INPUT_BOOL': BOOL shared-memory contents ('shared_memory_byte_size' 6 "
         "of region 'r') element 2 is byte 2"),
        (bad_bytes, "input 'INPUT_BYTES': BYTES shared-memory contents ('shared_memory_byte_"
         "size' 31 of region 'r') element 5 declares 1 bytes but only 0 remain"),
        (too_small, "output 'OUTPUT_BOOL': parameter 'shared_memory_byte_size' is 5, but the "
         "output (shape [2, 3] of BOOL) takes 6 bytes; set 'shared_memory_byte_size' to at "
         "least 6"),
    ]  # fmt: skip

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("r", obj.key, 256))
        before = obj.read(0, 256)
        for sent, needle in cases:
            error = await refused(stub.ModelInfer, sent)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert needle in error.details(), error.details()
        assert obj.read(0, 256) == before  # OUTPUT_FP32 fitted, but was not written either
        assert repo.get("id").batcher.stats.execution_count == 0
        stats = repo.get("pair").batcher.stats
        assert (stats.execution_count, stats.success.count) == (0, 0)

    serve(tmp_path, body)


def test_status_and_unregister_follow_triton(tmp_path: Path, objects) -> None:
    """Status lists every region (one by name, NOT_FOUND for another); Unregister of an unknown
    name answers OK (tritonclient raises on any error, and clients unregister to clean up);
    an empty name unregisters all; the server never unlinks an object."""
    write_model(tmp_path, "simple", add_sub_model(4))
    first, second = objects(64), objects(128)
    first.write(0, np.ones((2, 4), np.float32).tobytes())
    first.write(32, np.ones((2, 4), np.float32).tobytes())

    def infer() -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "a", 32)
        shm_input(request, "INPUT1", "FP32", [2, 4], "a", 32, offset=32)
        return request

    async def body(stub, repo) -> None:
        Status = pb.SystemSharedMemoryStatusRequest
        await stub.SystemSharedMemoryRegister(register("a", first.key, 64))
        await stub.SystemSharedMemoryRegister(register("b", second.key, 100, offset=28))
        everything = await stub.SystemSharedMemoryStatus(Status())
        assert {
            n: (r.name, r.key, r.offset, r.byte_size) for n, r in everything.regions.items()
        } == {
            "a": ("a", first.key, 0, 64),
            "b": ("b", second.key, 28, 100),
        }
        assert list((await stub.SystemSharedMemoryStatus(Status(name="b"))).regions) == ["b"]
        error = await refused(stub.SystemSharedMemoryStatus, Status(name="c"))
        assert error.code() == grpc.StatusCode.NOT_FOUND and "'c'" in error.details()
        np.testing.assert_array_equal(output(await stub.ModelInfer(infer()), "OUTPUT0"), 2)

        Unregister = pb.SystemSharedMemoryUnregisterRequest
        await stub.SystemSharedMemoryUnregister(Unregister(name="never-registered"))
        await stub.SystemSharedMemoryUnregister(Unregister(name="a"))
        assert list((await stub.SystemSharedMemoryStatus(Status())).regions) == ["b"]
        error = await refused(stub.ModelInfer, infer())
        assert "names region 'a', which is not registered" in error.details()
        # The name is free again, for another object.
        await stub.SystemSharedMemoryRegister(register("a", second.key, 64))
        await stub.SystemSharedMemoryUnregister(Unregister())
        assert not (await stub.SystemSharedMemoryStatus(Status())).regions
        assert Path(SHM_DIR, first.shm.name).exists() and Path(SHM_DIR, second.shm.name).exists()

    serve(tmp_path, body)


def test_a_queued_request_keeps_its_bytes_and_an_unregistered_output_is_not_written(
    tmp_path: Path, objects
) -> None:
    """Inputs are copied when the request is decoded: rewriting the region and unregistering it
    while the request waits in the queue changes nothing. An output region unregistered while
    its request ran is FAILED_PRECONDITION, and nothing is written into it."""
    write_model(
        tmp_path,
        "simple",
        add_sub_model(4),
        config_toml="[dynamic_batching]\nmax_queue_delay_us = 300000\n",
    )
    obj = objects(128)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    obj.write(0, a.tobytes())
    obj.write(32, a.tobytes())
    obj.write(64, b"\xee" * 64)

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("in", obj.key, 64))
        await stub.SystemSharedMemoryRegister(register("out", obj.key, 64, offset=64))
        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "in", 32)
        shm_input(request, "INPUT1", "FP32", [2, 4], "in", 32, offset=32)
        raw_answer = pb.ModelInferRequest()
        raw_answer.CopyFrom(request)
        shm_output(request, "OUTPUT0", "out", 32)
        calls = [asyncio.ensure_future(stub.ModelInfer(r)) for r in (raw_answer, request)]
        while repo.get("simple").batcher.queued < 2:  # both decoded, waiting out the delay
            await asyncio.sleep(0.001)
        obj.write(0, np.zeros(16, np.float32).tobytes())
        await stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest())
        answered = await calls[0]
        np.testing.assert_array_equal(output(answered, "OUTPUT0"), a + a)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await calls[1]
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "output 'OUTPUT0': region 'out' was unregistered" in info.value.details()
        assert obj.read(64, 64) == b"\xee" * 64

    serve(tmp_path, body)


def test_the_response_cache_keys_shared_memory_inputs_by_their_bytes(
    tmp_path: Path, objects
) -> None:
    """Same region, same parameters, other bytes: a miss with the new answer; the first bytes
    again: a hit, whose outputs are written into the request's region."""
    write_model(tmp_path, "simple", add_sub_model(4), config_toml="response_cache = true\n")
    obj = objects(128)
    a, b = np.ones((2, 4), np.float32), np.full((2, 4), 5, np.float32)

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("r", obj.key, 128))
        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "r", 32)
        shm_input(request, "INPUT1", "FP32", [2, 4], "r", 32, offset=32)
        shm_output(request, "OUTPUT0", "r", 32, offset=64)
        for x, hits in ((a, 0), (b, 0), (a, 1)):
            obj.write(0, x.tobytes())
            obj.write(32, x.tobytes())
            obj.write(64, bytes(32))
            await stub.ModelInfer(request)
            written = np.frombuffer(obj.read(64, 32), np.float32).reshape(2, 4)
            np.testing.assert_array_equal(written, x + x)
            assert repo.get("simple").batcher.stats.cache_hit.count == hits

    serve(tmp_path, body, response_cache_bytes=1 << 20)


def test_a_stream_reads_and_writes_shared_memory_and_answers_errors_in_place(
    tmp_path: Path, objects
) -> None:
    write_model(tmp_path, "simple", add_sub_model(4))
    obj = objects(1024)
    rows = [np.full((1, 4), i, np.float32) for i in range(4)]
    for i, x in enumerate(rows):
        obj.write(32 * i, x.tobytes())

    def request(i: int, region: str = "r") -> pb.ModelInferRequest:
        made = pb.ModelInferRequest(model_name="simple", id=f"s{i}")
        shm_input(made, "INPUT0", "FP32", [1, 4], region, 16, offset=32 * i)
        shm_input(made, "INPUT1", "FP32", [1, 4], region, 16, offset=32 * i)
        shm_output(made, "OUTPUT0", region, 16, offset=512 + 16 * i)
        return made

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("r", obj.key, 1024))
        sent = [request(0), request(1), request(9, region="nope"), request(2), request(3)]
        answers = [a async for a in stub.ModelStreamInfer(iter(sent))]
        assert [a.infer_response.id for a in answers] == ["s0", "s1", "s9", "s2", "s3"]
        assert "names region 'nope', which is not registered" in answers[2].error_message
        assert not any(a.error_message for i, a in enumerate(answers) if i != 2)
        for i, x in enumerate(rows):
            np.testing.assert_array_equal(
                np.frombuffer(obj.read(512 + 16 * i, 16), np.float32), (x + x).ravel()
            )

    serve(tmp_path, body)


def test_keys_with_dots_or_several_leading_slashes_name_objects(tmp_path: Path) -> None:
    """shm_open takes any name without '/' past its leading ones: '/a..b' and '//x' are valid."""
    made = [
        shared_memory.SharedMemory(create=True, size=64, name=f"fs-{os.getpid()}{s}")
        for s in ("-a..b", "-x")
    ]
    keys = ["/" + made[0].name, "//" + made[1].name]

    async def body(stub, repo) -> None:
        for i, key in enumerate(keys):
            await stub.SystemSharedMemoryRegister(register(f"r{i}", key, 64))
        status = await stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
        assert sorted(r.key for r in status.regions.values()) == sorted(keys)

    try:
        serve(tmp_path, body)
    finally:
        for obj in made:
            obj.close()
            obj.unlink()


def descriptors_of(obj: ShmObject) -> int:
    """How many descriptors this process (the test's client and its in-process server) holds
    of the object."""
    return sum(holds_fd(fd, obj) for fd in Path("/proc/self/fd").iterdir())


def holds_fd(fd: Path, obj: ShmObject) -> bool:
    try:
        return os.readlink(fd) == str(SHM_DIR / obj.shm.name)
    except FileNotFoundError:  # closed meanwhile
        return False


def test_regions_of_one_object_share_a_descriptor_and_their_number_is_capped(
    tmp_path: Path, objects, monkeypatch
) -> None:
    """Four regions of one object hold one descriptor, closed with the last of them; a region
    past MAX_REGIONS is RESOURCE_EXHAUSTED naming the cap and the fix."""
    monkeypatch.setattr(shm_module, "MAX_REGIONS", 4)
    write_model(tmp_path, "simple", add_sub_model(4))
    obj, other = objects(64), objects(64)
    obj.write(0, np.ones((4, 4), np.float32).tobytes())

    async def body(stub, repo) -> None:
        client = descriptors_of(obj)  # the client's (its mapping holds one too)
        for i in range(4):
            await stub.SystemSharedMemoryRegister(register(f"r{i}", obj.key, 64))
        assert descriptors_of(obj) == client + 1
        error = await refused(stub.SystemSharedMemoryRegister, register("more", other.key, 64))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert "4 regions are registered, the server's limit of 4; unregister unused regions" in (
            error.details()
        )
        Unregister = pb.SystemSharedMemoryUnregisterRequest
        for i in range(3):
            await stub.SystemSharedMemoryUnregister(Unregister(name=f"r{i}"))
        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "r3", 32)
        shm_input(request, "INPUT1", "FP32", [2, 4], "r3", 32, offset=32)
        np.testing.assert_array_equal(output(await stub.ModelInfer(request), "OUTPUT0"), 2)
        await stub.SystemSharedMemoryRegister(register("more", other.key, 64))
        await stub.SystemSharedMemoryUnregister(Unregister(name="r3"))
        assert descriptors_of(obj) == client

    serve(tmp_path, body)


def test_a_register_with_no_descriptor_left_names_the_open_file_limit(objects) -> None:
    """EMFILE at open is RESOURCE_EXHAUSTED naming RLIMIT_NOFILE, not a permission problem."""
    obj = objects(64)
    registry = SharedMemoryRegistry()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowest_free = os.open(os.devnull, os.O_RDONLY)
    os.close(lowest_free)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free, hard))
    try:
        with pytest.raises(ServerError) as info:
            registry.register("r", obj.key, 0, 64)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert status_for(info.value) == grpc.StatusCode.RESOURCE_EXHAUSTED, str(info.value)
    assert f"open-file limit (RLIMIT_NOFILE) of {lowest_free} descriptors" in str(info.value)
    assert registry.status("") == []


def test_a_request_whose_outputs_cannot_be_written_counts_as_failed(
    tmp_path: Path, objects
) -> None:
    """An output whose size the config fixes and that cannot fit is refused before the request
    joins a batch; a BYTES output found too small after the run (executed, or a cache hit)
    moves the request from success (and cache_hit) to fail, on /metrics too."""
    write_model(tmp_path, "text", identity_model(["BYTES"]), config_toml="response_cache = true\n")
    write_model(tmp_path, "simple", add_sub_model(4))
    obj = objects(256)
    obj.write(0, TEXT_BYTES)
    other = encode_bytes_elements([b"b", "cé".encode(), b"", b"xyw", b"", b"r"])
    assert len(other) == len(TEXT_BYTES)
    errors = {"model": "text", "version": "1", "reason": "error"}

    def failures() -> float:
        return REGISTRY.get_sample_value("featureserve_model_failures_total", errors) or 0

    def text_request(output_size: int | None) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="text")
        shm_input(request, "INPUT_BYTES", "BYTES", [2, 3], "r", len(TEXT_BYTES))
        if output_size is None:
            request.outputs.add(name="OUTPUT_BYTES")
        else:
            shm_output(request, "OUTPUT_BYTES", "r", output_size, offset=128)
        return request

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("r", obj.key, 256))
        before = failures()
        await stub.ModelInfer(text_request(None))
        for step, data in enumerate((TEXT_BYTES, other)):  # a cache hit, then a miss
            obj.write(0, data)
            error = await refused(stub.ModelInfer, text_request(8))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            assert "output 'OUTPUT_BYTES': parameter 'shared_memory_byte_size' is 8" in (
                error.details()
            )
            stats = repo.get("text").batcher.stats
            counts = (stats.success.count, stats.cache_hit.count, stats.fail.count)
            assert counts == (1, 0, step + 1)
            assert stats.success.ns > 0 and stats.fail.ns > 0
        assert stats.cache_miss.count == 2
        assert failures() - before == 2

        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "r", 32)
        shm_input(request, "INPUT1", "FP32", [2, 4], "r", 32)
        shm_output(request, "OUTPUT0", "r", 16, offset=128)
        error = await refused(stub.ModelInfer, request)
        assert "(shape [2, 4] of FP32) takes 32 bytes; set 'shared_memory_byte_size' to at " in (
            error.details()
        )
        stats = repo.get("simple").batcher.stats
        assert (stats.execution_count, stats.success.count, stats.fail.count) == (0, 0, 0)

    serve(tmp_path, body, response_cache_bytes=1 << 20)


def test_an_input_byte_size_is_checked_before_its_bytes_are_read(tmp_path: Path) -> None:
    """A 64 MiB byte_size for a 32-byte FP32 tensor is refused naming both sizes (it was read
    whole first); a BYTES input's byte_size may be at most max_message_bytes."""
    write_model(tmp_path, "simple", add_sub_model(4))
    write_model(tmp_path, "text", identity_model(["BYTES"]))
    path = SHM_DIR / f"fs-test-big-{os.getpid()}"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 64 << 20)  # sparse: costs no memory until read

    async def body(stub, repo) -> None:
        await stub.SystemSharedMemoryRegister(register("big", "/" + path.name, 64 << 20))
        request = pb.ModelInferRequest(model_name="simple")
        shm_input(request, "INPUT0", "FP32", [2, 4], "big", 64 << 20)
        shm_input(request, "INPUT1", "FP32", [2, 4], "big", 32)
        error = await refused(stub.ModelInfer, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (
            "input 'INPUT0': parameter 'shared_memory_byte_size' is 67108864, but shape [2, 4] "
            "of FP32 takes 32 bytes (8 x 4); set 'shared_memory_byte_size' to 32"
        ) in error.details()
        request = pb.ModelInferRequest(model_name="text")
        shm_input(request, "INPUT_BYTES", "BYTES", [2, 3], "big", 8192)
        error = await refused(stub.ModelInfer, request)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert (
            "input 'INPUT_BYTES': parameter 'shared_memory_byte_size' is 8192 bytes, over the "
            "server's limit for a BYTES input of max_message_bytes=4096"
        ) in error.details()

    try:
        serve(tmp_path, body, limit=MessageLimit(4096, 1000))
    finally:
        os.close(fd)
        path.unlink()


def holds(pid: int, obj: ShmObject) -> bool:
    """Whether process pid holds a descriptor of the object."""
    target = str(SHM_DIR / obj.shm.name)
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) == target:
                return True
        except FileNotFoundError:  # closed meanwhile
            continue
    return False


@pytest.fixture
def tmp(tmp_path: Path, monkeypatch) -> Path:
    """The $TMPDIR of the group: its folder holds the shared registrations."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setenv("TMPDIR", str(folder))
    return folder


def test_workers_share_registrations_and_unregistrations(
    server_factory, tmp_path: Path, tmp: Path, objects
) -> None:
    """A Register answered by one worker serves requests on every worker; after an Unregister
    answered OK, no worker serves the region any more; the objects outlive the group."""
    write_model(tmp_path / "models", "mlp", mlp_model())
    obj = objects(4096)
    x = np.random.default_rng(3).standard_normal((2, 32)).astype(np.float32)
    obj.write(0, x.tobytes())
    server = server_factory("--workers", "2")
    assert wait_until(lambda: serving(server) == 2, timeout=60)
    (folder,) = tmp.glob("featureserve-metrics-*")

    def infer(stub) -> np.ndarray:
        request = pb.ModelInferRequest(model_name="mlp")
        shm_input(request, "x", "FP32", [2, 32], "r", x.nbytes)
        return output(stub.ModelInfer(request, timeout=10), "y")

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryRegister(register("r", obj.key, 4096))
        expected = infer(stub)
    answers = on_fresh_channels(server.target, infer)
    assert all(isinstance(a, np.ndarray) for a in answers), answers
    assert all(np.allclose(a, expected) for a in answers)
    workers = live_workers(server)
    counts = [served(folder, pid).get("mlp", 0) for pid in workers]
    assert len(counts) == 2 and all(counts), counts  # both workers read the region
    assert [holds(pid, obj) for pid in workers] == [True, True]
    statuses = on_fresh_channels(
        server.target,
        lambda stub: list(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest())
                          .regions),
    )  # fmt: skip
    assert statuses == [["r"]] * len(statuses)
    registry = json.loads((folder / "shared-memory.json").read_text())
    assert registry["regions"]["r"]["key"] == obj.key

    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="r"))
    refusals = on_fresh_channels(server.target, infer)
    assert all(isinstance(r, grpc.RpcError) for r in refusals), refusals
    assert {r.code() for r in refusals} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert all("'r', which is not registered" in r.details() for r in refusals)
    assert [holds(pid, obj) for pid in workers] == [False, False]  # descriptors closed
    assert server.terminate(timeout=60) == 0
    assert Path(SHM_DIR, obj.shm.name).exists()


def test_a_worker_serves_only_the_object_registered_under_its_key(
    server_factory, tmp_path: Path, tmp: Path
) -> None:
    """A worker opens a registered object by its name when it first meets the registration: once
    the client unlinked the name and created another object under it, that worker refuses
    instead of reading the other object; registering again fixes it. A name unlinked and not
    recreated is refused the same way, saying the object must stay linked."""
    write_model(tmp_path / "models", "mlp", mlp_model())
    name = f"fs-test-replaced-{os.getpid()}"
    x = np.random.default_rng(5).standard_normal((2, 32)).astype(np.float32)
    first = shared_memory.SharedMemory(create=True, size=4096, name=name)
    first.buf[: x.nbytes] = x.tobytes()
    second = None
    server = server_factory("--workers", "2")
    assert wait_until(lambda: serving(server) == 2, timeout=60)
    (folder,) = tmp.glob("featureserve-metrics-*")

    def infer(region: str):
        def call(stub) -> np.ndarray:
            request = pb.ModelInferRequest(model_name="mlp")
            shm_input(request, "x", "FP32", [2, 32], region, x.nbytes)
            return output(stub.ModelInfer(request, timeout=10), "y")

        return call

    def admin(request) -> None:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            getattr(stub, type(request).__name__.removesuffix("Request"))(request, timeout=10)

    try:
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(register("r", "/" + name, 4096))
            expected = infer("r")(stub)  # the registering worker
        record = json.loads((folder / "shared-memory.json").read_text())["regions"]["r"]
        assert record["ino"] == os.stat(SHM_DIR / name).st_ino
        first.unlink()
        second = shared_memory.SharedMemory(create=True, size=4096, name=name)
        second.buf[: x.nbytes] = (x * 3).tobytes()

        answers = on_fresh_channels(server.target, infer("r"))
        refusals = [a for a in answers if isinstance(a, grpc.RpcError)]
        served = [a for a in answers if not isinstance(a, grpc.RpcError)]
        assert all(np.allclose(a, expected) for a in served), answers
        assert refusals, "the other worker was not reached"
        for refusal in refusals:
            assert refusal.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "is not the object that was registered" in refusal.details()
            assert "must stay linked under that name" in refusal.details()

        admin(pb.SystemSharedMemoryUnregisterRequest(name="r"))
        admin(register("r", "/" + name, 4096))
        answers = on_fresh_channels(server.target, infer("r"))
        assert not any(isinstance(a, grpc.RpcError) for a in answers), answers
        assert not any(np.allclose(a, expected) for a in answers)  # the second object's

        admin(register("u", "/" + name, 4096))
        second.unlink()
        answers = on_fresh_channels(server.target, infer("u"))
        refusals = [a for a in answers if isinstance(a, grpc.RpcError)]
        assert refusals and all("is no longer linked at" in r.details() for r in refusals)
    finally:
        for obj in (first, second):
            if obj is not None:
                obj.close()
        for leftover in SHM_DIR.glob(name):
            leftover.unlink()
    assert server.terminate(timeout=60) == 0


def test_the_server_raises_its_open_file_limit_to_the_hard_limit(server_factory) -> None:
    """A soft RLIMIT_NOFILE below the hard limit (1024, or half the hard limit where that is
    lower) is raised to the hard limit at start-up, and logged."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, hard // 2)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        server = server_factory()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    limits = Path(f"/proc/{server.proc.pid}/limits").read_text()
    (line,) = [line for line in limits.splitlines() if line.startswith("Max open files")]
    assert line.split()[3:5] == [str(hard), str(hard)], line
    raised = f"raised the open-file limit (RLIMIT_NOFILE) from {low} to {hard}"
    assert any(entry.get("msg") == raised for entry in server.logs()), server.log_lines[:20]


TRITONCLIENT_SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.utils.shared_memory as shm

url, key = sys.argv[1], sys.argv[2]
client = grpcclient.InferenceServerClient(url)
client.unregister_system_shared_memory()
a = np.arange(8, dtype=np.float32).reshape(2, 4)
b = np.full((2, 4), 3, np.float32)
handle = shm.create_shared_memory_region("io", key, 128)
shm.set_shared_memory_region(handle, [a, b])
client.register_system_shared_memory("io", key, 128)
inputs = [grpcclient.InferInput(n, [2, 4], "FP32") for n in ("INPUT0", "INPUT1")]
inputs[0].set_shared_memory("io", 32)
inputs[1].set_shared_memory("io", 32, offset=32)
outputs = [grpcclient.InferRequestedOutput(n) for n in ("OUTPUT0", "OUTPUT1")]
outputs[0].set_shared_memory("io", 32, offset=64)
result = client.infer("simple", inputs, outputs=outputs)
out = {
    "sum": shm.get_contents_as_numpy(handle, np.float32, [2, 4], offset=64).tolist(),
    "difference": result.as_numpy("OUTPUT1").tolist(),
    "output0": result.get_output("OUTPUT0").parameters["shared_memory_byte_size"].int64_param,
    "status": client.get_system_shared_memory_status(as_json=True),
}
client.unregister_system_shared_memory("io")
out["after"] = client.get_system_shared_memory_status(as_json=True)
shm.destroy_shared_memory_region(handle)
print(json.dumps(out))
"""


def test_tritonclient_shared_memory_utilities_round_trip(tmp_path: Path) -> None:
    """tritonclient's own shm utilities and client calls, unchanged, against the server."""
    python = cached_venv("tritonclient-venv", TRITONCLIENT) / "bin" / "python"
    models = tmp_path / "models"
    write_model(models, "simple", add_sub_model(4))
    script = tmp_path / "client.py"
    script.write_text(TRITONCLIENT_SCRIPT)
    key = f"/fs-test-tritonclient-{os.getpid()}"
    with BackgroundServer(models) as server:
        done = subprocess.run(
            [str(python), str(script), f"127.0.0.1:{server.port}", key],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    assert out["sum"] == (a + 3).tolist()
    assert out["difference"] == (a - 3).tolist()
    assert out["output0"] == 32
    (region,) = out["status"]["regions"].values()
    assert region["name"] == "io" and region["key"] == key and region["byte_size"] == "128"
    assert out["after"] == {}
    assert not Path(SHM_DIR, key[1:]).exists()  # destroyed by the client, never by us
