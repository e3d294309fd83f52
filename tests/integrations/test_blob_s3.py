"""S3BlobStore specifics, against moto's server over HTTP: faults, configuration, errors."""

from __future__ import annotations

import http.client
import http.server
import importlib
import io
import json
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from s3transfer.exceptions import RetriesExceededError

from polydatum import DataManager
from polydatum.blob import (
    BlobError,
    BlobNotFound,
    BlobStoreUnavailable,
    InvalidKey,
    from_url,
)
from polydatum.s3 import S3BlobStore
from tests.support.s3 import MotoServer
from tests.support.s3 import moto_server_fixture as moto_server_fixture

MiB = 1024 * 1024
# A hang detector, not a performance assertion: with connect/read timeouts of
# 1 s and 2 attempts an operation gives up in a few seconds; a hang would
# take pytest's 300 s timeout.
GIVE_UP_WITHIN = 20.0


@pytest.fixture(name="bucket")
def bucket_fixture(moto_server: MotoServer) -> str:
    """A new, empty bucket on the shared moto server."""
    return moto_server.create_bucket(f"s3-{uuid.uuid4().hex[:20]}")


def fast_failing(bucket: str, server: MotoServer | None = None, **options: Any) -> S3BlobStore:
    """A store that gives up quickly: 1 s timeouts, 2 attempts."""
    client_options = server.client_options() if server else options.pop("client_options")
    return S3BlobStore(bucket, connect_timeout=1, read_timeout=1, max_attempts=2, **client_options, **options)


OPERATIONS: dict[str, Callable[[S3BlobStore], object]] = {
    "put": lambda s: s.put("docs/a.txt", b"new"),
    "put-stream": lambda s: s.put("docs/a.txt", iter([b"x" * MiB] * 9)),
    "get": lambda s: s.get("docs/a.txt"),
    "open": lambda s: s.open("docs/a.txt"),
    "download": lambda s: s.download("docs/a.txt", io.BytesIO()),
    "stat": lambda s: s.stat("docs/a.txt"),
    "exists": lambda s: s.exists("docs/a.txt"),
    "delete": lambda s: s.delete("docs/a.txt"),
    "copy": lambda s: s.copy("docs/a.txt", "docs/b.txt"),
    "list": lambda s: list(s.list("docs/")),
}


@pytest.fixture(name="stopped", scope="module")
def stopped_fixture() -> S3BlobStore:
    """A store whose own moto server held a blob and was then stopped."""
    server = MotoServer().start()
    try:
        bucket = server.create_bucket("gone-bucket")
        store = fast_failing(bucket, server)
        store.put("docs/a.txt", b"hello")
    finally:
        server.stop()
    return store


class TestUnreachable:
    @pytest.mark.parametrize("operation", OPERATIONS.values(), ids=OPERATIONS.keys())
    def test_stopped_server_gives_a_clear_error_quickly(
        self, stopped: S3BlobStore, operation: Callable[[S3BlobStore], object]
    ) -> None:
        """Every operation raises BlobStoreUnavailable naming bucket, key and endpoint, promptly."""
        started = time.monotonic()
        with pytest.raises(BlobStoreUnavailable) as info:
            operation(stopped)
        assert time.monotonic() - started < GIVE_UP_WITHIN
        message = str(info.value)
        assert "'gone-bucket'" in message
        assert "did not answer" in message
        assert "2 attempts" in message
        assert stopped.client.meta.endpoint_url in message
        assert info.value.code == 503
        assert info.value.__cause__ is not None

    def test_check_says_the_bucket_is_unreachable(self, stopped: S3BlobStore) -> None:
        """ping() on a stopped server is False; check() raises BlobStoreUnavailable naming the bucket."""
        assert stopped.ping() is False
        with pytest.raises(BlobStoreUnavailable, match="could not reach bucket 'gone-bucket'"):
            stopped.check()

    def test_key_is_named(self, stopped: S3BlobStore) -> None:
        """The message and the exception both carry the key."""
        with pytest.raises(BlobStoreUnavailable, match=r"blob 'docs/a\.txt'") as info:
            stopped.get("docs/a.txt")
        assert info.value.key == "docs/a.txt"


