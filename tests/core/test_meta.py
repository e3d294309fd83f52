"""Meta is a read-only mapping built from a dict (docs/concepts/meta.md)."""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import pytest

from polydatum import DataManager, Meta


@pytest.fixture(name="meta")
def _meta() -> Meta:
    return Meta({"user": "ann", "request_id": "r-1", "empty": ""})


class TestReading:
    def test_attribute_reads_the_value(self, meta: Meta) -> None:
        """meta.user returns the value passed in."""
        assert meta.user == "ann"
        assert meta.request_id == "r-1"

    def test_absent_attribute_is_none(self, meta: Meta) -> None:
        """An absent key reads as None instead of raising AttributeError."""
        assert meta.tz is None

    def test_item_access(self, meta: Meta) -> None:
        """meta["user"] is the value; an absent key raises KeyError like a dict."""
        assert meta["user"] == "ann"
        with pytest.raises(KeyError):
            meta["tz"]

    def test_get_with_default(self, meta: Meta) -> None:
        """get() returns the value, None, or the given default."""
        assert meta.get("user") == "ann"
        assert meta.get("tz") is None
        assert meta.get("tz", "UTC") == "UTC"

    def test_require_returns_value(self, meta: Meta) -> None:
        """require() returns a present, non-empty value."""
        assert meta.require("user") == "ann"

    @pytest.mark.parametrize("key", ["empty", "absent"])
    def test_require_refuses_empty_or_absent(self, meta: Meta, key: str) -> None:
        """require() raises ValueError naming the key and how to pass it."""
        with pytest.raises(ValueError, match=repr(key)) as info:
            meta.require(key)
        assert "dm.context(meta=" in str(info.value)

    def test_items_in_iteration_len(self, meta: Meta) -> None:
        """Meta behaves like a read-only Mapping: items, in, iteration, len."""
        assert isinstance(meta, Mapping)
        assert dict(meta.items()) == {"user": "ann", "request_id": "r-1", "empty": ""}
        assert "user" in meta
        assert "tz" not in meta
        assert list(meta) == ["user", "request_id", "empty"]
        assert len(meta) == 3
        assert sorted(meta.keys()) == ["empty", "request_id", "user"]

    def test_built_from_dict_is_a_copy(self) -> None:
        """Changing the source dict later does not change the Meta."""
        source = {"user": "ann"}
        meta = Meta(source)
        source["user"] = "bob"
        source["extra"] = 1
        assert meta.user == "ann"
        assert "extra" not in meta

    def test_empty_meta(self) -> None:
        """Meta() and Meta(None) are empty."""
        assert len(Meta()) == 0
        assert len(Meta(None)) == 0
        assert Meta().user is None

    def test_dunder_lookups_are_not_keys(self) -> None:
        """Dunder names raise AttributeError, so copy/pickle protocols are not fooled."""
        with pytest.raises(AttributeError):
            Meta({"__x__": 1}).__x__

    def test_pickle_round_trip(self, meta: Meta) -> None:
        """A Meta survives pickling (for task queues) with its values."""
        copy = pickle.loads(pickle.dumps(meta))
        assert isinstance(copy, Meta)
        assert dict(copy) == dict(meta)

    def test_str_and_repr_show_values(self, meta: Meta) -> None:
        """str() is JSON of the values; repr() names the class."""
        assert '"user": "ann"' in str(meta)
        assert repr(meta).startswith("<Meta ")
        assert "'ann'" in repr(meta)


class TestReadOnly:
    def test_setting_an_attribute_raises(self, meta: Meta) -> None:
        """meta.user = ... raises AttributeError and changes nothing."""
        with pytest.raises(AttributeError, match="read-only"):
            meta.user = "bob"
        with pytest.raises(AttributeError):
            meta.new_key = 1
        assert meta.user == "ann"
        assert "new_key" not in meta

    def test_deleting_an_attribute_raises(self, meta: Meta) -> None:
        """del meta.user raises AttributeError and changes nothing."""
        with pytest.raises(AttributeError, match="read-only"):
            del meta.user
        assert meta.user == "ann"

    def test_setting_an_item_raises(self, meta: Meta) -> None:
        """meta["user"] = ... raises TypeError."""
        with pytest.raises(TypeError):
            meta["user"] = "bob"  # type: ignore[index]
        assert meta["user"] == "ann"

    def test_deleting_an_item_raises(self, meta: Meta) -> None:
        """del meta["user"] raises TypeError."""
        with pytest.raises(TypeError):
            del meta["user"]  # type: ignore[attr-defined]
        assert meta["user"] == "ann"

    def test_no_mutating_dict_methods(self, meta: Meta) -> None:
        """Meta has no update/pop/clear/setdefault."""
        for name in ("update", "pop", "clear", "setdefault", "popitem"):
            assert not hasattr(type(meta), name), name

    def test_internal_values_cannot_be_rebound(self, meta: Meta) -> None:
        """Even the private storage cannot be replaced by attribute assignment."""
        with pytest.raises(AttributeError):
            meta._values = {}
        assert meta.user == "ann"


class TestOnContexts:
    def test_context_meta_from_dict(self) -> None:
        """dm.context(meta=dict) exposes it as ctx.meta, a Meta."""
        dm = DataManager()
        with dm.context({"user": "ann"}) as ctx:
            assert isinstance(ctx.meta, Meta)
            assert ctx.meta.user == "ann"
            assert ctx.meta["user"] == "ann"

    @pytest.mark.parametrize("bad", ["abc", 5, [1, 2]])
    def test_meta_that_is_not_a_mapping_says_so(self, bad: Any) -> None:
        """dm.context("abc") is a TypeError naming meta (it was dict()'s "update sequence element")."""
        with pytest.raises(TypeError, match=f"meta must be a mapping .*got {type(bad).__name__}"):
            DataManager().context(bad)

    def test_context_without_meta_has_empty_meta(self) -> None:
        """dm.context() has an empty Meta whose attributes read as None."""
        dm = DataManager()
        with dm.context() as ctx:
            assert isinstance(ctx.meta, Meta)
            assert len(ctx.meta) == 0
            assert ctx.meta.user is None

    def test_meta_instance_is_kept(self) -> None:
        """A Meta passed in is used as is."""
        dm = DataManager()
        meta = Meta({"user": "ann"})
        with dm.context(meta) as ctx:
            assert ctx.meta is meta

    def test_context_meta_is_read_only(self) -> None:
        """Meta of a live context cannot be changed."""
        dm = DataManager()
        with dm.context({"user": "ann"}) as ctx:
            with pytest.raises(AttributeError):
                ctx.meta.user = "bob"
            assert ctx.meta.user == "ann"
