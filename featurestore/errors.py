"""The feature store's errors: values a caller can act on, mapped to gRPC statuses by server/."""

from __future__ import annotations

from collections.abc import Sequence

MAX_SUGGESTIONS = 5
"""Close names a NotFoundError's message suggests; it counts the rest."""
MAX_QUOTED_CHARS = 100
"""Characters of a caller's input a message quotes: a long name is cut, not repeated whole."""


def quoted(text: str) -> str:
    """repr() of a caller's input, cut to its first MAX_QUOTED_CHARS characters (marked ...)."""
    if len(text) <= MAX_QUOTED_CHARS:
        return repr(text)
    return f"{text[:MAX_QUOTED_CHARS]!r}... ({len(text)} characters)"


class FeatureStoreError(Exception):
    """Base of every feature store error."""


class NotFoundError(FeatureStoreError):
    """A view, feature, entity or version that is not registered.

    Beside the message, its parts as data: `what` is missing ("view", "feature", "entity",
    "version", or "" when not said), `suggestions` the registered names closest to the one
    asked for (best first) and `listed_by` where to list them all. str() shows the first
    MAX_SUGGESTIONS; message() renders it with fewer (a server keeps those its caller may see).
    """

    def __init__(
        self,
        problem: str,
        what: str = "",
        suggestions: Sequence[str] = (),
        listed_by: str = "",
    ) -> None:
        self.problem = problem
        self.what = what
        self.suggestions = tuple(suggestions)
        self.listed_by = listed_by
        super().__init__(self.message(self.suggestions))

    def message(self, suggestions: Sequence[str]) -> str:
        """The problem, the first MAX_SUGGESTIONS of `suggestions`, how many more there are
        and where to list them all."""
        text = self.problem
        if suggestions:
            shown = ", ".join(quoted(name) for name in suggestions[:MAX_SUGGESTIONS])
            if len(suggestions) > MAX_SUGGESTIONS:
                shown += f" (or {len(suggestions) - MAX_SUGGESTIONS} more close names)"
            text += f"; did you mean {shown}?"
        if self.listed_by:
            text += f" {self.listed_by}" if suggestions else f"; {self.listed_by}"
        return text

    def __reduce__(self):
        # keep the parts across pickling (the commit process sends errors back)
        return type(self), (self.problem, self.what, self.suggestions, self.listed_by)


class InvalidArgumentError(FeatureStoreError):
    """Input that can never succeed as sent: the message names the field and the first bad row."""


class BadRowError(InvalidArgumentError):
    """A batch rejected whole (reject_batch) for its first bad row: `row` counts from 0 in the
    batch, so a caller can name the row in its own terms (a file's line, a stream's message)."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


class CorruptRowError(FeatureStoreError):
    """A stored row that does not fit its view's row layout; `row` is its position in the
    decoded batch (a lookup's entity row, a history log's record)."""

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


class ResourceExhaustedError(FeatureStoreError):
    """A request over a configured limit; the message names the limit."""


class ConflictError(FeatureStoreError):
    """A change incompatible with what is stored (for example retyping a feature in place)."""


class UnavailableError(FeatureStoreError):
    """The store cannot serve right now (closed, shutting down); retrying later may work."""


class StorageFullError(ResourceExhaustedError):
    """A commit found no room on the data dir's file system; nothing of it was stored."""


class StorageFailedError(UnavailableError):
    """A commit failed in the file system (an I/O error); nothing of it was stored."""
