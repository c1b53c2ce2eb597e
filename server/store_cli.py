"""Store maintenance commands that open the LMDB store directly, beside running servers:
`featureserve backup` and `featureserve compact-history`."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

STORE_MAX_DBS = 32768
"""LMDB handle slots of a command that may open any view version's databases: a store holds
at most this many."""


def register(subparsers: argparse._SubParsersAction) -> None:
    """The `backup` and `compact-history` subcommands."""
    add_backup(subparsers)
    add_compact_history(subparsers)


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """--config and --data-dir, which name the store a command opens (see open_store_dir)."""
    p.add_argument("--config", type=Path, help="TOML config file to read data_dir from")
    p.add_argument("--data-dir", type=Path, help="the store (default: the config's, ./data)")


def store_dir(args: argparse.Namespace) -> Path:
    """The data dir --data-dir or --config names; ConfigError naming the flag or key when it
    holds no store."""
    from server.config import ConfigError, load_config

    data_dir = load_config(args.config, {"data_dir": args.data_dir}).data_dir
    if not (data_dir / "data.mdb").is_file():
        raise ConfigError(f"--data-dir {data_dir} holds no store (no data.mdb)")
    return data_dir


def _stopped(stop: Stopped, what: str, after: str) -> int:
    """Say that a stop signal ended `what` and what that left; the exit code a shell reports
    for a process the signal killed."""
    name = signal.Signals(stop.signum).name
    print(f"featureserve: {what} stopped by {name}; {after}", file=sys.stderr)
    return 128 + stop.signum


def add_backup(subparsers: argparse._SubParsersAction) -> None:
    """The `backup` subcommand."""
    p = subparsers.add_parser(
        "backup",
        help="copy the store consistently while servers keep serving",
        description="Write a consistent copy of the store (registry, online rows of every view "
        "version, history) into DEST/data.mdb: one LMDB read transaction's snapshot, taken "
        "while servers keep serving and writing. Restore by serving with --data-dir DEST.",
    )
    p.add_argument("dest", type=Path, metavar="DEST", help="a new or empty directory")
    p.add_argument("--config", type=Path, help="TOML config file to read data_dir from")
    p.add_argument(
        "--data-dir", type=Path, help="the store to back up (default: the config's, ./data)"
    )
    p.add_argument(
        "--compact",
        action="store_true",
        help="leave out free pages: a smaller file, more CPU (restore from it to shrink a store)",
    )
    p.set_defaults(func=cmd_backup)


def add_compact_history(subparsers: argparse._SubParsersAction) -> None:
    """The `compact-history` subcommand."""
    p = subparsers.add_parser(
        "compact-history",
        help="drop history rows no training query at or after a horizon needs",
        description="Compact the history log of a view (every version) or of every view, "
        "while servers keep serving and writing: rows that no point-in-time query with a label "
        "at or after the horizon, and no rebuild, selects are dropped; labels before the "
        "horizon are refused from then on. LMDB reuses the freed pages for new writes.",
    )
    p.add_argument("view", nargs="?", help="view name (default: every view)")
    p.add_argument("--version", type=int, help="one version of VIEW (default: all versions)")
    horizon = p.add_mutually_exclusive_group(required=True)
    horizon.add_argument(
        "--keep", metavar="DURATION", help="keep this much history before now, e.g. 30d, 12h"
    )
    horizon.add_argument(
        "--before",
        metavar="TIME",
        help="the horizon as an ISO 8601 time, e.g. 2026-11-01T00:00:00Z (UTC if no offset)",
    )
    add_store_flags(p)
    p.add_argument(
        "--rows-per-txn",
        type=int,
        default=None,
        help="rows rewritten per write transaction (default 10000): writers wait for one",
    )
    p.set_defaults(func=cmd_compact_history)


def _horizon_us(args: argparse.Namespace) -> int:
    """The horizon the flags give, in µs since the epoch; ValueError naming the flag."""
    if args.keep is not None:
        from featurestore.definitions import parse_duration

        try:
            keep_s = parse_duration(args.keep)
        except ValueError as exc:
            raise ValueError(f"--keep: {exc}") from None
        horizon_us = time.time_ns() // 1000 - keep_s * 1_000_000
        if horizon_us < 1:
            raise ValueError(f"--keep: {args.keep} reaches back before 1970; keep less")
        return horizon_us
    try:
        when = datetime.fromisoformat(args.before)
    except ValueError:
        raise ValueError(
            f"--before: {args.before!r} is not an ISO 8601 time; give e.g. 2026-11-01T00:00:00Z"
        ) from None
    when = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if when > datetime.now(UTC):
        raise ValueError(
            f"--before: {args.before} is in the future, so every training query would be "
            "refused; give a past time"
        )
    horizon_us = int(when.timestamp()) * 1_000_000 + when.microsecond
    if horizon_us < 1:
        raise ValueError(f"--before: {args.before} is not after 1970-01-01T00:00:00Z")
    return horizon_us


def cmd_compact_history(args: argparse.Namespace) -> int:
    """Compact the chosen view versions' history logs; one line per version. Exit 2 for a bad
    flag; a SIGINT or SIGTERM stops it between two write transactions (what was compacted
    stays so, and the log is consistent) and it exits 128 + the signal's number."""
    from featurestore.history import REBUILD_ROWS_PER_TXN
    from featurestore.history_retention import Recreated, compact_views
    from featurestore.online_store import OnlineStore, StoreConfig
    from server.config import ConfigError

    if args.version is not None and args.view is None:
        print("featureserve: --version needs a VIEW", file=sys.stderr)
        return 2
    if args.version is not None and args.version < 1:
        print(
            f"featureserve: --version {args.version}: give a version from 1 (leave it out "
            "for every version of VIEW)",
            file=sys.stderr,
        )
        return 2
    try:
        horizon_us = _horizon_us(args)
        data_dir = store_dir(args)
    except (ConfigError, ValueError) as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 2
    rows_per_txn = REBUILD_ROWS_PER_TXN if args.rows_per_txn is None else args.rows_per_txn
    if rows_per_txn < 1:
        print(f"featureserve: --rows-per-txn {rows_per_txn}: give at least 1", file=sys.stderr)
        return 2
    try:
        with (
            stop_signals_raise(),
            OnlineStore(StoreConfig(data_dir, max_dbs=STORE_MAX_DBS)) as store,
        ):
            for done in compact_views(
                store, horizon_us, args.view, args.version, max_rows_per_txn=rows_per_txn
            ):
                if isinstance(done, Recreated):
                    print(
                        f"{done.view} v{done.version}: deleted and created again while it was "
                        "compacted; its new history is left for the next run",
                        flush=True,
                    )
                    continue
                horizon = datetime.fromtimestamp(done.horizon_us / 1e6, UTC).isoformat()
                print(
                    f"{done.view} v{done.version}: dropped {done.rows_dropped} of "
                    f"{done.rows_before} logged rows ({done.records_rewritten} records "
                    f"rewritten, {done.records_deleted} deleted); horizon {horizon}",
                    flush=True,
                )
    except Stopped as stop:
        return _stopped(
            stop,
            "compact-history",
            "the log is consistent and what was compacted stays so (run it again to finish)",
        )
    return 0


@contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise Stopped in the main thread (one not ignored by the
    caller: a SIGINT ignored by nohup or `&` stays so); the previous handlers after."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig, handler in previous.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class Stopped(BaseException):
    """A stop signal (SIGINT, SIGTERM) raised as an exception in the main thread, so a command
    unwinds through its cleanup; a BaseException, as KeyboardInterrupt is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: object) -> None:
    """Raise Stopped for the first stop signal and ignore the ones after it, so they cannot cut
    the cleanup short."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    raise Stopped(signum)


def cmd_backup(args: argparse.Namespace) -> int:
    """Back up the store; print the snapshot's transaction id, bytes and seconds in one line.
    Exit 2 for a DEST or data dir it refuses, as for a bad flag. A SIGINT or SIGTERM stops it:
    the partial copy is removed and LMDB's reader slot freed, and it exits 128 + the signal's
    number, as a shell reports a process the signal killed."""
    from featurestore.backup import back_up
    from featurestore.errors import InvalidArgumentError
    from server.config import ConfigError, load_config

    try:
        with stop_signals_raise():
            data_dir = load_config(args.config, {"data_dir": args.data_dir}).data_dir
            done = back_up(data_dir, args.dest, args.compact)
    except (ConfigError, InvalidArgumentError) as exc:
        print(f"featureserve: {exc}", file=sys.stderr)
        return 2
    except Stopped as stop:
        return _stopped(
            stop,
            f"backup to DEST {args.dest}",
            "its partial copy was removed (run it again to back up)",
        )
    print(
        f"backed up {data_dir} to {done.path}: transaction {done.txn_id}, {done.size_bytes} "
        f"bytes{' (compact)' if done.compact else ''}, {done.seconds:.2f} s"
    )
    return 0
