"""The documentation's Python blocks run, in order, as written.

Every ```python block of a page is executed in one namespace per page, so a
tutorial can build on its earlier steps. Blocks that only show shapes, or
need the reader's own package (``myapp``), use ```py, ```text or another
tag and are not run.

Which pages run:

- ``README.md``, ``docs/*.md`` and ``docs/concepts/*.md``: always.
- ``docs/integrations/*.md``: only a page whose **first line** opts in with
  ``<!-- test -->``, or ``<!-- test: postgres redis s3 -->`` naming the real
  servers it needs. Before the page runs, each need is provided through
  environment variables (see ``NEEDS``), so the page reads its configuration
  the way an application does::

      REDIS_URL = os.environ["REDIS_URL"]   # e.g. "redis://cache.internal:6379/0"

Every page runs in a fresh temporary working directory (relative paths such
as ``FileSystemBlobStore("blobs")`` land there) with the environment restored
afterwards; the SQLAlchemy engines and polydatum ``Database`` objects it
leaves behind are disposed.
"""

from __future__ import annotations

import contextlib
import re
import sys
import types
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.s3 import REGION
from tests.support.s3 import moto_server_fixture as moto_server_fixture

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
MARKER = re.compile(r"<!--\s*test\s*(?::(?P<needs>[^>]*?))?\s*-->")
CORE_PAGES = [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "concepts").glob("*.md")]
INTEGRATION_PAGES = list((ROOT / "docs" / "integrations").glob("*.md"))


@contextlib.contextmanager
def _postgres(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    from tests.support.sql import fresh_postgres_database

    with fresh_postgres_database(request.getfixturevalue("postgres_url")) as url:
        yield {"POSTGRES_URL": url}  # a database of the page's own, dropped afterwards


@contextlib.contextmanager
def _redis(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield {"REDIS_URL": request.getfixturevalue("redis_url")}


@contextlib.contextmanager
def _rabbitmq(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield {"RABBITMQ_URL": request.getfixturevalue("rabbitmq_url")}


@contextlib.contextmanager
def _s3(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    server = request.getfixturevalue("moto_server")
    bucket = server.create_bucket(f"docs-{uuid.uuid4().hex[:12]}")
    yield {
        "S3_ENDPOINT_URL": server.endpoint_url,
        "S3_BUCKET": bucket,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }


@contextlib.contextmanager
def _memcached(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    yield {"MEMCACHED_ADDRESS": request.getfixturevalue("memcached_address")}


#: What a page may ask for in its marker, and the environment variables each provides.
NEEDS: dict[str, Callable[[pytest.FixtureRequest], contextlib.AbstractContextManager[dict[str, str]]]] = {
    "postgres": _postgres,  # POSTGRES_URL: a fresh, empty database (SQLAlchemy URL)
    "redis": _redis,  # REDIS_URL
    "rabbitmq": _rabbitmq,  # RABBITMQ_URL (amqp://...)
    "memcached": _memcached,  # MEMCACHED_ADDRESS (host:port of a private memcached)
    "s3": _s3,  # S3_ENDPOINT_URL, S3_BUCKET (empty, new), AWS_* credentials and region
}


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


def marker(text: str) -> list[str] | None:
    """The needs a page's first line declares; None when the page does not opt in."""
    first_line = text.split("\n", 1)[0]
    found = MARKER.fullmatch(first_line.strip())
    if found is None:
        return None
    return (found.group("needs") or "").split()


def needs_of(page: Path) -> list[str]:
    """The checked needs of a runnable page; a ValueError names an unknown one."""
    needs = marker(page.read_text(encoding="utf-8")) or []
    unknown = [need for need in needs if need not in NEEDS]
    if unknown:
        msg = (
            f"{page.name}: unknown need(s) {unknown} in its first-line <!-- test: ... --> "
            f"marker; known: {sorted(NEEDS)}"
        )
        raise ValueError(msg)
    return needs


def runnable(page: Path) -> bool:
    """Core pages always run; an integration page only with its marker."""
    if page in INTEGRATION_PAGES and marker(page.read_text(encoding="utf-8")) is None:
        return False
    return bool(blocks(page))


PAGES = sorted(p for p in CORE_PAGES + INTEGRATION_PAGES if runnable(p))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_page_blocks_run(
    page: Path, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Each python block of the page runs without error, after the ones before it."""
    needs = needs_of(page)
    monkeypatch.chdir(tmp_path)
    with contextlib.ExitStack() as stack:
        for need in needs:
            for name, value in stack.enter_context(NEEDS[need](request)).items():
                monkeypatch.setenv(name, value)
        _run(page)


def _run(page: Path) -> None:
    # A real module in sys.modules: SQLAlchemy resolves a mapped class's
    # annotations through the module it was defined in.
    module = types.ModuleType(f"docs_{page.stem.replace('-', '_')}")
    sys.modules[module.__name__] = module
    try:
        for number, source in enumerate(blocks(page), 1):
            code = compile(source, f"{page.relative_to(ROOT)} block {number}", "exec")
            exec(code, module.__dict__)
    finally:
        del sys.modules[module.__name__]
        _shut_down(module.__dict__)


def _shut_down(namespace: dict[str, object]) -> None:
    """Dispose what a page left open (engines, databases), as an application does at exit.

    Otherwise their pooled server connections would be garbage-collected
    later, during some other test, as ResourceWarnings (errors here).
    """
    from sqlalchemy.engine import Engine

    from polydatum.sqlalchemy import Database

    for value in list(namespace.values()):
        if isinstance(value, (Engine, Database)):
            value.dispose()


def test_every_page_is_checked() -> None:
    """Core pages with code are collected (a renamed folder would silently drop them)."""
    names = {p.name for p in PAGES}
    assert {"README.md", "tutorial.md", "hooks.md", "contexts.md"} <= names
    assert {"blob.md", "redis.md", "sqlalchemy.md"} <= names


@pytest.mark.parametrize(
    ("first_line", "expected"),
    [
        ("<!-- test -->", []),
        ("<!-- test: -->", []),
        ("<!-- test: s3 -->", ["s3"]),
        ("<!--test:postgres  redis s3-->", ["postgres", "redis", "s3"]),
        ("# Title", None),
        ("<!-- a comment -->", None),
        ("<!-- testing notes -->", None),
    ],
)
def test_marker(first_line: str, expected: list[str] | None) -> None:
    """The first line opts a page in, optionally naming what it needs; anything else does not."""
    assert marker(f"{first_line}\n# Page\n") == expected


def test_marker_only_counts_on_the_first_line() -> None:
    """A marker further down (e.g. in a page explaining the convention) does not opt in."""
    assert marker("# Page\n\n<!-- test: s3 -->\n") is None


def test_unknown_need_fails_the_page(tmp_path: Path) -> None:
    """A typo in a marker fails that page's test, naming the need and the known ones."""
    page = tmp_path / "typo.md"
    page.write_text("<!-- test: postgress s3 -->\n# Page\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"typo.md: unknown need\(s\) \['postgress'\].*'postgres'"):
        needs_of(page)
