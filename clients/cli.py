"""Client subcommands of `featureserve` (health, and the feature and prediction commands)."""

from __future__ import annotations

import argparse
from pathlib import Path

from clients.channel import ClientConfig


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    """--target, TLS and token flags shared by every client command."""
    parser.add_argument("--target", default="127.0.0.1:50051", help="server HOST:PORT")
    parser.add_argument("--tls", action="store_true", help="use TLS")
    parser.add_argument("--ca", type=Path, help="CA certificate (PEM) to verify the server")
    parser.add_argument("--cert", type=Path, help="client certificate (PEM) for mTLS")
    parser.add_argument("--key", type=Path, help="client private key (PEM) for mTLS")
    parser.add_argument("--token", help="bearer token")
    parser.add_argument("--timeout", type=float, default=10.0, help="deadline per call, seconds")


def client_config(args: argparse.Namespace) -> ClientConfig:
    """A ClientConfig from the shared connection flags."""
    return ClientConfig(
        target=args.target,
        tls=args.tls or args.ca is not None,
        root_certificates=args.ca,
        client_certificate=args.cert,
        client_key=args.key,
        token=args.token,
        timeout_s=args.timeout,
    )


def cmd_health(args: argparse.Namespace) -> int:
    """Print each service's health status; exit 0 only when all are SERVING."""
    from clients.health import check_health

    statuses = check_health(client_config(args))
    for service, status in statuses.items():
        print(f"{service or '(server)':40s} {status}")
    return 0 if all(s == "SERVING" for s in statuses.values()) else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the client subcommands."""
    p = subparsers.add_parser(
        "health", help="print each service's health", description="Check every service's health."
    )
    add_connection_flags(p)
    p.set_defaults(func=cmd_health)
