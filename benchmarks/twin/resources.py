"""The servers the twin talks to, and what it does to them after a commit.

Configured from the example's environment variables (``DATABASE_URL``,
``REDIS_URL``, ``CACHE_NAMESPACE``, ``BLOB_URL=s3://bucket/prefix``,
``AWS_ENDPOINT_URL``, ``CELERY_BROKER_URL``, ``CELERY_QUEUE``,
``SECRET_KEY``), so one environment serves both apps. Only the server stack
is supported: PostgreSQL, Redis, S3 and a Celery broker.
"""

from __future__ import annotations

import json
import os
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import IO, Any

import boto3
import redis
from botocore.config import Config
from botocore.exceptions import ClientError
from celery import Celery
from sqlalchemy import create_engine, delete
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from twin.models import outbox as outbox_table
from twin.outbox import Outbox

DEV_SECRET = "polydatum-notes-development-key"
CACHE_TTL = 300.0  # seconds a cached note is fresh
CLAIM_TTL = 10.0  # seconds a reader may take to compute a note before others stop waiting
CLAIM_WAIT = 2.0  # seconds a reader waits for another's computation before computing itself
ORPHAN_AFTER = 900.0  # seconds before the relay removes a blob whose request never committed
CELERY_TOPIC = "polydatum.celery"
BLOB_TOPIC = "polydatum.blob:blobs"

