"""Blobs as files under a root directory: the embedded default."""

from __future__ import annotations

import builtins
import contextlib
import datetime
import json
import os
import shutil
import stat
import threading
import uuid
from collections.abc import Iterator
from typing import IO, Any, BinaryIO

from polydatum.blob._errors import BlobError, BlobStoreUnavailable, InvalidKey
from polydatum.blob._keys import (
    RESERVED_NAME,
    RESERVED_PREFIX,
    UNDO_PREFIX,
    guess_type,
    join_url,
)
from polydatum.blob._store import BlobInfo, BlobStore
from polydatum.blob._streams import chunks

try:  # POSIX: lets several processes share one FileSystemBlobStore root.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

_INTERNAL = RESERVED_NAME
_META_FOLDER = ".d"
_META_FILE = ".json"
_MAX_SEGMENT_BYTES = 250  # NAME_MAX is 255; the metadata file adds ".json"


class FileSystemBlobStore(BlobStore):
    """Blobs as files under ``root``: the embedded default.

    ``put("notes/1/a.png", ...)`` writes ``<root>/notes/1/a.png``. Writes go to
    a temporary file under ``<root>/.polydatum/tmp``, are flushed to disk
    (``fsync``) and moved into place with ``os.replace``, so readers see the
    old blob or the new one and concurrent writers of one key never tear it:
    the last complete write wins. Content type and metadata live in a JSON
    sidecar under ``<root>/.polydatum/meta`` when they differ from the
    defaults: ``notes/1/a.png`` has ``meta/notes.d/1.d/a.png.json`` (folders
    end in ``.d``, so no key's sidecar is another key's folder); a per-root
    lock (``fcntl.flock`` where available) swaps blob and metadata together,
    across threads and processes.

    A key is refused (:class:`InvalidKey`) unless it stays inside ``root``
    (see :func:`check_key`; each segment is also limited to 250 bytes). A
    ``.polydatum`` folder at any depth is bookkeeping (e.g. of a store whose
    root is that folder's parent): never listed, never swept.
    Symbolic links placed inside ``root`` by someone else are followed.

    Unlike S3, a key cannot be both a blob and a "folder" of other blobs:
    with ``a/b`` stored, ``put("a", ...)`` raises :class:`BlobError`, and
    vice versa.

    Args:
        root: the directory; created (with parents) on first write or ping.
        fsync: flush file data and directory entries to disk on every write.
            Turn off only for throwaway data: a power cut may then lose
            recent writes (still never tear them).
        base_url: when a web server serves ``root``, :meth:`url` returns
            ``base_url + "/" + quoted key`` (no expiry).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        base_url: str | None = None,
    ) -> None:
        self.root = os.path.abspath(os.fspath(root))
        self.fsync = fsync
        self.base_url = base_url
        self._internal = os.path.join(self.root, _INTERNAL)
        self._tmp = os.path.join(self._internal, "tmp")
        self._meta = os.path.join(self._internal, "meta")
        self._lockfile = os.path.join(self._internal, "lock")
        self._thread_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FileSystemBlobStore {self.root!r}>"

    # -- paths and locking -----------------------------------------------------

    def _segments(self, key: str) -> builtins.list[str]:
        segments = key.split("/")
        for segment in segments:
            if len(segment.encode("utf-8")) > _MAX_SEGMENT_BYTES:
                msg = (
                    f"invalid blob key {key!r}: the segment {segment[:20]!r}... is longer than "
                    f"{_MAX_SEGMENT_BYTES} bytes, which filesystems do not allow"
                )
                raise InvalidKey(msg, key=key)
        return segments

    def _join(self, key: str, base: str, segments: builtins.list[str]) -> str:
        path = os.path.join(base, *segments)
        # check_key already refused every escape; this guards against a future
        # change to it, at the cost of one string comparison.
        if not os.path.normpath(path).startswith(base + os.sep):
            msg = f"invalid blob key {key!r}: it resolves outside the store's root"
            raise InvalidKey(msg, key=key)
        return path

    def _path(self, key: str) -> str:
        return self._join(key, self.root, self._segments(key))

    def _meta_path(self, key: str) -> str:
        # Folders end in ".d" and files in ".json", so no key's sidecar can be
        # another key's folder: "a" -> a.json, "a.json/b" -> a.json.d/b.json.
        *folders, name = self._segments(key)
        return self._join(key, self._meta, [*(f + _META_FOLDER for f in folders), name + _META_FILE])

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover - Windows: one process per root
            with self._thread_lock:
                yield
            return
        # A descriptor per call: flock excludes other descriptors, so this
        # serialises threads of this process and other processes alike.
        try:
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        except FileNotFoundError:
            os.makedirs(self._internal, exist_ok=True)
            fd = os.open(self._lockfile, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    def _fsync_dir(self, path: str) -> None:
        if not self.fsync or not hasattr(os, "O_DIRECTORY"):
            return
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _tempfile(self) -> tuple[str, IO[bytes]]:
        path = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
        try:
            fd = os.open(path, flags, 0o666)
        except FileNotFoundError:
            os.makedirs(self._tmp, exist_ok=True)
            fd = os.open(path, flags, 0o666)
        return path, os.fdopen(fd, "wb")

    def _write_temp(self, key: str, body: bytes | IO[bytes]) -> tuple[str, int]:
        """Write ``body`` to a new temporary file; errors of ``body`` itself propagate as is."""
        try:
            path, handle = self._tempfile()
        except OSError as exc:
            raise self._unavailable("write", key, exc) from exc
        try:
            with handle:
                size = 0
                for chunk in chunks(body):
                    try:
                        handle.write(chunk)
                    except OSError as exc:
                        raise self._unavailable("write", key, exc) from exc
                    size += len(chunk)
                try:
                    handle.flush()
                    if self.fsync:
                        os.fsync(handle.fileno())
                except OSError as exc:
                    raise self._unavailable("write", key, exc) from exc
        except BaseException:
            _unlink(path)
            raise
        return path, size

    def _unavailable(self, what: str, key: str, exc: OSError) -> BlobError:
        msg = f"could not {what} blob {key!r} under {self.root!r}: {exc.strerror or exc}"
        return BlobStoreUnavailable(msg, key=key)

    # -- primitives --------------------------------------------------------------

    def _put(self, key: str, body: bytes | IO[bytes], content_type: str, metadata: dict[str, str]) -> int:
        path = self._path(key)
        meta_path = self._meta_path(key)
        tmp, size = self._write_temp(key, body)
        meta_tmp = None
        try:
            if metadata or content_type != guess_type(key):
                document = {"content_type": content_type, "metadata": metadata}
                meta_tmp, _ = self._write_temp(key, json.dumps(document).encode())
            self._install(key, path, tmp, meta_path, meta_tmp)
        except BaseException:
            _unlink(tmp)
            if meta_tmp is not None:
                _unlink(meta_tmp)
            raise
        return size

    def _inside_root(self, key: str, directory: str, what: str) -> None:
        """Refuse to write or delete through a folder that is a symbolic link leading out of root.

        Reads follow such links; a write or delete must stay in the store.
        """
        real = os.path.realpath(directory)
        root = os.path.realpath(self.root)
        if real != root and not real.startswith(root + os.sep):
            msg = (
                f"cannot {what} blob {key!r}: a folder on its path is a symbolic link leading "
                "outside the store's root, and writes and deletes never follow links out of it"
            )
            raise BlobError(msg, key=key)

    def _install(self, key: str, path: str, tmp: str, meta_path: str, meta_tmp: str | None) -> None:
        """Move a written temp file (and its metadata) into place, atomically each."""
        directory = os.path.dirname(path)
        self._inside_root(key, directory, "store")
        with self._locked():
            try:
                try:
                    os.replace(tmp, path)
                except FileNotFoundError:
                    # The folder does not exist yet (trying first saves a mkdir per put).
                    os.makedirs(directory, exist_ok=True)
                    os.replace(tmp, path)
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                msg = (
                    f"cannot store blob {key!r} under {self.root!r}: part of the key is "
                    "already a blob, or the key is a folder of other blobs; the filesystem "
                    "cannot hold both 'a' and 'a/b' (S3 can), so choose another key"
                )
                raise BlobError(msg, key=key) from exc
            except OSError as exc:
                raise self._unavailable("write", key, exc) from exc
            try:
                if meta_tmp is not None:
                    os.makedirs(os.path.dirname(meta_path), exist_ok=True)
                    os.replace(meta_tmp, meta_path)
                else:
                    _unlink(meta_path)
            except OSError as exc:
                msg = (
                    f"could not write metadata of blob {key!r} under {self.root!r}: "
                    f"{exc.strerror or exc}; its content was replaced but its content type "
                    "and metadata were not: put it again once the disk is writable"
                )
                raise BlobStoreUnavailable(msg, key=key) from exc
        self._fsync_dir(directory)

    def _get(self, key: str) -> bytes:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key, repr(self.root)) from None
        except OSError as exc:
            raise self._unavailable("read", key, exc) from exc

    def _open(self, key: str) -> BinaryIO:
        try:
            return open(self._path(key), "rb")  # the caller closes it
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise self._missing(key, repr(self.root)) from None
        except OSError as exc:
            raise self._unavailable("open", key, exc) from exc

    def _stat(self, key: str) -> BlobInfo:
        path = self._path(key)
        with self._locked():
            try:
                st = os.stat(path)
            except (FileNotFoundError, NotADirectoryError):
                raise self._missing(key, repr(self.root)) from None
            except OSError as exc:
                raise self._unavailable("stat", key, exc) from exc
            if not os.path.isfile(path):
                raise self._missing(key, repr(self.root))
            document = self._read_meta(key, "stat")
        modified = datetime.datetime.fromtimestamp(st.st_mtime_ns / 1e9, datetime.timezone.utc)
        return BlobInfo(
            key=key,
            size=st.st_size,
            content_type=document.get("content_type") or guess_type(key),
            etag=_etag(st),
            modified=modified,
            metadata=dict(document.get("metadata") or {}),
        )

    def _read_meta(self, key: str, what: str) -> dict[str, Any]:
        """The sidecar of ``key`` as a dict; {} when it has none."""
        try:
            with open(self._meta_path(key), "rb") as handle:
                data = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            return {}
        except OSError as exc:
            raise self._unavailable(what, key, exc) from exc
        try:
            document = json.loads(data)
        except ValueError:
            document = None
        if not isinstance(document, dict):
            msg = (
                f"the metadata of blob {key!r} is damaged (not the JSON polydatum wrote); "
                "put it again to rewrite its content type and metadata"
            )
            raise BlobError(msg, key=key)
        return document

    def _exists(self, key: str) -> bool:
        if os.path.isfile(self._path(key)):
            return True
        self._check_root(f"check blob {key!r}")
        return False

    def _check_root(self, what: str) -> None:
        """Raise unless root is a folder or not created yet: "no such blob" would be a lie then."""
        try:
            mode = os.stat(self.root).st_mode
        except FileNotFoundError:
            return  # created on the first write: an empty store
        except OSError as exc:  # a parent is a file, or no permission
            msg = f"could not {what}: the store's root cannot be reached ({exc.strerror or exc})"
            raise BlobStoreUnavailable(msg) from exc
        if not stat.S_ISDIR(mode):
            msg = f"could not {what}: the store's root is not a folder"
            raise BlobStoreUnavailable(msg)

    def _delete(self, key: str, etag: str | None = None) -> bool:
        path = self._path(key)
        meta_path = self._meta_path(key)
        self._inside_root(key, os.path.dirname(path), "delete")
        with self._locked():
            try:
                if etag is not None and _etag(os.stat(path)) != etag:
                    return False  # written again since: that blob stays
                os.unlink(path)
            except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
                return False
            except OSError as exc:
                raise self._unavailable("delete", key, exc) from exc
            try:
                _unlink(meta_path)
            except OSError as exc:
                raise self._unavailable("delete the metadata of", key, exc) from exc
            # Empty folders would otherwise pile up, and block a later put of
            # a blob with the folder's name.
            _prune(os.path.dirname(path), self.root)
            _prune(os.path.dirname(meta_path), self._meta)
        parent = os.path.dirname(path)
        self._fsync_dir(parent if os.path.isdir(parent) else self.root)
        return True

    def _discard_if(self, key: str, etag: str) -> None:
        self._delete(key, etag)

    def _list(self, prefix: str, after: str | None, page_size: int) -> Iterator[str]:
        if prefix.startswith(RESERVED_PREFIX):
            return self._walk(self._internal, RESERVED_PREFIX, prefix, after, internal=True)
        return self._walk(self.root, "", prefix, after, internal=False)

    def _walk(
        self, directory: str, base: str, prefix: str, after: str | None, *, internal: bool
    ) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                entries = builtins.list(scan)
        except (FileNotFoundError, NotADirectoryError):
            if directory == self.root:
                self._check_root(f"list blobs under {prefix!r}")
            return
        except OSError as exc:
            raise self._unavailable("list", prefix, exc) from exc
        # Sorting folders as "name/" makes a depth-first walk yield keys in
        # exactly the order S3 lists them.
        items: builtins.list[tuple[str, bool]] = []
        for entry in entries:
            # At any depth: a store rooted in a folder of this one keeps its own there.
            if not internal and entry.name == _INTERNAL:
                continue
            key = base + entry.name
            if entry.is_dir():
                folder = key + "/"
                if not (folder.startswith(prefix) or prefix.startswith(folder)):
                    continue
                if after is not None and after >= folder and not after.startswith(folder):
                    continue
                items.append((folder, True))
            elif key.startswith(prefix) and (after is None or key > after):
                items.append((key, False))
        items.sort()
        for key, is_folder in items:
            if is_folder:
                yield from self._walk(
                    os.path.join(directory, key[len(base) : -1]), key, prefix, after, internal=internal
                )
            elif not internal or key.startswith(UNDO_PREFIX):
                yield key

    def _copy(self, source: str, target: str) -> None:
        self._clone(source, target, link=False)

    def _snapshot(self, source: str, target: str) -> None:
        # Undo copies and restores are never modified in place, and every write
        # replaces the file, so a hard link is a safe O(1) copy.
        self._clone(source, target, link=True)

    def _clone(self, source: str, target: str, *, link: bool) -> None:
        # Undo keys (".polydatum/undo/...") map into <root>/.polydatum like any key.
        src = self._path(source)
        dst = self._path(target)
        src_meta = self._meta_path(source)
        dst_meta = self._meta_path(target)
        tmp = os.path.join(self._tmp, f"{uuid.uuid4().hex}.tmp")
        os.makedirs(self._tmp, exist_ok=True)
        try:
            if link:
                try:
                    os.link(src, tmp)
                except (FileNotFoundError, NotADirectoryError):
                    raise
                except OSError:
                    link = False
            if not link:
                shutil.copyfile(src, tmp)
                if self.fsync:
                    with open(tmp, "rb+") as handle:
                        os.fsync(handle.fileno())
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            _unlink(tmp)
            raise self._missing(source, repr(self.root)) from None
        except OSError as exc:
            _unlink(tmp)
            raise self._unavailable("copy", source, exc) from exc
        try:
            with open(src_meta, "rb") as handle:
                sidecar: bytes | None = handle.read()
        except (FileNotFoundError, NotADirectoryError):
            sidecar = None
        except OSError as exc:
            _unlink(tmp)
            raise self._unavailable("copy", source, exc) from exc
        meta_tmp = None
        try:
            if sidecar is not None:
                meta_tmp, _ = self._write_temp(target, sidecar)
            self._install(target, dst, tmp, dst_meta, meta_tmp)
        except BaseException:
            _unlink(tmp)
            if meta_tmp is not None:
                _unlink(meta_tmp)
            raise
        if link:
            # rename() does nothing when both names are links to one file (restoring
            # an undo copy over the very blob it was taken from): drop the spare name.
            _unlink(tmp)

    def _url(self, key: str, expires: int) -> str:
        if self.base_url is None:
            return super()._url(key, expires)
        return join_url(self.base_url, key)

    def _ping(self) -> None:
        try:
            os.makedirs(self._tmp, exist_ok=True)
        except OSError as exc:
            msg = f"blob root {self.root!r} cannot be created: {exc.strerror or exc}"
            raise BlobStoreUnavailable(msg) from exc
        if not os.access(self.root, os.W_OK) or not os.access(self._tmp, os.W_OK):
            msg = f"blob root {self.root!r} is not writable by this process"
            raise BlobStoreUnavailable(msg)

    def _sweep_internal(self, cutoff: datetime.datetime, dry_run: bool) -> builtins.list[str]:
        removed = super()._sweep_internal(cutoff, dry_run)
        # Temporary files of writers that died before os.replace.
        try:
            with os.scandir(self._tmp) as scan:
                stale = [e for e in scan if e.stat().st_mtime < cutoff.timestamp()]
        except FileNotFoundError:
            return removed
        for entry in stale:
            if not dry_run:
                _unlink(entry.path)
            removed.append(f"{RESERVED_PREFIX}tmp/{entry.name}")
        return removed


def _etag(st: os.stat_result) -> str:
    """A file's version: every write replaces the file, so a new inode or mtime."""
    return f"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except (FileNotFoundError, NotADirectoryError):
        pass


def _prune(directory: str, stop: str) -> None:
    """Remove empty folders from ``directory`` up to (not including) ``stop``."""
    while directory.startswith(stop + os.sep):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)
