"""What every store accepts: keys, list prefixes, metadata, content types, URL expiries."""

from __future__ import annotations

import datetime
import math
import mimetypes
import re
import urllib.parse
from collections.abc import Mapping

from polydatum.blob._errors import InvalidKey, InvalidMetadata

MAX_KEY_BYTES = 1024
MAX_METADATA_BYTES = 2048
RESERVED_NAME = ".polydatum"
RESERVED_PREFIX = RESERVED_NAME + "/"
UNDO_PREFIX = RESERVED_PREFIX + "undo/"
# The metadata name under which a unit of work with an outbox marks each write, so
# that a relay undoing a dead context's write can tell it from a later one.
WRITE_MARK = "polydatum-write"
DEFAULT_CONTENT_TYPE = "application/octet-stream"

# C0, DEL and C1: a C1 character such as U+009B (CSI) is a terminal escape too.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DRIVE = re.compile(r"[A-Za-z]:")
_METADATA_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]*\Z")
_PRINTABLE_ASCII = re.compile(r"[\x20-\x7e]*\Z")
# No trailing space: S3 strips it from the header, the other stores would keep it.
_CONTENT_TYPE = re.compile(r"[\x21-\x7e]+/[\x21-\x7e]+(;([\x20-\x7e]*[\x21-\x7e])?)?\Z")
# Built-in defaults only (no /etc/mime.types): the guess is the same on every machine.
_MIME = mimetypes.MimeTypes()


def _key_problem(key: str) -> str | None:
    if not key:
        return "it is empty"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return "it is not valid Unicode text (it has a lone surrogate)"
    if size > MAX_KEY_BYTES:
        return f"it is {size} bytes long in UTF-8; the limit is {MAX_KEY_BYTES}"
    if "\x00" in key:
        return "it contains a NUL character"
    control = _CONTROL.search(key)
    if control:
        return f"it contains the control character U+{ord(control.group()):04X}"
    if "\\" in key:
        return "it contains a backslash; separate segments with '/'"
    if key.startswith("/"):
        return "it is an absolute path; keys are relative to the store"
    if _DRIVE.match(key):
        return "it starts with a drive letter"
    for segment in key.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment, which could escape the store's root"
        # At any depth: a store whose root or prefix is a folder of this one
        # keeps its undo copies and temporary files there.
        if segment == RESERVED_NAME:
            return (
                f"it has a {RESERVED_NAME!r} segment; that name is reserved for "
                "polydatum's own bookkeeping (undo copies, metadata, temporary files)"
            )
    return None


def is_reserved(key: str) -> bool:
    """True when ``key`` has a ``.polydatum`` segment: bookkeeping, never a user's blob."""
    return f"/{RESERVED_PREFIX}" in f"/{key}/"


def check_key(key: object) -> str:
    """Return ``key`` if every store accepts it, else raise :class:`InvalidKey`.

    Args:
        key: the candidate key.

    Raises:
        InvalidKey: the key is not a ``str``, or is empty, absolute, contains
            ``.``/``..``/empty segments, a backslash, NUL or another control
            character, is longer than 1024 bytes of UTF-8, or has a segment
            named ``.polydatum`` (reserved, at any depth). The message says which.

    .. versionadded:: 2.0
    """
    if not isinstance(key, str):
        msg = f"blob keys are str, got {key!r} ({type(key).__name__})"
        raise InvalidKey(msg)
    problem = _key_problem(key)
    if problem is not None:
        msg = (
            f"invalid blob key {key!r}: {problem}. Keys are '/'-separated relative "
            "paths such as 'notes/42/photo.jpg'"
        )
        raise InvalidKey(msg, key=key)
    return key


def check_prefix(prefix: object) -> str:
    if not isinstance(prefix, str):
        msg = f"a list prefix is a str, got {prefix!r} ({type(prefix).__name__})"
        raise InvalidKey(msg)
    # A prefix is valid when some valid key could start with it.
    problem = _key_problem(prefix + "x") if prefix else None
    if problem is not None:
        msg = f"invalid list prefix {prefix!r}: {problem}"
        raise InvalidKey(msg, key=prefix)
    return prefix


def check_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    if not metadata:
        return {}
    if not isinstance(metadata, Mapping):
        msg = f"metadata must be a mapping of str to str, got {type(metadata).__name__}"
        raise InvalidMetadata(msg)
    clean: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            msg = (
                f"metadata must map str to str, got {name!r}: {value!r}; "
                "convert numbers and dates to text first"
            )
            raise InvalidMetadata(msg)
        lowered = name.lower()
        if not _METADATA_KEY.match(lowered):
            msg = (
                f"metadata name {name!r} is not portable: use ASCII letters, digits, "
                "'-', '_' and '.', starting with a letter or digit (S3 sends names as "
                "HTTP headers and lower-cases them)"
            )
            raise InvalidMetadata(msg)
        if lowered == WRITE_MARK:
            msg = f"metadata name {name!r} is reserved for polydatum's unit of work; choose another"
            raise InvalidMetadata(msg)
        if lowered in clean:
            msg = f"metadata names {name!r} and another differ only in case; S3 would merge them"
            raise InvalidMetadata(msg)
        if not _PRINTABLE_ASCII.match(value):
            msg = (
                f"metadata value for {name!r} must be printable ASCII (it travels as an "
                "HTTP header); encode it first, e.g. urllib.parse.quote(value)"
            )
            raise InvalidMetadata(msg)
        if value != value.strip(" "):
            msg = (
                f"metadata value for {name!r} has a leading or trailing space, which S3 "
                "drops (HTTP trims header values) and the other stores would keep; strip "
                "it first, or encode it, e.g. urllib.parse.quote(value)"
            )
            raise InvalidMetadata(msg)
        total += len(lowered) + len(value)
        clean[lowered] = value
    if total > MAX_METADATA_BYTES:
        msg = f"metadata is {total} bytes; stores keep at most {MAX_METADATA_BYTES} (S3's limit)"
        raise InvalidMetadata(msg)
    return clean


def guess_type(key: str) -> str:
    # The leading "/" keeps a key such as "data:x" from being read as a URL scheme.
    return _MIME.guess_type("/" + key, strict=False)[0] or DEFAULT_CONTENT_TYPE


def resolve_content_type(key: str, content_type: str | None) -> str:
    if content_type is None:
        return guess_type(key)
    if not isinstance(content_type, str) or not _CONTENT_TYPE.match(content_type):
        msg = (
            f"content type {content_type!r} is not a media type such as 'image/png' "
            "or 'text/plain; charset=utf-8' (printable ASCII, no line breaks, no "
            "trailing space)"
        )
        raise InvalidMetadata(msg)
    return content_type


def expires_seconds(expires: float | datetime.timedelta) -> int:
    seconds = expires.total_seconds() if isinstance(expires, datetime.timedelta) else expires
    # Checked in this order: NaN compares false with everything, and int(inf)
    # raises OverflowError; math.isfinite would overflow on a huge int.
    valid = (
        isinstance(seconds, (int, float))
        and not isinstance(seconds, bool)
        and (isinstance(seconds, int) or math.isfinite(seconds))
        and seconds >= 1
    )
    if not valid:
        msg = (
            "expires must be a positive, finite number of seconds (at least 1) or a "
            f"timedelta, got {expires!r}"
        )
        raise ValueError(msg)
    return int(seconds)


def join_url(base_url: str, key: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(key)