class TestServerGoesAway:
    """A private moto server, stopped in the middle of the work."""

    def test_stopped_mid_stream(self) -> None:
        """A download cut off halfway raises BlobStoreUnavailable naming the key, not a botocore error."""
        server = MotoServer().start()
        try:
            bucket = server.create_bucket("cut")
            # Written with default timeouts: on a loaded machine a 32 MiB put can take
            # longer than the 1 s the reading store allows; only the read is under test.
            S3BlobStore(bucket, **server.client_options()).put("big", b"x" * (32 * MiB))
            stream = fast_failing(bucket, server).open("big")
            assert stream.read(MiB) == b"x" * MiB
        finally:
            server.stop()  # kills the process: the rest of the response never comes

        def drain() -> None:
            while stream.read(MiB):
                pass

        with (
            stream,
            pytest.raises(
                BlobStoreUnavailable, match=r"could not read blob 'big' in bucket 'cut'.*broke mid-transfer"
            ),
        ):
            drain()

    def test_rollback_compensation_fails_when_s3_is_gone(self) -> None:
        """The undo of a put that cannot reach S3 is a collected hook error naming the key."""
        server = MotoServer().start()
        try:
            store = fast_failing(server.create_bucket("gone"), server)
            dm = DataManager()
            store.install(dm, name="blobs")
            contexts = []

            def unit_of_work() -> None:
                with dm.context() as ctx:
                    contexts.append(ctx)
                    ctx.blobs.put("uploads/a", b"data")
                    server.stop()
                    raise RuntimeError("request failed")

            with pytest.raises(RuntimeError, match="request failed"):
                unit_of_work()
        finally:
            server.stop()
        errors = contexts[0].get_hook_errors()
        assert len(errors) == 1
        error = errors[0][1]
        assert isinstance(error, BlobError)
        assert "compensation after rollback failed" in str(error)
        assert "'uploads/a'" in str(error)
        assert "sweep_orphans" in str(error)
        assert isinstance(error.__cause__, BlobStoreUnavailable)


def test_an_endpoint_password_from_a_client_or_the_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A client's endpoint or AWS_ENDPOINT_URL_S3 holding a password is refused, masked, unused."""
    client = boto3.session.Session().client(
        "s3",
        endpoint_url="http://admin:hunter2@127.0.0.1:9",
        region_name="us-east-1",
        aws_access_key_id="x",
        aws_secret_access_key="y",
    )
    with pytest.raises(ValueError, match=r"client given 'http://\*\*\*@127\.0\.0\.1:9' carries") as given:
        S3BlobStore("b", client=client)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://admin:hunter2@127.0.0.1:9")
    store = S3BlobStore("b", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="y")
    with pytest.raises(BlobError, match=r"configured with 'http://\*\*\*@127\.0\.0\.1:9' carries") as found:
        store.put("k", b"v")
    assert store._client is None
    for error in (given.value, found.value):
        assert "hunter2" not in str(error)
        assert "admin" not in str(error)
        assert error.__cause__ is None


