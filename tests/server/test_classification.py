"""Triton's classification extension: classify() against a plain-Python top-k, the request check,
and label files loaded through the real model repository."""

import asyncio
import logging
import math
from pathlib import Path

import grpc
import numpy as np
import pytest

from benchmarks.model_zoo import identity_model, write_model
from protos.inference import grpc_service_pb2 as pb
from protos.inference import grpc_service_pb2_grpc as pb_grpc
from server.classification import check_classification, classify
from server.errors import InvalidRequestError
from server.inference_servicer import start_server
from server.model_config import TensorSpec
from server.model_repository import READY, ModelRepository
from server.tensors import decode_raw
from tests.server.test_model_repository import with_repository

LABELS = ("cat", "", "dog:brown", "émeu")


def reference(row: list, k: int, labels: tuple[str, ...]) -> list[bytes]:
    """Top k of one row of Python numbers: highest first, equal values by index, NaN after every
    number; "%.6f" for floats (C++ std::to_string) and the integer itself for ints."""

    def rank(i: int) -> tuple:
        value = row[i]
        if isinstance(value, float) and math.isnan(value):
            return (1, 0, i)
        return (0, -value, i)

    out = []
    for i in sorted(range(len(row)), key=rank)[:k]:
        value = row[i]
        text = f"{value:.6f}:{i}" if isinstance(value, float) else f"{value}:{i}"
        if i < len(labels) and labels[i]:
            text += f":{labels[i]}"
        out.append(text.encode())
    return out


def scores(dtype: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Random scores with many ties, and for floats NaN, infinities and both zeros; integers
    include the datatype's extremes."""
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        pool = np.array([np.nan, np.inf, -np.inf, 0.0, -0.0, 0.5, 0.25, 1e30, -3.125], dtype)
        values = np.where(
            rng.random(shape) < 0.5, rng.choice(pool, shape), rng.standard_normal(shape)
        )
        return values.astype(dtype)
    info = np.iinfo(dtype)
    pool = np.array([info.min, info.max, 0, 1, 2], dtype)
    drawn = rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return np.where(rng.random(shape) < 0.5, rng.choice(pool, shape), drawn).astype(dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64", "int8", "uint8", "int64", "uint64"])
@pytest.mark.parametrize(
    ("shape", "k"),
    [
        ((1, 4), 2),
        ((1, 4), 4),
        ((1, 4), 9),
        ((7, 10), 3),
        ((64, 1000), 5),
        ((3, 2, 300), 7),
        ((5, 1), 3),
    ],
)
@pytest.mark.parametrize("labels", [(), LABELS])
def test_batched_rows_match_a_plain_python_top_k(
    dtype: str, shape: tuple[int, ...], k: int, labels: tuple[str, ...]
) -> None:
    array = scores(dtype, shape, seed=k * 31 + shape[0])
    got = classify(array, k, labels, batched=True)
    width = math.prod(shape[1:])
    assert got.dtype == object
    assert got.shape == (shape[0], min(k, width))
    for row, answer in zip(array.reshape(shape[0], width).tolist(), got.tolist(), strict=True):
        assert answer == reference(row, k, labels)


@pytest.mark.parametrize("dtype", ["float32", "int32"])
@pytest.mark.parametrize(("shape", "k"), [((4,), 3), ((2, 3), 10), ((30, 40), 6)])
def test_a_model_without_batching_is_classified_over_its_whole_output(
    dtype: str, shape: tuple[int, ...], k: int
) -> None:
    array = scores(dtype, shape, seed=sum(shape))
    got = classify(array, k, LABELS, batched=False)
    assert got.shape == (min(k, array.size),)
    assert got.tolist() == reference(array.ravel().tolist(), k, LABELS)


def test_the_triton_example_and_its_formats() -> None:
    row = np.array([[1.1, 3.3, 0.5, 2.4]], np.float32)
    assert classify(row, 2, (), batched=True).tolist() == [[b"3.300000:1", b"2.400000:3"]]
    labelled = classify(row, 2, ("a", "b", "c", "d"), batched=True)
    assert labelled.tolist() == [[b"3.300000:1:b", b"2.400000:3:d"]]
    ints = np.array([[5, -7, 2**63 - 1]], np.int64)
    assert classify(ints, 2, (), batched=True).tolist() == [[b"9223372036854775807:2", b"5:0"]]


def test_ties_keep_the_lower_index_first_and_nan_ranks_last() -> None:
    row = np.array([[np.nan, 1.0, -np.inf, 1.0, np.nan, 2.0]], np.float32)
    assert classify(row, 6, (), batched=True).tolist() == [
        [b"2.000000:5", b"1.000000:1", b"1.000000:3", b"-inf:2", b"nan:0", b"nan:4"]
    ]
    # A long row takes the partition path: the tie at the k-th place still keeps the lowest
    # indices, and NaN only fills places that no number can.
    long = np.full((2, 2000), 7.0, np.float32)
    long[0, 1500] = 9.0
    long[1, :] = np.nan
    long[1, 1999] = -1.0
    got = classify(long, 3, (), batched=True).tolist()
    assert got == [
        [b"9.000000:1500", b"7.000000:0", b"7.000000:1"],
        [b"-1.000000:1999", b"nan:0", b"nan:1"],
    ]


def test_labels_past_the_file_or_empty_are_left_out() -> None:
    row = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]], np.float64)
    got = classify(row, 5, ("zero", "", "two"), batched=True)
    assert got.tolist() == [
        [b"4.000000:4", b"3.000000:3", b"2.000000:2:two", b"1.000000:1", b"0.000000:0:zero"]
    ]
    assert classify(np.zeros((3, 0), np.float32), 4, (), batched=True).shape == (3, 0)


