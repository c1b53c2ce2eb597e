"""Parse feature references: "view", "view:feature", "view@2", "view@2:feature".

One parser for the server (which reads one group per view and version) and the clients (which
file each group's columns under the view part as the caller wrote it).
"""

from __future__ import annotations

from featurestore.errors import InvalidArgumentError

ViewKey = tuple[str, int]


def split_ref(ref: str, index: int) -> tuple[ViewKey, str | None, str]:
    """(view, version), the feature (None: the whole view) and the view part as written."""
    view_part, sep, feature = ref.partition(":")
    name, at, version_text = view_part.partition("@")
    decimal = version_text.isascii() and version_text.isdecimal()
    if not name or (sep and not feature) or (at and not decimal):
        raise InvalidArgumentError(
            f"features[{index}]: {ref!r} is not a feature reference; use 'view:feature', "
            "'view', 'view@VERSION:feature' or 'view@VERSION', VERSION in ASCII digits "
            "(0: the latest)"
        )
    return (name, int(version_text) if at else 0), (feature if sep else None), view_part


def parse_feature_refs(refs: list[str]) -> dict[ViewKey, list[str] | None]:
    """Group references by (view, version); None means every feature of the view.

    Version 0 is the latest. Order of first appearance is kept, and a feature named twice
    is read once.
    """
    groups: dict[ViewKey, list[str] | None] = {}
    for i, ref in enumerate(refs):
        key, feature, _ = split_ref(ref, i)
        if feature is None:
            groups[key] = None
        elif key not in groups:
            groups[key] = [feature]
        elif groups[key] is not None and feature not in groups[key]:
            groups[key].append(feature)
    return groups


def written_view_parts(refs: list[str]) -> list[list[str]]:
    """For each group of parse_feature_refs, in its order, the view parts as the references
    wrote them ("user", "user@2"): the names a client files that group's columns under."""
    parts: dict[ViewKey, list[str]] = {}
    for i, ref in enumerate(refs):
        key, _, written = split_ref(ref, i)
        names = parts.setdefault(key, [])
        if written not in names:
            names.append(written)
    return list(parts.values())
