"""Blobs in a dict, for tests and examples."""

from __future__ import annotations

import bisect
import builtins
import dataclasses
import datetime
import io
import itertools
import threading
from collections.abc import Iterator
from typing import IO, BinaryIO

from polydatum.blob._keys import join_url
from polydatum.blob._store import BlobInfo, BlobStore, utc_now
from polydatum.blob._streams import copy_stream


@dataclasses.dataclass(frozen=True)
class _MemoryBlob:
    data: bytes
    content_type: str
    metadata: dict[str, str]
    etag: str
    modified: datetime.datetime


class MemoryBlobStore(BlobStore):
    """Blobs in a dict: for tests and examples. Thread-safe; gone with the process.

    Args:
        base_url: when given, :meth:`url` returns ``base_url + "/" + quoted key``.

    .. versionadded:: 2.0
    """

    def __init__(self, *, base_url: str | None = None) -> None:
        self.base_url = base_url
        self._blobs: dict[str, _MemoryBlob] = {}
        self._keys: builtins.list[str] = []  # sorted, for lazy ordered listing
        self._lock = threading.Lock()
        self._versions = itertools.count(1)

    def __repr__(self) -> str:
        return f"<MemoryBlobStore {len(self._blobs)} blobs>"

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str, metadata: dict[str, str]) -> int:
        if isinstance(body, bytes):
            data = body
        else:
            # BytesIO hands its buffer over without a copy in getvalue().
            buffer = io.BytesIO()
            copy_stream(body, buffer)
            data = buffer.getvalue()
            del buffer
        with self._lock:
            etag = f"{next(self._versions):016x}"
            blob = _MemoryBlob(data, content_type, dict(metadata), etag, utc_now())
            if key not in self._blobs:
                bisect.insort(self._keys, key)
            self._blobs[key] = blob
        return len(data)

    def _blob(self, key: str) -> _MemoryBlob:
        blob = self._blobs.get(key)
        if blob is None:
            raise self._missing(key, "the memory store")
        return blob

    def _get(self, key: str) -> bytes:
        return self._blob(key).data

    def _open(self, key: str) -> BinaryIO:
        return io.BytesIO(self._blob(key).data)  # shares the bytes until written to

    def _stat(self, key: str) -> BlobInfo:
        blob = self._blob(key)
        return BlobInfo(key, len(blob.data), blob.content_type, blob.etag, blob.modified, dict(blob.metadata))

    def _exists(self, key: str) -> bool:
        return key in self._blobs

    def _delete(self, key: str) -> bool:
        with self._lock:
            if self._blobs.pop(key, None) is None:
                return False
            del self._keys[bisect.bisect_left(self._keys, key)]
            return True

    def _discard_if(self, key: str, etag: str) -> None:
        with self._lock:
            blob = self._blobs.get(key)
            if blob is not None and blob.etag == etag:
                del self._blobs[key]
                del self._keys[bisect.bisect_left(self._keys, key)]

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        while True:
            # Re-find the position on every page: the store may change meanwhile.
            with self._lock:
                if after is not None and after >= prefix:
                    index = bisect.bisect_right(self._keys, after)
                else:
                    index = bisect.bisect_left(self._keys, prefix)
                page = self._keys[index : index + page_size]
            for key in page:
                if not key.startswith(prefix):
                    return
                yield key
            if len(page) < page_size:
                return
            after = page[-1]

    def _copy(self, source: str, target: str) -> None:
        blob = self._blob(source)
        self._put(target, blob.data, blob.content_type, dict(blob.metadata))

    def _url(self, key: str, expires: int) -> str:
        if self.base_url is None:
            return super()._url(key, expires)
        return join_url(self.base_url, key)
