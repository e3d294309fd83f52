"""FileSystemBlobStore specifics: the root is never escaped, writes are atomic under concurrency."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polydatum import DataManager
from polydatum.blob import (
    BlobError,
    BlobNotFound,
    BlobStoreUnavailable,
    FileSystemBlobStore,
    InvalidKey,
)

MiB = 1024 * 1024


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make a folder refuse new and removed entries for this process, even as root.

    As root permissions do not apply, so the folder is made immutable (chattr +i).
    """
    if os.geteuid() != 0:
        mode = directory.stat().st_mode
        directory.chmod(0o555)
        try:
            yield
        finally:
            directory.chmod(mode)
        return
    try:
        subprocess.run(["chattr", "+i", str(directory)], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot make {directory} read-only as root (chattr +i): {exc}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(directory)], check=True)


def tree(path: Path) -> dict[str, bytes]:
    """Every file under ``path`` with its content."""
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.fixture(name="fs")
def fs_fixture(tmp_path: Path) -> FileSystemBlobStore:
    """A filesystem store at <tmp>/root, with a sentinel file beside the root."""
    (tmp_path / "secret.txt").write_bytes(b"outside")
    return FileSystemBlobStore(tmp_path / "root")


class TestLayout:
    def test_blobs_are_plain_files_under_the_root(self, fs: FileSystemBlobStore) -> None:
        """put('a/b.txt') writes <root>/a/b.txt with exactly the bytes given."""
        fs.put("a/b.txt", b"hello")
        assert (Path(fs.root) / "a" / "b.txt").read_bytes() == b"hello"

    def test_metadata_lives_in_a_sidecar_only_when_needed(self, fs: FileSystemBlobStore) -> None:
        """Default content type and no metadata write no sidecar; otherwise one JSON file."""
        meta = Path(fs.root) / ".polydatum" / "meta"
        fs.put("plain.txt", b"x")
        assert not (meta / "plain.txt.json").exists()
        fs.put("rich.txt", b"x", content_type="text/csv", metadata={"a": "1"})
        document = json.loads((meta / "rich.txt.json").read_text())
        assert document == {"content_type": "text/csv", "metadata": {"a": "1"}}
        fs.put("rich.txt", b"y")
        assert not (meta / "rich.txt.json").exists()

    def test_metadata_paths_mark_folders_and_files_apart(self, fs: FileSystemBlobStore) -> None:
        """Sidecar folders end in '.d' and files in '.json': no key's sidecar is another's folder."""
        meta = Path(fs.root) / ".polydatum" / "meta"
        fs.put("a", b"1", metadata={"m": "a"})
        fs.put("a.json/b", b"2", metadata={"m": "b"})
        assert sorted(tree(meta)) == ["a.json", "a.json.d/b.json"]
        assert (fs.get("a"), fs.stat("a").metadata) == (b"1", {"m": "a"})
        assert (fs.get("a.json/b"), fs.stat("a.json/b").metadata) == (b"2", {"m": "b"})
        fs.delete("a.json/b")
        assert sorted(tree(meta)) == ["a.json"]
        assert not (meta / "a.json.d").exists()

    def test_delete_prunes_empty_folders(self, fs: FileSystemBlobStore) -> None:
        """Deleting the last blob of a folder removes the folder, so the name is free again."""
        fs.put("x/y/z", b"1", metadata={"m": "1"})
        fs.delete("x/y/z")
        assert sorted(os.listdir(fs.root)) == [".polydatum"]
        fs.put("x", b"now a blob")
        assert fs.get("x") == b"now a blob"

    def test_a_key_cannot_be_blob_and_folder(self, fs: FileSystemBlobStore) -> None:
        """'a' and 'a/b' cannot both exist on disk: the second put raises BlobError saying so."""
        fs.put("a", b"blob")
        with pytest.raises(BlobError, match="cannot hold both"):
            fs.put("a/b", b"under a blob")
        fs.put("c/d", b"in a folder")
        with pytest.raises(BlobError, match="cannot hold both"):
            fs.put("c", b"over a folder", metadata={"m": "1"})
        fs.put("src", b"with metadata", metadata={"m": "1"})
        with pytest.raises(BlobError, match="cannot hold both"):
            fs.copy("src", "c")
        with pytest.raises(BlobError, match="cannot hold both"):
            fs.copy("src", "a/b")
        assert fs.get("a") == b"blob"
        assert fs.get("c/d") == b"in a folder"
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []

    def test_a_folder_is_not_a_blob(self, fs: FileSystemBlobStore) -> None:
        """A key naming a folder of blobs reads as missing, not as an error."""
        fs.put("dir/file", b"1")
        assert fs.exists("dir") is False
        assert fs.delete("dir") is False
        for read in (fs.get, fs.open, fs.stat):
            with pytest.raises(BlobNotFound, match="'dir'"):
                read("dir")
        assert fs.get("dir/file") == b"1"

    def test_overlong_segment_is_refused(self, fs: FileSystemBlobStore) -> None:
        """A segment longer than filesystems allow is refused as an InvalidKey."""
        with pytest.raises(InvalidKey, match="longer than 250 bytes"):
            fs.put("a/" + "x" * 251, b"1")

    def test_without_fsync(self, tmp_path: Path) -> None:
        """fsync=False still writes atomically and reads back."""
        store = FileSystemBlobStore(tmp_path, fsync=False)
        store.put("k", b"v")
        assert store.get("k") == b"v"

    def test_a_store_nested_in_another_root_keeps_its_bookkeeping(self, fs: FileSystemBlobStore) -> None:
        """A store rooted in a folder of another: the outer one never lists or sweeps its bookkeeping."""
        inner = FileSystemBlobStore(Path(fs.root) / "inner")
        inner.put("k", b"1", content_type="text/csv", metadata={"m": "1"})
        assert list(fs.list()) == ["inner/k"]
        assert fs.sweep_orphans(lambda keys: keys, older_than=datetime.timedelta(seconds=-60)) == []
        assert inner.stat("k").metadata == {"m": "1"}

    def test_files_written_by_hand_are_listed(self, fs: FileSystemBlobStore) -> None:
        """Files placed under the root by other tools are blobs too."""
        (Path(fs.root) / "hand").mkdir(parents=True)
        (Path(fs.root) / "hand" / "made.png").write_bytes(b"png")
        assert list(fs.list()) == ["hand/made.png"]
        assert fs.stat("hand/made.png").content_type == "image/png"


