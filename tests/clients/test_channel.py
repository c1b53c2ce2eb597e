"""ClientConfig: a token never shows in its repr (it reaches logs and job reports); settings
that cannot work are refused naming the option, before gRPC fails on them (or aborts)."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest

from clients.channel import (
    ClientConfig,
    ClientError,
    ConfigError,
    create_aio_channel,
    create_channel,
)
from tests.server.test_tls import make_ca

REPO = Path(__file__).resolve().parents[2]


def test_the_token_stays_out_of_the_repr() -> None:
    config = ClientConfig(target="h:1", token="s3cret-token")
    assert "s3cret-token" not in repr(config) and "h:1" in repr(config)
    assert config.token == "s3cret-token"


@pytest.mark.parametrize("timeout_s", [math.inf, math.nan, 0, -1.0, 1e10, True, "5"])
def test_a_timeout_grpc_cannot_take_is_refused_naming_timeout_s(timeout_s) -> None:
    # inf, 1e10 and 0 failed every call at once (DEADLINE_EXCEEDED); 0 meant no deadline in asyncio
    with pytest.raises(ConfigError, match=r"timeout_s \(--timeout\).*or None for no deadline"):
        ClientConfig(timeout_s=timeout_s)
    assert ClientConfig(timeout_s=None).timeout_s is None
    assert ClientConfig(timeout_s=np.float32(0.5)).timeout_s == 0.5


def test_half_an_mtls_pair_is_an_error_naming_both_options_not_a_process_abort(
    tmp_path: Path,
) -> None:
    # gRPC's C core aborted the whole process (ssl_credentials.cc, exit 134) on either half alone,
    # so the channel is built in a child process.
    make_ca(tmp_path, "client")  # client.crt and client.key
    script = f"""
from clients.channel import ClientConfig, ClientError, create_aio_channel, create_channel
for half in ({{"client_certificate": {str(tmp_path / "client.crt")!r}}},
             {{"client_key": {str(tmp_path / "client.key")!r}}}):
    for create in (create_channel, create_aio_channel):
        try:
            create(ClientConfig(target="127.0.0.1:1", tls=True, **half))
        except ClientError as exc:
            print(exc)
"""
    child = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert child.returncode == 0, child.stderr[-2000:]
    lines = child.stdout.splitlines()
    assert len(lines) == 4, child.stdout
    assert all(" (--cert and --key): mTLS needs " in line for line in lines), lines
    assert lines[0].startswith("INVALID_ARGUMENT: client_certificate is set but client_key is not")
    assert lines[2].startswith("INVALID_ARGUMENT: client_key is set but client_certificate is not")


def test_an_unreadable_pem_file_is_an_error_naming_the_option_and_path(tmp_path: Path) -> None:
    make_ca(tmp_path, "client")
    missing = tmp_path / "missing.pem"
    cases = [
        ({"root_certificates": missing}, f"root_certificates (--ca): cannot read '{missing}'"),
        (
            {"client_certificate": missing, "client_key": tmp_path / "client.key"},
            f"client_certificate (--cert): cannot read '{missing}'",
        ),
        (
            {"client_certificate": tmp_path / "client.crt", "client_key": tmp_path},
            f"client_key (--key): cannot read '{tmp_path}': Is a directory",
        ),
        (
            {"root_certificates": tmp_path / "client.key"},
            f"root_certificates (--ca): '{tmp_path / 'client.key'}' holds no PEM CERTIFICATE; "
            "give the PEM file of a CA certificate",
        ),
        (
            {"client_certificate": tmp_path / "client.crt", "client_key": tmp_path / "client.crt"},
            f"client_key (--key): '{tmp_path / 'client.crt'}' holds no PEM PRIVATE KEY",
        ),
    ]
    for options, message in cases:
        config = ClientConfig(target="127.0.0.1:1", tls=True, **options)
        for create in (create_channel, create_aio_channel):
            with pytest.raises(ClientError, match=re.escape(message)) as caught:
                create(config)
            assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_ca_or_client_certificate_turns_tls_on(tmp_path: Path) -> None:
    """Over plaintext the certificates were ignored and the bearer token went in clear."""
    pem = tmp_path / "x.pem"
    assert not ClientConfig().tls
    assert ClientConfig(root_certificates=pem).tls
    assert ClientConfig(client_certificate=pem, client_key=pem).tls
