"""The errors every blob store raises."""

from __future__ import annotations

from polydatum.errors import NotFound, ServiceError


class BlobError(ServiceError):
    """A blob store could not do what was asked.

    Attributes:
        key: the key the operation was about, when there is one.

    .. versionadded:: 2.0
    """

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BlobNotFound(BlobError, NotFound):
    """No blob is stored under the key (HTTP 404); also a :class:`~polydatum.errors.NotFound`.

    .. versionadded:: 2.0
    """


class InvalidKey(BlobError, ValueError):
    """A key was refused: it could escape the store's root or is not portable (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400


class InvalidMetadata(BlobError, ValueError):
    """Metadata or a content type that not every store can keep (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400


class BlobStoreUnavailable(BlobError):
    """The storage did not answer: network down, timeout, disk gone (HTTP 503).

    .. versionadded:: 2.0
    """

    code = 503


class UrlNotSupported(BlobError, NotImplementedError):
    """The store cannot hand out URLs for its blobs (HTTP 501).

    .. versionadded:: 2.0
    """

    code = 501