class TestCredentialsAndConfiguration:
    def test_no_credentials(
        self, moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
    ) -> None:
        """Without any AWS credentials, uploads and URLs raise BlobError saying how to provide them."""
        for name in (
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
            "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
            "AWS_CONTAINER_CREDENTIALS_FULL_URI",
            "AWS_WEB_IDENTITY_TOKEN_FILE",
        ):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        store = S3BlobStore(bucket, endpoint_url=moto_server.endpoint_url, region_name="us-east-1")
        for operation in (lambda: store.put("k", b"v"), lambda: store.url("k")):
            with pytest.raises(BlobError, match=r"'k' in bucket .*no AWS credentials found"):
                operation()

    def test_denied_by_credentials_or_policy(self) -> None:
        """Unknown keys, or a policy forbidding one action, raise BlobError: denied, check credentials."""
        server = MotoServer().start()
        try:
            bucket = server.create_bucket("locked")
            admin = server.client()
            admin.put_object(Bucket=bucket, Key="a", Body=b"a")
            iam = boto3.session.Session().client("iam", **server.client_options())
            iam.create_user(UserName="app")
            iam.put_user_policy(
                UserName="app",
                PolicyName="no-deletes",
                PolicyDocument=json.dumps(
                    {
                        "Version": "2012-10-17",
                        "Statement": [
                            {
                                "Effect": "Allow",
                                "Action": "s3:*",
                                "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
                            },
                            {
                                "Effect": "Deny",
                                "Action": "s3:DeleteObject",
                                "Resource": f"arn:aws:s3:::{bucket}/*",
                            },
                            {
                                "Effect": "Deny",
                                "Action": "s3:PutObject",
                                "Resource": f"arn:aws:s3:::{bucket}/protected/*",
                            },
                        ],
                    }
                ),
            )
            key = iam.create_access_key(UserName="app")["AccessKey"]
            # From now on moto checks every request's credentials against IAM.
            request = urllib.request.Request(
                f"{server.endpoint_url}/moto-api/reset-auth",
                data=b"0",
                headers={"Content-Type": "text/plain"},
            )
            urllib.request.urlopen(request, timeout=10).close()

            stranger = S3BlobStore(bucket, **server.client_options())  # keys IAM never issued
            with pytest.raises(BlobError, match=r"denied access to upload blob 'k'.*credentials"):
                stranger.put("k", b"v")
            with pytest.raises(BlobError, match=r"denied access to reach bucket 'locked'"):
                stranger.check()
            assert stranger.ping() is False

            app = S3BlobStore(
                bucket,
                **server.client_options(
                    aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=key["SecretAccessKey"]
                ),
            )
            assert app.ping() is True
            assert app.get("a") == b"a"
            with pytest.raises(BlobError, match=r"denied access to delete blob 'a'.*bucket policy"):
                app.delete("a")
            with pytest.raises(BlobError, match=r"denied access to copy 'a' to blob 'protected/b'"):
                app.copy("a", "protected/b")
            assert app.exists("a")
            assert not app.exists("protected/b")
        finally:
            server.stop()

    def test_invalid_client_options(self, moto_server: MotoServer) -> None:
        """A client boto3 cannot build fails the first operation with a BlobError naming the key."""
        store = S3BlobStore("b", endpoint_url=moto_server.endpoint_url, region_name="not a region")
        with pytest.raises(BlobError, match=r"could not upload blob 'k' in bucket 'b': .*region"):
            store.put("k", b"v")

    def test_copy_above_the_single_request_limit(
        self, moto_server: MotoServer, bucket: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Copies over CopyObject's 5 GiB limit go multipart and keep content type and metadata."""
        import polydatum.s3

        monkeypatch.setattr(polydatum.s3, "MAX_COPY_SIZE", 1024)  # our limit, not boto3's
        store = S3BlobStore(bucket, **moto_server.client_options())
        store.put("src", b"y" * 4096, content_type="text/csv", metadata={"k": "v"})
        store.copy("src", "dst")
        info = store.stat("dst")
        assert store.get("dst") == b"y" * 4096
        assert (info.content_type, dict(info.metadata)) == ("text/csv", {"k": "v"})


@pytest.fixture(name="black_hole")
def black_hole_fixture() -> Iterator[str]:
    """An endpoint that accepts connections and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    for connection in accepted:
        connection.close()
    listener.close()


def test_a_silent_server_times_out(black_hole: str, moto_server: MotoServer) -> None:
    """A server that never answers costs read_timeout per attempt, then BlobStoreUnavailable."""
    options = moto_server.client_options(endpoint_url=black_hole)
    store = fast_failing("silent-bucket", client_options=options)
    started = time.monotonic()
    with pytest.raises(BlobStoreUnavailable, match=r"'silent-bucket'.*read_timeout=1s"):
        store.get("k")
    assert time.monotonic() - started < GIVE_UP_WITHIN


class TestMissingBucket:
    @pytest.mark.parametrize(
        "operation",
        [lambda s: s.check(), lambda s: s.get("k"), lambda s: s.put("k", b"v"), lambda s: list(s.list())],
        ids=["check", "get", "put", "list"],
    )
    def test_missing_bucket_is_named(
        self, moto_server: MotoServer, operation: Callable[[S3BlobStore], object]
    ) -> None:
        """A missing bucket raises BlobError saying it does not exist and what to do."""
        store = S3BlobStore("no-such-bucket-here", **moto_server.client_options())
        with pytest.raises(BlobError, match=r"'no-such-bucket-here'.*does not exist.*create it"):
            operation(store)

    def test_exists_cannot_tell_a_missing_bucket(self, moto_server: MotoServer) -> None:
        """exists() answers False for a missing bucket (HEAD has no error body); ping() tells."""
        store = S3BlobStore("no-such-bucket-here", **moto_server.client_options())
        assert store.exists("k") is False


class TestTransfers:
    def test_multipart_above_the_threshold(self, moto_server: MotoServer, bucket: str) -> None:
        """One byte over the threshold is a two-part upload; at the threshold minus one, one PUT."""
        store = S3BlobStore(
            bucket, multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, **moto_server.client_options()
        )
        store.put("big", b"x" * (5 * MiB + 1))
        store.put("small", b"x" * (5 * MiB - 1))
        assert store.stat("big").etag.endswith("-2")  # S3's multipart ETag
        assert "-" not in store.stat("small").etag
        assert store.get("big") == b"x" * (5 * MiB + 1)

    def test_from_url(self, moto_server: MotoServer, bucket: str) -> None:
        """from_url('s3://bucket/prefix', **options) builds an S3BlobStore confined to the prefix."""
        store = from_url(f"s3://{bucket}/up%20loads/", **moto_server.client_options(read_timeout=9))
        assert isinstance(store, S3BlobStore)
        assert (store.bucket, store.prefix, store.read_timeout) == (bucket, "up loads/", 9)
        store.put("k", b"v")
        assert moto_server.client().get_object(Bucket=bucket, Key="up loads/k")["Body"].read() == b"v"

    def test_seekable_file_uploads_from_its_position(
        self, moto_server: MotoServer, bucket: str, tmp_path: Any
    ) -> None:
        """A file is uploaded from its current position, and the size returned matches."""
        path = tmp_path / "f"
        path.write_bytes(b"headerBODY")
        store = S3BlobStore(bucket, **moto_server.client_options())
        with open(path, "rb") as handle:
            handle.seek(6)
            assert store.put("f", handle) == 4
        assert store.get("f") == b"BODY"

    def test_prefix_confines_the_store(self, moto_server: MotoServer, bucket: str) -> None:
        """Two stores with different prefixes on one bucket never see each other's keys."""
        left = S3BlobStore(bucket, prefix="left/", **moto_server.client_options())
        right = S3BlobStore(bucket, prefix="/right", **moto_server.client_options())
        left.put("k", b"L")
        right.put("k", b"R")
        assert (left.get("k"), right.get("k")) == (b"L", b"R")
        assert list(left.list()) == ["k"]
        keys = [o["Key"] for o in moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]]
        assert sorted(keys) == ["left/k", "right/k"]
        assert "left/k" in left.url("k")

    def test_one_client_shared_by_threads(self, moto_server: MotoServer, bucket: str) -> None:
        """The client is created once, lazily, and every thread uses that one."""
        store = S3BlobStore(bucket, **moto_server.client_options())
        assert store._client is None
        clients: set[int] = set()

        def work(i: int) -> None:
            store.put(f"t/{i}", b"x")
            clients.add(id(store.client))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(clients) == 1
        assert len(list(store.list("t/"))) == 8

    def test_client_configuration(self, moto_server: MotoServer, bucket: str) -> None:
        """Timeouts and retries are set on the client; a user Config is merged over them."""
        store = S3BlobStore(
            bucket,
            connect_timeout=2,
            read_timeout=7,
            max_attempts=3,
            config=Config(s3={"addressing_style": "path"}),
            **moto_server.client_options(),
        )
        config = store.client.meta.config
        assert (config.connect_timeout, config.read_timeout) == (2, 7)
        assert config.retries["total_max_attempts"] == 3
        assert config.s3 == {"addressing_style": "path"}
        assert store.ping() is True

    def test_a_ready_client_is_used_as_is(self, moto_server: MotoServer, bucket: str) -> None:
        """client= is used without change."""
        client = moto_server.client()
        store = S3BlobStore(bucket, client=client)
        assert store.client is client
        store.put("k", b"v")
        assert store.get("k") == b"v"


