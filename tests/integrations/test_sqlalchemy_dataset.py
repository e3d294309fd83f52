"""Dataset: a SQLite file shipped with the application, opened read-only."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import Connection, String, insert, text
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from polydatum import DataManager
from polydatum.context import DataAccessContext
from polydatum.sqlalchemy import Dataset, ReadOnlyError, Store


class GeoBase(DeclarativeBase):
    pass


class Country(GeoBase):
    __tablename__ = "countries"

    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str]


class Countries(Store[Country]):
    database = "geo"


def make_file(path: Path) -> Path:
    """A small countries database written with the stdlib, as a build step would."""
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE countries (code VARCHAR(2) PRIMARY KEY, name VARCHAR NOT NULL)")
        conn.executemany(
            "INSERT INTO countries VALUES (?, ?)", [("fr", "France"), ("de", "Germany"), ("jp", "Japan")]
        )
    conn.close()
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_chars() -> int:
    """Bytes this process has read through read()/pread() so far (Linux)."""
    fields = dict(line.split(": ") for line in Path("/proc/self/io").read_text().splitlines())
    return int(fields["rchar"])


def wire(dataset: Dataset) -> DataManager:
    dm = DataManager()
    dataset.install(dm, name="geo")
    dm.register_services(countries=Countries())
    return dm


def fails(dm: DataManager, body: Callable[[DataAccessContext], object]) -> None:
    """Run ``body`` in a context and expect ReadOnlyError saying why."""
    with pytest.raises(ReadOnlyError, match="read-only"), dm.context() as ctx:
        body(ctx)


class TestFile:
    def test_reads_through_a_store(self, tmp_path: Path) -> None:
        """A Store over a Dataset reads, filters and counts rows."""
        dm = wire(Dataset(make_file(tmp_path / "geo.sqlite")))
        with dm.dal() as dal:
            assert dal.countries.require("jp").name == "Japan"
            assert [c.code for c in dal.countries.search(order_by="name")] == ["fr", "de", "jp"]
            assert dal.countries.count({"name__startswith": "G"}) == 1

    def test_every_kind_of_write_is_refused_and_the_file_is_untouched(self, tmp_path: Path) -> None:
        """ORM writes, raw INSERTs, DDL and PRAGMAs raise ReadOnlyError; the bytes never change."""
        path = make_file(tmp_path / "geo.sqlite")
        before = digest(path)
        dataset = Dataset(path)
        dm = wire(dataset)
        fails(dm, lambda ctx: ctx.dal.countries.create(code="it", name="Italy"))
        fails(dm, lambda ctx: ctx.dal.countries.update("fr", name="République"))
        fails(dm, lambda ctx: ctx.dal.countries.delete("de"))
        fails(dm, lambda ctx: ctx.geo.execute(insert(Country).values(code="es", name="Spain")))
        fails(dm, lambda ctx: ctx.geo.execute(text("CREATE TABLE t (x INTEGER)")))
        fails(dm, lambda ctx: ctx.geo.execute(text("PRAGMA user_version = 7")))
        with dataset.engine.connect() as conn, pytest.raises(ReadOnlyError):
            conn.execute(text("DELETE FROM countries"))
        with dm.dal() as dal:
            assert dal.countries.count() == 3
        dataset.dispose()
        assert digest(path) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == ["geo.sqlite"]

    @pytest.mark.parametrize(
        ("statement", "in_context"),
        [
            ("ATTACH DATABASE '{path}' AS extra", "refuses ATTACH"),
            # SQLite itself refuses VACUUM inside the context's transaction.
            ("VACUUM INTO '{path}'", "cannot VACUUM from within a transaction"),
            ("SELECT load_extension('{path}')", "refuses ATTACH"),
        ],
    )
    def test_statements_reaching_other_files_are_refused(
        self, tmp_path: Path, statement: str, in_context: str
    ) -> None:
        """ATTACH, VACUUM INTO and load_extension raise ReadOnlyError and create no file."""
        dataset = Dataset(make_file(tmp_path / "geo.sqlite"))
        dm = wire(dataset)
        target = tmp_path / "elsewhere.db"
        with pytest.raises((DatabaseError, ReadOnlyError), match=in_context) as refused, dm.context() as ctx:
            ctx.geo.execute(text(statement.format(path=target)))
        assert str(tmp_path) not in str(refused.value).split("[SQL:")[0]  # no server path
        # Outside a transaction too (VACUUM refuses to run inside one anyway).
        with dataset.engine.connect() as conn, pytest.raises(ReadOnlyError, match="refuses ATTACH"):
            conn.execution_options(isolation_level="AUTOCOMMIT").execute(text(statement.format(path=target)))
        assert not target.exists()
        dataset.dispose()

    def test_a_refused_attach_leaves_the_next_context_clean(self, tmp_path: Path) -> None:
        """After a refused ATTACH and DETACH, the pooled connection has only its own database."""
        dataset = Dataset(make_file(tmp_path / "geo.sqlite"))
        dm = wire(dataset)
        for statement in (f"ATTACH DATABASE '{tmp_path / 'x.db'}' AS x", "DETACH DATABASE x"):
            with pytest.raises(ReadOnlyError, match="refuses ATTACH"), dm.context() as ctx:
                ctx.geo.execute(text(statement))
        with dm.context() as ctx:
            listed = ctx.geo.execute(text("PRAGMA database_list")).all()
            assert [row[1] for row in listed] == ["main"]
            assert ctx.dal.countries.count() == 3
        assert dataset.engine.pool.checkedin() == 1  # the same pooled connection both times
        dataset.dispose()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["geo.sqlite"]

    def test_file_is_opened_lazily(self, tmp_path: Path) -> None:
        """Creating and installing a Dataset opens no connection until a context reads."""
        dataset = Dataset(make_file(tmp_path / "geo.sqlite"))
        dm = wire(dataset)
        with dm.context():
            pass
        assert dataset.engine.pool.checkedin() == 0
        with dm.dal() as dal:
            dal.countries.get("fr")
        assert dataset.engine.pool.checkedin() == 1

    @pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
    def test_a_lookup_reads_pages_not_the_whole_file(self, tmp_path: Path) -> None:
        """A primary-key lookup in a 16 MiB dataset reads a few pages, never the whole file."""
        path = tmp_path / "big.sqlite"
        with sqlite3.connect(path) as conn:
            conn.execute("CREATE TABLE countries (code VARCHAR PRIMARY KEY, name VARCHAR NOT NULL)")
            conn.executemany(
                "INSERT INTO countries VALUES (?, ?)", ((f"{i:05d}", "x" * 1000) for i in range(16 * 1024))
            )
        conn.close()
        size = path.stat().st_size
        assert size > 16 * 1024 * 1024
        dm = wire(Dataset(path))
        before = read_chars()
        with dm.dal() as dal:
            assert dal.countries.require("12345").name == "x" * 1000
        read = read_chars() - before
        assert read < size / 32, f"read {read} bytes of a {size}-byte file"

    def test_wal_file_is_read_and_never_written(self, tmp_path: Path) -> None:
        """A file left in WAL mode is readable and unchanged; immutable=True adds no -wal/-shm files."""
        path = make_file(tmp_path / "geo.sqlite")
        with sqlite3.connect(path) as conn:
            conn.execute("PRAGMA journal_mode=WAL")
        conn.close()
        before = digest(path)
        dataset = Dataset(path, immutable=True)
        with wire(dataset).dal() as dal:
            assert dal.countries.count() == 3
        dataset.dispose()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["geo.sqlite"]
        dataset = Dataset(path)
        dm = wire(dataset)
        with dm.dal() as dal:
            assert dal.countries.count() == 3
        fails(dm, lambda ctx: ctx.dal.countries.create(code="it", name="Italy"))
        dataset.dispose()
        assert digest(path) == before

    def test_awkward_paths_work(self, tmp_path: Path) -> None:
        """A path with spaces, '?', '#' and '%' is quoted for SQLite's URI syntax."""
        folder = tmp_path / "data 100% ?#"
        folder.mkdir()
        dm = wire(Dataset(make_file(folder / "geo.sqlite")))
        with dm.dal() as dal:
            assert dal.countries.count() == 3

    def test_immutable_file(self, tmp_path: Path) -> None:
        """immutable=True reads the file without locking it."""
        path = make_file(tmp_path / "geo.sqlite")
        dm = wire(Dataset(path, immutable=True))
        with dm.dal() as dal:
            assert dal.countries.require("de").name == "Germany"
        assert "immutable=1" in str(Dataset(path, immutable=True).url)

    def test_missing_file_is_refused_up_front(self, tmp_path: Path) -> None:
        """A path that does not exist raises FileNotFoundError naming it, at construction."""
        with pytest.raises(FileNotFoundError, match=r"nope\.sqlite.*ship the file"):
            Dataset(tmp_path / "nope.sqlite")

    def test_a_folder_is_refused_up_front(self, tmp_path: Path) -> None:
        """A folder given as the dataset path raises IsADirectoryError saying to pass the file."""
        with pytest.raises(IsADirectoryError, match="is a folder; pass the SQLite file"):
            Dataset(tmp_path)

    def test_a_file_that_is_not_sqlite_fails_at_first_read(self, tmp_path: Path) -> None:
        """A file that is not a SQLite database raises SQLAlchemy's DatabaseError when first read."""
        path = tmp_path / "notes.txt"
        path.write_text("not a database\n" * 100)
        before = digest(path)
        dm = wire(Dataset(path))
        with pytest.raises(DatabaseError, match="not a database"), dm.dal() as dal:
            dal.countries.count()
        assert digest(path) == before

    def test_populate_is_only_for_memory(self, tmp_path: Path) -> None:
        """populate= with a file raises TypeError: the file is never written."""
        path = make_file(tmp_path / "geo.sqlite")
        with pytest.raises(TypeError, match="only for Dataset"):
            Dataset(path, populate=lambda conn: None)

    @pytest.mark.parametrize("kwargs", [{"read_only": False}, {"transaction": True}])
    def test_writable_install_is_refused(self, tmp_path: Path, kwargs: dict[str, bool]) -> None:
        """install(read_only=False) or install(transaction=True) raises ValueError saying why."""
        dataset = Dataset(make_file(tmp_path / "geo.sqlite"))
        with pytest.raises(ValueError, match="always read-only"):
            dataset.install(DataManager(), **kwargs)
        with pytest.raises(ValueError, match="always read-only"):
            dataset.session(read_only=False)

    def test_own_session_is_read_only(self, tmp_path: Path) -> None:
        """Dataset.session() is read-only too."""
        dataset = Dataset(make_file(tmp_path / "geo.sqlite"))
        with dataset.session() as session:
            session.add(Country(code="it", name="Italy"))
            with pytest.raises(ReadOnlyError):
                session.flush()


