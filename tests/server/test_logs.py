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
