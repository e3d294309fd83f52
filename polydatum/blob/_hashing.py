"""A content hash recorded at put time, in the blob's metadata, that any store can compare.

An etag or a modified time belongs to one store (S3 computes its ETag its own
way, a file's inode and mtime change on every copy), so two stores cannot
compare them. A SHA-256 of the content, stored next to the blob as the
metadata entry ``sha256``, means the same thing everywhere, and
:mod:`polydatum.sync` compares blobs by it.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Mapping
from typing import IO, TYPE_CHECKING

from polydatum.blob._errors import InvalidMetadata
from polydatum.blob._streams import CHUNK_SIZE, BlobData, as_body, chunks

if TYPE_CHECKING:
    from polydatum.blob._store import BlobStore

#: The metadata name under which :func:`put_hashed` records the content's SHA-256 (hex).
HASH_METADATA = "sha256"

# A stream is hashed on its way into a spool file first (the hash has to be in
# the metadata before the upload starts, for S3): up to this much stays in memory.
_SPOOL_IN_MEMORY = 8 * CHUNK_SIZE


def put_hashed(
    store: BlobStore,
    key: str,
    data: BlobData,
    content_type: str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> str:
    """``store.put`` that also records the content's SHA-256 as the metadata entry ``sha256``.

    Bytes are hashed at once. A stream or an iterable is read once, hashed as
    it is copied into a temporary spool (memory up to 8 MiB, then a temporary
    file), and uploaded from there: the hash must be known before the upload
    starts, since S3 takes metadata with the request.

    Works with any store, including ``ctx.blobs`` (the unit of work of a context).

    Args:
        store: the blob store.
        key, data, content_type: as for :meth:`BlobStore.put`.
        metadata: more metadata; it must not set ``sha256`` itself.

    Returns:
        The SHA-256 of the content, as 64 lower-case hex digits.

    Raises:
        InvalidMetadata: ``metadata`` names ``sha256`` (and what :meth:`BlobStore.put` raises).

    .. versionadded:: 2.0
    """
    extra = dict(metadata or {})
    if any(isinstance(name, str) and name.lower() == HASH_METADATA for name in extra):
        msg = f"metadata must not set {HASH_METADATA!r}: put_hashed records the content hash there itself"
        raise InvalidMetadata(msg)
    body = as_body(data)
    if isinstance(body, bytes):
        digest = hashlib.sha256(body).hexdigest()
        store.put(key, body, content_type=content_type, metadata={**extra, HASH_METADATA: digest})
        return digest
    with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
        digest = _hash_into(body, spool)
        spool.seek(0)
        store.put(key, spool, content_type=content_type, metadata={**extra, HASH_METADATA: digest})
    return digest


def _hash_into(body: IO[bytes], spool: IO[bytes]) -> str:
    hasher = hashlib.sha256()
    for chunk in chunks(body):
        hasher.update(chunk)
        spool.write(chunk)
    return hasher.hexdigest()


def hash_stream(stream: IO[bytes]) -> str:
    """The SHA-256 (hex) of what ``stream`` holds, read in chunks."""
    hasher = hashlib.sha256()
    for chunk in chunks(stream):
        hasher.update(chunk)
    return hasher.hexdigest()
