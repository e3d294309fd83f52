"""polydatum.sync between blob stores: memory, the filesystem and S3 (moto's server over HTTP)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.blob import BlobStore, put_hashed
from polydatum.sync import BlobSide, Change, Differ, FingerprintError, Kind, Syncer
from tests.support.s3 import BACKENDS, make_store
from tests.support.s3 import moto_server_fixture as moto_server_fixture
from tests.support.s3 import store_fixture as store_fixture


def summary(differ: Differ[Any, Any]) -> list[tuple[str, str]]:
    return [(c.kind.value, c.key) for c in differ]


def copier(source: BlobStore, target: BlobStore, prefix: str) -> Any:
    """An apply that makes ``target``'s blobs under ``prefix`` those of ``source``, hashes included."""

    def apply(ctx: Any, change: Change[str, str]) -> None:
        if change.kind is Kind.DELETED:
            target.delete(str(change.target))
        else:
            with source.open(str(change.source)) as stream:
                put_hashed(target, prefix + change.key, stream)

    return apply


class TestOneStore:
    """A BlobSide on each backend."""

    def test_keys_hashes_and_resume(self, store: BlobStore) -> None:
        """Keys come relative to the prefix, in order, resumable; recorded hashes compare with other sides."""
        for name in ["B", "a-b", "a/b", "a0", "ab", "\u00e9"]:
            put_hashed(store, f"in/{name}", name.encode())
        store.put("out/x", b"outside")
        side = BlobSide(store, "in/")
        assert [k for k, _ in side.scan()] == ["B", "a-b", "a/b", "a0", "ab", "\u00e9"]
        assert [k for k, _ in side.scan(after="a-b")] == ["a/b", "a0", "ab", "\u00e9"]
        wanted = [("B", "B"), ("a0", "changed"), ("ab", "ab"), ("new", "new")]
        differ = Differ(
            [(k, hashlib.sha256(v.encode()).hexdigest()) for k, v in wanted],
            side,
            key=lambda p: p[0],
            fingerprint=lambda p: p[1],
        )
        assert summary(differ) == [
            ("deleted", "a-b"),
            ("deleted", "a/b"),
            ("changed", "a0"),
            ("new", "new"),
            ("deleted", "\u00e9"),
        ]

    def test_missing_hash_is_read_or_refused(self, store: BlobStore) -> None:
        """A blob put without put_hashed is hashed by reading it, or refused naming the fix."""
        store.put("x", b"plain")
        put_hashed(store, "y", b"plain")
        one = BlobSide(store)
        assert one.fingerprint("x") == one.fingerprint("y")
        with pytest.raises(FingerprintError, match="has no recorded sha256"):
            list(
                Differ(
                    BlobSide(store, hash_missing=False),
                    [("x", 0)],
                    key=lambda p: p[0],
                    fingerprint=lambda p: p[1],
                )
            )


@pytest.mark.parametrize(("from_kind", "to_kind"), [("fs", "s3"), ("s3", "memory"), ("memory", "fs")])
def test_sync_between_two_kinds_of_store(
    from_kind: str, to_kind: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A prefix of one store synced into another ends equal, hashes included; a second run does nothing."""
    source = make_store(from_kind, tmp_path / "a", request)
    target = make_store(to_kind, tmp_path / "b", request)
    for i in range(12):
        put_hashed(source, f"src/{i:02d}.bin", bytes([i]) * (i + 1))
    for i in range(6, 15):
        data = bytes([i]) * (i + 1) if i % 3 else b"stale"
        put_hashed(target, f"dst/{i:02d}.bin", io.BytesIO(data))
    target.put("elsewhere/keep.bin", b"not under the prefix")
    differ = Differ(BlobSide(source, "src/"), BlobSide(target, "dst/"))
    report = Syncer(
        differ, apply=copier(source, target, "dst/"), data_manager=DataManager(), batch_size=4
    ).run()
    assert (report.new, report.changed, report.deleted, report.unchanged) == (6, 2, 3, 4)
    assert sorted(target.list("dst/")) == [f"dst/{i:02d}.bin" for i in range(12)]
    assert all(target.get(f"dst/{i:02d}.bin") == source.get(f"src/{i:02d}.bin") for i in range(12))
    assert target.exists("elsewhere/keep.bin")
    assert summary(Differ(BlobSide(source, "src/"), BlobSide(target, "dst/"))) == []


@pytest.mark.parametrize("kind", BACKENDS)
def test_put_hashed_on_every_store(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """put_hashed records the same hash on every store, for bytes and for a stream, beside other metadata."""
    store = make_store(kind, tmp_path, request)
    one = put_hashed(store, "a", b"x" * 100, metadata={"who": "ada"})
    two = put_hashed(store, "b", io.BytesIO(b"x" * 100), content_type="text/plain")
    assert one == two
    assert store.stat("a").metadata == {"who": "ada", "sha256": one}
    assert store.stat("b").metadata["sha256"] == one
    assert store.stat("b").content_type == "text/plain"