class TestArguments:
    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"bucket": ""}, ValueError, "non-empty"),
            ({"bucket": "b", "multipart_chunksize": MiB}, ValueError, "5 MiB"),
            ({"bucket": "b", "prefix": "../up"}, InvalidKey, "'..' segment"),
            ({"bucket": "b", "prefix": 3}, ValueError, "prefix"),
            ({"bucket": "b", "client": object(), "region_name": "x"}, TypeError, "not both"),
        ],
    )
    def test_bad_arguments(self, kwargs: Any, error: type[Exception], match: str) -> None:
        """Bad constructor arguments fail at once with a message naming the problem."""
        with pytest.raises(error, match=match):
            S3BlobStore(**kwargs)

    def test_credentials_with_the_bucket_are_refused(self) -> None:
        """A bucket written as 'key:secret@bucket' is refused without repeating it."""
        with pytest.raises(ValueError, match=r"looks like credentials.*AWS credential chain") as info:
            S3BlobStore("AKIAEXAMPLE:hunter2@bucket")
        assert "hunter2" not in str(info.value)
        assert "AKIAEXAMPLE" not in str(info.value)

    @pytest.mark.parametrize(
        "build",
        [
            lambda url: S3BlobStore("b", endpoint_url=url),
            lambda url: from_url("s3://b/p", endpoint_url=url),
        ],
        ids=["constructor", "from_url"],
    )
    def test_credentials_in_endpoint_url_are_refused(self, build: Callable[[str], object]) -> None:
        """An endpoint_url with a user and password is refused (S3 never sends them), masked."""
        with pytest.raises(ValueError, match=r"endpoint_url 'http://\*\*\*@minio:9000' carries") as info:
            build("http://admin:hunter2@minio:9000")
        assert "hunter2" not in str(info.value)

    def test_url_expiry_is_capped_at_a_week(self, moto_server: MotoServer, bucket: str) -> None:
        """Presigned URLs longer than SigV4's 7 days are refused."""
        store = S3BlobStore(bucket, **moto_server.client_options())
        with pytest.raises(ValueError, match="7 days"):
            store.url("k", expires=8 * 24 * 3600)


