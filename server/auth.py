"""Bearer-token authentication with scopes (`read:<view>`, `write:<view>`, `infer:<model>`,
`admin`; `*` globs in the name): the [auth] config, an interceptor that authenticates every call
and checks its method's scope class, and the per-view / per-model check servicers call. Either
refusal of an audited method's call is recorded in the audit log."""

from __future__ import annotations

import contextvars
import difflib
import hashlib
import hmac
import inspect
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pool

from server.config import ConfigError
from server.errors import PermissionDeniedError, UnauthenticatedError
from server.handler_wrapping import WrappingInterceptor, rewrap

if TYPE_CHECKING:
    from featurestore.registry import FeatureService
    from server.audit import AuditLog

ADMIN = "admin"
MAX_REMEMBERED_SCOPES = 4096
READ, WRITE, INFER = "read", "write", "infer"
AUTHENTICATED = ""
KINDS = (READ, WRITE, INFER)
DEFAULT_OPEN_METHODS = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)
_FS = "/featureserve.v1.FeatureStore/"
_PRED = "/featureserve.v1.Prediction/"
_KS = "/inference.GRPCInferenceService/"
SCHEMA = (READ, WRITE)
"""The view definitions: readers read them, and writers read the schema they write to."""


def schema_scopes(view: str) -> tuple[str, ...]:
    """The scopes any one of which lets a caller see `view`'s definition (and its name)."""
    return tuple(f"{kind}:{view}" for kind in SCHEMA)


METHOD_SCOPES: dict[str, str | tuple[str, ...]] = {
    _FS + "GetOnlineFeatures": READ,
    _FS + "WriteFeatures": WRITE,
    _FS + "StreamWriteFeatures": WRITE,
    _FS + "ListFeatureViews": SCHEMA,
    _FS + "GetFeatureView": SCHEMA,
    _FS + "ApplyFeatureViews": ADMIN,
    _FS + "DeleteFeatureView": ADMIN,
    _FS + "ListFeatureServices": SCHEMA,
    _FS + "GetFeatureService": SCHEMA,
    _FS + "DeleteFeatureService": ADMIN,
    _PRED + "Predict": INFER,
    _PRED + "StreamPredict": INFER,
    _KS + "ServerLive": AUTHENTICATED,
    _KS + "ServerReady": AUTHENTICATED,
    _KS + "ServerMetadata": AUTHENTICATED,
    _KS + "ModelReady": INFER,
    _KS + "ModelMetadata": INFER,
    _KS + "ModelConfig": INFER,
    _KS + "ModelStatistics": INFER,
    _KS + "RepositoryIndex": INFER,
    _KS + "ModelInfer": INFER,
    _KS + "ModelStreamInfer": INFER,
    _KS + "RepositoryModelLoad": ADMIN,
    _KS + "RepositoryModelUnload": ADMIN,
    _KS + "SystemSharedMemoryStatus": AUTHENTICATED,
    _KS + "SystemSharedMemoryRegister": ADMIN,
    _KS + "SystemSharedMemoryUnregister": ADMIN,
    _KS + "LogSettings": ADMIN,
    _KS + "TraceSetting": ADMIN,
}
"""Scope class each method needs (a tuple: any one of them) before the servicer's per-name
check; unlisted methods need admin, so a method added later is closed until someone classifies
it."""

