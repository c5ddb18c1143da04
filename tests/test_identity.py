"""Business-scoped user ids: announced changes are followed, so no STOP is lost to a new id."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine, select

from tests import payloads as p
from tests.test_run import contact, deliver, loaded, opted_in
from waconsent.connectors.whatsapp import parse_payload
from waconsent.domain import Activity, EventKind, Signal, UserIdChange
from waconsent.store import proof as proof_store
from waconsent.store.contacts import upsert_contacts
from waconsent.store.tables import identity_links
from waconsent.sync import rules
from waconsent.sync.run import run_once

T0 = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)
NOW = datetime(2026, 11, 28, 12, 0, tzinfo=UTC)
NUMBER = "4915123456789"
OLD, NEW = "DE.1111111111111111111", "DE.2222222222222222222"


def clock() -> datetime:
    return NOW


def only(change: dict[str, Any]) -> Any:
    parsed = parse_payload(p.payload(change))
    assert not parsed.skipped, parsed.skipped
    assert len(parsed.events) == 1
    return parsed.events[0]


# ---- the shapes Meta documents ----------------------------------------------------------------


def test_user_changed_user_id_as_documented_since_august_2026() -> None:
    """`user_changed_user_id` with system.user_id and system.previous_user_id, no number."""
    event = only(
        p.system(
            None,
            T0,
            type="user_changed_user_id",
            user_id=NEW,
            previous_user_id=OLD,
            previous_parent_user_id="DE.ENT.1",
            parent_user_id="DE.ENT.2",
        )
    )
    assert event.signal is Signal.USER_ID_CHANGED and not event.opens_session
    assert (event.wa_id, event.user_id, event.new_user_id) == (None, OLD, NEW)
    assert UserIdChange.of(event) == UserIdChange(T0, OLD, NEW)


def test_user_changed_user_id_with_the_users_number() -> None:
    """The earlier shape: `from` and `system.wa_id` name the (same) number, no previous id."""
    event = only(p.system(NUMBER, T0, type="user_changed_user_id", wa_id=NUMBER, user_id=NEW))
    assert event.signal is Signal.USER_ID_CHANGED
    assert (event.wa_id, event.user_id, event.new_user_id) == (NUMBER, None, NEW)
    assert event.match_user_id == NEW  # found by the new id, joined to the number


def test_user_id_update_field() -> None:
    """The `user_id_update` field: user_id.previous and user_id.current."""
    event = only(p.user_id_update(NUMBER, T0, OLD, NEW))
    assert (event.kind, event.signal) == (EventKind.ID_CHANGE, Signal.USER_ID_CHANGED)
    assert (event.wa_id, event.user_id, event.new_user_id) == (NUMBER, OLD, NEW)


@pytest.mark.parametrize("key", ["wa_id", "new_wa_id"])
def test_user_changed_number_reads_the_new_number_from_either_key(key: str) -> None:
    """The new number comes from system.wa_id, or from the older system.new_wa_id."""
    event = only(
        p.system(
            NUMBER,
            T0,
            type="user_changed_number",
            **{key: "4915199999999"},
            user_id=NEW,
            previous_user_id=OLD,
        )
    )
    assert event.signal is Signal.NUMBER_CHANGED
    assert (event.wa_id, event.new_wa_id) == (NUMBER, "4915199999999")
    assert (event.user_id, event.new_user_id) == (OLD, NEW)
    assert UserIdChange.of(event) is None  # a number change links nothing


def test_user_changed_user_id_naming_another_number_is_a_number_change() -> None:
    """Before August 2026 Meta sent number changes as user_changed_user_id: read as such."""
    event = only(
        p.system(NUMBER, T0, type="user_changed_user_id", wa_id="4915199999999", user_id=NEW)
    )
    assert event.signal is Signal.NUMBER_CHANGED and event.new_wa_id == "4915199999999"


def test_broken_change_items_are_skipped_by_location() -> None:
    """A user_id_update without user_id.current is skipped; its neighbours are kept."""
    good = p.user_id_update(NUMBER, T0, OLD, NEW)
    bad = p.user_id_update(NUMBER, T0, OLD, NEW)
    bad["value"]["user_id_update"][0]["user_id"] = {"previous": OLD}
    parsed = parse_payload(p.payload(good, bad))
    assert len(parsed.events) == 1
    assert parsed.skipped[0].location == "entry[0].changes[1].value.user_id_update[0]"


# ---- the rules --------------------------------------------------------------------------------


def test_rules_follow_an_announced_change_of_the_held_user_id() -> None:
    """A record holding the old id gets the new one; a chain of changes is followed."""
    third = "DE.3333333333333333333"
    activity = Activity(
        user_id_changes=(
            UserIdChange(T0, OLD, NEW),
            UserIdChange(T0 + timedelta(days=1), NEW, third),
        ),
        event_count=2,
    )
    record = rules.CrmRecord("A", {"whatsapp_user_id": OLD})
    decision = rules.decide(record, activity, {"whatsapp_user_id"}, NOW)
    assert [(c.field, c.old, c.new) for c in decision.changes] == [("whatsapp_user_id", OLD, third)]
    unrelated = rules.CrmRecord("B", {"whatsapp_user_id": "DE.9"})
    assert not rules.decide(unrelated, activity, {"whatsapp_user_id"}, NOW).changes


def test_a_loop_of_changes_ends() -> None:
    """Changes that lead back to an earlier id cannot spin."""
    loop = (UserIdChange(T0, OLD, NEW), UserIdChange(T0 + timedelta(seconds=1), NEW, OLD))
    assert rules.current_user_id(OLD, loop) == NEW


# ---- end to end on the ledger -----------------------------------------------------------------


def test_stop_under_a_new_user_id_reaches_the_record_of_the_old_one(
    engine: Engine, store_url: str
) -> None:
    """A record known by number and old id is revoked by a STOP carrying only the new id,
    its user id is updated, and the report lists the change."""
    cfg = loaded(store_url)
    upsert_contacts(
        engine,
        [opted_in("A", "0151 23456789", whatsapp_user_id=OLD), opted_in("B", "0170 1112233")],
        NOW,
    )
    deliver(engine, cfg, p.message(NUMBER, T0, "hi", user_id=OLD))
    run_once(cfg, engine=engine, clock=clock)
    deliver(
        engine,
        cfg,
        p.system(
            None,
            T0 + timedelta(hours=1),
            type="user_changed_user_id",
            user_id=NEW,
            previous_user_id=OLD,
        ),
        p.user_preference(NEW, T0 + timedelta(hours=2), "stop"),
    )
    report = run_once(cfg, engine=engine, clock=clock)
    row = contact(engine, "A")
    assert row.opt_in is False and row.opt_out_date == T0 + timedelta(hours=2)
    assert row.whatsapp_user_id == NEW
    assert contact(engine, "B").opt_in is True
    assert report.user_id_changes == [
        {"from": OLD, "to": NEW, "number": "", "at": "2026-11-20T10:00:00Z"}
    ]
    assert report.unmatched_numbers == 0


def test_link_and_user_id_only_stop_in_one_run(engine: Engine, store_url: str) -> None:
    """When one run sees the message that joins a number to a user id and a STOP that
    carries only the user id, the STOP applies in that run."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(
        engine,
        cfg,
        p.message(NUMBER, T0, "hello", user_id=NEW),
        p.user_preference(NEW, T0 + timedelta(minutes=5), "stop"),
    )
    report = run_once(cfg, engine=engine, clock=clock)
    assert report.revocations == 1
    row = contact(engine, "A")
    assert row.opt_in is False and row.whatsapp_user_id == NEW


