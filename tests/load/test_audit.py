"""The audit itself catches what it is there to catch (on hand-made logs and tables, no servers)."""

from __future__ import annotations

import pytest

from polydatum.blob import MemoryBlobStore
from tests.load.audit import AuditReport, audit_blobs, audit_writes
from tests.load.driver import Record


def rec(op: str, status: int | None, **fields: object) -> Record:
    return Record(op, 0.0, 0.0, status, **fields)  # type: ignore[arg-type]


def check(
    records: list[Record],
    notes: dict[int, tuple[str, int, str]],
    attachments: dict[int, tuple[int, str, str, int]] | None = None,
) -> AuditReport:
    report = AuditReport()
    audit_writes(report, records, notes, attachments or {})
    return report


def test_a_consistent_log_passes() -> None:
    report = check(
        [
            rec("create", 201, marker="n-1", note_id=1, version=1),
            rec("update", 200, marker="u-a", note_id=1, version=2),
            rec("update", 409, marker="u-b", note_id=1),
            rec("create", 400, marker="n-2"),
            rec("create", 500, marker="n-3"),
        ],
        {1: ("n-1", 2, "u-a edited"), 7: ("n-3", 1, "")},
    )
    assert report.problems == []
    assert report.in_doubt_committed == 1  # the 500 that committed anyway is counted, not failed


@pytest.mark.parametrize(
    ("records", "notes", "expected"),
    [
        ([rec("create", 201, marker="n-1", note_id=1, version=1)], {}, "acknowledged as note 1"),
        (
            [rec("create", 201, marker="n-1", note_id=1, version=1)],
            {1: ("n-1", 1, ""), 2: ("n-1", 1, "")},
            "expected at most one",
        ),
        ([rec("create", 422, marker="n-1")], {1: ("n-1", 1, "")}, "refused with 422"),
        ([rec("delete", 204, note_id=1)], {1: ("n-1", 1, "")}, "still there"),
        (
            [rec("create", 201, marker="n-1", note_id=1, version=1), rec("delete", 409, note_id=1)],
            {},
            "refused with 409, yet the note is gone",
        ),
        (
            [
                rec("update", 200, marker="u-a", note_id=1, version=2),
                rec("update", 200, marker="u-b", note_id=1, version=2),
            ],
            {1: ("n-1", 2, "u-b edited")},
            "lost update",
        ),
        (
            [rec("update", 200, marker="u-a", note_id=1, version=3)],
            {1: ("n-1", 2, "u-x edited")},
            "version 3",
        ),
        ([rec("update", 200, marker="u-a", note_id=1, version=2)], {1: ("n-1", 2, "u-x edited")}, "ed u-a"),
        ([rec("update", 409, marker="u-a", note_id=1)], {1: ("n-1", 2, "u-a edited")}, "the server refused"),
        ([], {}, None),
    ],
)
def test_each_kind_of_loss_is_found(
    records: list[Record], notes: dict[int, tuple[str, int, str]], expected: str | None
) -> None:
    report = check(records, notes)
    if expected is None:
        assert report.problems == []
    else:
        assert any(expected in p for p in report.problems), report.problems
        with pytest.raises(AssertionError, match="the audit found"):
            report.check()


def test_a_lost_attachment_and_a_missing_blob_are_found() -> None:
    report = check(
        [rec("attach", 201, marker="a-1", note_id=1, attachment_id=5, size=3)], {1: ("n-1", 1, "")}, {}
    )
    assert any("a-1 acknowledged as 5" in p for p in report.problems)
    store = MemoryBlobStore()
    report = AuditReport()
    audit_blobs(report, store, {5: (1, "a-1", "notes/1/x", 3)}, lambda batch: batch)
    assert report.missing_blobs == 1


def test_orphans_are_swept_and_referenced_blobs_kept() -> None:
    store = MemoryBlobStore()
    store.put("notes/1/kept", b"abc")
    store.put("notes/1/orphan", b"zz")
    report = AuditReport()
    audit_blobs(
        report,
        store,
        {5: (1, "a-1", "notes/1/kept", 3)},
        lambda batch: [k for k in batch if k == "notes/1/kept"],
    )
    assert (report.orphans, report.orphans_swept, report.problems) == (1, 1, [])
    assert list(store.list("notes/")) == ["notes/1/kept"]


def test_an_orphan_the_sweep_cannot_see_fails_the_audit() -> None:
    store = MemoryBlobStore()
    store.put("notes/1/orphan", b"zz")
    report = AuditReport()
    # A callback claiming every key is in use: the sweep removes nothing, the orphan stays.
    audit_blobs(report, store, {}, lambda batch: batch)
    assert any("did not remove" in p for p in report.problems)
