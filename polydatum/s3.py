"""Amazon S3 blob storage
======================

:class:`S3BlobStore` is a :class:`~polydatum.blob.BlobStore` over an S3 bucket
(or anything speaking S3's API: MinIO, Ceph, moto) through boto3. Install it
with ``pip install "polydatum[s3]"``.

::

    from polydatum import DataManager
    from polydatum.s3 import S3BlobStore

    blobs = S3BlobStore("my-bucket", prefix="uploads/", region_name="eu-west-1")
    blobs.check()                     # the bucket exists and answers (ping() -> bool)

    dm = DataManager()
    blobs.install(dm, name="blobs")   # put undone on rollback, delete on commit

    with dm.context() as ctx:
        ctx.blobs.put("notes/1/report.pdf", open("report.pdf", "rb"))
        link = ctx.blobs.url("notes/1/report.pdf", expires=600)   # presigned GET

How it talks to S3:

- One boto3 client per store, created on first use from a private
  ``boto3.session.Session`` and shared by every thread (clients are
  thread-safe; sessions are not). Pass ``client=`` to bring your own.
- Uploads from ``multipart_threshold`` up that make at least two parts, and
  streams of unknown length, go through boto3's managed transfer
  (``upload_fileobj``): multipart, ``max_concurrency`` parts in flight, and at
  most ``max_concurrency`` parts in memory, so a stream of any size is
  uploaded in bounded memory. Anything smaller is one ``PutObject``.
  :meth:`~polydatum.blob.BlobStore.download` uses the managed parallel
  download; :meth:`~polydatum.blob.BlobStore.open` streams one GET.
- Every request has ``connect_timeout`` and ``read_timeout`` and is retried
  by botocore's ``standard`` retry mode, ``max_attempts`` in total.
- botocore errors become polydatum errors naming the bucket and key:
  a missing key is :class:`~polydatum.blob.BlobNotFound` (a
  :class:`~polydatum.errors.NotFound`), an unreachable endpoint, a timeout or a
  connection that broke mid-transfer is
  :class:`~polydatum.blob.BlobStoreUnavailable`, anything else
  :class:`~polydatum.blob.BlobError`; the botocore exception is the ``__cause__``.

.. versionadded:: 2.0
"""

from __future__ import annotations

import datetime
import io
import threading
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any, BinaryIO, cast

try:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config
    from botocore.exceptions import (
        BotoCoreError,
        ClientError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
    )
    from botocore.exceptions import ConnectionError as BotoConnectionError
except ImportError as exc:  # pragma: no cover - exercised without boto3 installed
    msg = 'polydatum.s3 needs boto3; install it with: pip install "polydatum[s3]"'
    raise ImportError(msg) from exc

from polydatum.blob import (
    BlobError,
    BlobInfo,
    BlobNotFound,
    BlobStore,
    BlobStoreUnavailable,
    check_key,
)
from polydatum.blob._streams import Reader
from polydatum.blob._url import CREDENTIAL_CHAIN, shown_url

__all__ = ["S3BlobStore"]

MiB = 1024 * 1024
MIN_PART_SIZE = 5 * MiB  # S3 refuses smaller multipart parts (but the last)
MAX_COPY_SIZE = 5 * 1024 * MiB  # CopyObject's limit; larger copies go multipart
MAX_URL_EXPIRY = 7 * 24 * 3600  # SigV4 presigned URLs live at most a week

_MISSING_KEY = {"NoSuchKey", "404", "NotFound"}
_DENIED = {
    "AccessDenied",
    "403",
    "Forbidden",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "AllAccessDisabled",
}
_BUSY = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"}
_UNAVAILABLE = (BotoConnectionError, HTTPClientError)


