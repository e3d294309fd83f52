"""Type-checked, never run: mypy --strict and pyright check these files (scripts/test)."""