_SCOPE = re.compile(r"^(admin|(read|write|infer):[A-Za-z0-9_.\-*]+)$")
_TOKEN_KEYS = {"name", "token", "token_sha256", "token_env", "scopes"}
_AUTH_KEYS = {"enabled", "open_methods", "tokens"}


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name (never the token) and its scopes."""

    name: str
    scopes: frozenset[str]
    admin: bool = field(init=False)
    kinds: frozenset[str] = field(init=False)
    patterns: tuple[str, ...] = field(init=False)
    _granted: dict[str, bool] = field(init=False, default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        admin = ADMIN in self.scopes
        kinds = set(KINDS) if admin else {s.partition(":")[0] for s in self.scopes}
        object.__setattr__(self, "admin", admin)
        object.__setattr__(self, "kinds", frozenset(kinds | {AUTHENTICATED}))
        object.__setattr__(self, "patterns", tuple(s for s in self.scopes if "*" in s))

    def may(self, *kinds: str) -> bool:
        """Whether the principal holds any scope of any of these classes (admin holds every
        class)."""
        return self.admin or not self.kinds.isdisjoint(kinds)

    def grants(self, scope: str) -> bool:
        """Whether the principal holds `scope` exactly, through a glob, or through admin
        (answers are remembered: the hot path asks about the same few scopes again and again)."""
        known = self._granted.get(scope)
        if known is None:
            known = self.admin or scope in self.scopes
            known = known or any(fnmatchcase(scope, pattern) for pattern in self.patterns)
            if len(self._granted) < MAX_REMEMBERED_SCOPES:
                self._granted[scope] = known
        return known


@dataclass(frozen=True)
class TokenSpec:
    """One configured token: its name, the SHA-256 digest of the secret, and its scopes."""

    name: str
    digest: bytes = field(repr=False)
    scopes: frozenset[str]


@dataclass(frozen=True)
class AuthConfig:
    """The parsed [auth] table."""

    enabled: bool = False
    open_methods: tuple[str, ...] = DEFAULT_OPEN_METHODS
    tokens: tuple[TokenSpec, ...] = ()


def token_digest(token: str) -> bytes:
    """SHA-256 of a token: what the server stores and compares."""
    return hashlib.sha256(token.encode()).digest()


def _check_secret(secret: str, what: str, where: str) -> None:
    """Refuse a secret no client can present: gRPC metadata carries printable ASCII only, and
    bearer_token() strips the whitespace around what the client sends."""
    if secret != secret.strip():
        raise ConfigError(
            f"{where}: {what} has leading or trailing whitespace, which no client can send (the "
            "server strips it from the authorization header); remove it"
        )
    if not (secret.isascii() and secret.isprintable()):
        raise ConfigError(
            f"{where}: {what} holds a character other than printable ASCII, which gRPC metadata "
            "cannot carry; use ASCII letters, digits and -._~+/="
        )


def _parse_token(raw: Any, where: str) -> TokenSpec:
    """One [[auth.tokens]] entry; exactly one of token, token_sha256, token_env holds the secret."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a table with name, token_sha256 and scopes")
    unknown = set(raw) - _TOKEN_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown key '{sorted(unknown)[0]}'")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}: 'name' must be a non-empty string (it names the caller)")
    where = f"{where} ({name})"
    sources = [key for key in ("token", "token_sha256", "token_env") if key in raw]
    if len(sources) != 1:
        raise ConfigError(f"{where}: set exactly one of token, token_sha256, token_env")
    secret = raw[sources[0]]
    if not isinstance(secret, str) or not secret:
        raise ConfigError(f"{where}: '{sources[0]}' must be a non-empty string")
    if sources[0] == "token_sha256":
        if not re.fullmatch(r"[0-9a-fA-F]{64}", secret):
            raise ConfigError(f"{where}: 'token_sha256' must be 64 hex digits (sha256sum of it)")
        digest = bytes.fromhex(secret)
    elif sources[0] == "token_env":
        value = os.environ.get(secret, "").rstrip("\r\n")  # as filled from a secret file
        if not value:
            raise ConfigError(f"{where}: environment variable {secret} is unset or empty")
        _check_secret(value, f"environment variable {secret} (token_env)", where)
        digest = token_digest(value)
    else:
        _check_secret(secret, "'token'", where)
        digest = token_digest(secret)
    scopes = raw.get("scopes")
    if not isinstance(scopes, list) or not scopes:
        raise ConfigError(f"{where}: 'scopes' must be a non-empty list such as ['read:*']")
    for scope in scopes:
        if not isinstance(scope, str) or not _SCOPE.match(scope):
            raise ConfigError(
                f"{where}: scope {scope!r} is not admin, read:<view>, write:<view> or "
                "infer:<model> (names may use * globs)"
            )
    return TokenSpec(name, digest, frozenset(scopes))


def _served_names(services: Iterable[str]) -> set[str]:
    """Each service's full name and its `service/Method` names, from the descriptors its
    generated module added to protobuf's default pool (so the module must be imported)."""
    pool = descriptor_pool.Default()
    names = set()
    for service in services:
        names.add(service)
        names.update(f"{service}/{m.name}" for m in pool.FindServiceByName(service).methods)
    return names


def _check_open_methods(names: Iterable[str], services: Iterable[str], source: str) -> None:
    """Refuse an open_methods entry that names nothing the server serves (a misspelt health
    service would leave health checks closed); the defaults are always accepted."""
    known = _served_names(services) | set(DEFAULT_OPEN_METHODS)
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise ConfigError(
                f"{source}: [auth] open_methods entry '{name}' is no service or method this "
                f"server serves; {hint}list a service such as grpc.health.v1.Health or a "
                "method such as grpc.health.v1.Health/Check"
            )


