"""Registry subcommands: `featureserve list entities|views|services` and `featureserve describe
view|service NAME`, so an operator can see what is registered (what the caller's token may see)
without writing Python. Tables for people; `--json` prints one JSON document for scripts."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from clients.cli import add_connection_flags, client_config
from clients.feature_cli import VERSION_OR_LATEST
from clients.feature_client import FeatureStoreClient
from featurestore.definitions import format_duration
from featurestore.feature_refs import split_ref
from featurestore.registry import Entity, Feature, FeatureService, FeatureView

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _iso(us: int, timespec: str = "microseconds") -> str | None:
    """µs since the epoch as ISO 8601 UTC ("...Z"); None for 0 (not recorded)."""
    if not us:
        return None
    return (_EPOCH + timedelta(microseconds=us)).isoformat(timespec=timespec).replace("+00:00", "Z")


def _ttl_text(seconds: int) -> str:
    """A TTL as features.toml writes it ("1d", "1h30m"), or "none" for 0 (no limit)."""
    return format_duration(seconds) if seconds else "none"


def _dtype(feature: Feature) -> str:
    """The dtype as features.toml names it, with the vector length: "float32_vector[16]"."""
    name = feature.dtype.name.lower()
    return f"{name}[{feature.vector_length}]" if feature.vector_length else name


def _tags(tags: dict[str, str]) -> str:
    """Tags as "k=v" pairs by key, on one line."""
    return ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "") -> None:
    """Print rows under headers in left-aligned columns; an empty cell shows as "-"."""
    cells = [list(headers)] + [[str(c) if c not in ("", None) else "-" for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for row in cells:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def _fields(pairs: Sequence[tuple[str, object]]) -> None:
    """Print "  label: value" lines aligned on the values; empty values show as "-"."""
    width = max(len(label) for label, _ in pairs) + 1
    for label, value in pairs:
        print(f"  {label + ':':<{width}} {value if value not in ('', None) else '-'}")


def _emit(document: object) -> None:
    """Print the one JSON document of a --json run."""
    print(json.dumps(document, indent=2))


def _entity_json(entity: Entity) -> dict:
    """An entity's --json object; dtypes named as features.toml names them."""
    return {
        "name": entity.name,
        "join_keys": [{"name": k.name, "dtype": k.dtype.name.lower()} for k in entity.join_keys],
        "description": entity.description,
    }


def _view_json(view: FeatureView) -> dict:
    """A view version's --json object: every field, times as ISO 8601 UTC and as µs."""
    return {
        "name": view.name,
        "version": view.version,
        "entity": view.entity,
        "description": view.description,
        "owner": view.owner,
        "tags": dict(sorted(view.tags.items())),
        "ttl_seconds": view.ttl_seconds,
        "ttl_history": [
            {"from": _iso(since), "from_us": since, "ttl_seconds": ttl}
            for since, ttl in view.ttl_changes()
        ],
        "created": _iso(view.created_us),
        "created_us": view.created_us,
        "updated": _iso(view.updated_us),
        "updated_us": view.updated_us,
        "features": [
            {
                "name": f.name,
                "dtype": f.dtype.name.lower(),
                "vector_length": f.vector_length,
                "allow_nan": f.allow_nan,
                "description": f.description,
            }
            for f in view.features
        ],
    }


def _views_read(service: FeatureService) -> list[str]:
    """The views a service's references read, "view" (latest) or "view@N" (pinned), in
    reference order (its projections are listed apart)."""
    return [name if version == 0 else f"{name}@{version}" for name, version in service.reads]


def _service_json(service: FeatureService) -> dict:
    """A service's --json object: every field, times as ISO 8601 UTC and as µs."""
    return {
        "name": service.name,
        "features": list(service.features),
        "views": _views_read(service),
        "projections": [
            {
                "view": p.view,
                "alias": p.alias,
                "features": list(p.features),
                "join_key_map": dict(p.join_key_map),
            }
            for p in service.projections
        ],
        "description": service.description,
        "owner": service.owner,
        "tags": dict(sorted(service.tags.items())),
        "created": _iso(service.created_us),
        "created_us": service.created_us,
        "updated": _iso(service.updated_us),
        "updated_us": service.updated_us,
    }


def _join_keys(entity: Entity) -> str:
    """An entity's join keys with their types: "item_id:string, shop:int64"."""
    return ", ".join(f"{k.name}:{k.dtype.name.lower()}" for k in entity.join_keys)


