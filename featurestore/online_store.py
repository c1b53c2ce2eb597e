"""LMDB online store: validated columnar writes (last-write-wins by event time) and batched reads.

One LMDB environment holds the registry, one named database of packed rows per view version and
the history log. Writes are prepared (validated, encoded) outside the write transaction, then
many prepared batches commit in one synced transaction.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from functools import partial
from operator import itemgetter
from pathlib import Path
from typing import TypeVar

import lmdb
import numpy as np

from featurestore.disk_errors import commit_failure, is_file_system_error
from featurestore.dtypes import DType, is_float, numpy_dtype, wrong_type
from featurestore.errors import (
    BadRowError,
    ConflictError,
    FeatureStoreError,
    InvalidArgumentError,
    NotFoundError,
    ResourceExhaustedError,
    UnavailableError,
)
from featurestore.history import (
    FIRST_RECORD,
    HORIZON_KEY,
    REBUILD_ROWS_PER_TXN,
    HistoryChunks,
    HistoryRecords,
    keep_newest,
    pack_batch,
    record_rows,
)
from featurestore.keys import EncodedKeys, encode_keys, key_rows, keys_per_entity
from featurestore.last_write_wins import (
    key_order,
    newest_per_key,
    pick,
    resolve,
    stored_events,
)
from featurestore.page_cache import Warmed, half_of_free_memory, read_into_page_cache
from featurestore.registry import (
    REGISTRY_DB,
    Entity,
    Feature,
    FeatureService,
    FeatureView,
    JoinKey,
    Registry,
    history_db_name,
    view_db_name,
)
from featurestore.row_codec import (
    MISSING_ROW,
    NO_CUTOFF,
    Block,
    DecodePlan,
    RowLayout,
    decode_rows,
    encode_rows,
    ttl_cutoff,
)

T = TypeVar("T")
NO_CONTEXT = nullcontext()
"""The default `committing` context of a write: none."""
_PLAN_CACHE_LIMIT = 1024
DATA_FILE = "data.mdb"
"""LMDB's data file inside the environment directory."""
READER_CHECK_S = 5.0
"""How often a writing process frees the reader slots of processes that died holding one."""

__all__ = [
    "Block",
    "OnlineStore",
    "PreparedBatch",
    "ReadResult",
    "RowError",
    "StoreConfig",
    "WriteBatch",
    "WriteResult",
    "definition_changed",
]


@dataclass
class StoreConfig:
    """Where the LMDB environment lives and the store's limits."""

    path: Path
    map_size: int = 1 << 30
    max_readers: int = 1024
    sync: bool = True
    max_clock_skew_seconds: int = 300
    max_rows_per_write: int = 100_000
    max_entities_per_read: int = 100_000
    max_dbs: int = 4096


@dataclass
class RowError:
    """A bad row (dropped under skip_bad_rows): its index in the batch, the column and why."""

    row: int
    column: str
    reason: str


@dataclass
class WriteBatch:
    """Columnar rows for one view: key columns, event times (µs), feature columns, null masks.

    FLOAT32_VECTOR columns are 2-D (rows x vector_length); STRING columns hold str (or UTF-8
    bytes; None is null). A null mask on a join key marks rows that are rejected (keys cannot be
    null). row_errors are rows the caller already found bad (a wire value that did not decode);
    they are rejected like the store's own. event_column is the event times' name in errors (the
    RPC names its field event_timestamps).
    """

    view: str
    keys: dict[str, np.ndarray]
    event_us: np.ndarray
    columns: dict[str, np.ndarray]
    nulls: dict[str, np.ndarray] = field(default_factory=dict)
    version: int = 0
    skip_bad_rows: bool = False
    row_errors: list[RowError] = field(default_factory=list)
    event_column: str = "event_us"


@dataclass
class PreparedBatch:
    """A validated, encoded batch ready for write_prepared (LMDB keys and packed rows).

    view is the definition the rows were encoded for: write_prepared fails the batch if that
    view version has been deleted (and perhaps re-created) since (see definition_changed).
    """

    view: FeatureView
    keys: list[bytes]
    rows: list[bytes]
    event_us: np.ndarray
    history: bytes
    rejected: int
    errors: list[RowError]

    @property
    def row_count(self) -> int:
        """Rows to write (what a group commit counts against its limit)."""
        return len(self.keys)


@dataclass
class WriteResult:
    """Counts of one batch: rows written, rows stale (older than stored), rows rejected."""

    written: int
    stale: int
    rejected: int
    errors: list[RowError]


@dataclass
class ReadResult:
    """One read: per-row event time (0 where not found) and status, and one block per dtype."""

    view: FeatureView
    event_us: np.ndarray
    row_status: np.ndarray
    blocks: list[Block]


