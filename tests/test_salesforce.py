"""The Salesforce connector against the stateful fake org (tests/fakes/salesforce.py)."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.fakes.salesforce import INSTANCE, MAX_URI, Clock, FakeSalesforce, Literal, parse_soql
from waconsent.config import LoadedConfig, Secrets, parse
from waconsent.connectors.http import RetryPolicy
from waconsent.connectors.salesforce import SalesforceConnector
from waconsent.connectors.salesforce_soql import select_by_ids, select_changed_since
from waconsent.connectors.salesforce_values import format_datetime, parse_datetime
from waconsent.domain import CrmRecord, WriteRequest
from waconsent.errors import ApiLimitExhausted, AuthenticationError, ConfigError, ConnectionFailed

USER = "integration@acme.example"
PASSWORD, TOKEN = "s3cret-Pa55", "TOKEN123456"
T0 = datetime(2026, 1, 31, 9, 0, 0, tzinfo=UTC)
FIELDS = {
    "opt_in": "WhatsApp_Opt_In__c",
    "opt_in_date": "WhatsApp_Opt_In_Date__c",
    "opt_in_ip": "WhatsApp_Opt_In_IP__c",
    "opt_in_source": "WhatsApp_Opt_In_Source__c",
    "opt_out_date": "WhatsApp_Opt_Out_Date__c",
    "last_inbound": "WhatsApp_Last_Inbound__c",
    "session_expires": "WhatsApp_Session_Expires__c",
    "proof_missing": "WhatsApp_Consent_Proof_Missing__c",
    "whatsapp_user_id": "WhatsApp_User_Id__c",
}
PRESETS = Path(__file__).resolve().parents[1] / "waconsent" / "config" / "presets"


def make_config(
    salesforce: dict[str, Any] | None = None,
    mapping: dict[str, Any] | None = None,
    secrets: dict[str, str] | None = None,
) -> LoadedConfig:
    raw = {
        "crm": {"kind": "salesforce"},
        "salesforce": {
            "auth": "password",
            "username": USER,
            "domain": "login",
            "instance_url": INSTANCE,
            **(salesforce or {}),
        },
        "mapping": {
            "object": "Contact",
            "phone_fields": ["MobilePhone", "Phone"],
            "fields": FIELDS,
            **(mapping or {}),
        },
    }
    env = {"SALESFORCE_PASSWORD": PASSWORD, "SALESFORCE_SECURITY_TOKEN": TOKEN}
    return LoadedConfig(parse(raw), Secrets(env if secrets is None else secrets), None)


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def fake(clock: Clock) -> Iterator[FakeSalesforce]:
    org = FakeSalesforce(clock=clock)
    org.users[USER] = PASSWORD + TOKEN
    with org.active():
        yield org


@pytest.fixture
def waits() -> list[float]:
    return []


@pytest.fixture
def policy(waits: list[float]) -> RetryPolicy:
    # jitter at its ceiling makes the backoff deterministic: 1, 2, 4, ... seconds
    return RetryPolicy(sleep=waits.append, jitter=lambda low, high: high)


def connect(config: LoadedConfig, policy: RetryPolicy, **kwargs: Any) -> SalesforceConnector:
    return SalesforceConnector(
        config.settings.salesforce, config.settings.mapping, _auth(config), policy=policy, **kwargs
    )


def _auth(config: LoadedConfig) -> Any:
    from waconsent.connectors.salesforce_auth import authenticator

    return authenticator(config.settings.salesforce, config.secrets)


@pytest.fixture
def sf(policy: RetryPolicy) -> Iterator[SalesforceConnector]:
    connector = SalesforceConnector.from_config(make_config(), policy=policy)
    yield connector
    connector.close()


def add_contacts(fake: FakeSalesforce, count: int, **values: Any) -> list[str]:
    return [
        fake.add(
            "Contact",
            LastName=f"Person {n}",
            MobilePhone=f"+49151{n:07d}",
            WhatsApp_Opt_In__c=False,
            **values,
        )
        for n in range(count)
    ]


# ---- reads ----------------------------------------------------------------------------------


def test_read_all_of_4500_contacts_takes_three_query_pages(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """4,500 Contacts are read in three pages of at most 2,000, following nextRecordsUrl."""
    ids = add_contacts(fake, 4500)
    records = list(sf.read_all())
    assert [r.record_id for r in records] == ids
    assert fake.query_calls == 3
    assert sf.usage()["api_calls"] == 3


def test_read_selects_only_id_modstamp_phones_and_mapped_fields(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """The SOQL names Id, SystemModstamp, the phone fields and the mapped fields, nothing else."""
    add_contacts(fake, 1)
    list(sf.read_all())
    assert fake.queries[-1].fields == (
        "Id",
        "SystemModstamp",
        "MobilePhone",
        "Phone",
        *FIELDS.values(),
    )


def test_read_converts_fields_to_logical_values(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """Checkboxes become bools, dateTimes aware UTC, phones stay raw (junk included)."""
    record_id = fake.add(
        "Contact",
        MobilePhone="0151 2345678",
        Phone="n/a",
        WhatsApp_Opt_In__c=True,
        WhatsApp_Opt_In_Date__c=datetime(2026, 1, 30, 8, 15, 42, tzinfo=UTC),
        WhatsApp_Opt_In_IP__c="203.0.113.9",
        WhatsApp_Opt_In_Source__c="web form",
    )
    (record,) = sf.read_all()
    assert record == CrmRecord(
        record_id=record_id,
        fields={
            "opt_in": True,
            "opt_in_date": datetime(2026, 1, 30, 8, 15, 42, tzinfo=UTC),
            "opt_in_ip": "203.0.113.9",
            "opt_in_source": "web form",
            "opt_out_date": None,
            "last_inbound": None,
            "session_expires": None,
            "proof_missing": False,
            "whatsapp_user_id": None,
        },
        phones={"MobilePhone": "0151 2345678", "Phone": "n/a"},
        modified_at=T0,
    )


def test_incremental_read_filters_on_systemmodstamp_at_or_after_the_watermark(
    fake: FakeSalesforce, sf: SalesforceConnector, clock: Clock
) -> None:
    """`SystemModstamp >= since` as a dateTime literal, ordered; the boundary record is kept."""
    old = fake.add("Contact", LastName="old")
    clock.advance(60)
    boundary = fake.add("Contact", LastName="at the watermark")
    clock.advance(1)
    newer = fake.add("Contact", LastName="newer")
    records = list(sf.read_changed_since(T0 + timedelta(seconds=60)))
    assert [r.record_id for r in records] == [boundary, newer]
    assert old not in {r.record_id for r in records}
    query = fake.queries[-1]
    assert query.conditions == [
        ("cmp", "SystemModstamp", ">=", Literal("datetime", T0 + timedelta(seconds=60)))
    ]
    assert query.order_by == (("SystemModstamp", False), ("Id", False))


def test_incremental_read_after_own_writes_costs_one_page_and_then_nothing(
    fake: FakeSalesforce, sf: SalesforceConnector, clock: Clock
) -> None:
    """Own write-back shows up once in one page; a read with nothing new is one empty page."""
    ids = add_contacts(fake, 4500)
    clock.advance(3600)
    written_at = clock()
    sf.write([WriteRequest(i, {"opt_in": True}) for i in ids[:450]])
    before = fake.query_calls
    changed = list(sf.read_changed_since(written_at))
    assert {r.record_id for r in changed} == set(ids[:450])
    assert fake.query_calls == before + 1
    clock.advance(600)
    assert list(sf.read_changed_since(clock())) == []
    assert fake.query_calls == before + 2


def test_read_by_ids_keeps_every_query_under_the_uri_limit(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """3,000 ids go out in several Id IN (...) queries, none longer than Salesforce accepts."""
    ids = add_contacts(fake, 3000)
    found = list(sf.read_by_ids(list(reversed(ids))))
    assert {r.record_id for r in found} == set(ids)
    in_queries = [q for q in fake.queries if q.conditions and q.conditions[0][0] == "in"]
    assert len(in_queries) == fake.query_calls >= 2
    assert sum(len(q.conditions[0][2]) for q in in_queries) == 3000
    assert all(len(q.text) < MAX_URI for q in in_queries)
    assert ("GET", "414") not in fake.calls


def test_read_by_ids_leaves_out_strings_that_cannot_be_ids(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """A hostile 'id' never reaches the SOQL (Salesforce would refuse the whole query)."""
    (real,) = add_contacts(fake, 1)
    hostile = "003' OR Name != '"
    found = list(sf.read_by_ids([hostile, real]))
    assert [r.record_id for r in found] == [real]
    assert fake.queries[-1].literals == [Literal("string", real)]


HOSTILE = [
    "0151' OR Name != '",
    "\\' OR Id != null --",
    "trailing backslash \\",
    "') OR (Id != null",
    "x' AND SystemModstamp >= 2000-01-01T00:00:00Z OR Id = 'y",
    "SELECT Id FROM Contact",
    '%_\\% "double" \n newline',
]


@pytest.mark.parametrize("value", HOSTILE)
def test_quotes_backslashes_and_keywords_stay_one_literal(value: str) -> None:
    """Whatever a value holds, the fake's SOQL parser reads exactly one string literal back."""
    (soql,) = select_by_ids("Contact", ("Id", "MobilePhone"), [value])
    query = parse_soql(soql)
    assert query.conditions == [("in", "Id", [Literal("string", value)], False)]
    assert query.object == "Contact" and query.fields == ("Id", "MobilePhone")


