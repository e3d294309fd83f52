"""Blob data as bytes or a binary stream, read in chunks."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeAlias, cast

# What put() accepts; documented where polydatum.blob re-exports it.
BlobData: TypeAlias = bytes | bytearray | memoryview | IO[bytes] | Iterable[bytes]

CHUNK_SIZE = 1024 * 1024


class Reader(io.RawIOBase):
    """Reads an iterable of bytes, or a stream that may return short reads, as a stream.

    ``read(n)`` returns exactly ``n`` bytes until the end: boto3's multipart
    upload takes a short read for a short part, which S3 refuses.
    """

    def __init__(self, source: Iterable[bytes] | IO[bytes]) -> None:
        super().__init__()
        read = getattr(source, "read", None)
        if read is not None:
            self._chunks: Iterator[Any] = iter(lambda: read(CHUNK_SIZE), b"")
        else:
            self._chunks = iter(source)
        self._pending = b""
        self.count = 0

    def readable(self) -> bool:
        return True

    def _next(self) -> bytes:
        while True:
            chunk = next(self._chunks, None)
            if chunk is None:
                return b""
            if isinstance(chunk, str):
                msg = (
                    "blob data yielded str; blobs are bytes: encode text first "
                    "(text.encode()) or open files in binary mode ('rb')"
                )
                raise TypeError(msg)
            if not isinstance(chunk, (bytes, bytearray, memoryview)):
                msg = f"blob data must yield bytes, got {type(chunk).__name__}"
                raise TypeError(msg)
            if chunk:
                return bytes(chunk)

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            parts = [self._pending, *iter(self._next, b"")]
            self._pending = b""
            data = b"".join(parts)
        else:
            parts, have = [], 0
            if self._pending:
                parts.append(self._pending)
                have = len(self._pending)
            while have < size:
                chunk = self._next()
                if not chunk:
                    break
                parts.append(chunk)
                have += len(chunk)
            joined = parts[0] if len(parts) == 1 else b"".join(parts)
            data, self._pending = joined[:size], joined[size:]
        self.count += len(data)
        return data

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self.read(len(view))
        view[: len(data)] = data
        return len(data)

    def readall(self) -> bytes:
        return self.read(-1)


def as_body(data: object) -> bytes | IO[bytes]:
    """Turn what ``put`` accepts into bytes or a readable binary stream."""
    if isinstance(data, bytes):
        return data
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    if isinstance(data, (str, io.TextIOBase)):
        msg = (
            f"blob data must be bytes, a binary stream or an iterable of bytes, got "
            f"{type(data).__name__}; encode text first (text.encode()) or open files "
            "in binary mode ('rb')"
        )
        raise TypeError(msg)
    if hasattr(data, "read"):
        return data  # type: ignore[return-value]
    if isinstance(data, Iterable):
        return cast("IO[bytes]", Reader(data))
    msg = f"blob data must be bytes, a binary stream or an iterable of bytes, got {type(data).__name__}"
    raise TypeError(msg)


def chunks(body: bytes | IO[bytes]) -> Iterator[bytes]:
    if isinstance(body, bytes):
        yield body
        return
    while True:
        chunk = body.read(CHUNK_SIZE)
        if not chunk:
            return
        if isinstance(chunk, str):
            msg = "the stream returned str; open it in binary mode ('rb')"
            raise TypeError(msg)
        yield chunk


def copy_stream(source: IO[bytes], target: IO[bytes] | Any) -> int:
    total = 0
    while True:
        chunk = source.read(CHUNK_SIZE)
        if not chunk:
            return total
        if isinstance(chunk, str):
            msg = "the stream returned str; open it in binary mode ('rb')"
            raise TypeError(msg)
        target.write(chunk)
        total += len(chunk)
