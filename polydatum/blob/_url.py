"""Picking a store from a URL setting such as ``BLOB_URL``, and keeping URL secrets out of messages."""

from __future__ import annotations

import re
import urllib.parse
from typing import Any

from polydatum.blob._filesystem import FileSystemBlobStore
from polydatum.blob._memory import MemoryBlobStore
from polydatum.blob._store import BlobStore

#: Where S3 credentials come from, for messages that refuse them elsewhere.
CREDENTIAL_CHAIN = (
    "the AWS credential chain (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
    "AWS_PROFILE and ~/.aws, or an instance or task role)"
)


def shown_url(url: str) -> str:
    """``url`` as an error message may repeat it: no user, password, query or fragment."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        scheme, rest = "", url
    # Up to the last "@" anywhere: a password with an unescaped "/", "?" or
    # "#" in it splits a URL elsewhere than its author meant.
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    cut = re.search(r"[?#]", rest)
    if cut:
        rest = rest[: cut.end()] + "***"
    return scheme + separator + rest


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
    A URL never carries credentials: S3's come from the AWS credential chain.

    Args:
        url: where the blobs live.
        **options: passed to the store's constructor, e.g. ``fsync=False``,
            or ``endpoint_url=...``, ``region_name=...`` for S3.

    Raises:
        ValueError: an unsupported scheme, a user name or password in the URL,
            an ``s3://`` URL without a bucket or with a port, a ``file://``
            URL naming another host, or a query string (pass options as
            keyword arguments instead). The message never repeats a
            password, a query or a fragment.
        TypeError: ``url`` is not a str, or an option the store does not take.

    .. versionadded:: 2.0
    """
    if not isinstance(url, str):
        msg = f"a blob store URL is a str such as 's3://bucket/prefix', got {type(url).__name__}"
        raise TypeError(msg)
    shown = shown_url(url)
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if "@" in parts.netloc:
        msg = (
            f"blob store URL {shown!r} carries a user name or password; blob store URLs "
            f"take none. S3BlobStore finds credentials in {CREDENTIAL_CHAIN}; keep them "
            "out of settings that get logged"
        )
        raise ValueError(msg)
    if parts.query or parts.fragment:
        msg = (
            f"blob store URL {shown!r} has a query or fragment; pass options as keyword "
            "arguments instead: from_url(url, endpoint_url=..., fsync=False)"
        )
        raise ValueError(msg)
    if scheme == "s3":
        if not parts.netloc:
            msg = f"blob store URL {shown!r} names no bucket; use s3://bucket or s3://bucket/prefix"
            raise ValueError(msg)
        if ":" in parts.netloc:
            msg = (
                f"blob store URL {shown!r} names a port, but s3://bucket/prefix names a bucket; "
                "point to another S3 service with from_url(url, endpoint_url='http://host:port')"
            )
            raise ValueError(msg)
        from polydatum.s3 import S3BlobStore

        return S3BlobStore(parts.netloc, prefix=urllib.parse.unquote(parts.path).strip("/"), **options)
    if scheme == "memory":
        if parts.netloc or parts.path.strip("/"):
            msg = f"blob store URL {shown!r}: a memory store has no location; use 'memory://'"
            raise ValueError(msg)
        return MemoryBlobStore(**options)
    if scheme == "file" or (not scheme and parts.path):
        if parts.netloc not in ("", "localhost"):
            host = urllib.parse.urlsplit(shown).netloc
            msg = (
                f"blob store URL {shown!r} names the host {host!r}; file URLs are "
                "local: file:///absolute/path (three slashes)"
            )
            raise ValueError(msg)
        path = urllib.parse.unquote(parts.path) if scheme else url
        if not path:
            msg = f"blob store URL {shown!r} has no path; use file:///absolute/path"
            raise ValueError(msg)
        return FileSystemBlobStore(path, **options)
    msg = (
        f"unsupported blob store URL {shown!r}; use file:///absolute/path, a plain path, "
        "s3://bucket/prefix or memory://"
    )
    raise ValueError(msg)
