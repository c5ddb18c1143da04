"""Incremental runs look only at records with meaningful activity, and read them the
cheaper way: by id, or all at once when that costs fewer calls."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import Engine

from tests import payloads as p
from tests.test_run import NOW, T0, clock, deliver, loaded, opted_in
from waconsent.connectors.ledger import LedgerCrm
from waconsent.store.contacts import upsert_contacts
from waconsent.sync.ingest import ingest_payload, keyword_rules
from waconsent.sync.run import run_once

COUNT = 200


def number(n: int) -> str:
    return f"4915123{n:06d}"


class SmallReads(LedgerCrm):
    """A ledger whose reads by id carry 10 records, so the cost curve crosses early."""

    ids_per_read = 10


def org(engine: Engine, store_url: str) -> SmallReads:
    cfg = loaded(store_url, lookback_seconds=0, read_chunk_size=100)
    upsert_contacts(
        engine,
        [opted_in(f"R{n}", "0" + number(n)[2:]) for n in range(COUNT - 1)],
        T0 - timedelta(days=3),
    )
    # the newest edit sits alone on the watermark, which `>=` re-reads (harmlessly)
    upsert_contacts(engine, [opted_in("Z", "0170 1112233")], T0 - timedelta(days=2))
    crm = SmallReads(engine, read_chunk_size=100)
    first = run_once(cfg, engine=engine, clock=clock, connector=crm)
    assert first.read_plan == "full" and first.records_read == COUNT
    return crm


def test_campaign_statuses_cost_no_reads(engine: Engine, store_url: str) -> None:
    """sent/delivered/read statuses for every number plus 10 STOPs: only the 10 are read."""
    crm = org(engine, store_url)
    cfg = loaded(store_url, lookback_seconds=0, read_chunk_size=100)
    statuses = [
        p.status(number(n), T0, state)
        for n in range(COUNT - 1)
        for state in ("sent", "delivered", "read")
    ]
    stops = [p.message(number(n), T0 + timedelta(minutes=5), "STOP") for n in range(10)]
    deliver(engine, cfg, *statuses, *stops)
    report = run_once(cfg, engine=engine, clock=clock, connector=crm)
    assert (report.read_plan, report.records_read, report.revocations) == (
        "changed+ids",
        10 + 1,
        10,
    )


def test_meaningful_statuses_still_count(engine: Engine, store_url: str) -> None:
    """A 131050 failure and a free-entry-point status make their records need a look."""
    crm = org(engine, store_url)
    cfg = loaded(store_url, lookback_seconds=0, read_chunk_size=100)
    window = {
        "conversation": {
            "id": "c1",
            "expiration_timestamp": p.unix(T0 + timedelta(hours=48)),
            "origin": {"type": "referral_conversion"},
        },
        "pricing": {
            "billable": False,
            "pricing_model": "PMP",
            "type": "free_entry_point",
            "category": "referral_conversion",
        },
    }
    deliver(
        engine,
        cfg,
        p.status(number(1), T0, "failed", codes=(131050,)),
        p.status(number(2), T0, "sent", **window),
        p.status(number(3), T0, "read"),
    )
    report = run_once(cfg, engine=engine, clock=clock, connector=crm)
    assert report.records_read == 2 + 1
    assert set(report.revoked) == {"R1 (R1)"}


def test_many_active_records_are_read_all_at_once(engine: Engine, store_url: str) -> None:
    """25 active records would cost 3 reads by id; all 200 cost 2 pages: the run reads all."""
    crm = org(engine, store_url)
    cfg = loaded(store_url, lookback_seconds=0, read_chunk_size=100)
    rules = keyword_rules(cfg.settings)
    ingest_payload(
        engine,
        p.payload(*[p.message(number(n), T0, "hi") for n in range(25)]),
        rules,
        "test",
        lambda: NOW,
    )
    report = run_once(cfg, engine=engine, clock=lambda: NOW + timedelta(minutes=1), connector=crm)
    assert report.mode == "incremental" and report.read_plan == "full"
    assert "3 reads by id" in report.read_plan_reason and "2 pages" in report.read_plan_reason
    assert report.records_read == COUNT and report.sessions_updated == 25
    ingest_payload(
        engine,
        p.payload(*[p.message(number(n), T0 + timedelta(hours=1), "hi") for n in range(15)]),
        rules,
        "test",
        lambda: NOW + timedelta(minutes=2),
    )
    fewer = run_once(cfg, engine=engine, clock=lambda: NOW + timedelta(minutes=3), connector=crm)
    assert fewer.read_plan == "changed+ids" and fewer.sessions_updated == 15