class _ResizeGate:
    """Transactions hold it shared; remapping (set_mapsize), reopening the environment and
    deleting a named database hold it exclusively.

    LMDB unmaps the old map on resize, and closes this process's handle of a deleted database
    at once (its slot then goes to the next database opened), so no transaction of this process
    may be open then.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._active = 0
        self._waiting = 0

    def enter(self) -> None:
        with self._lock:
            self._active += 1

    def exit(self) -> None:
        with self._lock:
            self._active -= 1
            if self._waiting and self._active == 0:
                self._idle.notify_all()

    @contextmanager
    def shared(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.exit()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._lock:
            self._waiting += 1
            try:
                while self._active:
                    self._idle.wait()
            finally:
                self._waiting -= 1
            yield


class _DeadHandles(Exception):
    """Raised inside a write transaction that needs a database this process holds a handle of
    that another process deleted, or that found the handle table full while this process holds
    such handles: run_write reopens the environment and reruns."""


class LmdbEnv:
    """The LMDB environment with map growth, resize handling and named-database handles.

    Handles are cached per process; LMDB's table of them holds at most max_dbs. Deleting a
    database closes this process's handle (drop_db). Another process's handle of it stays in
    its table: LMDB looks a database up by name in each transaction, so reads through it see
    no rows, or the rows of a database created again under the name, but a write needing the
    database fails, and opening the name again returns the same handle. That process reopens
    its environment when it meets such a handle in a write, or when its table is full.
    """

    def __init__(self, config: StoreConfig) -> None:
        Path(config.path).mkdir(parents=True, exist_ok=True)
        self._config = config
        self.gate = _ResizeGate()
        self._write_lock = threading.Lock()
        self._open_lock = threading.RLock()
        self._dbs: dict[bytes, lmdb._Database] = {}
        self._cached_at: dict[bytes, int] = {}
        self.handles_cached = 0
        """How many handles this process has cached so far: a read txn may use only handles
        cached before it began (LMDB answers EINVAL for a handle opened after)."""
        self._opened: dict[bytes, lmdb._Database] = {}
        self.env = self._open(config.map_size)
        self._next_reader_check = time.monotonic() + READER_CHECK_S
        self._registry_db = self._ensure_db(REGISTRY_DB)

    def _open(self, map_size: int) -> lmdb.Environment:
        """Open the environment and free the reader slots of processes that died holding one (a
        worker killed mid-lookup): a dead reader's snapshot keeps LMDB from reusing any page
        freed after it, so the file grew for as long as the other processes ran."""
        config = self._config
        env = lmdb.open(
            str(config.path),
            map_size=map_size,
            max_readers=config.max_readers,
            max_dbs=config.max_dbs,
            sync=config.sync,
            metasync=config.sync,
            lock=True,
            readahead=False,
        )
        env.reader_check()
        return env

    def _ensure_db(self, name: bytes) -> lmdb._Database:
        db = self.existing_db(name)
        if db is None:
            db = self.run_write(lambda txn: self.db_in_write(name, txn))
        return db

    def _reopen(self) -> None:
        """Close and reopen the environment (with the write lock held): the only way to free
        the handle slots of databases that other processes deleted."""
        with self.gate.exclusive():
            map_size = self.env.info()["map_size"]
            self.env.close()
            self._dbs.clear()
            self._cached_at.clear()
            self.env = self._open(map_size)
            with self._open_lock:
                self._registry_db = self.env.open_db(REGISTRY_DB, create=False)
            self._cache(REGISTRY_DB, self._registry_db)

    def grow(self, size: int) -> None:
        """Remap to `size` bytes (0 = adopt the size another process set)."""
        with self.gate.exclusive():
            if size == 0 or size > self.env.info()["map_size"]:
                self.env.set_mapsize(size)

    def begin_read(self) -> lmdb.Transaction:
        """A read transaction; the caller must call gate.exit() after ending it."""
        while True:
            self.gate.enter()
            try:
                return self.env.begin()
            except lmdb.MapResizedError:
                self.gate.exit()
                self.grow(0)

    @contextmanager
    def read_txn(self) -> Iterator[lmdb.Transaction]:
        """A read transaction that sees everything committed before it began."""
        txn = self.begin_read()
        try:
            yield txn
        finally:
            txn.abort()
            self.gate.exit()

    def run_write(
        self,
        fn: Callable[[lmdb.Transaction], T],
        committing: AbstractContextManager[object] = NO_CONTEXT,
        exclusive: bool = False,
    ) -> T:
        """Run fn in a write transaction and commit (inside `committing`: the commit writes and
        syncs with the GIL released throughout); on MapFullError double the map and rerun, so
        `committing` may be entered more than once (a reusable context manager, not a
        generator). exclusive: no other transaction of this process runs alongside (needed to
        delete a database: see drop_db)."""
        with self._write_lock:
            self._free_dead_readers()
            while True:
                try:
                    with self.gate.exclusive() if exclusive else self.gate.shared():
                        return self._write_once(fn, committing)
                except lmdb.MapResizedError:
                    self.grow(0)
                except lmdb.MapFullError:
                    self.grow(self.env.info()["map_size"] * 2)
                except _DeadHandles:
                    self._reopen()

    def _free_dead_readers(self) -> None:
        """Every READER_CHECK_S, free the reader slots of processes that died holding one (a
        killed `featureserve backup` or offline reader): their snapshot keeps LMDB from reusing
        pages freed after it, so the file grew with every write until some process opened the
        store again. Writers check, as only writes free pages (a few µs per check)."""
        now = time.monotonic()
        if now >= self._next_reader_check:
            self._next_reader_check = now + READER_CHECK_S
            self.env.reader_check()

    def _write_once(
        self, fn: Callable[[lmdb.Transaction], T], committing: AbstractContextManager[object]
    ) -> T:
        """One attempt of run_write; handles opened by fn are cached once the commit succeeds
        (LMDB closes them if the transaction aborts)."""
        txn = self.env.begin(write=True)
        try:
            try:
                result = fn(txn)
                with committing:
                    txn.commit()
            except lmdb.Error as exc:
                if not is_file_system_error(exc):
                    raise
                raise commit_failure(Path(self._config.path), exc) from exc
        except BaseException:
            txn.abort()
            self._opened.clear()
            raise
        for name, db in self._opened.items():
            self._cache(name, db)
        self._opened.clear()
        return result

    def _cache(self, name: bytes, db: lmdb._Database) -> None:
        """Keep a handle whose opening has committed, stamped with when it was cached."""
        self._cached_at[name] = self.handles_cached
        self.handles_cached += 1
        self._dbs[name] = db

    def registry_db(self) -> lmdb._Database:
        """The named database holding the registry."""
        return self._registry_db

    def db_in_write(self, name: bytes, txn: lmdb.Transaction) -> lmdb._Database:
        """Open (creating if needed) a named database inside a write transaction.

        ResourceExhaustedError when LMDB's handle table (max_dbs) is full of live databases.
        A handle of a database another process deleted can neither write nor create it again
        (LMDB hands out the same handle for the name), so run_write then reopens and reruns.
        """
        db = self._dbs.get(name)
        if db is None:
            db = self._opened.get(name)
        if db is None:
            db = self._open_in_write(name, txn, create=True)
        if txn.get(name) is None:
            raise _DeadHandles
        return db

    def drop_db(self, name: bytes, txn: lmdb.Transaction) -> None:
        """Delete a named database (if it exists) in a write transaction run with
        exclusive=True, and forget its handle: LMDB closes it at once, even if txn aborts."""
        db = self._dbs.get(name)
        if db is None:
            db = self._opened.get(name)
        if db is None:
            db = self._open_in_write(name, txn, create=False)
        if db is None or txn.get(name) is None:
            return
        self._dbs.pop(name, None)
        self._cached_at.pop(name, None)
        self._opened.pop(name, None)
        txn.drop(db, delete=True)

    def _open_in_write(
        self, name: bytes, txn: lmdb.Transaction, create: bool
    ) -> lmdb._Database | None:
        try:
            with self._open_lock:
                db = self.env.open_db(name, txn=txn, create=create)
        except lmdb.NotFoundError:
            return None
        except lmdb.DbsFullError:
            if self._holds_dead_handles(txn):
                raise _DeadHandles from None
            raise self._dbs_full() from None
        self._opened[name] = db
        return db

    def _holds_dead_handles(self, txn: lmdb.Transaction) -> bool:
        """Whether this process holds a handle of a database that no longer exists."""
        return any(txn.get(name) is None for name in self._dbs)

    def _dbs_full(self) -> ResourceExhaustedError:
        limit = self._config.max_dbs
        return ResourceExhaustedError(
            f"no room for another LMDB database: max_dbs={limit} in the store config allows "
            f"{(limit - 1) // 2} view versions (2 databases each: online rows and history); "
            "delete view versions no longer used, or raise max_dbs in the store config "
            "(StoreConfig.max_dbs; lmdb_max_dbs in featureserve's server config)"
        )

    def view_db(self, name: str, version: int, txn: lmdb.Transaction) -> lmdb._Database:
        """The online rows database of a view version, created if needed (write txn)."""
        return self.db_in_write(view_db_name(name, version), txn)

    def existing_db(self, name: bytes) -> lmdb._Database | None:
        """A handle to a named database that exists, or None; cached once found. Call it
        outside any transaction, and use the handle only from cached_db inside one (a
        database deleted in between has no cached handle any more).

        LMDB keeps a handle opened in a read-only transaction only for that transaction, so
        this briefly takes the write lock (first use of a database in this process only).
        """
        db = self._dbs.get(name)
        if db is not None:
            return db
        with self._write_lock:
            while True:
                try:
                    with self.gate.shared(), self._open_lock:
                        db = self.env.open_db(name, create=False)
                except lmdb.NotFoundError:
                    return None
                except lmdb.MapResizedError:
                    self.grow(0)
                    continue
                except lmdb.DbsFullError:
                    with self.read_txn() as txn:
                        dead = self._holds_dead_handles(txn)
                    if not dead:
                        raise self._dbs_full() from None
                    self._reopen()
                    continue
                self._cache(name, db)
                return db

    def cached_db(self, name: bytes, before: int) -> lmdb._Database | None:
        """A handle this process already holds, without touching LMDB, if it was cached before
        `before` (handles_cached read before the transaction that will use it began)."""
        db = self._dbs.get(name)
        if db is None or self._cached_at[name] >= before:
            return None
        return db

    def close(self) -> None:
        """Close the environment once no transaction of this process is open."""
        with self._write_lock, self.gate.exclusive():
            self.env.close()


@dataclass
class _Plan:
    entity: Entity
    decode: DecodePlan
    db_name: bytes


@dataclass(frozen=True, slots=True)
class ViewRead:
    """One view of a multi-view read: its name, version (0 = latest) and features (None = all).
    A feature service's projection also has its alias and join_key_map (join key -> the key
    column that carries it; None: every join key is read from the column of its own name)."""

    view: str
    features: Sequence[str] | None = None
    version: int = 0
    alias: str = ""
    join_key_map: Mapping[str, str] | None = None

    @staticmethod
    def of_service(service: FeatureService) -> list[ViewRead]:
        """What a lookup by `service` reads: its references grouped by view, then each of its
        projections, in order."""
        reads = [
            ViewRead(view, wanted, version) for (view, version), wanted in service.reads.items()
        ]
        for p in service.projections:
            name, version = p.view_key
            reads.append(ViewRead(name, p.features or None, version, p.alias, p.join_key_map))
        return reads

    def projected_entity(self, entity: Entity) -> Entity:
        """`entity` with its join keys named by the key columns this projection takes them
        from: what encodes and checks its keys."""
        key_map = self.join_key_map or {}
        keys = tuple(JoinKey(key_map.get(k.name, k.name), k.dtype) for k in entity.join_keys)
        return Entity(f"{entity.name} as projection {self.alias}", keys)

    def described(self, fv: FeatureView) -> str:
        """This read of `fv` as errors about its keys name it: the view version, and the alias
        of a projection."""
        view = f"feature view {fv.name!r} v{fv.version}"
        return f"projection {self.alias!r} ({view})" if self.alias else view


@dataclass(slots=True)
class _Fetched:
    """One view's stored rows from a read txn (None: no rows stored yet), before decoding."""

    view: FeatureView
    plan: _Plan
    n: int
    rows: list[bytes] | None

    def decode(self, now_us: int) -> ReadResult:
        """Decoded columns; rows older than the view's ttl_seconds are OUTSIDE_MAX_AGE."""
        ttl = self.view.ttl_seconds
        cutoff = ttl_cutoff(now_us, ttl) if ttl else NO_CUTOFF
        rows = [MISSING_ROW] * self.n if self.rows is None else self.rows
        decoded = decode_rows(self.plan.decode, rows, np.full(self.n, cutoff, np.int64))
        return ReadResult(self.view, decoded.event_us, decoded.row_status, decoded.blocks)


