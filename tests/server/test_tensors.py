"""KServe v2 tensor decoding: typed integers come back exact, raw BOOL bytes must be 0 or 1."""

from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.model_zoo import identity_model, write_model
from protos.inference import grpc_service_pb2 as pb
from server.errors import InvalidRequestError
from server.tensors import NUMPY_DTYPES, decode_contents, decode_raw
from tests.server.test_inference_rpc import TYPED, output, serve

# Each integer datatype's range, written out rather than read from NumPy or server/tensors.py.
RANGES = {
    "UINT8": (0, 2**8 - 1),
    "UINT16": (0, 2**16 - 1),
    "UINT32": (0, 2**32 - 1),
    "UINT64": (0, 2**64 - 1),
    "INT8": (-(2**7), 2**7 - 1),
    "INT16": (-(2**15), 2**15 - 1),
    "INT32": (-(2**31), 2**31 - 1),
    "INT64": (-(2**63), 2**63 - 1),
}


def typed(datatype: str, values: list) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    getattr(contents, TYPED[datatype]).extend(values)
    return contents


@pytest.mark.parametrize(
    ("datatype", "values"),
    [
        ("UINT64", [2**64 - 1, 0, 2**63]),
        ("UINT64", [2**63 + 1, 1, 2**64 - 2, 2**53 + 1]),
        ("INT64", [-(2**63), 2**63 - 1, 0, -1]),
        ("INT64", [2**53 + 1, -(2**53) - 1, 1]),
        ("UINT32", [2**32 - 1, 0, 1]),
        ("INT32", [-(2**31), 2**31 - 1, 0]),
        ("UINT16", [2**16 - 1, 0, 1]),
        ("INT16", [-(2**15), 2**15 - 1, 0]),
        ("UINT8", [255, 0, 1]),
        ("INT8", [-128, 127, 0]),
    ],
)
def test_typed_integer_extremes_come_back_exactly(datatype: str, values: list[int]) -> None:
    array = decode_contents("x", datatype, (1, len(values)), typed(datatype, values))
    assert array.dtype == NUMPY_DTYPES[datatype]
    assert array.shape == (1, len(values))
    assert array.reshape(-1).tolist() == values


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_any_in_range_typed_integers_decode_to_themselves(data: st.DataObject) -> None:
    datatype = data.draw(st.sampled_from(sorted(RANGES)))
    low, high = RANGES[datatype]
    ints = st.one_of(st.integers(low, high), st.sampled_from([low, high, 0]))
    values = data.draw(st.lists(ints, max_size=20))
    array = decode_contents("x", datatype, (len(values),), typed(datatype, values))
    assert array.dtype == NUMPY_DTYPES[datatype]
    assert array.tolist() == values


@pytest.mark.parametrize(
    ("datatype", "values", "message"),
    [
        (
            "INT8",
            [-128, 127, 128, -129],
            "input 'x': contents.int_contents element 2 is 128, outside the range of INT8 "
            "[-128, 127]",
        ),
        (
            "INT16",
            [0, -(2**15) - 1],
            "input 'x': contents.int_contents element 1 is -32769, outside the range of INT16",
        ),
        (
            "UINT8",
            [2**32 - 1],
            "input 'x': contents.uint_contents element 0 is 4294967295, outside the range of "
            "UINT8 [0, 255]",
        ),
        (
            "UINT16",
            [1, 2, 2**16],
            "input 'x': contents.uint_contents element 2 is 65536, outside the range of UINT16",
        ),
    ],
)
def test_out_of_range_typed_values_name_the_input_and_element(
    datatype: str, values: list[int], message: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        decode_contents("x", datatype, (len(values),), typed(datatype, values))
    assert message in str(info.value)


def test_raw_bool_accepts_only_bytes_0_and_1() -> None:
    array = decode_raw("flags", "BOOL", (2, 2), bytes([1, 0, 0, 1]))
    assert array.dtype == np.bool_
    assert array.tolist() == [[True, False], [False, True]]
    with pytest.raises(InvalidRequestError) as info:
        decode_raw("flags", "BOOL", (1, 4), bytes([1, 0, 2, 255]))
    assert str(info.value) == (
        "input 'flags': BOOL raw contents element 2 is byte 2; "
        "each BOOL element is one byte, 0 (false) or 1 (true)"
    )


def test_uint64_extremes_and_bad_bool_bytes_over_a_real_server(tmp_path: Path) -> None:
    write_model(tmp_path, "ids", identity_model(["UINT64", "BOOL"]))
    values = [2**64 - 1, 0, 2**63]

    def request() -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="ids")
        for dt in ("UINT64", "BOOL"):
            request.inputs.add(name=f"INPUT_{dt}", datatype=dt, shape=[1, 3])
        return request

    uint64_typed = request()
    uint64_typed.inputs[0].contents.uint64_contents.extend(values)
    uint64_typed.inputs[1].contents.bool_contents.extend([True, False, True])
    bad_bool = request()
    bad_bool.raw_input_contents.extend([np.array(values, np.uint64).tobytes(), bytes([2, 0, 255])])

    async def body(stub, repo) -> None:
        response = await stub.ModelInfer(uint64_typed)
        assert output(response, "OUTPUT_UINT64").reshape(-1).tolist() == values
        assert output(response, "OUTPUT_BOOL").reshape(-1).tolist() == [True, False, True]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ModelInfer(bad_bool)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input 'INPUT_BOOL': BOOL raw contents element 0 is byte 2" in info.value.details()

    serve(tmp_path, body)
