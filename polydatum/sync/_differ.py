"""``Differ``: a merge join of two key-ordered streams into new, changed and deleted items."""

from __future__ import annotations

import enum
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, runtime_checkable

from polydatum.sync._errors import DuplicateKey, FingerprintError, SyncError, UnsortedInput, show_key

T = TypeVar("T")
S = TypeVar("S")
T_co = TypeVar("T_co", covariant=True)

#: A key or fingerprint given by name: an attribute, or a mapping key (for dicts and rows).
KeySpec = str | Callable[[Any], Any]


class Kind(str, enum.Enum):
    """What a :class:`Change` does to the target.

    .. versionadded:: 2.0
    """

    NEW = "new"
    """The key is in the source only."""
    CHANGED = "changed"
    """The key is on both sides, with different fingerprints."""
    DELETED = "deleted"
    """The key is in the target only."""

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Change(Generic[S, T]):
    """One difference between the source and the target.

    Attributes:
        kind: :attr:`Kind.NEW`, :attr:`Kind.CHANGED` or :attr:`Kind.DELETED`.
        key: the key both sides share.
        source: the source's item (None when deleted).
        target: the target's item (None when new).

    .. versionadded:: 2.0
    """

    kind: Kind
    key: Any
    source: S | None
    target: T | None


@runtime_checkable
class Side(Protocol[T_co]):
    """**Protocol:** one side of a sync, able to stream its items in key order.

    The ready-made sides are :class:`Items`, :class:`~polydatum.sync.BlobSide`,
    :class:`~polydatum.sync.FolderSide`, and :class:`~polydatum.sync.sql.StoreSide`
    and :class:`~polydatum.sync.sql.CollectionSide`.

    .. versionadded:: 2.0
    """

    def scan(self, after: Any = None) -> Iterator[tuple[Any, T_co]]:
        """Yield ``(key, item)`` pairs, keys strictly ascending, from the first key above ``after``.

        ``after`` is None for the start. Read lazily (pages, cursors): the
        differ holds one item a side, and a side should hold a page at most.
        """
        ...

    def fingerprint(self, item: Any) -> Hashable:
        """What is compared when both sides hold a key: equal fingerprints, same content."""
        ...


def getter_of(spec: KeySpec | None, what: str) -> Callable[[Any], Any] | None:
    """``spec`` as a function of an item: a callable as it is, a name read as a key or an attribute."""
    if spec is None or callable(spec):
        return spec
    if isinstance(spec, str) and spec:
        name = spec

        def get(item: Any) -> Any:
            # Mappings (dicts, SQL rows) by key, anything else by attribute.
            if hasattr(item, "keys") and hasattr(item, "__getitem__"):
                return item[name]
            return getattr(item, name)

        return get
    msg = f"{what} must be a callable or a non-empty name (str), got {type(spec).__name__}"
    raise TypeError(msg)


class Items(Generic[T]):
    """A plain iterable as a :class:`Side`: any objects, already sorted by key.

    Args:
        iterable: the items, in ascending key order. A generator can be read
            only once: a second scan (a second run) raises SyncError.
        key: a callable, or the name of an attribute or mapping key.
        fingerprint: the same; None compares the items themselves.
        name: how errors name this side (the Differ passes ``"source"`` or ``"target"``).

    .. versionadded:: 2.0
    """

    def __init__(
        self, iterable: Iterable[T], *, key: KeySpec, fingerprint: KeySpec | None = None, name: str = "items"
    ) -> None:
        getter = getter_of(key, "key")
        if getter is None:
            msg = "Items needs key=: a callable or the name of the attribute that holds the key"
            raise TypeError(msg)
        self._iterable = iterable
        # An iterator (a generator) is read once: a second scan would find it empty,
        # and an empty source would make every target key look deleted.
        self._one_shot = iter(iterable) is iterable
        self._scanned = False
        self.name = name
        self._key = getter
        self._fingerprint = getter_of(fingerprint, "fingerprint")

    def scan(self, after: Any = None) -> Iterator[tuple[Any, T]]:
        """The items with their keys; with ``after``, those whose key is greater.

        Raises:
            SyncError: the iterable is an iterator (a generator) read before.
        """
        if self._one_shot and self._scanned:
            msg = (
                f"the {self.name} is an iterator (a generator) that was read already, so it would look "
                "empty now; pass a list, or a Side whose scan() reads the data again"
            )
            raise SyncError(msg)
        self._scanned = True
        return self._pairs(after)

    def _pairs(self, after: Any) -> Iterator[tuple[Any, T]]:
        key = self._key
        for item in self._iterable:
            try:
                k = key(item)
            except Exception as exc:
                msg = (
                    f"key= failed on a {self.name} item with {type(exc).__name__}; "
                    "fix key= (the cause is chained)"
                )
                raise FingerprintError(msg, side=self.name, key=None) from exc
            if after is None or after < k:
                yield k, item

    def fingerprint(self, item: Any) -> Hashable:
        """The fingerprint of ``item`` (the item itself without ``fingerprint=``)."""
        fingerprint = self._fingerprint
        result: Hashable = item if fingerprint is None else fingerprint(item)
        return result


