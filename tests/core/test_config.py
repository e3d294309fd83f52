"""polydatum.config: Config and from_module, as in polydatum 1.0."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

import polydatum
from polydatum.config import Config, from_module


@pytest.fixture(name="settings_module")
def _settings_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A real importable module of settings, under a unique name."""
    name = f"polydatum_test_settings_{uuid.uuid4().hex}"
    (tmp_path / f"{name}.py").write_text(
        "DATABASE_URL = 'sqlite:///app.db'\n"
        "DEBUG = False\n"
        "POOL_SIZE = 5\n"
        "lower_case = 'ignored'\n"
        "_PRIVATE_lower = 'ignored'\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


class TestConfig:
    def test_keys_read_as_attributes(self) -> None:
        """Every key of the mapping becomes an attribute."""
        config = Config({"DATABASE_URL": "sqlite://", "debug": True})
        assert config.DATABASE_URL == "sqlite://"
        assert config.debug is True

    def test_keys_cannot_be_changed(self) -> None:
        """Setting a key (new or existing) raises KeyError, as in 1.0, naming it."""
        config = Config({"DEBUG": False})
        with pytest.raises(KeyError, match="DEBUG"):
            config.DEBUG = True
        with pytest.raises(KeyError, match="NEW"):
            config.NEW = 1
        assert config.DEBUG is False
        assert not hasattr(config, "NEW")

    def test_get_with_default(self) -> None:
        """get() returns the value, None, or the default."""
        config = Config({"A": 1})
        assert config.get("A") == 1
        assert config.get("B") is None
        assert config.get("B", 2) == 2

    def test_require(self) -> None:
        """require() returns a configured value."""
        assert Config({"A": "x"}).require("A") == "x"

    @pytest.mark.parametrize("opts", [{}, {"A": ""}, {"A": None}, {"A": 0}])
    def test_require_refuses_missing_or_empty(self, opts: dict[str, object]) -> None:
        """require() raises ValueError saying the key is not configured."""
        with pytest.raises(ValueError, match='"A" has not been configured'):
            Config(opts).require("A")

    def test_items_yields_upper_case_keys_only(self) -> None:
        """items() yields the UPPER_CASE keys (module settings style), sorted by name."""
        config = Config({"B": 2, "A": 1, "lower": 3, "Mixed": 4})
        assert list(config.items()) == [("A", 1), ("B", 2)]

    def test_empty(self) -> None:
        """Config() and Config(None) have no items."""
        assert list(Config().items()) == []
        assert list(Config(None).items()) == []

    def test_str_is_json_and_repr_names_class(self) -> None:
        """str() is JSON of the items; repr() names the class and shows them."""
        config = Config({"A": 1})
        assert str(config) == '{\n  "A": 1\n}'
        assert repr(config) == '<Config {\n  "A": 1\n}>'

    def test_str_with_non_json_values(self) -> None:
        """Values JSON cannot encode still print (as their str)."""
        path = Path("/srv/data")
        assert "/srv/data" in str(Config({"ROOT": path}))

    def test_importable_from_package(self) -> None:
        """Config is also exported from polydatum."""
        assert polydatum.Config is Config


class TestFromModule:
    def test_loads_upper_case_names(self, settings_module: str) -> None:
        """from_module imports a module and keeps its UPPER_CASE names."""
        config = from_module(settings_module)
        assert isinstance(config, Config)
        assert config.DATABASE_URL == "sqlite:///app.db"
        assert config.DEBUG is False
        assert config.POOL_SIZE == 5
        assert dict(config.items()) == {
            "DATABASE_URL": "sqlite:///app.db",
            "DEBUG": False,
            "POOL_SIZE": 5,
        }

    def test_ignores_other_names(self, settings_module: str) -> None:
        """Lower-case and mixed-case names of the module are not loaded."""
        config = from_module(settings_module)
        assert config.get("lower_case") is None
        assert config.get("_PRIVATE_lower") is None

    def test_missing_module_raises_import_error(self) -> None:
        """An unknown module name raises ModuleNotFoundError."""
        with pytest.raises(ModuleNotFoundError):
            from_module(f"no_such_settings_{uuid.uuid4().hex}")