class S3BlobStore(BlobStore):
    """Blobs in an S3 bucket, through boto3.

    Args:
        bucket: the bucket; it must exist (:meth:`ping` checks it).
        prefix: a key prefix inside the bucket ("folder") this store is
            confined to, e.g. ``"uploads/"``; keys are relative to it.
        client: a ready boto3 S3 client; then it is used as is, and the
            timeout, retry and ``client_options`` arguments must not be given.
        connect_timeout: seconds to wait for a TCP connection.
        read_timeout: seconds to wait for data on an open connection.
        max_attempts: attempts per request, first one included (botocore's
            ``standard`` retry mode: exponential backoff with jitter).
        multipart_threshold: uploads from this size on are multipart.
        multipart_chunksize: size of each part (at least 5 MiB).
        max_concurrency: parts transferred in parallel per upload/download.
        **client_options: passed to ``boto3.session.Session().client("s3", ...)``:
            ``endpoint_url``, ``region_name``, ``aws_access_key_id``, ... A
            ``config=botocore.config.Config(...)`` is merged over ours.

    Raises:
        ValueError: an empty bucket, a bucket with ``@`` (credentials do not go
            there), an endpoint URL (``endpoint_url`` or the ``client``'s) with a
            user name or password, a bad prefix, or a chunk size under 5 MiB.
        TypeError: ``client`` together with client options.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: Any = None,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        multipart_threshold: int = 8 * MiB,
        multipart_chunksize: int = 8 * MiB,
        max_concurrency: int = 4,
        **client_options: Any,
    ) -> None:
        if not isinstance(bucket, str) or not bucket:
            msg = f"bucket must be a non-empty str, got {bucket!r}"
            raise ValueError(msg)
        if "@" in bucket:
            # Not echoed: it is most likely "key:secret@bucket".
            msg = (
                "the bucket name contains '@', so it looks like credentials and a bucket "
                f"('key:secret@bucket'); pass the bucket alone: S3BlobStore finds credentials "
                f"in {CREDENTIAL_CHAIN}"
            )
            raise ValueError(msg)
        problem = _endpoint_credentials(client_options.get("endpoint_url"), "endpoint_url")
        if problem is None and client is not None:
            problem = _endpoint_credentials(
                getattr(getattr(client, "meta", None), "endpoint_url", None),
                "the endpoint URL of the client given",
            )
        if problem is not None:
            raise ValueError(problem)
        if not isinstance(prefix, str):
            msg = f"prefix must be a str, got {prefix!r}"
            raise ValueError(msg)
        prefix = prefix.strip("/")
        if prefix:
            check_key(prefix)
        if multipart_chunksize < MIN_PART_SIZE:
            msg = (
                "multipart_chunksize must be at least 5 MiB (S3's minimum part size), "
                f"got {multipart_chunksize}"
            )
            raise ValueError(msg)
        if client is not None and client_options:
            msg = (
                f"pass either client= or client options ({', '.join(sorted(client_options))}), "
                "not both: a ready client is used as is"
            )
            raise TypeError(msg)
        self.bucket = bucket
        self.prefix = prefix + "/" if prefix else ""
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_attempts = max_attempts
        self.multipart_threshold = multipart_threshold
        self.multipart_chunksize = multipart_chunksize
        self._client = client
        self._client_options = client_options
        self._client_lock = threading.Lock()
        self._config = Config(
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            # botocore's "max_attempts" counts retries only; "total_max_attempts" all tries.
            retries={"total_max_attempts": max_attempts, "mode": "standard"},
            max_pool_connections=max(10, 2 * max_concurrency),
            signature_version="s3v4",
        )
        self.transfer_config = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=max_concurrency,
            num_download_attempts=max_attempts,
        )
        # Bounds memory for streams of unknown size: parts read ahead of the upload.
        self.transfer_config.max_in_memory_upload_chunks = max_concurrency
        self.transfer_config.max_in_memory_download_chunks = max_concurrency

    def __repr__(self) -> str:
        return f"<S3BlobStore s3://{self.bucket}/{self.prefix}>"

    @property
    def client(self) -> Any:
        """The boto3 S3 client, created once on first use and shared by all threads."""
        client = self._client
        if client is None:
            with self._client_lock:
                if self._client is None:
                    options = dict(self._client_options)
                    config = self._config
                    if options.get("config") is not None:
                        config = config.merge(options.pop("config"))
                    options.pop("config", None)
                    made = boto3.session.Session().client("s3", config=config, **options)
                    # boto3 may have read the endpoint from AWS_ENDPOINT_URL_S3 or ~/.aws.
                    problem = _endpoint_credentials(
                        made.meta.endpoint_url, "the endpoint URL boto3 was configured with"
                    )
                    if problem is not None:
                        raise BlobError(problem)
                    self._client = made
                client = self._client
        return client

    # -- errors ------------------------------------------------------------------

    def _where(self, key: str | None) -> str:
        if key is None:
            return f"bucket {self.bucket!r}"
        return f"blob {key!r} in bucket {self.bucket!r}" + (
            f" (prefix {self.prefix!r})" if self.prefix else ""
        )

    def _error(self, action: str, key: str | None, exc: Exception) -> BlobError:
        """Translate a botocore/s3transfer exception into a polydatum one."""
        cause: BaseException = getattr(exc, "last_exception", None) or exc
        where = self._where(key)
        endpoint = (
            getattr(getattr(self._client, "meta", None), "endpoint_url", None)
            or self._client_options.get("endpoint_url")
            or "S3"
        )
        if isinstance(cause, ClientError):
            error = cause.response.get("Error", {})
            code = str(error.get("Code", ""))
            detail = error.get("Message") or code
            if code == "NoSuchBucket" or (key is None and code in _MISSING_KEY):
                msg = (
                    f"could not {action} {where}: the bucket does not exist at {endpoint}; "
                    "create it, or fix the bucket name given to S3BlobStore"
                )
                return BlobError(msg, key=key)
            if code in _MISSING_KEY and key is not None:
                msg = f"no blob {key!r} in bucket {self.bucket!r}" + (
                    f" under prefix {self.prefix!r}" if self.prefix else ""
                )
                return BlobNotFound(msg, key=key)
            if code in _DENIED:
                msg = (
                    f"S3 denied access to {action} {where} ({code}: {detail}); check the "
                    "credentials, the region and the bucket policy"
                )
                return BlobError(msg, key=key)
            if code in _BUSY:
                msg = (
                    f"could not {action} {where}: S3 at {endpoint} kept failing "
                    f"({code}: {detail}) after {self.max_attempts} attempts; try again later"
                )
                return BlobStoreUnavailable(msg, key=key)
            msg = f"S3 refused to {action} {where}: {code}: {detail}"
            return BlobError(msg, key=key)
        if isinstance(cause, IncompleteReadError):
            msg = (
                f"could not {action} {where}: the connection to S3 at {endpoint} broke "
                f"mid-transfer ({cause}); nothing is wrong with the blob, read it again"
            )
            return BlobStoreUnavailable(msg, key=key)
        if isinstance(cause, _UNAVAILABLE):
            msg = (
                f"could not {action} {where}: S3 at {endpoint} did not answer ({cause}); "
                f"gave up after {self.max_attempts} attempts with connect_timeout="
                f"{self.connect_timeout}s and read_timeout={self.read_timeout}s. Check "
                "that the endpoint is up and reachable from here"
            )
            return BlobStoreUnavailable(msg, key=key)
        if isinstance(cause, NoCredentialsError):
            msg = (
                f"could not {action} {where}: no AWS credentials found; set "
                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, a profile, or an instance role"
            )
            return BlobError(msg, key=key)
        msg = f"could not {action} {where}: {cause}"
        return BlobError(msg, key=key)

    # -- primitives ----------------------------------------------------------------

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str, metadata: dict[str, str]) -> int:
        extra = {"ContentType": content_type, "Metadata": metadata}
        try:
            stream, size = _sized_stream(body)
            if size is not None and (size < self.multipart_threshold or size <= self.multipart_chunksize):
                # One PUT: below the threshold, or a "multipart" upload of a
                # single part (three requests instead of one).
                self.client.put_object(
                    Bucket=self.bucket,
                    Key=self.prefix + key,
                    Body=body if isinstance(body, bytes) else stream,
                    **extra,
                )
                return size
            self.client.upload_fileobj(
                stream, self.bucket, self.prefix + key, ExtraArgs=extra, Config=self.transfer_config
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("upload", key, exc) from exc
        return size if size is not None else cast(Reader, stream).count

    def _get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
            body = response["Body"]
            try:
                return cast(bytes, body.read())
            finally:
                body.close()
        except (BotoCoreError, ClientError) as exc:
            raise self._error("download", key, exc) from exc

    def _open(self, key: str) -> BinaryIO:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("open", key, exc) from exc
        return io.BufferedReader(_S3Stream(self, key, response["Body"]), buffer_size=256 * 1024)

    def _download(self, key: str, target: IO[bytes]) -> int:
        seekable = _seekable(target)
        start = target.tell() if seekable else 0
        sink: Any = target if seekable else _CountingWriter(target)
        try:
            self.client.download_fileobj(self.bucket, self.prefix + key, sink, Config=self.transfer_config)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("download", key, exc) from exc
        if not seekable:
            return cast(int, sink.count)
        # Parts land out of order; the end of the target is the end of the blob.
        return target.seek(0, io.SEEK_END) - start

    def _stat(self, key: str) -> BlobInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("stat", key, exc) from exc
        return BlobInfo(
            key=key,
            size=int(head.get("ContentLength", 0)),
            content_type=head.get("ContentType") or "binary/octet-stream",
            etag=str(head.get("ETag", "")).strip('"'),
            modified=head["LastModified"].astimezone(datetime.timezone.utc),
            metadata=dict(head.get("Metadata") or {}),
        )

    def _exists(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            error = self._error("check", key, exc)
            if isinstance(error, BlobNotFound):
                return False
            raise error from exc
        return True

    def _delete(self, key: str) -> bool:
        # DeleteObject succeeds for missing keys too; the HEAD tells us which it was.
        if not self._exists(key):
            return False
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", key, exc) from exc
        return True

    def _discard(self, key: str) -> None:
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("delete", key, exc) from exc

    def _discard_if(self, key: str, etag: str) -> None:
        # One conditional DeleteObject (If-Match), no HEAD first: 412 means written
        # again since, 404 already gone; both leave nothing to do.
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.prefix + key, IfMatch=f'"{etag}"')
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING_KEY or code == "PreconditionFailed" or status in (404, 412):
                return
            if code == "NotImplemented" or status == 501:
                # A server speaking S3 without conditional deletes: ask, then delete.
                super()._discard_if(key, etag)
                return
            raise self._error("delete", key, exc) from exc
        except BotoCoreError as exc:
            raise self._error("delete", key, exc) from exc

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        params: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "PaginationConfig": {"PageSize": page_size},
        }
        if after is not None and after >= prefix:
            params["StartAfter"] = self.prefix + after
        strip = len(self.prefix)
        try:
            for page in self.client.get_paginator("list_objects_v2").paginate(**params):
                for item in page.get("Contents", ()):
                    yield item["Key"][strip:]
        except (BotoCoreError, ClientError) as exc:
            raise self._error("list", prefix or None, exc) from exc

    def _copy(self, source: str, target: str) -> None:
        info = self._stat(source)
        copy_source = {"Bucket": self.bucket, "Key": self.prefix + source}
        try:
            if info.size <= MAX_COPY_SIZE:
                self.client.copy_object(
                    Bucket=self.bucket,
                    Key=self.prefix + target,
                    CopySource=copy_source,
                    MetadataDirective="COPY",
                )
            else:
                extra = {"ContentType": info.content_type, "Metadata": dict(info.metadata)}
                self.client.copy(
                    copy_source,
                    self.bucket,
                    self.prefix + target,
                    ExtraArgs=extra,
                    Config=self.transfer_config,
                )
        except (BotoCoreError, ClientError) as exc:
            raise self._error(f"copy {source!r} to", target, exc) from exc

    def _url(self, key: str, expires: int) -> str:
        if expires > MAX_URL_EXPIRY:
            msg = f"S3 presigned URLs live at most 7 days ({MAX_URL_EXPIRY}s), got {expires}s"
            raise ValueError(msg)
        try:
            return cast(
                str,
                self.client.generate_presigned_url(
                    "get_object",
                    Params={"Bucket": self.bucket, "Key": self.prefix + key},
                    ExpiresIn=expires,
                ),
            )
        except (BotoCoreError, ClientError) as exc:
            raise self._error("sign a URL for", key, exc) from exc

    def _ping(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self._error("reach", None, exc) from exc


def _endpoint_credentials(endpoint_url: object, what: str) -> str | None:
    """Why an endpoint URL holding a user or password is refused, or None when it holds none.

    S3 never sends them (every request is signed with AWS keys), and
    botocore repeats the endpoint in its errors, so they could only leak.
    """
    if not isinstance(endpoint_url, str) or "@" not in urllib.parse.urlsplit(endpoint_url).netloc:
        return None
    return (
        f"{what} {shown_url(endpoint_url)!r} carries a user name or password, which S3 "
        "never sends (every request is signed with AWS keys) and errors would repeat; "
        f"give the endpoint without them: credentials come from {CREDENTIAL_CHAIN}, or "
        "aws_access_key_id=/aws_secret_access_key="
    )


class _S3Stream(io.RawIOBase):
    """A GET's body as a raw stream whose errors are polydatum errors."""

    def __init__(self, store: S3BlobStore, key: str, body: Any) -> None:
        super().__init__()
        self._store = store
        self._key = key
        self._body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        try:
            data = self._body.read(len(view))
        except (BotoCoreError, ClientError) as exc:
            raise self._store._error("read", self._key, exc) from exc
        view[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            self._body.close()
        super().close()


class _CountingWriter:
    """Counts what is written to a non-seekable target."""

    def __init__(self, target: IO[bytes]) -> None:
        self._target = target
        self.count = 0

    def write(self, data: bytes) -> int:
        self._target.write(data)
        self.count += len(data)
        return len(data)


def _seekable(stream: Any) -> bool:
    try:
        return bool(stream.seekable())
    except (AttributeError, OSError, ValueError):
        return False


def _sized_stream(body: bytes | IO[bytes]) -> tuple[IO[bytes], int | None]:
    """A stream for upload_fileobj, and its remaining size when known up front."""
    if isinstance(body, bytes):
        return io.BytesIO(body), len(body)
    if _seekable(body):
        start = body.tell()
        end = body.seek(0, io.SEEK_END)
        body.seek(start)
        return body, end - start
    # boto3 reads parts with read(n) and takes a short read for a short part,
    # which S3 refuses; Reader fills every read and counts the bytes.
    reader = body if isinstance(body, Reader) else Reader(body)
    return cast(IO[bytes], reader), None
