"""Ready-made sides without third-party packages: a BlobStore prefix and a folder on disk."""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterator
from pathlib import Path
from typing import Any

from polydatum.blob import HASH_METADATA, BlobInfo, BlobStore
from polydatum.blob._hashing import hash_stream
from polydatum.sync._errors import SyncError

#: How a BlobSide or FolderSide fingerprints: ``"sha256"``, ``"size"``, or a callable.
BlobFingerprint = str | Callable[[Any], Hashable]

_RESERVED = ".polydatum"


def _fingerprint_choice(fingerprint: Any, where: str) -> None:
    if callable(fingerprint) or fingerprint in ("sha256", "size"):
        return
    msg = f'{where} fingerprint must be "sha256", "size" or a callable, got {fingerprint!r}'
    raise ValueError(msg)


class BlobSide:
    """The blobs under a prefix of a :class:`~polydatum.blob.BlobStore` (S3, filesystem or memory).

    Keys are the blob keys without ``prefix`` (unless ``strip_prefix=False``),
    so ``s3://bucket/a/`` and a folder's ``a/`` compare key for key. Items are
    the full blob keys.

    Args:
        store: the store (``ctx.blobs`` works too, but a store outlives contexts).
        prefix: only blobs whose key starts with it; ``""`` for all.
        fingerprint: ``"sha256"`` (default): the content hash recorded by
            :func:`~polydatum.blob.put_hashed`, which any two stores can
            compare; a blob written without it is hashed by reading it, unless
            ``hash_missing=False``. ``"size"``: the byte count, cheap and weak.
            A callable gets the blob's :class:`~polydatum.blob.BlobInfo`.
        hash_missing: read and hash a blob that has no recorded hash (True), or
            raise :class:`~polydatum.sync.FingerprintError` (False).
        strip_prefix: key blobs without the prefix (True), or by their full
            key (False: to compare with rows that hold full keys).

    Etags and modified times are local to one store (S3's ETag is not a hash
    of a multipart upload; a copied file gets a new mtime), so they are no
    default: they would report every blob as changed across stores.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        store: BlobStore,
        prefix: str = "",
        *,
        fingerprint: BlobFingerprint = "sha256",
        hash_missing: bool = True,
        strip_prefix: bool = True,
    ) -> None:
        if not isinstance(store, BlobStore):
            msg = f"BlobSide needs a polydatum.blob.BlobStore, got {type(store).__name__}"
            raise TypeError(msg)
        if not isinstance(prefix, str):
            msg = f"prefix must be a str, got {type(prefix).__name__}"
            raise TypeError(msg)
        _fingerprint_choice(fingerprint, "BlobSide")
        self.store = store
        self.prefix = prefix
        self._fingerprint = fingerprint
        self.hash_missing = hash_missing
        self.strip_prefix = strip_prefix

    def __repr__(self) -> str:
        return f"BlobSide({type(self.store).__name__}, prefix={self.prefix!r})"

    def scan(self, after: Any = None) -> Iterator[tuple[str, str]]:
        """``(key without prefix, blob key)`` in key order, lazily, page by page."""
        if after is not None and not isinstance(after, str):
            msg = f"a BlobSide's keys are str, so after= must be one, got {type(after).__name__}"
            raise TypeError(msg)
        prefix = self.prefix
        cut = len(prefix) if self.strip_prefix else 0
        start = None if after is None else prefix[:cut] + after
        for key in self.store.list(prefix, after=start):
            yield key[cut:], key

    def fingerprint(self, item: str) -> Hashable:
        """The blob's fingerprint (see the class); reads its ``stat``."""
        info = self.store.stat(item)
        fingerprint = self._fingerprint
        if fingerprint == "size":
            return info.size
        if fingerprint != "sha256":
            return fingerprint(info)  # type: ignore[operator]
        return self._hash(info)

    def _hash(self, info: BlobInfo) -> str:
        recorded = info.metadata.get(HASH_METADATA)
        if recorded is not None:
            return recorded
        if not self.hash_missing:
            msg = (
                f"blob {info.key!r} has no recorded {HASH_METADATA}; write blobs with "
                "polydatum.blob.put_hashed, or pass hash_missing=True to hash them by reading"
            )
            raise SyncError(msg)
        with self.store.open(info.key) as stream:
            return hash_stream(stream)


class FolderSide:
    """The files under a folder on disk, keyed by their ``/``-separated path relative to it.

    The walk is depth-first, and each folder is listed on its own, so memory
    holds one folder listing per level, not the tree. Folders named
    ``.polydatum`` (a FileSystemBlobStore's bookkeeping) are skipped, and so
    are symbolic links to folders (a link loop cannot make the walk endless).

    Args:
        root: the folder.
        fingerprint: ``"sha256"`` (default, the content hashed by reading the
            file), ``"size"``, or a callable given the file's ``Path``.

    Items are :class:`pathlib.Path` objects.

    .. versionadded:: 2.0
    """

    def __init__(self, root: str | os.PathLike[str], *, fingerprint: BlobFingerprint = "sha256") -> None:
        _fingerprint_choice(fingerprint, "FolderSide")
        path = Path(root)
        if not path.is_dir():
            # Only the last name: a server path stays out of messages that may reach a log or a client.
            msg = f"FolderSide needs an existing folder; {path.name!r} is not one (or cannot be read)"
            raise ValueError(msg)
        self.root = path
        self._fingerprint = fingerprint

    def __repr__(self) -> str:
        return f"FolderSide({os.fspath(self.root)!r})"

    def scan(self, after: Any = None) -> Iterator[tuple[str, Path]]:
        """``(relative path, Path)`` for every file, in key order, lazily."""
        if after is not None and not isinstance(after, str):
            msg = f"a FolderSide's keys are str, so after= must be one, got {type(after).__name__}"
            raise TypeError(msg)
        return self._walk(self.root, "", after)

    def _walk(self, folder: Path, base: str, after: str | None) -> Iterator[tuple[str, Path]]:
        with os.scandir(folder) as scan:
            entries = [(entry.name, entry.is_dir(follow_symlinks=False), entry.is_file()) for entry in scan]
        # A folder sorts as "name/": then a depth-first walk yields the
        # relative paths in plain str order, the order the other sides use.
        listing = sorted(
            (name + "/" if is_dir else name, is_dir) for name, is_dir, is_file in entries if is_dir or is_file
        )
        for name, is_dir in listing:
            key = base + name
            if is_dir:
                if name == _RESERVED + "/":
                    continue
                if after is not None and after >= key and not after.startswith(key):
                    continue  # the whole subtree sorts before after
                yield from self._walk(folder / name[:-1], key, after)
            elif after is None or key > after:
                yield key, folder / name

    def fingerprint(self, item: Path) -> Hashable:
        """The file's fingerprint (see the class)."""
        fingerprint = self._fingerprint
        if fingerprint == "size":
            return item.stat().st_size
        if fingerprint != "sha256":
            return fingerprint(item)  # type: ignore[operator]
        with item.open("rb") as stream:
            return hash_stream(stream)


def check_page_size(page_size: Any) -> None:
    """Refuse a page size that is not an int of at least 1."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        msg = f"page_size must be an int of at least 1, got {page_size!r}"
        raise ValueError(msg)
