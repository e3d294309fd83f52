"""The notes services tested through the DAL with polydatum's pytest plugin.

The plugin's fixtures only need the DataManager (``polydatum_data_manager``).
``polydatum_db`` runs each test inside one SQL transaction that is rolled
back afterwards, ``polydatum_meta`` says who the test acts as, and
``polydatum_dal`` is the DAL of a context open for the whole test. The
cache is not part of the SQL transaction, so it is cleared after each test.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import pytest
from notes import NotesApp, Settings, build
from notes.auth import Forbidden, Unauthorized
from notes.services import words_of

from polydatum import DataManager
from polydatum.errors import ConcurrencyConflict, NotFound


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotesApp]:
    notes = build(Settings.from_env({"NOTES_DATA": str(tmp_path_factory.mktemp("notes"))}))
    notes.create_tables()
    yield notes
    notes.close()


@pytest.fixture
def polydatum_data_manager(app: NotesApp) -> Iterator[DataManager]:
    yield app.dm
    app.cache.clear()  # cached counts would outlive the rolled-back rows


@pytest.fixture
def user(polydatum_db: list[Any], polydatum_data_manager: DataManager) -> dict[str, Any]:
    with polydatum_data_manager.dal() as dal:
        return dict(dal.users.sign_up("tess"))


@pytest.fixture
def polydatum_meta(user: dict[str, Any]) -> Mapping[str, Any]:
    return {"user": user["id"]}


@pytest.mark.parametrize("run", ["first", "second"])
def test_every_test_starts_from_an_empty_database(polydatum_dal: Any, user: dict[str, Any], run: str) -> None:
    # The same name both times: the first run's user was rolled back.
    assert user["name"] == "tess"
    assert polydatum_dal.notebooks.mine() == []
    inbox = polydatum_dal.notebooks.add("inbox")
    polydatum_dal.notes.add(inbox["id"], f"{run} note")
    assert polydatum_dal.users.profile(user["id"])["note_count"] == 1


def test_a_stale_edit_raises_a_conflict(polydatum_dal: Any) -> None:
    inbox = polydatum_dal.notebooks.add("inbox")
    note = polydatum_dal.notes.add(inbox["id"], "draft", "v1")
    polydatum_dal.notes.edit(note["id"], version=1, text="v2")
    with pytest.raises(ConcurrencyConflict, match="is at version 2, not 1"):
        polydatum_dal.notes.edit(note["id"], version=1, text="v3")


def test_the_auth_middleware_guards_direct_dal_calls(
    polydatum_dal: Any, polydatum_data_manager: DataManager
) -> None:
    inbox = polydatum_dal.notebooks.add("inbox")
    note = polydatum_dal.notes.add(inbox["id"], "mine")
    with pytest.raises(Unauthorized), polydatum_data_manager.dal() as anonymous:
        anonymous.notes.read(note["id"])
    with polydatum_data_manager.dal() as dal:
        other = dal.users.sign_up("someone else")
    with pytest.raises(NotFound), polydatum_data_manager.dal(meta={"user": other["id"]}) as dal:
        dal.notes.read(note["id"])
    # The id is found by name too: passing it as a keyword does not skip the check.
    with pytest.raises(NotFound), polydatum_data_manager.dal(meta={"user": other["id"]}) as dal:
        dal.notes.edit(version=1, text="hijacked", note_id=note["id"])
    assert polydatum_dal.notes.read(note_id=note["id"])["title"] == "mine"


def test_words_are_lower_cased_and_counted() -> None:
    assert words_of("It's a dog's day: DOG, dog; a cat.") == {
        "it's": 1,
        "dog's": 1,
        "day": 1,
        "dog": 2,
        "cat": 1,
    }


def test_a_cached_count_is_refused_to_another_user(
    polydatum_dal: Any, polydatum_data_manager: DataManager, user: dict[str, Any], app: NotesApp
) -> None:
    """Once a user's note count is cached, another user asking for it through the DAL is refused."""
    inbox = polydatum_dal.notebooks.add("inbox")
    polydatum_dal.notes.add(inbox["id"], "mine")
    with polydatum_data_manager.dal(meta={"user": user["id"]}) as dal:
        assert dal.notes.count_for(user["id"]) == 1
        other = dal.users.sign_up("someone else")
    assert app.cache.get(f"count:{user['id']}") is not None  # what a check in the body would miss
    as_other = {"user": other["id"]}
    refused = "count_for is only for your own account"
    with pytest.raises(Forbidden, match=refused), polydatum_data_manager.dal(meta=as_other) as dal:
        dal.notes.count_for(user["id"])
    with pytest.raises(Forbidden, match=refused), polydatum_data_manager.dal(meta=as_other) as dal:
        dal.notes.count_for(user_id=user["id"])  # by name: no way around the check
    with (
        pytest.raises(Forbidden, match="profile is only for your own account"),
        polydatum_data_manager.dal(meta=as_other) as dal,
    ):
        dal.users.profile(user["id"])
    with pytest.raises(Unauthorized), polydatum_data_manager.dal() as anonymous:
        anonymous.notes.count_for(user["id"])
    with polydatum_data_manager.dal(meta=as_other) as dal:
        assert dal.notes.count_for(other["id"]) == 0
