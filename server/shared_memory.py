"""Triton's system shared-memory extension: named regions of POSIX shared-memory objects that
clients register, and that ModelInfer reads input tensors from and writes output tensors to.

A region holds an open descriptor of its object rather than a mapping: tensors are copied with
pread and pwrite, so a client that shrinks its object meets an error instead of killing the server
with SIGBUS. The regions of one object (same device and inode) share one descriptor, and at most
MAX_REGIONS regions are registered at once, so registrations cannot use up the process's
descriptors. An input's bytes are copied out while its request is decoded, so neither a client
rewriting the region nor an Unregister afterwards can change a queued request. Everything runs on
the event loop: a descriptor is never closed while a copy uses it, and no lock is needed.

Under `--workers N` the registrations live in a GroupFile in the group's folder: Register and
Unregister change it under its lock before they answer, and a worker brings its descriptors in
line with it (one stat) each time a request names a region, so every request decoded after an
Unregister answered, on any worker, sees the region gone. A worker opens an object by its name
when it first meets the registration, so the file records the object's device and inode and a
worker refuses to serve another object found under the name. The server never unlinks an object.
"""

from __future__ import annotations

import errno
import itertools
import os
import resource
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import (
    InvalidRequestError,
    RegionChangedError,
    RegionExistsError,
    RegionNotFoundError,
    SharedMemoryLimitError,
)
from server.group_file import GroupFile

SHM_DIR = Path("/dev/shm")
"""Where Linux keeps the objects shm_open names."""
REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"
GROUP_STEM = "shared-memory"
"""The group file of a --workers group's registrations (shared-memory.json and .lock)."""
MAX_REGIONS = 4096
"""Most regions registered at once (in a --workers group: in the group)."""
_REGISTER = "SystemSharedMemoryRegister"
_CREATE_HINT = (
    "create it first (shm_open with O_CREAT then ftruncate, tritonclient.utils.shared_memory."
    "create_shared_memory_region, or Python's multiprocessing.shared_memory.SharedMemory("
    "create=True, size=...)) on the server's host, then register it"
)
_LINKED_HINT = (
    "under --workers each worker opens the object by its name, so the object must stay linked "
    "under that name, and be the same object, while it is registered (do not unlink it, as "
    "SharedMemory.unlink() and Python's resource tracker at exit do, before unregistering); "
    "register the region again (SystemSharedMemoryUnregister, then SystemSharedMemoryRegister) "
    "to fix it"
)


@dataclass(frozen=True, slots=True)
class Registration:
    """What SystemSharedMemoryRegister was given: the region's name, object key and span."""

    name: str
    key: str
    offset: int
    byte_size: int


Identity = tuple[int, int]
"""An object's (st_dev, st_ino)."""


@dataclass(eq=False, slots=True)
class SharedObject:
    """An open shared-memory object and how many registered regions use its descriptor."""

    fd: int
    identity: Identity
    regions: int = 0


@dataclass(eq=False, slots=True)
class Region:
    """A registered region as this process holds it: obj is None when this worker could not
    open an object another worker registered (error says why). generation tells apart two
    registrations of one name."""

    spec: Registration
    generation: int
    obj: SharedObject | None
    error: str = ""


@dataclass(frozen=True, slots=True)
class Slice:
    """Where one tensor's bytes are: `byte_size` bytes from `offset` of a region, checked to
    lie inside it."""

    region: Region
    offset: int
    byte_size: int


def object_path(key: str) -> Path:
    """The file shm_open(key) opens; InvalidRequestError for a key that could leave /dev/shm."""
    name = key.lstrip("/")
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise InvalidRequestError(
            f"{_REGISTER}: key {key!r} is not a shared-memory object name; give the name the "
            "object was created with by shm_open: '/' and a name without '/' or NUL, other "
            "than '.' and '..', e.g. '/input0'"
        )
    return SHM_DIR / name