def client_error(code: str, status: int = 400) -> ClientError:
    """The exception botocore raises for an S3 error response."""
    response = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, "GetObject")  # type: ignore[arg-type]


class TestErrorTranslation:
    @pytest.mark.parametrize(
        ("exception", "expected", "match"),
        [
            (client_error("NoSuchKey", 404), BlobNotFound, "no blob 'k' in bucket 'b'"),
            (client_error("404", 404), BlobNotFound, "no blob 'k'"),
            (client_error("NoSuchBucket", 404), BlobError, "bucket does not exist"),
            (client_error("AccessDenied", 403), BlobError, "denied access.*credentials"),
            (client_error("SignatureDoesNotMatch", 403), BlobError, "denied access"),
            (client_error("SlowDown", 503), BlobStoreUnavailable, "kept failing.*try again"),
            (client_error("InvalidObjectState"), BlobError, "refused to get.*InvalidObjectState"),
            (NoCredentialsError(), BlobError, "no AWS credentials"),
            (EndpointConnectionError(endpoint_url="http://x"), BlobStoreUnavailable, "did not answer"),
            (
                RetriesExceededError(ReadTimeoutError(endpoint_url="http://x")),
                BlobStoreUnavailable,
                "did not answer",
            ),
        ],
    )
    def test_botocore_errors_become_polydatum_errors(
        self, exception: Exception, expected: type[BlobError], match: str
    ) -> None:
        """Each botocore/s3transfer failure maps to the polydatum error that says what to do."""
        store = S3BlobStore(
            "b",
            endpoint_url="http://127.0.0.1:9",
            region_name="us-east-1",
            aws_access_key_id="x",
            aws_secret_access_key="y",
        )
        error = store._error("get", "k", exception)
        assert type(error) is expected
        assert error.key == "k"
        assert re.search(match, str(error)), str(error)