def _view_row(view: FeatureView) -> tuple:
    """A view's row of `list views`."""
    return (
        view.name,
        view.version,
        view.entity,
        len(view.features),
        _ttl_text(view.ttl_seconds),
        view.owner,
        _iso(view.updated_us, "seconds"),
    )


def _service_row(service: FeatureService) -> tuple:
    """A service's row of `list services`: REFERENCES counts its projections too, and VIEWS
    lists each projection as "view as alias"."""
    projected = [f"{p.view} as {p.alias}" for p in service.projections]
    return (
        service.name,
        len(service.features) + len(service.projections),
        ", ".join(_views_read(service) + projected),
        service.owner,
        _iso(service.updated_us, "seconds"),
    )


def _nothing(kind: str, prefix: str) -> None:
    """Say that nothing was listed: an empty table would read as a failure."""
    where = f" with a name starting {prefix!r}" if prefix else ""
    print(f"no {kind}{where} registered (or visible to this token)")


def cmd_list_entities(args: argparse.Namespace) -> int:
    """List the entities (those of the views the token may see) whose name starts with
    --prefix."""
    with FeatureStoreClient(client_config(args)) as client:
        entities, _ = client.list_feature_views()
    entities = [e for e in entities if e.name.startswith(args.prefix)]
    if args.json:
        _emit({"entities": [_entity_json(e) for e in entities]})
    elif not entities:
        _nothing("entities", args.prefix)
    else:
        _table(("NAME", "JOIN KEYS"), [(e.name, _join_keys(e)) for e in entities])
    return 0


def cmd_list_views(args: argparse.Namespace) -> int:
    """List the feature views whose name starts with --prefix: the latest version of each, or
    every version with --all-versions."""
    with FeatureStoreClient(client_config(args)) as client:
        _, views = client.list_feature_views(args.prefix, args.all_versions)
    if args.json:
        _emit({"views": [_view_json(v) for v in views]})
    elif not views:
        _nothing("feature views", args.prefix)
    else:
        _table(
            ("NAME", "VERSION", "ENTITY", "FEATURES", "TTL", "OWNER", "UPDATED"),
            [_view_row(v) for v in views],
        )
    return 0


def cmd_list_services(args: argparse.Namespace) -> int:
    """List the feature services whose name starts with --prefix."""
    with FeatureStoreClient(client_config(args)) as client:
        services = client.list_feature_services(args.prefix)
    if args.json:
        _emit({"services": [_service_json(s) for s in services]})
    elif not services:
        _nothing("feature services", args.prefix)
    else:
        _table(
            ("NAME", "REFERENCES", "VIEWS", "OWNER", "UPDATED"),
            [_service_row(s) for s in services],
        )
    return 0


def cmd_describe_view(args: argparse.Namespace) -> int:
    """Print every field of one view version (the latest unless --version): its features and
    the TTLs it has had."""
    with FeatureStoreClient(client_config(args)) as client:
        view = client.get_feature_view(args.name, args.version)
    if args.json:
        _emit(_view_json(view))
        return 0
    print(f"feature view {view.name}@{view.version}")
    _fields(
        [
            ("entity", view.entity),
            ("description", view.description),
            ("owner", view.owner),
            ("tags", _tags(view.tags)),
            ("ttl", _ttl_text(view.ttl_seconds)),
            ("created", _iso(view.created_us)),
            ("updated", _iso(view.updated_us)),
        ]
    )
    print("  ttl history:")
    _table(
        ("FROM", "TTL"),
        [(_iso(since), _ttl_text(ttl)) for since, ttl in view.ttl_changes()],
        indent="    ",
    )
    print(f"  features ({len(view.features)}):")
    _table(
        ("NAME", "DTYPE", "ALLOW NAN", "DESCRIPTION"),
        [(f.name, _dtype(f), "yes" if f.allow_nan else "no", f.description) for f in view.features],
        indent="    ",
    )
    return 0


def _resolved(service: FeatureService, client: FeatureStoreClient) -> list[dict]:
    """Each reference of the service in order, with the view version it reads now and the
    features it reads there (every feature of that version for a whole-view reference)."""
    views = {key: client.get_feature_view(*key) for key in service.reads}
    out = []
    for i, ref in enumerate(service.features):
        (name, pinned), feature, _ = split_ref(ref, i)
        view = views[name, pinned]
        out.append(
            {
                "reference": ref,
                "view": name,
                "pinned_version": pinned or None,
                "version": view.version,
                "features": [f.name for f in view.features] if feature is None else [feature],
            }
        )
    return out


