"""Parse feature references: "view", "view:feature", "view@2", "view@2:feature"."""

from __future__ import annotations

from featurestore.errors import InvalidArgumentError

ViewKey = tuple[str, int]


def parse_feature_refs(refs: list[str]) -> dict[ViewKey, list[str] | None]:
    """Group references by (view, version); None means every feature of the view.

    Version 0 is the latest. Order of first appearance is kept, and a feature named twice
    is read once.
    """
    groups: dict[ViewKey, list[str] | None] = {}
    for i, ref in enumerate(refs):
        view_part, sep, feature = ref.partition(":")
        name, at, version_text = view_part.partition("@")
        if not name or (sep and not feature) or (at and not version_text.isdigit()):
            raise InvalidArgumentError(
                f"features[{i}]: {ref!r} is not a feature reference; use 'view:feature', "
                "'view', 'view@VERSION:feature' or 'view@VERSION'"
            )
        key = (name, int(version_text) if at else 0)
        if not sep:
            groups[key] = None
        elif key not in groups:
            groups[key] = [feature]
        elif groups[key] is not None and feature not in groups[key]:
            groups[key].append(feature)
    return groups