class _NoConditionalDeletes(http.server.BaseHTTPRequestHandler):
    """An S3 front answering DeleteObject with If-Match 501 NotImplemented; the rest goes to moto."""

    upstream = 0  # moto's port, set per server

    def _forward(self) -> None:
        if self.command == "DELETE" and self.headers.get("If-Match"):
            body = b"<Error><Code>NotImplemented</Code><Message>not here</Message></Error>"
            self.send_response(501)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length) if length else None
        conn = http.client.HTTPConnection("127.0.0.1", self.upstream, timeout=10)
        conn.request(self.command, self.path, body=data, headers=dict(self.headers))
        answer = conn.getresponse()
        payload = answer.read()
        self.send_response(answer.status)
        for name, value in answer.getheaders():
            if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)
        conn.close()

    do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

    def log_message(self, *args: Any) -> None:
        pass


def test_a_server_without_conditional_deletes_gets_a_head_then_a_delete(
    bucket: str, moto_server: MotoServer
) -> None:
    """A server refusing If-Match on DeleteObject (501): the outbox's delete asks first, then deletes."""
    handler = type("Front", (_NoConditionalDeletes,), {"upstream": moto_server.port})
    front = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=front.serve_forever, daemon=True)
    thread.start()
    try:
        options = {**moto_server.client_options(), "endpoint_url": f"http://127.0.0.1:{front.server_port}"}
        store = S3BlobStore(bucket, **options)
        store.put("doc", b"v1")
        seen = store.stat("doc").etag
        store.put("doc", b"v2")
        store._discard_if("doc", seen)  # written since: kept
        assert store.get("doc") == b"v2"
        store._discard_if("doc", store.stat("doc").etag)
        assert not store.exists("doc")
    finally:
        front.shutdown()
        front.server_close()


def test_missing_boto3_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    """Importing polydatum.s3 without boto3 raises ImportError naming the pip extra."""
    monkeypatch.setitem(sys.modules, "boto3", None)
    monkeypatch.delitem(sys.modules, "polydatum.s3")
    with pytest.raises(ImportError, match=r'pip install "polydatum\[s3\]"'):
        importlib.import_module("polydatum.s3")


def test_blob_module_needs_no_third_party_package() -> None:
    """polydatum.blob imports neither boto3 nor anything else outside the standard library."""
    code = (
        "import sys, polydatum.blob\n"
        "assert not {'boto3', 'botocore', 'sqlalchemy', 'redis'} & set(sys.modules), sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