class OnlineStore:
    """Latest feature values per entity and view version, in one LMDB environment."""

    def __init__(self, config: StoreConfig) -> None:
        self.config = config
        self._lmdb = LmdbEnv(config)
        self.registry = Registry(self._lmdb, config.max_dbs)
        self._plans: dict[tuple, _Plan] = {}
        self._layouts: dict[tuple[str, int, int], RowLayout] = {}
        self._closed = False

    def __enter__(self) -> OnlineStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the environment; later calls raise UnavailableError."""
        if not self._closed:
            self._closed = True
            self._lmdb.close()

    def _check_open(self) -> None:
        if self._closed:
            raise UnavailableError("the online store is closed")

    @property
    def map_size(self) -> int:
        """The current LMDB map size in bytes (it doubles when full)."""
        return self._lmdb.env.info()["map_size"]

    def databases_needed(self) -> int:
        """LMDB databases this store can come to hold: the registry, and each stored view
        version's online rows and history (max_dbs must be at least this)."""
        return 1 + 2 * len(self.registry.list_views(all_versions=True))

    def warm_page_cache(self, budget_s: float = float("inf")) -> Warmed:
        """Read the environment's data file into the OS page cache, for at most budget_s and
        at most half the free memory."""
        self._check_open()
        path = Path(self.config.path) / DATA_FILE
        return read_into_page_cache(path, budget_s, half_of_free_memory())

    def _layout(self, view: FeatureView) -> RowLayout:
        key = (view.name, view.version, len(view.features))
        layout = self._layouts.get(key)
        if layout is None or layout.view != view:
            layout = RowLayout(view)
            self._layouts[key] = layout
        return layout

    def prepare(self, batch: WriteBatch, now_us: int | None = None) -> PreparedBatch:
        """Validate and encode a batch outside any transaction.

        Raises InvalidArgumentError naming the column and first bad row (or drops bad rows into
        RowErrors when skip_bad_rows), NotFoundError for unknown views or features,
        ResourceExhaustedError over max_rows_per_write. A batch of zero rows is valid and may
        leave out key and feature columns.
        """
        self._check_open()
        now_us = time.time_ns() // 1000 if now_us is None else int(now_us)
        view = self.registry.get_view(batch.view, batch.version)
        entity = self.registry.get_entity(view.entity)
        ev = batch.event_column
        event_us = np.asarray(batch.event_us)
        if event_us.ndim != 1 or (event_us.dtype.kind not in "iu" and len(event_us)):
            raise InvalidArgumentError(
                f"{ev} must be a 1-D integer array of µs since the epoch, got dtype "
                f"{event_us.dtype} shape {event_us.shape}"
            )
        n = len(event_us)
        if n > self.config.max_rows_per_write:
            raise ResourceExhaustedError(
                f"batch has {n} rows, over max_rows_per_write={self.config.max_rows_per_write}; "
                "split it"
            )
        event_us = event_us.astype(np.int64)
        key_count = key_rows(entity, batch.keys, n)
        if key_count != n:
            raise InvalidArgumentError(f"key columns have {key_count} rows, {ev} has {n}")
        columns, nulls = self._check_columns(view, entity, batch, n)
        if n == 0:
            return PreparedBatch(view, [], [], event_us, pack_batch([], []), 0, [])
        bad = [(e.row, e.column, e.reason) for e in batch.row_errors]
        for key in entity.join_keys:
            if key.name in batch.nulls:
                null = _null_mask(batch.nulls, key.name, n)
                bad.extend(
                    (row, key.name, "join key is null; keys cannot be null: send a value")
                    for row in np.flatnonzero(null).tolist()
                )
        skew = self.config.max_clock_skew_seconds
        limit = now_us + skew * 1_000_000
        for row in np.flatnonzero(event_us > limit).tolist():
            bad.append((row, ev, f"event time is after now + max_clock_skew_seconds={skew}"))
        for row in np.flatnonzero(event_us <= 0).tolist():
            bad.append((row, ev, "event time must be > 0 µs since the epoch"))
        encoded: EncodedKeys = encode_keys(entity, batch.keys)
        bad.extend(encoded.errors)
        strings = self._check_values(view, columns, nulls, bad)
        errors = _first_per_row(bad)
        if errors and not batch.skip_bad_rows:
            first = errors[0]
            raise BadRowError(
                f"column {first.column!r} row {first.row}: {first.reason}; fix the row, or set "
                f"skip_bad_rows to drop bad rows ({len(errors)} bad rows)",
                first.row,
            )
        keys = encoded.keys
        if errors:
            keep = np.ones(n, np.bool_)
            keep[[e.row for e in errors]] = False
            idx = np.flatnonzero(keep)
            keys = [keys[i] for i in idx]
            event_us = event_us[idx]
            columns = {k: v[idx] for k, v in columns.items()}
            nulls = {k: v[idx] for k, v in nulls.items()}
            strings = {k: [v[i] for i in idx] for k, v in strings.items()}
        rows = encode_rows(self._layout(view), event_us, now_us, {**columns, **strings}, nulls)
        return PreparedBatch(
            view, keys, rows, event_us, pack_batch(keys, rows), len(errors), errors
        )

    def _check_columns(
        self, view: FeatureView, entity: Entity, batch: WriteBatch, n: int
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        for name in batch.columns:
            view.feature(name)
        key_names = {k.name for k in entity.join_keys}
        for name in batch.nulls:
            if name not in key_names:
                view.feature(name)
        columns: dict[str, np.ndarray] = {}
        nulls: dict[str, np.ndarray] = {}
        for feat in view.features:
            if feat.name not in batch.columns:
                if n == 0:
                    continue
                raise InvalidArgumentError(
                    f"feature column {feat.name!r} of view {view.name!r} is missing; send every "
                    "feature and mark absent values in nulls"
                )
            col = np.asarray(batch.columns[feat.name])
            want_ndim = 2 if feat.dtype is DType.FLOAT32_VECTOR else 1
            if col.ndim != want_ndim or len(col) != n:
                shape = f"({n}, {feat.vector_length})" if want_ndim == 2 else f"({n},)"
                raise InvalidArgumentError(
                    f"feature column {feat.name!r} has shape {col.shape}, expected {shape}"
                )
            if want_ndim == 2 and col.shape[1] != feat.vector_length:
                raise InvalidArgumentError(
                    f"feature column {feat.name!r} has vectors of length {col.shape[1]}, the "
                    f"view declares vector_length={feat.vector_length}"
                )
            kinds = _KINDS[feat.dtype]
            if col.dtype.kind not in kinds and not (n == 0 and col.dtype.kind in "fO"):
                raise wrong_type(f"feature {feat.name!r} of view {view.name!r}", feat.dtype, col)
            columns[feat.name] = col
            if feat.name in batch.nulls:
                nulls[feat.name] = _null_mask(batch.nulls, feat.name, n)
        return columns, nulls

    def _check_values(
        self,
        view: FeatureView,
        columns: dict[str, np.ndarray],
        nulls: dict[str, np.ndarray],
        bad: list[tuple[int, str, str]],
    ) -> dict[str, list[bytes]]:
        """Row-level value checks (NaN, values the feature's dtype cannot hold exactly, string
        type and UTF-8); returns the string columns encoded to UTF-8 bytes and converts numeric
        columns in place to the feature's NumPy dtype."""
        strings: dict[str, list[bytes]] = {}
        for feat in view.features:
            col = columns[feat.name]
            null = nulls.get(feat.name)
            if feat.dtype is DType.STRING:
                strings[feat.name] = _encode_strings(col, feat.name, null, bad, nulls)
                continue
            if is_float(feat.dtype) and not feat.allow_nan and col.dtype.kind == "f":
                nan = np.isnan(col)
                if nan.ndim == 2:
                    nan = nan.any(axis=1)
                if null is not None:
                    nan &= ~null
                bad.extend(
                    (int(r), feat.name, "NaN but allow_nan is false") for r in nan.nonzero()[0]
                )
            columns[feat.name] = _convert(col, feat, null, bad)
        return strings

    def write_prepared(
        self,
        batches: Sequence[PreparedBatch],
        committing: AbstractContextManager[object] = NO_CONTEXT,
    ) -> list[WriteResult | FeatureStoreError]:
        """Write many prepared batches in ONE synced transaction (durable on return).

        Last-write-wins by event time, compared inside the transaction: a row older than the
        stored one counts as stale, and so does an equal one (a replay changes nothing). Batches
        without rows (empty, or every row rejected) need no transaction and get none. The
        commit (writing the pages and syncing them) runs inside `committing`.

        A batch that cannot be written gets its error in place of its WriteResult while the
        others commit: its view version was deleted or re-created since the batch was prepared
        (checked once per view version inside the transaction), or a new view version finds no
        room for its databases (ResourceExhaustedError naming max_dbs).
        """
        self._check_open()
        results: list[WriteResult | FeatureStoreError] = [
            WriteResult(0, 0, b.rejected, b.errors) for b in batches
        ]
        groups: dict[tuple[str, int], list[int]] = {}
        for i, batch in enumerate(batches):
            if batch.keys:
                groups.setdefault((batch.view.name, batch.view.version), []).append(i)
        if not groups:
            return results

        def work(txn: lmdb.Transaction) -> list[WriteResult | FeatureStoreError]:
            out = list(results)
            for (name, version), members in groups.items():
                current = self.registry.find_view(name, version, txn)
                live = []
                for i in members:
                    view = batches[i].view
                    error = definition_changed(name, version, view.created_us, current)
                    if error is None:
                        live.append(i)
                    else:
                        out[i] = error
                if live:
                    self._write_group(txn, name, version, [batches[i] for i in live], live, out)
            return out

        return self._lmdb.run_write(work, committing)

    def _write_group(
        self,
        txn: lmdb.Transaction,
        name: str,
        version: int,
        group: list[PreparedBatch],
        positions: list[int],
        out: list[WriteResult | FeatureStoreError],
    ) -> None:
        """Apply one view version's batches and append them to its history; their results go
        to out[positions]."""
        try:
            db = self._lmdb.db_in_write(view_db_name(name, version), txn)
            hist = self._lmdb.db_in_write(history_db_name(name, version), txn)
        except ResourceExhaustedError as exc:
            for i in positions:
                out[i] = exc
            return
        accepted, replays = _apply_group(txn, db, group)
        for i, batch, (written, stale) in zip(positions, group, accepted, strict=True):
            out[i] = WriteResult(written, stale, batch.rejected, batch.errors)
        cur = txn.cursor(db=hist)
        seq = int.from_bytes(cur.key(), "big") + 1 if cur.last() else 1
        ends = np.cumsum([len(batch.keys) for batch in group]).tolist()
        for batch, end in zip(group, ends, strict=True):
            record = _history_record(batch, replays[end - len(batch.keys) : end])
            if record is not None:
                cur.put(seq.to_bytes(8, "big"), record, append=True)
                seq += 1

    def write(self, batch: WriteBatch, now_us: int | None = None) -> WriteResult:
        """prepare + write_prepared for one batch (raising its error, if any)."""
        result = self.write_prepared([self.prepare(batch, now_us)])[0]
        if isinstance(result, FeatureStoreError):
            raise result
        return result

    def _plan(self, view: FeatureView, features: Sequence[str] | None) -> _Plan:
        key = (
            view.name,
            view.version,
            view.updated_us,
            None if features is None else tuple(features),
        )
        plan = self._plans.get(key)
        if plan is None:
            names = [f.name for f in view.features] if features is None else list(features)
            plan = _Plan(
                self.registry.get_entity(view.entity),
                DecodePlan(self._layout(view), names),
                view_db_name(view.name, view.version),
            )
            if len(self._plans) >= _PLAN_CACHE_LIMIT:
                self._plans.clear()
            self._plans[key] = plan
        return plan

    def read(
        self,
        view: str,
        keys: dict[str, np.ndarray],
        features: Sequence[str] | None = None,
        version: int = 0,
        now_us: int | None = None,
    ) -> ReadResult:
        """Latest values of `features` (default all) for each entity row, in one read txn.

        Rows older than the view's ttl_seconds are withheld as OUTSIDE_MAX_AGE.
        """
        return self.read_many([ViewRead(view, features, version)], keys, now_us)[0]

    def read_many(
        self,
        reads: Sequence[ViewRead],
        keys: dict[str, np.ndarray],
        now_us: int | None = None,
    ) -> list[ReadResult]:
        """One ReadResult per view read, all for the same entity rows and from one snapshot:
        one read txn, so a write committed between two views' reads cannot show in one only,
        and the keys of each entity are encoded once. Views may be of several entities: `keys`
        then holds the join keys of all of them, and each view is read by its entity's."""
        return self._read_snapshot(lambda txn: reads, keys, now_us)

    def read_service(
        self,
        name: str,
        keys: dict[str, np.ndarray],
        now_us: int | None = None,
        visible: Callable[[FeatureService], bool] | None = None,
        select: Callable[[FeatureService], Sequence[ViewRead]] | None = None,
    ) -> list[ReadResult]:
        """read_many of the views the feature service `name` reads, the service resolved in
        the same read txn as the views: an apply that changes a view and the service together
        is seen whole or not at all. select(service) narrows it to the reads a caller needs
        of it (a model's bound features); by default every reference and projection is read
        (ViewRead.of_service). NotFoundError names an unknown service (or one `visible`
        refuses, as Registry.get_service answers)."""

        def resolve(txn: lmdb.Transaction) -> Sequence[ViewRead]:
            service = self.registry.get_service(name, txn, visible)
            return (select or ViewRead.of_service)(service)

        return self._read_snapshot(resolve, keys, now_us)

    def _read_snapshot(
        self,
        resolve: Callable[[lmdb.Transaction], Sequence[ViewRead]],
        keys: dict[str, np.ndarray],
        now_us: int | None,
    ) -> list[ReadResult]:
        """read_many of the reads `resolve` names in the read txn it is given."""
        self._check_open()
        lmdb_env = self._lmdb
        while True:
            usable = lmdb_env.handles_cached
            txn = lmdb_env.begin_read()
            try:
                fetched = self._fetch(txn, usable, resolve(txn), keys)
            except FeatureStoreError as exc:
                # an aborted read txn keeps its reader slot until it is freed, and the frames
                # of a failed read (an unknown view) hold it: a domain error needs none of them
                raise exc.with_traceback(None) from None
            finally:
                txn.abort()
                lmdb_env.gate.exit()
                del txn
            unopened = {f.plan.db_name for f in fetched if f.rows is None}
            if not any(lmdb_env.existing_db(name) is not None for name in unopened):
                break
        now = time.time_ns() // 1000 if now_us is None else int(now_us)
        return [f.decode(now) for f in fetched]

    def _fetch(
        self,
        txn: lmdb.Transaction,
        usable: int,
        reads: Sequence[ViewRead],
        keys: dict[str, np.ndarray],
    ) -> list[_Fetched]:
        """The stored rows of each read in txn; rows None where this process held no handle to
        the view's database when txn began (`usable`: handles_cached before it began). Views of
        several entities are each read by their own entity's join-key columns of `keys`, and a
        projection by the columns its join_key_map names."""
        planned = []
        for read in reads:
            fv = self.registry.get_view(read.view, read.version, txn)
            plan = self._plan(fv, read.features)
            entity = (
                plan.entity if read.join_key_map is None else read.projected_entity(plan.entity)
            )
            planned.append((read, fv, plan, entity))
        split = None
        if len({entity.name for _, _, _, entity in planned}) > 1:
            split = keys_per_entity(
                [(read.described(fv), entity) for read, fv, _, entity in planned], keys
            )
        encoded: dict[str, list[bytes]] = {}
        fetched = []
        for _, fv, plan, entity in planned:
            entity_keys = encoded.get(entity.name)
            if entity_keys is None:
                columns = keys if split is None else split[entity.name]
                entity_keys = encoded[entity.name] = encode_keys(entity, columns).keys
                if len(entity_keys) > self.config.max_entities_per_read:
                    raise ResourceExhaustedError(
                        f"read of {len(entity_keys)} entities is over max_entities_per_read="
                        f"{self.config.max_entities_per_read}; split it"
                    )
            db = self._lmdb.cached_db(plan.db_name, usable)
            rows = None
            if db is not None:
                get = txn.get
                rows = [get(k, MISSING_ROW, db) for k in entity_keys]
            fetched.append(_Fetched(fv, plan, len(entity_keys), rows))
        return fetched

    def view_bytes(self, view: str, version: int = 0) -> int:
        """Bytes of LMDB pages holding a view version's online rows (0 before its first write)."""
        fv = self.registry.get_view(view, version)
        return self._db_bytes(view_db_name(fv.name, fv.version))

    def history_bytes(self, view: str, version: int = 0) -> int:
        """Bytes of LMDB pages holding a view version's history log (0 before its first write):
        it grows with every accepted row until history retention compacts it."""
        fv = self.registry.get_view(view, version)
        return self._db_bytes(history_db_name(fv.name, fv.version))

    def _db_bytes(self, name: bytes) -> int:
        self._check_open()
        if self._lmdb.existing_db(name) is None:
            return 0
        usable = self._lmdb.handles_cached
        with self._lmdb.read_txn() as txn:
            db = self._lmdb.cached_db(name, usable)
            if db is None:
                return 0
            stat = txn.stat(db)
        pages = stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]
        return pages * stat["psize"]

    def history_records(self, name: str, version: int) -> HistoryRecords:
        """A view version's history records in write order, with their sequence numbers, its
        history horizon and its definition's created_us, all read in one transaction (the
        whole log in memory: history_chunks reads it a bounded chunk at a time)."""
        self._check_open()
        db_name = history_db_name(name, version)
        self._lmdb.existing_db(db_name)
        usable = self._lmdb.handles_cached
        with self._lmdb.read_txn() as txn:
            created_us = self.registry.get_view(name, version, txn).created_us
            db = self._lmdb.cached_db(db_name, usable)
            if db is None:
                return HistoryRecords(created_us, 0, [], [])
            cur = txn.cursor(db=db)
            horizon = int.from_bytes(cur.get(HORIZON_KEY) or bytes(8), "big")
            pairs = list(cur.iternext()) if cur.set_range(FIRST_RECORD) else []
        seqs = [int.from_bytes(key, "big") for key, _ in pairs]
        return HistoryRecords(created_us, horizon, seqs, [value for _, value in pairs])

    def history_chunks(
        self, name: str, version: int, max_rows: int, max_bytes: int
    ) -> HistoryChunks:
        """A view version's history as chunks of consecutive records (sequence number, record),
        each holding at most max_rows rows and max_bytes bytes (a bigger record goes alone) and
        copied out of the map in its own short read transaction, the next one resuming after
        the last number read: no snapshot is held while the caller reduces a chunk, so LMDB
        can reuse the pages writers free meanwhile, and records committed meanwhile are read
        too. The first transaction reads the horizon, the definition's created_us and the
        first chunk; each later one raises compaction's ConflictError (its reader) if the
        version was deleted and created again since, NotFoundError if it was deleted."""
        self._check_open()
        db_name = history_db_name(name, version)
        self._lmdb.existing_db(db_name)
        usable = self._lmdb.handles_cached

        def read(txn: lmdb.Transaction, start: bytes) -> list[tuple[int, bytes]]:
            db = self._lmdb.cached_db(db_name, usable)
            cur = txn.cursor(db=db) if db is not None else None
            chunk: list[tuple[int, bytes]] = []
            if cur is None or not cur.set_range(start):
                return chunk
            rows = size = 0
            for key, record in cur.iternext():
                rows, size = rows + record_rows(record), size + len(record)
                if chunk and (rows > max_rows or size > max_bytes):
                    break
                chunk.append((int.from_bytes(key, "big"), record))
            return chunk

        with self._lmdb.read_txn() as txn:
            created_us = self.registry.get_view(name, version, txn).created_us
            db = self._lmdb.cached_db(db_name, usable)
            horizon = txn.get(HORIZON_KEY, bytes(8), db) if db is not None else bytes(8)
            first = read(txn, FIRST_RECORD)

        def chunks() -> Iterator[list[tuple[int, bytes]]]:
            chunk = first
            while chunk:
                yield chunk
                with self._lmdb.read_txn() as txn:
                    self._same_definition(
                        txn, name, version, created_us, "history was read",
                        "history was left as it was", "compaction",
                    )  # fmt: skip
                    chunk = read(txn, (chunk[-1][0] + 1).to_bytes(8, "big"))

        return HistoryChunks(created_us, int.from_bytes(horizon, "big"), chunks())

    def rewrite_history(
        self,
        name: str,
        version: int,
        created_us: int,
        horizon_us: int,
        chunks: Sequence[Sequence[int]],
        rewrite: Callable[[int, bytes], bytes | None],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Move a view version's history horizon forward to horizon_us (never back) and rewrite
        its records, one write transaction per chunk of sequence numbers: rewrite(seq, record)
        gives what to store (the same object: leave it; None: delete it). The horizon is set in
        the first transaction, before any record changes. stop() is asked between transactions.
        ConflictError if the version was deleted and created again since created_us."""
        self._check_open()
        db_name = history_db_name(name, version)

        def work(txn: lmdb.Transaction, chunk: Sequence[int]) -> None:
            self._same_definition(
                txn, name, version, created_us, "history was compacted",
                "history was left as it was", "compaction",
            )  # fmt: skip
            cur = txn.cursor(db=self._lmdb.db_in_write(db_name, txn))
            stored = int.from_bytes(cur.get(HORIZON_KEY) or bytes(8), "big")
            if horizon_us > stored:
                cur.put(HORIZON_KEY, horizon_us.to_bytes(8, "big"))
            for seq in chunk:
                key = seq.to_bytes(8, "big")
                record = cur.get(key)
                if record is None:
                    continue
                record = bytes(record)
                new = rewrite(seq, record)
                if new is None:
                    cur.delete(key)
                elif new is not record:
                    cur.put(key, new)

        self._write_in_turns((partial(work, chunk=chunk) for chunk in chunks or [()]), stop)

    def _same_definition(
        self,
        txn: lmdb.Transaction,
        name: str,
        version: int,
        created_us: int,
        while_: str,
        left: str,
        job: str,
    ) -> None:
        """ConflictError unless the view version is still the definition created at created_us
        (a long job's later transaction met one deleted and created again)."""
        if self.registry.get_view(name, version, txn).created_us != created_us:
            raise ConflictError(
                f"feature view {name!r} v{version} was deleted and re-created while its "
                f"{while_}, so the new definition's {left}; run the {job} again"
            )

    def _write_in_turns(
        self,
        works: Iterable[Callable[[lmdb.Transaction], None]],
        stop: Callable[[], bool] = lambda: False,
    ) -> None:
        """Run each work in its own write transaction until stop() says to end."""
        held = 0.0
        for work in works:
            if stop():
                return
            # LMDB's writer lock is not fair: taken again at once, it kept the writers queued
            # during one transaction waiting through the next too; a short step aside lets them in
            time.sleep(held / 4)
            began = time.perf_counter()
            self._lmdb.run_write(work)
            held = time.perf_counter() - began

    def replace_online_rows(
        self,
        name: str,
        version: int,
        from_history: Callable[[Iterator[bytes]], Sequence[tuple[bytes, bytes]]],
        max_rows_per_txn: int = REBUILD_ROWS_PER_TXN,
    ) -> None:
        """Make a view version's online rows the (key, row) pairs from_history makes of its
        history records (each key's row the online store keeps after them), writing only the
        keys whose row differs, at most max_rows_per_txn of them per write transaction.

        One read transaction takes the records and the online rows (one snapshot); from_history
        gets the records as an iterator that copies them out of the map one at a time (it may
        reduce them as they come, in memory bounded by the keys), and the difference (rows to
        put, keys to delete) is computed after the read ends. A write logs every row it changes
        in its own transaction, so a key logged nothing after the snapshot still holds the row
        the snapshot saw: the difference is still exact for it, and a key outside the
        difference that was written since already holds the rebuilt row merged with those
        writes by last-write-wins. Each write transaction merges into its keys' rows the records
        logged after the snapshot (reduced by from_history as they come), by event time, the
        earlier logged row winning ties. Between transactions a reader sees each key's old row
        or its rebuilt one.
        """
        self._check_open()
        if not isinstance(max_rows_per_txn, int) or isinstance(max_rows_per_txn, bool):
            raise InvalidArgumentError(
                f"max_rows_per_txn: got {max_rows_per_txn!r}; give a whole number of rows"
            )
        if max_rows_per_txn < 1:
            raise InvalidArgumentError(
                f"max_rows_per_txn: got {max_rows_per_txn}; give at least 1 (the rows each "
                "write transaction of the rebuild changes)"
            )
        history, rows_db = history_db_name(name, version), view_db_name(name, version)
        self._lmdb.existing_db(history)
        self._lmdb.existing_db(rows_db)
        usable = self._lmdb.handles_cached
        with self._lmdb.read_txn() as txn:
            created_us = self.registry.get_view(name, version, txn).created_us
            db = self._lmdb.cached_db(history, usable)
            cur = txn.cursor(db=db) if db is not None else None
            after = int.from_bytes(cur.key(), "big") + 1 if cur and cur.last() else 1
            records = cur.iternext(keys=False) if cur and cur.set_range(FIRST_RECORD) else iter(())
            rebuilt = from_history(records)
            db = self._lmdb.cached_db(rows_db, usable)
            online = dict(txn.cursor(db=db)) if db is not None else {}
        changes = _difference(online, rebuilt)
        del online, rebuilt  # the snapshot's copies are not needed while writers wait
        logged: dict[bytes, bytes] = {}  # each key's newest row logged after the snapshot

        def work(txn: lmdb.Transaction, chunk: Sequence[tuple[bytes, bytes | None]]) -> None:
            nonlocal after
            self._same_definition(
                txn, name, version, created_us, "online rows were rebuilt from its history",
                "rows were left as they were", "rebuild",
            )  # fmt: skip
            cur = txn.cursor(db=self._lmdb.db_in_write(history, txn))
            if cur.set_range(after.to_bytes(8, "big")):
                keep_newest(logged, from_history(cur.iternext(keys=False)))
                cur.last()
                # committed records: a rerun of this transaction need not read them again
                after = int.from_bytes(cur.key(), "big") + 1
            if chunk:
                _apply_changes(txn, self._lmdb.view_db(name, version, txn), chunk, logged)

        steps = range(0, len(changes), max_rows_per_txn)  # none: nothing to commit
        self._write_in_turns(partial(work, chunk=changes[i : i + max_rows_per_txn]) for i in steps)


_KINDS = {
    DType.FLOAT32: "fiu",
    DType.FLOAT64: "fiu",
    DType.INT64: "iu",
    DType.BOOL: "b",
    DType.STRING: "OUS",
    DType.FLOAT32_VECTOR: "fiu",
}


def definition_changed(
    name: str, version: int, created_us: int, current: FeatureView | None
) -> FeatureStoreError | None:
    """Why a batch encoded for the definition of view `name` v`version` created at created_us
    must not be written now that the registry holds `current` for that version (None: none),
    or None if it may: an in-place update (added features, metadata) keeps created_us, and rows
    record their feature count, so rows encoded before it stay readable."""
    where = f"feature view {name!r} v{version}"
    if current is None:
        return NotFoundError(
            f"{where} was deleted after this batch was checked against it, so nothing was "
            "written; apply the view again (or write to an existing version) and resend the batch"
        )
    if current.created_us != created_us:
        return ConflictError(
            f"{where} was deleted and re-created since this batch was checked against it (the "
            f"batch was encoded for the definition created at {created_us} µs, the view now is "
            f"the one created at {current.created_us} µs), so nothing was written; resend the "
            "batch to check it against the current definition"
        )
    return None


def _null_mask(nulls: dict[str, np.ndarray], name: str, n: int) -> np.ndarray:
    """nulls[name], checked to be a bool array of one value per row."""
    mask = np.asarray(nulls[name])
    if mask.dtype != np.bool_ or mask.shape != (n,):
        raise InvalidArgumentError(
            f"nulls[{name!r}] must be a bool array of shape ({n},), got {mask.dtype} {mask.shape}"
        )
    return mask


def _convert(
    col: np.ndarray, feat: Feature, null: np.ndarray | None, bad: list[tuple[int, str, str]]
) -> np.ndarray:
    """col as the feature's NumPy dtype. A value the conversion would change beyond rounding
    (a finite float overflowing to inf, an integer a float dtype cannot hold exactly, an unsigned
    integer over the int64 range) rejects its row, unless the row is null there."""
    target = numpy_dtype(feat.dtype)
    if col.dtype == target:
        return col
    with np.errstate(over="ignore", invalid="ignore"):
        out = col.astype(target)
    scalar = feat.dtype is not DType.FLOAT32_VECTOR
    if target.kind == "f" and col.dtype.kind == "f":
        lost = np.isinf(out) & np.isfinite(col)
        why = (
            f"overflows {feat.dtype.name} (largest finite {np.finfo(target).max:.8g}); send a "
            "smaller value" + (" or declare the feature FLOAT64" if scalar else "")
        )
    elif target.kind == "f":
        info = np.iinfo(col.dtype)
        fits = (out >= float(info.min)) & (out < float(info.max) + 1.0)
        lost = ~fits | (np.where(fits, out, 0).astype(col.dtype) != col)
        why = (
            f"is not exactly representable as {feat.dtype.name} (it holds every integer up "
            f"to 2**{np.finfo(target).nmant + 1}); send it as a float"
            + (" or declare the feature INT64" if scalar else "")
        )
    elif col.dtype.kind == "u":
        lost = col > np.iinfo(np.int64).max
        why = "exceeds the int64 range"
    else:
        return out
    if lost.ndim == 2:
        lost = lost.any(axis=1)
    if null is not None:
        lost &= ~null
    rows = np.flatnonzero(lost).tolist()
    if scalar:
        bad.extend((row, feat.name, f"{col[row].item()!r} {why}") for row in rows)
    else:
        bad.extend((row, feat.name, f"a vector element {why}") for row in rows)
    return out


def _encode_strings(
    col: np.ndarray,
    name: str,
    null: np.ndarray | None,
    bad: list[tuple[int, str, str]],
    nulls: dict[str, np.ndarray],
) -> list[bytes]:
    out: list[bytes] = []
    none_rows: list[int] = []
    for row, value in enumerate(col.tolist()):
        if isinstance(value, str):
            try:
                out.append(value.encode())
            except UnicodeEncodeError:
                bad.append((row, name, "string is not valid Unicode (lone surrogate)"))
                out.append(b"")
        elif isinstance(value, bytes):
            try:
                value.decode()
            except UnicodeDecodeError:
                bad.append((row, name, "bytes are not valid UTF-8"))
            out.append(value)
        elif value is None:
            none_rows.append(row)
            out.append(b"")
        else:
            bad.append((row, name, f"expected str, got {type(value).__name__}"))
            out.append(b"")
    if none_rows:
        mask = np.zeros(len(out), np.bool_) if null is None else null.copy()
        mask[none_rows] = True
        nulls[name] = mask
    return out


def _first_per_row(bad: list[tuple[int, str, str]]) -> list[RowError]:
    first: dict[int, RowError] = {}
    for row, column, reason in sorted(bad, key=lambda e: e[0]):
        first.setdefault(row, RowError(row, column, reason))
    return list(first.values())


def _history_record(batch: PreparedBatch, replays: np.ndarray) -> bytes | None:
    """The batch's history record without its replays (None if nothing is left to log)."""
    if not replays.any():
        return batch.history
    keep = np.flatnonzero(~replays).tolist()
    if not keep:
        return None
    return pack_batch(pick(batch.keys, keep), pick(batch.rows, keep))


def _replays(
    events: np.ndarray, stored: np.ndarray, run: np.ndarray, applied: np.ndarray
) -> np.ndarray:
    """For rows in key order (as `resolve` takes them; run: each row's key number): whether
    each is stale with the very event time it lost to (the stored row's, or that of the key's
    last row applied before it in the commit), i.e. a replay or retry. The earlier write wins
    such ties wherever the history is read, so the row is not logged; a late (older) row is."""
    replays = np.zeros(len(events), np.bool_)
    stale = np.flatnonzero(~applied)
    if len(stale) == 0:
        return replays
    current = stored[stale]
    applied_at = np.flatnonzero(applied)
    if len(applied_at):
        prior = applied_at[np.maximum(np.searchsorted(applied_at, stale) - 1, 0)]
        same_key = (prior < stale) & (run[prior] == run[stale])
        current = np.where(same_key, events[prior], current)
    replays[stale] = events[stale] == current
    return replays


def _difference(
    online: dict[bytes, bytes], rebuilt: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes | None]]:
    """What turns the online rows into the rebuilt ones, in key order: (key, row) where the
    stored row differs or is missing, (key, None) where a key is stored with no rebuilt row.
    Consumes `online`."""
    changes: list[tuple[bytes, bytes | None]] = [
        (key, row) for key, row in rebuilt if online.pop(key, None) != row
    ]
    changes.extend((key, None) for key in online)
    changes.sort(key=itemgetter(0))
    return changes


def _apply_changes(
    txn: lmdb.Transaction,
    db: lmdb._Database,
    changes: Sequence[tuple[bytes, bytes | None]],
    logged: dict[bytes, bytes],
) -> None:
    """Store each change (a row, or None: delete the key), or the row logged for its key after
    the snapshot where that one has a newer event time."""
    if logged:
        late = [logged.get(key) for key, _ in changes]
        newer = stored_events(late) > stored_events([row for _, row in changes])
        changes = [
            (key, late_row if take else row)
            for (key, row), late_row, take in zip(changes, late, newer.tolist(), strict=True)
        ]
    txn.cursor(db=db).putmulti([(key, row) for key, row in changes if row is not None])
    for key in [key for key, row in changes if row is None]:
        txn.delete(key, db=db)


def _apply_group(
    txn: lmdb.Transaction, db: lmdb._Database, batches: list[PreparedBatch]
) -> tuple[list[tuple[int, int]], np.ndarray]:
    """Last-write-wins put of the batches' rows into db: (written, stale) per batch, and per
    row (in the batches' order) whether it is a replay, which the history does not log.

    Keys are visited in byte order (neighbouring B-tree pages stay hot in the CPU cache). Each
    key's newest row replaces the stored one in a single LMDB operation that returns the old
    row; where the old row was as new or newer, it is put back (rare: a replay or late data).
    """
    keys = [k for b in batches for k in b.keys]
    rows = [r for b in batches for r in b.rows]
    total = np.array([len(b.keys) for b in batches])
    events = np.concatenate([b.event_us for b in batches]) if keys else np.zeros(0, np.int64)
    owner = np.repeat(np.arange(len(batches)), total)
    order, starts = key_order(keys)
    events_in_order = events[order]
    newest = order[newest_per_key(events_in_order, starts)].tolist()
    cur = txn.cursor(db=db)
    old = list(map(cur.replace, pick(keys, newest), pick(rows, newest)))
    stored = stored_events(old)
    for i in np.flatnonzero(stored >= events[newest]).tolist():
        cur.put(keys[newest[i]], old[i])
    run = np.cumsum(starts) - 1
    stored_in_order = stored[run]
    applied_in_order = resolve(events_in_order, stored_in_order, starts)
    applied = np.empty(len(keys), np.bool_)
    applied[order] = applied_in_order
    replays = np.empty(len(keys), np.bool_)
    replays[order] = _replays(events_in_order, stored_in_order, run, applied_in_order)
    written = np.bincount(owner[applied], minlength=len(batches))
    counts = [(int(w), int(t - w)) for w, t in zip(written, total, strict=True)]
    return counts, replays
