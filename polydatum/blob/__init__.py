"""Blob storage: one interface over the filesystem, memory and S3
================================================================

A :class:`BlobStore` keeps named byte strings ("blobs": uploads, images,
exports) under ``/``-separated keys such as ``"notes/42/photo.jpg"``. Three
stores share the interface:

- :class:`FileSystemBlobStore` — the embedded default: files under a root
  directory, written atomically;
- :class:`MemoryBlobStore` — for tests and examples;
- :class:`polydatum.s3.S3BlobStore` — Amazon S3 (or anything speaking its API)
  through boto3, installed with ``pip install "polydatum[s3]"``.

:func:`from_url` picks one from a setting such as ``BLOB_URL``:
``file:///var/lib/app/blobs``, ``s3://bucket/prefix`` or ``memory://``.

This module imports nothing outside the standard library.

Using a store directly::

    from polydatum.blob import MemoryBlobStore

    blobs = MemoryBlobStore()
    blobs.put("notes/1/hello.txt", b"hello", metadata={"author": "ada"})
    assert blobs.get("notes/1/hello.txt") == b"hello"
    assert blobs.stat("notes/1/hello.txt").content_type == "text/plain"
    with blobs.open("notes/1/hello.txt") as stream:   # large blobs: read in chunks
        assert stream.read(5) == b"hello"
    assert list(blobs.list("notes/")) == ["notes/1/hello.txt"]

Wiring it into a :class:`~polydatum.dal.DataManager` makes it a resource with
unit-of-work semantics: a blob written in a context that then fails is removed
again, and a delete waits until the context commits::

    from polydatum import DataManager, Service

    class Notes(Service):
        def attach(self, note_id, name, stream):
            self._ctx.blobs.put(f"notes/{note_id}/{name}", stream)

    dm = DataManager()
    blobs.install(dm, name="blobs")
    dm.register_services(notes=Notes())
    with dm.dal() as dal:
        dal.notes.attach(1, "a.txt", b"...")   # kept: the context commits

:func:`put_hashed` is ``put`` that also records the content's SHA-256 in the
metadata entry ``sha256`` (:data:`HASH_METADATA`): unlike an etag or a
modified time, two different stores can both compare it, and
:mod:`polydatum.sync` does::

    from polydatum.blob import put_hashed

    digest = put_hashed(blobs, "notes/1/hello.txt", b"hello")
    assert blobs.stat("notes/1/hello.txt").metadata["sha256"] == digest

Keys are checked the same way by every store, so a key that works in tests
against memory works on disk and on S3: no empty key or segment, no ``.`` or
``..`` segment, no leading ``/`` or drive letter, no backslash, NUL or other
control character, at most 1024 bytes of UTF-8, and no segment named
``.polydatum`` (reserved for polydatum's bookkeeping, at any depth).

Errors (all are :class:`~polydatum.errors.ServiceError`, so ``code`` maps to
an HTTP status)::

    BlobError                 500  the store could not do what was asked
    ├── BlobNotFound          404  also a polydatum.errors.NotFound
    ├── InvalidKey            400  also a ValueError
    ├── InvalidMetadata       400  also a ValueError
    ├── BlobStoreUnavailable  503  the storage did not answer (network, timeout, disk)
    └── UrlNotSupported       501  also a NotImplementedError

.. versionadded:: 2.0
"""

from typing import TypeAlias

from polydatum.blob._errors import (
    BlobError,
    BlobNotFound,
    BlobStoreUnavailable,
    InvalidKey,
    InvalidMetadata,
    UrlNotSupported,
)
from polydatum.blob._filesystem import FileSystemBlobStore
from polydatum.blob._hashing import HASH_METADATA, put_hashed
from polydatum.blob._keys import check_key
from polydatum.blob._memory import MemoryBlobStore
from polydatum.blob._store import BlobInfo, BlobStore
from polydatum.blob._streams import BlobData as _BlobData
from polydatum.blob._transactional import TransactionalBlobStore
from polydatum.blob._url import from_url

# Bound here, not only imported, so that autodoc finds the comment below.
#: What :meth:`BlobStore.put` accepts: bytes-like, a binary file-like object
#: (anything with ``read``), or an iterable of bytes such as a generator.
BlobData: TypeAlias = _BlobData

__all__ = [
    "HASH_METADATA",
    "BlobData",
    "BlobError",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "BlobStoreUnavailable",
    "FileSystemBlobStore",
    "InvalidKey",
    "InvalidMetadata",
    "MemoryBlobStore",
    "TransactionalBlobStore",
    "UrlNotSupported",
    "check_key",
    "from_url",
    "put_hashed",
]