def test_user_id_update_links_old_and_new_ids(engine: Engine, store_url: str) -> None:
    """The `user_id_update` field links the ids both ways round, in the store."""
    cfg = loaded(store_url)
    deliver(engine, cfg, p.user_id_update(NUMBER, T0, OLD, NEW))
    with engine.connect() as connection:
        links = set(connection.execute(select(identity_links.c.key, identity_links.c.linked_key)))
    assert links == {
        (f"uid:{OLD}", f"uid:{NEW}"),
        (f"uid:{NEW}", f"uid:{OLD}"),
        (f"+{NUMBER}", f"uid:{NEW}"),
        (f"uid:{NEW}", f"+{NUMBER}"),
    }


def test_targeted_run_follows_the_new_id(engine: Engine, store_url: str) -> None:
    """The write-back `serve` starts for a STOP carrying only the new id finds the record."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789", whatsapp_user_id=OLD)], NOW)
    run_once(cfg, engine=engine, clock=clock)
    deliver(
        engine,
        cfg,
        p.user_id_update(None, T0, OLD, NEW),
        p.user_preference(NEW, T0 + timedelta(hours=1), "stop"),
    )
    report = run_once(cfg, engine=engine, clock=clock, only_keys={f"uid:{NEW}"})
    assert report.mode == "targeted" and report.revocations == 1
    assert contact(engine, "A").opt_in is False


def test_number_change_moves_no_consent(engine: Engine, store_url: str) -> None:
    """A user_changed_number is reported; a STOP from the new number leaves the record of
    the old number alone, even though both numbers had user ids."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789")], NOW)
    deliver(
        engine,
        cfg,
        p.message(NUMBER, T0, "hi", user_id=OLD),
        p.system(
            NUMBER,
            T0 + timedelta(hours=1),
            type="user_changed_number",
            wa_id="4915199999999",
            user_id=NEW,
            previous_user_id=OLD,
        ),
        p.message("4915199999999", T0 + timedelta(hours=2), "STOP", user_id=NEW),
    )
    report = run_once(cfg, engine=engine, clock=clock)
    assert contact(engine, "A").opt_in is True
    assert report.number_changes[0]["to"] == "**********999"
    assert report.unmatched_numbers == 1  # the new number has no record


def test_proof_lists_events_under_every_linked_user_id(engine: Engine, store_url: str) -> None:
    """`proof PHONE` shows the STOP that came under the new id and the change itself."""
    cfg = loaded(store_url)
    upsert_contacts(engine, [opted_in("A", "0151 23456789", whatsapp_user_id=OLD)], NOW)
    run_once(cfg, engine=engine, clock=clock)
    deliver(
        engine,
        cfg,
        p.system(None, T0, type="user_changed_user_id", user_id=NEW, previous_user_id=OLD),
        p.user_preference(NEW, T0 + timedelta(hours=1), "stop"),
    )
    run_once(cfg, engine=engine, clock=clock)
    with engine.connect() as connection:
        rows = proof_store.evidence_for(connection, [f"+{NUMBER}"])
    whats = [(row["what"], row["detail"]) for row in rows]
    assert ("whatsapp message: user_id_changed", f"user_changed_user_id -> {NEW}") in whats
    assert ("whatsapp preference: opt_out", "user_preferences:stop") in whats
    assert any(
        row["what"] == "CRM write confirmed" and "opt_in=False" in row["detail"] for row in rows
    )