def _resolved_projections(service: FeatureService, client: FeatureStoreClient) -> list[dict]:
    """Each projection of the service in order, with the view version it reads now, the
    features it reads there and the request column of each join key."""
    out = []
    for p in service.projections:
        view = client.get_feature_view(*p.view_key)
        entities, _ = client.list_feature_views(view.name)
        entity = next(e for e in entities if e.name == view.entity)
        out.append(
            {
                "alias": p.alias,
                "view": p.view_key[0],
                "pinned_version": p.view_key[1] or None,
                "version": view.version,
                "features": list(p.features) or [f.name for f in view.features],
                "key_columns": {k.name: p.column(k.name) for k in entity.join_keys},
            }
        )
    return out


def cmd_describe_service(args: argparse.Namespace) -> int:
    """Print every field of one feature service, and each of its references with the view
    version it resolves to now and the features it reads."""
    with FeatureStoreClient(client_config(args)) as client:
        service = client.get_feature_service(args.name)
        references = _resolved(service, client)
        projections = _resolved_projections(service, client)
    if args.json:
        _emit({**_service_json(service), "references": references, "projection_reads": projections})
        return 0
    print(f"feature service {service.name}")
    _fields(
        [
            ("description", service.description),
            ("owner", service.owner),
            ("tags", _tags(service.tags)),
            ("created", _iso(service.created_us)),
            ("updated", _iso(service.updated_us)),
        ]
    )
    print(f"  references ({len(references)}):")
    _table(
        ("REFERENCE", "READS", "FEATURES"),
        [
            (r["reference"], f"{r['view']}@{r['version']}", ", ".join(r["features"]))
            for r in references
        ],
        indent="    ",
    )
    if projections:
        print(f"  projections ({len(projections)}):")
        _table(
            ("ALIAS", "READS", "FEATURES", "KEY COLUMNS"),
            [
                (
                    p["alias"],
                    f"{p['view']}@{p['version']}",
                    ", ".join(p["features"]),
                    ", ".join(f"{key}={column}" for key, column in p["key_columns"].items()),
                )
                for p in projections
            ],
            indent="    ",
        )
    return 0


def _command(
    actions: argparse._SubParsersAction,
    name: str,
    help_text: str,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A leaf command with the connection flags and --json."""
    p = actions.add_parser(
        name, help=help_text, description=f"{help_text[0].upper()}{help_text[1:]}."
    )
    p.add_argument("--json", action="store_true", help="print one JSON document (for scripts)")
    add_connection_flags(p)
    p.set_defaults(func=func)
    return p


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `list` and `describe`."""
    listing = subparsers.add_parser(
        "list",
        help="list registered entities, feature views or feature services",
        description="List what the registry holds (what the token may see).",
    )
    kinds = listing.add_subparsers(dest="list_kind", required=True, metavar="KIND")
    prefix_help = "only names starting with this"
    p = _command(kinds, "entities", "list the entities and their join keys", cmd_list_entities)
    p.add_argument("--prefix", default="", help=prefix_help)
    p = _command(kinds, "views", "list the feature views (latest versions)", cmd_list_views)
    p.add_argument("--prefix", default="", help=prefix_help)
    p.add_argument("--all-versions", action="store_true", help="list every version of each view")
    p = _command(kinds, "services", "list the feature services", cmd_list_services)
    p.add_argument("--prefix", default="", help=prefix_help)

    describe = subparsers.add_parser(
        "describe",
        help="print a feature view's or feature service's whole definition",
        description="Print every field of one feature view version or feature service.",
    )
    kinds = describe.add_subparsers(dest="describe_kind", required=True, metavar="KIND")
    p = _command(kinds, "view", "describe one version of a feature view", cmd_describe_view)
    p.add_argument("name", help="feature view")
    p.add_argument(
        "--version", type=VERSION_OR_LATEST, default=0, help="view version (default latest)"
    )
    p = _command(
        kinds,
        "service",
        "describe a feature service and what each reference reads now",
        cmd_describe_service,
    )
    p.add_argument("name", help="feature service")