class TestEscapes:
    @pytest.mark.parametrize(
        "key",
        [
            "../secret.txt",
            "../../etc/x",
            "a/../../secret.txt",
            "/tmp/x",
            "a\\..\\..\\x",
            "..",
            "a/..",
            "./x",
            "a\x00/b",
            "C:\\x",
            ".polydatum/lock",
            ".polydatum/meta/x",
        ],
    )
    def test_escapes_write_nothing_anywhere(self, fs: FileSystemBlobStore, tmp_path: Path, key: str) -> None:
        """Escape attempts raise InvalidKey and change no file inside or outside the root."""
        fs.put("fine", b"ok")
        before = tree(tmp_path)
        for attempt in (lambda: fs.put(key, b"pwned"), lambda: fs.copy("fine", key), lambda: fs.delete(key)):
            with pytest.raises(InvalidKey):
                attempt()
        assert tree(tmp_path) == before

    @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(key=st.text(alphabet=st.sampled_from("ab./\\\x00:C~ \n"), min_size=0, max_size=12))
    def test_any_key_stays_inside_the_root(self, tmp_path: Path, key: str) -> None:
        """For any key, put either raises InvalidKey or writes one file inside the root."""
        root = tmp_path / "prop" / "root"
        store = FileSystemBlobStore(root)
        outside = tmp_path / "prop"
        before = {p for p in outside.rglob("*") if not str(p).startswith(str(root))}
        try:
            store.put(key, b"x")
        except InvalidKey:
            pass
        except BlobError:
            pass  # a/b vs a: refused, checked elsewhere
        else:
            target = (root / key).resolve()
            assert str(target).startswith(str(root.resolve()) + os.sep)
            assert target.read_bytes() == b"x"
            store.delete(key)
        after = {p for p in outside.rglob("*") if not str(p).startswith(str(root))}
        assert after == before

    def test_writes_and_deletes_never_follow_a_folder_link_out_of_the_root(
        self, fs: FileSystemBlobStore, tmp_path: Path
    ) -> None:
        """A folder inside root that links outside: reads follow it, writes and deletes are refused."""
        outside = tmp_path / "outside"
        outside.mkdir()
        (outside / "victim.txt").write_bytes(b"precious")
        fs.ping()
        os.symlink(outside, Path(fs.root) / "shared")
        assert fs.get("shared/victim.txt") == b"precious"
        fs.put("inside", b"x")
        for attempt in (
            lambda: fs.put("shared/evil.txt", b"pwned"),
            lambda: fs.copy("inside", "shared/evil.txt"),
            lambda: fs.delete("shared/victim.txt"),
        ):
            with pytest.raises(BlobError, match="symbolic link leading outside") as info:
                attempt()
            assert str(tmp_path) not in str(info.value)  # no server path in the message
        assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]

    def test_a_folder_link_inside_the_root_is_a_folder_of_the_store(self, fs: FileSystemBlobStore) -> None:
        """A link to another folder of the same root stays inside it: writes go through."""
        fs.put("real/a", b"a")
        os.symlink(Path(fs.root) / "real", Path(fs.root) / "alias")
        fs.put("alias/b", b"b")
        assert fs.get("real/b") == b"b"


