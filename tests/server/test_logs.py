"""Structured logging as the server configures it: JSON lines on stderr, grpc.aio's noise
filtered."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from server.logs import GRPC_AIO_LOGGER, configure_logging


@pytest.fixture
def logging_restored():
    root = logging.getLogger()
    cygrpc = logging.getLogger(GRPC_AIO_LOGGER)
    saved = root.handlers[:], root.level, cygrpc.filters[:]
    yield
    root.handlers[:], cygrpc.filters[:] = saved[0], saved[2]
    root.setLevel(saved[1])


def _unhandled(exc: BaseException, method: str) -> None:
    """What grpc.aio logs when an RPC task ends with an exception its handler did not take."""
    try:
        raise exc
    except BaseException:
        logging.getLogger(GRPC_AIO_LOGGER).exception(
            "Exception not handled by _handle_exceptions in servicer method [%s]", method
        )


def test_an_rpc_task_cancelled_at_shutdown_is_not_logged_as_an_error(
    capsys, logging_restored
) -> None:
    """A Watch stream its client cancelled while the server drained was now and then logged at
    ERROR with a CancelledError traceback (grpc.aio's shutdown cancels the tasks still
    finishing); other unhandled exceptions are still logged, as JSON lines."""
    configure_logging()
    configure_logging()  # configured twice (a worker, then its server): one filter
    _unhandled(asyncio.CancelledError(), "/grpc.health.v1.Health/Watch")
    _unhandled(ValueError("boom"), "/featureserve.v1.FeatureStore/GetOnlineFeatures")
    (line,) = capsys.readouterr().err.splitlines()
    record = json.loads(line)
    assert record["level"] == "error" and "GetOnlineFeatures" in record["msg"]
    assert "ValueError: boom" in record["exc"]
    assert len(logging.getLogger(GRPC_AIO_LOGGER).filters) == 1


UNRAISABLE = """
import asyncio, gc
from server.logs import configure_logging
configure_logging()
source = "def fail(kind):\\n    raise kind()\\n"
grpc_code = compile(source, "src/python/grpcio/grpc/_cython/_cygrpc/aio/server.pyx.pxi", "exec")
own_code = compile(source, "app.py", "exec")

class TornDown:
    def __init__(self, code, kind):
        self.scope, self.kind = {}, kind
        exec(code, self.scope)

    def __del__(self):
        self.scope["fail"](self.kind)

for code, kind in ((grpc_code, asyncio.CancelledError), (own_code, asyncio.CancelledError),
                   (grpc_code, ValueError)):
    TornDown(code, kind)
    gc.collect()
"""


def test_a_cancellation_grpc_raises_unraisably_at_shutdown_is_not_printed() -> None:
    """grpc.aio's Cython code wrote a bare CancelledError traceback to stderr as a worker shut
    down during a drain (no logger: CI met it once); other unraisable errors still print."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", UNRAISABLE], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    printed = done.stderr.split("Exception ignored in")[1:]
    assert len(printed) == 2, done.stderr
    assert 'File "app.py"' in printed[0] and "CancelledError" in printed[0]
    assert "server.pyx.pxi" in printed[1] and "ValueError" in printed[1]


def test_text_logs_carry_the_extra_fields_json_logs_do(logging_restored, capsys) -> None:
    """`--log-format text` dropped every `extra=` field (a compaction's report, an exit code,
    the serving address); they follow the message as key=value, a traceback below the line."""
    configure_logging("INFO", "text")
    log = logging.getLogger("featureserve.retention")
    log.info("history compacted", extra={"report": "spend v1: dropped 5 of 10", "runs": 3})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("history compaction failed", extra={"exit_code": 1})
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].endswith(
        'INFO featureserve.retention history compacted report="spend v1: dropped 5 of 10" runs=3'
    )
    assert lines[1].endswith("ERROR featureserve.retention history compaction failed exit_code=1")
    assert lines[2] == "Traceback (most recent call last):"
    assert lines[-1] == "ValueError: boom"
