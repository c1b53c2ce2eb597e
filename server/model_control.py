"""explicit and none model control under `featureserve serve --workers N`: one model state for the
group.

Each worker holds its own models, so a RepositoryModelLoad or RepositoryModelUnload reaches one
worker of N, and a worker the parent starts again after a crash would load the folder as it is
then. The group therefore keeps one state file in its private metrics folder (made 0700 by the
parent, known to every worker, removed with the group): per model, the sequence number of the
last load or unload, whether it is loaded, and the fingerprint of the files that load read
(sizes and modification times, model_repository). The worker taking a call changes its own
models, records the result, and answers once every worker has acknowledged it; every worker
follows the file (a stat every FOLLOW_INTERVAL_S) and loads a model only when its folder's
fingerprint is still the recorded one, so no worker ever serves other files than the rest.

The state is a group_file.GroupFile (atomic replacement, an flock around read-modify-writes,
followed by a stat). Each worker writes its own acknowledgements file, so acks need no lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.changes import Changes
from server.config import NONE, POLL
from server.errors import ModelLoadError, ModelUnavailableError
from server.group_file import GroupFile, read_json, write_json
from server.metrics import multiprocess_dir
from server.model_repository import ModelRepository
from server.workers import WORKERS_ENV, worker_index

log = logging.getLogger("featureserve.model_control")

STATE_STEM = "model-control"
ACK_FILE = "model-control-ack-{index}.json"
FOLLOW_INTERVAL_S = 0.1
"""How often a worker stats the state file: a change reaches every worker within this."""
ACK_WAIT_S = 30.0
"""The longest a load or unload waits for the other workers before answering UNAVAILABLE."""
ANSWER_MARGIN_S = 0.2
"""Time kept before the caller's deadline to answer (rather than be cut off by it)."""

TimeRemaining = Callable[[], float | None]


@dataclass(frozen=True)
class Record:
    """The group's last order for one model: files None means unloaded."""

    seq: int
    files: dict[str, Any] | None


@dataclass(frozen=True)
class Ack:
    """What one worker made of a model's record seq: ok, or why not."""

    seq: int
    ok: bool
    reason: str = ""