def param(**value: object) -> pb.InferParameter:
    """An InferParameter with one field set."""
    return pb.InferParameter(**value)


FP32 = TensorSpec("scores", "FP32", (-1, 4))


def test_check_returns_k_for_an_int64_of_at_least_one() -> None:
    assert check_classification("scores", param(int64_param=3), FP32) == 3
    assert check_classification("scores", param(int64_param=2**62), FP32) == 2**62
    int8 = TensorSpec("scores", "INT8", (-1, 4))
    assert check_classification("scores", param(int64_param=1), int8) == 1


@pytest.mark.parametrize(
    ("parameter", "spec", "needle"),
    [
        (param(uint64_param=3), FP32, "must be int64_param (the number of classes to return), "),
        (param(string_param="3"), FP32, "got string_param"),
        (param(), FP32, "got no value"),
        (param(int64_param=0), FP32, "is 0; the number of classes to return must be >= 1"),
        (param(int64_param=-2), FP32, "is -2;"),
        (param(int64_param=3), TensorSpec("scores", "BYTES", (-1, 4)), "'scores' is BYTES"),
        (param(int64_param=3), TensorSpec("scores", "BOOL", (-1, 4)), "'scores' is BOOL"),
        (param(int64_param=3), TensorSpec("scores", "FP16", (-1, 4)), "'scores' is FP16"),
        (param(int64_param=3), TensorSpec("scores", "BF16", (-1, 4)), "'scores' is BF16"),
    ],
)
def test_check_refuses_naming_the_output_and_the_parameter(
    parameter: pb.InferParameter, spec: TensorSpec, needle: str
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        check_classification("scores", parameter, spec)
    assert str(info.value).startswith("output 'scores': parameter 'classification'")
    assert needle in str(info.value)


def labelled_model(
    repository: Path, name: str, label_filename: str, shape: str = "[-1, 4]", width: int | str = 4
) -> Path:
    """An FP32 identity model (its output [N, width]) whose config.toml gives the output
    label_filename."""
    config = (
        '[[outputs]]\nname = "OUTPUT_FP32"\ndtype = "FP32"\n'
        f'shape = {shape}\nlabel_filename = "{label_filename}"\n'
    )
    return write_model(repository, name, identity_model(["FP32"], width), config_toml=config)


def test_labels_load_with_the_model_and_classify_its_served_output(tmp_path: Path) -> None:
    model_dir = labelled_model(tmp_path, "good", "labels.txt")
    (model_dir / "labels.txt").write_text("cat\r\n\r\ndog:brown\nemu\n", encoding="utf-8")
    nested = labelled_model(tmp_path, "nested", "meta/labels.txt")
    (nested / "meta").mkdir()
    (nested / "meta" / "labels.txt").write_bytes("émeu\n狗\ngato\nñu".encode())

    async def check(repo: ModelRepository) -> None:
        model = repo.get("good")
        output = model.config.output("OUTPUT_FP32")
        assert output.label_filename == "labels.txt"
        assert output.labels == ("cat", "", "dog:brown", "emu")
        x = np.array([[0.1, 0.9, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]], np.float32)
        served = await model.batcher.submit({"INPUT_FP32": x}, 2)
        got = classify(served["OUTPUT_FP32"], 2, output.labels, batched=True)
        assert got.tolist() == [
            [b"0.900000:1", b"0.500000:2:dog:brown"],
            [b"4.000000:0:cat", b"3.000000:1"],
        ]
        nested_output = repo.get("nested").config.output("OUTPUT_FP32")
        assert nested_output.labels == ("émeu", "狗", "gato", "ñu")

    with_repository(tmp_path, check)


def test_a_missing_labels_file_fails_the_models_load_naming_it(tmp_path: Path) -> None:
    labelled_model(tmp_path, "missing", "labels.txt")

    async def check(repo: ModelRepository) -> None:
        assert not repo.is_ready("missing")
        reason = {(s.name, s.version): s for s in repo.index()}[("missing", "")].reason
        assert str(tmp_path / "missing" / "labels.txt") + " does not exist" in reason
        assert "output 'OUTPUT_FP32' label_filename" in reason

    with_repository(tmp_path, check)


def test_a_label_count_other_than_the_class_count_loads_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """As Triton does, the model loads (an ImageNet labels file has a 'background' line more);
    the count is logged. Trailing blank lines are not labels."""
    short = labelled_model(tmp_path, "short", "labels.txt")
    (short / "labels.txt").write_text("a\nb\nc\n")
    blank = labelled_model(tmp_path, "blank", "labels.txt")
    (blank / "labels.txt").write_text("a\nb\nc\nd\n\n\r\n")
    loose = labelled_model(tmp_path, "loose", "labels.txt", shape="[-1, -1]", width="M")
    (loose / "labels.txt").write_text("a\nb\n")

    async def check(repo: ModelRepository) -> None:
        index = {(s.name, s.version): s.state for s in repo.index()}
        assert index == {(n, "1"): READY for n in ("short", "blank", "loose")}
        assert repo.get("short").config.output("OUTPUT_FP32").labels == ("a", "b", "c")
        assert repo.get("blank").config.output("OUTPUT_FP32").labels == ("a", "b", "c", "d")
        assert repo.get("loose").config.output("OUTPUT_FP32").labels == ("a", "b")

    with caplog.at_level(logging.WARNING, logger="featureserve.model_config"):
        with_repository(tmp_path, check)
    (warning,) = [r.getMessage() for r in caplog.records if "label_filename" in r.getMessage()]
    assert "output 'OUTPUT_FP32' label_filename 'labels.txt' holds 3 labels" in warning
    assert "each row of the output has 4 classes (dims [4])" in warning


@pytest.mark.parametrize("label_filename", ["../labels.txt", "/etc/hostname", "a/../../b", ""])
def test_a_labels_file_outside_the_model_folder_is_refused_at_load(
    tmp_path: Path, label_filename: str
) -> None:
    labelled_model(tmp_path, "outside", label_filename)

    async def check(repo: ModelRepository) -> None:
        reason = {(s.name, s.version): s for s in repo.index()}[("outside", "")].reason
        assert reason.startswith(str(tmp_path / "outside" / "config.toml"))
        assert (
            f"outputs 'OUTPUT_FP32' label_filename '{label_filename}' must name a file inside "
            "the model folder"
        ) in reason
        assert not repo.is_ready("outside")

    with_repository(tmp_path, check)


def classes_request(x: np.ndarray, k: int) -> pb.ModelInferRequest:
    """An identity-model request asking OUTPUT_FP32 as its top k classes."""
    request = pb.ModelInferRequest(model_name="good")
    request.inputs.add(name="INPUT_FP32", datatype="FP32", shape=x.shape)
    request.raw_input_contents.append(x.tobytes())
    request.outputs.add(name="OUTPUT_FP32").parameters["classification"].int64_param = k
    return request


def test_classes_over_rpc_from_the_cache_and_after_a_labels_edit(tmp_path: Path) -> None:
    """A served model answers BYTES classes (a response-cache hit too, which holds the scores),
    its config names the labels file, and editing the labels file alone reloads the model."""
    model_dir = labelled_model(tmp_path, "good", "labels.txt")
    config = model_dir / "config.toml"
    config.write_text("response_cache = true\n" + config.read_text())
    (model_dir / "labels.txt").write_text("cat\ndog\nemu\nyak\n")
    x = np.array([[0.1, 0.9, 0.5, 0.2], [4.0, 3.0, 2.0, 1.0]], np.float32)

    async def main() -> None:
        repo = ModelRepository(tmp_path, poll_interval_s=0.05, response_cache_bytes=1 << 20)
        await repo.start()
        server, port = await start_server(repo)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                for _ in range(2):
                    answer = await stub.ModelInfer(classes_request(x, 2))
                    (out,) = answer.outputs
                    assert (out.datatype, list(out.shape)) == ("BYTES", [2, 2])
                    got = decode_raw("c", "BYTES", (2, 2), answer.raw_output_contents[0])
                    assert got.tolist() == [
                        ["0.900000:1:dog", "0.500000:2:emu"],
                        ["4.000000:0:cat", "3.000000:1:dog"],
                    ]
                stats = await stub.ModelStatistics(pb.ModelStatisticsRequest(name="good"))
                assert stats.model_stats[0].inference_stats.cache_hit.count == 1
                config = await stub.ModelConfig(pb.ModelConfigRequest(name="good"))
                assert config.config.output[0].label_filename == "labels.txt"
                meta = await stub.ServerMetadata(pb.ServerMetadataRequest())
                assert "classification" in meta.extensions
                (model_dir / "labels.txt").write_text("ant\nbee\ncow\ndoe\n")

                async def relabelled() -> bool:
                    answer = await stub.ModelInfer(classes_request(x[:1], 1))
                    return answer.raw_output_contents[0].endswith(b":bee")

                for _ in range(200):
                    if await relabelled():
                        break
                    await asyncio.sleep(0.05)
                assert await relabelled()
        finally:
            await server.stop(None)
            await repo.stop()

    asyncio.run(main())