class TestConcurrency:
    def test_concurrent_writers_never_tear_a_blob(self, fs: FileSystemBlobStore) -> None:
        """Eight threads rewriting one key while others read: every read is one whole write."""
        sizes = [MiB + 7 * i for i in range(8)]
        stop = threading.Event()
        torn: list[str] = []

        def writer(i: int) -> None:
            for _ in range(6):
                fs.put("hot/key", bytes([i]) * sizes[i], metadata={"writer": str(i)})

        def reader() -> None:
            while not stop.is_set():
                try:
                    data = fs.get("hot/key")
                except BlobError:
                    continue
                writer_id = data[0]
                if data != bytes([writer_id]) * sizes[writer_id]:
                    torn.append(f"{len(data)} bytes starting with {writer_id}")

        fs.put("hot/key", bytes([0]) * sizes[0], metadata={"writer": "0"})
        readers = [threading.Thread(target=reader) for _ in range(3)]
        for thread in readers:
            thread.start()
        try:
            with ThreadPoolExecutor(8) as pool:
                list(pool.map(writer, range(8)))
        finally:
            stop.set()
            for thread in readers:
                thread.join()
        assert torn == []
        final = fs.get("hot/key")
        # The metadata swapped in with the last complete write belongs to it.
        assert fs.stat("hot/key").metadata == {"writer": str(final[0])}
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []

    def test_concurrent_processes_never_tear_a_blob(self, fs: FileSystemBlobStore) -> None:
        """Three processes rewrite one key (with metadata) while this one reads: never torn."""
        script = textwrap.dedent(f"""
            import sys
            from polydatum.blob import FileSystemBlobStore
            store = FileSystemBlobStore({fs.root!r})
            writer = int(sys.argv[1])
            for _ in range(15):
                store.put("shared/key", bytes([writer]) * (512 * 1024 + writer),
                          metadata={{"writer": str(writer)}})
        """)
        fs.put("shared/key", bytes([0]) * (512 * 1024), metadata={"writer": "0"})
        writers = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in (1, 2, 3)]
        torn: list[str] = []
        try:
            while any(w.poll() is None for w in writers):
                data = fs.get("shared/key")
                if data != bytes([data[0]]) * (512 * 1024 + data[0]):
                    torn.append(f"{len(data)} bytes starting with {data[0]}")
        finally:
            for writer in writers:
                writer.wait(timeout=60)
        assert [w.returncode for w in writers] == [0, 0, 0]
        assert torn == []
        final = fs.get("shared/key")
        assert fs.stat("shared/key").metadata == {"writer": str(final[0])}
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []

    def test_a_failed_overwrite_in_a_context_leaves_no_temp_file(self, fs: FileSystemBlobStore) -> None:
        """Rolling back to the undo copy of the very same file leaves no spare link in .polydatum/tmp."""
        dm = DataManager()
        fs.install(dm)
        fs.put("doc.bin", b"version 1")

        def failing_upload() -> Iterator[bytes]:
            yield b"x" * 65536
            raise ConnectionError("client went away")

        for _ in range(3):
            with pytest.raises(ConnectionError), dm.context() as ctx:
                ctx.blobs.put("doc.bin", failing_upload())
        assert fs.get("doc.bin") == b"version 1"
        tmp = Path(fs.root) / ".polydatum" / "tmp"
        assert list(tmp.iterdir()) == []
        assert os.stat(fs._path("doc.bin")).st_nlink == 1

    def test_an_interrupted_write_leaves_no_temp_file(self, fs: FileSystemBlobStore) -> None:
        """A stream that fails mid-write leaves neither the blob nor a temporary file."""

        def broken() -> Iterator[bytes]:
            yield b"x" * MiB
            raise ConnectionResetError("client went away")

        with pytest.raises(ConnectionResetError):
            fs.put("half", broken())
        assert not fs.exists("half")
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []


