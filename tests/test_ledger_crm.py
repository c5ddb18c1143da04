"""The ledger as a CRM: reads page by keyset, writes answer per record."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from waconsent.connectors.ledger import LedgerCrm
from waconsent.domain import WriteRequest
from waconsent.store.contacts import upsert_contacts

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def test_reads_page_through_everything_and_changed_since(engine: Engine) -> None:
    """read_all and read_changed_since page with a keyset; boundary records are included."""
    upsert_contacts(engine, [{"id": f"C{i:03d}", "mobile_phone": "0151"} for i in range(25)], T0)
    upsert_contacts(engine, [{"id": "LATE"}], T0 + timedelta(hours=1))
    crm = LedgerCrm(engine, read_chunk_size=10)
    assert [r.record_id for r in crm.read_all()] == [f"C{i:03d}" for i in range(25)] + ["LATE"]
    assert crm.usage()["api_calls"] == 3
    changed = [r.record_id for r in crm.read_changed_since(T0 + timedelta(hours=1))]
    assert changed == ["LATE"]
    assert len(list(crm.read_changed_since(T0))) == 26
    assert [r.record_id for r in crm.read_by_ids(["C003", "NOPE", "C003"])] == ["C003"]


def test_apply_answers_per_record_and_spares_neighbours(engine: Engine) -> None:
    """A missing id and an unknown field fail alone; the other writes land."""
    upsert_contacts(engine, [{"id": "A", "opt_in": True}, {"id": "B", "opt_in": True}], T0)
    crm = LedgerCrm(engine, clock=lambda: T0 + timedelta(days=1))
    results = crm.write(
        [
            WriteRequest("A", {"opt_in": False, "opt_out_date": T0}),
            WriteRequest("GONE", {"opt_in": False}),
            WriteRequest("B", {"colour": "blue"}),
            WriteRequest("B", {"last_inbound": T0}),
        ]
    )
    assert [(r.record_id, r.ok, r.code, r.permanent) for r in results] == [
        ("A", True, "", False),
        ("GONE", False, "NOT_FOUND", True),
        ("B", False, "INVALID_FIELD", True),
        ("B", True, "", False),
    ]
    rows = {r.record_id: r for r in crm.read_all()}
    assert rows["A"].fields["opt_in"] is False and rows["A"].fields["opt_out_date"] == T0
    assert rows["B"].fields["opt_in"] is True and rows["B"].fields["last_inbound"] == T0
    assert rows["A"].modified_at == T0 + timedelta(days=1)
