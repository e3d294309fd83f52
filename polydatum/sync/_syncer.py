"""``Syncer``: applies a Differ's changes in batches, one context each, with a checkpoint."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TextIO, TypeVar

from polydatum.sync._checkpoint import Checkpoint
from polydatum.sync._differ import Change, Differ, Tally
from polydatum.sync._errors import ApplyError, SyncError, show_key

if TYPE_CHECKING:
    from polydatum.context import DataAccessContext
    from polydatum.dal import DataManager

S = TypeVar("S")
T = TypeVar("T")

KINDS = ("new", "changed", "deleted")


@dataclass(frozen=True)
class Report:
    """What a :meth:`Syncer.run` did (or, for a dry run, would do).

    The counts cover the whole sync: when the run resumed from a checkpoint,
    they include what the interrupted runs applied before it.

    Attributes:
        new: keys only in the source.
        changed: keys whose fingerprints differ.
        deleted: keys only in the target.
        unchanged: keys in step already.
        batches: batches committed by this run.
        dry_run: nothing was applied.
        resumed_from: the checkpoint key this run started after, or None.

    .. versionadded:: 2.0
    """

    new: int = 0
    changed: int = 0
    deleted: int = 0
    unchanged: int = 0
    batches: int = 0
    dry_run: bool = False
    resumed_from: Any = None
    counts: Mapping[str, int] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        counts = {
            "new": self.new,
            "changed": self.changed,
            "deleted": self.deleted,
            "unchanged": self.unchanged,
        }
        object.__setattr__(self, "counts", counts)

    def __str__(self) -> str:
        verb = "would apply" if self.dry_run else "applied"
        text = (
            f"{verb}: {self.new} new, {self.changed} changed, {self.deleted} deleted; "
            f"{self.unchanged} unchanged"
        )
        if not self.dry_run:
            text += f" ({self.batches} batch{'' if self.batches == 1 else 'es'})"
        if self.resumed_from is not None:
            text += f"; resumed after {show_key(self.resumed_from)}"
        return text


class _Progress:
    """One line on a terminal, redrawn at most ten times a second; a bar when the total is known."""

    def __init__(self, stream: TextIO, label: str, total: int | None, width: int = 24) -> None:
        self.stream = stream
        self.label = label
        self.total = total
        self.width = width
        self.start = time.monotonic()
        self.last = 0.0

    def line(self, tally: Tally, now: float) -> str:
        done = tally.compared
        rate = done / max(now - self.start, 1e-9)
        counts = f"new {tally.new}  changed {tally.changed}  deleted {tally.deleted}"
        if not self.total:
            return f"{self.label}: {done} compared ({rate:,.0f}/s)  {counts}"
        # The total is the caller's estimate (e.g. the source's count): deleted keys may exceed it.
        fraction = min(done / self.total, 1.0)
        filled = int(fraction * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        return f"{self.label} [{bar}] {fraction:4.0%} {done}/{self.total} ({rate:,.0f}/s)  {counts}"

    def update(self, tally: Tally, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < 0.1:
            return
        self.last = now
        self.stream.write("\r" + self.line(tally, now))
        self.stream.flush()

    def close(self, tally: Tally) -> None:
        self.update(tally, force=True)
        self.stream.write("\n")
        self.stream.flush()


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Syncer(Generic[S, T]):
    """Applies the changes a :class:`Differ` finds, in batches, each in its own context.

    Each batch opens ``data_manager.context(meta)`` and calls ``apply(ctx,
    change)`` for each change in it (or ``apply_batch(ctx, changes)`` once),
    so the batch commits or rolls back whole. After each commit the
    checkpoint records the last key settled; a run that stopped (an
    exception, a crash, a kill) resumes there the next time, and the
    checkpoint is cleared once a run finishes.

    Resuming is safe even when the process died between a commit and the
    checkpoint's save: the differ compares again, and a change applied
    already is no longer a difference. A second run after a complete one
    finds nothing to do.

    Example::

        syncer = Syncer(Differ(BlobSide(blobs, "notes/"), StoreSide(dm, Attachment, key="key")),
                        apply=apply_one, data_manager=dm, checkpoint=FileCheckpoint("sync.json"))
        print(syncer.run(dry_run=True))   # prints the plan
        print(syncer.run())               # applies it: "applied: 3 new, 1 changed, ..."

    Args:
        differ: what to apply.
        apply: called as ``apply(ctx, change)`` for each change.
        apply_batch: instead of ``apply``: called as ``apply_batch(ctx, changes)``
            once a batch (bulk statements).
        data_manager: opens one context a batch.
        batch_size: changes a batch, at most.
        checkpoint: where the position is kept; None: no resuming.
        meta: the meta of each batch's context.
        progress: show a progress line on stderr: None (default) when it is a terminal.
        total: about how many keys there are (e.g. the source's count): the
            progress line then draws a bar. None: counts and rate only.
        label: how the progress line and errors name this sync.

    .. versionadded:: 2.0
    """

    def __init__(
        self,
        differ: Differ[S, T],
        apply: Callable[[DataAccessContext, Change[S, T]], object] | None = None,
        *,
        apply_batch: Callable[[DataAccessContext, Sequence[Change[S, T]]], object] | None = None,
        data_manager: DataManager,
        batch_size: int = 500,
        checkpoint: Checkpoint | None = None,
        meta: Mapping[str, Any] | None = None,
        progress: bool | None = None,
        total: int | None = None,
        label: str = "sync",
    ) -> None:
        if not isinstance(differ, Differ):
            msg = f"Syncer needs a Differ, got {type(differ).__name__}"
            raise TypeError(msg)
        if (apply is None) == (apply_batch is None):
            msg = "pass exactly one of apply= (called once a change) and apply_batch= (once a batch)"
            raise TypeError(msg)
        if not callable(apply if apply is not None else apply_batch):
            msg = "apply= / apply_batch= must be callable"
            raise TypeError(msg)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            msg = f"batch_size must be an int of at least 1, got {batch_size!r}"
            raise ValueError(msg)
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            msg = (
                "checkpoint must have load, save and clear (e.g. FileCheckpoint), "
                f"got {type(checkpoint).__name__}"
            )
            raise TypeError(msg)
        if not hasattr(data_manager, "context"):
            msg = f"data_manager must be a polydatum DataManager, got {type(data_manager).__name__}"
            raise TypeError(msg)
        self.differ = differ
        self.apply = apply
        self.apply_batch = apply_batch
        self.data_manager = data_manager
        self.batch_size = batch_size
        self.checkpoint = checkpoint
        self.meta = dict(meta) if meta is not None else None
        if total is not None and (isinstance(total, bool) or not isinstance(total, int) or total < 0):
            msg = f"total must be an int of 0 or more (the number of keys, about), got {total!r}"
            raise ValueError(msg)
        self.progress = progress
        self.total = total
        self.label = label

    def run(self, *, dry_run: bool = False, out: TextIO | None = None) -> Report:
        """Apply every change (or, with ``dry_run``, print the plan) and report the counts.

        Args:
            dry_run: apply nothing and save no checkpoint; print one line a
                change (``new      notes/1/a.txt``) and the report to ``out``.
            out: where a dry run prints; default stdout.

        Raises:
            ApplyError: a change could not be applied; its batch was rolled back.
            SyncError: bad input (see :class:`Differ`) or a bad checkpoint.
        """
        saved = self.checkpoint.load() if self.checkpoint is not None else None
        after, carried = saved if saved is not None else (None, {})
        tally = Tally()
        tally.new, tally.changed, tally.deleted, tally.unchanged = (
            carried.get(name, 0) for name in (*KINDS, "unchanged")
        )
        show = self.progress if self.progress is not None else _is_terminal(sys.stderr)
        progress = _Progress(sys.stderr, self.label, self.total) if show else None
        if dry_run:
            self._plan(after, tally, progress, out if out is not None else sys.stdout)
            return self._report(tally, 0, True, after)
        batches = 0
        batch: list[Change[S, T]] = []
        for change in self.differ.walk(after, tally, heartbeat=self.batch_size):
            if change is not None:
                batch.append(change)
                if len(batch) < self.batch_size:
                    continue
            # A full batch, or a long run of unchanged keys: commit and move the checkpoint.
            if batch:
                self._apply(batch)
                batches += 1
                batch = []
            self._save(tally)
            if progress is not None:
                progress.update(tally)
        if batch:
            self._apply(batch)
            batches += 1
        if self.checkpoint is not None:
            self.checkpoint.clear()
        if progress is not None:
            progress.close(tally)
        return self._report(tally, batches, False, after)

    def _plan(self, after: Any, tally: Tally, progress: _Progress | None, out: TextIO) -> None:
        for change in self.differ.walk(after, tally, heartbeat=self.batch_size):
            if change is not None:
                key = change.key if isinstance(change.key, str) else repr(change.key)
                out.write(f"{change.kind.value:<8} {key}\n")
            if progress is not None:
                progress.update(tally)
        if progress is not None:
            progress.close(tally)
        out.write(f"{self._report(tally, 0, True, after)}\n")
        out.flush()

    def _apply(self, batch: list[Change[S, T]]) -> None:
        current: Change[S, T] | None = None
        try:
            with self.data_manager.context(self.meta) as ctx:
                if self.apply_batch is not None:
                    self.apply_batch(ctx, batch)
                else:
                    apply = self.apply
                    assert apply is not None
                    for current in batch:
                        apply(ctx, current)
                    current = None
        except SyncError:
            raise
        except Exception as exc:
            first, last = show_key(batch[0].key), show_key(batch[-1].key)
            where = (
                f"applying the {current.kind.value} change of {show_key(current.key)}"
                if current is not None
                else f"applying (or committing) the batch from {first} to {last}"
            )
            msg = (
                f"{self.label}: {where} failed with {type(exc).__name__}; the batch of {len(batch)} "
                "changes was rolled back. Fix the cause and run again: the sync resumes at its "
                "last committed batch (the cause is chained)"
            )
            failed = current if current is not None else batch[0]
            raise ApplyError(msg, key=failed.key, kind=failed.kind.value) from exc

    def _save(self, tally: Tally) -> None:
        if self.checkpoint is None or tally.settled is None:
            return
        counts = {
            "new": tally.new,
            "changed": tally.changed,
            "deleted": tally.deleted,
            "unchanged": tally.unchanged,
        }
        self.checkpoint.save(tally.settled, counts)

    def _report(self, tally: Tally, batches: int, dry_run: bool, after: Any) -> Report:
        return Report(
            new=tally.new,
            changed=tally.changed,
            deleted=tally.deleted,
            unchanged=tally.unchanged,
            batches=batches,
            dry_run=dry_run,
            resumed_from=after,
        )