class TestHealthAndSweep:
    def test_ping_creates_the_root(self, tmp_path: Path) -> None:
        """ping() on a missing root creates it and succeeds."""
        store = FileSystemBlobStore(tmp_path / "new" / "root")
        assert store.ping() is True
        assert (tmp_path / "new" / "root").is_dir()

    def test_ping_on_a_root_that_is_a_file(self, tmp_path: Path) -> None:
        """ping() is False; check() raises BlobStoreUnavailable naming a root that cannot be a folder."""
        (tmp_path / "file").write_bytes(b"")
        store = FileSystemBlobStore(tmp_path / "file")
        assert store.ping() is False
        with pytest.raises(BlobStoreUnavailable, match="cannot be created"):
            store.check()

    @pytest.mark.parametrize("where", ["root", "parent"])
    def test_reads_under_a_root_that_is_a_file_raise_unavailable(self, tmp_path: Path, where: str) -> None:
        """list() and exists() on a root that is (or is under) a regular file: unavailable, not empty."""
        (tmp_path / "file").write_bytes(b"")
        root = tmp_path / "file" if where == "root" else tmp_path / "file" / "blobs"
        store = FileSystemBlobStore(root)
        for attempt in (lambda: list(store.list()), lambda: store.exists("a")):
            with pytest.raises(BlobStoreUnavailable, match="root") as info:
                attempt()
            assert str(tmp_path) not in str(info.value)
        assert list(FileSystemBlobStore(tmp_path / "not-yet").list()) == []  # not created yet: empty

    def test_writes_under_a_broken_root_raise_unavailable(self, tmp_path: Path) -> None:
        """A write under a root that is a file raises BlobStoreUnavailable naming the key."""
        (tmp_path / "file").write_bytes(b"")
        store = FileSystemBlobStore(tmp_path / "file")
        with pytest.raises(BlobStoreUnavailable, match="'k'"):
            store.put("k", b"v")

    def test_sweep_removes_stale_temp_files(self, fs: FileSystemBlobStore) -> None:
        """Temporary files of writers that died are removed once past the grace period."""
        fs.ping()
        stale = Path(fs.root) / ".polydatum" / "tmp" / "dead.tmp"
        stale.write_bytes(b"partial")
        assert fs.sweep_orphans(lambda keys: keys) == []
        removed = fs.sweep_orphans(lambda keys: keys, older_than=datetime.timedelta(seconds=-60))
        assert removed == [".polydatum/tmp/dead.tmp"]
        assert not stale.exists()

    def test_sweep_keeps_referenced_blobs(self, fs: FileSystemBlobStore) -> None:
        """sweep_orphans deletes only what the callback does not claim, in batches."""
        for i in range(5):
            fs.put(f"s/{i}", b"x")
        calls: list[list[str]] = []

        def referenced(keys: list[str]) -> list[str]:
            calls.append(list(keys))
            return [k for k in keys if k.endswith(("1", "3"))]

        removed = fs.sweep_orphans(referenced, older_than=datetime.timedelta(seconds=-60), batch_size=2)
        assert removed == ["s/0", "s/2", "s/4"]
        assert [len(c) for c in calls] == [2, 2, 1]
        assert list(fs.list()) == ["s/1", "s/3"]

    def test_sweep_refuses_a_zero_batch(self, fs: FileSystemBlobStore) -> None:
        """batch_size must be positive."""
        with pytest.raises(ValueError, match="batch_size"):
            fs.sweep_orphans(lambda keys: keys, batch_size=0)