def _out_of_descriptors(spec: Registration, path: Path, exc: OSError) -> SharedMemoryLimitError:
    """RESOURCE_EXHAUSTED for an open that failed with EMFILE or ENFILE, naming the limit."""
    if exc.errno == errno.EMFILE:
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        limit = f"the server process's open-file limit (RLIMIT_NOFILE) of {soft} descriptors"
    else:
        limit = "the host's open-file table (fs.file-max)"
    return SharedMemoryLimitError(
        f"{_REGISTER}: key {spec.key!r}: the server cannot open {path}: it has reached {limit}; "
        "unregister unused regions, or raise the limit"
    )


def _open_object(
    spec: Registration, registered: Identity | None = None
) -> tuple[int, os.stat_result]:
    """A read-write descriptor of the region's object and its stat; the span must lie inside
    the object and, when `registered` is given, it must be the object registered (by a worker
    of the group). InvalidRequestError (SharedMemoryLimitError: no descriptor left) naming the
    key (or the field) and the fix."""
    path = object_path(spec.key)
    # O_NOFOLLOW: a symbolic link in /dev/shm could point anywhere; O_NONBLOCK: opening a FIFO
    # planted there must fail the check below, not block the event loop.
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        if registered is not None:
            raise InvalidRequestError(
                f"object {spec.key!r} is no longer linked at {path}; " + _LINKED_HINT
            ) from None
        raise InvalidRequestError(
            f"{_REGISTER}: key {spec.key!r}: there is no shared-memory object {path}; "
            + _CREATE_HINT
        ) from None
    except OSError as exc:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            raise _out_of_descriptors(spec, path, exc) from None
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else exc.strerror
        raise InvalidRequestError(
            f"{_REGISTER}: key {spec.key!r}: the server cannot open {path} for reading and "
            f"writing ({why}); register an object the server's user may read and write"
        ) from None
    try:
        st = _check_object(fd, spec)
        if registered is not None and (st.st_dev, st.st_ino) != registered:
            raise InvalidRequestError(
                f"object {spec.key!r} at {path} is not the object that was registered (inode "
                f"{st.st_ino}, registered {registered[1]}: it was unlinked and another created "
                "under its name); " + _LINKED_HINT
            )
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _check_object(fd: int, spec: Registration) -> os.stat_result:
    """fd's stat; InvalidRequestError unless fd is a regular object that holds the region's
    span."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidRequestError(
            f"{_REGISTER}: key {spec.key!r} is not a shared-memory object (not a regular file); "
            + _CREATE_HINT
        )
    if spec.byte_size == 0:
        raise InvalidRequestError(
            f"{_REGISTER}: byte_size is 0; give the region's size in bytes (object "
            f"{spec.key!r} holds {st.st_size} bytes)"
        )
    end = spec.offset + spec.byte_size
    if end > st.st_size:
        raise InvalidRequestError(
            f"{_REGISTER}: offset {spec.offset} + byte_size {spec.byte_size} = {end} passes the "
            f"end of object {spec.key!r}, which holds {st.st_size} bytes; register at most "
            f"{max(st.st_size - spec.offset, 0)} bytes from offset {spec.offset}, or enlarge "
            "the object first"
        )
    return st


def _pread_exactly(fd: int, size: int, position: int) -> bytes:
    """size bytes from position, or fewer where the object ends (a pread reads at most ~2 GiB)."""
    parts = []
    while size:
        part = os.pread(fd, size, position)
        if not part:
            break
        parts.append(part)
        size -= len(part)
        position += len(part)
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _pwrite_all(fd: int, data: bytes, position: int) -> None:
    """Write all of data at position."""
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, position)
        view = view[written:]
        position += written


def _shrunk(tensor: str, region: Region, size: int) -> InvalidRequestError:
    """The error of a region whose object was shrunk below its registered span."""
    spec = region.spec
    return InvalidRequestError(
        f"{tensor}: region '{spec.name}' now ends past its object {spec.key!r}, which holds "
        f"{size} bytes against the registered offset {spec.offset} + byte_size "
        f"{spec.byte_size}; the object was truncated after it was registered: unregister the "
        "region and register it again"
    )


class SharedMemoryRegistry:
    """This process's registered regions (under --workers: its view of the group's file)."""

    def __init__(self, group_folder: Path | None = None) -> None:
        self._regions: dict[str, Region] = {}
        self._objects: dict[Identity, SharedObject] = {}
        self._file = GroupFile(group_folder, GROUP_STEM) if group_folder is not None else None
        self._generations = itertools.count(1)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        """Open the object `key` and register its span under `name` (for the whole group)."""
        if not name:
            raise InvalidRequestError(
                f"{_REGISTER}: name is empty; name the region (requests refer to it by name)"
            )
        spec = Registration(name, key, offset, byte_size)
        object_path(key)
        if self._file is None:
            self._refuse_taken(name, len(self._regions))
            obj = self._acquire(spec)
            self._regions[name] = Region(spec, next(self._generations), obj)
            return
        with self._file.locked():
            state = self._read_group()
            self._follow(state)
            self._refuse_taken(name, len(state["regions"]))
            generation = state["seq"] + 1
            obj = self._acquire(spec)
            region = Region(spec, generation, obj)
            state["seq"] = generation
            dev, ino = obj.identity
            state["regions"][name] = {
                "key": key,
                "offset": offset,
                "byte_size": byte_size,
                "generation": generation,
                "dev": dev,
                "ino": ino,
            }
            try:
                self._file.write(state)
            except BaseException:
                self._release(obj)
                raise
            self._regions[name] = region

    def unregister(self, name: str) -> None:
        """Unregister one region (a name nobody registered is no error, as in Triton), or every
        region when name is empty; the objects stay, only their descriptors close."""
        if self._file is None:
            for gone in [name] if name else list(self._regions):
                self._drop(gone)
            return
        with self._file.locked():
            state = self._read_group()
            regions = state["regions"]
            gone = [n for n in ([name] if name else list(regions)) if n in regions]
            if gone:
                for each in gone:
                    del regions[each]
                self._file.write(state)
            self._follow(state)

    def status(self, name: str) -> list[Registration]:
        """The registered regions by name, or the one named (RegionNotFoundError if none)."""
        self.refresh()
        if not name:
            return [self._regions[n].spec for n in sorted(self._regions)]
        region = self._regions.get(name)
        if region is None:
            raise RegionNotFoundError(
                f"no system shared-memory region named '{name}' is registered; "
                "SystemSharedMemoryStatus with an empty name lists those that are"
            )
        return [region.spec]

    def slice(self, tensor: str, name: str, offset: int, byte_size: int) -> Slice:
        """The span a tensor's parameters name, checked against the current registrations."""
        self.refresh()
        region = self._regions.get(name)
        if region is None:
            raise InvalidRequestError(
                f"{tensor}: parameter '{REGION}' names region '{name}', which is not "
                "registered; register it with SystemSharedMemoryRegister first"
            )
        if region.obj is None:
            raise InvalidRequestError(
                f"{tensor}: region '{name}' is registered, but this server process cannot "
                f"open it: {region.error}"
            )
        end = offset + byte_size
        if end > region.spec.byte_size:
            raise InvalidRequestError(
                f"{tensor}: parameters '{OFFSET}' {offset} + '{BYTE_SIZE}' {byte_size} = {end} "
                f"pass the end of region '{name}' ({region.spec.byte_size} bytes); keep the "
                "tensor inside the region"
            )
        return Slice(region, offset, byte_size)

    def read(self, tensor: str, where: Slice) -> bytes:
        """A copy of the bytes at `where` (call it in the same step as slice(): nothing may
        unregister the region in between)."""
        region = where.region
        fd = region.obj.fd
        data = _pread_exactly(fd, where.byte_size, region.spec.offset + where.offset)
        if len(data) < where.byte_size:
            raise _shrunk(tensor, region, os.fstat(fd).st_size)
        return data

    def write(self, outputs: list[tuple[str, Slice, bytes]]) -> None:
        """Write each (tensor, where, data); every region must still be the one the request
        named (RegionChangedError) and its object still hold it, checked before any write."""
        self.refresh()
        for tensor, where, data in outputs:
            region = where.region
            if self._regions.get(region.spec.name) is not region:
                raise RegionChangedError(
                    f"{tensor}: region '{region.spec.name}' was unregistered (or registered "
                    "again) while the request ran, so no output was written; register it and "
                    "send the request again"
                )
            size = os.fstat(region.obj.fd).st_size
            if region.spec.offset + where.offset + len(data) > size:
                raise _shrunk(tensor, region, size)
        for _, where, data in outputs:
            _pwrite_all(where.region.obj.fd, data, where.region.spec.offset + where.offset)

    def refresh(self) -> None:
        """Under --workers, bring this worker's regions in line with the group's file when it
        changed (one stat when it did not)."""
        if self._file is not None:
            state = self._file.changed()
            if state is not None:
                self._follow(state)

    def close(self) -> None:
        """Close every descriptor (the server stops); the group's file is left to the others."""
        for name in list(self._regions):
            self._drop(name)

    def _read_group(self) -> dict[str, Any]:
        """The group's registrations as stored: {"seq": last generation, "regions": {...}}."""
        return self._file.read() or {"seq": 0, "regions": {}}

    def _follow(self, state: dict[str, Any]) -> None:
        """Close the regions the group's state no longer has (or has registered again), and
        open those it has that this worker does not, checking each is the object registered;
        an object that cannot be opened is kept as registered with its error, which the
        requests naming it get."""
        records = state["regions"]
        for name in list(self._regions):
            record = records.get(name)
            if record is None or record["generation"] != self._regions[name].generation:
                self._drop(name)
        for name, record in records.items():
            if name in self._regions:
                continue
            spec = Registration(name, record["key"], record["offset"], record["byte_size"])
            try:
                obj = self._acquire(spec, (record["dev"], record["ino"]))
            except (InvalidRequestError, SharedMemoryLimitError) as exc:
                self._regions[name] = Region(spec, record["generation"], None, str(exc))
            else:
                self._regions[name] = Region(spec, record["generation"], obj)

    def _refuse_taken(self, name: str, registered: int) -> None:
        """RegionExistsError when name is registered (Triton refuses to register it again),
        SharedMemoryLimitError when `registered` regions already make MAX_REGIONS."""
        region = self._regions.get(name)
        if region is not None:
            raise RegionExistsError(
                f"{_REGISTER}: a system shared-memory region named '{name}' is already "
                f"registered (key {region.spec.key!r}); unregister it first or choose another name"
            )
        if registered >= MAX_REGIONS:
            raise SharedMemoryLimitError(
                f"{_REGISTER}: {registered} regions are registered, the server's limit of "
                f"{MAX_REGIONS}; unregister unused regions (SystemSharedMemoryUnregister) first"
            )

    def _acquire(self, spec: Registration, registered: Identity | None = None) -> SharedObject:
        """The region's object, opened and checked (see _open_object), sharing the descriptor
        of the regions already on the same object; one more region counted on it."""
        fd, st = _open_object(spec, registered)
        identity = (st.st_dev, st.st_ino)
        obj = self._objects.get(identity)
        if obj is None:
            obj = self._objects[identity] = SharedObject(fd, identity)
        else:
            os.close(fd)
        obj.regions += 1
        return obj

    def _release(self, obj: SharedObject) -> None:
        """One region less on obj; its descriptor closes with the last."""
        obj.regions -= 1
        if not obj.regions:
            del self._objects[obj.identity]
            os.close(obj.fd)

    def _drop(self, name: str) -> None:
        """Forget a region, closing its object's descriptor if no other region uses it."""
        region = self._regions.pop(name, None)
        if region is not None and region.obj is not None:
            self._release(region.obj)