def parse_auth(
    raw: dict[str, Any] | None, source: str = "config", services: Iterable[str] | None = None
) -> AuthConfig:
    """The [auth] table (ServerConfig.extra["auth"]) as an AuthConfig; absent means disabled.
    With `services` (the full names the server registers), open_methods must name them."""
    if raw is None:
        return AuthConfig()
    unknown = set(raw) - _AUTH_KEYS
    if unknown:
        raise ConfigError(f"{source}: [auth] has unknown key '{sorted(unknown)[0]}'")
    enabled = raw.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{source}: [auth] enabled must be true or false")
    open_methods = raw.get("open_methods", list(DEFAULT_OPEN_METHODS))
    if not isinstance(open_methods, list) or not all(isinstance(m, str) for m in open_methods):
        raise ConfigError(
            f"{source}: [auth] open_methods must be a list of service or method names"
        )
    entries = raw.get("tokens", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: [[auth.tokens]] must be an array of tables")
    tokens = tuple(
        _parse_token(t, f"{source}: [[auth.tokens]] #{i}") for i, t in enumerate(entries)
    )
    if enabled and not tokens:
        raise ConfigError(f"{source}: [auth] is enabled but has no [[auth.tokens]]; add one")
    for kind, values in (("name", [t.name for t in tokens]), ("token", [t.digest for t in tokens])):
        if len(set(values)) != len(values):
            raise ConfigError(f"{source}: two [[auth.tokens]] entries share the same {kind}")
    names = tuple(m.strip("/") for m in open_methods)
    if services is not None:
        _check_open_methods(names, services, source)
    return AuthConfig(enabled, names, tokens)


NOT_AUTHENTICATED = "this call is not authenticated; send 'authorization: Bearer <token>' metadata"
NO_TOKEN = (
    "missing or unknown bearer token; send 'authorization: Bearer <token>' metadata with a "
    "token listed in the server's [[auth.tokens]]"
)
PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "featureserve_principal", default=None
)
OPEN_CALLER = Principal("anonymous", frozenset({ADMIN}))
"""The caller of an open method: every check the servicer makes for that call passes."""
Refusal = Callable[..., None]
"""(principal, code, message, target=None, **audit fields): records one refusal."""
REFUSALS: contextvars.ContextVar[Refusal | None] = contextvars.ContextVar(
    "featureserve_refusals", default=None
)
"""How the audited call being handled records a refusal (principal, code, message, target);
None for the calls of methods that are not audited."""


def current_principal() -> Principal | None:
    """The caller of the RPC being handled, when auth is on and the call was authenticated
    (OPEN_CALLER for a call to one of the open methods)."""
    return PRINCIPAL.get()


class Authorizer:
    """Authenticates bearer tokens and answers scope checks; disabled, every check passes."""

    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.enabled = config.enabled
        self._tokens = [(t.digest, Principal(t.name, t.scopes)) for t in config.tokens]

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal | None:
        """The principal whose token the metadata carries, or None. Every configured digest is
        compared in constant time, so the time taken does not depend on which one matched."""
        token = bearer_token(metadata)
        if token is None:
            return None
        digest = token_digest(token)
        found = None
        for stored, principal in self._tokens:
            if hmac.compare_digest(stored, digest):
                found = principal
        return found

    def allows(self, scope: str) -> bool:
        """Whether the current caller holds `scope` (True when auth is off)."""
        if not self.enabled:
            return True
        principal = PRINCIPAL.get()
        return principal is not None and principal.grants(scope)

    def sees_view(self, view: str) -> bool:
        """Whether the current caller may see `view`'s definition (True when auth is off)."""
        return any(self.allows(scope) for scope in schema_scopes(view))

    def sees_service(self, service: FeatureService) -> bool:
        """Whether the current caller may see a feature service: every view it reads, by a
        reference or a projection (a service is no more visible than its views)."""
        return all(self.sees_view(view) for view in service.view_names)

    def require(self, *scopes: str, **audit_fields: Any) -> None:
        """Raise UnauthenticatedError / PermissionDeniedError unless the current caller holds
        every scope, e.g. require(f"read:{view}"); servicers call it with the concrete names.
        audit_fields go into the refusal's audit record (a stream's batch index)."""
        for scope in scopes:
            self.require_any(scope, **audit_fields)

    def require_any(self, *scopes: str, **audit_fields: Any) -> None:
        """As require, but one of the scopes is enough, e.g. require_any(f"read:{view}",
        f"write:{view}") for a view's definition, which its writers read too."""
        if not self.enabled:
            return
        principal = PRINCIPAL.get()
        if principal is None:
            _refuse(None, grpc.StatusCode.UNAUTHENTICATED, NOT_AUTHENTICATED, scopes, audit_fields)
            raise UnauthenticatedError(NOT_AUTHENTICATED)
        if not any(principal.grants(scope) for scope in scopes):
            wanted = " or ".join(f"'{scope}'" for scope in scopes)
            which = "one of them" if len(scopes) > 1 else "it"
            message = (
                f"token '{principal.name}' lacks scope {wanted}; add {which} to that token's "
                "scopes in [[auth.tokens]]"
            )
            _refuse(principal, grpc.StatusCode.PERMISSION_DENIED, message, scopes, audit_fields)
            raise PermissionDeniedError(message)

    def interceptor(self, audit: AuditLog | None = None) -> AuthInterceptor | None:
        """The interceptor enforcing this config (recording refused calls of the audited
        methods in `audit`), or None when auth is disabled."""
        return AuthInterceptor(self, audit) if self.enabled else None