class TestDiskFaults:
    def test_a_symlink_loop_is_reported_as_unavailable(self, fs: FileSystemBlobStore) -> None:
        """An OS error other than 'missing' (here ELOOP) is BlobStoreUnavailable naming the key."""
        fs.put("ok", b"fine")
        os.symlink("loop", Path(fs.root) / "loop")
        operations = {
            "read": lambda: fs.get("loop"),
            "open": lambda: fs.open("loop"),
            "stat": lambda: fs.stat("loop"),
            "delete": lambda: fs.delete("loop/inner"),
            "copy": lambda: fs.copy("loop", "copy"),
        }
        for verb, operation in operations.items():
            with pytest.raises(BlobStoreUnavailable, match=rf"could not {verb} blob 'loop.*'") as info:
                operation()
            assert info.value.code == 503
            assert isinstance(info.value.__cause__, OSError)
        assert not fs.exists("copy")
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []

    def test_a_full_disk_fails_the_write_and_keeps_the_old_blob(self, tmp_path: Path) -> None:
        """When the disk refuses data (EFBIG here), put raises BlobStoreUnavailable, leaves no temp file."""
        # In a child process: RLIMIT_FSIZE makes every write past 1 MiB fail, like a full disk.
        script = textwrap.dedent(f"""
            import os, resource, signal
            from polydatum.blob import BlobStoreUnavailable, FileSystemBlobStore
            store = FileSystemBlobStore({str(tmp_path / "root")!r})
            store.put("big", b"old")
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * 1024, 1024 * 1024))
            try:
                store.put("big", b"x" * (3 * 1024 * 1024))
            except BlobStoreUnavailable as exc:
                print(exc)
            assert store.get("big") == b"old"
            assert os.listdir(os.path.join(store.root, ".polydatum", "tmp")) == []
        """)
        result = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, result.stderr
        assert "could not write blob 'big'" in result.stdout
        assert "File too large" in result.stdout

    def test_rollback_restores_a_symlinked_blob(self, fs: FileSystemBlobStore, tmp_path: Path) -> None:
        """A blob that is a symlink placed by hand: put replaces the link (never writes
        through it), and rollback puts the link back; the target is never touched."""
        outside = tmp_path / "shared.bin"
        outside.write_bytes(b"original")
        fs.ping()
        link = Path(fs.root) / "linked.bin"
        os.symlink(outside, link)
        dm = DataManager()
        fs.install(dm)

        def overwrite(fail: bool) -> None:
            with dm.context() as ctx:
                ctx.blobs.put("linked.bin", b"replacement")
                assert outside.read_bytes() == b"original"
                if fail:
                    raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError, match="rolled back"):
            overwrite(fail=True)
        assert link.is_symlink()
        assert fs.get("linked.bin") == b"original"
        assert list(fs.list()) == ["linked.bin"]
        overwrite(fail=False)
        assert not link.is_symlink()
        assert fs.get("linked.bin") == b"replacement"
        assert outside.read_bytes() == b"original"

    def test_a_read_only_folder_refuses_writes_and_deletes(self, fs: FileSystemBlobStore) -> None:
        """A folder this process cannot write: put and delete raise BlobStoreUnavailable, nothing changes."""
        fs.put("a/k", b"old")
        with read_only(Path(fs.root) / "a"):
            with pytest.raises(BlobStoreUnavailable, match=r"could not write blob 'a/k' under .*"):
                fs.put("a/k", b"new")
            with pytest.raises(BlobStoreUnavailable, match=r"could not delete blob 'a/k'"):
                fs.delete("a/k")
        assert fs.get("a/k") == b"old"
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []

    def test_a_read_only_metadata_folder(self, fs: FileSystemBlobStore) -> None:
        """When only the metadata cannot be written, the error says the content was replaced."""
        fs.put("a/k", b"old", metadata={"v": "1"})
        with (
            read_only(Path(fs.root) / ".polydatum" / "meta" / "a.d"),
            pytest.raises(
                BlobStoreUnavailable, match=r"metadata of blob 'a/k'.*content was replaced.*put it again"
            ),
        ):
            fs.put("a/k", b"new", metadata={"v": "2"})
        assert fs.get("a/k") == b"new"
        assert fs.stat("a/k").metadata == {"v": "1"}
        assert os.listdir(Path(fs.root) / ".polydatum" / "tmp") == []
        fs.put("a/k", b"new", metadata={"v": "2"})
        assert fs.stat("a/k").metadata == {"v": "2"}

    def test_a_damaged_metadata_sidecar(self, fs: FileSystemBlobStore) -> None:
        """A sidecar replaced by hand with a folder or with non-JSON fails as a BlobError naming the key."""
        fs.put("k", b"v", metadata={"m": "1"})
        sidecar = Path(fs.root) / ".polydatum" / "meta" / "k.json"
        sidecar.write_bytes(b"{not json")
        with pytest.raises(BlobError, match=r"metadata of blob 'k' is damaged.*put it again"):
            fs.stat("k")
        sidecar.unlink()
        sidecar.mkdir()
        operations = {
            "stat": lambda: fs.stat("k"),
            "copy": lambda: fs.copy("k", "k2"),
            "sweep": lambda: fs.sweep_orphans(lambda keys: [], older_than=datetime.timedelta(seconds=-60)),
            "delete": lambda: fs.delete("k"),  # last: the blob itself is gone by then
        }
        for name, operation in operations.items():
            with pytest.raises(BlobStoreUnavailable, match=r"blob 'k'") as info:
                operation()
            assert isinstance(info.value.__cause__, IsADirectoryError), name
        assert not fs.exists("k2")
        assert not fs.exists("k")
        sidecar.rmdir()
        fs.put("k", b"again", metadata={"m": "2"})
        assert fs.stat("k").metadata == {"m": "2"}

    def test_ping_on_a_read_only_root(self, fs: FileSystemBlobStore) -> None:
        """ping() is False and check() raises BlobStoreUnavailable when the root cannot be written."""
        assert fs.ping() is True
        with read_only(Path(fs.root)):
            assert fs.ping() is False
            with pytest.raises(BlobStoreUnavailable, match="is not writable by this process"):
                fs.check()
        assert fs.ping() is True