def fill(conn: Connection) -> None:
    GeoBase.metadata.create_all(conn)
    conn.execute(insert(Country), [{"code": "fr", "name": "France"}])


class TestMemory:
    def test_memory_dataset_is_filled_then_read_only(self) -> None:
        """Dataset(':memory:', populate=...) is readable from every context and refuses writes."""
        dataset = Dataset(":memory:", populate=fill)
        dm = wire(dataset)
        with dm.dal() as dal:
            assert dal.countries.require("fr").name == "France"
        fails(dm, lambda ctx: ctx.dal.countries.create(code="it", name="Italy"))
        fails(dm, lambda ctx: ctx.geo.execute(insert(Country).values(code="es", name="Spain")))
        with dm.dal() as dal:
            assert dal.countries.count() == 1
        assert dataset.path is None

    def test_memory_dataset_refuses_attach(self, tmp_path: Path) -> None:
        """A Dataset(':memory:') refuses ATTACH too, and no file appears."""
        dm = wire(Dataset(":memory:", populate=fill))
        target = tmp_path / "elsewhere.db"
        with pytest.raises(ReadOnlyError, match="refuses ATTACH"), dm.context() as ctx:
            ctx.geo.execute(text(f"ATTACH DATABASE '{target}' AS extra"))
        assert not target.exists()