class GroupControl:
    """This worker's side of its group's model state: start-up, the calls it takes, the follower."""

    def __init__(self, repository: ModelRepository, folder: Path, index: int, workers: int) -> None:
        self.repository = repository
        self.folder = folder
        self.index = index
        self.workers = workers
        self.state = GroupFile(folder, STATE_STEM)
        self._applied: dict[str, int] = {}
        self._acks: dict[str, Ack] = {}
        self._lock = asyncio.Lock()
        self._changes = Changes()
        self._follower: asyncio.Task | None = None
        self._stopping = False

    @classmethod
    def of_this_worker(cls, repository: ModelRepository) -> GroupControl | None:
        """The group control of a --workers worker in explicit or none mode; None otherwise (a
        single process, or poll mode, where every worker's watcher follows the files)."""
        index, folder = worker_index(), multiprocess_dir()
        workers = int(os.environ.get(WORKERS_ENV, "1"))
        if index is None or folder is None or workers < 2 or repository.mode == POLL:
            return None
        return cls(repository, folder, index, workers)

    async def start(self) -> None:
        """Load this worker's models and follow the group from then on. With no state yet (the
        group is starting) it loads as one process does and, if first, records what it loaded;
        with a state (it was started again) it loads what the state records instead."""
        records = self._changed_records()
        if records is None:
            await self.repository.start()
            if not self._record_startup():
                await self._apply(self._changed_records() or {})
        else:
            await self.repository.start(follow=lambda: self._apply(records))
        if self.repository.mode != NONE:  # in none mode the record never changes after start-up
            self._follower = asyncio.create_task(self._follow(), name="model-control-follower")

    def begin_stop(self) -> None:
        """The worker is stopping: a load or unload waiting for the others answers at once."""
        self._stopping = True

    async def stop(self) -> None:
        """Stop following, and let a load or unload under way finish recording."""
        if self._follower is not None:
            self._follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._follower
            self._follower = None
        await self._changes.wait()

    async def load(self, name: str, time_remaining: TimeRemaining) -> None:
        """RepositoryModelLoad for the group: load here, record it, and answer once every worker
        has loaded the same files."""
        seq = await self._changes.run(self._change(name, self.repository.load))
        await self._confirmed(name, seq, "load", time_remaining)

    async def unload(
        self, name: str, time_remaining: TimeRemaining, dependents: bool = False
    ) -> None:
        """RepositoryModelUnload for the group: unload here (with dependents, an ensemble's
        composing models too), record it, and answer once every worker has unloaded it."""

        async def unload(model: str) -> None:
            await self.repository.unload(model, dependents)

        seq = await self._changes.run(self._change(name, unload))
        await self._confirmed(name, seq, "unload", time_remaining)

    async def _change(self, name: str, change: Callable[[str], Any]) -> int:
        """Apply a load or unload here and record every model it loaded or unloaded (an
        ensemble's composing models too, even when the ensemble's own load fails); returns the
        named model's seq. A load whose files changed on disk while it ran (a redeploy, or
        another worker's load of newer files) is not recorded: this worker goes back to the
        group's record, and the caller gets UNAVAILABLE (a retry loads the files now there)."""
        async with self._lock:
            try:
                await change(name)
            finally:
                seqs = self._record(self.repository.changed)
            seq = seqs.get(name, 0)
            if not seq:
                record = (self._read_records() or {}).get(name)
                await self._apply({name: record or Record(0, None)}, force=True)
                raise ModelUnavailableError(
                    f"model '{name}' changed on disk while worker {self.index} loaded it (a "
                    "redeploy, or another load), so its load is not recorded for the group and "
                    "the worker is back to the group's record; call RepositoryModelLoad again"
                )
        return seq

    def _record(self, names: list[str]) -> dict[str, int]:
        """Record the models a change here loaded or unloaded, in that order, each unless its
        files changed on disk since it loaded; acknowledge them and return their seqs."""
        if not names:
            return {}
        with self.state.locked():
            files = {}
            for name in names:
                loaded = self.repository.loaded_files(name)
                if loaded is None or loaded == self.repository.folder_files(name):
                    files[name] = loaded
            seqs = self._add_records(files) if files else {}
        self._acknowledge({name: Ack(seq, True) for name, seq in seqs.items()})
        return seqs

    async def _confirmed(
        self, name: str, seq: int, what: str, time_remaining: TimeRemaining
    ) -> None:
        """Wait until every worker acknowledged seq (or a later change): UNAVAILABLE naming those
        that did not within ACK_WAIT_S or the caller's deadline, FAILED_PRECONDITION naming those
        that failed."""
        remaining = time_remaining()
        wait = ACK_WAIT_S if remaining is None else min(ACK_WAIT_S, remaining - ANSWER_MARGIN_S)
        deadline = time.monotonic() + wait
        while True:
            acks = {i: self._ack_of(i, name) for i in range(self.workers)}
            missing = [i for i, ack in acks.items() if ack is None or ack.seq < seq]
            if not missing or time.monotonic() >= deadline or self._stopping:
                break
            await asyncio.sleep(FOLLOW_INTERVAL_S / 2)
        failed = {i: a.reason for i, a in acks.items() if a and a.seq == seq and not a.ok}
        unconfirmed = (
            f"worker {', '.join(map(str, missing))} did not confirm it "
            + (
                f"before worker {self.index} began to stop"
                if self._stopping
                else f"within {max(wait, 0):.1f} s (starting, stalled or gone)"
            )
            + " and follows the record when it can"
        )
        if failed:
            reasons = "; ".join(f"worker {i}: {reason}" for i, reason in failed.items())
            raise ModelLoadError(
                f"{what} of model '{name}' is recorded for the group and done on worker "
                f"{self.index}, which took the call, but failed on {reasons}"
                + (f"; {unconfirmed}" if missing else "")
            )
        if missing:
            raise ModelUnavailableError(
                f"{what} of model '{name}' is done on worker {self.index}, which took the call, "
                f"and recorded for the group, but {unconfirmed}: check RepositoryIndex or "
                "ModelReady on it"
            )

    async def _follow(self) -> None:
        """Apply every change of the state file, checked every FOLLOW_INTERVAL_S; a failing pass
        is logged, never fatal."""
        while True:
            await asyncio.sleep(FOLLOW_INTERVAL_S)
            try:
                records = self._changed_records()
                if records is not None:
                    await self._apply(records)
            except Exception:
                log.exception("following the group's model state failed")

    async def _apply(self, records: dict[str, Record], force: bool = False) -> None:
        """Bring this worker's models in line with records newer than those it applied (force:
        with these records whatever it applied), and acknowledge each."""
        async with contextlib.nullcontext() if force else self._lock:
            acks = {}
            # In the order recorded: an ensemble's composing models before the ensemble.
            for name, record in sorted(records.items(), key=lambda item: item[1].seq):
                if not force and record.seq <= self._applied.get(name, 0):
                    continue
                try:
                    reason = await self.repository.follow(name, record.files)
                except Exception as exc:  # acknowledged all the same: a caller waits for it
                    log.exception("model %s: following the group's record failed", name)
                    reason = f"{type(exc).__name__}: {exc}"
                acks[name] = Ack(record.seq, not reason, reason)
            if acks:
                self._acknowledge(acks)

    def _changed_records(self) -> dict[str, Record] | None:
        """The state's records when the file changed since the last call (or appeared); None
        when it did not, or does not exist."""
        return self._records(self.state.changed())

    def _read_records(self) -> dict[str, Record] | None:
        """Every model's record in the state file, or None when there is none yet."""
        return self._records(self.state.read())

    @staticmethod
    def _records(state: dict[str, Any] | None) -> dict[str, Record] | None:
        """The records of a state file's value (None: no state)."""
        if state is None:
            return None
        return {name: Record(r["seq"], r["files"]) for name, r in state["models"].items()}

    def _record_startup(self) -> bool:
        """Record the models this worker loaded at start-up, unless another worker recorded
        first (False then)."""
        with self.state.locked():
            if self.state.path.exists():
                return False
            ensemble = {m.name: bool(m.config.ensemble) for m in self.repository.loaded()}
            loaded = sorted(ensemble, key=lambda name: (ensemble[name], name))  # ensembles last
            seqs = self._add_records({n: self.repository.loaded_files(n) for n in loaded})
        self._acknowledge({name: Ack(seq, True) for name, seq in seqs.items()})
        log.info("recorded the group's start-up models", extra={"models": loaded})
        return True

    def _add_records(self, files: dict[str, dict[str, Any] | None]) -> dict[str, int]:
        """Record each model as loaded from files (None: unloaded) under a new seq, the caller
        holding the state lock; returns the seqs."""
        state = self.state.read() or {"seq": 0, "models": {}}
        seqs = {}
        for name, loaded in files.items():
            state["seq"] += 1
            seqs[name] = state["seq"]
            state["models"][name] = {
                "seq": seqs[name],
                "loaded": loaded is not None,
                "files": loaded,
            }
        self.state.write(state)
        return seqs

    def _acknowledge(self, acks: dict[str, Ack]) -> None:
        """Publish what this worker made of the records it applied."""
        self._acks.update(acks)
        self._applied.update({name: ack.seq for name, ack in acks.items()})
        path = self.folder / ACK_FILE.format(index=self.index)
        write_json(path, {name: [a.seq, a.ok, a.reason] for name, a in self._acks.items()})

    def _ack_of(self, index: int, name: str) -> Ack | None:
        """Worker index's acknowledgement of a model's latest record it applied, if any."""
        acks = read_json(self.folder / ACK_FILE.format(index=index)) or {}
        return Ack(*acks[name]) if name in acks else None
