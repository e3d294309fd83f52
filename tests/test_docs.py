"""The documentation's Python blocks run, in order, as written.

Every ```python block of a page is executed in one namespace per page, so a
tutorial can build on its earlier steps. Blocks that only show shapes, or
need the reader's own package (``myapp``), use ```py, ```text or another
tag and are not run.
"""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)
PAGES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs" / "concepts").glob("*.md")]
)


def blocks(page: Path) -> list[str]:
    return BLOCK.findall(page.read_text(encoding="utf-8"))


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_page_blocks_run(page: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Each python block of the page runs without error, after the ones before it."""
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


def test_every_page_is_checked() -> None:
    """Core pages with code are collected (a renamed folder would silently drop them)."""
    names = {p.name for p in PAGES if blocks(p)}
    assert {"README.md", "tutorial.md", "hooks.md", "contexts.md"} <= names
