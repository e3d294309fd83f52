"""One suite for every BlobStore: memory, the filesystem and S3 (moto's server, over HTTP)."""

from __future__ import annotations

import datetime
import io
import itertools
import os
import tracemalloc
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.blob import (
    BlobInfo,
    BlobNotFound,
    BlobStore,
    FileSystemBlobStore,
    InvalidKey,
    InvalidMetadata,
    MemoryBlobStore,
    UrlNotSupported,
    from_url,
)
from polydatum.errors import NotFound
from tests.support.s3 import BACKENDS, make_store
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.s3 import store_fixture as store_fixture

MiB = 1024 * 1024
THRESHOLD = 8 * MiB  # S3BlobStore's default multipart_threshold


def reserved_keys(store: BlobStore) -> list[str]:
    """What a store keeps under the reserved '.polydatum/' prefix (undo copies)."""
    return list(store._list(".polydatum/", None, 1000))


def chunks(total: int, size: int = MiB) -> Iterator[bytes]:
    """A generator of ``total`` bytes in distinct chunks (catches reordering)."""
    pattern = [bytes([i]) * size for i in range(7)]
    for i, start in enumerate(range(0, total, size)):
        yield pattern[i % 7][: min(size, total - start)]


def payload(size: int) -> bytes:
    """Deterministic, non-repeating-looking bytes of the given size."""
    block = os.urandom(min(size, MiB)) if size else b""
    return (block * (size // MiB + 1))[:size] if size else b""


# -- round trips ---------------------------------------------------------------

SIZES = {"empty": 0, "small": 11, "over-threshold": THRESHOLD + 1, "64MiB": 64 * MiB}


# Every size from every kind of source, except 64 MiB from a file object:
# bytes and a generator already cover the large multipart path.
ROUND_TRIPS = [
    pytest.param(size, source, id=f"{source}-{name}")
    for source in ("bytes", "file", "generator")
    for name, size in SIZES.items()
    if not (source == "file" and name == "64MiB")
]


class TestRoundTrip:
    @pytest.mark.parametrize(("size", "source"), ROUND_TRIPS)
    def test_put_get_stat(self, store: BlobStore, size: int, source: str) -> None:
        """Blobs of every size come back byte for byte with their content type and metadata."""
        data = payload(size)
        body: Any = {
            "bytes": data,
            "file": io.BytesIO(data),
            "generator": (data[i : i + MiB] for i in range(0, size, MiB)),
        }[source]
        written = store.put(
            "rt/blob.bin",
            body,
            content_type="application/x-test",
            metadata={"Origin": "test", "size": str(size)},
        )
        assert written == size
        assert store.get("rt/blob.bin") == data
        info = store.stat("rt/blob.bin")
        assert info.key == "rt/blob.bin"
        assert info.size == size
        assert info.content_type == "application/x-test"
        assert info.metadata == {"origin": "test", "size": str(size)}
        assert info.etag
        assert info.modified.tzinfo is not None

    def test_open_streams_in_pieces(self, store: BlobStore) -> None:
        """open() returns a binary stream that reads the blob piece by piece."""
        data = payload(3 * MiB + 5)
        store.put("s/x", data)
        with store.open("s/x") as stream:
            pieces = list(iter(lambda: stream.read(MiB), b""))
        assert [len(p) for p in pieces] == [MiB, MiB, MiB, 5]
        assert b"".join(pieces) == data

    def test_unseekable_stream_with_short_reads(self, store: BlobStore) -> None:
        """A socket-like stream (no seek, reads shorter than asked) is stored whole, in order."""
        data = payload(THRESHOLD + 1)

        class ShortReads:
            """Like a WSGI input or a pipe: read(n) returns at most 100,003 bytes."""

            def __init__(self) -> None:
                self.position = 0

            def read(self, size: int = -1) -> bytes:
                size = 100_003 if size < 0 else min(size, 100_003)
                chunk = data[self.position : self.position + size]
                self.position += len(chunk)
                return chunk

        assert store.put("rt/stream", ShortReads()) == len(data)  # type: ignore[arg-type]
        assert store.get("rt/stream") == data

    def test_a_new_store_is_empty(self, store: BlobStore) -> None:
        """A store nothing was written to lists nothing and sweeps nothing."""
        assert list(store.list()) == []
        assert list(store.list("a/", after="a/b", limit=5)) == []
        assert store.exists("a") is False
        assert store.sweep_orphans(lambda keys: keys) == []

    def test_download_into_file(self, store: BlobStore, tmp_path: Path) -> None:
        """download() writes the whole blob into a file and returns its size."""
        data = payload(THRESHOLD + 3)
        store.put("d/x", data)
        with open(tmp_path / "out", "wb") as target:
            assert store.download("d/x", target) == len(data)
        assert (tmp_path / "out").read_bytes() == data

    def test_download_into_unseekable_target(self, store: BlobStore) -> None:
        """download() also works into a target that cannot seek and counts what it wrote."""
        data = payload(100)
        store.put("d/y", data)
        received: list[bytes] = []

        class Sink:
            def write(self, chunk: bytes) -> int:
                received.append(bytes(chunk))
                return len(chunk)

        assert store.download("d/y", Sink()) == 100  # type: ignore[arg-type]
        assert b"".join(received) == data

    def test_put_replaces_content_and_metadata(self, store: BlobStore) -> None:
        """A second put replaces content, metadata and etag; old metadata does not linger."""
        store.put("r/x.txt", b"one", metadata={"a": "1"}, content_type="text/csv")
        first = store.stat("r/x.txt")
        store.put("r/x.txt", b"second")
        second = store.stat("r/x.txt")
        assert store.get("r/x.txt") == b"second"
        assert second.metadata == {}
        assert second.content_type == "text/plain"
        assert second.etag != first.etag

    def test_positional_arguments(self, store: BlobStore) -> None:
        """put(key, data, content_type, metadata) and list(prefix, after, limit) take positions too."""
        store.put("pos/a.bin", b"1", "text/csv", {"k": "v"})
        store.put("pos/b.bin", b"2")
        info = store.stat("pos/a.bin")
        assert (info.content_type, dict(info.metadata)) == ("text/csv", {"k": "v"})
        assert list(store.list("pos/", "pos/a.bin", 5)) == ["pos/b.bin"]
        assert list(store.list("pos/", None, 1)) == ["pos/a.bin"]

    def test_content_type_is_guessed_from_the_key(self, store: BlobStore) -> None:
        """Without content_type, the extension decides, else application/octet-stream."""
        store.put("img/a.png", b"\x89PNG")
        store.put("img/raw", b"?")
        assert store.stat("img/a.png").content_type == "image/png"
        assert store.stat("img/raw").content_type == "application/octet-stream"

    def test_bytearray_and_memoryview(self, store: BlobStore) -> None:
        """bytearray and memoryview are accepted like bytes."""
        store.put("b/1", bytearray(b"abc"))
        store.put("b/2", memoryview(b"defg"))
        assert store.get("b/1") == b"abc"
        assert store.get("b/2") == b"defg"

    def test_copy_keeps_content_type_and_metadata(self, store: BlobStore) -> None:
        """copy() duplicates the blob with its content type and metadata."""
        store.put("c/src", b"data", content_type="text/csv", metadata={"k": "v"})
        store.put("c/dst", b"old")
        store.copy("c/src", "c/dst")
        info = store.stat("c/dst")
        assert store.get("c/dst") == b"data"
        assert (info.content_type, dict(info.metadata)) == ("text/csv", {"k": "v"})
        assert store.get("c/src") == b"data"

    def test_delete(self, store: BlobStore) -> None:
        """delete() returns True once, then False, and the blob is gone."""
        store.put("del/x", b"1")
        assert store.exists("del/x")
        assert store.delete("del/x") is True
        assert store.delete("del/x") is False
        assert not store.exists("del/x")

    def test_ping(self, store: BlobStore) -> None:
        """ping() is True and check() returns None on a healthy store."""
        assert store.ping() is True
        assert store.check() is None


class TestMissing:
    @pytest.mark.parametrize("operation", ["get", "open", "stat"])
    def test_reading_a_missing_key_raises_not_found(self, store: BlobStore, operation: str) -> None:
        """get/open/stat of a missing key raise BlobNotFound, a 404 NotFound naming the key."""
        with pytest.raises(BlobNotFound, match="'no/such-key'") as info:
            getattr(store, operation)("no/such-key")
        assert isinstance(info.value, NotFound)
        assert info.value.code == 404
        assert info.value.key == "no/such-key"

    def test_download_of_a_missing_key_raises_not_found(self, store: BlobStore) -> None:
        """download() of a missing key raises BlobNotFound and writes nothing."""
        target = io.BytesIO()
        with pytest.raises(BlobNotFound):
            store.download("nothing", target)
        assert target.getvalue() == b""

    def test_exists_and_delete_answer_false(self, store: BlobStore) -> None:
        """exists() and delete() of a missing key return False instead of raising."""
        assert store.exists("nothing") is False
        assert store.delete("nothing") is False

    def test_copy_of_a_missing_source(self, store: BlobStore) -> None:
        """copy() from a missing key raises BlobNotFound and creates nothing."""
        with pytest.raises(BlobNotFound, match="'ghost'"):
            store.copy("ghost", "copy")
        assert not store.exists("copy")


class TestConditionalDelete:
    """``_discard_if``, what an outbox delete row runs: only the very blob it saw (every store)."""

    def test_deletes_the_blob_it_saw(self, store: BlobStore) -> None:
        store.put("doc", b"v1")
        store._discard_if("doc", store.stat("doc").etag)
        assert not store.exists("doc")

    def test_keeps_a_blob_written_since(self, store: BlobStore) -> None:
        store.put("doc", b"v1")
        seen = store.stat("doc").etag
        store.put("doc", b"v2, written later")
        store._discard_if("doc", seen)
        assert store.get("doc") == b"v2, written later"

    def test_a_missing_key_is_nothing_to_do(self, store: BlobStore) -> None:
        store._discard_if("gone", "0123")
        assert not store.exists("gone")


class TestBadInput:
    @pytest.mark.parametrize(
        "data",
        [
            lambda: "text",
            lambda: io.StringIO("text"),
            lambda: 42,
            lambda: None,
            lambda: (c for c in ["a", "b"]),
            lambda: [b"ok", 3],
        ],
        ids=["str", "text-stream", "int", "none", "generator-of-str", "list-with-int"],
    )
    def test_non_bytes_data_is_refused(self, store: BlobStore, data: Any) -> None:
        """Text and non-bytes data raise TypeError saying to encode, and store nothing."""
        with pytest.raises(TypeError, match=r"bytes|binary"):
            store.put("bad/data", data())
        assert not store.exists("bad/data")

    @pytest.mark.parametrize(
        ("metadata", "problem"),
        [
            ({"n": 1}, "str to str"),
            ({"bad name": "x"}, "not portable"),
            ({"x": "caf\u00e9"}, "printable ASCII"),
            ({"x": "line\nbreak"}, "printable ASCII"),
            ({"x": " leading"}, "leading or trailing space"),
            ({"x": "trailing "}, "leading or trailing space"),
            ({"x": " "}, "leading or trailing space"),
            ({"A": "1", "a": "2"}, "only in case"),
            ({"big": "x" * 3000}, "at most 2048"),
            (["a", "b"], "mapping of str to str"),
        ],
    )
    def test_bad_metadata_is_refused(self, store: BlobStore, metadata: Any, problem: str) -> None:
        """Metadata S3 could not keep raises InvalidMetadata (a ValueError) and stores nothing."""
        with pytest.raises(InvalidMetadata, match=problem) as info:
            store.put("bad/meta", b"x", metadata=metadata)
        assert isinstance(info.value, ValueError)
        assert not store.exists("bad/meta")

    @pytest.mark.parametrize(
        "content_type", ["png", "text/plain\r\nX-Evil: 1", "", 5, "text/plain; charset=utf-8 "]
    )
    def test_bad_content_type_is_refused(self, store: BlobStore, content_type: Any) -> None:
        """A content type that is not a one-line media type raises InvalidMetadata."""
        with pytest.raises(InvalidMetadata, match="media type"):
            store.put("bad/ct", b"x", content_type=content_type)

    def test_inner_spaces_in_metadata_round_trip(self, store: BlobStore) -> None:
        """Spaces inside a metadata value or content type come back unchanged from every store."""
        store.put(
            "meta/spaces", b"x", content_type="text/plain; a=b  c", metadata={"title": "two  spaces inside"}
        )
        info = store.stat("meta/spaces")
        assert info.metadata == {"title": "two  spaces inside"}
        assert info.content_type == "text/plain; a=b  c"

    def test_a_failing_stream_stores_nothing(self, store: BlobStore) -> None:
        """When the data stream raises halfway, its own error propagates and no blob appears."""

        def broken() -> Iterator[bytes]:
            yield b"x" * MiB
            raise OSError("client went away")

        with pytest.raises(OSError, match="client went away"):
            store.put("bad/half", broken())
        assert not store.exists("bad/half")

    def test_a_failing_stream_keeps_the_previous_blob(self, store: BlobStore) -> None:
        """A replacement that fails halfway leaves the previous blob intact."""
        store.put("bad/keep", b"previous")

        def broken() -> Iterator[bytes]:
            yield b"new"
            raise OSError("client went away")

        with pytest.raises(OSError, match="client went away"):
            store.put("bad/keep", broken())
        assert store.get("bad/keep") == b"previous"

    def test_a_stream_returning_text_is_refused(self, store: BlobStore) -> None:
        """A file-like object whose read() returns str raises TypeError and stores nothing."""

        class TextReader:
            def read(self, size: int = -1) -> str:
                return "text"

        with pytest.raises(TypeError, match="binary mode"):
            store.put("bad/text", TextReader())  # type: ignore[arg-type]
        assert not store.exists("bad/text")

    @pytest.mark.parametrize(
        ("kwargs", "error"),
        [
            ({"limit": -1}, ValueError),
            ({"limit": "3"}, ValueError),
            ({"after": 5}, TypeError),
            ({"after": "a\x00"}, InvalidKey),
            ({"after": "a\udcff"}, InvalidKey),
            ({"after": "../x"}, InvalidKey),
            ({"prefix": "../"}, InvalidKey),
            ({"prefix": "a//"}, InvalidKey),
            ({"prefix": 5}, InvalidKey),
        ],
    )
    def test_bad_list_arguments(self, store: BlobStore, kwargs: Any, error: type[Exception]) -> None:
        """list() refuses bad prefixes, limits and 'after' values with clear errors."""
        with pytest.raises(error):
            list(store.list(**kwargs))


# -- keys ------------------------------------------------------------------------

BAD_KEYS = {
    "empty": ("", "empty"),
    "dotdot": ("../escape", "'..' segment"),
    "inner-dotdot": ("a/../../escape", "'..' segment"),
    "dot": ("a/./b", "'.' segment"),
    "absolute": ("/etc/passwd", "absolute"),
    "backslash": ("a\\..\\..\\escape", "backslash"),
    "nul": ("a\x00b", "NUL"),
    "newline": ("a\nb", "control character U\\+000A"),
    "c1-csi": ("a\x9bb", "control character U\\+009B"),
    "c1-nel": ("a\x85b", "control character U\\+0085"),
    "empty-segment": ("a//b", "empty segment"),
    "trailing-slash": ("a/", "empty segment"),
    "drive": ("C:/Windows", "drive letter"),
    "reserved": (".polydatum/undo/x", "reserved"),
    "reserved-name": (".polydatum", "reserved"),
    "reserved-segment": ("notes/.polydatum/x", "reserved"),
    "too-long": ("k" * 1025, "limit is 1024"),
    "surrogate": ("a\udcff", "surrogate"),
}


class TestKeys:
    @pytest.mark.parametrize(("key", "problem"), BAD_KEYS.values(), ids=BAD_KEYS.keys())
    def test_bad_keys_are_refused_everywhere(self, store: BlobStore, key: str, problem: str) -> None:
        """Every operation refuses the key with InvalidKey saying why, and writes nothing."""
        operations = [
            lambda: store.put(key, b"x"),
            lambda: store.get(key),
            lambda: store.open(key),
            lambda: store.stat(key),
            lambda: store.exists(key),
            lambda: store.delete(key),
            lambda: store.copy(key, "fine"),
            lambda: store.copy("fine", key),
            lambda: store.url(key),
            lambda: store.download(key, io.BytesIO()),
        ]
        store.put("fine", b"ok")
        for operation in operations:
            with pytest.raises(InvalidKey, match=problem) as info:
                operation()
            assert isinstance(info.value, ValueError)
            assert info.value.code == 400
        assert list(store.list()) == ["fine"]

    def test_non_str_keys_are_refused(self, store: BlobStore) -> None:
        """A key that is not a str raises InvalidKey naming its type."""
        with pytest.raises(InvalidKey, match="bytes"):
            store.put(b"key", b"x")  # type: ignore[arg-type]

    def test_unusual_but_valid_keys_round_trip(self, store: BlobStore) -> None:
        """Spaces, unicode, dots inside names and colons are fine."""
        keys = ["with space/ü ñ.txt", "a..b/c", ".hidden/x", "2024-01-01T10:00:00Z", "~user"]
        for key in keys:
            store.put(key, key.encode())
        for key in keys:
            assert store.get(key) == key.encode()
        assert sorted(store.list()) == sorted(keys)

    @pytest.mark.parametrize("order", [1, -1], ids=["forward", "reverse"])
    def test_keys_shaped_like_bookkeeping_paths_keep_their_own_metadata(
        self, store: BlobStore, order: int
    ) -> None:
        """Keys ending in '.json' or '.d', beside or under look-alikes, each keep content and metadata."""
        # 'a' and 'a.json/b' once shared the file storing a's metadata on disk.
        keys = ["a", "a.json/b", "b.json", "b.json.json", "c.d", "c/d", "e/f.json", "e/f", ".hidden/x.json"][
            ::order
        ]
        for number, key in enumerate(keys):
            store.put(key, key.encode(), content_type=f"text/x-{number}", metadata={"key": key})
        for number, key in enumerate(keys):
            info = store.stat(key)
            assert store.get(key) == key.encode()
            assert (info.content_type, dict(info.metadata)) == (f"text/x-{number}", {"key": key})
        assert sorted(store.list()) == sorted(keys)
        assert store.sweep_orphans(lambda batch: batch) == []
        assert sorted(
            store.sweep_orphans(lambda batch: [], older_than=datetime.timedelta(seconds=-60))
        ) == sorted(keys)
        assert list(store.list()) == []

    def test_reserved_segments_are_never_listed_or_swept(self, store: BlobStore) -> None:
        """Bookkeeping under 'x/.polydatum/' (a store rooted at 'x') is never listed or swept."""
        store._put("x/.polydatum/undo/00000000000000000001-old", b"u", "text/plain", {})
        store.put("x/k", b"mine")
        assert list(store.list()) == ["x/k"]
        assert list(store.list("x/.polyd")) == []
        removed = store.sweep_orphans(lambda batch: [], older_than=datetime.timedelta(seconds=-60))
        assert removed == ["x/k"]
        assert store._exists("x/.polydatum/undo/00000000000000000001-old")


# -- listing -----------------------------------------------------------------------

LISTED = [f"page/{i:05d}" for i in range(2500)] + ["pa", "page-x", "pagez/1", "other/1"]


@pytest.fixture(name="listed", scope="module", params=BACKENDS)
def listed_fixture(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> BlobStore:
    """A store holding 2,504 keys, filled once per backend (in parallel threads)."""
    store = make_store(request.param, tmp_path_factory.mktemp("listed"), request)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda key: store.put(key, b""), LISTED))
    return store


class TestListing:
    def test_lists_everything_in_order(self, listed: BlobStore) -> None:
        """Without arguments list() yields every key once, in ascending order."""
        keys = list(listed.list())
        assert keys == sorted(LISTED)

    def test_list_is_lazy(self, listed: BlobStore) -> None:
        """list() returns an iterator, not a list: pages are fetched as it is read."""
        keys = listed.list("page/")
        assert isinstance(keys, Iterator)
        assert next(keys) == "page/00000"

    def test_paginates_with_after_and_limit(self, listed: BlobStore) -> None:
        """Pages of 1,000 resumed with 'after' cover all 2,500 keys exactly once."""
        pages: list[list[str]] = []
        after = None
        while True:
            page = list(listed.list("page/", after=after, limit=1000))
            if not page:
                break
            pages.append(page)
            after = page[-1]
        assert [len(p) for p in pages] == [1000, 1000, 500]
        assert list(itertools.chain(*pages)) == [f"page/{i:05d}" for i in range(2500)]

    @pytest.mark.parametrize(
        ("prefix", "expected"),
        [
            ("page/000", 100),
            ("page/0249", 10),
            ("page/", 2500),
            ("pag", 2502),
            ("page", 2502),
            ("other/", 1),
            ("nothing", 0),
        ],
    )
    def test_prefixes(self, listed: BlobStore, prefix: str, expected: int) -> None:
        """A prefix selects keys starting with it, even in the middle of a segment."""
        keys = list(listed.list(prefix))
        assert len(keys) == expected
        assert all(k.startswith(prefix) for k in keys)

    def test_after_and_prefix_combined(self, listed: BlobStore) -> None:
        """'after' before the prefix lists the whole prefix; past it, nothing."""
        assert len(list(listed.list("page/", after="a"))) == 2500
        assert list(listed.list("page/", after="page/02498")) == ["page/02499"]
        assert list(listed.list("page/", after="zzz")) == []

    def test_limit(self, listed: BlobStore) -> None:
        """limit stops the listing early; 0 yields nothing."""
        assert list(listed.list(limit=3)) == sorted(LISTED)[:3]
        assert list(listed.list(limit=0)) == []


# -- memory while streaming --------------------------------------------------------


@pytest.mark.slow
def test_streaming_256_mib_stays_under_64_mib(store: BlobStore) -> None:
    """Putting 256 MiB from a generator and reading it back with open() peaks under 64 MiB."""
    size = 256 * MiB
    pattern = [bytes([i]) * MiB for i in range(5)]

    def source() -> Iterator[bytes]:
        for i in range(256):
            yield pattern[i % 5]

    # The memory store keeps the blob in memory by design: only its extra counts.
    retained = size if isinstance(store, MemoryBlobStore) else 0
    tracemalloc.start()
    try:
        assert store.put("huge/blob", source()) == size
        put_peak = tracemalloc.get_traced_memory()[1] - retained
        tracemalloc.reset_peak()
        seen = 0
        with store.open("huge/blob") as stream:
            while chunk := stream.read(MiB):
                assert chunk == pattern[(seen // MiB) % 5]
                seen += len(chunk)
        read_peak = tracemalloc.get_traced_memory()[1] - retained
    finally:
        tracemalloc.stop()
    assert seen == size
    assert put_peak < 64 * MiB, f"put peaked at {put_peak / MiB:.1f} MiB"
    assert read_peak < 64 * MiB, f"open() peaked at {read_peak / MiB:.1f} MiB"


# -- urls --------------------------------------------------------------------------


def test_url(store: BlobStore) -> None:
    """S3 presigns a working GET URL; the other stores raise UrlNotSupported without base_url."""
    store.put("u/hello world.txt", b"hello")
    if isinstance(store, (MemoryBlobStore, FileSystemBlobStore)):
        with pytest.raises(UrlNotSupported, match="base_url") as info:
            store.url("u/hello world.txt")
        assert isinstance(info.value, NotImplementedError)
        return
    url = store.url("u/hello world.txt", expires=datetime.timedelta(minutes=5))
    assert "X-Amz-Signature=" in url
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"hello"


@pytest.mark.parametrize(
    "expires",
    [
        0,
        -5,
        0.5,
        "soon",
        None,
        True,
        float("inf"),
        float("-inf"),
        float("nan"),
        datetime.timedelta(0),
        datetime.timedelta(seconds=-1),
    ],
)
def test_url_expiry_must_be_positive(store: BlobStore, expires: Any) -> None:
    """url() refuses an expiry that is not a positive, finite duration with ValueError naming it."""
    with pytest.raises(ValueError, match="expires must be a positive, finite number") as info:
        store.url("u/x", expires=expires)
    assert type(info.value) is ValueError


@pytest.mark.parametrize("expires", [10**400, 1e300, datetime.timedelta.max])
def test_url_expiry_far_in_the_future(store: BlobStore, expires: Any) -> None:
    """A huge but finite expiry: S3 refuses it (7 days at most), a base_url store has no expiry to set."""
    if isinstance(store, (MemoryBlobStore, FileSystemBlobStore)):
        store.base_url = "https://cdn.example/b"
        assert store.url("u/x", expires=expires) == "https://cdn.example/b/u/x"
        return
    with pytest.raises(ValueError, match="at most 7 days"):
        store.url("u/x", expires=expires)


@pytest.mark.parametrize("kind", ["memory", "fs"])
def test_base_url(kind: str, tmp_path: Path) -> None:
    """With base_url, memory and filesystem stores return base_url plus the quoted key."""
    store: BlobStore = (
        MemoryBlobStore(base_url="https://cdn.example/b/")
        if kind == "memory"
        else FileSystemBlobStore(tmp_path, base_url="https://cdn.example/b")
    )
    assert store.url("a b/ü.png") == "https://cdn.example/b/a%20b/%C3%BC.png"


# -- sweeping --------------------------------------------------------------------


def test_sweep_skips_keys_deleted_meanwhile(store: BlobStore) -> None:
    """A key deleted by someone else between listing and checking is skipped quietly."""
    for key in ("sw/a", "sw/b", "sw/c"):
        store.put(key, b"x")

    def referenced(keys: list[str]) -> list[str]:
        store.delete("sw/b")  # another process cleaned it up meanwhile
        return []

    removed = store.sweep_orphans(referenced, older_than=datetime.timedelta(seconds=-60))
    assert removed == ["sw/a", "sw/c"]
    assert list(store.list()) == []


def test_sweep_leaves_undo_copies_it_cannot_date(store: BlobStore) -> None:
    """Under .polydatum/undo/, only names starting with polydatum's timestamp are swept."""
    store._put(".polydatum/undo/not-a-stamp", b"u", "text/plain", {})
    store._put(".polydatum/undo/00000000000000000001-old", b"u", "text/plain", {})
    assert store.sweep_orphans(lambda keys: keys) == [".polydatum/undo/00000000000000000001-old"]
    assert reserved_keys(store) == [".polydatum/undo/not-a-stamp"]


# -- the interface itself ----------------------------------------------------------


class DictStore(BlobStore):
    """The smallest store: only the abstract primitives, everything else inherited."""

    def __init__(self) -> None:
        self.blobs: dict[str, tuple[bytes, str, dict[str, str]]] = {}

    def _put(self, key: str, body: Any, content_type: str, metadata: dict[str, str]) -> int:
        data = body if isinstance(body, bytes) else b"".join(iter(lambda: body.read(MiB), b""))
        self.blobs[key] = (data, content_type, metadata)
        return len(data)

    def _open(self, key: str) -> Any:
        if key not in self.blobs:
            raise self._missing(key, "a dict")
        return io.BytesIO(self.blobs[key][0])

    def _stat(self, key: str) -> Any:
        if key not in self.blobs:
            raise self._missing(key, "a dict")
        data, content_type, metadata = self.blobs[key]
        return BlobInfo(
            key,
            len(data),
            content_type,
            str(hash(data)),
            datetime.datetime.now(datetime.timezone.utc),
            metadata,
        )

    def _delete(self, key: str) -> bool:
        return self.blobs.pop(key, None) is not None

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        return iter(sorted(k for k in self.blobs if k.startswith(prefix) and (not after or k > after)))

    def _copy(self, source: str, target: str) -> None:
        data, content_type, metadata = self._stat(source) and self.blobs[source]
        self.blobs[target] = (data, content_type, dict(metadata))


def test_a_store_needs_only_the_primitives() -> None:
    """A subclass with the six abstract primitives gets get, exists, download, url, ping."""
    store = DictStore()
    store.put("k/a.txt", b"hello", metadata={"m": "1"})
    assert store.get("k/a.txt") == b"hello"
    assert store.exists("k/a.txt") is True
    assert store.exists("k/b.txt") is False
    target = io.BytesIO()
    assert store.download("k/a.txt", target) == 5
    assert target.getvalue() == b"hello"
    with pytest.raises(BlobNotFound, match=r"'k/b\.txt'"):
        store.get("k/b.txt")
    with pytest.raises(UrlNotSupported, match="DictStore cannot serve URLs"):
        store.url("k/a.txt")
    assert store.ping() is True
    dm = DataManager()
    store.install(dm)

    def failing_unit_of_work() -> None:
        with dm.context() as ctx:
            ctx.blobs.put("k/c.txt", b"new")
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError, match="rolled back"):
        failing_unit_of_work()
    assert sorted(store.blobs) == ["k/a.txt"]


def test_abstract_store_cannot_be_built() -> None:
    """BlobStore itself is abstract: instantiating it names the missing primitives."""
    with pytest.raises(TypeError, match="abstract"):
        BlobStore()  # type: ignore[abstract]


@pytest.mark.parametrize("kind", BACKENDS)
def test_repr_names_the_place(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Each store's repr says where its blobs live."""
    store = make_store(kind, tmp_path, request)
    expected = {
        "memory": "<MemoryBlobStore 0 blobs>",
        "fs": f"<FileSystemBlobStore '{tmp_path}/root'>",
        "s3": "<S3BlobStore s3://test-",
    }[kind]
    assert repr(store).startswith(expected)


# -- from_url ----------------------------------------------------------------------


class TestFromUrl:
    def test_file_urls_and_plain_paths(self, tmp_path: Path) -> None:
        """file:// URLs (percent-decoded) and plain paths give a FileSystemBlobStore there."""
        for url in (f"file://{tmp_path}/a%20b", f"file://localhost{tmp_path}/a%20b", f"{tmp_path}/a b"):
            store = from_url(url, fsync=False)
            assert isinstance(store, FileSystemBlobStore)
            assert store.root == f"{tmp_path}/a b"
            assert store.fsync is False
        store.put("k", b"v")
        assert (tmp_path / "a b" / "k").read_bytes() == b"v"

    def test_relative_path(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A relative path is resolved against the working directory, once."""
        monkeypatch.chdir(tmp_path)
        store = from_url("blobs")
        assert isinstance(store, FileSystemBlobStore)
        assert store.root == str(tmp_path / "blobs")

    def test_memory(self) -> None:
        """memory:// gives a new, empty MemoryBlobStore each time."""
        first, second = from_url("memory://"), from_url("memory:")
        assert isinstance(first, MemoryBlobStore)
        first.put("k", b"v")
        assert not second.exists("k")

    @pytest.mark.parametrize(
        ("url", "error", "match"),
        [
            ("ftp://host/x", ValueError, "unsupported blob store URL 'ftp://host/x'; use file:///"),
            ("s3://", ValueError, "names no bucket"),
            ("s3:///prefix", ValueError, "names no bucket"),
            ("file://server/share", ValueError, "names the host 'server'.*three slashes"),
            ("file://", ValueError, "has no path"),
            ("", ValueError, "unsupported blob store URL ''"),
            ("memory://somewhere", ValueError, "has no location"),
            ("s3://bucket/p?endpoint_url=http://x", ValueError, "keyword arguments"),
            (b"s3://bucket", TypeError, "is a str"),
        ],
    )
    def test_bad_urls(self, url: Any, error: type[Exception], match: str) -> None:
        """A URL that names no usable store fails at once, saying what a good one looks like."""
        with pytest.raises(error, match=match):
            from_url(url)

    @pytest.mark.parametrize(
        ("url", "match"),
        [
            ("s3://AKIAEXAMPLE:hunter2@bucket/p", "user name or password.*AWS credential chain"),
            ("s3://:hunter2@bucket", "user name or password"),
            ("s3://AKIAEXAMPLE:hun@ter2@bucket", "user name or password"),
            ("s3://AKIAEXAMPLE:hun%40ter2@bucket", "user name or password"),
            ("file://admin:hunter2@localhost/srv/blobs", "user name or password"),
            ("memory://admin:hunter2@", "user name or password"),
            ("ftp://admin:hunter2@host/x", "user name or password"),
            ("AKIAEXAMPLE:hunter2@bucket/p", "unsupported blob store URL '\\*\\*\\*@bucket/p'"),
            ("s3://AKIAEXAMPLE:hun/ter2@bucket", "names a port"),
            ("s3://AKIAEXAMPLE:hun?ter2@bucket", "query or fragment"),
            ("file://admin:hun/ter2@host/x", "names the host '\\*\\*\\*@host'"),
            ("s3://bucket/p?aws_secret_access_key=hunter2", "query or fragment"),
            ("s3://bucket/p#hunter2", "query or fragment"),
        ],
    )
    def test_credentials_are_refused_and_never_echoed(self, url: str, match: str) -> None:
        """A URL carrying a password is refused, and neither the error nor its repr repeats it."""
        with pytest.raises(ValueError, match=match) as info:
            from_url(url)
        for text in (str(info.value), repr(info.value)):
            assert "hun" not in text
            assert "AKIAEXAMPLE" not in text
        assert info.value.__context__ is None

    def test_a_refused_non_str_url_is_not_echoed(self) -> None:
        """A URL given as bytes is refused by its type alone, without repeating its content."""
        with pytest.raises(TypeError, match="got bytes") as info:
            from_url(b"s3://AKIAEXAMPLE:hunter2@bucket")  # type: ignore[arg-type]
        assert "hunter2" not in str(info.value)

    def test_an_s3_url_with_a_port_points_to_endpoint_url(self) -> None:
        """s3://host:port is refused: a bucket has no port; the endpoint is an option."""
        with pytest.raises(ValueError, match=r"port.*endpoint_url="):
            from_url("s3://minio:9000/bucket")

    def test_options_the_store_does_not_take(self) -> None:
        """Options go to the constructor: one it does not know is a TypeError."""
        with pytest.raises(TypeError, match="fsync"):
            from_url("memory://", fsync=False)
