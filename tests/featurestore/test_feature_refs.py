"""Feature references: one parser groups them for the server and names the groups for clients."""

import pytest

from featurestore.errors import InvalidArgumentError
from featurestore.feature_refs import parse_feature_refs, written_view_parts

REFS = ["user:a", "user@2:b", "user", "user@0:c", "txn@3", "user@2:b", "user:a"]


def test_groups_by_view_and_version_in_first_appearance_order() -> None:
    assert parse_feature_refs(REFS) == {("user", 0): None, ("user", 2): ["b"], ("txn", 3): None}
    assert parse_feature_refs(["v:x", "v:y", "v:x"]) == {("v", 0): ["x", "y"]}


def test_written_view_parts_line_up_with_the_groups() -> None:
    assert written_view_parts(REFS) == [["user", "user@0"], ["user@2"], ["txn@3"]]
    assert len(written_view_parts(REFS)) == len(parse_feature_refs(REFS))


@pytest.mark.parametrize(
    "ref", ["", ":a", "v:", "v@x:a", "v@:a", "@2:a", "v@\u00b2:x", "v@\uff11:x", "v@-1", "v@ 1"]
)
def test_malformed_references_name_their_index(ref: str) -> None:
    """Versions are ASCII decimal: a superscript or full-width digit is refused, not parsed."""
    with pytest.raises(InvalidArgumentError) as err:
        parse_feature_refs(["ok", ref])
    assert str(err.value).startswith(f"features[1]: {ref!r} is not a feature reference; use")
    assert "'view@VERSION:feature'" in str(err.value) and "ASCII digits" in str(err.value)
    with pytest.raises(InvalidArgumentError, match=r"features\[1\]"):
        written_view_parts(["ok", ref])
