"""The connection flags every client command shares (clients/cli.py), run as real subprocesses:
bad values exit 2 with one line naming the flag, before anything is sent."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from clients.cli import add_connection_flags, client_config
from tests.server.test_tls import issue, make_ca

REPO = Path(__file__).resolve().parents[2]
NOBODY = "127.0.0.1:9"  # nothing listens there: these flags must fail before connecting


def featureserve(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "server.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca.crt, and client.crt / client.key issued by it."""
    folder = tmp_path_factory.mktemp("client_pki")
    issue(folder, "client", make_ca(folder, "ca"), server=False)
    return folder


@pytest.mark.parametrize("value", ["inf", "nan", "1e300", "1e10", "0", "-1"])
def test_timeout_must_be_above_0_and_one_gRPC_can_take(value: str) -> None:
    """inf, 1e300 and 1e10 (past gRPC's int64-ns deadline), 0 and negative numbers failed every
    call at once with DEADLINE_EXCEEDED; nan too."""
    result = featureserve("health", "--target", NOBODY, "--timeout", value)
    assert result.returncode == 2, result.stdout
    assert result.stderr.splitlines()[-1] == (
        f"featureserve health: error: argument --timeout: {value!r}: give the deadline per call "
        "in seconds, a number above 0 and at most 1e+09"
    )


@pytest.mark.parametrize(("given", "missing"), [("--cert", "--key"), ("--key", "--cert")])
def test_half_an_mtls_pair_exits_2_naming_both_flags(pki: Path, given: str, missing: str) -> None:
    """gRPC's C core aborted the whole process on a certificate without its key (or the
    reverse)."""
    path = pki / ("client.crt" if given == "--cert" else "client.key")
    result = featureserve(
        "health", "--target", NOBODY, "--ca", str(pki / "ca.crt"), given, str(path)
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert result.stderr.splitlines() == [
        f"featureserve: {given} is given without {missing}: mTLS needs both the client "
        "certificate (--cert) and its private key (--key); give both, or neither"
    ]


@pytest.mark.parametrize(
    ("flag", "option"),
    [("--ca", "root_certificates"), ("--cert", "client_certificate"), ("--key", "client_key")],
)
def test_an_unusable_pem_file_exits_2_naming_flag_and_path(pki: Path, flag, option) -> None:
    """A PEM file that cannot be read was a FileNotFoundError traceback; one that holds no PEM
    block of its kind failed every call with "empty address list" after pages of C-core log."""
    files = {"--ca": pki / "ca.crt", "--cert": pki / "client.crt", "--key": pki / "client.key"}
    missing = pki / "nope.pem"
    for unusable, why in (
        (missing, "cannot read '{}': No such file or directory; give the path of a readable"),
        (pki / "client.key" if flag != "--key" else pki / "client.crt", "'{}' holds no PEM"),
    ):
        files[flag] = unusable
        flags = [str(part) for item in files.items() for part in item]
        result = featureserve("get", "--view", "v", "--keys", "1", "--target", NOBODY, *flags)
        assert result.returncode == 2, (result.returncode, result.stderr)
        (line,) = result.stderr.splitlines()
        assert line.startswith(f"featureserve: {option} ({flag}): {why.format(unusable)}"), line


def test_health_names_the_cause_once_when_every_check_failed_the_same_way() -> None:
    """Four lines of UNAVAILABLE said nothing of why; the details are printed once."""
    result = featureserve("health", "--target", NOBODY, "--timeout", "5")
    assert result.returncode == 1, result.stderr
    assert [line.split()[-1] for line in result.stdout.splitlines()] == ["UNAVAILABLE"] * 4
    (line,) = result.stderr.splitlines()
    assert line.startswith("featureserve: UNAVAILABLE: failed to connect"), line
    assert "Connection refused" in line, line


def test_a_client_certificate_turns_tls_on(pki: Path, server) -> None:
    """--cert and --key without --tls or --ca connected in plaintext, sending the token in
    clear; now they use TLS, which a plaintext server cannot answer."""
    mtls = ["--cert", str(pki / "client.crt"), "--key", str(pki / "client.key")]
    parser = argparse.ArgumentParser()
    add_connection_flags(parser)
    assert client_config(parser.parse_args(mtls)).tls
    plain = featureserve("health", "--target", server.target, "--timeout", "5")
    assert plain.stdout.splitlines()[0].split() == ["(server)", "SERVING"], plain.stderr
    over_tls = featureserve(
        "health", "--target", server.target, "--timeout", "3", "--token", "secret", *mtls
    )
    assert over_tls.returncode == 1, over_tls.stdout
    assert over_tls.stdout.splitlines()[0].split() == ["(server)", "UNAVAILABLE"]
    (cause,) = [ln for ln in over_tls.stderr.splitlines() if ln.startswith("featureserve:")]
    assert cause.startswith("featureserve: UNAVAILABLE: ") and "Ssl handshake failed" in cause
