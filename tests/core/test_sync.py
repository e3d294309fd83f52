"""polydatum.sync without a server: the merge join, the Syncer's batches, checkpoints, dry runs, bad input."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from polydatum import DataManager
from polydatum.blob import MemoryBlobStore, put_hashed
from polydatum.sync import (
    ApplyError,
    BlobSide,
    Change,
    Differ,
    DuplicateKey,
    FileCheckpoint,
    FingerprintError,
    FolderSide,
    Items,
    Kind,
    MemoryCheckpoint,
    Side,
    Syncer,
    SyncError,
    UnsortedInput,
)


def pairs(mapping: dict[Any, Any]) -> list[tuple[Any, Any]]:
    return sorted(mapping.items())


def first(pair: tuple[Any, Any]) -> Any:
    return pair[0]


def second(pair: tuple[Any, Any]) -> Any:
    return pair[1]


def summary(changes: Iterator[Change[Any, Any]] | Differ[Any, Any]) -> list[tuple[str, Any]]:
    return [(c.kind.value, c.key) for c in changes]


class TestDiffer:
    """The merge join of two key-ordered streams."""

    def test_new_changed_deleted_in_key_order(self) -> None:
        """Keys only in the source are new, only in the target deleted, with other fingerprints changed."""
        source = pairs({"a": 1, "b": 2, "d": 4, "f": 6})
        target = pairs({"a": 1, "b": 20, "c": 3, "e": 5})
        differ = Differ(source, target, key=first, fingerprint=second)
        changes = list(differ)
        assert summary(iter(changes)) == [
            ("changed", "b"),
            ("deleted", "c"),
            ("new", "d"),
            ("deleted", "e"),
            ("new", "f"),
        ]
        assert changes[0] == Change(Kind.CHANGED, "b", ("b", 2), ("b", 20))
        assert changes[1].source is None
        assert changes[2].target is None

    def test_names_pick_attributes_and_mapping_keys(self) -> None:
        """key= and fingerprint= may name a mapping key (dicts, rows) or an attribute (objects)."""

        @dataclass
        class File:
            path: str
            digest: str

        source = [File("a", "x"), File("b", "y")]
        target = [{"path": "a", "digest": "x"}, {"path": "b", "digest": "z"}]
        assert summary(Differ(source, target, key="path", fingerprint="digest")) == [("changed", "b")]

    def test_without_fingerprint_items_are_compared(self) -> None:
        """Without fingerprint= the items themselves are compared."""
        assert summary(Differ([1, 2, 3], [2, 3, 4], key=lambda n: n)) == [("new", 1), ("deleted", 4)]

    def test_empty_sides(self) -> None:
        """An empty side makes every key of the other new (or deleted)."""
        assert summary(Differ([], [1, 2], key=int)) == [("deleted", 1), ("deleted", 2)]
        assert summary(Differ([1], [], key=int)) == [("new", 1)]
        assert summary(Differ([], [], key=int)) == []

    def test_after_resumes_past_a_key(self) -> None:
        """changes(after=k) skips every key up to and including k, on both sides."""
        differ = Differ([1, 2, 4, 6], [2, 3, 5, 6], key=int)
        assert summary(differ.changes(after=3)) == [("new", 4), ("deleted", 5)]

    def test_fingerprints_are_read_only_for_shared_keys(self) -> None:
        """A fingerprint is computed only for a key both sides hold (a blob's is a stat call)."""
        seen: list[int] = []

        def fingerprint(n: int) -> int:
            seen.append(n)
            return n

        list(Differ(range(10), range(5, 15), key=int, fingerprint=fingerprint))
        assert sorted(seen) == [5, 5, 6, 6, 7, 7, 8, 8, 9, 9]

    def test_a_million_keys_hold_a_few_items(self) -> None:
        """Both sides are streamed: of a million items a side, a handful are alive at any time."""

        class Item:
            __slots__ = ("fingerprint", "key")
            live = 0
            peak = 0

            def __init__(self, key: int, fingerprint: int) -> None:
                self.key = key
                self.fingerprint = fingerprint
                Item.live += 1
                Item.peak = max(Item.peak, Item.live)

            def __del__(self) -> None:
                Item.live -= 1

        class Counted:
            def __init__(self, skip: int, modulo: int) -> None:
                self.skip = skip
                self.modulo = modulo

            def scan(self, after: Any = None) -> Iterator[tuple[int, Item]]:
                for n in range(1_000_000):
                    if n % self.skip:
                        yield n, Item(n, n if n % self.modulo else -n)

            def fingerprint(self, item: Item) -> int:
                return item.fingerprint

        counts = {"new": 0, "changed": 0, "deleted": 0}
        for change in Differ(Counted(7, 1_000_001), Counted(11, 5)).changes():
            counts[change.kind.value] += 1
        assert sum(counts.values()) > 300_000
        assert Item.peak <= 6  # one a side in the join, one a side in the change just yielded, and spares


class TestDifferBadInput:
    """Bad input stops the walk with an error that says what to fix."""

    def test_unsorted_source(self) -> None:
        """A key smaller than the one before is refused, naming the side and both keys."""
        with pytest.raises(UnsortedInput, match=r"source is not sorted by key: 'a' came after 'b'") as info:
            list(Differ(["b", "a"], ["a"], key=str))
        assert info.value.side == "source"
        assert isinstance(info.value, ValueError)

    def test_duplicate_target_key(self) -> None:
        """The same key twice in a row is a DuplicateKey."""
        with pytest.raises(DuplicateKey, match=r"target yielded the key 2 twice") as info:
            list(Differ([1, 2, 3], [1, 2, 2], key=int))
        assert info.value.side == "target"

    def test_resumed_walk_checks_against_after(self) -> None:
        """A side that yields a key at or below after= is out of order too."""

        class Careless:
            def scan(self, after: Any = None) -> Iterator[tuple[int, int]]:
                yield from ((n, n) for n in range(5))  # ignores after

            def fingerprint(self, item: int) -> int:
                return item

        with pytest.raises(DuplicateKey):
            list(Differ(Careless(), [], key=int).changes(after=0))

    def test_mixed_key_types_on_one_side(self) -> None:
        """Keys that cannot be compared with each other are refused, naming both types."""
        with pytest.raises(UnsortedInput, match=r"'a' \(str\) and 1 \(int\) cannot be compared"):
            list(Differ(["a", 1], [], key=lambda x: x))

    def test_key_types_differ_between_sides(self) -> None:
        """A str key on one side and an int on the other is refused: make both the same type."""
        with pytest.raises(
            SyncError, match=r"source key '1' \(str\) and target key 1 \(int\) cannot be compared"
        ):
            list(Differ(["1"], [1], key=lambda x: x))

    def test_fingerprint_that_fails(self) -> None:
        """A failing fingerprint is a FingerprintError naming the side and the key; the cause is chained."""

        def fingerprint(item: tuple[str, int]) -> float:
            return 1 / item[1]

        with pytest.raises(
            FingerprintError, match=r"fingerprint of target item 'b' failed with ZeroDivisionError"
        ) as info:
            list(Differ([("a", 1), ("b", 1)], [("a", 1), ("b", 0)], key=first, fingerprint=fingerprint))
        assert info.value.side == "target"
        assert info.value.key == "b"
        assert isinstance(info.value.__cause__, ZeroDivisionError)

    def test_key_that_fails(self) -> None:
        """A key= that raises is a FingerprintError naming the side."""
        with pytest.raises(FingerprintError, match=r"key= failed on a source item with KeyError"):
            list(Differ([{"id": 1}, {}], [], key="id"))

    def test_none_key(self) -> None:
        """An item whose key is None is refused."""
        with pytest.raises(FingerprintError, match="key is None"):
            list(Differ([{"id": None}], [], key=lambda d: d["id"]))

    def test_a_generator_is_read_once(self) -> None:
        """A generator side read a second time is refused: it would look empty, and the target all deleted."""
        differ = Differ((n for n in [1, 2]), [1, 2], key=int)
        assert list(differ) == []
        with pytest.raises(
            SyncError, match=r"the source is an iterator \(a generator\) that was read already"
        ):
            list(differ)
        twice = Differ([1, 2], [1, 3], key=int)
        assert summary(twice) == summary(twice) == [("new", 2), ("deleted", 3)]  # a list reads again

    def test_plain_iterable_needs_key(self) -> None:
        """A plain iterable without key= is refused at construction."""
        with pytest.raises(TypeError, match="needs key="):
            Differ([1], [2])

    @pytest.mark.parametrize("side", ["text", 42, None])
    def test_not_a_side(self, side: Any) -> None:
        """A str, a number or None is neither a Side nor an iterable of items."""
        with pytest.raises(TypeError, match="must be a Side"):
            Differ(side, [], key=int)

    def test_bad_key_spec(self) -> None:
        """key= must be a callable or a non-empty name."""
        with pytest.raises(TypeError, match="key must be a callable or a non-empty name"):
            Items([1], key="")


@pytest.fixture(name="dm")
def fixture_dm() -> DataManager:
    return DataManager()


class Target:
    """A dict standing for a store, with a log of the contexts that wrote it."""

    def __init__(self, data: dict[str, int]) -> None:
        self.data = data
        self.contexts: list[int] = []

    def apply(self, ctx: Any, change: Change[tuple[str, int], tuple[str, int]]) -> None:
        self.contexts.append(id(ctx))
        if change.kind is Kind.DELETED:
            del self.data[change.key]
        else:
            assert change.source is not None
            self.data[change.key] = change.source[1]


def differ_for(source: dict[str, int], target: Target) -> Differ[Any, Any]:
    # Lazy target: read anew at each run, as a real side would be.
    class Live:
        def scan(self, after: Any = None) -> Iterator[tuple[str, tuple[str, int]]]:
            for key, value in sorted(target.data.items()):
                if after is None or key > after:
                    yield key, (key, value)

        def fingerprint(self, item: tuple[str, int]) -> int:
            return item[1]

    return Differ(Items(pairs(source), key=first, fingerprint=second), Live())


def numbered(n: int) -> dict[str, int]:
    return {f"k{i:04d}": i for i in range(n)}


class TestSyncer:
    """Batches in contexts, counts, dry runs, checkpoints."""

    def test_sync_makes_the_target_equal_and_a_second_run_finds_nothing(self, dm: DataManager) -> None:
        """After a run the target equals the source; running again changes nothing (idempotent)."""
        source = numbered(50)
        target = Target({**numbered(40), "k0003": -1, "zzz": 0})
        report = Syncer(differ_for(source, target), apply=target.apply, data_manager=dm, batch_size=7).run()
        assert target.data == source
        assert (report.new, report.changed, report.deleted, report.unchanged) == (10, 1, 1, 39)
        # The changed k0003 is committed on its own once 7 unchanged keys follow it; then 7 and 4 changes.
        assert report.batches == 3
        assert report.counts == {"new": 10, "changed": 1, "deleted": 1, "unchanged": 39}
        again = Syncer(differ_for(source, target), apply=target.apply, data_manager=dm).run()
        assert (again.new, again.changed, again.deleted, again.unchanged, again.batches) == (0, 0, 0, 50, 0)

    def test_each_batch_runs_in_its_own_context(self, dm: DataManager) -> None:
        """Every change of a batch sees the same context; the next batch gets a new one."""
        contexts: list[Any] = []
        source = numbered(10)
        target = Target({})
        Syncer(
            differ_for(source, target),
            apply=lambda ctx, change: contexts.append(ctx) or target.apply(ctx, change),
            data_manager=dm,
            batch_size=4,
        ).run()
        batches = [contexts[0:4], contexts[4:8], contexts[8:10]]
        assert all(len({id(c) for c in batch}) == 1 for batch in batches)
        assert len({id(batch[0]) for batch in batches}) == 3

    def test_a_failed_batch_rolls_back_whole(self, dm: DataManager) -> None:
        """An error in a batch rolls its context back: its rollback hooks run, its commit hooks do not."""
        source = numbered(10)
        target = Target({})
        committed: list[str] = []
        rolled_back: list[str] = []

        def apply(ctx: Any, change: Change[Any, Any]) -> None:
            ctx.on_commit(committed.append, change.key)
            ctx.on_rollback(rolled_back.append, change.key)
            if change.key == "k0006":
                raise RuntimeError("disk full")

        with pytest.raises(
            ApplyError, match=r"new change of 'k0006' failed with RuntimeError; the batch of 4"
        ) as info:
            Syncer(differ_for(source, target), apply=apply, data_manager=dm, batch_size=4).run()
        assert committed == ["k0000", "k0001", "k0002", "k0003"]
        assert rolled_back == ["k0004", "k0005", "k0006"]
        assert info.value.key == "k0006"
        assert info.value.kind == "new"
        assert isinstance(info.value.__cause__, RuntimeError)
        assert "disk full" not in str(info.value)  # the cause is chained, not echoed

    def test_resume_after_a_failure_continues_at_the_checkpoint(self, dm: DataManager) -> None:
        """A run that failed resumes after the last committed batch; the counts cover both runs."""
        source = numbered(20)
        target = Target({})
        checkpoint = MemoryCheckpoint()
        fail = {"k0013"}
        keys: list[str] = []

        def apply(ctx: Any, change: Change[Any, Any]) -> None:
            if change.key in fail:
                raise RuntimeError("once")
            keys.append(change.key)
            target.apply(ctx, change)

        syncer = Syncer(
            differ_for(source, target), apply=apply, data_manager=dm, batch_size=5, checkpoint=checkpoint
        )
        with pytest.raises(ApplyError):
            syncer.run()
        saved = checkpoint.load()
        assert saved is not None
        assert saved[0] == "k0009"
        fail.clear()
        report = syncer.run()
        assert report.resumed_from == "k0009"
        assert target.data == source
        # The dict does not roll back: k0010-k0012 stayed written, so the resumed run finds them in step.
        assert keys.count("k0010") == 1
        assert keys.count("k0004") == 1  # before the checkpoint: not read again
        assert (report.new, report.unchanged) == (17, 3)
        assert checkpoint.load() is None  # finished: the next run starts from the top
        assert "resumed after 'k0009'" in str(report)

    def test_checkpoint_moves_through_unchanged_keys(self, dm: DataManager) -> None:
        """A long run of unchanged keys moves the checkpoint too, without waiting for a change."""
        source = numbered(30)
        target = Target(numbered(30))
        saves: list[Any] = []

        class Recording(MemoryCheckpoint):
            def save(self, key: Any, counts: Any) -> None:
                saves.append(key)
                super().save(key, counts)

        Syncer(
            differ_for(source, target),
            apply=target.apply,
            data_manager=dm,
            batch_size=10,
            checkpoint=Recording(),
        ).run()
        assert saves == ["k0009", "k0019", "k0029"]

    def test_apply_batch_gets_the_whole_batch(self, dm: DataManager) -> None:
        """apply_batch= is called once a batch, with its changes in key order."""
        sizes: list[list[str]] = []
        source = numbered(7)
        target = Target({})

        def apply_batch(ctx: Any, changes: Sequence[Change[Any, Any]]) -> None:
            sizes.append([c.key for c in changes])
            for change in changes:
                target.apply(ctx, change)

        Syncer(differ_for(source, target), apply_batch=apply_batch, data_manager=dm, batch_size=3).run()
        assert [len(s) for s in sizes] == [3, 3, 1]
        assert target.data == source

    def test_an_error_in_apply_batch_names_the_range(self, dm: DataManager) -> None:
        """A failing apply_batch is an ApplyError naming the batch's first and last keys."""

        def apply_batch(ctx: Any, changes: Sequence[Change[Any, Any]]) -> None:
            raise ValueError

        syncer = Syncer(differ_for(numbered(3), Target({})), apply_batch=apply_batch, data_manager=dm)
        with pytest.raises(ApplyError, match=r"the batch from 'k0000' to 'k0002' failed with ValueError"):
            syncer.run()

    def test_dry_run_prints_the_plan_and_changes_nothing(self, dm: DataManager) -> None:
        """A dry run prints one line a change and the report, applies nothing and saves no checkpoint."""
        target = Target({"a": 1, "c": 3, "d": 0})
        checkpoint = MemoryCheckpoint()
        out = io.StringIO()
        report = Syncer(
            differ_for({"a": 1, "b": 2, "d": 4}, target),
            apply=target.apply,
            data_manager=dm,
            checkpoint=checkpoint,
        ).run(dry_run=True, out=out)
        assert out.getvalue().splitlines() == [
            "new      b",
            "deleted  c",
            "changed  d",
            "would apply: 1 new, 1 changed, 1 deleted; 1 unchanged",
        ]
        assert target.data == {"a": 1, "c": 3, "d": 0}
        assert report.dry_run
        assert checkpoint.load() is None

    def test_progress_line_on_a_terminal(self, dm: DataManager, monkeypatch: pytest.MonkeyPatch) -> None:
        """On a terminal the Syncer draws a progress line (a bar with total=) on stderr; elsewhere nothing."""

        class Terminal(io.StringIO):
            def isatty(self) -> bool:
                return True

        terminal = Terminal()
        monkeypatch.setattr("sys.stderr", terminal)
        target = Target({})
        Syncer(differ_for(numbered(3), target), apply=target.apply, data_manager=dm, label="notes").run()
        assert terminal.getvalue().startswith("\rnotes: ")
        assert "new 3" in terminal.getvalue()
        assert terminal.getvalue().endswith("\n")
        barred = Terminal()
        monkeypatch.setattr("sys.stderr", barred)
        Syncer(differ_for(numbered(4), Target({})), apply=print, data_manager=dm, total=4, label="n").run(
            dry_run=True, out=io.StringIO()
        )
        last = barred.getvalue().rstrip("\n").rsplit("\r", 1)[-1]
        assert last.startswith("n [" + "#" * 24 + "] 100% 4/4 (")
        assert "new 4" in last
        plain = io.StringIO()
        monkeypatch.setattr("sys.stderr", plain)
        Syncer(differ_for(numbered(3), Target({})), apply=target.apply, data_manager=dm).run()
        assert plain.getvalue() == ""

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({}, TypeError, "exactly one of apply="),
            ({"apply": print, "apply_batch": print}, TypeError, "exactly one of apply="),
            ({"apply": 42}, TypeError, "must be callable"),
            ({"apply": print, "batch_size": 0}, ValueError, "batch_size must be an int of at least 1"),
            ({"apply": print, "batch_size": True}, ValueError, "batch_size"),
            ({"apply": print, "total": -1}, ValueError, "total must be an int of 0 or more"),
            (
                {"apply": print, "checkpoint": "sync.json"},
                TypeError,
                "checkpoint must have load, save and clear",
            ),
            ({"apply": print, "data_manager": object()}, TypeError, "must be a polydatum DataManager"),
        ],
    )
    def test_bad_arguments(
        self, dm: DataManager, kwargs: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """Wrong arguments are refused when the Syncer is made, saying what is expected."""
        kwargs.setdefault("data_manager", dm)
        with pytest.raises(error, match=match):
            Syncer(Differ([], [], key=int), **kwargs)

    def test_not_a_differ(self, dm: DataManager) -> None:
        """The first argument must be a Differ."""
        with pytest.raises(TypeError, match="needs a Differ"):
            Syncer([], apply=print, data_manager=dm)  # type: ignore[arg-type]


class TestFileCheckpoint:
    """The checkpoint file: atomic, typed keys, refuses what it did not write."""

    def test_round_trip(self, tmp_path: Path) -> None:
        """str, int and tuple keys come back as they were saved, with the counts."""
        checkpoint = FileCheckpoint(tmp_path / "sync.json")
        assert checkpoint.load() is None
        for key in ("notes/1", 42, ("a", 1, ("b",))):
            checkpoint.save(key, {"new": 3})
            assert checkpoint.load() == (key, {"new": 3})
        checkpoint.clear()
        assert checkpoint.load() is None
        checkpoint.clear()  # nothing to clear: fine
        assert os.listdir(tmp_path) == []  # no temporary file left behind

    def test_key_it_cannot_keep(self, tmp_path: Path) -> None:
        """A key that is not str, int or a tuple of them is refused when saved."""
        with pytest.raises(SyncError, match=r"keeps str, int and tuple keys, got 1.5 \(float\)"):
            FileCheckpoint(tmp_path / "sync.json").save(1.5, {})

    @pytest.mark.parametrize(
        "text",
        ["", "{", "[]", '{"format": 2, "key": "a", "counts": {}}', '{"format": 1, "key": [1], "counts": {}}'],
    )
    def test_a_file_it_did_not_write(self, tmp_path: Path, text: str) -> None:
        """A garbled or foreign file is refused with the advice to delete it, not its path."""
        path = tmp_path / "sync.json"
        path.write_text(text)
        with pytest.raises(
            SyncError, match=r"'sync\.json' is not one polydatum\.sync wrote; delete it"
        ) as info:
            FileCheckpoint(path).load()
        assert str(tmp_path) not in str(info.value)

    def test_syncer_resumes_from_a_file(self, dm: DataManager, tmp_path: Path) -> None:
        """A FileCheckpoint left by a failed run makes the next Syncer resume after its key."""
        path = tmp_path / "sync.json"
        path.write_text(json.dumps({"format": 1, "key": "k0004", "counts": {"new": 5}}))
        target = Target({})
        report = Syncer(
            differ_for(numbered(8), target),
            apply=target.apply,
            data_manager=dm,
            checkpoint=FileCheckpoint(path),
        ).run()
        assert sorted(target.data) == ["k0005", "k0006", "k0007"]
        assert report.new == 8
        assert not path.exists()


class TestBlobAndFolderSides:
    """The blob and folder sides, in memory and on disk (S3 is in tests/integrations/test_sync_blob.py)."""

    def test_blob_side_strips_the_prefix_and_compares_recorded_hashes(self) -> None:
        """Keys are relative to the prefix; blobs with the same content compare equal across stores."""
        one, two = MemoryBlobStore(), MemoryBlobStore()
        put_hashed(one, "a/x.txt", b"same")
        put_hashed(one, "a/y.txt", b"new")
        put_hashed(two, "b/x.txt", b"same")
        put_hashed(two, "b/z.txt", b"gone")
        one.put("other/q.txt", b"outside the prefix")
        assert summary(Differ(BlobSide(one, "a/"), BlobSide(two, "b/"))) == [
            ("new", "y.txt"),
            ("deleted", "z.txt"),
        ]

    def test_blob_side_hashes_a_blob_without_a_recorded_hash(self) -> None:
        """A blob put without put_hashed is hashed by reading it; or refused with hash_missing=False."""
        one, two = MemoryBlobStore(), MemoryBlobStore()
        one.put("x", b"data")
        put_hashed(two, "x", b"data")
        assert summary(Differ(BlobSide(one), BlobSide(two))) == []
        with pytest.raises(FingerprintError) as info:
            list(Differ(BlobSide(one, hash_missing=False), BlobSide(two)))
        assert "has no recorded sha256; write blobs with polydatum.blob.put_hashed" in str(info.value)

    def test_blob_side_by_size_or_callable(self) -> None:
        """fingerprint="size" compares sizes; a callable gets the BlobInfo."""
        one, two = MemoryBlobStore(), MemoryBlobStore()
        one.put("x", b"abc", metadata={"rev": "1"})
        two.put("x", b"xyz", metadata={"rev": "2"})
        assert summary(Differ(BlobSide(one, fingerprint="size"), BlobSide(two, fingerprint="size"))) == []
        by_rev = Differ(
            BlobSide(one, fingerprint=lambda i: i.metadata["rev"]),
            BlobSide(two, fingerprint=lambda i: i.metadata["rev"]),
        )
        assert summary(by_rev) == [("changed", "x")]

    def test_blob_side_resumes_with_after(self) -> None:
        """scan(after=) lists only keys after it (relative to the prefix)."""
        store = MemoryBlobStore()
        for name in "abcd":
            store.put(f"p/{name}", b"")
        assert [k for k, _ in BlobSide(store, "p/").scan(after="b")] == ["c", "d"]
        full = BlobSide(store, "p/", strip_prefix=False)
        assert list(full.scan(after="p/c")) == [("p/d", "p/d")]
        assert [k for k, _ in full.scan()] == ["p/a", "p/b", "p/c", "p/d"]

    @pytest.mark.parametrize(
        ("kwargs", "error", "match"),
        [
            ({"store": "s3://bucket"}, TypeError, "needs a polydatum.blob.BlobStore"),
            ({"prefix": 3}, TypeError, "prefix must be a str"),
            ({"fingerprint": "etag"}, ValueError, 'fingerprint must be "sha256", "size" or a callable'),
        ],
    )
    def test_blob_side_bad_arguments(
        self, kwargs: dict[str, Any], error: type[Exception], match: str
    ) -> None:
        """A BlobSide refuses what is not a store, a str prefix or a known fingerprint."""
        kwargs.setdefault("store", MemoryBlobStore())
        with pytest.raises(error, match=match):
            BlobSide(**kwargs)

    def test_folder_side_walks_in_key_order(self, tmp_path: Path) -> None:
        """Relative paths come in str order (a folder sorts as "name/"), skipping .polydatum folders."""
        for name in ["a-b", "a/x", "a/y/z", "a0", "b", ".polydatum/tmp/t", "c/.polydatum/m"]:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(name.encode())
        side = FolderSide(tmp_path)
        keys = [k for k, _ in side.scan()]
        assert keys == ["a-b", "a/x", "a/y/z", "a0", "b"]
        assert keys == sorted(keys)
        assert [k for k, _ in side.scan(after="a/x")] == ["a/y/z", "a0", "b"]
        assert [k for k, _ in side.scan(after="a/y/z")] == ["a0", "b"]

    def test_folder_against_blob_store(self, tmp_path: Path) -> None:
        """A folder and a blob store compare by content hash, so the folder can be uploaded by a sync."""
        (tmp_path / "d").mkdir()
        (tmp_path / "d" / "one.txt").write_bytes(b"1")
        (tmp_path / "two.txt").write_bytes(b"2")
        store = MemoryBlobStore()
        put_hashed(store, "up/d/one.txt", b"old")
        put_hashed(store, "up/three.txt", b"3")

        def apply(ctx: Any, change: Change[Path, str]) -> None:
            if change.kind is Kind.DELETED:
                store.delete(f"up/{change.key}")
            else:
                assert change.source is not None
                with change.source.open("rb") as stream:
                    put_hashed(store, f"up/{change.key}", stream)

        differ = Differ(FolderSide(tmp_path), BlobSide(store, "up/"))
        report = Syncer(differ, apply=apply, data_manager=DataManager()).run()
        assert (report.new, report.changed, report.deleted) == (1, 1, 1)
        assert sorted(store.list()) == ["up/d/one.txt", "up/two.txt"]
        assert store.get("up/d/one.txt") == b"1"
        assert summary(Differ(FolderSide(tmp_path), BlobSide(store, "up/"))) == []
        assert (
            summary(
                Differ(FolderSide(tmp_path, fingerprint="size"), BlobSide(store, "up/", fingerprint="size"))
            )
            == []
        )

    def test_folder_side_bad_arguments(self, tmp_path: Path) -> None:
        """A FolderSide needs an existing folder and a known fingerprint."""
        with pytest.raises(ValueError, match="needs an existing folder; 'missing' is not one") as info:
            FolderSide(tmp_path / "missing")
        assert str(tmp_path) not in str(info.value)
        with pytest.raises(ValueError, match="fingerprint must be"):
            FolderSide(tmp_path, fingerprint="mtime")

    def test_sides_follow_the_protocol(self, tmp_path: Path) -> None:
        """The ready-made sides are Sides."""
        assert isinstance(BlobSide(MemoryBlobStore()), Side)
        assert isinstance(FolderSide(tmp_path), Side)
        assert isinstance(Items([], key=int), Side)


class TestPutHashed:
    """put_hashed records the content's SHA-256 in the metadata."""

    @pytest.mark.parametrize("data", [b"hello", io.BytesIO(b"hello"), iter([b"he", b"llo"])])
    def test_bytes_streams_and_iterables(self, data: Any) -> None:
        """Whatever put takes, the recorded hash is the content's SHA-256."""
        store = MemoryBlobStore()
        digest = put_hashed(store, "k", data, metadata={"author": "ada"})
        assert digest == "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        assert store.stat("k").metadata == {"author": "ada", "sha256": digest}
        assert store.get("k") == b"hello"

    def test_metadata_must_not_set_the_hash(self) -> None:
        """Metadata naming sha256 (in any case) is refused."""
        from polydatum.blob import InvalidMetadata

        with pytest.raises(InvalidMetadata, match="must not set 'sha256'"):
            put_hashed(MemoryBlobStore(), "k", b"x", metadata={"SHA256": "forged"})
