"""One vocabulary across the integrations: ``install(dm)`` returns the object, ``ping()`` a bool."""

from __future__ import annotations

from typing_extensions import assert_type

from polydatum import DataManager, ResourceRegistry
from polydatum.blob import FileSystemBlobStore, MemoryBlobStore
from polydatum.sqlalchemy import AsyncDatabase, Database, Dataset


def installs_return_the_object(dm: DataManager) -> None:
    assert_type(Database("sqlite://").install(dm), Database)
    assert_type(Dataset(":memory:").install(dm), Dataset)
    assert_type(AsyncDatabase("sqlite+aiosqlite://").install(dm), AsyncDatabase)
    assert_type(MemoryBlobStore().install(dm), MemoryBlobStore)
    assert_type(FileSystemBlobStore("blobs").install(dm, name="files"), FileSystemBlobStore)


def a_data_manager_is_a_registry(dm: DataManager) -> ResourceRegistry:
    return dm


def a_registry_is_what_install_needs(registry: ResourceRegistry) -> None:
    Database("sqlite://").install(registry)
    MemoryBlobStore().install(registry)
    Database("sqlite://").install(object())  # type: ignore[arg-type]  # pyright: ignore[reportArgumentType]
    Database("sqlite://").install(registry, "db")  # type: ignore[call-arg]  # pyright: ignore[reportCallIssue]


async def pings_are_bools(db: Database, adb: AsyncDatabase, blobs: MemoryBlobStore) -> None:
    assert_type(db.ping(), bool)
    assert_type(await adb.ping(), bool)
    assert_type(blobs.ping(), bool)
