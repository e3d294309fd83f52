"""Checkpoints: where a sync got to, so that the next run resumes there."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from polydatum.sync._errors import SyncError, show_key

_FORMAT = 1


@runtime_checkable
class Checkpoint(Protocol):
    """**Protocol:** keeps the last key a sync settled, and the counts so far.

    .. versionadded:: 2.0
    """

    def load(self) -> tuple[Any, dict[str, int]] | None:
        """The saved ``(key, counts)``, or None when there is nothing to resume."""
        ...

    def save(self, key: Any, counts: Mapping[str, int]) -> None:
        """Record that every key up to ``key`` is in step; called after each batch commits."""
        ...

    def clear(self) -> None:
        """Forget the position: the sync finished, the next one starts from the top."""
        ...


class MemoryCheckpoint:
    """A checkpoint in memory: resumes within one process (tests, retries in a loop).

    .. versionadded:: 2.0
    """

    def __init__(self) -> None:
        self._saved: tuple[Any, dict[str, int]] | None = None

    def load(self) -> tuple[Any, dict[str, int]] | None:
        """The saved position, or None."""
        return None if self._saved is None else (self._saved[0], dict(self._saved[1]))

    def save(self, key: Any, counts: Mapping[str, int]) -> None:
        """Keep ``key`` and a copy of ``counts``."""
        self._saved = (key, dict(counts))

    def clear(self) -> None:
        """Forget the position."""
        self._saved = None


class FileCheckpoint:
    """A checkpoint in a small JSON file, replaced atomically at each save.

    Each save writes a temporary file in the same folder, flushes it to disk
    and renames it over the old one: a crash leaves the old checkpoint or the
    new one, never half a file. Keys must be str, int or tuples/lists of them.

    Args:
        path: the file; its folder must exist.

    .. versionadded:: 2.0
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"FileCheckpoint({os.fspath(self.path)!r})"

    def load(self) -> tuple[Any, dict[str, int]] | None:
        """The saved position, or None when the file does not exist.

        Raises:
            SyncError: the file is not a checkpoint this class wrote.
        """
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            data = json.loads(text)
            if data["format"] != _FORMAT:
                raise ValueError
            key = _from_json(data["key"])
            counts = {str(k): int(v) for k, v in data["counts"].items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            msg = (
                f"the checkpoint file {self.path.name!r} is not one polydatum.sync wrote; "
                "delete it to start the sync from the beginning"
            )
            raise SyncError(msg) from None
        return key, counts

    def save(self, key: Any, counts: Mapping[str, int]) -> None:
        """Replace the file with ``key`` and ``counts``."""
        text = json.dumps({"format": _FORMAT, "key": _to_json(key), "counts": dict(counts)})
        folder = self.path.parent
        fd, temporary = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=folder)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, self.path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    def clear(self) -> None:
        """Delete the file."""
        self.path.unlink(missing_ok=True)


def _to_json(key: Any) -> Any:
    if isinstance(key, (str, int)) and not isinstance(key, bool):
        return key
    if isinstance(key, tuple):
        return {"tuple": [_to_json(part) for part in key]}
    msg = (
        f"a FileCheckpoint keeps str, int and tuple keys, got {show_key(key)} ({type(key).__name__}); "
        "use such keys, or pass another Checkpoint"
    )
    raise SyncError(msg)


def _from_json(value: Any) -> Any:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return value
    if isinstance(value, dict) and list(value) == ["tuple"] and isinstance(value["tuple"], list):
        return tuple(_from_json(part) for part in value["tuple"])
    raise ValueError(value)
