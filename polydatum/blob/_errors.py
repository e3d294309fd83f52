"""The errors every blob store raises."""

from __future__ import annotations

from polydatum.errors import NotFound, ServiceError


class BlobError(ServiceError):
    """A blob store could not do what was asked.

    Its message names the key and the store's root, bucket or endpoint, for
    the log; clients get only the short :attr:`public_message` of its class.

    Attributes:
        key: the key the operation was about, when there is one.

    .. versionadded:: 2.0
    """

    public_message = "the blob store could not complete the request"

    def __init__(self, message: str, *, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class BlobNotFound(BlobError, NotFound):
    """No blob is stored under the key (HTTP 404); also a :class:`~polydatum.errors.NotFound`.

    .. versionadded:: 2.0
    """

    public_message = "blob not found"


class InvalidKey(BlobError, ValueError):
    """A key was refused: it could escape the store's root or is not portable (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400
    public_message = "invalid blob key"


class InvalidMetadata(BlobError, ValueError):
    """Metadata or a content type that not every store can keep (HTTP 400).

    .. versionadded:: 2.0
    """

    code = 400
    public_message = "invalid blob metadata or content type"


class BlobStoreUnavailable(BlobError):
    """The storage did not answer: network down, timeout, disk gone (HTTP 503).

    .. versionadded:: 2.0
    """

    code = 503
    public_message = "the blob store is unavailable; try again later"


class UrlNotSupported(BlobError, NotImplementedError):
    """The store cannot hand out URLs for its blobs (HTTP 501).

    .. versionadded:: 2.0
    """

    code = 501
    public_message = "this blob store cannot hand out URLs"
