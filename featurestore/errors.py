"""The feature store's errors: values a caller can act on, mapped to gRPC statuses by server/."""


class FeatureStoreError(Exception):
    """Base of every feature store error."""


class NotFoundError(FeatureStoreError):
    """A view, feature, entity or version that is not registered."""


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