def _refuse(
    principal: Principal | None,
    code: grpc.StatusCode,
    message: str,
    scopes: Sequence[str],
    fields: dict[str, Any],
) -> None:
    """Record a servicer's refusal when the call is audited; the target is the view or model
    the refused scope names (none for admin)."""
    refusal = REFUSALS.get()
    if refusal is not None:
        name = scopes[0].partition(":")[2] if scopes else ""
        refusal(principal, code, message, name or None, **fields)


def bearer_token(metadata: Iterable[tuple[str, Any]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry, if any."""
    for key, value in metadata or ():
        if key == "authorization":
            if isinstance(value, bytes):
                value = value.decode("latin-1")
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return None
    return None


class AuthInterceptor(WrappingInterceptor):
    """Authenticates every call except open methods and checks its method's scope class;
    the principal is left in PRINCIPAL for the servicer's per-view / per-model require().
    An open method's calls get OPEN_CALLER, so the servicer's checks pass for them too."""

    def __init__(self, authorizer: Authorizer, audit: AuditLog | None = None) -> None:
        self._authorizer = authorizer
        self._audit = audit
        names = authorizer.config.open_methods
        self._open_exact = frozenset(f"/{m}" for m in names if "/" in m)
        self._open_prefix = tuple(f"/{m}/" for m in names if "/" not in m)

    def is_open(self, method: str) -> bool:
        """Whether [auth] open_methods lists the method or its service."""
        return method in self._open_exact or method.startswith(self._open_prefix)

    def wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        """The handler, run only for a caller whose token grants the method's scope class,
        or for anyone as OPEN_CALLER when the method is open. A refused call of an audited
        method is recorded, here or (its per-name check) through REFUSALS."""
        if self.is_open(method):
            return rewrap(handler, _as_open_caller)
        needed = METHOD_SCOPES.get(method, ADMIN)
        kinds = (needed,) if isinstance(needed, str) else needed
        denied = f"has no {' or '.join(kinds)} scope, which {method} needs"
        audit = self._audit if self._audit is not None and self._audit.audits(method) else None

        def refusal(request: Any, context: grpc.aio.ServicerContext) -> Refusal:
            def record(principal, code, message, target=None, **fields) -> None:
                name = principal.name if principal is not None else None
                audit.refused(method, request, context, name, code, message, target, **fields)

            return record

        async def admit(context: grpc.aio.ServicerContext, request: Any) -> None:
            principal = self._authorizer.authenticate(context.invocation_metadata())
            if principal is None:
                code, message = grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN
            elif not principal.may(*kinds):
                code, message = (
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"token '{principal.name}' {denied}",
                )
            else:
                PRINCIPAL.set(principal)
                return
            if audit is not None:
                refusal(request, context)(principal, code, message)
            await context.abort(code, message)

        async def admit_audited(context: grpc.aio.ServicerContext, request: Any) -> None:
            await admit(context, request)
            REFUSALS.set(refusal(request, context))

        enter = admit if audit is None else admit_audited

        def guard(behavior: Callable, streaming: bool) -> Callable:
            if streaming and inspect.isasyncgenfunction(behavior):

                async def guarded_generator(request, context):
                    await enter(context, request)
                    async for response in behavior(request, context):
                        yield response

                return guarded_generator

            async def guarded(request, context):
                await enter(context, request)
                return await behavior(request, context)

            return guarded

        return rewrap(handler, guard)


def _as_open_caller(behavior: Callable, streaming: bool) -> Callable:
    """The behavior run with OPEN_CALLER as the caller."""
    if streaming and inspect.isasyncgenfunction(behavior):

        async def open_generator(request, context):
            PRINCIPAL.set(OPEN_CALLER)
            async for response in behavior(request, context):
                yield response

        return open_generator

    async def open_call(request, context):
        PRINCIPAL.set(OPEN_CALLER)
        return await behavior(request, context)

    return open_call