class Tally:
    """Counters of one walk, updated as it goes; the last key every smaller key is settled for."""

    __slots__ = ("changed", "deleted", "new", "settled", "unchanged")

    def __init__(self) -> None:
        self.new = 0
        self.changed = 0
        self.deleted = 0
        self.unchanged = 0
        self.settled: Any = None

    @property
    def compared(self) -> int:
        """How many keys were settled, whatever the outcome."""
        return self.new + self.changed + self.deleted + self.unchanged


_END: Any = object()


class Differ(Generic[S, T]):
    """The new, changed and deleted items of ``target`` relative to ``source``.

    Both sides are streamed in ascending key order and merge-joined, one item
    a side at a time: memory does not grow with the number of items, so a
    million keys cost what ten do. A key on both sides is compared by
    fingerprint, which is read only then (for a blob, a ``stat`` call).

    Example::

        from polydatum.sync import Differ

        old = [("a", 1), ("b", 2), ("c", 3)]
        new = [("a", 1), ("b", 20), ("d", 4)]
        differ = Differ(new, old, key=lambda p: p[0], fingerprint=lambda p: p[1])
        assert [(c.kind.value, c.key) for c in differ] == [
            ("changed", "b"), ("deleted", "c"), ("new", "d")]

    Args:
        source: what the target should look like: a :class:`Side` or a plain
            iterable sorted by key.
        target: what is there now.
        key: for a plain iterable: a callable or an attribute/mapping name
            giving each item's key. Keys of both sides must compare with each
            other (both ``str``, or both ``int``...).
        fingerprint: for a plain iterable: the same, giving what is compared
            (a column, a content hash); None compares the items themselves.

    Raises (while iterating):
        UnsortedInput: a side's keys are not ascending.
        DuplicateKey: a side yields a key twice.
        FingerprintError: ``key`` or ``fingerprint`` raised on an item.
        SyncError: keys of the two sides cannot be compared (e.g. str and int).

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        source: Side[S] | Iterable[S],
        target: Side[T] | Iterable[T],
        *,
        key: KeySpec | None = None,
        fingerprint: KeySpec | None = None,
    ) -> None:
        self.source: Side[S] = self._side(source, "source", key, fingerprint)
        self.target: Side[T] = self._side(target, "target", key, fingerprint)

    @staticmethod
    def _side(side: Any, name: str, key: KeySpec | None, fingerprint: KeySpec | None) -> Side[Any]:
        if isinstance(side, Side):
            return side
        if isinstance(side, (str, bytes)) or not isinstance(side, Iterable):
            msg = f"{name} must be a Side (e.g. BlobSide) or an iterable of items, got {type(side).__name__}"
            raise TypeError(msg)
        if key is None:
            msg = (
                f"{name} is a plain iterable, so Differ needs key=: a callable or the name of the "
                "attribute (or mapping key) that holds each item's key"
            )
            raise TypeError(msg)
        return Items(side, key=key, fingerprint=fingerprint, name=name)

    def __iter__(self) -> Iterator[Change[S, T]]:
        return self.changes()

    def changes(self, after: Any = None, *, tally: Tally | None = None) -> Iterator[Change[S, T]]:
        """The changes, in key order; with ``after``, only those of greater keys (to resume).

        Args:
            after: skip every key up to and including this one.
            tally: counters to update as the walk goes.
        """
        walk = self.walk(after, tally or Tally(), heartbeat=0)
        return (change for change in walk if change is not None)

    def walk(self, after: Any, tally: Tally, heartbeat: int) -> Iterator[Change[S, T] | None]:
        """The changes, and a None after every ``heartbeat`` unchanged keys (0: never).

        The None lets a caller that waits for changes (the Syncer) record
        progress through a long run of unchanged keys.
        """
        source = _checked(self.source.scan(after), "source", after)
        target = _checked(self.target.scan(after), "target", after)
        source_fp = _guarded(self.source.fingerprint, "source")
        target_fp = _guarded(self.target.fingerprint, "target")
        beat = 0
        new, changed, deleted = Kind.NEW, Kind.CHANGED, Kind.DELETED
        s = next(source, _END)
        t = next(target, _END)
        while s is not _END and t is not _END:
            sk, tk = s[0], t[0]
            try:
                same = sk == tk
                before = not same and sk < tk
            except TypeError:
                msg = (
                    f"source key {show_key(sk)} ({type(sk).__name__}) and target key {show_key(tk)} "
                    f"({type(tk).__name__}) cannot be compared; make both sides' keys the same type"
                )
                raise SyncError(msg) from None
            if same:
                if source_fp(sk, s[1]) != target_fp(tk, t[1]):
                    tally.changed += 1
                    tally.settled = sk
                    yield Change(changed, sk, s[1], t[1])
                else:
                    tally.unchanged += 1
                    tally.settled = sk
                    if heartbeat:
                        beat += 1
                        if beat >= heartbeat:
                            beat = 0
                            yield None
                s = next(source, _END)
                t = next(target, _END)
            elif before:
                tally.new += 1
                tally.settled = sk
                yield Change(new, sk, s[1], None)
                s = next(source, _END)
            else:
                tally.deleted += 1
                tally.settled = tk
                yield Change(deleted, tk, None, t[1])
                t = next(target, _END)
        while s is not _END:
            tally.new += 1
            tally.settled = s[0]
            yield Change(new, s[0], s[1], None)
            s = next(source, _END)
        while t is not _END:
            tally.deleted += 1
            tally.settled = t[0]
            yield Change(deleted, t[0], None, t[1])
            t = next(target, _END)


def _checked(pairs: Iterator[tuple[Any, T]], side: str, after: Any) -> Iterator[tuple[Any, T]]:
    """``pairs``, refusing a key that is None or not greater than the one before."""
    previous = after
    for pair in pairs:
        key = pair[0]
        if key is None:
            msg = f"{side} yielded an item whose key is None; every item needs a key"
            raise FingerprintError(msg, side=side, key=None)
        if previous is not None:
            try:
                ascending = previous < key
            except TypeError:
                msg = (
                    f"{side} keys {show_key(previous)} ({type(previous).__name__}) and {show_key(key)} "
                    f"({type(key).__name__}) cannot be compared; give every key the same type"
                )
                raise UnsortedInput(msg, side=side, key=key) from None
            if not ascending:
                raise _disorder(side, previous, key)
        previous = key
        yield pair


def _disorder(side: str, previous: Any, key: Any) -> UnsortedInput:
    if previous == key:
        msg = (
            f"{side} yielded the key {show_key(key)} twice; keys must be unique (a unique column, "
            "a primary key)"
        )
        return DuplicateKey(msg, side=side, key=key)
    msg = (
        f"{side} is not sorted by key: {show_key(key)} came after {show_key(previous)}; "
        "order it by the key, ascending (in SQL, ORDER BY the key column; on PostgreSQL with "
        'COLLATE "C" for text, the order Python compares str in)'
    )
    return UnsortedInput(msg, side=side, key=key)


def _guarded(fingerprint: Callable[[Any], Hashable], side: str) -> Callable[[Any, Any], Hashable]:
    def guarded(key: Any, item: Any) -> Hashable:
        try:
            return fingerprint(item)
        except Exception as exc:
            # Our own errors say what to do; anything else may hold data, so only its type is named.
            why = (
                f": {exc}" if isinstance(exc, SyncError) else f" with {type(exc).__name__}; fix fingerprint="
            )
            msg = f"the fingerprint of {side} item {show_key(key)} failed{why} (the cause is chained)"
            raise FingerprintError(msg, side=side, key=key) from exc

    return guarded
