"""Client subcommands of `featureserve` (health, and the feature and prediction commands)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import NoReturn

from clients.channel import MAX_TIMEOUT_S, ClientConfig, ConfigError, read_pem


def _timeout(text: str) -> float:
    """An argparse type: seconds above 0 and at most MAX_TIMEOUT_S (inf, nan, 0 or a negative
    number failed every call at once)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not 0 < seconds <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give the deadline per call in seconds, a number above 0 and at most "
            f"{MAX_TIMEOUT_S:g}"
        )
    return seconds


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--target, TLS and token flags shared by every client command."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM) to verify the server")
    parser.add_argument(
        "--cert", type=Path, help="client certificate (PEM) for mTLS; needs --key, implies --tls"
    )
    parser.add_argument(
        "--key", type=Path, help="client private key (PEM) for mTLS; needs --cert, implies --tls"
    )
    parser.add_argument("--token", help="bearer token")
    parser.add_argument(
        "--timeout",
        type=_timeout,
        default=10.0,
        help=f"deadline per call, seconds (above 0, at most {MAX_TIMEOUT_S:g})",
    )


def _usage_error(message: str) -> NoReturn:
    """Print `featureserve: message` as one line and exit 2, the exit code of a bad flag."""
    print(f"featureserve: {message}", file=sys.stderr)
    raise SystemExit(2)


def connection_problem(args: argparse.Namespace) -> str | None:
    """What makes the TLS flags unusable, naming the flags and the fix: half of an mTLS pair
    (gRPC aborts the process on it) or a PEM file that cannot be read (it was a traceback)."""
    if (args.cert is None) != (args.key is None):
        given, missing = ("--cert", "--key") if args.key is None else ("--key", "--cert")
        return (
            f"{given} is given without {missing}: mTLS needs both the client certificate "
            "(--cert) and its private key (--key); give both, or neither"
        )
    for option, path in (("root_certificates", args.ca), ("client_certificate", args.cert),
                         ("client_key", args.key)):  # fmt: skip
        try:
            read_pem(path, option)
        except ConfigError as exc:
            return exc.message
    return None


def client_config(args: argparse.Namespace) -> ClientConfig:
    """A ClientConfig from the shared connection flags (--ca, --cert and --key turn TLS on, as
    ClientConfig does)."""
    problem = connection_problem(args)
    if problem is not None:
        _usage_error(problem)
    return ClientConfig(
        target=args.target,
        tls=args.tls,
        root_certificates=args.ca,
        client_certificate=args.cert,
        client_key=args.key,
        token=args.token,
        timeout_s=args.timeout,
    )


def cmd_health(args: argparse.Namespace) -> int:
    """Print each service's health status; exit 0 only when all are SERVING."""
    from clients.health import print_health

    return print_health(client_config(args))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client subcommands."""
    p = subparsers.add_parser(
        "health", help="print each service's health", description="Check every service's health."
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_health)