# Store the value only while our claim holds (an invalidation deletes the claim).
_SET_IF_CLAIMED = """
if redis.call('GET', KEYS[2]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('DEL', KEYS[2])
return 1
"""
_DELETE_IF_CLAIMED = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Counting:
    """A read-only stream that counts the bytes read through it (the attachment's size)."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        return data


class Resources:
    """The engine, sessions, Redis, S3, Celery and the outbox of one process."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        url = make_url(env["DATABASE_URL"])
        if url.drivername in ("postgres", "postgresql"):
            url = url.set(drivername="postgresql+psycopg")
        self.engine = create_engine(url, pool_pre_ping=True)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.secret = env.get("SECRET_KEY") or DEV_SECRET
        self.redis = redis.Redis.from_url(env["REDIS_URL"])
        namespace = env.get("CACHE_NAMESPACE") or "notes"
        self.cache_prefix = f"{namespace}:1:"
        self.claim_prefix = f"{namespace}:1#claim:"
        self.cache_topic = f"polydatum.cache:{namespace}"
        self._set_if_claimed = self.redis.register_script(_SET_IF_CLAIMED)
        self._delete_if_claimed = self.redis.register_script(_DELETE_IF_CLAIMED)
        blob = urllib.parse.urlsplit(env["BLOB_URL"])
        if blob.scheme != "s3":
            msg = f"the twin stores blobs in S3 only; BLOB_URL={env['BLOB_URL']!r} is not s3://bucket/prefix"
            raise ValueError(msg)
        self.bucket = blob.netloc
        prefix = blob.path.strip("/")
        self.blob_prefix = f"{prefix}/" if prefix else ""
        self.s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=env.get("AWS_ENDPOINT_URL") or None,
            config=Config(connect_timeout=3, retries={"max_attempts": 2}),
        )
        broker = env.get("CELERY_BROKER_URL")
        if not broker:
            msg = "the twin sends its jobs to a broker; set CELERY_BROKER_URL"
            raise ValueError(msg)
        self.celery = Celery("twin", broker=broker, set_as_current=False)
        self.celery.conf.update(
            task_default_queue=env.get("CELERY_QUEUE") or "notes",
            task_serializer="json",
            broker_connection_timeout=3,
            task_ignore_result=True,
            # Its outbox deletes a row once the send returned, as polydatum's does: so
            # the send waits for RabbitMQ's publisher confirm, as polydatum's does.
            broker_transport_options={"confirm_publish": True},
        )
        handlers: dict[str, Callable[[Any], object]] = {
            self.cache_topic: self._unlink,
            CELERY_TOPIC: self._publish,
            BLOB_TOPIC: self._discard_blobs,
        }
        self.outbox = Outbox(self.engine, handlers)

    def close(self) -> None:
        """Let go of pools and connections."""
        self.outbox.flush()
        self.engine.dispose()
        self.redis.close()
        self.celery.close()

    # -- in the request's transaction -----------------------------------------------------

    def claim_of(self, key: str) -> str:
        # The claim hashes to its entry's Redis Cluster slot: the entry's name is its hash tag.
        return f"{self.claim_prefix}{{{self.cache_prefix}{key}}}"

    def invalidate(self, session: Session, pending: list[Any], key: str) -> None:
        """Delete the cached ``key`` (and its claim) once the transaction committed."""
        keys = [self.cache_prefix + key, self.claim_of(key)]
        self.outbox.add(session, pending, self.cache_topic, {"keys": keys})

    def index_later(self, session: Session, pending: list[Any], note_id: int) -> None:
        """Send the ``notes.index_note`` job once the transaction committed."""
        message = {
            "task": "notes.index_note",
            "id": str(uuid.uuid4()),
            "content_type": "application/json",
            "encoding": "utf-8",
            "body": json.dumps([[note_id], {}]),
            "options": "{}",
        }
        self.outbox.add(session, pending, CELERY_TOPIC, message)

    def delete_blob_later(self, session: Session, pending: list[Any], key: str) -> None:
        """Delete the blob ``key`` once the transaction committed, if it exists now."""
        if self.blob_exists(key):
            self.outbox.add(session, pending, BLOB_TOPIC, {"discard": [key]})

    def put_blob(self, session: Session, key: str, stream: IO[bytes], content_type: str) -> tuple[int, int]:
        """Upload a new blob; a committed cleanup row removes it unless ``session`` commits.

        Returns:
            the size in bytes and the id of the cleanup row (remove it if the request fails).
        """
        if self.blob_exists(key):
            msg = f"blob {key!r} exists already; keys are new uuids"
            raise RuntimeError(msg)
        cleanup = self.outbox.add_detached(BLOB_TOPIC, {"restore": key, "undo": None}, ORPHAN_AFTER)
        # Gone with the request's commit; kept (for the relay) if it never commits.
        session.execute(delete(outbox_table).where(outbox_table.c.id == cleanup))
        counting = Counting(stream)
        extra = {"ContentType": content_type, "Metadata": {}}
        self.s3.upload_fileobj(counting, self.bucket, self.blob_prefix + key, ExtraArgs=extra)
        return counting.count, cleanup

    def undo_put(self, key: str, cleanup: int) -> None:
        """After a rollback: delete the uploaded blob and its cleanup row."""
        self.s3.delete_object(Bucket=self.bucket, Key=self.blob_prefix + key)
        self.outbox.remove([cleanup])

    def blob_exists(self, key: str) -> bool:
        """HEAD the blob ``key``."""
        try:
            self.s3.head_object(Bucket=self.bucket, Key=self.blob_prefix + key)
        except ClientError as exc:
            if _missing(exc):
                return False
            raise
        return True

    def open_blob(self, key: str) -> Any:
        """A stream of the blob's bytes, or None when no blob is stored under ``key``.

        A fetch that read the attachment's row just before a delete committed
        finds its blob gone (deleted after that commit).
        """
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self.blob_prefix + key)["Body"]
        except ClientError as exc:
            if _missing(exc):
                return None
            raise

    # -- the cached read ------------------------------------------------------------------

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """The fresh cached value of ``key``, or ``compute()`` stored under a claim."""
        full, claim = self.cache_prefix + key, self.claim_of(key)
        try:
            entry = self._unpack(self._get(full))
            if entry is not None and entry[0] > time.time():
                return entry[1]
            token = b'j"' + uuid.uuid4().hex.encode() + b'"'
            if not self.redis.set(claim, token, nx=True, px=int(CLAIM_TTL * 1000)):
                if entry is not None:
                    return entry[1]  # another reader refreshes it; serve the previous value
                deadline, pause = time.monotonic() + CLAIM_WAIT, 0.002
                while time.monotonic() < deadline:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.05)
                    entry = self._unpack(self._get(full))
                    if entry is not None:
                        return entry[1]
                    if self.redis.get(claim) is None:
                        break
                if not self.redis.set(claim, token, nx=True, px=int(CLAIM_TTL * 1000)):
                    return compute()  # never store without the claim
            # Someone may have stored and released between our read and our claim.
            fresh = self._unpack(self._get(full))
            if fresh is not None and fresh[0] > time.time():
                self._release(claim, token)
                return fresh[1]
        except redis.RedisError:
            return compute()  # the cache is down: serve from the database
        try:
            value = compute()
        except BaseException:
            self._release(claim, token)
            raise
        data = b"j" + json.dumps([time.time() + CACHE_TTL, value], separators=(",", ":")).encode()
        try:
            self._set_if_claimed(keys=[full, claim], args=[data, token, int(CACHE_TTL * 1000)])
        except redis.RedisError:
            pass  # not stored: the next reader computes it again
        return value

    def _get(self, key: str) -> bytes | None:
        data: bytes | None = self.redis.get(key)  # type: ignore[assignment]  # raw bytes: no decoding
        return data

    def _release(self, claim: str, token: bytes) -> None:
        try:
            self._delete_if_claimed(keys=[claim], args=[token])
        except redis.RedisError:
            pass  # it lapses by itself

    @staticmethod
    def _unpack(data: bytes | None) -> list[Any] | None:
        if not data or data[:1] != b"j":
            return None
        entry = json.loads(data[1:])
        return entry if isinstance(entry, list) and len(entry) == 2 else None

    # -- after the commit -----------------------------------------------------------------

    def _unlink(self, payload: Any) -> None:
        self.redis.unlink(*payload["keys"])

    def _publish(self, payload: Any) -> None:
        args, kwargs = json.loads(payload["body"])
        self.celery.send_task(
            payload["task"], args=args, kwargs=kwargs, task_id=payload["id"], confirm_timeout=3
        )

    def _discard_blobs(self, payload: Any) -> None:
        for key in payload.get("discard", ()):
            self.s3.delete_object(Bucket=self.bucket, Key=self.blob_prefix + key)


def _missing(exc: ClientError) -> bool:
    """Whether S3 answered that no object is stored under the key (HEAD says 404, GET NoSuchKey)."""
    return exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound")
