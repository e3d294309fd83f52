"""Picking a store from a URL setting such as ``BLOB_URL``."""

from __future__ import annotations

import urllib.parse
from typing import Any

from polydatum.blob._filesystem import FileSystemBlobStore
from polydatum.blob._memory import MemoryBlobStore
from polydatum.blob._store import BlobStore


def from_url(url: str, **options: Any) -> BlobStore:
    """Build a store from a URL, so one setting (e.g. ``BLOB_URL``) picks the backend.

    ============================== ==========================================
    URL                            store
    ============================== ==========================================
    ``file:///var/lib/app/blobs``  ``FileSystemBlobStore("/var/lib/app/blobs")``
    ``/var/lib/app/blobs``         the same (a plain path; relative paths too)
    ``s3://bucket/uploads``        ``S3BlobStore("bucket", prefix="uploads")``
    ``memory://``                  ``MemoryBlobStore()``
    ============================== ==========================================

    Percent-escapes in paths are decoded. ``S3BlobStore`` needs boto3
    (``pip install "polydatum[s3]"``); it is imported only for ``s3://``.

    Args:
        url: where the blobs live.
        **options: passed to the store's constructor, e.g. ``fsync=False``,
            or ``endpoint_url=...``, ``region_name=...`` for S3.

    Raises:
        ValueError: an unsupported scheme, an ``s3://`` URL without a bucket,
            a ``file://`` URL naming another host, or a query string (pass
            options as keyword arguments instead).
        TypeError: ``url`` is not a str, or an option the store does not take.

    .. versionadded:: 2.0
    """
    if not isinstance(url, str):
        msg = f"a blob store URL is a str such as 's3://bucket/prefix', got {url!r}"
        raise TypeError(msg)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if parts.query or parts.fragment:
        msg = (
            f"blob store URL {url!r} has a query or fragment; pass options as keyword "
            "arguments instead: from_url(url, endpoint_url=..., fsync=False)"
        )
        raise ValueError(msg)
    if scheme == "s3":
        if not parts.netloc:
            msg = f"blob store URL {url!r} names no bucket; use s3://bucket or s3://bucket/prefix"
            raise ValueError(msg)
        from polydatum.s3 import S3BlobStore

        return S3BlobStore(parts.netloc, prefix=urllib.parse.unquote(parts.path).strip("/"),
                           **options)
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/"):
            msg = f"blob store URL {url!r}: a memory store has no location; use 'memory://'"
            raise ValueError(msg)
        return MemoryBlobStore(**options)
    if scheme == "file" or (not scheme and parts.path):
        if parts.netloc not in ("", "localhost"):
            msg = (
                f"blob store URL {url!r} names the host {parts.netloc!r}; file URLs are local: "
                "file:///absolute/path (three slashes)"
            )
            raise ValueError(msg)
        path = urllib.parse.unquote(parts.path) if scheme else url
        if not path:
            msg = f"blob store URL {url!r} has no path; use file:///absolute/path"
            raise ValueError(msg)
        return FileSystemBlobStore(path, **options)
    msg = (
        f"unsupported blob store URL {url!r}; use file:///absolute/path, a plain path, "
        "s3://bucket/prefix or memory://"
    )
    raise ValueError(msg)
