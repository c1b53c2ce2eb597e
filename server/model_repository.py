"""Triton-style model repository: models/<name>/config.toml + <version>/model.onnx, hot (un)loading.

Triton's model control modes (model_control_mode). poll: every model loads at start-up, then a
stat-based watcher loads new or changed versions and unloads removed ones without a restart, and
RepositoryModelLoad/Unload work too (Triton refuses them in poll mode; we took them before the
modes existed and keep them). explicit: only startup_models load at start-up, nothing watches
the folder, and models change only by RepositoryModelLoad/Unload. none: every model loads at
start-up and nothing changes them after; both RPCs are refused.

An unloading version stops taking requests and finishes its queued and running ones first.
A model that fails to load is reported (index, ModelReady false, log) and touches no other model;
so does a model folder the server cannot read (a symlink loop, a permission error).

A failed reload follows Triton: the version loaded before keeps serving and stays READY in the
index (Triton keeps the serving ModelInfo and drops the failed one), RepositoryModelLoad fails,
and the failure is logged. Unlike Triton, whose READY entry carries no reason, ours says
"serving the previously loaded version; reload failed: <reason>" so the index shows why the
files on disk are not what serves. A model or version that never loaded is UNAVAILABLE with the
reason, and so is a model with no version to serve (no <version>/model.onnx, or a version
policy that selects none of those on disk).

A version folder is named by a number from 1 in ASCII digits without leading zeros. As in Triton,
other folders are ignored; one of digits with a leading zero (01/, 0/) holding model.onnx is
also listed as an UNAVAILABLE entry of that name whose reason says which name to give it.
Model names in RepositoryModelLoad and RepositoryModelUnload must be one folder name, so that a
request can never reach a file outside the repository.

A change (a load, an unload, a watcher pass) runs to its end even when whoever awaits it is
cancelled (a client's deadline, the server stopping; see server/changes.py).

An ensemble (platform "ensemble", server/ensemble.py) is a folder with config.toml and empty
version folders. Passes load ensembles after the other models, and whenever a model loads or
unloads a version, the ensembles that run it are checked again: one that failed loads, one whose
steps no longer fit the versions they now resolve to stops serving. RepositoryModelLoad of an
ensemble first loads its composing models that do not serve. While a composing model does not
serve, its ensembles are UNAVAILABLE (requests, ModelReady, RepositoryIndex) naming it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.batcher import DynamicBatcher
from server.changes import Changes
from server.config import (
    ALL_MODELS,
    EXPLICIT,
    NAME_MAX_BYTES,
    NONE,
    POLL,
    ConfigError,
    model_name_problem,
)
from server.ensemble import (
    EnsembleLoadError,
    EnsembleScheduler,
    check_no_cycle,
    check_steps,
    composing_models,
    step_version,
)
from server.errors import (
    ControlRefusedError,
    InvalidRequestError,
    ModelLoadError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from server.metrics import ModelMetrics
from server.model_config import (
    CONFIG_FILENAME,
    ENSEMBLE_PLATFORM,
    MODEL_FILENAME,
    ModelConfig,
    VersionPolicy,
    complete_config,
    load_model_config,
    resolve_warmup,
)
from server.onnx_runner import OnnxRunner, check_feedable
from server.prediction_binding import PredictionBinding, compile_binding
from server.response_cache import ResponseCache, VersionCache

if TYPE_CHECKING:
    from server.model_control import GroupControl

log = logging.getLogger("featureserve.models")

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"
UNLOADING = "UNLOADING"
RELOAD_FAILED = "serving the previously loaded version; reload failed: "

_Stat = tuple[int, int] | None


@dataclass(eq=False)
class LoadedModel:
    """One served model version: its completed config, its sessions, its batcher, its compiled
    binding when the config binds features for Predict, and its view of the response cache when
    the config enables it and the server has one. An ensemble has no sessions (runner None) and
    an EnsembleScheduler as its batcher."""

    name: str
    version: str
    config: ModelConfig
    runner: OnnxRunner | None
    batcher: DynamicBatcher | EnsembleScheduler
    path: Path
    output_names: list[str] = field(default_factory=list)
    binding: PredictionBinding | None = None
    cache: VersionCache | None = None


@dataclass
class VersionStatus:
    """A repository index entry; version "" describes the model as a whole (a config error, or
    no version to serve) while none of its versions serves."""

    name: str
    version: str
    state: str
    reason: str = ""


@dataclass
class _Fingerprint:
    """What the watcher compares between polls: file sizes and modification times, and why the
    folder could not be read in full ("" when it could)."""

    config: _Stat
    versions: dict[int, _Stat] = field(default_factory=dict)
    misnamed: dict[str, _Stat] = field(default_factory=dict)
    side: dict[str, _Stat] = field(default_factory=dict)
    unreadable: str = ""
    folders: list[int] = field(default_factory=list)
    """Every version folder, model.onnx or not (an ensemble's versions are empty folders)."""


def _version_number(text: str) -> int | None:
    """The version a folder or request names ("1", "12"), or None when text is not a number from
    1 in ASCII digits without leading zeros ("01", "0", "²", "-1", "")."""
    if text.isascii() and text.isdecimal() and text[0] != "0":
        return int(text)
    return None


def _misnamed_version(folder: Path, taken: list[int]) -> str:
    """Why a folder of digits with a leading zero is not served, and the name to give it."""
    number = int(folder.name)
    if number == 0 or number in taken:
        number = max(taken, default=0) + 1
    return (
        f"{folder}: ignored: a version folder is named by a number from 1 without leading "
        f"zeros; rename it to {folder.with_name(str(number))} to serve it"
    )


def _stat(path: Path) -> _Stat:
    """(mtime_ns, size) of a file, or None when it is absent."""
    try:
        st = path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_mtime_ns, st.st_size


def _no_servable_version(
    model_dir: Path, policy: VersionPolicy, found: list[int], ensemble: bool = False
) -> str:
    """Why a model has nothing to serve, and the fix. Only `specific` can select none of the
    versions on disk: latest and all select at least one whenever there is one."""
    if not found and ensemble:
        return (
            f"no version directory (1/, 2/, ...) in {model_dir}; an ensemble's versions are "
            f"empty folders: create {model_dir / '1'}"
        )
    if not found:
        return (
            f"no version directory (1/, 2/, ...) holding {MODEL_FILENAME} in {model_dir}; "
            f"add {model_dir / '1' / MODEL_FILENAME}"
        )
    wanted = ", ".join(str(v) for v in policy.specific)
    have = ", ".join(str(v) for v in sorted(found))
    return (
        f"version_policy specific = [{wanted}] in {model_dir / CONFIG_FILENAME} selects no "
        f"existing version; found {have}: list one of them in specific, or add "
        f"{model_dir / str(policy.specific[0]) / MODEL_FILENAME}"
    )


_STATE_WORDS = {
    LOADING: "is still loading",
    UNLOADING: "is unloading",
    UNAVAILABLE: "is unavailable",
}


def _state_sentence(status: VersionStatus) -> str:
    """An index entry that does not serve, as words for a message ("version 1 is unavailable:
    <reason>")."""
    who = f"version {status.version}" if status.version else "it"
    text = f"{who} {_STATE_WORDS.get(status.state, status.state.lower())}"
    return f"{text}: {status.reason}" if status.reason else text


def _unreadable(model_dir: Path, exc: OSError) -> str:
    """Why a model folder could not be read, naming the path and the fix."""
    path = exc.filename or model_dir
    return (
        f"{path}: cannot be read: {exc.strerror or exc}; make it readable by the server "
        "(fix the symlink or the permissions) or remove it"
    )


def _as_json(fp: _Fingerprint) -> dict[str, Any]:
    """A fingerprint as JSON values (what a --workers group records of the files it loaded)."""
    return json.loads(json.dumps(asdict(fp)))


def _fingerprint(model_dir: Path) -> _Fingerprint:
    """The stat of config.toml and of every <version>/model.onnx under a model folder, of the
    model.onnx in folders of ASCII digits that are not versions (01/, 0/), and of the files the
    config may name beside them (a labels file, warmup/ data): every other file of the folder,
    dotfiles (an editor's swap file) excepted, so editing one reloads the model as a changed
    config.toml does.

    Raises OSError when one of them exists but cannot be read (a symlink loop, permissions).
    """
    fp = _Fingerprint(_stat(model_dir / CONFIG_FILENAME))
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for child in model_dir.iterdir():
            if child.name.startswith(".") or child.name == CONFIG_FILENAME:
                continue
            if not (child.name.isascii() and child.name.isdecimal()):
                fp.side.update(_side_files(model_dir, child))
                continue
            stat = _stat(child / MODEL_FILENAME)
            version = _version_number(child.name)
            if version is not None and child.is_dir():
                fp.folders.append(version)
            if stat is None:
                continue
            if version is None:
                fp.misnamed[child.name] = stat
            else:
                fp.versions[version] = stat
    fp.folders.sort()
    return fp


def _available(config: ModelConfig, fp: _Fingerprint) -> dict[int, _Stat]:
    """The versions a model folder offers: those holding model.onnx, or for an ensemble every
    version folder."""
    if config.ensemble:
        return dict.fromkeys(fp.folders)
    return fp.versions


def _declares_ensemble(model_dir: Path) -> bool:
    """Whether a model folder's config.toml says platform = "ensemble" (False when it cannot
    be read: its load reports why)."""
    try:
        raw = tomllib.loads((model_dir / CONFIG_FILENAME).read_text())
    except (OSError, ValueError):
        return False
    return raw.get("platform") == ENSEMBLE_PLATFORM


def _side_files(model_dir: Path, child: Path) -> dict[str, _Stat]:
    """The stat of child, a file of a model folder beside its versions, or of every file under
    it (dotfiles excepted), by their paths relative to the folder. A file or folder that cannot
    be read counts as changed when that changes, without failing the fingerprint: nothing may
    name it (config.toml reports the files it names when it reads them)."""
    if not child.is_dir():
        return {child.name: _side_stat(child)}
    found: dict[str, _Stat] = {}

    def unreadable(exc: OSError) -> None:
        found[str(Path(exc.filename or child).relative_to(model_dir))] = (-1, exc.errno or 0)

    for root, dirs, files in os.walk(child, onerror=unreadable):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                path = Path(root, name)
                found[str(path.relative_to(model_dir))] = _side_stat(path)
    return found


def _side_stat(path: Path) -> _Stat:
    """_stat, or (-1, errno) for a file that cannot be read (a symlink loop, permissions)."""
    try:
        return _stat(path)
    except OSError as exc:
        return -1, exc.errno or 0


class ModelRepository:
    """The models under one folder, loaded per their version policy and kept in sync with it.

    mode is the model control mode (see the module docstring); watch and poll_interval_s apply
    to poll mode only, startup_models (["*"] = every model) to explicit mode only.
    control=False refuses load() and unload() (FAILED_PRECONDITION): under --workers N in poll
    mode each process holds its own repository state, so a load or unload would change one
    worker of N while the files, which every worker's watcher follows, stay the one shared truth.
    In explicit and none modes a --workers group shares one model state instead: group is then
    its GroupControl (server/model_control.py), through which RepositoryModelLoad/Unload go.
    response_cache_bytes > 0 gives the versions whose config sets response_cache = true one
    shared response cache of that many bytes."""

    def __init__(
        self,
        path: Path,
        *,
        watch: bool = True,
        poll_interval_s: float = 1.0,
        control: bool = True,
        response_cache_bytes: int = 0,
        mode: str = POLL,
        startup_models: Sequence[str] = (),
    ) -> None:
        self.path = Path(path)
        self.response_cache = ResponseCache(response_cache_bytes) if response_cache_bytes else None
        self.mode = mode
        self.startup_models = list(startup_models)
        self.watch = watch and mode == POLL
        self.poll_interval_s = poll_interval_s
        self.control = control
        self._served: dict[str, dict[int, LoadedModel]] = {}
        self._status: dict[tuple[str, str], VersionStatus] = {}
        self._model_errors: dict[str, str] = {}
        self._misnamed: dict[str, dict[str, str]] = {}
        self._fingerprints: dict[str, _Fingerprint] = {}
        self._unloaded: set[str] = set()
        self._unencodable: set[str] = set()
        """Folder names that are not UTF-8, skipped (and logged once each)."""
        self._lock = asyncio.Lock()
        self._watcher: asyncio.Task | None = None
        self._changes = Changes()
        self._poll_error = ""
        self.ready = False
        self.group: GroupControl | None = None
        self._warmups: set[threading.Event] = set()
        self._stopping = False
        self._ensembles: dict[str, ModelConfig] = {}
        """The config of every ensemble folder last read, served or not."""
        self._versions_changed: set[str] = set()
        """Models that loaded or unloaded a version since their ensembles were last checked
        again (_refresh_ensembles): the version a step resolves to may have changed."""
        self._gaps: dict[tuple[str, str], str] = {}
        """Why each served ensemble version cannot run, as last logged ("" once it can)."""
        self.changed: list[str] = []
        """The models the last load() or unload() loaded or unloaded, composing models before
        the ensembles that run them (what a --workers group records for its other workers)."""

    async def start(self, follow: Callable[[], Awaitable[None]] | None = None) -> None:
        """Load every model in the folder (in explicit mode, startup_models), then start the
        watcher (when watching). Unlike a watcher pass, this load is not shielded: a stop during
        start-up cancels it (at the end of the version loading then), rather than waiting for
        every model. follow, when given, loads instead (a --workers worker started again
        follows its group's recorded models, see server/model_control.py).

        Raises ConfigError naming a startup_models entry with no model folder, as Triton fails
        to start on a --load-model it cannot find."""
        if not self.path.is_dir():
            raise ModelNotFoundError(f"model repository {self.path} is not a folder")
        if follow is not None:
            await follow()
        elif self.mode == EXPLICIT and self.startup_models != [ALL_MODELS]:
            await self._load_startup_models()
        else:
            await self._poll()
        self.ready = True
        if self.watch:
            self._watcher = asyncio.create_task(self._watch(), name="model-repository-watcher")

    async def stop(self) -> None:
        """Stop the watcher and unload everything, letting in-flight requests finish (a load
        under way ends first; its warmup runs are cut short)."""
        self.ready = False
        self.begin_stop()
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        await self._changes.wait()
        async with self._lock:
            for name in list(self._served):
                for version in list(self._served[name]):
                    await self._unload_version(name, version, "server stopping")

    def begin_stop(self) -> None:
        """The server is stopping: cut the warmups under way short (their loads fail, so a
        server that stops does not wait for them: a warmup can run for as long as its config
        says), and stop a load or unload of the group waiting for the other workers."""
        self._stopping = True
        for warmup in self._warmups:
            warmup.set()
        if self.group is not None:
            self.group.begin_stop()

    async def _load_startup_models(self) -> None:
        """Explicit mode's start-up: load the models startup_models names, and only those."""
        missing = [
            name
            for name in self.startup_models
            if model_name_problem(name) or not (self.path / name).is_dir()
        ]
        if missing:
            raise ConfigError(
                f"key 'startup_models' (--load-model) names {', '.join(map(repr, missing))}, "
                f"which is not a model folder in {self.path}: add {self.path / missing[0]} "
                "or remove the name"
            )
        async with self._lock:
            for name in sorted(self.startup_models, key=self._ensemble_last):
                await self._load_composing(name, set())
                await self._sync(name, force=False)
            await self._refresh_ensembles()

    async def _watch(self) -> None:
        """Poll the folder every poll_interval_s; a failing pass is logged, never fatal: an
        unreadable repository folder once per distinct error, anything else with its traceback."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self.poll()
            except OSError as exc:
                error = f"model repository {self.path} cannot be read: {exc}; served models stay"
                if error != self._poll_error:
                    log.error("%s", error)
                self._poll_error = error
                continue
            except Exception:
                log.exception("model repository poll failed")
            self._poll_error = ""

    async def poll(self) -> None:
        """One watcher pass: bring every model folder's served versions in line with the disk."""
        await self._changes.run(self._poll())

    async def _poll(self) -> None:
        """poll() itself. A model unloaded on request is left alone while its folder exists; once
        the folder is gone, so is the model (a folder made again is a new model)."""
        async with self._lock:
            on_disk = self._model_folders()
            known = set(self._served) | set(self._fingerprints) | self._unloaded
            for name in sorted(on_disk | known, key=self._ensemble_last):
                if name in self._unloaded:
                    if name not in on_disk:
                        self._unloaded.discard(name)
                        self._forget(name)
                    continue
                await self._sync(name, force=False)
            await self._refresh_ensembles()

    def _ensemble_last(self, name: str) -> tuple[bool, str]:
        """Sort key that puts ensembles after the models they may run, then by name."""
        if name in self._ensembles:
            return True, name
        return name not in self._fingerprints and _declares_ensemble(self.path / name), name

    async def _load_composing(self, name: str, seen: set[str]) -> None:
        """Before an explicit load of an ensemble: load its composing models that do not serve
        (and theirs, for an ensemble of ensembles), as Triton does. Their failures show in their
        own entries, and in the ensemble's."""
        seen.add(name)
        if not _declares_ensemble(self.path / name):
            return
        try:
            config = load_model_config(self.path / name)
        except Exception:
            return  # the ensemble's own load reports it
        for model in composing_models(config):
            skip = model in seen or self._served.get(model) or model_name_problem(model)
            if skip or not (self.path / model).is_dir():
                continue
            self._unloaded.discard(model)
            await self._load_composing(model, seen)
            await self._sync(model, force=True)
            if self._served.get(model):
                self.changed.append(model)

    async def _refresh_ensembles(self) -> None:
        """Check again the ensembles that run a model that loaded or unloaded a version since the
        last check: one that does not serve loads (force); a served one whose steps all find
        their version served but no longer fit it stops serving with the reason (one whose step
        finds none stays, UNAVAILABLE naming it, until the model serves again). An ensemble that
        loads or stops can change others in turn."""
        while self._versions_changed:
            changed, self._versions_changed = self._versions_changed, set()
            for name, config in sorted(self._ensembles.items()):
                if name in self._unloaded or not changed & set(composing_models(config)):
                    continue
                served = self._served.get(name)
                if not served:
                    await self._sync(name, force=True)
                    continue
                for version, model in list(served.items()):
                    if self._log_gap(model):
                        continue
                    try:
                        model.batcher.checked = check_steps(model.config, self._composing)
                    except EnsembleLoadError as exc:
                        reason = f"{self.path / name / CONFIG_FILENAME}: {exc}"
                        await self._ensemble_failed(name, version, reason)

    def _log_gap(self, model: LoadedModel) -> str:
        """Why a served ensemble version cannot run now ("" when it can), logged when that
        changes: a composing model's versions changing stops or restarts it without a load."""
        gap = self._composing_gap(model.config)
        key = (model.name, model.version)
        if gap != self._gaps.get(key, ""):
            if gap:
                log.warning("model %s version %s is not ready: %s", *key, gap)
            else:
                log.info("model %s version %s serves again: its composing models serve", *key)
        self._gaps[key] = gap
        return gap

    def _model_folders(self) -> set[str]:
        """The model folders in the repository, less those whose name is not UTF-8: no client
        can send such a name, and listing one failed the whole of RepositoryIndex. Each is
        logged once."""
        names = set()
        for path in self.path.iterdir():
            if not path.is_dir():
                continue
            try:
                path.name.encode("utf-8")
            except UnicodeEncodeError:
                if path.name not in self._unencodable:
                    self._unencodable.add(path.name)
                    log.warning(
                        "model folder %r skipped: its name is not UTF-8, which no client can "
                        "send; rename it",
                        path.name,
                    )
                continue
            names.add(path.name)
        return names

    async def load(self, name: str) -> None:
        """Load or reload a model from disk (RepositoryModelLoad); the watcher follows it again.

        Raises ModelLoadError (FAILED_PRECONDITION: a retry fails the same way until the files
        change) when anything the policy selects failed, as Triton's load does, even while the
        versions loaded before keep serving: the caller learns its new files are not served.
        """
        self.changed = []
        self._check_control("RepositoryModelLoad", name)
        await self._changes.run(self._load(name))

    async def _load(self, name: str) -> None:
        """load() itself."""
        async with self._lock:
            if not (self.path / name).is_dir():
                serving = self.versions(name)
                if serving:
                    raise ModelNotFoundError(
                        f"model '{name}' still serves version {', '.join(serving)} from memory, "
                        f"but its folder {self.path / name} is gone: restore the folder to "
                        "reload it, or call RepositoryModelUnload to stop serving it"
                    )
                raise ModelNotFoundError(f"no model folder '{name}' in {self.path}")
            self._unloaded.discard(name)
            await self._load_composing(name, set())
            failures = await self._sync(name, force=True)
            await self._refresh_ensembles()
            if failures and self._stopping:
                raise ModelUnavailableError(
                    f"model '{name}': the load was abandoned, the server is stopping: "
                    f"{'; '.join(failures)}"
                )
            if failures:
                serving = self.versions(name)
                still = f", still serving version {', '.join(serving)}" if serving else ""
                raise ModelLoadError(
                    f"model '{name}' failed to load{still}: {'; '.join(failures)}; fix its files "
                    f"in {self.path / name} and call RepositoryModelLoad again"
                )
            self.changed.append(name)

    async def unload(self, name: str, dependents: bool = False) -> None:
        """Unload every version of a model (RepositoryModelUnload); the watcher leaves it alone
        while its folder exists. With dependents (Triton's unload_dependents), what an ensemble
        runs is unloaded too, through nested ensembles, those another served ensemble runs
        excepted."""
        self.changed = []
        self._check_control("RepositoryModelUnload", name)
        await self._changes.run(self._unload(name, dependents))

    async def _unload(self, name: str, dependents: bool) -> None:
        """unload() itself."""
        async with self._lock:
            if not self._served.get(name) and not self._entries(name):
                raise ModelNotFoundError(f"no model '{name}' in the repository")
            config = self._ensembles.get(name)
            await self._drop(name)
            self.changed.append(name)
            if dependents and config is not None:
                await self._drop_dependents(config)
            await self._refresh_ensembles()

    async def _drop_dependents(self, config: ModelConfig) -> None:
        """Unload what an unloaded ensemble runs, directly or through nested ensembles, level by
        level (what a load of it brought in), except the models a served ensemble still runs;
        which those are is computed again after each level, once its ensembles are gone."""
        level = composing_models(config)
        while level:
            in_use = {
                model
                for other, other_config in self._ensembles.items()
                if self._served.get(other)
                for model in self._run_by(other_config, set())
            }
            dropped = [m for m in level if m not in in_use and self._served.get(m)]
            for model in dropped:
                await self._drop(model)
                self.changed.append(model)
            inner = [self._ensembles[m] for m in dropped if m in self._ensembles]
            level = list(dict.fromkeys(m for c in inner for m in composing_models(c)))

    async def _drop(self, name: str) -> None:
        """Unload every version of a model and leave it alone until it is loaded again."""
        self._unloaded.add(name)
        self._fingerprints.pop(name, None)
        self._model_errors.pop(name, None)
        self._misnamed.pop(name, None)
        for version in list(self._served.get(name, {})):
            await self._unload_version(name, version, "unloaded by request")
        if not (self.path / name).is_dir():
            # Its folder went while it served (explicit and none modes do not watch).
            self._unloaded.discard(name)
            self._forget(name)

    def loaded_files(self, name: str) -> dict[str, Any] | None:
        """The fingerprint (as JSON values) of the files the served versions of a model were
        loaded from, or None when none serves."""
        fp = self._fingerprints.get(name)
        return _as_json(fp) if fp is not None and self._served.get(name) else None

    async def follow(self, name: str, files: dict[str, Any] | None) -> str:
        """Match a model to its --workers group's record: unload it (files None), or serve the
        files loaded_files() described on the worker that loaded it, and only those. Returns
        why this worker does not serve it as recorded ("" when it does)."""
        return await self._changes.run(self._follow(name, files))

    async def _follow(self, name: str, files: dict[str, Any] | None) -> str:
        """follow() itself. The ensembles that run a model it loads are checked again, as
        after load() on the worker that took the call, so every worker of the group ends with
        the same ensembles serving."""
        async with self._lock:
            if files is None:
                if name not in self._unloaded:
                    await self._drop(name)
                    await self._refresh_ensembles()
                return ""
            model_dir = self.path / name
            here = self.folder_files(name)
            if here != files:
                return await self._refuse(name, self._changed_since_load(model_dir, here))
            self._unloaded.discard(name)
            if self.loaded_files(name) == files and name not in self._model_errors:
                return ""
            failures = await self._sync(name, force=True)
            await self._refresh_ensembles()
            if not failures:
                return ""
            return await self._refuse(
                name,
                f"not served by this worker: loading the files the group loaded failed here "
                f"({'; '.join(failures)}), and serving any version it had would put other files "
                f"beside the ones the other workers serve; fix the files in {model_dir} and call "
                "RepositoryModelLoad again",
            )

    def folder_files(self, name: str) -> dict[str, Any]:
        """The fingerprint (as JSON values, see loaded_files) of a model folder's files now, or
        why it cannot be read."""
        model_dir = self.path / name
        try:
            return _as_json(_fingerprint(model_dir))
        except OSError as exc:
            return {"unreadable": _unreadable(model_dir, exc)}

    def _changed_since_load(self, model_dir: Path, here: dict[str, Any]) -> str:
        """Why a worker does not serve a model folder whose files differ from those its group
        loaded, and the fix."""
        removed = not model_dir.is_dir()
        what = here.get("unreadable") or (
            f"{model_dir} {'was removed' if removed else 'changed'} after the group's workers "
            "loaded it"
        )
        if self.mode == NONE:
            fix = (
                "model_control_mode is 'none', which serves what the group loaded at start-up: "
                "restart the whole server to serve the files now there"
            )
        elif removed:
            fix = f"restore the folder, or call RepositoryModelUnload for '{model_dir.name}'"
        else:
            fix = (
                f"call RepositoryModelLoad for '{model_dir.name}' to load the files now there "
                "on every worker"
            )
        return (
            f"not served by this worker: {what}, and serving the files now there would put them "
            f"beside the ones the other workers serve; {fix}"
        )

    async def _refuse(self, name: str, reason: str) -> str:
        """Serve no version of a model, with reason as its one index entry; returns reason."""
        self._fingerprints.pop(name, None)
        self._unloaded.discard(name)
        for version in list(self._served.get(name, {})):
            await self._unload_version(name, version, reason)
        for key in [k for k in self._status if k[0] == name]:
            del self._status[key]
        self._model_error(name, reason, logging.ERROR)
        return reason

    def _check_control(self, rpc: str, name: str) -> None:
        """Refuse a load or unload this repository does not take (see control), or a model name
        that is not one folder name, so that neither ever reaches outside the repository (a
        symlinked model folder inside it is still a model)."""
        problem = model_name_problem(name)
        if problem:
            size = len(name.encode("utf-8", "surrogatepass"))
            shown = f"of {size} bytes" if size > NAME_MAX_BYTES else repr(name)
            raise InvalidRequestError(
                f"model_name {shown} is not a model name: {problem} ({self.path})"
            )
        if self.mode == NONE:
            raise ControlRefusedError(
                f"{rpc} of '{name}' is refused: model_control_mode is 'none', which loads the "
                "models present at start-up and never changes them; set model_control_mode = "
                '"explicit" to load and unload by RPC (or "poll" to follow the files as well) '
                "and restart the server"
            )
        if not self.control:
            instead = (
                f"change the files in {self.path / name} instead (every worker's watcher applies "
                "them)"
                if self.watch
                else "with watch_model_repo = false the workers change models only when the "
                "group restarts; set watch_model_repo = true to have every worker apply changed "
                f"files in {self.path / name}"
            )
            raise ControlRefusedError(
                f"{rpc} of '{name}' is refused: this server runs as one of several --workers "
                "processes, each with its own copy of the repository's state, so the call would "
                f"change one of them; {instead}, or run a single process to load and unload by RPC"
            )
        if not self.ready:
            # The start-up load holds the lock: the change would wait past the caller's
            # deadline, then apply all the same.
            raise ModelUnavailableError(
                f"{rpc} of '{name}': the server is still loading its model repository "
                "(ServerReady is false); retry once it is ready"
            )

    def get(self, name: str, version: str = "") -> LoadedModel:
        """The served version (highest when version is ""); NOT_FOUND or UNAVAILABLE otherwise."""
        versions = self._served.get(name)
        number = _version_number(version) if version else None
        if versions:
            if not version:
                if not self.ready and any(s.state == LOADING for s in self._entries(name)):
                    # The highest version may be the one still loading: do not answer with
                    # an older one.
                    raise ModelUnavailableError(
                        f"model '{name}': the server is still loading its model repository, "
                        "this model's versions included (ServerReady is false); retry once it "
                        "is ready"
                    )
                model = versions[max(versions)]
                if model.config.ensemble:
                    self._check_composing(model)
                return model
            if number in versions:
                model = versions[number]
                if model.config.ensemble:
                    self._check_composing(model)
                return model
        entries = self._entries(name)
        if version and number is None and (versions or entries):
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}': a version is a number from 1 "
                "without leading zeros, or empty for the highest served; served: "
                f"{', '.join(str(v) for v in sorted(versions or {})) or 'none'}"
            )
        failed = [
            s for s in entries if s.state != READY and (not version or s.version in ("", version))
        ]
        if failed:
            what = f"model '{name}'" + (f" version {version}" if version else "")
            reasons = "; ".join(_state_sentence(s) for s in failed)
            raise ModelUnavailableError(f"{what} is not ready: {reasons}")
        if not self.ready and (not entries or any(s.state == LOADING for s in entries)):
            # Not reached yet, or its versions still load: the version may be one of them.
            raise ModelUnavailableError(
                f"model '{name}': the server is still loading its model repository "
                "(ServerReady is false); retry once it is ready"
            )
        if versions or entries:
            raise ModelNotFoundError(
                f"model '{name}' has no version '{version}'; served: "
                f"{', '.join(str(v) for v in sorted(versions or {})) or 'none'}"
            )
        raise ModelNotFoundError(f"no model '{name}' in the repository")

    def _check_composing(self, model: LoadedModel) -> None:
        """Raise ModelUnavailableError when a composing model of a served ensemble does not
        serve (unloaded, or failed since)."""
        gap = self._composing_gap(model.config)
        if gap:
            raise ModelUnavailableError(f"model '{model.name}' is not ready: {gap}")

    def _composing_gap(self, config: ModelConfig, seen: frozenset[str] = frozenset()) -> str:
        """Why a served ensemble cannot run now: the first step whose model does not serve the
        step's version, or is an ensemble that cannot run ("" when every one can). seen: the
        ensembles followed to this one, so that a cycle (refused at load) ends here."""
        seen = seen | {config.name}
        for index, step in enumerate(config.ensemble):
            versions = self._served.get(step.model_name) or {}
            wanted = step_version(step)
            model = versions.get(int(wanted)) if wanted else versions.get(max(versions, default=0))
            inner = ""
            if model is not None and model.config.ensemble:
                inner = (
                    f"it runs '{config.name}' in turn, a cycle across ensembles"
                    if step.model_name in seen
                    else self._composing_gap(model.config, seen)
                )
            where = f"{step.label(index)}: composing model '{step.model_name}'"
            if inner:
                return f"{where} is not ready ({inner})"
            if model is None and versions:
                served = ", ".join(str(v) for v in sorted(versions))
                return (
                    f"{where} version {wanted} is not served (it serves {served}); fix the "
                    f"step's model_version, or the version_policy of '{step.model_name}'"
                )
            if model is None:
                return (
                    f"{where} is not served; load '{step.model_name}' (or restore its files) to "
                    "serve the ensemble again"
                )
        return ""

    def is_ready(self, name: str, version: str = "") -> bool:
        """Whether get(name, version) would succeed."""
        try:
            self.get(name, version)
        except (ModelNotFoundError, ModelUnavailableError):
            return False
        return True

    def versions(self, name: str) -> list[str]:
        """Served versions of a model, ascending."""
        return [str(v) for v in sorted(self._served.get(name, {}))]

    def loaded(self) -> list[LoadedModel]:
        """Every served model version, by name then version."""
        return [self._served[n][v] for n in sorted(self._served) for v in sorted(self._served[n])]

    def index(self) -> list[VersionStatus]:
        """Every known model version and its state, by name then version.

        A model-wide failure (config, no version to serve) is one UNAVAILABLE entry with version
        "" while nothing serves; while versions loaded before still serve, it is their reason.
        In explicit and none modes a model folder never loaded is one UNAVAILABLE entry with
        version "" saying how to load it (Triton lists such models too).
        """
        if self.mode != POLL:  # no watcher forgets them: a model unloaded, then its folder gone
            for name in [n for n in self._unloaded if not (self.path / n).is_dir()]:
                self._unloaded.discard(name)
                self._forget(name)
        entries = dict(self._status)
        for name in self._never_loaded():
            entries[(name, "")] = VersionStatus(name, "", UNAVAILABLE, self._not_loaded_reason())
        for name, folders in self._misnamed.items():
            for folder, reason in folders.items():
                entries[(name, folder)] = VersionStatus(name, folder, UNAVAILABLE, reason)
        for name, reason in self._model_errors.items():
            served = self._served.get(name)
            if not served:
                entries[(name, "")] = VersionStatus(name, "", UNAVAILABLE, reason)
            for version in served or {}:
                key = (name, str(version))
                entries[key] = VersionStatus(name, key[1], READY, RELOAD_FAILED + reason)
        for name in self._ensembles:
            for version, model in self._served.get(name, {}).items():
                gap = self._composing_gap(model.config)
                if gap:
                    entries[(name, str(version))] = VersionStatus(
                        name, str(version), UNAVAILABLE, gap
                    )
        return [entries[k] for k in sorted(entries, key=lambda k: (k[0], k[1].zfill(20)))]

    def _never_loaded(self) -> list[str]:
        """Model folders this repository has not tried to load (explicit and none modes); none
        when the repository folder cannot be read."""
        if self.mode == POLL:
            return []
        tried = {k[0] for k in self._status} | set(self._model_errors) | set(self._misnamed)
        try:
            folders = sorted(self._model_folders())
        except OSError:
            return []
        return [name for name in folders if name not in tried and name not in self._served]

    def _not_loaded_reason(self) -> str:
        """Why a model folder of _never_loaded() does not serve, and how to serve it."""
        if self.mode == EXPLICIT:
            return "not loaded (model_control_mode is 'explicit'): load it with RepositoryModelLoad"
        return (
            "not loaded (model_control_mode is 'none': only the models present at start-up "
            "load): restart the server to serve it"
        )

    def _entries(self, name: str) -> list[VersionStatus]:
        """The index entries of one model."""
        return [s for s in self.index() if s.name == name]

    async def _sync(self, name: str, *, force: bool) -> list[str]:
        """Load new or changed target versions of one model, then unload the ones off policy.

        Returns what failed in this pass (empty when nothing did or nothing changed on disk).
        """
        model_dir = self.path / name
        old = self._fingerprints.get(name)
        try:
            fp = _fingerprint(model_dir)
        except OSError as exc:
            reason = _unreadable(model_dir, exc)
            # The last readable stats spare unchanged versions a reload once the folder reads
            # again; the mark makes that pass differ from them, so it runs and clears the error.
            self._fingerprints[name] = replace(old or _Fingerprint(None), unreadable=reason)
            self._model_error(name, reason, logging.ERROR)
            return [reason]
        if not force and old is not None and fp == old:
            return []
        self._fingerprints[name] = fp
        served = self._served.setdefault(name, {})
        if not model_dir.is_dir():
            for version in list(served):
                await self._unload_version(name, version, "model folder removed")
            self._forget(name)
            return []
        self._report_misnamed(name, model_dir, fp)
        try:
            config = load_model_config(model_dir)
        except Exception as exc:
            self._model_error(name, str(exc), logging.ERROR)
            return [str(exc)]
        if config.ensemble:
            self._ensembles[name] = config
        else:
            self._ensembles.pop(name, None)
        failures: list[str] = []
        config_changed = force or old is None or (old.config, old.side) != (fp.config, fp.side)
        available = _available(config, fp)
        before = _available(config, old) if old is not None else {}
        targets = config.version_policy.select(list(available))
        if targets:
            self._model_errors.pop(name, None)
        else:
            reason = _no_servable_version(
                model_dir, config.version_policy, list(available), bool(config.ensemble)
            )
            reason = "; ".join([reason, *self._misnamed.get(name, {}).values()])
            self._model_error(name, reason, logging.WARNING)
            failures.append(reason)
        for version in targets:
            changed = version not in before or before[version] != available[version]
            if version not in served or config_changed or changed:
                failure = await self._load_version(name, version, config)
                if failure:
                    failures.append(f"version {version}: {failure}")
        for key in [k for k in self._status if k[0] == name]:
            if int(key[1]) not in available and int(key[1]) not in served:
                del self._status[key]
        any_target_ready = any(v in served for v in targets)
        for version in list(served):
            gone = version not in available
            if gone or (version not in targets and any_target_ready):
                reason = "version removed" if gone else "outside the version policy"
                await self._unload_version(name, version, reason)
        return failures

    async def _load_version(self, name: str, version: int, config: ModelConfig) -> str | None:
        """Create sessions and a batcher for one version, run its warmup samples, and on success
        replace the old one.

        Returns the failure, if any; the version loaded before (if any) then keeps serving.
        """
        key = (name, str(version))
        previous = self._status.get(key)
        if previous is None or previous.state != READY:
            self._status[key] = VersionStatus(name, str(version), LOADING)
        if config.ensemble:
            return await self._load_ensemble(name, version, config, previous)
        model_dir = self.path / name
        path = model_dir / str(version) / MODEL_FILENAME
        try:
            runner = await asyncio.to_thread(
                OnnxRunner, path, config.onnxruntime, config.instance_group.count
            )
            completed = complete_config(config, runner.inputs, runner.outputs, source=str(path))
            completed = resolve_warmup(completed, source=str(model_dir / CONFIG_FILENAME))
            check_feedable(completed)
            binding = await asyncio.to_thread(
                compile_binding, completed, str(model_dir / CONFIG_FILENAME)
            )
            await self._warm_up(name, version, runner, completed)
            cost = await asyncio.to_thread(runner.calibrate, completed)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if str(self.path / name) not in reason:
                reason = f"{path}: {reason}"
            self._version_failed(name, version, reason, previous)
            return reason
        batcher = DynamicBatcher(
            completed,
            runner.run,
            name=f"{name}:{version}",
            metrics=ModelMetrics(name, version),
            cost=cost,
        )
        batcher.start()
        outputs = [o.name for o in completed.outputs]
        cache = self._version_cache(name, version, completed)
        model = LoadedModel(
            name, str(version), completed, runner, batcher, path, outputs, binding, cache
        )
        timed = f"{cost.fixed_us:.0f} µs + {cost.per_row_us:.1f} µs/row" if cost else "not timed"
        await self._serve(model, timed)
        return None

    async def _serve(self, model: LoadedModel, note: str) -> None:
        """Route a loaded version's requests to it, then drain the one it replaces."""
        version = int(model.version)
        served = self._served.setdefault(model.name, {})
        replaced = served.get(version)
        served[version] = model
        self._status[(model.name, model.version)] = VersionStatus(model.name, model.version, READY)
        self._versions_changed.add(model.name)
        self._renew_ensemble_caches(model.name)
        log.info("loaded model %s version %s (%s)", model.name, version, note)
        if replaced is not None:
            await self._drain(replaced)

    async def _load_ensemble(
        self, name: str, version: int, config: ModelConfig, previous: VersionStatus | None
    ) -> str | None:
        """Compile an ensemble version's Predict binding against its declared inputs, check its
        steps against the composing models served now and serve it; returns the failure, if any.
        A binding error leaves a served version serving (as an ONNX model's); steps that do not
        fit stop it (it would run models that no longer fit it)."""
        source = self.path / name / CONFIG_FILENAME
        try:
            binding = await asyncio.to_thread(compile_binding, config, str(source))
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            if str(source) not in reason:
                reason = f"{source}: {reason}"
            self._version_failed(name, version, reason, previous)
            return reason
        try:
            check_no_cycle(name, config, self._ensemble_config)
            checked = check_steps(config, self._composing)
        except EnsembleLoadError as exc:
            reason = f"{source}: {exc}"
            await self._ensemble_failed(name, version, reason, previous)
            return reason
        scheduler = EnsembleScheduler(
            config,
            self.get,
            name=f"{name}:{version}",
            metrics=ModelMetrics(name, version),
            checked=checked,
        )
        outputs = [o.name for o in config.outputs]
        cache = self._version_cache(name, version, config)
        model = LoadedModel(
            name, str(version), config, None, scheduler, self.path / name / str(version),
            outputs, binding, cache,
        )  # fmt: skip
        await self._serve(model, f"ensemble of {', '.join(composing_models(config))}")
        return None

    def _ensemble_config(self, name: str) -> ModelConfig | None:
        """A model's ensemble config as last read, or read now when its folder was not read yet;
        None when it is not an ensemble (or its config cannot be read: its load reports why)."""
        config = self._ensembles.get(name)
        unread = config is None and name not in self._fingerprints
        if unread and _declares_ensemble(self.path / name):
            with contextlib.suppress(Exception):
                config = load_model_config(self.path / name)
        return config

    def _composing(self, name: str, version: str) -> LoadedModel:
        """get() for an ensemble's step, NOT_FOUND naming the repository when the step's model
        has no folder there (rather than "still loading" while the server starts)."""
        if not self._served.get(name) and not (self.path / name).is_dir():
            raise ModelNotFoundError(f"there is no model folder '{name}' in {self.path}")
        return self.get(name, version)

    def _renew_ensemble_caches(self, name: str) -> None:
        """A version of model `name` loads or unloads: the served ensembles that run it (through
        other ensembles too) get a fresh view of the response cache, dropping their cached
        answers, so none answers from the model's old file (requests under way store nothing)."""
        for versions in self._served.values():
            for model in versions.values():
                if model.cache is not None and name in self._run_by(model.config, set()):
                    model.cache.close()
                    model.cache = self._version_cache(model.name, int(model.version), model.config)

    def _run_by(self, config: ModelConfig, seen: set[str]) -> set[str]:
        """The models an ensemble's steps run, directly or through other ensembles, added to
        seen (the models found so far, so that a cycle ends)."""
        for model in composing_models(config):
            inner = None if model in seen else self._ensembles.get(model)
            seen.add(model)
            if inner is not None:
                self._run_by(inner, seen)
        return seen

    async def _ensemble_failed(
        self, name: str, version: int, reason: str, previous: VersionStatus | None = None
    ) -> None:
        """Record an ensemble version whose steps do not fit, unloading it if it served."""
        key = (name, str(version))
        previous = previous or self._status.get(key)
        await self._unload_version(name, version, reason)
        self._version_failed(name, version, reason, previous)

    async def _warm_up(
        self, name: str, version: int, runner: OnnxRunner, config: ModelConfig
    ) -> None:
        """Run the version's warmup samples on every instance, off the event loop, and log what
        ran and how long it took."""
        if not config.model_warmup:
            return
        start = time.perf_counter()
        stop = threading.Event()
        if self._stopping:
            stop.set()
        self._warmups.add(stop)
        try:
            runs = await asyncio.to_thread(runner.warm_up, config, self.path / name, stop)
        except asyncio.CancelledError:
            stop.set()  # the thread would run on, and keep the interpreter from exiting
            raise
        finally:
            self._warmups.discard(stop)
        log.info(
            "warmed up model %s version %s in %.1f ms: %d runs of its %d warmup sample(s) on %d "
            "instance(s)",
            name,
            version,
            (time.perf_counter() - start) * 1e3,
            runs,
            len(config.model_warmup),
            len(runner.sessions),
        )

    async def _unload_version(self, name: str, version: int, reason: str) -> None:
        """Stop routing to a version, let its requests finish, then free it."""
        model = self._served.get(name, {}).pop(version, None)
        if model is None:
            return
        self._gaps.pop((name, str(version)), None)
        self._versions_changed.add(name)
        self._renew_ensemble_caches(name)
        key = (name, str(version))
        self._status[key] = VersionStatus(name, str(version), UNLOADING, reason)
        await self._drain(model)
        self._status[key] = VersionStatus(name, str(version), UNAVAILABLE, reason)
        log.info("unloaded model %s version %s: %s", name, version, reason)

    def _version_cache(self, name: str, version: int, config: ModelConfig) -> VersionCache | None:
        """A new load's own view of the response cache, when its config enables it; without a
        cache on the server, the model serves uncached and a warning says so (as in Triton)."""
        if not config.response_cache:
            return None
        if self.response_cache is None:
            log.warning(
                "model %s version %s sets response_cache = true but the server has no response "
                "cache; serving it uncached: set response_cache_bytes in the server config",
                name,
                version,
            )
            return None
        return self.response_cache.for_load()

    async def _drain(self, model: LoadedModel) -> None:
        """Drop a version's cached answers, finish its queued and running requests, then close
        its sessions."""
        if model.cache is not None:
            model.cache.close()
        await model.batcher.close()
        if model.runner is not None:
            model.runner.close()

    def _version_failed(
        self, name: str, version: int, reason: str, previous: VersionStatus | None
    ) -> None:
        """Record a version's load failure, logged unless `previous` (its entry before this
        attempt) had the same reason. A served version stays READY (its previous load keeps
        serving) with the failure as reason; other versions are untouched."""
        key = (name, str(version))
        if version in self._served.get(name, {}):
            status = VersionStatus(name, key[1], READY, RELOAD_FAILED + reason)
        else:
            status = VersionStatus(name, key[1], UNAVAILABLE, reason)
        self._status[key] = status
        if previous is not None and previous.reason == status.reason:
            return
        if status.state == READY:
            log.error("model %s version %s: %s%s", name, version, RELOAD_FAILED, reason)
        else:
            log.error("model %s version %s failed to load: %s", name, version, reason)

    def _report_misnamed(self, name: str, model_dir: Path, fp: _Fingerprint) -> None:
        """Record the digit folders that are not versions, each logged when it is new."""
        known = self._misnamed.pop(name, {})
        taken = list(fp.versions)
        reasons = {f: _misnamed_version(model_dir / f, taken) for f in sorted(fp.misnamed)}
        for folder, reason in reasons.items():
            if known.get(folder) != reason:
                log.warning("model %s: %s", name, reason)
        if reasons:
            self._misnamed[name] = reasons

    def _model_error(self, name: str, reason: str, level: int) -> None:
        """Record a model-wide failure (config, no version to serve), logged when it is new."""
        if self._model_errors.get(name) == reason:
            return
        self._model_errors[name] = reason
        if self._served.get(name):
            log.log(level, "model %s: %s%s", name, RELOAD_FAILED, reason)
        else:
            log.log(level, "model %s failed to load: %s", name, reason)

    def _forget(self, name: str) -> None:
        """Drop every trace of a model whose folder is gone."""
        self._served.pop(name, None)
        self._fingerprints.pop(name, None)
        self._model_errors.pop(name, None)
        self._misnamed.pop(name, None)
        self._ensembles.pop(name, None)
        for key in [k for k in self._status if k[0] == name]:
            del self._status[key]