def test_watermark_becomes_a_utc_datetime_literal_to_the_second() -> None:
    """A watermark with an offset and microseconds is sent as that UTC second, unquoted."""
    since = datetime(2026, 1, 31, 10, 30, 5, 987654, tzinfo=timezone(timedelta(hours=1)))
    query = parse_soql(select_changed_since("Contact", ("Id",), since))
    assert query.conditions == [
        (
            "cmp",
            "SystemModstamp",
            ">=",
            Literal("datetime", datetime(2026, 1, 31, 9, 30, 5, tzinfo=UTC)),
        )
    ]
    with pytest.raises(ValueError, match="timezone-aware"):
        select_changed_since("Contact", ("Id",), datetime(2026, 1, 31))


def test_hostile_phone_and_source_values_round_trip_verbatim(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """Phone values are returned raw and text written as JSON lands unchanged in the record."""
    record_id = fake.add("Contact", MobilePhone=HOSTILE[0])
    (record,) = sf.read_all()
    assert record.phones["MobilePhone"] == HOSTILE[0]
    (result,) = sf.write([WriteRequest(record_id, {"opt_in_source": HOSTILE[4]})])
    assert result.ok
    assert fake.get(record_id)["WhatsApp_Opt_In_Source__c"] == HOSTILE[4]


def test_full_read_above_the_threshold_uses_a_bulk_query_job(
    fake: FakeSalesforce, policy: RetryPolicy, waits: list[float]
) -> None:
    """Above bulk_query_threshold one Bulk 2.0 job reads everything, its CSV paged by locator."""
    ids = add_contacts(fake, 2500, WhatsApp_Opt_In_Date__c=T0)
    fake.polls_until_done = 2
    sf = connect(make_config({"bulk_query_threshold": 2000}), policy, bulk_page_size=1000)
    records = list(sf.read_all())
    assert sorted(r.record_id for r in records) == sorted(ids)
    assert all(r.get("opt_in") is False and r.get("opt_in_date") == T0 for r in records)
    assert records[0].phones["MobilePhone"] == "+491510000000"
    assert fake.query_calls == 1  # the first page told the size
    assert fake.count("POST", "/jobs/query") == 1
    assert fake.count("GET", "/results") == 3  # 1,000 + 1,000 + 500 rows
    assert waits == [2.0, 4.0]  # two polls saw InProgress


# ---- writes ---------------------------------------------------------------------------------


def test_450_changes_take_three_collection_calls_with_only_changed_fields(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """sObject Collections PATCH: 200 + 200 + 50 records, allOrNone false, only the given fields."""
    ids = add_contacts(fake, 450, WhatsApp_Opt_In_IP__c="198.51.100.1")
    when = datetime(2026, 1, 31, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    results = sf.write([WriteRequest(i, {"opt_in": False, "opt_out_date": when}) for i in ids])
    assert all(r.ok for r in results) and [r.record_id for r in results] == ids
    assert fake.collection_sizes == [200, 200, 50]
    assert set(fake.collection_records[0][0]) == {
        "attributes",
        "id",
        "WhatsApp_Opt_In__c",
        "WhatsApp_Opt_Out_Date__c",
    }
    assert (
        fake.collection_records[0][0]["WhatsApp_Opt_Out_Date__c"] == "2026-01-31T09:30:00.000+0000"
    )
    assert fake.get(ids[-1])["WhatsApp_Opt_Out_Date__c"] == datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    assert fake.get(ids[-1])["WhatsApp_Opt_In_IP__c"] == "198.51.100.1"


def test_fake_refuses_more_than_200_records_like_salesforce(fake: FakeSalesforce) -> None:
    """The fake answers 400 EXCEEDED_ID_LIMIT for 201 records, as Salesforce does."""
    import requests

    token = fake.issue_token()
    body = {
        "allOrNone": False,
        "records": [{"attributes": {"type": "Contact"}, "id": i} for i in add_contacts(fake, 201)],
    }
    answer = requests.patch(
        f"{INSTANCE}/services/data/v62.0/composite/sobjects",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
        timeout=5,
    )
    assert answer.status_code == 400
    assert answer.json()[0]["errorCode"] == "EXCEEDED_ID_LIMIT"


def test_record_errors_come_back_by_position_with_permanence(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """A failed record's result has no id: results match by position; codes decide permanence."""
    ok_before, rejected, gone, ok_after = add_contacts(fake, 4)
    fake.reject(rejected, "FIELD_CUSTOM_VALIDATION_EXCEPTION", "Opt-in needs a source")
    fake.delete(gone)
    results = sf.write(
        [
            WriteRequest(i, {"opt_in": True})
            for i in (ok_before, rejected, "003notAnId", gone, ok_after)
        ]
    )
    assert [(r.record_id, r.ok, r.code, r.permanent) for r in results] == [
        (ok_before, True, "", False),
        (rejected, False, "FIELD_CUSTOM_VALIDATION_EXCEPTION", True),
        ("003notAnId", False, "MALFORMED_ID", True),
        (gone, False, "ENTITY_IS_DELETED", True),
        (ok_after, True, "", False),
    ]
    assert results[1].error == "Opt-in needs a source"
    assert fake.get(ok_after)["WhatsApp_Opt_In__c"] is True


def test_a_locked_record_is_retried_alone(
    fake: FakeSalesforce, sf: SalesforceConnector, waits: list[float]
) -> None:
    """UNABLE_TO_LOCK_ROW on one record re-sends only that record, with backoff."""
    ids = add_contacts(fake, 10)
    fake.lock(ids[4], times=2)
    results = sf.write([WriteRequest(i, {"opt_in": True}) for i in ids])
    assert all(r.ok for r in results)
    assert fake.collection_sizes == [10, 1, 1]
    assert [r["id"] for r in fake.collection_records[1]] == [ids[4]]
    assert waits == [1.0, 2.0]


def test_a_lock_that_never_clears_is_a_retryable_failure(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """After the policy's attempts the locked record fails, not permanently; the others are ok."""
    first, locked = add_contacts(fake, 2)
    fake.lock(locked, times=100)
    results = sf.write(
        [WriteRequest(first, {"opt_in": True}), WriteRequest(locked, {"opt_in": True})]
    )
    assert results[0].ok
    assert (results[1].ok, results[1].code, results[1].permanent) == (
        False,
        "UNABLE_TO_LOCK_ROW",
        False,
    )
    assert fake.collection_sizes == [2, 1, 1, 1, 1, 1]


def test_too_long_text_is_reported_never_truncated(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """An IP longer than the field (describe length) is a permanent error and is not sent."""
    (record_id,) = add_contacts(fake, 1)
    (result,) = sf.write([WriteRequest(record_id, {"opt_in_ip": "2001:db8::1" + "0" * 40})])
    assert (result.ok, result.code, result.permanent) == (False, "STRING_TOO_LONG", True)
    assert "45" in result.error
    assert fake.collection_calls == 0
    assert fake.get(record_id)["WhatsApp_Opt_In_IP__c"] is None


def test_picklist_opt_in_reads_and_writes_the_mapped_values(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """MessagingConsentStatus: Explicitly/DoublyOptedIn read as opted in; opt-out is OptedOut."""
    statuses = ["ExplicitlyOptedIn", "DoublyOptedIn", "OptedOut", "ImplicitlyOptedIn"]
    ids = [
        fake.add(
            "MessagingEndUser",
            MessagingPlatformKey=f"whatsapp:+4915100000{n}",
            MessageType="WhatsApp",
            MessagingConsentStatus=status,
        )
        for n, status in enumerate(statuses)
    ]
    config = make_config(
        mapping={
            "object": "MessagingEndUser",
            "phone_fields": ["MessagingPlatformKey"],
            "fields": {
                "opt_in": "MessagingConsentStatus",
                "opt_in_date": "WhatsApp_Opt_In_Date__c",
                "opt_out_date": "WhatsApp_Opt_Out_Date__c",
            },
            "values": {"opted_in": "ExplicitlyOptedIn", "opted_out": "OptedOut"},
        }
    )
    sf = connect(config, policy)
    sf.preflight()
    assert [r.get("opt_in") for r in sf.read_all()] == [True, True, False, None]
    results = sf.write(
        [
            WriteRequest(ids[0], {"opt_in": False, "opt_out_date": T0}),
            WriteRequest(ids[3], {"opt_in": True}),
        ]
    )
    assert all(r.ok for r in results)
    assert fake.get(ids[0], "MessagingEndUser")["MessagingConsentStatus"] == "OptedOut"
    assert fake.get(ids[3], "MessagingEndUser")["MessagingConsentStatus"] == "ExplicitlyOptedIn"


def test_salesforce_datetime_format_round_trips() -> None:
    """Datetimes are written as 2026-01-31T09:30:00.000+0000 and parsed back to aware UTC."""
    moment = datetime(2026, 1, 31, 10, 30, 0, 123456, tzinfo=timezone(timedelta(hours=1)))
    assert format_datetime(moment) == "2026-01-31T09:30:00.000+0000"
    assert parse_datetime("2026-01-31T09:30:00.000+0000") == datetime(
        2026, 1, 31, 9, 30, tzinfo=UTC
    )
    assert parse_datetime("2026-01-31T09:30:00.000Z") == datetime(2026, 1, 31, 9, 30, tzinfo=UTC)
    assert parse_datetime("2026-01-31") == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_datetime("yesterday") is None


def test_apply_bulk_above_the_threshold_runs_an_ingest_job(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """From bulk_write_threshold on: one update job; failures read back; locked rows re-sent."""
    ids = add_contacts(fake, 350, WhatsApp_Opt_In_IP__c="198.51.100.1")
    fake.reject(ids[10], "FIELD_CUSTOM_VALIDATION_EXCEPTION", "blocked by a validation rule")
    fake.lock(ids[20])
    sf = connect(make_config({"bulk_write_threshold": 300}), policy)
    writes = [WriteRequest(i, {"opt_in": True, "opt_in_date": T0, "opt_in_ip": None}) for i in ids]
    results = sf.write(writes)
    assert [r.record_id for r in results] == ids
    assert (results[10].ok, results[10].code, results[10].permanent) == (
        False,
        "FIELD_CUSTOM_VALIDATION_EXCEPTION",
        True,
    )
    assert sum(r.ok for r in results) == 349
    assert fake.count("POST", "/jobs/ingest") == 1
    assert fake.count("PUT", "/batches") == 1
    assert fake.count("GET", "/failedResults") == 1
    assert fake.collection_sizes == [1]  # only the locked record, through Collections
    assert fake.get(ids[0])["WhatsApp_Opt_In_IP__c"] is None  # "#N/A" set it to null
    assert fake.get(ids[20])["WhatsApp_Opt_In_Date__c"] == T0


def test_apply_bulk_below_the_threshold_uses_collections(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """A write set under bulk_write_threshold goes out 200 records a Collections call."""
    ids = add_contacts(fake, 450)
    results = sf.write([WriteRequest(i, {"opt_in": True}) for i in ids])
    assert all(r.ok for r in results)
    assert fake.collection_sizes == [200, 200, 50]
    assert fake.count("POST", "/jobs/ingest") == 0


# ---- limits and faults ----------------------------------------------------------------------


def test_a_503_burst_is_retried_with_backoff(
    fake: FakeSalesforce, sf: SalesforceConnector, waits: list[float]
) -> None:
    """Three 503s on a query page are waited out (1, 2, 4 s) and the page fetched again."""
    add_contacts(fake, 2500)
    fake.fail_next(503, times=3, path_contains="/query/")  # the second page
    assert len(list(sf.read_all())) == 2500
    assert waits == [1.0, 2.0, 4.0]
    assert fake.query_calls == 2 + 3


def test_a_dropped_connection_is_retried(
    fake: FakeSalesforce, sf: SalesforceConnector, waits: list[float]
) -> None:
    """A connection reset is retried under the same policy."""
    (record_id,) = add_contacts(fake, 1)
    fake.fail_next(0, times=1, disconnect=True, method="PATCH")
    (result,) = sf.write([WriteRequest(record_id, {"opt_in": True})])
    assert result.ok and waits == [1.0]


def test_503_without_end_becomes_connection_failed(
    fake: FakeSalesforce, sf: SalesforceConnector, waits: list[float]
) -> None:
    """When every attempt answers 503 the policy gives up with ConnectionFailed."""
    fake.fail_next(503, times=100)
    with pytest.raises(ConnectionFailed, match="503"):
        list(sf.read_all())
    assert len(waits) == 5


def test_an_expired_session_mid_read_is_renewed_once(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """INVALID_SESSION_ID between pages: one new login, the same page again, nothing lost."""
    ids = add_contacts(fake, 4500)
    reader = sf.read_all()
    first = [next(reader) for _ in range(2000)]
    fake.expire_sessions()
    rest = list(reader)
    assert [r.record_id for r in first + rest] == ids
    assert fake.logins == ["password", "password"]


def test_a_session_refused_right_after_renewal_is_an_authentication_error(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """Renewal happens once per request; a second INVALID_SESSION_ID is fatal."""
    fake.fail_next(401, "INVALID_SESSION_ID", "Session expired or invalid", times=2)
    with pytest.raises(AuthenticationError, match="INVALID_SESSION_ID"):
        list(sf.read_all())
    assert len(fake.logins) == 2


def test_an_expired_access_token_asks_for_a_fresh_one(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """auth access_token cannot renew: the error says how to get a new token."""
    token = fake.issue_token()
    config = make_config({"auth": "access_token"}, secrets={"SALESFORCE_ACCESS_TOKEN": token})
    sf = SalesforceConnector.from_config(config, policy=policy)
    add_contacts(fake, 1)
    assert len(list(sf.read_all())) == 1
    fake.expire_sessions()
    with pytest.raises(AuthenticationError, match="sf org display") as caught:
        list(sf.read_all())
    assert token not in str(caught.value)
    assert fake.logins == []


def test_daily_limit_mid_run_stops_and_keeps_what_was_written(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """REQUEST_LIMIT_EXCEEDED with the allowance used up raises ApiLimitExhausted; earlier
    writes stay written and usage() shows the figures."""
    ids = add_contacts(fake, 600)
    sf.write([WriteRequest(i, {"opt_in": True}) for i in ids[:200]])
    fake.daily_limit = fake.api_used + 1
    sf.write([WriteRequest(i, {"opt_in": True}) for i in ids[200:400]])
    with pytest.raises(ApiLimitExhausted, match="REQUEST_LIMIT_EXCEEDED") as caught:
        sf.write([WriteRequest(i, {"opt_in": True}) for i in ids[400:]])
    assert "API request limit" in str(caught.value) and "3/3" in str(caught.value)
    assert all(fake.get(i)["WhatsApp_Opt_In__c"] is True for i in ids[:400])
    assert all(fake.get(i)["WhatsApp_Opt_In__c"] is False for i in ids[400:])
    assert sf.usage() == {"api_calls": 4, "api_usage_used": 3, "api_usage_max": 3}


def test_a_concurrency_limit_with_allowance_left_is_retried(
    fake: FakeSalesforce, sf: SalesforceConnector, waits: list[float]
) -> None:
    """REQUEST_LIMIT_EXCEEDED while Sforce-Limit-Info shows headroom is throttling: retried."""
    add_contacts(fake, 1)
    fake.fail_next(
        403,
        "REQUEST_LIMIT_EXCEEDED",
        "ConcurrentPerOrgLongTxn Limit exceeded.",
        headers={"Sforce-Limit-Info": "api-usage=10/100000"},
    )
    assert len(list(sf.read_all())) == 1
    assert waits == [1.0]


def test_usage_reports_calls_and_the_orgs_limit_info(
    fake: FakeSalesforce, sf: SalesforceConnector
) -> None:
    """usage(): calls made by this connector plus api-usage USED/MAX from the last answer."""
    fake.api_used = 41_000
    add_contacts(fake, 10)
    sf.preflight()
    list(sf.read_all())
    assert sf.usage() == {"api_calls": 2, "api_usage_used": 41_002, "api_usage_max": 100_000}


# ---- preflight ------------------------------------------------------------------------------


def test_preflight_names_every_missing_field_and_the_object(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """One describe call; the ConfigError lists each missing mapped or phone field."""
    config = make_config(
        mapping={
            "phone_fields": ["MobilePhone", "Mobile__c"],
            "fields": {
                **FIELDS,
                "opt_in_date": "WhatsApp_OptIn_Date__c",
                "opt_in_ip": "Consent_IP__c",
            },
        }
    )
    sf = connect(config, policy)
    with pytest.raises(ConfigError) as caught:
        sf.preflight()
    message = str(caught.value)
    assert "Contact" in message
    assert "mapping.fields.opt_in_date" in message and "'WhatsApp_OptIn_Date__c'" in message
    assert "did you mean 'WhatsApp_Opt_In_Date__c'" in message
    assert "Consent_IP__c" in message and "Mobile__c" in message
    assert len(caught.value.problems) == 3
    assert fake.count("GET", "/describe") == 1


def test_preflight_refuses_an_unknown_object(fake: FakeSalesforce, policy: RetryPolicy) -> None:
    """An object Salesforce does not have is a ConfigError naming it."""
    sf = connect(make_config(mapping={"object": "Contcat"}), policy)
    with pytest.raises(ConfigError, match="Contcat"):
        sf.preflight()


def test_preflight_wants_values_for_a_picklist_opt_in(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """A picklist opt-in field without [mapping.values] is named with its allowed values."""
    config = make_config(
        mapping={
            "object": "MessagingEndUser",
            "phone_fields": ["MessagingPlatformKey"],
            "fields": {
                "opt_in": "MessagingConsentStatus",
                "opt_in_date": "WhatsApp_Opt_In_Date__c",
                "opt_out_date": "WhatsApp_Opt_Out_Date__c",
            },
            "values": {"opted_in": "OptedIn"},
        }
    )
    with pytest.raises(ConfigError) as caught:
        connect(config, policy).preflight()
    assert [p.split(":")[0] for p in caught.value.problems] == [
        "mapping.values.opted_in",
        "mapping.values.opted_out",
    ]
    assert "ExplicitlyOptedIn" in caught.value.problems[0]


# ---- authentication -------------------------------------------------------------------------


def test_a_refused_password_login_names_mode_user_and_answer_not_the_secret(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """INVALID_LOGIN is reported with mode, user and Salesforce's answer; secrets stay out."""
    fake.users[USER] = "something else"
    sf = SalesforceConnector.from_config(make_config(), policy=policy)
    with pytest.raises(AuthenticationError) as caught:
        sf.preflight()
    message = str(caught.value)
    assert "password login" in message and USER in message and "INVALID_LOGIN" in message
    assert PASSWORD not in message and TOKEN not in message


def test_password_mode_with_a_connected_app_uses_the_oauth_flow(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """With consumer_key and SALESFORCE_CONSUMER_SECRET, password mode logs in over OAuth."""
    fake.apps["3MVG9.key"] = "app-secret"
    config = make_config(
        {"consumer_key": "3MVG9.key"},
        secrets={
            "SALESFORCE_PASSWORD": PASSWORD,
            "SALESFORCE_SECURITY_TOKEN": TOKEN,
            "SALESFORCE_CONSUMER_SECRET": "app-secret",
        },
    )
    SalesforceConnector.from_config(config, policy=policy).preflight()
    assert fake.logins == ["password"]
    assert fake.count("GET", "/describe") == 1


def _key_pair(tmp_path: Path, name: str = "salesforce.key") -> tuple[Path, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path = tmp_path / name
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return path, public.decode()


def test_jwt_login_signs_an_assertion_the_org_verifies(
    fake: FakeSalesforce, policy: RetryPolicy, tmp_path: Path
) -> None:
    """jwt: the assertion is signed with private_key_file and verified with the app's cert."""
    key_file, public = _key_pair(tmp_path)
    fake.app_keys["3MVG9.jwt"] = public
    config = make_config(
        {"auth": "jwt", "consumer_key": "3MVG9.jwt", "private_key_file": str(key_file)}, secrets={}
    )
    SalesforceConnector.from_config(config, policy=policy).preflight()
    assert fake.logins == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
    _, other = _key_pair(tmp_path, "another.key")
    fake.app_keys["3MVG9.jwt"] = other
    with pytest.raises(AuthenticationError, match=f"jwt login for user {USER}: invalid_grant"):
        SalesforceConnector.from_config(config, policy=policy).preflight()


def test_client_credentials_log_in_at_the_my_domain(
    fake: FakeSalesforce, policy: RetryPolicy
) -> None:
    """client_credentials: consumer key + secret at the org's My Domain token endpoint."""
    fake.apps["3MVG9.cc"] = "cc-secret"
    config = make_config(
        {"auth": "client_credentials", "consumer_key": "3MVG9.cc"},
        secrets={"SALESFORCE_CONSUMER_SECRET": "cc-secret"},
    )
    SalesforceConnector.from_config(config, policy=policy).preflight()
    assert fake.logins == ["client_credentials"]


def test_a_missing_secret_is_a_config_error_naming_the_variable(policy: RetryPolicy) -> None:
    """from_config refuses password mode without SALESFORCE_PASSWORD, before any request."""
    with pytest.raises(ConfigError, match="SALESFORCE_PASSWORD"):
        SalesforceConnector.from_config(make_config(secrets={}), policy=policy)


# ---- presets --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["salesforce.toml", "salesforce_messaging_end_user.toml"])
def test_presets_load_and_carry_every_spec_key(name: str) -> None:
    """Both presets parse as valid configuration and spell out every [salesforce]/[mapping] key."""
    raw = tomllib.loads((PRESETS / name).read_text(encoding="utf-8"))
    settings = parse(raw, source=name)
    assert settings.crm.kind == "salesforce"
    assert set(raw["salesforce"]) >= {
        "instance_url",
        "api_version",
        "auth",
        "username",
        "consumer_key",
        "private_key_file",
        "domain",
        "bulk_query_threshold",
        "bulk_write_threshold",
    }
    assert set(raw["mapping"]) >= {"object", "phone_fields", "default_region", "fields"}
    assert set(settings.mapping.fields.mapped()) >= {
        "opt_in",
        "opt_in_date",
        "opt_out_date",
        "opt_in_ip",
        "opt_in_source",
    }


def test_preset_fields_exist_on_the_fake_org(fake: FakeSalesforce, policy: RetryPolicy) -> None:
    """The Contact preset's mapping passes preflight against an org with the custom fields."""
    raw = tomllib.loads((PRESETS / "salesforce.toml").read_text(encoding="utf-8"))
    raw["salesforce"].update(auth="password", username=USER)
    config = LoadedConfig(
        parse(raw),
        Secrets({"SALESFORCE_PASSWORD": PASSWORD, "SALESFORCE_SECURITY_TOKEN": TOKEN}),
        None,
    )
    sf = SalesforceConnector.from_config(config, policy=policy)
    sf.preflight()
    assert fake.count("GET", "/describe") == 1
