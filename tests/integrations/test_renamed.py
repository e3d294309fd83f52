"""Names renamed in the 2.0 cycle: the new spelling is exported, the old one still works and warns."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from celery import Celery

import polydatum.asgi
import polydatum.celery
import polydatum.werkzeug
from polydatum import DataManager
from polydatum.blob import MemoryBlobStore
from polydatum.documents import Documents
from polydatum.outbox import Outbox
from polydatum.recorder import Recorder
from polydatum.sqlalchemy import AsyncDatabase, Database, Dataset

pytestmark = pytest.mark.filterwarnings("error")


class TestWebModuleAliases:
    """polydatum.werkzeug and polydatum.asgi keep their 2.0 development names as deprecated aliases."""

    @pytest.mark.parametrize(
        ("module", "old", "new"),
        [
            (polydatum.werkzeug, "PolydatumMiddleware", "PolydatumWSGIMiddleware"),
            (polydatum.werkzeug, "current_context", "request_context"),
            (polydatum.asgi, "PolydatumMiddleware", "PolydatumASGIMiddleware"),
            (polydatum.asgi, "current_context", "request_context"),
        ],
    )
    def test_old_name_warns_and_is_the_new_object(self, module: Any, old: str, new: str) -> None:
        """The old attribute is the new object, with a DeprecationWarning naming the replacement."""
        with pytest.warns(
            DeprecationWarning, match=rf"{module.__name__}\.{old} is deprecated.*use .*\.{new}"
        ):
            value = getattr(module, old)
        assert value is getattr(module, new)
        assert old not in module.__all__

    def test_old_import_spelling_still_works(self) -> None:
        """``from polydatum.werkzeug import PolydatumMiddleware`` still imports, with a warning."""
        with pytest.warns(DeprecationWarning, match="PolydatumWSGIMiddleware"):
            from polydatum.werkzeug import PolydatumMiddleware
        assert PolydatumMiddleware is polydatum.werkzeug.PolydatumWSGIMiddleware

    def test_an_unknown_name_is_still_an_attribute_error(self) -> None:
        """A name that never existed raises AttributeError naming the module, as without the aliases."""
        with pytest.raises(AttributeError, match=r"module 'polydatum.asgi' has no attribute 'Nope'"):
            _ = polydatum.asgi.Nope  # type: ignore[attr-defined]


def _installs(tmp_path: Path) -> list[tuple[str, Any, dict[str, Any]]]:
    """(name, bound install, extra keywords) for each install whose first parameter was ``data_manager``."""
    db = Database(f"sqlite:///{tmp_path / 'a.db'}")
    return [
        ("Database", db.install, {}),
        ("AsyncDatabase", AsyncDatabase(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}").install, {}),
        ("Dataset", Dataset(":memory:").install, {}),
        ("Recorder", Recorder().install, {}),
    ]


class TestInstallKeyword:
    """install(dm, ...) is the one spelling; the development keyword data_manager= still works and warns."""

    @pytest.mark.parametrize("which", ["Database", "AsyncDatabase", "Dataset", "Recorder"])
    def test_data_manager_keyword_warns_and_installs(self, tmp_path: Path, which: str) -> None:
        """install(data_manager=dm) registers as install(dm) does, with a DeprecationWarning naming dm=."""
        name, install, extra = next(i for i in _installs(tmp_path) if i[0] == which)
        dm = DataManager()
        with pytest.warns(
            DeprecationWarning, match=r"install\(data_manager=\.\.\.\) is deprecated.*pass dm="
        ):
            returned = install(data_manager=dm, **extra)
        assert returned is install.__self__
        if name == "Recorder":
            returned.uninstall()  # it listens process-wide
        else:
            assert list(dm.resource_manager)

    def test_outbox_and_documents_accept_the_old_keyword(self, tmp_path: Path) -> None:
        """Outbox.install and Documents.install also take data_manager= with a warning."""
        db = Database(f"sqlite:///{tmp_path / 'a.db'}")
        dm = DataManager()
        db.install(dm)
        with pytest.warns(DeprecationWarning, match="pass dm="):
            outbox = Outbox(db).install(data_manager=dm)
        with pytest.warns(DeprecationWarning, match="pass dm="):
            docs = Documents(db).install(data_manager=dm)
        assert isinstance(outbox, Outbox)
        assert isinstance(docs, Documents)
        assert {"outbox", "docs"} <= set(dm.resource_manager)
        db.dispose()

    def test_celery_install_accepts_the_old_keyword(self) -> None:
        """polydatum.celery.install(app, data_manager=dm) still wires the app, with a warning."""
        app = Celery("renamed", set_as_current=False)
        dm = DataManager()
        with pytest.warns(DeprecationWarning, match="pass dm="):
            base = polydatum.celery.install(app, data_manager=dm)
        assert app.Task is base

    def test_both_spellings_at_once_are_refused(self) -> None:
        """Passing dm= and data_manager= together is a TypeError naming both."""
        with pytest.raises(TypeError, match=r"got both dm= and its old name data_manager="):
            Database("sqlite://").install(dm=DataManager(), data_manager=DataManager())  # type: ignore[call-arg]

    @pytest.mark.parametrize("which", ["Database", "AsyncDatabase", "Dataset", "MemoryBlobStore"])
    def test_the_name_is_keyword_only(self, tmp_path: Path, which: str) -> None:
        """install(dm, "name") is a TypeError: the name is passed as name=, as in every integration."""
        installs = {name: install for name, install, _ in _installs(tmp_path)}
        installs["MemoryBlobStore"] = MemoryBlobStore().install
        with pytest.raises(TypeError, match="positional argument"):
            installs[which](DataManager(), "x")

    def test_blob_install_returns_the_store(self) -> None:
        """BlobStore.install returns the store, like every other install."""
        store = MemoryBlobStore()
        assert store.install(DataManager()) is store
